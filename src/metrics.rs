//! Prometheus metrics (R23). One recorder per process; `GET /metrics` renders it after refreshing the
//! gauges that are read from the database at scrape time (queue depth, oldest pending age).

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;

pub const CLAIM_SECONDS: &str = "expo_claim_duration_seconds";
pub const HTTP_SECONDS: &str = "expo_http_request_duration_seconds";
pub const BUILDS_FINISHED: &str = "expo_builds_finished_total";
pub const LEASE_RESCUES: &str = "expo_lease_rescues_total";
pub const RETRIES: &str = "expo_retries_total";
pub const UPLOAD_BYTES: &str = "expo_upload_bytes_total";
pub const DOWNLOAD_BYTES: &str = "expo_download_bytes_total";
pub const RATE_LIMITED: &str = "expo_rate_limited_total";
pub const QUEUE_DEPTH: &str = "expo_queue_depth";
pub const OLDEST_PENDING: &str = "expo_oldest_pending_age_seconds";
/// Submits and retries refused because their platform queue was full (R58), by queue.
pub const QUEUE_FULL: &str = "expo_queue_full_rejections_total";

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
                .install_recorder()
                .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
                .ok()
        })
        .as_ref()
}

pub const SSE_SUBSCRIBERS: &str = "expo_sse_subscribers";

/// Refreshes the database-derived gauges (and this instance's SSE subscriber count) and renders the
/// text exposition format.
pub async fn render(pool: &PgPool, sse_subscribers: usize) -> Result<String, sqlx::Error> {
    metrics::gauge!(SSE_SUBSCRIBERS).set(sse_subscribers as f64);
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

/// Records how long a claim took.
pub fn claim_took(elapsed: Duration) {
    metrics::histogram!(CLAIM_SECONDS).record(elapsed.as_secs_f64());
}

/// Counts a build reaching a final state.
pub fn build_finished(outcome: &'static str) {
    metrics::counter!(BUILDS_FINISHED, "outcome" => outcome).increment(1);
}
