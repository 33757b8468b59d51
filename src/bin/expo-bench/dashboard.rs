//! D1–D3: dashboard pages rendered over HTTP with 1,000,000 builds of history (performance.md: the
//! overview and the builds page ≤ 100 ms at p95; indexes, no full scans, no count over the table).

use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::scenarios::Shared;
use crate::setup::API_KEY;
use crate::stats::Samples;

/// A month of history: `count` finished builds (85 % completed, 10 % failed, 5 % cancelled) spread
/// evenly over 30 days across 50 workers, plus 500 pending builds.
pub async fn history(pool: &PgPool, count: i64) -> anyhow::Result<()> {
    sqlx::query("TRUNCATE builds, submitter_shares CASCADE")
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO builds (id, state, queue, run_at, submitted_at, started_at, completed_at, attempt, worker_id,
                             finished_reason, error_message, source_key, source_size)
         SELECT 'd1-' || g, s.state, CASE WHEN g % 2 = 0 THEN 'ios' ELSE 'android' END,
                t.at, t.at, t.at + interval '1 minute', t.at + interval '9 minutes', 1, 'dash-worker-' || (g % 50),
                CASE s.state WHEN 'completed' THEN 'completed' WHEN 'failed' THEN 'build_failure' ELSE 'cancelled' END,
                CASE WHEN s.state = 'failed' THEN 'xcodebuild exited with 65' END,
                'builds/d1-' || g || '/source.zip', 1
         FROM generate_series(1, $1) g
         CROSS JOIN LATERAL (SELECT now() - interval '30 days' * (g::float8 / $1) - interval '10 minutes' AS at) t
         CROSS JOIN LATERAL (SELECT CASE WHEN g % 20 = 0 THEN 'cancelled' WHEN g % 10 = 0 THEN 'failed'
                                         ELSE 'completed' END AS state) s",
    )
    .bind(count)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO builds (id, state, queue, run_at, submitted_at, source_key, source_size)
         SELECT 'd1p-' || g, 'pending', CASE WHEN g % 2 = 0 THEN 'ios' ELSE 'android' END, now(), now(),
                'builds/d1p-' || g || '/source.zip', 1
         FROM generate_series(1, 500) g",
    )
    .execute(pool)
    .await?;
    sqlx::query("VACUUM ANALYZE builds").execute(pool).await?;
    sqlx::query("CHECKPOINT").execute(pool).await?;
    Ok(())
}

/// Signs in to the dashboard; returns the session cookie (`name=value`).
pub async fn sign_in(shared: &Shared) -> anyhow::Result<String> {
    let controller = &shared.1;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let r = client
        .post(controller.url("/dashboard/login"))
        .header("Origin", &controller.base)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("key={API_KEY}"))
        .send()
        .await?;
    anyhow::ensure!(r.status() == 303, "dashboard sign-in answered {}", r.status());
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .ok_or_else(|| anyhow::anyhow!("no session cookie"))?;
    Ok(cookie.to_string())
}

/// Renders `path` `count` times, one at a time (after 5 warm-up renders); the latency of each.
pub async fn render(shared: &Shared, cookie: &str, path: &str, count: usize) -> anyhow::Result<Samples> {
    let (client, controller) = &**shared;
    let mut samples = Samples::default();
    for i in 0..count + 5 {
        let started = Instant::now();
        let r = client.get(controller.url(path)).header("cookie", cookie).send().await?;
        anyhow::ensure!(r.status() == 200, "{path} answered {}", r.status());
        let body = r.bytes().await?;
        anyhow::ensure!(body.len() > 1000, "{path}: a short page");
        if i >= 5 {
            samples.push(started.elapsed());
        }
    }
    Ok(samples)
}

/// The last id on the first page of `state`, for a second-page (cursor) render.
pub async fn cursor(pool: &PgPool) -> anyhow::Result<String> {
    let id: String = sqlx::query_scalar(
        "SELECT id FROM (SELECT id, submitted_at FROM builds WHERE state = 'failed'
                         ORDER BY submitted_at DESC, id DESC LIMIT 50) p ORDER BY submitted_at, id LIMIT 1",
    )
    .fetch_one(pool)
    .await?;
    Ok(id)
}

pub const TARGET: Duration = Duration::from_millis(100);

/// The regions every open dashboard re-fetches after an event (as htmx does).
const FRAGMENTS: [&str; 4] = [
    "/dashboard?fragment=1",
    "/dashboard/builds?fragment=1",
    "/dashboard/workers?fragment=1",
    "/dashboard/queues?fragment=1",
];

/// D4: database transactions per event with `viewers` open dashboards: in each of 5 rounds every viewer
/// re-fetches every region at once, as after an event. Rounds are spaced past the read cache's TTL
/// (`CONTROLLER_DASHBOARD_CACHE_MS`, 1 s by default), so each round reads afresh.
pub async fn transactions_per_event(
    shared: &Shared,
    pool: &PgPool,
    cookie: &str,
    viewers: usize,
) -> anyhow::Result<f64> {
    const ROUNDS: usize = 5;
    let before = crate::events::transactions(pool).await?;
    for _ in 0..ROUNDS {
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        let mut fetches = Vec::new();
        for _ in 0..viewers {
            for path in FRAGMENTS {
                let (shared, cookie) = (shared.clone(), cookie.to_string());
                fetches.push(tokio::spawn(async move {
                    let (client, controller) = &*shared;
                    let r = client
                        .get(controller.url(path))
                        .header("cookie", cookie)
                        .header("hx-request", "true")
                        .send()
                        .await?;
                    anyhow::ensure!(r.status() == 200, "{path} answered {}", r.status());
                    r.bytes().await?;
                    anyhow::Ok(())
                }));
            }
        }
        for fetch in fetches {
            fetch.await??;
        }
    }
    let after = crate::events::transactions(pool).await?;
    Ok((after - before) as f64 / ROUNDS as f64)
}
