//! Operator subcommands: `builds`, `queues`, `workers`. With `--server` they call the `/api/v2` API of a
//! running controller; otherwise they work on the database directly through the same operations
//! (`api::operations`). Either way they print the same JSON; errors print `{"error": ...}` to stderr.

use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::api::operations;
use crate::config::{DbConfig, QueueConfig};
use crate::queue::{BuildFilter, BuildState, Platform};

/// Shown under the operator commands' help: ids use `A-Za-z0-9_-`, so one in 64 starts with `-`.
pub const ID_HELP: &str = "Ids may start with '-' and are accepted as they are (builds show -0SgRZVL5Z4WI1KpaoV13).\n\
     `--` ends the options of any command: everything after it is an argument (builds show -- -0SgRZVL5Z4WI1KpaoV13).";

/// Where the operator commands act.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Base URL of a running controller (e.g. http://127.0.0.1:4000); without it, the database is used.
    #[arg(long, env = "CONTROLLER_URL", global = true)]
    pub server: Option<String>,
    /// Admin API key for `--server`.
    #[arg(long, env = "CONTROLLER_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// PostgreSQL URL when no `--server` is given.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum BuildsCommand {
    /// Builds, newest first.
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        platform: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
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
}

#[derive(Debug, Subcommand)]
pub enum QueuesCommand {
    Pause { platform: String },
    Resume { platform: String },
}

#[derive(Debug, Subcommand)]
pub enum WorkersCommand {
    List {
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Finish the current build, take no new one.
    Drain {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
    },
    /// Revoke: token dropped, offline, its attempt requeued.
    Revoke {
        #[arg(allow_hyphen_values = true, value_name = "ID")]
        id: String,
    },
}

/// An operator command.
#[derive(Debug)]
pub enum Operation {
    Builds(BuildsCommand),
    Queues(QueuesCommand),
    Workers(WorkersCommand),
}

/// Runs the command; returns the JSON to print, or `{"error": ...}`.
pub async fn run(target: &Target, operation: Operation) -> Result<Value, Value> {
    match &target.server {
        Some(server) => over_http(server, target.api_key.as_deref().unwrap_or_default(), &operation).await,
        None => on_database(target, operation).await,
    }
}

fn error(message: impl Into<String>) -> Value {
    serde_json::json!({ "error": message.into() })
}

/// Method, path and whether the answer is the result.
fn request_for(operation: &Operation) -> (&'static str, String) {
    match operation {
        Operation::Builds(BuildsCommand::List { state, platform, limit }) => {
            let mut query = format!("limit={limit}");
            if let Some(s) = state {
                query.push_str(&format!("&state={s}"));
            }
            if let Some(p) = platform {
                query.push_str(&format!("&platform={p}"));
            }
            ("GET", format!("/api/v2/builds?{query}"))
        }
        Operation::Builds(BuildsCommand::Show { id }) => ("GET", format!("/api/v2/builds/{id}")),
        Operation::Builds(BuildsCommand::Cancel { id }) => ("POST", format!("/api/v2/builds/{id}/cancel")),
        Operation::Builds(BuildsCommand::Retry { id }) => ("POST", format!("/api/v2/builds/{id}/retry")),
        Operation::Builds(BuildsCommand::Requeue { id, drain }) => {
            let query = if *drain { "?drain=true" } else { "" };
            ("POST", format!("/api/v2/builds/{id}/requeue{query}"))
        }
        Operation::Queues(QueuesCommand::Pause { platform }) => ("POST", format!("/api/v2/queues/{platform}/pause")),
        Operation::Queues(QueuesCommand::Resume { platform }) => ("POST", format!("/api/v2/queues/{platform}/resume")),
        Operation::Workers(WorkersCommand::List { limit }) => ("GET", format!("/api/v2/workers?limit={limit}")),
        Operation::Workers(WorkersCommand::Drain { id }) => ("POST", format!("/api/v2/workers/{id}/drain")),
        Operation::Workers(WorkersCommand::Revoke { id }) => ("DELETE", format!("/api/v2/workers/{id}")),
    }
}

async fn over_http(server: &str, api_key: &str, operation: &Operation) -> Result<Value, Value> {
    let (method, path) = request_for(operation);
    let request = hyper::Request::builder()
        .method(method)
        .uri(format!("{}{path}", server.trim_end_matches('/')))
        .header("X-API-Key", api_key)
        .body(Full::new(bytes::Bytes::new()))
        .map_err(|e| error(e.to_string()))?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(request)
        .await
        .map_err(|e| error(format!("cannot reach {server}: {e}")))?;
    let ok = response.status().is_success();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| error(e.to_string()))?
        .to_bytes();
    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if ok { Ok(value) } else { Err(value) }
}

async fn on_database(target: &Target, operation: Operation) -> Result<Value, Value> {
    let url = target
        .database_url
        .clone()
        .ok_or_else(|| error("set --server or DATABASE_URL"))?;
    let db = DbConfig {
        db_pool_size: 2,
        ..DbConfig::new(url)
    };
    let pool = crate::db::connect(&db).await.map_err(|e| error(e.to_string()))?;
    let settings = QueueConfig::default();
    let outcome = match operation {
        Operation::Builds(BuildsCommand::List { state, platform, limit }) => {
            let states = match state {
                None => None,
                Some(s) => Some(vec![
                    BuildState::parse(&s)
                        .ok_or_else(|| error("Invalid state"))?
                        .as_str()
                        .to_string(),
                ]),
            };
            let platform = match platform {
                None => None,
                Some(p) => Some(Platform::parse(&p).ok_or_else(|| error("Invalid platform"))?),
            };
            let filter = BuildFilter {
                states,
                platform,
                limit: limit.clamp(1, 500),
                ..BuildFilter::default()
            };
            operations::list_builds(&pool, filter).await
        }
        Operation::Builds(BuildsCommand::Show { id }) => operations::show_build(&pool, &id).await,
        Operation::Builds(BuildsCommand::Cancel { id }) => operations::cancel_build(&pool, &id).await,
        Operation::Builds(BuildsCommand::Retry { id }) => operations::retry_build(&pool, &id).await,
        Operation::Builds(BuildsCommand::Requeue { id, drain }) => operations::requeue_build(&pool, &id, drain).await,
        Operation::Queues(QueuesCommand::Pause { platform }) => operations::set_paused(&pool, &platform, true).await,
        Operation::Queues(QueuesCommand::Resume { platform }) => operations::set_paused(&pool, &platform, false).await,
        Operation::Workers(WorkersCommand::List { limit }) => {
            operations::list_workers(&pool, None, limit.clamp(1, 500)).await
        }
        Operation::Workers(WorkersCommand::Drain { id }) => {
            operations::set_worker_state(&pool, &settings, &id, "draining").await
        }
        Operation::Workers(WorkersCommand::Revoke { id }) => {
            operations::set_worker_state(&pool, &settings, &id, "revoked").await
        }
    };
    // The same body as the server's `/api/v2` answer: the message and its stable code.
    outcome.map_err(|e| serde_json::json!({ "error": e.message(), "code": e.code() }))
}
