//! Claiming: hand the best eligible build to a worker in one short transaction.

use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;

use super::{Build, QueueResult, Settings, Worker};
use crate::ids;

/// How long a freshly minted OTP may be traded for a VM token.
pub const OTP_TTL_SECS: i64 = 600;

/// A build handed to a worker, with the attempt's one-time password (shown only here).
#[derive(Debug, Clone)]
pub struct Claim {
    pub build: Build,
    pub otp: String,
    /// True when the worker already held this attempt and is being handed it again.
    pub redelivered: bool,
}

const CLAIM_SQL: &str = "
WITH picked AS (
    SELECT b.id FROM builds b
    WHERE b.state IN ('pending', 'scheduled', 'retryable')
      AND b.run_at <= $2
      AND b.queue = ANY($3)
      AND b.queue NOT IN (SELECT name FROM queues WHERE paused)
    ORDER BY b.priority DESC, b.run_at, b.id
    LIMIT 1
    FOR UPDATE OF b SKIP LOCKED
), claimed AS (
    UPDATE builds b
    SET state = 'assigned', attempt = b.attempt + 1, lease_owner = $1, worker_id = $1,
        lease_token = nextval('lease_token_seq'),
        lease_expires_at = $2 + $4::bigint * interval '1 second',
        assigned_at = $2, started_at = $2, last_heartbeat_at = NULL, progress = NULL, stage = NULL,
        otp_hash = $5, otp_expires_at = $2 + $6::bigint * interval '1 second',
        vm_token_hash = NULL, vm_token_sealed = NULL, vm_token_expires_at = NULL, vm_ready_at = NULL,
        log_seq = b.log_seq + 1
    FROM picked WHERE b.id = picked.id
    RETURNING b.*
), attempt_row AS (
    INSERT INTO build_attempts (build_id, attempt, worker_id, lease_token, assigned_at)
    SELECT id, attempt, lease_owner, lease_token, $2 FROM claimed
), log_row AS (
    INSERT INTO build_logs (build_id, seq, ts, level, message)
    SELECT id, log_seq, $2, 'info', 'Build assigned to worker ' || $7 || ' (attempt ' || attempt || ')'
    FROM claimed
), worker_row AS (
    UPDATE workers SET status = 'busy', last_seen_at = $2 WHERE id = $1 AND EXISTS (SELECT 1 FROM claimed)
)
SELECT * FROM claimed";

/// Returns the attempt the worker already holds, or claims the best eligible build for it.
///
/// Eligible: queued (`pending`, or `scheduled`/`retryable` whose `run_at` has passed), on one of the
/// worker's platforms, queue not paused; best: priority, then `run_at`, then id. Rows locked by a
/// concurrent claim are skipped, never waited for. A draining or disabled worker gets nothing new.
pub async fn claim(
    pool: &PgPool,
    worker: &Worker,
    settings: &Settings,
    now: DateTime<Utc>,
) -> QueueResult<Option<Claim>> {
    if let Some(claim) = redeliver(pool, &worker.id, now).await? {
        return Ok(Some(claim));
    }
    if !worker.accepts_work() {
        return Ok(None);
    }
    let otp = ids::new_secret();
    let result = sqlx::query_as::<_, Build>(CLAIM_SQL)
        .bind(&worker.id)
        .bind(now)
        .bind(&worker.platforms)
        .bind(settings.first_heartbeat_grace_secs as i64)
        .bind(ids::hash_secret(&otp))
        .bind(OTP_TTL_SECS)
        .bind(&worker.name)
        .fetch_optional(pool)
        .await;
    match result {
        Ok(build) => Ok(build.map(|build| Claim {
            build,
            otp,
            redelivered: false,
        })),
        // A concurrent poll of the same worker won the claim: hand that attempt over instead.
        Err(sqlx::Error::Database(e)) if e.constraint() == Some("builds_held_by_idx") => {
            redeliver(pool, &worker.id, now).await
        }
        Err(e) => Err(e.into()),
    }
}

/// Re-delivery of a held attempt (the worker lost the answer to its claim). The attempt, lease token
/// and VM token stay; a fresh OTP replaces the previous one, which the worker never received.
async fn redeliver(pool: &PgPool, worker_id: &str, now: DateTime<Utc>) -> QueueResult<Option<Claim>> {
    let otp = ids::new_secret();
    let build = sqlx::query_as::<_, Build>(
        "UPDATE builds SET otp_hash = $2, otp_expires_at = $3
         WHERE lease_owner = $1 AND state IN ('assigned', 'building')
         RETURNING *",
    )
    .bind(worker_id)
    .bind(ids::hash_secret(&otp))
    .bind(now + Duration::seconds(OTP_TTL_SECS))
    .fetch_optional(pool)
    .await?;
    Ok(build.map(|build| Claim {
        build,
        otp,
        redelivered: true,
    }))
}
