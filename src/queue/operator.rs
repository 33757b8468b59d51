//! Operator actions on builds, queues and workers (api.md §5). Each is one short transaction with the
//! same fencing and final-state rules as the rest of the queue.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use serde_json::json;

use super::emit::emit_build;
use super::enqueue::notify_ready;
use super::logs::append_system_log;
use super::{Build, BuildState, NOTIFY_CHANNEL, Platform, QueueError, QueueResult, Worker};
use crate::audit::{self, Actor, Change};

/// Why an operator action does not apply to a build in its current state.
pub const NOT_RUNNING: &str = "Build is not running";
pub const NOT_RETRYABLE: &str = "Only failed or cancelled builds can be retried";
pub const RUNNING: &str = "Build is running";
pub const NOT_FINISHED: &str = "Build is not finished";

/// An operator action refused because of the build's state (409 with this message).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WrongState(pub &'static str);

/// Result of an operator action: the build, or why not.
pub type OperatorResult<T> = Result<Result<T, WrongState>, QueueError>;

/// Ends a refused action's transaction at once. A dropped transaction is rolled back only when the pool
/// next touches its connection, and until then the row lock makes the build invisible to claims
/// (`SKIP LOCKED`): a refused retry must not hide a pending build from the next poll.
async fn refuse<T>(tx: sqlx::Transaction<'_, sqlx::Postgres>, why: &'static str) -> OperatorResult<T> {
    tx.rollback().await?;
    Ok(Err(WrongState(why)))
}

async fn lock(tx: &mut sqlx::PgConnection, build_id: &str) -> QueueResult<Build> {
    sqlx::query_as("SELECT * FROM builds WHERE id = $1 FOR UPDATE")
        .bind(build_id)
        .fetch_optional(tx)
        .await?
        .ok_or(QueueError::BuildNotFound)
}

/// Gives a running attempt back to the queue at once (not counted against the build's attempts' fate).
/// The claim does not hand it back to the same worker within the requeue cool-off (R51); with `drain`,
/// that worker is also set to `draining` in the same transaction.
pub async fn requeue(
    pool: &PgPool,
    build_id: &str,
    drain: bool,
    now: DateTime<Utc>,
    actor: &Actor,
) -> OperatorResult<Build> {
    let mut tx = pool.begin().await?;
    let build = lock(&mut tx, build_id).await?;
    if !build.state().is_held() {
        return refuse(tx, NOT_RUNNING).await;
    }
    let before = build.state.clone();
    if drain {
        let drained =
            sqlx::query("UPDATE workers SET admin_state = 'draining' WHERE id = $1 AND admin_state = 'active'")
                .bind(&build.lease_owner)
                .execute(&mut *tx)
                .await?;
        if drained.rows_affected() == 1 {
            let data = serde_json::json!({ "admin_state": "draining" });
            super::emit::emit(&mut tx, "worker.draining", None, build.lease_owner.as_deref(), data).await?;
        }
    }
    sqlx::query(
        "UPDATE build_attempts SET finished_at = $3, outcome = 'requeued' WHERE build_id = $1 AND attempt = $2",
    )
    .bind(build_id)
    .bind(build.attempt)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE workers SET status = 'idle' WHERE id = $1 AND status = 'busy'")
        .bind(&build.lease_owner)
        .execute(&mut *tx)
        .await?;
    let worker = build.lease_owner.clone();
    let build = reset_to_pending(&mut tx, build_id, now).await?;
    append_system_log(&mut tx, build_id, "warn", "Attempt requeued by an operator", now).await?;
    let reason = json!({ "reason": "operator" });
    emit_build(&mut tx, "build.requeued", &build, worker.as_deref(), reason).await?;
    let change = Change::new("build.requeue", "build", build_id)
        .before(json!({ "state": before, "worker_id": worker }))
        .after(json!({ "state": build.state, "drain": drain }));
    audit::record(&mut tx, actor, change).await?;
    tx.commit().await?;
    Ok(Ok(build))
}

/// Re-runs a failed or cancelled build as a new attempt of the same build.
pub async fn retry_same(pool: &PgPool, build_id: &str, now: DateTime<Utc>, actor: &Actor) -> OperatorResult<Build> {
    let mut tx = pool.begin().await?;
    let build = lock(&mut tx, build_id).await?;
    if !matches!(build.state(), BuildState::Failed | BuildState::Cancelled) {
        return refuse(tx, NOT_RETRYABLE).await;
    }
    let before = build.state.clone();
    let build = reset_to_pending(&mut tx, build_id, now).await?;
    append_system_log(&mut tx, build_id, "info", "Build retried by an operator", now).await?;
    emit_build(&mut tx, "build.requeued", &build, None, json!({ "reason": "retry" })).await?;
    let change = Change::new("build.retry", "build", build_id)
        .before(json!({ "state": before }))
        .after(json!({ "state": build.state }));
    audit::record(&mut tx, actor, change).await?;
    tx.commit().await?;
    Ok(Ok(build))
}

async fn reset_to_pending(tx: &mut sqlx::PgConnection, build_id: &str, now: DateTime<Utc>) -> QueueResult<Build> {
    let build: Build = sqlx::query_as(
        "UPDATE builds SET state = 'pending', run_at = $2, completed_at = NULL, finished_reason = NULL,
            error_message = NULL, cancel_requested_at = NULL, progress = NULL, stage = NULL,
            lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
            otp_hash = NULL, otp_expires_at = NULL, vm_token_hash = NULL, vm_token_sealed = NULL,
            vm_token_expires_at = NULL, vm_ready_at = NULL
         WHERE id = $1 RETURNING *",
    )
    .bind(build_id)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    notify_ready(tx, &[(build.queue.as_str(), build.id.as_str())]).await?;
    Ok(build)
}

/// Changes priority, run_at or max_attempts of a build that is not running or finished.
pub async fn patch(
    pool: &PgPool,
    build_id: &str,
    priority: Option<i32>,
    run_at: Option<DateTime<Utc>>,
    max_attempts: Option<i32>,
    now: DateTime<Utc>,
    actor: &Actor,
) -> OperatorResult<Build> {
    let mut tx = pool.begin().await?;
    let build = lock(&mut tx, build_id).await?;
    if build.state().is_held() || build.state().is_final() {
        return refuse(tx, RUNNING).await;
    }
    let before = json!({ "state": build.state, "priority": build.priority, "run_at": build.run_at, "max_attempts": build.max_attempts });
    let build: Build = sqlx::query_as(
        "UPDATE builds SET priority = coalesce($2, priority), max_attempts = coalesce($4, max_attempts),
            run_at = coalesce($3, run_at),
            state = CASE WHEN coalesce($3, run_at) > $5 THEN (CASE WHEN state = 'retryable' THEN 'retryable' ELSE 'scheduled' END)
                         ELSE 'pending' END
         WHERE id = $1 RETURNING *",
    )
    .bind(build_id)
    .bind(priority)
    .bind(run_at)
    .bind(max_attempts)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    if build.state() == BuildState::Pending {
        notify_ready(&mut tx, &[(build.queue.as_str(), build.id.as_str())]).await?;
    }
    let fields = json!({ "priority": build.priority, "run_at": build.run_at, "max_attempts": build.max_attempts });
    emit_build(&mut tx, "build.updated", &build, None, fields.clone()).await?;
    let action = if run_at.is_none() && max_attempts.is_none() {
        "build.priority"
    } else {
        "build.update"
    };
    let mut after = fields;
    after["state"] = json!(build.state);
    audit::record(
        &mut tx,
        actor,
        Change::new(action, "build", build_id).before(before).after(after),
    )
    .await?;
    tx.commit().await?;
    Ok(Ok(build))
}

/// Deletes a finished build's row (logs, attempts and samples go with it); returns its storage keys
/// for the caller to delete first.
pub async fn finished_build_keys(pool: &PgPool, build_id: &str) -> OperatorResult<Vec<String>> {
    let build = super::find_build(pool, build_id)
        .await?
        .ok_or(QueueError::BuildNotFound)?;
    if !build.state().is_final() {
        return Ok(Err(WrongState(NOT_FINISHED)));
    }
    Ok(Ok([build.source_key, build.certs_key, build.result_key]
        .into_iter()
        .flatten()
        .collect()))
}

/// Deletes a finished build's rows and, in the same transaction, queues its stored objects in
/// `pending_deletions`; returns those keys (empty if the build was not deleted). The caller deletes the
/// objects and forgets them ([`forget_deletions`]); what it cannot delete, the `storage_deletions` job
/// retries.
pub async fn delete_finished(pool: &PgPool, build_id: &str, actor: &Actor) -> QueueResult<Vec<String>> {
    let mut tx = pool.begin().await?;
    let keys: Vec<String> = sqlx::query_scalar(
        "WITH gone AS (
             DELETE FROM builds WHERE id = $1 AND state IN ('completed', 'failed', 'cancelled')
             RETURNING id, queue, state, source_key, certs_key, result_key, submitted_by
         ), event AS (
             INSERT INTO events (kind, build_id, data, submitted_by)
             SELECT 'build.deleted', id, jsonb_build_object('platform', queue, 'state', state, 'reason', 'operator'),
                    submitted_by
             FROM gone
         ), keys AS (
             SELECT k FROM gone, unnest(ARRAY[source_key, certs_key, result_key]) AS k WHERE k IS NOT NULL
         ), queued AS (
             INSERT INTO pending_deletions (key) SELECT k FROM keys ON CONFLICT (key) DO NOTHING
         ), audit AS (
             INSERT INTO audit_events (actor, actor_name, role, client_ip, user_agent, action, target_kind,
                                       target_id, before)
             SELECT $2, $3, $4, $5, $6, 'build.delete', 'build', id, jsonb_build_object('state', state)
             FROM gone
         )
         SELECT k FROM keys",
    )
    .bind(build_id)
    .bind(&actor.key_id)
    .bind(&actor.name)
    .bind(&actor.role)
    .bind(&actor.ip)
    .bind(&actor.user_agent)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(keys)
}

/// Up to `limit` queued object deletions, oldest first.
pub async fn pending_deletions(pool: &PgPool, limit: i64) -> QueueResult<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT key FROM pending_deletions ORDER BY queued_at, key LIMIT $1")
            .bind(limit)
            .fetch_all(pool)
            .await?,
    )
}

/// Drops deleted objects from `pending_deletions`.
pub async fn forget_deletions(pool: &PgPool, keys: &[String]) -> QueueResult<()> {
    if !keys.is_empty() {
        sqlx::query("DELETE FROM pending_deletions WHERE key = ANY($1)")
            .bind(keys)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Pauses or resumes a platform queue; resuming wakes waiting workers of every instance.
pub async fn set_paused(
    pool: &PgPool,
    platform: Platform,
    paused: bool,
    now: DateTime<Utc>,
    actor: &Actor,
) -> QueueResult<()> {
    let mut tx = pool.begin().await?;
    let was: Option<bool> = sqlx::query_scalar("SELECT paused FROM queues WHERE name = $1 FOR UPDATE")
        .bind(platform.as_str())
        .fetch_optional(&mut *tx)
        .await?;
    sqlx::query(
        "WITH prev AS (SELECT name, paused FROM queues WHERE name = $1 FOR UPDATE),
         changed AS (
            UPDATE queues q SET paused = $2, paused_at = CASE WHEN $2 THEN $3 ELSE NULL END
            FROM prev WHERE q.name = prev.name RETURNING q.name, prev.paused AS was
         )
         INSERT INTO events (kind, data)
         SELECT CASE WHEN $2 THEN 'queue.paused' ELSE 'queue.resumed' END,
             jsonb_build_object('platform', name, 'state', CASE WHEN $2 THEN 'paused' ELSE 'running' END)
         FROM changed WHERE was <> $2",
    )
    .bind(platform.as_str())
    .bind(paused)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    if !paused {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(NOTIFY_CHANNEL)
            .bind(format!("{}:{}", platform.as_str(), super::wakeups::ALL_BUILDS))
            .execute(&mut *tx)
            .await?;
    }
    let action = if paused { "queue.pause" } else { "queue.resume" };
    let change = Change::new(action, "queue", platform.as_str())
        .before(json!({ "paused": was }))
        .after(json!({ "paused": paused }));
    audit::record(&mut tx, actor, change).await?;
    tx.commit().await?;
    Ok(())
}

/// Why a revoked worker's state cannot change.
pub const REVOKED: &str = "Worker is revoked; a new registration is a new worker";

/// Sets a worker's operator state: `active`, `draining` (finish the current build, take no new one),
/// `disabled`; `revoked` also drops its token, marks it offline and requeues its attempt. Revoked is
/// final (R50): revoking again is a no-op, any other change is refused.
pub async fn set_worker_state(
    pool: &PgPool,
    worker_id: &str,
    admin_state: &'static str,
    settings: &super::Settings,
    now: DateTime<Utc>,
    actor: &Actor,
) -> QueueResult<Worker> {
    let mut tx = pool.begin().await?;
    let current: Worker = sqlx::query_as("SELECT * FROM workers WHERE id = $1 FOR UPDATE")
        .bind(worker_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(QueueError::WorkerNotFound)?;
    if current.admin_state == "revoked" {
        tx.rollback().await?;
        return match admin_state {
            "revoked" => Ok(current),
            _ => Err(QueueError::Conflict(REVOKED.to_string())),
        };
    }
    if admin_state == "revoked" {
        super::workers::unregister_in(&mut tx, worker_id, settings, now).await?;
    }
    let kind = match admin_state {
        "active" => "worker.enabled",
        other => &format!("worker.{other}"),
    };
    let worker: Worker = sqlx::query_as(
        "WITH prev AS (SELECT id, admin_state FROM workers WHERE id = $1 FOR UPDATE),
         changed AS (UPDATE workers w SET admin_state = $2 FROM prev
                      WHERE w.id = prev.id AND prev.admin_state <> 'revoked' RETURNING w.*),
         event AS (
            INSERT INTO events (kind, worker_id, data)
            SELECT $3, changed.id, jsonb_build_object('state', changed.status, 'admin_state', changed.admin_state)
            FROM changed, prev WHERE prev.admin_state <> changed.admin_state
         )
         SELECT * FROM changed",
    )
    .bind(worker_id)
    .bind(admin_state)
    .bind(kind)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| QueueError::Conflict(REVOKED.to_string()))?;
    let action = match admin_state {
        "active" => "worker.enable",
        "draining" => "worker.drain",
        "disabled" => "worker.disable",
        _ => "worker.revoke",
    };
    let change = Change::new(action, "worker", worker_id)
        .before(json!({ "admin_state": current.admin_state, "status": current.status }))
        .after(json!({ "admin_state": worker.admin_state, "status": worker.status }));
    audit::record(&mut tx, actor, change).await?;
    tx.commit().await?;
    Ok(worker)
}

/// Revokes a build's access token; the admin key still works.
pub async fn revoke_build_token(pool: &PgPool, build_id: &str, actor: &Actor) -> QueueResult<()> {
    let mut tx = pool.begin().await?;
    let updated = sqlx::query("UPDATE builds SET access_token_hash = NULL WHERE id = $1")
        .bind(build_id)
        .execute(&mut *tx)
        .await?;
    if updated.rows_affected() == 0 {
        return Err(QueueError::BuildNotFound);
    }
    audit::record(&mut tx, actor, Change::new("build.token_revoke", "build", build_id)).await?;
    tx.commit().await?;
    Ok(())
}

/// Attempts of a build, oldest first.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    pub attempt: i32,
    pub worker_id: String,
    pub lease_token: i64,
    pub assigned_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
    pub error_message: Option<String>,
}

pub async fn attempts_of(pool: &PgPool, build_id: &str) -> QueueResult<Vec<AttemptRow>> {
    Ok(sqlx::query_as(
        "SELECT attempt, worker_id, lease_token, assigned_at, started_at, finished_at, outcome, error_message
         FROM build_attempts WHERE build_id = $1 ORDER BY attempt",
    )
    .bind(build_id)
    .fetch_all(pool)
    .await?)
}

/// Workers after `after` (by id), at most `limit`.
pub async fn list_workers(pool: &PgPool, after: Option<&str>, limit: i64) -> QueueResult<Vec<Worker>> {
    Ok(
        sqlx::query_as("SELECT * FROM workers WHERE ($1::text IS NULL OR id > $1) ORDER BY id LIMIT $2")
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?,
    )
}

/// Per platform queue: depth by state, oldest pending age (seconds), paused.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QueueView {
    pub name: String,
    pub paused: bool,
    pub scheduled: i64,
    pub pending: i64,
    pub retryable: i64,
    pub assigned: i64,
    pub building: i64,
    pub oldest_pending_age_seconds: Option<f64>,
}

pub async fn queue_views(pool: &PgPool, now: DateTime<Utc>) -> QueueResult<Vec<QueueView>> {
    Ok(sqlx::query_as(
        "SELECT q.name, q.paused,
            count(b.id) FILTER (WHERE b.state = 'scheduled') AS scheduled,
            count(b.id) FILTER (WHERE b.state = 'pending') AS pending,
            count(b.id) FILTER (WHERE b.state = 'retryable') AS retryable,
            count(b.id) FILTER (WHERE b.state = 'assigned') AS assigned,
            count(b.id) FILTER (WHERE b.state = 'building') AS building,
            extract(epoch FROM $1 - min(b.run_at) FILTER (WHERE b.state = 'pending'))::float8 AS oldest_pending_age_seconds
         FROM queues q LEFT JOIN builds b ON b.queue = q.name AND b.state IN ('scheduled', 'pending', 'retryable', 'assigned', 'building')
         GROUP BY q.name, q.paused ORDER BY q.name",
    )
    .bind(now)
    .fetch_all(pool)
    .await?)
}
