//! Claiming: hand a worker the attempt it already holds, or the best eligible build, in one statement.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool, Row};

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
    /// The worker's status as the claim left it: `busy` after a new claim; on a re-delivery whatever the
    /// row says (`offline` when the offline sweep marked it while it was building).
    pub worker_status: String,
}

/// What makes a queued row `b` eligible for worker `$1` (besides the worker's own state): due, on one of
/// its platforms (`{queue}`), queue not paused, its requirements satisfied by the worker's declared
/// capabilities (`build_matches`, migration 0151), its submitter below max running, and not held back
/// from this worker (requeue cool-off, retry elsewhere).
const ELIGIBLE: &str = "b.state IN ('pending', 'scheduled', 'retryable')
      AND b.run_at <= $2
      AND {queue}
      AND b.queue NOT IN (SELECT name FROM queues WHERE paused)
      AND (b.requirement_match IS NULL OR build_matches(b.requirement_match, (SELECT w.caps FROM workers w WHERE w.id = $1)))
      AND NOT COALESCE((SELECT k.max_running > 0 AND k.max_running <= (SELECT count(*) FROM builds r
              WHERE r.submitted_by = k.id AND r.state IN ('assigned', 'building'))
          FROM api_keys k WHERE k.id = b.submitted_by), false)
      AND NOT EXISTS (
          SELECT 1 FROM build_attempts a WHERE a.build_id = b.id AND a.worker_id = $1
            AND ((a.outcome = 'requeued' AND a.finished_at > $2 - $9::bigint * interval '1 second')
              OR (a.outcome IN ('infrastructure', 'released') AND a.finished_at > $2 - $10::bigint * interval '1 second'
                  AND EXISTS (SELECT 1 FROM workers o WHERE o.id <> $1 AND o.status <> 'offline'
                      AND o.admin_state = 'active' AND o.unregistered_at IS NULL AND b.queue = ANY(o.platforms)
                      AND (o.health = 'ok' OR o.quarantined_until <= $2) AND o.diag_critical_at IS NULL
                      AND NOT EXISTS (SELECT 1 FROM build_attempts oa WHERE oa.build_id = b.id AND oa.worker_id = o.id
                          AND oa.outcome IN ('infrastructure', 'released')
                          AND oa.finished_at > $2 - $10::bigint * interval '1 second')))))";

/// One statement, one round trip (the `{eligible}`/`{queue}` placeholders are filled by [`claim_sql`]).
/// `held` re-delivers the worker's current attempt (with a fresh OTP, since the worker never received the
/// previous one); only when there is none does `top` find the highest priority among the builds this
/// worker may run (today's index walk), and `picked` lock the best eligible row, skipping rows other
/// claims hold: at that priority, the oldest build of the submitter with the lowest stride `pass`
/// (scheduling.md; `submitter_shares`, walked in pass order, only submitters with queued builds and room
/// below their max running); should every such row be locked by concurrent claims, the oldest eligible
/// row (only when `top` found one: the join with `top` alone does not stop the generic plan, which walks
/// `builds` first, from evaluating the eligibility of every queued build for a worker that may not claim,
/// e.g. a draining one, or for whom nothing is eligible). `claimed` turns it into a new attempt with its
/// attempt row, log line and busy worker; the fair-share trigger on builds (migration 0280) advances its
/// submitter's pass by 1 / weight (the built-in admin key and imported builds: `admin`, weight 1) in the
/// same update of `submitter_shares` that takes the build out of the submitter's queued count: one update
/// of that row per claim.
const CLAIM_TEMPLATE: &str = "
WITH held AS (
    UPDATE builds SET otp_hash = $5, otp_expires_at = $2 + $6::bigint * interval '1 second'
    WHERE lease_owner = $1 AND state IN ('assigned', 'building')
    RETURNING *
), top AS (
    SELECT b.priority FROM builds b
    WHERE $8 AND NOT EXISTS (SELECT 1 FROM held)
      AND EXISTS (SELECT 1 FROM workers w WHERE w.id = $1 AND w.admin_state = 'active' AND w.unregistered_at IS NULL
                  AND (w.health = 'ok' OR w.quarantined_until <= $2) AND w.diag_critical_at IS NULL)
      AND {eligible}
    ORDER BY b.priority DESC, b.run_at, b.id
    LIMIT 1
), fair AS (
    SELECT c.id FROM top CROSS JOIN submitter_shares s
    CROSS JOIN LATERAL (
        SELECT b.id FROM builds b
        WHERE b.queue = s.queue AND COALESCE(b.submitted_by, 'admin') = s.submitter
          AND b.priority = top.priority AND {eligible}
        ORDER BY b.priority DESC, b.run_at, b.id
        LIMIT 1
        FOR UPDATE OF b SKIP LOCKED) c
    WHERE s.queued > 0 AND {share_queue}
      AND NOT COALESCE((SELECT k.max_running > 0 AND k.max_running <= (SELECT count(*) FROM builds r
              WHERE r.submitted_by = k.id AND r.state IN ('assigned', 'building'))
          FROM api_keys k WHERE k.id = s.submitter), false)
    ORDER BY s.pass, s.submitter
    LIMIT 1
), oldest AS (
    SELECT b.id FROM top, builds b
    WHERE NOT EXISTS (SELECT 1 FROM fair) AND EXISTS (SELECT 1 FROM top) AND {eligible}
    ORDER BY b.priority DESC, b.run_at, b.id
    LIMIT 1
    FOR UPDATE OF b SKIP LOCKED
), picked AS (
    SELECT id FROM fair UNION ALL SELECT id FROM oldest
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
), event AS (
    INSERT INTO events (kind, build_id, worker_id, data)
    SELECT 'build.assigned', id, lease_owner, jsonb_build_object('platform', queue, 'state', state,
        'attempt', attempt, 'log_seq', log_seq)
    FROM claimed
)
SELECT *, true AS redelivered, COALESCE((SELECT w.status FROM workers w WHERE w.id = $1), 'busy') AS worker_status FROM held
UNION ALL
SELECT *, false AS redelivered, 'busy'::text AS worker_status FROM claimed";

/// The claim for a worker of one platform compares the queue by equality, so the planner walks that
/// queue's index; a worker of several platforms walks the global index. Built once per variant.
pub fn claim_sql(platforms: usize) -> &'static str {
    fn build(queue: &str, share_queue: &str) -> String {
        CLAIM_TEMPLATE
            .replace("{eligible}", ELIGIBLE)
            .replace("{queue}", queue)
            .replace("{share_queue}", share_queue)
    }
    static SINGLE: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| build("b.queue = ($3::text[])[1]", "s.queue = ($3::text[])[1]"));
    static MULTI: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| build("b.queue = ANY($3)", "s.queue = ANY($3)"));
    if platforms == 1 {
        SINGLE.as_str()
    } else {
        MULTI.as_str()
    }
}

/// Returns the attempt the worker already holds, or claims the best eligible build for it.
///
/// Eligible: queued (`pending`, or `scheduled`/`retryable` whose `run_at` has passed), on one of the
/// worker's platforms, queue not paused, its submitter below max running; best: priority, then the
/// submitter with the least service for its weight (stride pass), then `run_at`, then id. Rows locked by a
/// concurrent claim are skipped, never waited for. A draining, disabled, revoked or unregistered worker
/// gets nothing new (checked on its row, not only on the caller's possibly cached copy), and
/// a build an operator requeued away from this worker is not handed back to it within the requeue
/// cool-off (R51). A quarantined worker gets nothing (on probation it may); a build whose attempt on this
/// worker ended in an infrastructure failure or was given back is retried elsewhere: not handed back to
/// it within `retry_elsewhere_secs` while another matching worker is online that did not break it too
/// (fleet-health.md): two workers that both broke a build do not hold it back from each other.
pub async fn claim(
    pool: &PgPool,
    worker: &Worker,
    settings: &Settings,
    now: DateTime<Utc>,
) -> QueueResult<Option<Claim>> {
    let started = std::time::Instant::now();
    for _ in 0..2 {
        let outcome = claim_once(pool, worker, settings, now).await;
        crate::metrics::claim_took(started.elapsed());
        match outcome {
            // A concurrent poll of the same worker claimed first: the next round re-delivers its attempt.
            Err(sqlx::Error::Database(e)) if e.constraint() == Some("builds_held_by_idx") => continue,
            other => {
                let claim = other?;
                if let Some(c) = claim.as_ref().filter(|c| !c.redelivered) {
                    crate::metrics::queue_waited(&c.build.queue, c.build.run_at, now);
                }
                return Ok(claim);
            }
        }
    }
    Ok(None)
}

async fn claim_once(
    pool: &PgPool,
    worker: &Worker,
    settings: &Settings,
    now: DateTime<Utc>,
) -> Result<Option<Claim>, sqlx::Error> {
    let otp = ids::new_secret();
    // Both variants are built from constant text only.
    let row = sqlx::query(sqlx::AssertSqlSafe(claim_sql(worker.platforms.len())))
        .bind(&worker.id)
        .bind(now)
        .bind(&worker.platforms)
        .bind(settings.first_heartbeat_grace_secs as i64)
        .bind(ids::hash_secret(&otp))
        .bind(OTP_TTL_SECS)
        .bind(&worker.name)
        .bind(worker.accepts_work())
        .bind(settings.requeue_cooloff_secs as i64)
        .bind(settings.retry_elsewhere_secs as i64)
        .fetch_optional(pool)
        .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(Claim {
        build: Build::from_row(&row)?,
        otp,
        redelivered: row.try_get("redelivered")?,
        worker_status: row.try_get("worker_status")?,
    }))
}

/// Whether a queued build is held back from this worker by the requeue cool-off (R51), because it
/// should be retried elsewhere, because it has requirements (which this worker may not satisfy), or
/// because its submitter is at its max running (a slot frees without a notification): then an empty
/// claim does not mean its queues are empty for everyone.
pub async fn held_back_by_requeue(
    pool: &PgPool,
    worker_id: &str,
    settings: &Settings,
    now: DateTime<Utc>,
) -> QueueResult<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (
            SELECT 1 FROM build_attempts a JOIN builds b ON b.id = a.build_id
            WHERE ($3 > 0 OR $4 > 0) AND a.worker_id = $1 AND a.outcome IN ('requeued', 'infrastructure', 'released')
              AND a.finished_at > $2 - (CASE WHEN a.outcome = 'requeued' THEN $3 ELSE $4 END)::bigint * interval '1 second'
              AND b.state IN ('pending', 'scheduled', 'retryable'))
         OR EXISTS (SELECT 1 FROM builds b WHERE b.state IN ('pending', 'scheduled', 'retryable')
              AND b.requirement_match IS NOT NULL)
         -- a submitter with a max running quota and queued builds: one of its builds ending frees a slot
         -- without a notification, so the queue is not empty for the next poll
         OR EXISTS (SELECT 1 FROM submitter_shares s JOIN api_keys k ON k.id = s.submitter
              WHERE s.queued > 0 AND k.max_running > 0)",
    )
    .bind(worker_id)
    .bind(now)
    .bind(settings.requeue_cooloff_secs as i64)
    .bind(settings.retry_elsewhere_secs as i64)
    .fetch_one(pool)
    .await?)
}
