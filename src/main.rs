//! `expo-controller`: serve the API, apply migrations, or generate a key.

use clap::{Parser, Subcommand};

use expo_controller::config::{Config, DbConfig};
use expo_controller::{cli, db, ids, import, server};

#[derive(Parser)]
#[command(name = "expo-controller", version, about = "Controller of Expo Free Agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply migrations, then serve the HTTP API and run the maintenance jobs.
    Serve {
        #[command(flatten)]
        config: Box<Config>,
        /// Do not apply migrations at start-up.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Apply pending database migrations and exit.
    Migrate {
        #[command(flatten)]
        db: DbConfig,
    },
    /// Print a fresh random 32-byte key (base64), for CONTROLLER_API_KEY or CONTROLLER_CERTS_KEY.
    GenKey,
    /// Import a TypeScript controller's SQLite database and storage folder (idempotent, resumable).
    /// Uses the same DATABASE_URL and storage settings as `serve`; exits 2 when rows were skipped.
    ImportTs {
        #[command(flatten)]
        args: import::ImportArgs,
        #[command(flatten)]
        config: Box<Config>,
    },
    /// Operator: list, show, cancel, retry, requeue or reprioritise builds; print or follow their logs; download results.
    #[command(after_help = cli::ID_HELP)]
    Builds {
        #[command(subcommand)]
        action: cli::BuildsCommand,
        #[command(flatten)]
        target: cli::Target,
    },
    /// Operator: list, pause or resume the platform queues.
    #[command(after_help = cli::ID_HELP)]
    Queues {
        #[command(subcommand)]
        action: cli::QueuesCommand,
        #[command(flatten)]
        target: cli::Target,
    },
    /// Artifact storage: copy a store into another (move a single host's directory into a bucket).
    Storage {
        #[command(subcommand)]
        action: StorageCommand,
    },
    /// Admin: create, list, show, update or revoke keys with a role (the secret is shown once, at creation).
    #[command(after_help = cli::ID_HELP)]
    Keys {
        #[command(subcommand)]
        action: cli::KeysCommand,
        #[command(flatten)]
        target: cli::Target,
    },
    /// Webhooks: subscribe URLs to events (signed deliveries, the secret shown once), see deliveries.
    #[command(after_help = cli::ID_HELP)]
    Webhooks {
        #[command(subcommand)]
        action: cli::WebhooksCommand,
        #[command(flatten)]
        target: cli::Target,
    },
    /// Admin: read the audit log (who changed what, from where), newest first.
    Audit {
        #[command(subcommand)]
        action: cli::AuditCommand,
        #[command(flatten)]
        target: cli::Target,
    },
    /// Operator: list, show, drain, disable, enable or revoke workers.
    #[command(after_help = cli::ID_HELP)]
    Workers {
        #[command(subcommand)]
        action: cli::WorkersCommand,
        #[command(flatten)]
        target: cli::Target,
    },
}

#[derive(Subcommand)]
enum StorageCommand {
    /// Copy every artifact into another store with progress, verifying size and SHA-256 of each
    /// copy; resumable (objects already copied are verified and skipped).
    Copy {
        /// Destination: `s3://bucket[/prefix]` (AWS_* variables) or `file:///absolute/dir`.
        #[arg(long)]
        to: String,
        /// Source: CONTROLLER_STORAGE_URL, or the directory CONTROLLER_STORAGE_DIR when unset.
        #[arg(long, env = "CONTROLLER_STORAGE_URL")]
        from: Option<String>,
        #[arg(long, env = "CONTROLLER_STORAGE_DIR", default_value = "./.data/storage")]
        storage_dir: std::path::PathBuf,
    },
}

/// `storage copy`: progress on stderr, a JSON report on stdout.
async fn storage_copy(from: Option<String>, storage_dir: std::path::PathBuf, to: String) -> anyhow::Result<()> {
    use expo_controller::storage::{Storage, StorageTarget, copy};
    let source = StorageTarget::parse(from.as_deref(), &storage_dir).map_err(anyhow::Error::msg)?;
    let destination = StorageTarget::parse(Some(&to), &storage_dir).map_err(anyhow::Error::msg)?;
    if source == destination {
        anyhow::bail!("source and destination are the same store ({})", source.describe());
    }
    let (from, to) = (Storage::open(&source, true)?, Storage::open(&destination, true)?);
    for store in [&from, &to] {
        store
            .check()
            .await
            .map_err(|e| anyhow::anyhow!("{} is not usable: {e}", store.describe()))?;
    }
    eprintln!("copying {} -> {}", from.describe(), to.describe());
    let report = copy::copy_all(&from, &to, |line| eprintln!("{line}")).await?;
    cli::emit(&format!(
        "{}\n",
        serde_json::json!({
            "copied": report.copied, "skipped": report.skipped, "bytes": report.bytes, "ignored": report.ignored,
        })
    ));
    Ok(())
}

/// Runs the import, prints its summary; exit 0, 2 when something was skipped, 1 when it failed.
async fn import_ts(args: &import::ImportArgs, config: &Config) -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    match import::run(args, config).await {
        Ok(summary) => {
            // The import is done whether or not anyone reads the summary: a closed pipe keeps its code.
            let code: u8 = if summary.skipped_total() > 0 { 2 } else { 0 };
            cli::emit_or_exit(&summary.render(), code.into());
            std::process::ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("expo-controller import-ts: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config, no_migrate } => {
            server::init_tracing(&config.log_format);
            if let Some(limit) = expo_controller::transport::raise_fd_limit() {
                tracing::info!(open_files = limit, "file descriptor limit");
            }
            match server::start(*config, None, !no_migrate).await {
                Ok(running) => {
                    running.wait().await;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        Command::Migrate { db: db_config } => {
            server::init_tracing("text");
            async {
                let pool = db::connect(&db_config).await?;
                db::migrate(&pool).await?;
                tracing::info!("migrations applied");
                Ok(())
            }
            .await
        }
        Command::GenKey => {
            cli::emit(&format!("{}\n", ids::new_key32()));
            Ok(())
        }
        Command::ImportTs { args, config } => return import_ts(&args, &config).await,
        Command::Storage {
            action: StorageCommand::Copy { to, from, storage_dir },
        } => storage_copy(from, storage_dir, to).await,
        Command::Builds { action, target } => return cli::run(&target, cli::Operation::Builds(action)).await,
        Command::Queues { action, target } => return cli::run(&target, cli::Operation::Queues(action)).await,
        Command::Workers { action, target } => return cli::run(&target, cli::Operation::Workers(action)).await,
        Command::Keys { action, target } => return cli::run(&target, cli::Operation::Keys(action)).await,
        Command::Webhooks { action, target } => return cli::run(&target, cli::Operation::Webhooks(action)).await,
        Command::Audit { action, target } => return cli::run(&target, cli::Operation::Audit(action)).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("expo-controller: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
