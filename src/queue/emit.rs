//! Events of state changes, written to the `events` outbox **in the transaction of the change** (so an
//! event exists exactly when its change committed; `src/events.rs` delivers them in id order).
//!
//! Statements that change state in one round trip insert their event in a CTE of the same statement
//! (`INSERT INTO events (kind, build_id, worker_id, data) SELECT … FROM <changed rows>`); multi-statement
//! operations call [`emit`] or [`emit_build`] on their transaction. `data` carries `platform`, `state`
//! (after the change) and the kind's own fields.

use serde_json::{Value, json};
use sqlx::PgConnection;

use super::{Build, FailureKind, QueueResult};

/// Inserts one event in the caller's transaction.
pub(crate) async fn emit(
    conn: &mut PgConnection,
    kind: &str,
    build_id: Option<&str>,
    worker_id: Option<&str>,
    data: Value,
) -> QueueResult<()> {
    sqlx::query("INSERT INTO events (kind, build_id, worker_id, data) VALUES ($1, $2, $3, $4)")
        .bind(kind)
        .bind(build_id)
        .bind(worker_id)
        .bind(sqlx::types::Json(data))
        .execute(conn)
        .await?;
    Ok(())
}

/// An event about `build` (after the change): platform, state and attempt, plus `extra` fields.
pub(crate) async fn emit_build(
    conn: &mut PgConnection,
    kind: &str,
    build: &Build,
    worker_id: Option<&str>,
    extra: Value,
) -> QueueResult<()> {
    let mut data = json!({ "platform": build.queue, "state": build.state, "attempt": build.attempt });
    if let (Some(data), Value::Object(extra)) = (data.as_object_mut(), extra) {
        data.extend(extra);
    }
    emit(conn, kind, Some(&build.id), worker_id, data).await
}

/// The event of a failed attempt: `build.retry_scheduled` when another attempt follows, else
/// `build.timed_out` for deadline failures and `build.failed` for the rest.
pub(crate) fn failure_kind(build: &Build, failure: FailureKind) -> &'static str {
    if build.state == "retryable" {
        "build.retry_scheduled"
    } else if failure == FailureKind::Timeout {
        "build.timed_out"
    } else {
        "build.failed"
    }
}

/// Fields of a failure event: the error and, when retried, the next attempt's time.
pub(crate) fn failure_data(build: &Build, kind: FailureKind, message: &str, reason: &str) -> Value {
    let mut data = json!({ "error": { "kind": kind.as_str(), "message": message }, "reason": reason });
    if build.state == "retryable" {
        data["next_run_at"] = json!(build.run_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    }
    data
}
