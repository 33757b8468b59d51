//! Events of state changes, written to the `events` outbox **in the transaction of the change** (so an
//! event exists exactly when its change committed; `src/events.rs` delivers them in id order).
//!
//! Statements that change state in one round trip insert their event in a CTE of the same statement
//! (`INSERT INTO events (kind, build_id, worker_id, data) SELECT … FROM <changed rows>`); multi-statement
//! operations call [`emit`] or [`emit_build`] on their transaction. `data` carries `platform`, `state`
//! (after the change) and the kind's own fields.

use serde_json::{Value, json};
use sqlx::PgConnection;

use super::{Build, Failure, FailureKind, QueueResult};

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

/// Why an attempt ended with a failure, as its event tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The worker reported it (or abandoned the build).
    Reported,
    /// The worker was unregistered or revoked.
    Unregistered,
    /// The maintenance sweeps: lease expired, deadline passed.
    Swept,
}

/// The event of a failed attempt (after `end_attempt`): `build.rescued` for a swept infrastructure
/// failure (lease expired), `build.timed_out` for deadline failures, else `build.retry_scheduled` when
/// another attempt follows and `build.failed` when none does. Carries the error and the next run time.
pub(crate) async fn emit_failure(
    conn: &mut PgConnection,
    build: &Build,
    worker_id: Option<&str>,
    failure: &Failure,
    ended: Ended,
) -> QueueResult<()> {
    let retried = build.state == "retryable";
    let kind = match (failure.kind, ended) {
        (FailureKind::Infrastructure, Ended::Swept) => "build.rescued",
        (FailureKind::Timeout, _) => "build.timed_out",
        _ if retried => "build.retry_scheduled",
        _ => "build.failed",
    };
    let reason = match ended {
        Ended::Reported => "reported",
        Ended::Unregistered => "worker_unregistered",
        Ended::Swept => kind.trim_start_matches("build."),
    };
    let mut data = json!({ "error": { "kind": failure.kind.as_str(), "message": failure.message }, "reason": reason });
    if retried {
        data["next_run_at"] = json!(build.run_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    }
    emit_build(conn, kind, build, worker_id, data).await
}
