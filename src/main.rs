//! `expo-controller`: serve the API, apply migrations, or generate a key.

use clap::{Parser, Subcommand};

use expo_controller::config::{Config, DbConfig};
use expo_controller::{cli, db, ids, server};

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
    /// Operator: list, show, cancel, retry, requeue or reprioritise builds; print or follow their logs.
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
    /// Operator: list, show, drain, disable, enable or revoke workers.
    #[command(after_help = cli::ID_HELP)]
    Workers {
        #[command(subcommand)]
        action: cli::WorkersCommand,
        #[command(flatten)]
        target: cli::Target,
    },
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
            println!("{}", ids::new_key32());
            Ok(())
        }
        Command::Builds { action, target } => return cli::run(&target, cli::Operation::Builds(action)).await,
        Command::Queues { action, target } => return cli::run(&target, cli::Operation::Queues(action)).await,
        Command::Workers { action, target } => return cli::run(&target, cli::Operation::Workers(action)).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("expo-controller: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
