//! Database mode: the operations on PostgreSQL directly (the controller's `DATABASE_URL`), with the
//! server's queue settings, giving the same JSON and the same `{"error", "code"}` as the API.

use std::time::Duration;

use clap::Parser;
use serde_json::Value;
use sqlx::PgPool;

use super::redact::{redact_in, redact_url};
use super::{Call, CliResult, Exit, Failure};
use crate::config::{DbConfig, QueueConfig};
use crate::identity::QuotaDefaults;
use crate::ops::{self, OpError};
use crate::queue::QueueError;
use crate::webhooks;

/// The `serve` command's database settings, parsed alone.
#[derive(Parser)]
struct DbSettings {
    #[command(flatten)]
    db: DbConfig,
}

/// The database of a controller.
pub(crate) struct Local {
    pool: PgPool,
    settings: QueueConfig,
    /// The URL as given, for redacting it out of messages.
    url: String,
}

impl Local {
    pub async fn open(url: &str, settings: QueueConfig, timeout: Duration) -> CliResult<Local> {
        if let Err(problems) = settings.check() {
            return Err(Failure::new(Exit::Usage, format!("invalid queue settings: {problems}")));
        }
        // The server's database settings (from the same variables, e.g. CONTROLLER_DB_*), with a small
        // pool and the CLI's timeout as the statement timeout.
        let timeout_ms = timeout.as_millis().to_string();
        let db = DbSettings::try_parse_from([
            "expo-controller",
            "--database-url",
            url,
            "--db-pool-size",
            "2",
            "--db-statement-timeout-ms",
            &timeout_ms,
        ])
        .map_err(|e| {
            Failure::new(
                Exit::Usage,
                format!("invalid database settings: {}", redact_in(&e.to_string(), url)),
            )
        })?
        .db;
        let pool = crate::db::connect(&db).await.map_err(|e| {
            Failure::new(
                Exit::Usage,
                format!(
                    "invalid --database-url {}: {}",
                    redact_url(url),
                    redact_in(&e.to_string(), url)
                ),
            )
        })?;
        Ok(Local {
            pool,
            settings,
            url: url.to_string(),
        })
    }

    pub async fn call(&self, call: &Call) -> CliResult<Value> {
        let pool = &self.pool;
        // Who changes what from here, for the audit rows: `cli:<os user>`.
        let actor = &ops::Actor::cli();
        let outcome = match call {
            Call::ListBuilds {
                state,
                platform,
                worker,
                cursor,
                limit,
            } => match ops::build_filter(
                state.as_deref(),
                platform.as_deref(),
                worker.as_deref(),
                cursor.as_deref(),
                *limit,
            ) {
                Ok(filter) => ops::list_builds(pool, filter).await,
                Err(e) => Err(e),
            },
            Call::ShowBuild(id) => ops::show_build(pool, id).await,
            Call::CancelBuild(id) => ops::cancel_build(pool, id, actor).await,
            Call::RetryBuild(id) => ops::retry_build(pool, id, actor).await,
            Call::RequeueBuild { id, drain } => ops::requeue_build(pool, id, *drain, actor).await,
            Call::SetPriority { id, priority } => ops::set_priority(pool, id, *priority, actor).await,
            Call::Logs { id, after, limit } => ops::read_logs(pool, id, *after, Some(*limit)).await,
            Call::ListQueues => ops::list_queues(pool, &self.settings).await,
            Call::SetPaused { platform, paused } => ops::set_paused(pool, platform, *paused, actor).await,
            Call::ListWorkers { cursor, limit } => {
                if cursor.as_deref().is_some_and(|c| !crate::ids::valid_id(c)) {
                    Err(OpError::bad_request("Invalid worker id"))
                } else {
                    ops::list_workers(pool, cursor.as_deref(), *limit).await
                }
            }
            Call::ShowWorker(id) => ops::show_worker(pool, id).await,
            Call::SetWorkerState { id, state } => ops::set_worker_state(pool, &self.settings, id, state, actor).await,
            Call::ListKeys => ops::keys::list_keys(pool).await.and_then(to_value),
            Call::ShowKey(id) => ops::keys::show_key(pool, id).await.and_then(to_value),
            Call::CreateKey(request) => ops::keys::create_key(pool, request, QuotaDefaults::from_env(), actor)
                .await
                .and_then(to_value),
            Call::UpdateKey { id, update } => ops::keys::update_key(pool, id, update, actor).await.and_then(to_value),
            Call::RevokeKey(id) => ops::keys::revoke_key(pool, id, actor).await.and_then(to_value),
            Call::ReleaseWorker(id) => ops::release_worker(pool, id, actor).await,
            Call::ListWebhooks => webhooks::list(pool, actor).await.and_then(to_value),
            Call::ShowWebhook(id) => webhooks::show(pool, id, actor).await.and_then(to_value),
            Call::CreateWebhook(request) => match certs_key_from_env() {
                Some(key) => webhooks::create(pool, &key, allow_private_from_env(), request, actor)
                    .await
                    .and_then(to_value),
                None => Err(OpError::bad_request(
                    "webhooks create in database mode seals the secret with the server's CONTROLLER_CERTS_KEY: set it, or use --server",
                )),
            },
            Call::DeleteWebhook(id) => webhooks::delete(pool, id, actor).await.map(|()| Value::Null),
            Call::TestWebhook(id) => webhooks::test(pool, id, actor).await.and_then(to_value),
            Call::WebhookDeliveries { id, limit } => {
                webhooks::deliveries(pool, id, *limit, actor).await.and_then(to_value)
            }
            Call::Redeliver(id) => webhooks::redeliver(pool, id, actor).await.and_then(to_value),
            Call::ListAudit {
                actor: who,
                action,
                target,
                since,
                cursor,
                limit,
            } => ops::list_audit(
                pool,
                who.as_deref(),
                action.as_deref(),
                target.as_deref(),
                since.as_deref(),
                cursor.as_deref(),
                *limit,
            )
            .await
            .and_then(to_value),
        };
        outcome.map_err(|e| self.failure(e))
    }

    fn failure(&self, error: OpError) -> Failure {
        if let Some(body) = error.body() {
            let exit = match &error {
                OpError::Queue(QueueError::QueueFull) => Exit::Server,
                _ => Exit::Refused,
            };
            return Failure { exit, body };
        }
        let shown = redact_in(&format!("{error:#}"), &self.url);
        match error {
            OpError::Queue(QueueError::Db(e)) if unreachable(&e) => Failure::new(
                Exit::Connect,
                format!("cannot reach the database at {}: {shown}", redact_url(&self.url)),
            ),
            OpError::Queue(QueueError::Db(e)) if timed_out(&e) => Failure::new(
                Exit::Timeout,
                format!("the database did not finish in time (--timeout): {shown}"),
            ),
            _ => Failure::new(Exit::Server, format!("database error: {shown}")),
        }
    }
}

/// The server's certs key, which seals webhook secrets (database mode only).
fn certs_key_from_env() -> Option<[u8; 32]> {
    crate::ids::decode_key32(std::env::var("CONTROLLER_CERTS_KEY").ok()?.trim())
}

fn allow_private_from_env() -> bool {
    std::env::var("CONTROLLER_WEBHOOK_ALLOW_PRIVATE").is_ok_and(|v| v.trim() == "true")
}

fn to_value(view: impl serde::Serialize) -> Result<Value, OpError> {
    serde_json::to_value(view).map_err(|e| OpError::Queue(QueueError::Db(sqlx::Error::Decode(Box::new(e)))))
}

fn unreachable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(e) => e
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("28") || c == "3D000"),
        _ => false,
    }
}

/// `statement_timeout` (57014, query_canceled).
fn timed_out(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("57014"))
}
