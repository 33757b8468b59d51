//! Sweeps run by the maintenance jobs: rescue expired leases, fail attempts past their deadline,
//! promote due scheduled/retryable builds. Each does one bounded batch and returns how many rows moved;
//! concurrent sweepers skip each other's rows, so each row is handled exactly once.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::attempts::{LockedAttempt, end_attempt, locked_columns};
use super::emit;
use super::enqueue::notify_ready;
use super::{Failure, FailureKind, QueueResult, Settings};

/// Infrastructure failure for every held build whose lease expired before `now` (up to `batch`).
pub async fn rescue_expired(pool: &PgPool, settings: &Settings, now: DateTime<Utc>, batch: i64) -> QueueResult<u64> {
    // After an outage the clock stops first, so undelivered heartbeats are not judged.
    super::clock::catch_up(pool, settings).await?;
    let rescued = rescue_expired_batch(pool, settings, now, batch).await?;
    metrics::counter!(crate::metrics::LEASE_RESCUES).increment(rescued);
    Ok(rescued)
}

async fn rescue_expired_batch(pool: &PgPool, settings: &Settings, now: DateTime<Utc>, batch: i64) -> QueueResult<u64> {
    const SQL: &str = concat!(
        "SELECT ",
        locked_columns!(),
        " FROM builds WHERE state IN ('assigned', 'building') AND lease_expires_at < $1
         ORDER BY lease_expires_at LIMIT $2 FOR UPDATE SKIP LOCKED"
    );
    sweep_held(pool, settings, now, batch, SQL, now, |locked| Failure {
        kind: FailureKind::Infrastructure,
        message: format!(
            "Worker {} stopped responding (lease expired)",
            locked.lease_owner.as_deref().unwrap_or("unknown")
        ),
    })
    .await
}

/// Fails as timed out every held build that started before `now - deadline` (up to `batch`).
pub async fn fail_past_deadline(
    pool: &PgPool,
    settings: &Settings,
    now: DateTime<Utc>,
    batch: i64,
) -> QueueResult<u64> {
    let cutoff = now - chrono::Duration::seconds(settings.build_deadline_secs as i64);
    const SQL: &str = concat!(
        "SELECT ",
        locked_columns!(),
        " FROM builds WHERE state IN ('assigned', 'building') AND started_at < $1
         ORDER BY started_at LIMIT $2 FOR UPDATE SKIP LOCKED"
    );
    let deadline = settings.build_deadline_secs;
    sweep_held(pool, settings, now, batch, SQL, cutoff, |_| Failure {
        kind: FailureKind::Timeout,
        message: format!("Build exceeded the deadline of {deadline} s"),
    })
    .await
}

/// Locks up to `batch` held rows selected by `select` (`$1 = bound`, `$2 = batch`), skipping rows
/// other sweepers hold, and ends each attempt with the failure `failure_for` describes.
async fn sweep_held(
    pool: &PgPool,
    settings: &Settings,
    now: DateTime<Utc>,
    batch: i64,
    select: &'static str,
    bound: DateTime<Utc>,
    failure_for: impl Fn(&LockedAttempt) -> Failure,
) -> QueueResult<u64> {
    let mut tx = pool.begin().await?;
    let rows: Vec<LockedAttempt> = sqlx::query_as(select)
        .bind(bound)
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
    let mut ended = Vec::with_capacity(rows.len());
    for locked in &rows {
        let failure = failure_for(locked);
        let build = end_attempt(&mut tx, locked, &failure, settings, now).await?;
        let worker = locked.lease_owner.as_deref();
        emit::emit_failure(&mut tx, &build, worker, &failure, emit::Ended::Swept).await?;
        ended.push((
            locked.id.clone(),
            worker.unwrap_or("-").to_string(),
            locked.attempt,
            build.state,
            failure.message,
        ));
    }
    tx.commit().await?;
    // Logged after the commit, so a line never describes a change that was rolled back.
    for (build_id, worker_id, attempt, state, reason) in &ended {
        tracing::info!(build_id = %build_id, worker_id = %worker_id, attempt, state = %state, reason = %reason, "attempt ended by a sweep");
    }
    Ok(rows.len() as u64)
}

/// Moves `scheduled`/`retryable` builds whose `run_at` passed to `pending` and wakes their queues.
pub async fn promote_due(pool: &PgPool, now: DateTime<Utc>, batch: i64) -> QueueResult<u64> {
    let mut tx = pool.begin().await?;
    let promoted: Vec<(String, String)> = sqlx::query_as(
        "WITH promoted AS (
            UPDATE builds SET state = 'pending' WHERE id IN (
                SELECT id FROM builds WHERE state IN ('scheduled', 'retryable') AND run_at <= $1
                ORDER BY run_at LIMIT $2 FOR UPDATE SKIP LOCKED)
            RETURNING queue, id, state, attempt
         ), event AS (
            INSERT INTO events (kind, build_id, data)
            SELECT 'build.updated', id, jsonb_build_object('platform', queue, 'state', state, 'attempt', attempt,
                'reason', 'promoted')
            FROM promoted
         )
         SELECT queue, id FROM promoted",
    )
    .bind(now)
    .bind(batch)
    .fetch_all(&mut *tx)
    .await?;
    if !promoted.is_empty() {
        let pairs: Vec<(&str, &str)> = promoted.iter().map(|(q, id)| (q.as_str(), id.as_str())).collect();
        notify_ready(&mut tx, &pairs).await?;
    }
    tx.commit().await?;
    for (queue, build_id) in &promoted {
        tracing::info!(build_id = %build_id, queue = %queue, "build promoted to pending");
    }
    Ok(promoted.len() as u64)
}

/// What the reconciliation found and repaired, by kind (`expo_reconciled_total{kind}`).
pub const RECONCILE_KINDS: [&str; 4] = [
    "busy_worker_without_attempt",
    "live_attempt_of_idle_build",
    "build_held_by_revoked_worker",
    "queued_build_with_lease",
];

/// Repairs the invariants a crash in the wrong place could break (fleet-health.md), each in one bounded
/// statement or batch, logging every repair with its ids; returns `(kind, repaired)` per kind.
pub async fn reconcile(
    pool: &PgPool,
    settings: &Settings,
    now: DateTime<Utc>,
    batch: i64,
) -> QueueResult<Vec<(&'static str, u64)>> {
    let [busy, live, revoked, leased] = RECONCILE_KINDS;
    // A worker marked busy that holds no build: idle again (a claim marks it busy in the statement
    // that assigns the build, so a live claim is never undone).
    let idle: Vec<String> = sqlx::query_scalar(
        "UPDATE workers SET status = 'idle' WHERE id IN (
            SELECT w.id FROM workers w WHERE w.status = 'busy'
              AND NOT EXISTS (SELECT 1 FROM builds b WHERE b.lease_owner = w.id AND b.state IN ('assigned', 'building'))
            LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING id",
    )
    .bind(batch)
    .fetch_all(pool)
    .await?;
    for worker_id in &idle {
        tracing::warn!(worker_id = %worker_id, kind = busy, "reconciled: busy worker without a held build set idle");
    }
    // An attempt row still open while its build is not running that attempt (final, queued, or on a later one).
    let closed: Vec<(String, i32, String)> = sqlx::query_as(
        "UPDATE build_attempts a SET finished_at = $1, outcome = coalesce(a.outcome, 'reconciled'),
            error_message = coalesce(a.error_message, 'Attempt closed by reconciliation')
         FROM (SELECT a2.build_id, a2.attempt FROM build_attempts a2 JOIN builds b ON b.id = a2.build_id
               WHERE a2.finished_at IS NULL
                 AND NOT (b.state IN ('assigned', 'building') AND b.attempt = a2.attempt)
               LIMIT $2 FOR UPDATE OF a2 SKIP LOCKED) stale
         WHERE a.build_id = stale.build_id AND a.attempt = stale.attempt
         RETURNING a.build_id, a.attempt, a.worker_id",
    )
    .bind(now)
    .bind(batch)
    .fetch_all(pool)
    .await?;
    for (build_id, attempt, worker_id) in &closed {
        tracing::warn!(build_id = %build_id, attempt, worker_id = %worker_id, kind = live, "reconciled: open attempt of a build not running it closed");
    }
    // A build held by a revoked worker: that worker can never report again, so the attempt ends as an
    // infrastructure failure (as at revocation).
    const HELD_BY_REVOKED: &str = concat!(
        "SELECT ",
        locked_columns!(),
        " FROM builds WHERE state IN ('assigned', 'building') AND lease_owner IN (
            SELECT id FROM workers WHERE admin_state = 'revoked') AND lease_expires_at > $1
         ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED"
    );
    // (Expired leases are the rescue sweep's; the bound only keeps the two from racing for a row.)
    let released = sweep_held(pool, settings, now, batch, HELD_BY_REVOKED, now, |locked| Failure {
        kind: FailureKind::Infrastructure,
        message: format!(
            "Worker {} was revoked",
            locked.lease_owner.as_deref().unwrap_or("unknown")
        ),
    })
    .await?;
    // A queued build carrying lease fields (a lease means held): cleared.
    let cleared: Vec<(String, String)> = sqlx::query_as(
        "UPDATE builds SET lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
         WHERE id IN (SELECT id FROM builds WHERE state IN ('pending', 'scheduled', 'retryable')
                        AND (lease_owner IS NOT NULL OR lease_token IS NOT NULL OR lease_expires_at IS NOT NULL)
                      LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING id, state",
    )
    .bind(batch)
    .fetch_all(pool)
    .await?;
    for (build_id, state) in &cleared {
        tracing::warn!(build_id = %build_id, state = %state, kind = leased, "reconciled: lease of a queued build cleared");
    }
    let found = vec![
        (busy, idle.len() as u64),
        (live, closed.len() as u64),
        (revoked, released),
        (leased, cleared.len() as u64),
    ];
    for (kind, n) in &found {
        metrics::counter!(crate::metrics::RECONCILED, "kind" => *kind).increment(*n);
    }
    Ok(found)
}
