//! Why a build waits (scheduling.md): a `waiting_reason` and, where it applies, a `position` for every
//! queued build, computed when read (never stored, so never stale).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};

use super::QueueResult;

/// Every reason, in the order they are decided (the first that applies wins).
pub const REASONS: [&str; 8] = [
    "scheduled",
    "retry_backoff",
    "queue_paused",
    "submitter_limit",
    "no_matching_worker_registered",
    "no_matching_worker_online",
    "matching_workers_busy",
    "next",
];

/// A sentence for people, per reason.
pub fn sentence(reason: &str) -> &'static str {
    match reason {
        "scheduled" => "Scheduled: its run_at is in the future",
        "retry_backoff" => "Waiting out the backoff before its retry",
        "queue_paused" => "Its platform's queue is paused",
        "submitter_limit" => "Its submitter already has max running builds running",
        "no_matching_worker_registered" => "No registered worker satisfies its requirements",
        "no_matching_worker_online" => "Matching workers exist, but none is online and accepting work",
        "matching_workers_busy" => "Matching workers are online and all busy",
        "next" => "The next poll of a matching worker takes it",
        _ => "",
    }
}

/// One queued build's reason; `position` (builds ahead of it in claim order in its queue) for
/// `matching_workers_busy` and `next`.
#[derive(Debug, Clone, FromRow)]
pub struct Waiting {
    pub id: String,
    pub queue: String,
    pub reason: String,
    pub position: Option<i64>,
}

/// The claim's order predicted by stride scheduling: a submitter's k-th queued build (0-based, in its
/// own claim order) gets the tag `pass + k ÷ weight`; builds are taken by priority, then tag. Reasons
/// follow the claim's eligibility; workers count as matching when `build_matches` their capabilities.
const WAITING: &str = "
WITH target AS (
    SELECT b.* FROM builds b
    WHERE ($1::text[] IS NULL OR b.id = ANY($1)) AND b.state IN ('pending', 'scheduled', 'retryable')
), ranked AS (
    SELECT t.id, row_number() OVER (PARTITION BY t.queue ORDER BY t.priority DESC, t.tag, t.submitter, t.run_at, t.id) - 1 AS position
    FROM (
        SELECT b.id, b.queue, b.priority, b.run_at, COALESCE(b.submitted_by, 'admin') AS submitter,
               COALESCE(s.pass, 0) + (row_number() OVER (PARTITION BY b.queue, COALESCE(b.submitted_by, 'admin')
                   ORDER BY b.priority DESC, b.run_at, b.id) - 1)::float8 / COALESCE(k.weight, 1) AS tag
        FROM builds b
        LEFT JOIN submitter_shares s ON s.queue = b.queue AND s.submitter = COALESCE(b.submitted_by, 'admin')
        LEFT JOIN api_keys k ON k.id = b.submitted_by
        WHERE b.state IN ('pending', 'scheduled', 'retryable') AND b.run_at <= $2
          AND b.queue IN (SELECT queue FROM target)
    ) t
), fleet AS (
    -- what the workers offer, once per distinct (queue, requirements) among the targets
    SELECT g.queue, g.requirement_match,
        count(w.id) FILTER (WHERE w.admin_state <> 'revoked') AS registered,
        count(w.id) FILTER (WHERE w.admin_state = 'active' AND w.status <> 'offline'
            AND (w.health = 'ok' OR w.quarantined_until <= $2) AND w.diag_critical_at IS NULL) AS online,
        count(w.id) FILTER (WHERE w.admin_state = 'active' AND w.status = 'idle'
            AND (w.health = 'ok' OR w.quarantined_until <= $2) AND w.diag_critical_at IS NULL) AS idle
    FROM (SELECT DISTINCT queue, requirement_match FROM target) g
    LEFT JOIN workers w ON w.unregistered_at IS NULL AND g.queue = ANY(w.platforms)
        AND build_matches(g.requirement_match, w.caps)
    GROUP BY g.queue, g.requirement_match
), limited AS (
    -- submitters at their max running
    SELECT k.id FROM api_keys k
    WHERE k.id IN (SELECT submitted_by FROM target) AND k.max_running > 0
      AND k.max_running <= (SELECT count(*) FROM builds x WHERE x.submitted_by = k.id AND x.state IN ('assigned', 'building'))
), decided AS (
    SELECT t.id, t.queue, r.position,
        CASE
            WHEN t.run_at > $2 AND t.state = 'retryable' THEN 'retry_backoff'
            WHEN t.run_at > $2 THEN 'scheduled'
            WHEN q.paused THEN 'queue_paused'
            WHEN t.submitted_by IN (SELECT id FROM limited) THEN 'submitter_limit'
            WHEN f.registered = 0 THEN 'no_matching_worker_registered'
            WHEN f.online = 0 THEN 'no_matching_worker_online'
            WHEN r.position < GREATEST(1, f.idle) THEN 'next'
            ELSE 'matching_workers_busy'
        END AS reason
    FROM target t JOIN queues q ON q.name = t.queue
    JOIN fleet f ON f.queue = t.queue AND f.requirement_match IS NOT DISTINCT FROM t.requirement_match
    LEFT JOIN ranked r ON r.id = t.id
)
SELECT id, queue, reason, CASE WHEN reason IN ('next', 'matching_workers_busy') THEN position END AS position
FROM decided";

/// The reasons of the queued builds among `ids` (others are not queued: no reason).
pub async fn waiting_of(pool: &PgPool, ids: &[String], now: DateTime<Utc>) -> QueueResult<Vec<Waiting>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_as(WAITING).bind(ids).bind(now).fetch_all(pool).await?)
}

/// Counts of queued builds per queue and reason (every reason present, zeros included).
pub async fn waiting_counts(pool: &PgPool, now: DateTime<Utc>) -> QueueResult<BTreeMap<String, BTreeMap<String, i64>>> {
    let rows: Vec<Waiting> = sqlx::query_as(WAITING)
        .bind(None::<Vec<String>>)
        .bind(now)
        .fetch_all(pool)
        .await?;
    let mut counts: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for queue in ["android", "ios"] {
        counts.insert(queue.into(), REASONS.iter().map(|r| (r.to_string(), 0)).collect());
    }
    for w in rows {
        *counts.entry(w.queue).or_default().entry(w.reason).or_default() += 1;
    }
    Ok(counts)
}
