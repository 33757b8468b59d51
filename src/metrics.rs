//! Prometheus metrics (R23). One recorder per process; `GET /metrics` renders it after refreshing the
//! gauges that are read from the database at scrape time (queue depth, oldest pending age).

use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;

pub const CLAIM_SECONDS: &str = "expo_claim_duration_seconds";
pub const HTTP_SECONDS: &str = "expo_http_request_duration_seconds";
pub const BUILDS_FINISHED: &str = "expo_builds_finished_total";
pub const LEASE_RESCUES: &str = "expo_lease_rescues_total";
/// Inconsistencies the reconciliation job repaired, by kind.
pub const RECONCILED: &str = "expo_reconciled_total";
/// Gaps in every instance's database contact for which the lease clock stopped (fleet-health.md).
pub const CONTROLLER_OUTAGES: &str = "expo_controller_outages_total";
pub const RETRIES: &str = "expo_retries_total";
pub const UPLOAD_BYTES: &str = "expo_upload_bytes_total";
pub const DOWNLOAD_BYTES: &str = "expo_download_bytes_total";
pub const RATE_LIMITED: &str = "expo_rate_limited_total";
pub const QUEUE_DEPTH: &str = "expo_queue_depth";
pub const OLDEST_PENDING: &str = "expo_oldest_pending_age_seconds";
/// Submits and retries refused because their platform queue was full (R58), by queue.
pub const QUEUE_FULL: &str = "expo_queue_full_rejections_total";

pub const WORKERS: &str = "expo_workers";
/// Workers able to take work now (online, active, not quarantined), by platform.
pub const WORKERS_AVAILABLE: &str = "expo_workers_available";
/// Workers quarantined now (for infrastructure failures or a critical diagnostics report).
pub const WORKERS_QUARANTINED: &str = "expo_workers_quarantined";
/// Requests the artifact store failed (answered 503 `Storage unavailable`).
pub const STORAGE_ERRORS: &str = "expo_storage_errors_total";
pub const BUILD_DURATION: &str = "expo_build_duration_seconds";
pub const QUEUE_WAIT: &str = "expo_build_queue_wait_seconds";
pub const FAILURES: &str = "expo_build_failures_total";
pub const JOB_RUNS: &str = "expo_job_runs_total";
pub const JOB_ERRORS: &str = "expo_job_errors_total";
pub const DB_POOL: &str = "expo_db_pool_connections";
/// Objects the `sweep_unlinked` job deleted because no build row names them.
pub const UNLINKED_OBJECTS: &str = "expo_unlinked_objects_deleted_total";

/// Build durations and queue waits are minutes, not milliseconds.
const BUILD_BUCKETS: &[f64] = &[
    5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1200.0, 1800.0, 2700.0, 3600.0, 5400.0, 7200.0, 14400.0,
];

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

/// The process-wide recorder (installed on first use).
pub fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?
                .set_buckets_for_metric(Matcher::Full(BUILD_DURATION.into()), BUILD_BUCKETS)
                .ok()?
                .set_buckets_for_metric(Matcher::Full(QUEUE_WAIT.into()), BUILD_BUCKETS)
                .ok()?
                .install_recorder()
                .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
                .ok()
        })
        .as_ref()
}

pub const SSE_SUBSCRIBERS: &str = "expo_sse_subscribers";
pub const BUILDS_WAITING: &str = "expo_builds_waiting";

/// Refreshes the database-derived gauges (and this instance's SSE subscriber count) and renders the
/// text exposition format.
pub async fn render(pool: &PgPool, sse_subscribers: usize) -> Result<String, sqlx::Error> {
    metrics::gauge!(SSE_SUBSCRIBERS).set(sse_subscribers as f64);
    let idle = pool.num_idle() as f64;
    metrics::gauge!(DB_POOL, "state" => "idle").set(idle);
    metrics::gauge!(DB_POOL, "state" => "in_use").set((f64::from(pool.size()) - idle).max(0.0));
    let workers: Vec<(String, i64)> = sqlx::query_as(
        "SELECT s.status, count(w.id) FROM unnest(ARRAY['idle', 'busy', 'offline']) AS s(status)
         LEFT JOIN workers w ON w.status = s.status AND w.admin_state <> 'revoked'
              AND (s.status <> 'idle' OR (w.admin_state = 'active'
                   AND NOT ((w.health = 'quarantined' AND w.quarantined_until > now()) OR w.diag_critical_at IS NOT NULL)))
         GROUP BY s.status",
    )
    .fetch_all(pool)
    .await?;
    for (status, count) in workers {
        metrics::gauge!(WORKERS, "status" => status).set(count as f64);
    }
    let quarantined: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM workers WHERE admin_state <> 'revoked'
            AND ((health = 'quarantined' AND quarantined_until > now()) OR diag_critical_at IS NOT NULL)",
    )
    .fetch_one(pool)
    .await?;
    metrics::gauge!(WORKERS_QUARANTINED).set(quarantined as f64);
    // As the claim decides who may take work (claim.rs), per platform queue.
    let available: Vec<(String, i64)> = sqlx::query_as(
        "SELECT q.name, count(w.id) FROM queues q
         LEFT JOIN workers w ON q.name = ANY(w.platforms) AND w.status <> 'offline' AND w.admin_state = 'active'
            AND w.unregistered_at IS NULL AND (w.health = 'ok' OR w.quarantined_until <= now())
            AND w.diag_critical_at IS NULL
         GROUP BY q.name",
    )
    .fetch_all(pool)
    .await?;
    for (platform, count) in available {
        metrics::gauge!(WORKERS_AVAILABLE, "platform" => platform).set(count as f64);
    }
    // Why queued builds wait (scheduling.md), per queue and reason.
    let waiting = crate::queue::waiting_counts(pool, chrono::Utc::now())
        .await
        .map_err(|e| match e {
            crate::queue::QueueError::Db(e) | crate::queue::QueueError::DbUncommitted(e) => e,
            other => sqlx::Error::Protocol(other.to_string()),
        })?;
    for (queue, reasons) in waiting {
        for (reason, count) in reasons {
            metrics::gauge!(BUILDS_WAITING, "queue" => queue.clone(), "reason" => reason).set(count as f64);
        }
    }
    let depth: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT q.name, s.state, count(b.id)
         FROM queues q CROSS JOIN unnest(ARRAY['scheduled', 'pending', 'retryable', 'assigned', 'building']) AS s(state)
         LEFT JOIN builds b ON b.queue = q.name AND b.state = s.state
         GROUP BY q.name, s.state",
    )
    .fetch_all(pool)
    .await?;
    for (queue, state, count) in depth {
        metrics::gauge!(QUEUE_DEPTH, "queue" => queue, "state" => state).set(count as f64);
    }
    let oldest: Vec<(String, Option<f64>)> = sqlx::query_as(
        "SELECT q.name, extract(epoch FROM now() - min(b.run_at))::float8
         FROM queues q LEFT JOIN builds b ON b.queue = q.name AND b.state = 'pending'
         GROUP BY q.name",
    )
    .fetch_all(pool)
    .await?;
    for (queue, age) in oldest {
        metrics::gauge!(OLDEST_PENDING, "queue" => queue).set(age.unwrap_or(0.0).max(0.0));
    }
    Ok(handle().map(PrometheusHandle::render).unwrap_or_default())
}

/// Platforms, outcomes and failure reasons (and `Job::ALL`) every labelled family starts with (at zero), so alerts
/// never see a missing series.
const PLATFORMS: [&str; 2] = ["ios", "android"];
const OUTCOMES: [&str; 5] = ["completed", "build_failure", "infrastructure", "timeout", "cancelled"];
const FAILURE_REASONS: [&str; 3] = ["build_failure", "infrastructure", "timeout"];

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Folds the histogram samples recorded since the last scrape into their buckets every
/// [`UPKEEP_INTERVAL`], on a thread of its own (one per process). `install_recorder` starts no upkeep:
/// without it every sample (one per request and per claim) stays queued in memory until a scrape,
/// so an unscraped controller grows by every request it serves, and the next scrape drains them all.
fn start_upkeep(handle: &'static PrometheusHandle) {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    handle.run_upkeep();
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "metrics upkeep thread not started");
        }
    });
}

/// Installs the recorder, describes every family (`# HELP`) and creates each series at zero.
pub fn init() {
    let Some(handle) = handle() else {
        return;
    };
    start_upkeep(handle);
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(CLAIM_SECONDS, "Time to claim a build for a polling worker, in seconds");
    describe_histogram!(
        HTTP_SECONDS,
        "HTTP request duration by route, method and status, in seconds"
    );
    describe_counter!(BUILDS_FINISHED, "Builds that reached a final state, by outcome");
    describe_counter!(LEASE_RESCUES, "Held builds whose lease expired and were rescued");
    describe_counter!(
        CONTROLLER_OUTAGES,
        "Outages (no instance reached the database) for which the lease clock stopped"
    );
    describe_counter!(RECONCILED, "Inconsistencies repaired by the reconcile job, by kind");
    for kind in crate::queue::RECONCILE_KINDS {
        metrics::counter!(RECONCILED, "kind" => kind).increment(0);
    }
    describe_counter!(RETRIES, "Failed attempts scheduled for a retry, by failure kind");
    describe_counter!(UPLOAD_BYTES, "Bytes stored from uploads");
    describe_counter!(DOWNLOAD_BYTES, "Bytes streamed to downloads");
    describe_counter!(RATE_LIMITED, "Requests refused by a rate limit");
    describe_gauge!(QUEUE_DEPTH, "Builds in a queue by state (read at scrape time)");
    describe_gauge!(OLDEST_PENDING, "Age of the oldest pending build per queue, in seconds");
    describe_gauge!(SSE_SUBSCRIBERS, "Open event-stream subscriptions on this instance");
    describe_gauge!(
        WORKERS,
        "Registered (not revoked) workers by status (read at scrape time)"
    );
    describe_gauge!(
        WORKERS_AVAILABLE,
        "Workers able to take work now (online, active, not quarantined) by platform (read at scrape time)"
    );
    describe_gauge!(WORKERS_QUARANTINED, "Workers quarantined now (read at scrape time)");
    describe_gauge!(
        BUILDS_WAITING,
        "Queued builds by queue and waiting reason (read at scrape time)"
    );
    describe_counter!(
        STORAGE_ERRORS,
        "Requests the artifact store failed (answered 503 Storage unavailable)"
    );
    describe_histogram!(
        BUILD_DURATION,
        "Run time of finished builds (start of the last attempt to its end), in seconds"
    );
    describe_histogram!(
        QUEUE_WAIT,
        "Time a build waited between becoming eligible and being assigned, in seconds"
    );
    describe_counter!(FAILURES, "Builds that failed for good, by reason");
    describe_counter!(JOB_RUNS, "Maintenance job ticks run by this instance, by job");
    describe_counter!(
        JOB_ERRORS,
        "Maintenance job ticks that failed after their retries, by job"
    );
    describe_gauge!(DB_POOL, "Database pool connections by state (in_use, idle)");
    describe_counter!(
        UNLINKED_OBJECTS,
        "Stored objects no build row names (left by a kill, a lost commit answer or a failed cleanup), deleted by sweep_unlinked"
    );
    for outcome in ["completed", "build_failure", "infrastructure", "timeout", "cancelled"] {
        metrics::counter!(BUILDS_FINISHED, "outcome" => outcome).increment(0);
    }
    for reason in FAILURE_REASONS {
        metrics::counter!(FAILURES, "reason" => reason).increment(0);
        metrics::counter!(RETRIES, "kind" => reason).increment(0);
    }
    for job in crate::jobs::Job::ALL.map(crate::jobs::Job::name) {
        metrics::counter!(JOB_RUNS, "job" => job).increment(0);
        metrics::counter!(JOB_ERRORS, "job" => job).increment(0);
    }
    for status in ["idle", "busy", "offline"] {
        metrics::gauge!(WORKERS, "status" => status).set(0.0);
    }
    metrics::gauge!(WORKERS_QUARANTINED).set(0.0);
    for state in ["in_use", "idle"] {
        metrics::gauge!(DB_POOL, "state" => state).set(0.0);
    }
    describe_counter!(
        QUEUE_FULL,
        "Submits and retries refused because their platform queue was full, by queue"
    );
    for platform in PLATFORMS {
        metrics::counter!(QUEUE_FULL, "queue" => platform).increment(0);
        metrics::gauge!(WORKERS_AVAILABLE, "platform" => platform).set(0.0);
        let _ = metrics::histogram!(QUEUE_WAIT, "platform" => platform);
        for outcome in OUTCOMES {
            let _ = metrics::histogram!(BUILD_DURATION, "platform" => platform, "outcome" => outcome);
        }
    }
    for name in [
        LEASE_RESCUES,
        CONTROLLER_OUTAGES,
        UPLOAD_BYTES,
        DOWNLOAD_BYTES,
        RATE_LIMITED,
        UNLINKED_OBJECTS,
        STORAGE_ERRORS,
    ] {
        metrics::counter!(name).increment(0);
    }
    let _ = metrics::histogram!(CLAIM_SECONDS);
}

/// A build reached a final state with `outcome`: counted, and its run time recorded (nothing for a
/// build that never started).
pub fn build_ended(build: &crate::queue::Build, outcome: &'static str, ended: DateTime<Utc>) {
    metrics::counter!(BUILDS_FINISHED, "outcome" => outcome).increment(1);
    if let Some(started) = build.started_at.or(build.assigned_at) {
        let seconds = (ended - started).num_milliseconds().max(0) as f64 / 1000.0;
        metrics::histogram!(BUILD_DURATION, "platform" => build.platform().as_str(), "outcome" => outcome)
            .record(seconds);
    }
}

/// Records how long a build waited in its queue before a worker got it.
pub fn queue_waited(platform: &str, eligible_since: DateTime<Utc>, assigned: DateTime<Utc>) {
    let seconds = (assigned - eligible_since).num_milliseconds().max(0) as f64 / 1000.0;
    metrics::histogram!(QUEUE_WAIT, "platform" => platform.to_string()).record(seconds);
}

/// Counts a build that failed for good.
pub fn build_failed(reason: &'static str) {
    metrics::counter!(FAILURES, "reason" => reason).increment(1);
}

/// Counts a maintenance tick this instance ran, and whether it failed.
pub fn job_ran(job: &'static str, failed: bool) {
    metrics::counter!(JOB_RUNS, "job" => job).increment(1);
    if failed {
        metrics::counter!(JOB_ERRORS, "job" => job).increment(1);
    }
}

/// Counts objects deleted because no build row names them.
pub fn unlinked_deleted(count: u64) {
    metrics::counter!(UNLINKED_OBJECTS).increment(count);
}

/// Records how long a claim took.
pub fn claim_took(elapsed: Duration) {
    metrics::histogram!(CLAIM_SECONDS).record(elapsed.as_secs_f64());
}
