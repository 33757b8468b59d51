//! The dashboard's read model. Every query is bounded (LIMITs, time windows) and walks an index:
//! nothing here scans or counts the whole `builds` table, whose size is read from the planner's
//! estimate (`pg_class.reltuples`).

use chrono::{DateTime, Duration, Utc};
use sqlx::{PgPool, Postgres, QueryBuilder};

use crate::queue::operator::{self, AttemptRow, QueueView};
use crate::queue::{self, Build, LogLine, QueueResult, Worker};

/// Builds in a listing page.
pub const PAGE: i64 = 50;
/// Lines the build page shows at first (the tail follows from there).
pub const LOG_TAIL: i64 = 200;

/// One hour of the throughput chart.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Hour {
    pub hour: DateTime<Utc>,
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
}

/// Everything on the overview.
#[derive(Debug, Clone)]
pub struct Overview {
    pub queues: Vec<QueueView>,
    /// `(status, admin_state or "quarantined", count)`.
    pub workers: Vec<(String, String, i64)>,
    /// The last 24 hours, oldest first (hours without builds included).
    pub hours: Vec<Hour>,
    pub running: Vec<Build>,
    /// Held builds not heard from for `stale_after`.
    pub silent: Vec<Build>,
    pub past_deadline: Vec<Build>,
    pub retries_waiting: Vec<Build>,
    pub recent_failures: Vec<Build>,
    pub stale_after: Duration,
    pub total_estimate: i64,
    /// Queued builds per queue and waiting reason (scheduling.md).
    pub waiting: std::collections::BTreeMap<String, std::collections::BTreeMap<String, i64>>,
}

pub async fn overview(
    pool: &PgPool,
    settings: &queue::Settings,
    hours_cache: &HoursCache,
    now: DateTime<Utc>,
) -> QueueResult<Overview> {
    let queues = operator::queue_views(pool, now).await?;
    let workers: Vec<(String, String, i64)> = sqlx::query_as(
        // A quarantined Mac takes no work: it counts apart (never as idle), whatever its admin state.
        "SELECT status, CASE WHEN admin_state <> 'revoked'
                              AND ((health = 'quarantined' AND quarantined_until > now()) OR diag_critical_at IS NOT NULL)
                         THEN 'quarantined' ELSE admin_state END AS admin, count(*)
         FROM workers GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await?;
    let this_hour = DateTime::from_timestamp(now.timestamp().div_euclid(3600) * 3600, 0).unwrap_or(now);
    let first_hour = this_hour - Duration::hours(23);
    // The 23 full hours change rarely (late cancellations, deletions): they are counted at most once a
    // minute per instance. The current hour is counted on every render, so the chart stays live.
    let mut counted = hours_cache.full_hours(pool, first_hour, this_hour).await?;
    counted.extend(count_hours(pool, this_hour, None).await?);
    let hours = (0..24)
        .map(|i| {
            let hour = first_hour + Duration::hours(i);
            counted.iter().find(|h| h.hour == hour).cloned().unwrap_or(Hour {
                hour,
                completed: 0,
                failed: 0,
                cancelled: 0,
            })
        })
        .collect();
    let running = sqlx::query_as(
        "SELECT * FROM builds WHERE state IN ('assigned', 'building') ORDER BY started_at NULLS LAST, id LIMIT 50",
    )
    .fetch_all(pool)
    .await?;
    let stale_after = Duration::seconds(
        i64::try_from(settings.lease_timeout_secs / 2)
            .unwrap_or(60)
            .clamp(30, 300),
    );
    let silent = sqlx::query_as(
        "SELECT * FROM builds WHERE state IN ('assigned', 'building')
           AND coalesce(last_heartbeat_at, assigned_at) < $1
         ORDER BY coalesce(last_heartbeat_at, assigned_at) LIMIT 20",
    )
    .bind(now - stale_after)
    .fetch_all(pool)
    .await?;
    let deadline = Duration::seconds(i64::try_from(settings.build_deadline_secs).unwrap_or(7200));
    let past_deadline = sqlx::query_as(
        "SELECT * FROM builds WHERE state IN ('assigned', 'building') AND started_at < $1 ORDER BY started_at LIMIT 20",
    )
    .bind(now - deadline)
    .fetch_all(pool)
    .await?;
    let retries_waiting = sqlx::query_as("SELECT * FROM builds WHERE state = 'retryable' ORDER BY run_at LIMIT 20")
        .fetch_all(pool)
        .await?;
    let recent_failures = sqlx::query_as(
        "SELECT * FROM builds WHERE state = 'failed' AND completed_at IS NOT NULL ORDER BY completed_at DESC LIMIT 10",
    )
    .fetch_all(pool)
    .await?;
    Ok(Overview {
        queues,
        workers,
        hours,
        running,
        silent,
        past_deadline,
        retries_waiting,
        recent_failures,
        stale_after,
        total_estimate: total_estimate(pool).await?,
        waiting: queue::waiting_counts(pool, now).await?,
    })
}

/// Finished builds per hour from `from` (until `until`), from the finished-builds index.
async fn count_hours(pool: &PgPool, from: DateTime<Utc>, until: Option<DateTime<Utc>>) -> QueueResult<Vec<Hour>> {
    Ok(sqlx::query_as(
        "SELECT date_trunc('hour', completed_at) AS hour,
                count(*) FILTER (WHERE state = 'completed') AS completed,
                count(*) FILTER (WHERE state = 'failed') AS failed,
                count(*) FILTER (WHERE state = 'cancelled') AS cancelled
         FROM builds WHERE state IN ('completed', 'failed', 'cancelled') AND completed_at >= $1
           AND ($2::timestamptz IS NULL OR completed_at < $2)
         GROUP BY 1 ORDER BY 1",
    )
    .bind(from)
    .bind(until)
    .fetch_all(pool)
    .await?)
}

/// How long the counts of full hours are reused.
const FULL_HOURS_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// This instance's counts of the last 23 full hours, reused for [`FULL_HOURS_TTL`].
#[derive(Default)]
pub struct HoursCache(tokio::sync::Mutex<Option<CachedHours>>);

/// Counts of full hours up to an hour, and when they were counted.
type CachedHours = (DateTime<Utc>, std::time::Instant, Vec<Hour>);

impl HoursCache {
    async fn full_hours(&self, pool: &PgPool, from: DateTime<Utc>, until: DateTime<Utc>) -> QueueResult<Vec<Hour>> {
        let mut cached = self.0.lock().await;
        if let Some((at, computed, hours)) = cached.as_ref()
            && *at == until
            && computed.elapsed() < FULL_HOURS_TTL
        {
            return Ok(hours.clone());
        }
        let hours = count_hours(pool, from, Some(until)).await?;
        *cached = Some((until, std::time::Instant::now(), hours.clone()));
        Ok(hours)
    }
}

/// Below this many builds the total is counted exactly (a bounded count).
const SMALL_TABLE: i64 = 10_000;

/// The planner's estimate of the number of builds (no count over the table).
pub async fn total_estimate(pool: &PgPool) -> QueueResult<i64> {
    let estimate: Option<f32> = sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = 'builds'::regclass")
        .fetch_optional(pool)
        .await?;
    let estimate = estimate.map_or(0, |e| e.max(0.0) as i64);
    if estimate >= SMALL_TABLE {
        return Ok(estimate);
    }
    // A small (or never analysed) table: an exact count, bounded so it can never become a full scan.
    let counted: i64 = sqlx::query_scalar("SELECT count(*) FROM (SELECT 1 FROM builds LIMIT $1) b")
        .bind(SMALL_TABLE)
        .fetch_one(pool)
        .await?;
    Ok(counted.max(estimate))
}

/// Filters of the builds page.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub state: Option<String>,
    pub platform: Option<String>,
    pub worker: Option<String>,
    /// Submitted within this many hours.
    pub within_hours: Option<i64>,
    /// A build id, or its first characters.
    pub id: Option<String>,
    /// The previous page's last id.
    pub before: Option<String>,
}

/// A page of builds, newest first: whether there are more, and why its queued builds wait.
pub type BuildsPage = (Vec<Build>, bool, Vec<queue::Waiting>);

/// A page of builds, newest first; the second value says whether there are more, the third why the
/// page's queued builds wait (computed for those builds only).
pub async fn builds(pool: &PgPool, filter: &Filter, now: DateTime<Utc>) -> QueueResult<BuildsPage> {
    let (rows, more) = builds_up_to(pool, filter, now, PAGE).await?;
    let queued: Vec<String> = rows
        .iter()
        .filter(|b| b.state().is_queued())
        .map(|b| b.id.clone())
        .collect();
    let waiting = queue::waiting_of(pool, &queued, Utc::now()).await?;
    Ok((rows, more, waiting))
}

/// At most `limit` builds matching `filter`, newest first; whether there are more.
pub async fn builds_up_to(
    pool: &PgPool,
    filter: &Filter,
    now: DateTime<Utc>,
    limit: i64,
) -> QueueResult<(Vec<Build>, bool)> {
    let mut q: QueryBuilder<Postgres> = QueryBuilder::new("SELECT * FROM builds WHERE true");
    if let Some(id) = &filter.id {
        // The full id, or the first characters the tables show (ids hold no LIKE wildcards but `_`).
        let prefix = format!("{}%", id.replace('_', "\\_"));
        q.push(" AND (id = ").push_bind(id.clone());
        q.push(" OR id LIKE ").push_bind(prefix).push(")");
    }
    if let Some(state) = &filter.state {
        q.push(" AND state = ").push_bind(state.clone());
    }
    if let Some(platform) = &filter.platform {
        q.push(" AND queue = ").push_bind(platform.clone());
    }
    if let Some(worker) = &filter.worker {
        q.push(" AND (worker_id = ").push_bind(worker.clone());
        q.push(" OR worker_id IN (SELECT id FROM workers WHERE name = ")
            .push_bind(worker.clone())
            .push("))");
    }
    if let Some(hours) = filter.within_hours {
        q.push(" AND submitted_at >= ").push_bind(now - Duration::hours(hours));
    }
    if let Some(before) = &filter.before {
        q.push(" AND (submitted_at, id) < (SELECT submitted_at, id FROM builds WHERE id = ")
            .push_bind(before.clone())
            .push(")");
    }
    q.push(" ORDER BY submitted_at DESC, id DESC LIMIT ")
        .push_bind(limit + 1);
    let mut rows: Vec<Build> = q.build_query_as().fetch_all(pool).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    Ok((rows, more))
}

/// A CPU/memory sample.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Sample {
    pub ts: DateTime<Utc>,
    pub cpu_percent: f64,
    pub memory_mb: f64,
}

/// Everything on a build's page.
#[derive(Debug, Clone)]
pub struct BuildPage {
    pub build: Build,
    pub attempts: Vec<AttemptRow>,
    pub samples: Vec<Sample>,
    /// Why it waits, while queued.
    pub waiting: Option<queue::Waiting>,
}

pub async fn build_page(pool: &PgPool, id: &str) -> QueueResult<Option<BuildPage>> {
    let Some(build) = queue::find_build(pool, id).await? else {
        return Ok(None);
    };
    let attempts = operator::attempts_of(pool, id).await?;
    let mut samples: Vec<Sample> = sqlx::query_as(
        "SELECT ts, cpu_percent, memory_mb FROM cpu_snapshots WHERE build_id = $1 ORDER BY ts DESC LIMIT 720",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    samples.reverse();
    let waiting = if build.state().is_queued() {
        queue::waiting_of(pool, std::slice::from_ref(&build.id), Utc::now())
            .await?
            .pop()
    } else {
        None
    };
    Ok(Some(BuildPage {
        build,
        attempts,
        samples,
        waiting,
    }))
}

/// The last `LOG_TAIL` lines, oldest first.
pub async fn log_tail(pool: &PgPool, id: &str) -> QueueResult<Vec<LogLine>> {
    let mut lines: Vec<LogLine> =
        sqlx::query_as("SELECT seq, ts, level, message FROM build_logs WHERE build_id = $1 ORDER BY seq DESC LIMIT $2")
            .bind(id)
            .bind(LOG_TAIL)
            .fetch_all(pool)
            .await?;
    lines.reverse();
    Ok(lines)
}

/// Lines after `after`, at most 500.
pub async fn log_after(pool: &PgPool, id: &str, after: i64) -> QueueResult<Vec<LogLine>> {
    queue::read_logs(pool, id, after, Some(500)).await
}

/// A worker row with what the workers page shows beside it.
#[derive(Debug, Clone)]
pub struct WorkerRow {
    pub worker: Worker,
    /// `(build id, state)` of the build it holds.
    pub current: Option<(String, String)>,
    pub diagnostics: Option<Diagnostics>,
}

/// A worker's latest diagnostics report.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Diagnostics {
    pub worker_id: String,
    pub status: String,
    pub run_at: DateTime<Utc>,
    pub checks: sqlx::types::Json<serde_json::Value>,
}

/// Up to 500 workers by name, with their current build and latest diagnostics.
pub async fn workers(pool: &PgPool) -> QueueResult<Vec<WorkerRow>> {
    let workers: Vec<Worker> = sqlx::query_as(
        "SELECT * FROM workers ORDER BY (admin_state = 'revoked'), (status = 'offline'), name, id LIMIT 500",
    )
    .fetch_all(pool)
    .await?;
    let held: Vec<(String, String, String)> =
        sqlx::query_as("SELECT lease_owner, id, state FROM builds WHERE state IN ('assigned', 'building') LIMIT 10000")
            .fetch_all(pool)
            .await?;
    let ids: Vec<String> = workers.iter().map(|w| w.id.clone()).collect();
    let reports: Vec<Diagnostics> = sqlx::query_as(
        "SELECT d.worker_id, d.status, d.run_at, d.checks FROM unnest($1::text[]) AS w(id)
         CROSS JOIN LATERAL (SELECT worker_id, status, run_at, checks FROM diagnostics
                             WHERE worker_id = w.id ORDER BY run_at DESC LIMIT 1) d",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok(workers
        .into_iter()
        .map(|worker| WorkerRow {
            current: held
                .iter()
                .find(|(owner, _, _)| *owner == worker.id)
                .map(|(_, id, state)| (id.clone(), state.clone())),
            diagnostics: reports.iter().find(|d| d.worker_id == worker.id).cloned(),
            worker,
        })
        .collect())
}

/// Worker names by id, for showing names where the tables hold ids.
pub type Names = std::collections::HashMap<String, String>;

/// Every worker's name (the fleet is small; capped for safety).
pub async fn worker_names(pool: &PgPool) -> QueueResult<Names> {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT id, name FROM workers ORDER BY id LIMIT 5000")
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().collect())
}

/// One attempt a worker made, with its build's platform.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkerAttempt {
    pub build_id: String,
    pub attempt: i32,
    pub queue: String,
    pub assigned_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
    pub error_message: Option<String>,
}

/// A diagnostics report in full.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Report {
    pub status: String,
    pub run_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub auto_fixed: bool,
    pub checks: sqlx::types::Json<serde_json::Value>,
}

/// Everything on a worker's page.
#[derive(Debug, Clone)]
pub struct WorkerPage {
    pub worker: Worker,
    /// `(build id, state, progress, stage)` of the build it holds.
    pub current: Option<(String, String, Option<i16>, Option<String>)>,
    /// Its latest attempts, newest first.
    pub attempts: Vec<WorkerAttempt>,
    /// Its latest diagnostics reports, newest first.
    pub reports: Vec<Report>,
}

/// Attempts a worker's page lists.
pub const WORKER_ATTEMPTS: i64 = 50;

pub async fn worker_page(pool: &PgPool, id: &str) -> QueueResult<Option<WorkerPage>> {
    let Some(worker) = sqlx::query_as::<_, Worker>("SELECT * FROM workers WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?
    else {
        return Ok(None);
    };
    let current = sqlx::query_as(
        "SELECT id, state, progress, stage FROM builds WHERE lease_owner = $1 AND state IN ('assigned', 'building')
         ORDER BY assigned_at DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let attempts = sqlx::query_as(
        "SELECT a.build_id, a.attempt, b.queue, a.assigned_at, a.finished_at, a.outcome, a.error_message
         FROM build_attempts a JOIN builds b ON b.id = a.build_id
         WHERE a.worker_id = $1 ORDER BY a.assigned_at DESC LIMIT $2",
    )
    .bind(id)
    .bind(WORKER_ATTEMPTS)
    .fetch_all(pool)
    .await?;
    let reports = sqlx::query_as(
        "SELECT status, run_at, duration_ms, auto_fixed, checks FROM diagnostics WHERE worker_id = $1
         ORDER BY run_at DESC LIMIT 10",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok(Some(WorkerPage {
        worker,
        current,
        attempts,
        reports,
    }))
}

/// Lines before `before`, at most `LOG_TAIL`, oldest first (the build page's "Load earlier lines").
pub async fn log_before(pool: &PgPool, id: &str, before: i64) -> QueueResult<Vec<LogLine>> {
    let mut lines: Vec<LogLine> = sqlx::query_as(
        "SELECT seq, ts, level, message FROM build_logs WHERE build_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
    )
    .bind(id)
    .bind(before)
    .bind(LOG_EARLIER)
    .fetch_all(pool)
    .await?;
    lines.reverse();
    Ok(lines)
}

/// Lines one "Load earlier lines" brings.
pub const LOG_EARLIER: i64 = 500;

/// Lines of the whole log containing `needle` (case-insensitive), oldest first, at most 500.
pub async fn log_search(pool: &PgPool, id: &str, needle: &str) -> QueueResult<Vec<LogLine>> {
    let pattern = format!(
        "%{}%",
        needle.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
    );
    Ok(sqlx::query_as(
        "SELECT seq, ts, level, message FROM build_logs WHERE build_id = $1 AND message ILIKE $2
         ORDER BY seq LIMIT 500",
    )
    .bind(id)
    .bind(pattern)
    .fetch_all(pool)
    .await?)
}

/// A chunk of the whole log from `after`, for the plain-text download.
pub async fn log_chunk(pool: &PgPool, id: &str, after: i64) -> QueueResult<Vec<LogLine>> {
    queue::read_logs(pool, id, after, Some(2000)).await
}
