//! Why a build waits (scheduling.md): a `waiting_reason` and, where it applies, a `position` for every
//! queued build, computed when read (never stored, so never stale).

use std::collections::{BTreeMap, HashMap};

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
        AND (g.requirement_match IS NULL OR build_matches(g.requirement_match, w.caps))
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

/// The reasons of the queued builds among `ids` (a page, a build), without ranking the whole queue:
/// the reasons that do not depend on the order are decided as in [`WAITING`]; the others (`next`,
/// `matching_workers_busy`) get `ranked` here with what the position needs: the build's submitter, stride
/// pass and weight, and how many of its own due builds precede it (`own_ahead`, one walk of the page's
/// submitters' builds in claim order). [`positions`] then counts the builds ahead from the due queued
/// builds per (queue, submitter, priority): [`WAITING_GROUPS_UNIFORM`] when the queue allows, else one
/// aggregate over its queued builds ([`WAITING_GROUPS`]).
const WAITING_PAGE: &str = "
WITH target AS (
    SELECT b.* FROM builds b
    WHERE b.id = ANY($1) AND b.state IN ('pending', 'scheduled', 'retryable')
), fleet AS (
    SELECT g.queue, g.requirement_match,
        count(w.id) FILTER (WHERE w.admin_state <> 'revoked') AS registered,
        count(w.id) FILTER (WHERE w.admin_state = 'active' AND w.status <> 'offline'
            AND (w.health = 'ok' OR w.quarantined_until <= $2) AND w.diag_critical_at IS NULL) AS online,
        count(w.id) FILTER (WHERE w.admin_state = 'active' AND w.status = 'idle'
            AND (w.health = 'ok' OR w.quarantined_until <= $2) AND w.diag_critical_at IS NULL) AS idle
    FROM (SELECT DISTINCT queue, requirement_match FROM target) g
    LEFT JOIN workers w ON w.unregistered_at IS NULL AND g.queue = ANY(w.platforms)
        AND (g.requirement_match IS NULL OR build_matches(g.requirement_match, w.caps))
    GROUP BY g.queue, g.requirement_match
), limited AS (
    SELECT k.id FROM api_keys k
    WHERE k.id IN (SELECT submitted_by FROM target) AND k.max_running > 0
      AND k.max_running <= (SELECT count(*) FROM builds x WHERE x.submitted_by = k.id AND x.state IN ('assigned', 'building'))
), decided AS (
    SELECT t.id, t.queue, t.priority, t.submitted_by, COALESCE(t.submitted_by, 'admin') AS submitter, f.idle,
        CASE
            WHEN t.run_at > $2 AND t.state = 'retryable' THEN 'retry_backoff'
            WHEN t.run_at > $2 THEN 'scheduled'
            WHEN q.paused THEN 'queue_paused'
            WHEN t.submitted_by IN (SELECT id FROM limited) THEN 'submitter_limit'
            WHEN f.registered = 0 THEN 'no_matching_worker_registered'
            WHEN f.online = 0 THEN 'no_matching_worker_online'
            ELSE 'ranked'
        END AS reason
    FROM target t JOIN queues q ON q.name = t.queue
    JOIN fleet f ON f.queue = t.queue AND f.requirement_match IS NOT DISTINCT FROM t.requirement_match
), own AS (
    SELECT x.id, row_number() OVER (PARTITION BY x.queue, COALESCE(x.submitted_by, 'admin')
                                    ORDER BY x.priority DESC, x.run_at, x.id) - 1 AS own_ahead
    FROM builds x
    WHERE x.state IN ('pending', 'scheduled', 'retryable') AND x.run_at <= $2
      AND (x.queue, COALESCE(x.submitted_by, 'admin')) IN (SELECT queue, submitter FROM decided WHERE reason = 'ranked')
)
SELECT d.id, d.queue, d.reason, d.idle, d.priority, d.submitter,
       COALESCE(s.pass, 0) AS pass, COALESCE(k.weight, 1) AS weight, o.own_ahead
FROM decided d
LEFT JOIN own o ON o.id = d.id
LEFT JOIN submitter_shares s ON s.queue = d.queue AND s.submitter = d.submitter
LEFT JOIN api_keys k ON k.id = d.submitted_by";

/// Due queued builds per (queue, submitter, priority) of the given queues, with the submitter's stride
/// pass and weight (the claim order predicted by [`WAITING`]'s `ranked`).
const WAITING_GROUPS: &str = "
SELECT g.queue, g.submitter, g.priority, g.n, COALESCE(s.pass, 0) AS pass, COALESCE(k.weight, 1) AS weight
FROM (
    SELECT b.queue, COALESCE(b.submitted_by, 'admin') AS submitter, b.priority, count(*) AS n
    FROM builds b
    WHERE b.state IN ('pending', 'scheduled', 'retryable') AND b.run_at <= $2 AND b.queue = ANY($1)
    GROUP BY 1, 2, 3
) g
LEFT JOIN submitter_shares s ON s.queue = g.queue AND s.submitter = g.submitter
LEFT JOIN api_keys k ON k.id = g.submitter AND g.submitter <> 'admin'";

/// [`WAITING_GROUPS`] without reading the queue, for a queue whose queued builds are all due and of one
/// priority (the usual case): then its groups are the `submitter_shares` rows with work, whose `queued`
/// the fair-share triggers keep equal to the submitter's queued builds (one snapshot with the check).
/// Returns no row for a queue that is not so; [`WAITING_GROUPS`] answers for it.
const WAITING_GROUPS_UNIFORM: &str = "
WITH bounds AS MATERIALIZED (
    SELECT u.queue,
        (SELECT max(b.priority) FROM builds b WHERE b.queue = u.queue AND b.state IN ('pending', 'scheduled', 'retryable')) AS hi,
        (SELECT min(b.priority) FROM builds b WHERE b.queue = u.queue AND b.state IN ('pending', 'scheduled', 'retryable')) AS lo
    FROM unnest($1::text[]) AS u(queue)
), uniform AS MATERIALIZED (
    SELECT q.queue, q.hi AS priority FROM bounds q
    WHERE q.hi = q.lo AND NOT EXISTS (
        SELECT 1 FROM builds b WHERE b.queue = q.queue AND b.state IN ('pending', 'scheduled', 'retryable')
          AND b.priority = q.hi AND b.run_at > $2)
)
SELECT s.queue, s.submitter, u.priority, s.queued::bigint AS n, s.pass, COALESCE(k.weight, 1) AS weight
FROM uniform u
JOIN submitter_shares s ON s.queue = u.queue AND s.queued > 0
LEFT JOIN api_keys k ON k.id = s.submitter AND s.submitter <> 'admin'";

#[derive(Debug, FromRow)]
struct PageRow {
    id: String,
    queue: String,
    reason: String,
    idle: i64,
    priority: i32,
    submitter: String,
    pass: f64,
    weight: i32,
    own_ahead: Option<i64>,
}

/// Due queued builds of one submitter at one priority in one queue.
#[derive(Debug, FromRow)]
struct Group {
    queue: String,
    submitter: String,
    priority: i32,
    n: i64,
    pass: f64,
    weight: i32,
}

/// How many of a submitter's builds (tags `pass + j ÷ weight`, j = 0, 1, …) come before the tag `tag`:
/// strictly lower tags, and equal tags too when the submitter sorts first (`ties_ahead`).
fn tags_before(tag: f64, pass: f64, weight: i32, ties_ahead: bool) -> i64 {
    // Rounded so that tags equal in the database's arithmetic compare equal here.
    let x = ((tag - pass) * f64::from(weight) * 1e9).round() / 1e9;
    if ties_ahead {
        if x < 0.0 { 0 } else { x.floor() as i64 + 1 }
    } else if x <= 0.0 {
        0
    } else {
        x.ceil() as i64
    }
}

/// The position of each ranked build: builds of higher priority in its queue, then at its priority,
/// per submitter, those whose stride tag comes first (ties: submitter, then its own claim order).
fn positions(rows: &[PageRow], groups: &[Group]) -> Vec<Waiting> {
    rows.iter()
        .map(|r| {
            let position = r.own_ahead.filter(|_| r.reason == "ranked").map(|k| {
                // Per submitter of the queue: its due builds of higher priority (all ahead).
                let mut higher: HashMap<&str, i64> = HashMap::new();
                for g in groups.iter().filter(|g| g.queue == r.queue && g.priority > r.priority) {
                    *higher.entry(g.submitter.as_str()).or_default() += g.n;
                }
                let higher_of = |submitter: &str| higher.get(submitter).copied().unwrap_or(0);
                let tag = r.pass + k as f64 / f64::from(r.weight);
                let above: i64 = higher.values().sum();
                let own = k - higher_of(&r.submitter);
                let others: i64 = groups
                    .iter()
                    .filter(|g| g.queue == r.queue && g.priority == r.priority && g.submitter != r.submitter)
                    .map(|g| {
                        let before = tags_before(tag, g.pass, g.weight, g.submitter < r.submitter);
                        (before - higher_of(&g.submitter)).clamp(0, g.n)
                    })
                    .sum();
                above + own + others
            });
            let reason = match position {
                Some(p) if p < r.idle.max(1) => "next",
                Some(_) => "matching_workers_busy",
                None if r.reason == "ranked" => "matching_workers_busy",
                None => r.reason.as_str(),
            };
            Waiting {
                id: r.id.clone(),
                queue: r.queue.clone(),
                reason: reason.to_string(),
                position: position.filter(|_| r.reason == "ranked"),
            }
        })
        .collect()
}

/// The reasons of the queued builds among `ids` (others are not queued: no reason). Reads only what
/// the given builds need: a page of 50 stays fast however long the queue (scheduling.md, bench F3).
pub async fn waiting_of(pool: &PgPool, ids: &[String], now: DateTime<Utc>) -> QueueResult<Vec<Waiting>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<PageRow> = sqlx::query_as(WAITING_PAGE).bind(ids).bind(now).fetch_all(pool).await?;
    let mut queues: Vec<&str> = rows
        .iter()
        .filter(|r| r.reason == "ranked")
        .map(|r| r.queue.as_str())
        .collect();
    queues.sort_unstable();
    queues.dedup();
    let mut groups: Vec<Group> = Vec::new();
    if !queues.is_empty() {
        groups = sqlx::query_as(WAITING_GROUPS_UNIFORM)
            .bind(&queues)
            .bind(now)
            .fetch_all(pool)
            .await?;
        queues.retain(|q| !groups.iter().any(|g| g.queue == *q));
    }
    if !queues.is_empty() {
        let mut counted: Vec<Group> = sqlx::query_as(WAITING_GROUPS)
            .bind(&queues)
            .bind(now)
            .fetch_all(pool)
            .await?;
        groups.append(&mut counted);
    }
    Ok(positions(&rows, &groups))
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
