//! Cancellation: a state change on the row, so a cancelled build is never claimed again.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::logs::append_system_log;
use super::{Build, BuildState, QueueError, QueueResult};

/// What a cancel did.
#[derive(Debug, Clone)]
pub struct CancelOutcome {
    pub build: Build,
    /// The worker that held the build and must stop (it learns at its next heartbeat/poll/upload).
    pub interrupted_worker: Option<String>,
}

/// Cancels a queued or held build. Queued builds are cancelled outright; held builds are cancelled,
/// their attempt's tokens revoked and the worker freed. Final builds answer [`QueueError::AlreadyFinished`].
/// `actor` (who asked) gets its `build.cancel` audit row in the same transaction.
pub async fn cancel(
    pool: &PgPool,
    build_id: &str,
    now: DateTime<Utc>,
    actor: &crate::audit::Actor,
) -> QueueResult<CancelOutcome> {
    cancel_because(pool, build_id, now, actor, None).await
}

/// Why a build was cancelled, when it is not its owner's or an operator's request: the build's
/// `error_message`, its log line and the event's `reason`/`message` say so.
#[derive(Debug, Clone, Copy)]
pub struct CancelReason<'a> {
    /// Stable word for the event (`superseded`).
    pub reason: &'a str,
    /// For people (`Superseded by <id>`).
    pub message: &'a str,
    /// Only a queued build is cancelled: one that started meanwhile is refused (409), checked under
    /// the row lock.
    pub queued_only: bool,
}

/// [`cancel`], with a reason other than the user's request.
pub async fn cancel_because(
    pool: &PgPool,
    build_id: &str,
    now: DateTime<Utc>,
    actor: &crate::audit::Actor,
    why: Option<CancelReason<'_>>,
) -> QueueResult<CancelOutcome> {
    let mut tx = pool.begin().await?;
    let current: Option<(String, Option<String>, i32)> =
        sqlx::query_as("SELECT state, lease_owner, attempt FROM builds WHERE id = $1 FOR UPDATE")
            .bind(build_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((state, lease_owner, attempt)) = current else {
        return Err(QueueError::BuildNotFound);
    };
    let state = BuildState::parse(&state).unwrap_or(BuildState::Pending);
    if state.is_final() {
        // Release the row lock now, not when the pool next touches this connection.
        tx.rollback().await?;
        return Err(QueueError::AlreadyFinished);
    }
    let held = state.is_held();
    if held && why.is_some_and(|w| w.queued_only) {
        tx.rollback().await?;
        return Err(QueueError::Conflict("Build already started".into()));
    }
    let build: Build = sqlx::query_as(
        "UPDATE builds SET state = 'cancelled', completed_at = $2, finished_reason = 'cancelled',
            cancel_requested_at = CASE WHEN $3 THEN $2 ELSE NULL END,
            lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
            otp_hash = NULL, otp_expires_at = NULL, vm_token_hash = NULL, vm_token_sealed = NULL, vm_token_expires_at = NULL,
            error_message = coalesce($4, error_message)
         WHERE id = $1 RETURNING *",
    )
    .bind(build_id)
    .bind(now)
    .bind(held)
    .bind(why.map(|w| w.message))
    .fetch_one(&mut *tx)
    .await?;
    if let (true, Some(worker_id)) = (held, &lease_owner) {
        sqlx::query(
            "UPDATE build_attempts SET finished_at = $3, outcome = 'cancelled' WHERE build_id = $1 AND attempt = $2",
        )
        .bind(build_id)
        .bind(attempt)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE workers SET status = 'idle' WHERE id = $1 AND status = 'busy'")
            .bind(worker_id)
            .execute(&mut *tx)
            .await?;
    }
    let message = why.map_or("Build cancelled by user", |w| w.message);
    append_system_log(&mut tx, build_id, "warn", message, now).await?;
    let worker = lease_owner.as_deref().filter(|_| held);
    let data = match why {
        Some(why) => serde_json::json!({ "reason": why.reason, "message": why.message }),
        None => serde_json::json!({}),
    };
    super::emit::emit_build(&mut tx, "build.cancelled", &build, worker, data).await?;
    let change = crate::audit::Change::new("build.cancel", "build", build_id)
        .before(serde_json::json!({ "state": state.as_str(), "worker_id": worker }))
        .after(serde_json::json!({ "state": "cancelled" }));
    crate::audit::record(&mut tx, actor, change).await?;
    tx.commit().await?;
    crate::metrics::build_ended(&build, "cancelled", now);
    Ok(CancelOutcome {
        build,
        interrupted_worker: lease_owner.filter(|_| held),
    })
}
