//! Operator subcommands: `builds`, `queues`, `workers`. With `--server` they call the `/api/v2` API of a
//! running controller over HTTP(S); otherwise they work on the database directly through the same
//! operations (`ops`), with the server's queue settings. Either way they show the same data: a table on
//! a terminal, JSON otherwise (or with `--json`). Errors go to stderr; the exit code says what happened
//! ([`Exit`]).

mod database;
mod download;
mod follow;
mod http;
mod output;
mod redact;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::config::QueueConfig;
pub use output::{emit, emit_or_exit};
pub use redact::redact_url;

/// Shown under the operator commands' help: ids use `A-Za-z0-9_-`, so one in 64 starts with `-`.
pub const ID_HELP: &str = "Ids may start with '-' and are accepted as they are (builds show -0SgRZVL5Z4WI1KpaoV13).\n\
     `--` ends the options of any command: everything after it is an argument (builds show -- -0SgRZVL5Z4WI1KpaoV13).\n\n\
     Output: a table on a terminal, JSON when stdout is not a terminal or with --json (--table forces tables).\n\
     Exit codes: 0 ok, 1 refused (not found, conflict, invalid input, unauthorised), 2 usage, 3 cannot connect,\n\
     4 timed out, 5 server error or unexpected answer, 6 the build ended failed or cancelled (watch, logs -f).";

/// Where the operator commands act, and how they show results.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Base URL of a running controller (http:// or https://, e.g. http://127.0.0.1:4000); without it,
    /// the database is used.
    #[arg(long, env = "CONTROLLER_URL", hide_env_values = true, global = true)]
    pub server: Option<String>,
    /// Admin API key for `--server`.
    #[arg(long, env = "CONTROLLER_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// Extra root certificate(s) (PEM) trusted for an https:// `--server`, beside the system's (for a
    /// private CA or a self-signed controller).
    #[arg(long, env = "CONTROLLER_CA_CERT", value_name = "PEM_FILE", global = true)]
    pub ca_cert: Option<std::path::PathBuf>,
    /// PostgreSQL URL when no `--server` is given (the controller's own DATABASE_URL).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
    /// Give up on a request (or a database statement) after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30, global = true, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
    /// Print JSON (the API's answers), also on a terminal.
    #[arg(long, global = true, conflicts_with = "table")]
    pub json: bool,
    /// Print tables, also when stdout is not a terminal.
    #[arg(long, global = true)]
    pub table: bool,
    /// Queue settings for database mode: the same variables and flags as `serve`.
    #[command(flatten, next_help_heading = "Queue settings (database mode, as for serve)")]
    pub queue: QueueConfig,
}

impl Target {
    fn json_output(&self) -> bool {
        self.json || (!self.table && !std::io::stdout().is_terminal())
    }
}

#[derive(Debug, Subcommand)]
pub enum BuildsCommand {
    /// Builds, newest first (a page; --cursor for the next, --all for every page).
    List {
        /// Only builds in these states (comma-separated: pending,assigned,building,…).
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        platform: Option<String>,
        /// Only builds of this worker.
        #[arg(long, allow_hyphen_values = true)]
        worker: Option<String>,
        #[command(flatten)]
        page: Page,
    },
    /// One build with its attempts.
    Show {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
    },
    /// Cancel a queued or running build.
    Cancel {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
    },
    /// Re-run a failed or cancelled build as a new attempt.
    Retry {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
    },
    /// Give a running attempt back to the queue (not to the same worker within the cool-off).
    Requeue {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
        /// Also drain the worker it came from.
        #[arg(long)]
        drain: bool,
    },
    /// Change the priority (-100..100, higher first) of a build that is not running.
    Priority {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
        #[arg(allow_hyphen_values = true, value_name = "PRIORITY")]
        priority: i64,
    },
    /// Print a build's log; with -f, keep printing new lines until the build is final.
    Logs {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
        /// Follow: print new lines as they come, until the build is final.
        #[arg(short, long)]
        follow: bool,
        /// Only lines after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[command(flatten)]
        every: Interval,
    },
    /// Save a build's result (or source) to a file (with --server; progress on a terminal).
    Download {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
        /// What to download.
        #[arg(long, value_enum, default_value = "result")]
        artifact: download::Artifact,
        /// The file to write (default: the name the server suggests, in the current directory).
        #[arg(short, long, value_name = "FILE")]
        output: Option<std::path::PathBuf>,
        /// Overwrite the file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Print a build's state and progress as they change, until it is final.
    Watch {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
        #[command(flatten)]
        every: Interval,
    },
}

/// Paging of list commands.
#[derive(Debug, Clone, Args)]
pub struct Page {
    /// Items per page (1..500; default 50, or 500 with --all).
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..=500))]
    pub limit: Option<i64>,
    /// Start after this cursor (the `next_cursor` of the previous page).
    #[arg(long, allow_hyphen_values = true)]
    pub cursor: Option<String>,
    /// Fetch every page.
    #[arg(long)]
    pub all: bool,
}

/// How often `logs -f` and `watch` ask.
#[derive(Debug, Clone, Args)]
pub struct Interval {
    /// Milliseconds between two looks.
    #[arg(long = "interval-ms", value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub interval_ms: u64,
}

#[derive(Debug, Subcommand)]
pub enum QueuesCommand {
    /// Every platform queue: depth by state, oldest pending age, paused.
    List,
    /// Stop handing out the platform's builds (submits are still accepted).
    Pause { platform: String },
    /// Hand out the platform's builds again (waiting workers get them at once).
    Resume { platform: String },
}

#[derive(Debug, Subcommand)]
pub enum WorkersCommand {
    /// Workers by id (a page; --cursor for the next, --all for every page).
    List {
        #[command(flatten)]
        page: Page,
    },
    /// One worker.
    Show {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
    },
    /// Finish the current build, take no new one.
    Drain {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
    },
    /// Take no builds until enabled (the current one is requeued).
    Disable {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
    },
    /// Take builds again after drain or disable.
    Enable {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
    },
    /// Revoke: token dropped, offline, its attempt requeued.
    Revoke {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
    },
    /// Release from quarantine or probation: healthy again, its record cleared.
    Release {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; its secret is printed once and never again.
    Create {
        /// Who holds it (at most 256 bytes).
        #[arg(long)]
        name: String,
        /// worker, submitter, viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// Lifetime: seconds, or with a unit (90m, 12h, 30d).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs, allow_hyphen_values = true)]
        expires_in: Option<i64>,
        /// Fair-share weight, 1–100 (default 1).
        #[arg(long, allow_hyphen_values = true)]
        weight: Option<i64>,
        /// Builds running at once (0 = unlimited).
        #[arg(long, allow_hyphen_values = true)]
        max_running: Option<i64>,
        /// Builds queued at once (0 = unlimited).
        #[arg(long, allow_hyphen_values = true)]
        max_queued: Option<i64>,
        /// An enrollment key (role worker, 24 h unless --expires-in): registers exactly one worker.
        #[arg(long)]
        enroll: bool,
    },
    /// Every key, newest first.
    List,
    /// One key.
    Show {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
    },
    /// Change a key's name, expiry (from now), weight or quotas.
    Update {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs, allow_hyphen_values = true)]
        expires_in: Option<i64>,
        #[arg(long, allow_hyphen_values = true)]
        weight: Option<i64>,
        #[arg(long, allow_hyphen_values = true)]
        max_running: Option<i64>,
        #[arg(long, allow_hyphen_values = true)]
        max_queued: Option<i64>,
    },
    /// Revoke a key: refused everywhere within 2 s.
    Revoke {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Subscribe a URL to events; the signing secret (`whsec_…`) is printed once and never again.
    Create {
        /// `https://…` (private addresses only with CONTROLLER_WEBHOOK_ALLOW_PRIVATE=true on the server).
        #[arg(long)]
        url: String,
        /// Event kinds, `family.*` or `*` (repeat, or separate with commas).
        #[arg(long = "event", value_delimiter = ',', required = true)]
        events: Vec<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Your subscriptions (the admin: every one), newest first.
    List,
    /// One subscription.
    Show {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
    },
    /// Delete a subscription with its deliveries.
    Delete {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
    },
    /// Send a `webhook.test` event to it.
    Test {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
    },
    /// Its deliveries, newest first, with every attempt.
    Deliveries {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
        /// Deliveries shown, 1–500.
        #[arg(long, default_value_t = 50, allow_hyphen_values = true)]
        limit: i64,
    },
    /// Send a delivery again (same message id).
    Redeliver {
        /// The delivery's id (from `deliveries`).
        #[arg(allow_hyphen_values = true, value_name = "DELIVERY")]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The audit log, newest first: who changed what, from where.
    List {
        /// A key id or an actor name (`admin`, a key's name, `cli:alice`).
        #[arg(long)]
        actor: Option<String>,
        /// An action (`build.cancel`), or every action of a kind (`build.*`).
        #[arg(long)]
        action: Option<String>,
        /// A target id (a build, worker, key or queue; ids may begin with `-`).
        #[arg(long, allow_hyphen_values = true)]
        target: Option<String>,
        /// Rows at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Rows older than this cursor (the `next_cursor` of a page).
        #[arg(long, allow_hyphen_values = true)]
        cursor: Option<String>,
        /// Rows per page, 1–500.
        #[arg(long, default_value_t = 50, allow_hyphen_values = true)]
        limit: i64,
    },
}

/// `30d`, `12h`, `90m`, `45s` or plain seconds. Zero and negative values are passed on, so the
/// controller names the problem (an expiry in the past).
fn parse_duration_secs(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("unknown unit '{unit}' (use s, m, h or d)")),
    };
    let value: i64 = number
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a duration (e.g. 30d, 12h, 3600)"))?;
    value.checked_mul(scale).ok_or_else(|| format!("'{text}' is too long"))
}

/// An operator command.
#[derive(Debug)]
pub enum Operation {
    Builds(BuildsCommand),
    Queues(QueuesCommand),
    Workers(WorkersCommand),
    Keys(KeysCommand),
    Audit(AuditCommand),
    Webhooks(WebhooksCommand),
}

/// One call to the controller, the same in both modes.
#[derive(Debug, Clone)]
pub(crate) enum Call {
    ListBuilds {
        state: Option<String>,
        platform: Option<String>,
        worker: Option<String>,
        cursor: Option<String>,
        limit: i64,
    },
    ShowBuild(String),
    CancelBuild(String),
    RetryBuild(String),
    RequeueBuild {
        id: String,
        drain: bool,
    },
    SetPriority {
        id: String,
        priority: i64,
    },
    Logs {
        id: String,
        after: i64,
        limit: i64,
    },
    ListQueues,
    SetPaused {
        platform: String,
        paused: bool,
    },
    ListWorkers {
        cursor: Option<String>,
        limit: i64,
    },
    ShowWorker(String),
    SetWorkerState {
        id: String,
        state: &'static str,
    },
    ListKeys,
    ShowKey(String),
    CreateKey(crate::ops::keys::KeyRequest),
    UpdateKey {
        id: String,
        update: crate::ops::keys::KeyUpdate,
    },
    RevokeKey(String),
    ReleaseWorker(String),
    ListWebhooks,
    ShowWebhook(String),
    CreateWebhook(crate::webhooks::WebhookRequest),
    DeleteWebhook(String),
    TestWebhook(String),
    WebhookDeliveries {
        id: String,
        limit: i64,
    },
    Redeliver(String),
    ListAudit {
        actor: Option<String>,
        action: Option<String>,
        target: Option<String>,
        since: Option<String>,
        cursor: Option<String>,
        limit: i64,
    },
}

/// How a command ended; the process exit code scripts can rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    /// The server (or the database) refused: not found, conflict, invalid input, unauthorised (4xx).
    Refused = 1,
    /// Bad flags or arguments, or nowhere to act (no --server, no DATABASE_URL).
    Usage = 2,
    /// Connection refused, unknown host, TLS handshake failed, database unreachable.
    Connect = 3,
    /// No answer within --timeout.
    Timeout = 4,
    /// A 5xx, or an answer that is not the expected JSON.
    Server = 5,
    /// `builds watch` / `builds logs -f`: the build ended failed or cancelled.
    BuildFailed = 6,
}

/// A failed command: its exit code and what to show (the server's `{"error", ...}` body when there is one).
#[derive(Debug)]
pub(crate) struct Failure {
    pub exit: Exit,
    pub body: Value,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Failure {
            exit,
            body: json!({ "error": message.into() }),
        }
    }

    fn message(&self) -> String {
        let error = self.body["error"]
            .as_str()
            .map_or_else(|| self.body.to_string(), str::to_string);
        match self.body["code"].as_str() {
            Some(code) => format!("{error} ({code})"),
            None => error,
        }
    }
}

pub(crate) type CliResult<T> = Result<T, Failure>;

/// Where the calls go.
pub(crate) enum Backend {
    Http(http::Remote),
    Database(database::Local),
}

impl Backend {
    async fn open(target: &Target) -> CliResult<Backend> {
        let timeout = Duration::from_secs(target.timeout);
        match (&target.server, &target.database_url) {
            (Some(server), _) => Ok(Backend::Http(http::Remote::new(
                server,
                target.api_key.as_deref().unwrap_or_default(),
                target.ca_cert.as_deref(),
                timeout,
            )?)),
            (None, Some(url)) => Ok(Backend::Database(
                database::Local::open(url, target.queue.clone(), timeout).await?,
            )),
            (None, None) => Err(Failure::new(
                Exit::Usage,
                "nowhere to act: pass --server URL (or CONTROLLER_URL) with --api-key, or --database-url (or DATABASE_URL)",
            )),
        }
    }

    pub async fn call(&self, call: &Call) -> CliResult<Value> {
        match self {
            Backend::Http(remote) => remote.call(call).await,
            Backend::Database(local) => local.call(call).await,
        }
    }
}

/// Runs an operator command: prints its result (stdout) or its error (stderr); returns the exit code.
pub async fn run(target: &Target, operation: Operation) -> ExitCode {
    let json = target.json_output();
    let outcome = match Backend::open(target).await {
        Ok(backend) => execute(&backend, operation, json).await,
        Err(failure) => Err(failure),
    };
    let exit = match outcome {
        Ok(exit) => exit,
        Err(failure) => {
            if json {
                eprintln!("{}", failure.body);
            } else {
                eprintln!("error: {}", failure.message());
            }
            failure.exit
        }
    };
    ExitCode::from(exit as u8)
}

async fn execute(backend: &Backend, operation: Operation, json: bool) -> CliResult<Exit> {
    let shown = match operation {
        Operation::Builds(BuildsCommand::List {
            state,
            platform,
            worker,
            page,
        }) => {
            let first = Call::ListBuilds {
                state,
                platform,
                worker,
                cursor: page.cursor.clone(),
                limit: page.page_size(),
            };
            let list = paged(backend, first, page.all).await?;
            output::Shown::Builds(list)
        }
        Operation::Builds(BuildsCommand::Show { id }) => {
            output::Shown::Build(backend.call(&Call::ShowBuild(id)).await?)
        }
        Operation::Builds(BuildsCommand::Cancel { id }) => {
            output::Shown::Build(backend.call(&Call::CancelBuild(id)).await?)
        }
        Operation::Builds(BuildsCommand::Retry { id }) => {
            output::Shown::Build(backend.call(&Call::RetryBuild(id)).await?)
        }
        Operation::Builds(BuildsCommand::Requeue { id, drain }) => {
            output::Shown::Build(backend.call(&Call::RequeueBuild { id, drain }).await?)
        }
        Operation::Builds(BuildsCommand::Priority { id, priority }) => {
            output::Shown::Build(backend.call(&Call::SetPriority { id, priority }).await?)
        }
        Operation::Builds(BuildsCommand::Logs {
            id,
            follow,
            after,
            every,
        }) => return follow::logs(backend, &id, after, follow, every.period(), json).await,
        Operation::Builds(BuildsCommand::Download {
            id,
            artifact,
            output,
            force,
        }) => return download::download(backend, &id, artifact, output, force, json).await,
        Operation::Builds(BuildsCommand::Watch { id, every }) => {
            return follow::watch(backend, &id, every.period(), json).await;
        }
        Operation::Queues(QueuesCommand::List) => output::Shown::Queues(backend.call(&Call::ListQueues).await?),
        Operation::Queues(QueuesCommand::Pause { platform }) => {
            output::Shown::Queue(backend.call(&Call::SetPaused { platform, paused: true }).await?)
        }
        Operation::Queues(QueuesCommand::Resume { platform }) => output::Shown::Queue(
            backend
                .call(&Call::SetPaused {
                    platform,
                    paused: false,
                })
                .await?,
        ),
        Operation::Workers(WorkersCommand::List { page }) => {
            let first = Call::ListWorkers {
                cursor: page.cursor.clone(),
                limit: page.page_size(),
            };
            output::Shown::Workers(paged(backend, first, page.all).await?)
        }
        Operation::Workers(WorkersCommand::Show { id }) => {
            output::Shown::Worker(backend.call(&Call::ShowWorker(id)).await?)
        }
        Operation::Workers(WorkersCommand::Drain { id }) => set_worker_state(backend, id, "draining").await?,
        Operation::Workers(WorkersCommand::Disable { id }) => set_worker_state(backend, id, "disabled").await?,
        Operation::Workers(WorkersCommand::Enable { id }) => set_worker_state(backend, id, "active").await?,
        Operation::Workers(WorkersCommand::Revoke { id }) => set_worker_state(backend, id, "revoked").await?,
        Operation::Keys(KeysCommand::List) => output::Shown::Keys(backend.call(&Call::ListKeys).await?),
        Operation::Audit(AuditCommand::List {
            actor,
            action,
            target,
            since,
            cursor,
            limit,
        }) => output::Shown::Audit(
            backend
                .call(&Call::ListAudit {
                    actor,
                    action,
                    target,
                    since,
                    cursor,
                    limit,
                })
                .await?,
        ),
        Operation::Keys(KeysCommand::Show { id }) => output::Shown::Key(backend.call(&Call::ShowKey(id)).await?),
        Operation::Keys(KeysCommand::Create {
            name,
            role,
            expires_in,
            weight,
            max_running,
            max_queued,
            enroll,
        }) => {
            let request = crate::ops::keys::KeyRequest {
                name: Some(name),
                role: Some(role),
                expires_in_secs: expires_in,
                weight,
                max_running,
                max_queued,
                enroll: enroll.then_some(true),
            };
            output::Shown::Key(backend.call(&Call::CreateKey(request)).await?)
        }
        Operation::Keys(KeysCommand::Update {
            id,
            name,
            expires_in,
            weight,
            max_running,
            max_queued,
        }) => {
            let update = crate::ops::keys::KeyUpdate {
                name,
                expires_in_secs: expires_in,
                weight,
                max_running,
                max_queued,
            };
            output::Shown::Key(backend.call(&Call::UpdateKey { id, update }).await?)
        }
        Operation::Keys(KeysCommand::Revoke { id }) => {
            backend.call(&Call::RevokeKey(id.clone())).await?;
            // The API answers 204; both modes show the key as it is now.
            output::Shown::Key(backend.call(&Call::ShowKey(id)).await?)
        }
        Operation::Workers(WorkersCommand::Release { id }) => {
            output::Shown::Worker(backend.call(&Call::ReleaseWorker(id)).await?)
        }
        Operation::Webhooks(command) => output::Shown::Webhooks(webhooks(backend, command).await?),
    };
    output::print(&shown, json);
    Ok(Exit::Ok)
}

async fn webhooks(backend: &Backend, command: WebhooksCommand) -> CliResult<Value> {
    let call = match command {
        WebhooksCommand::Create {
            url,
            events,
            description,
        } => Call::CreateWebhook(crate::webhooks::WebhookRequest {
            url: Some(url),
            events: Some(events),
            description,
        }),
        WebhooksCommand::List => Call::ListWebhooks,
        WebhooksCommand::Show { id } => Call::ShowWebhook(id),
        WebhooksCommand::Delete { id } => {
            backend.call(&Call::DeleteWebhook(id.clone())).await?;
            return Ok(json!({ "deleted": id }));
        }
        WebhooksCommand::Test { id } => Call::TestWebhook(id),
        WebhooksCommand::Deliveries { id, limit } => Call::WebhookDeliveries { id, limit },
        WebhooksCommand::Redeliver { id } => Call::Redeliver(id),
    };
    backend.call(&call).await
}

async fn set_worker_state(backend: &Backend, id: String, state: &'static str) -> CliResult<output::Shown> {
    Ok(output::Shown::Worker(
        backend.call(&Call::SetWorkerState { id, state }).await?,
    ))
}

impl Page {
    fn page_size(&self) -> i64 {
        self.limit.unwrap_or(if self.all { 500 } else { 50 })
    }
}

impl Interval {
    fn period(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
}

/// One page, or with `all` every page from the first call's cursor on: `{"items", "next_cursor"}`.
async fn paged(backend: &Backend, mut call: Call, all: bool) -> CliResult<Value> {
    let mut page = backend.call(&call).await?;
    if !all {
        return Ok(page);
    }
    let mut items = Vec::new();
    loop {
        let next = page["next_cursor"].as_str().map(str::to_string);
        if let Some(Value::Array(more)) = page.get_mut("items").map(Value::take) {
            items.extend(more);
        }
        let Some(next) = next else { break };
        match &mut call {
            Call::ListBuilds { cursor, .. } | Call::ListWorkers { cursor, .. } => *cursor = Some(next),
            _ => break,
        }
        page = backend.call(&call).await?;
    }
    Ok(json!({ "items": items, "next_cursor": null }))
}
