//! P9: the event stream. Latency from a committed change to a connected SSE client under the P3 load,
//! and the database work that 200 open subscribers add (none expected: one read per instance per
//! wake-up, subscribers read memory).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use expo_controller::queue::Platform;
use expo_controller::queue::operator::set_paused;
use sqlx::PgPool;
use tokio::sync::mpsc;

use crate::scenarios::{self, Shared};
use crate::setup::API_KEY;
use crate::stats::Samples;

/// Opens an SSE subscription and forwards the arrival time of every event frame.
async fn subscribe(shared: &Shared, query: &str) -> anyhow::Result<mpsc::UnboundedReceiver<Instant>> {
    let (client, controller) = &**shared;
    let mut response = client
        .get(controller.url(&format!("/api/v2/events{query}")))
        .header("X-API-Key", API_KEY)
        .timeout(Duration::from_secs(600))
        .send()
        .await?;
    anyhow::ensure!(response.status() == 200, "subscribe: {}", response.status());
    let (arrivals, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(chunk)) = response.chunk().await {
            let now = Instant::now();
            let frames = chunk.windows(6).filter(|w| *w == b"event:").count();
            for _ in 0..frames {
                if arrivals.send(now).is_err() {
                    return;
                }
            }
        }
    });
    Ok(received)
}

/// One real state change (the android queue paused or resumed, through the queue layer): returns
/// when it was sent, so that `arrival - sent` bounds commit → client from above.
async fn change(pool: &PgPool, paused: bool) -> anyhow::Result<Instant> {
    let sent = Instant::now();
    set_paused(
        pool,
        Platform::Android,
        paused,
        Utc::now(),
        &expo_controller::audit::Actor::cli(),
    )
    .await?;
    Ok(sent)
}

/// P9: `probes` changes, one at a time, while the P3 lifecycle load runs; latency to the client.
pub async fn latency_under_load(shared: &Shared, pool: &PgPool, probes: usize) -> anyhow::Result<Samples> {
    let mut arrivals = subscribe(shared, "?kind=queue.*").await?;
    let load = {
        let shared = shared.clone();
        tokio::spawn(async move { scenarios::lifecycles(&shared, Duration::from_secs(6)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut samples = Samples::default();
    for n in 0..probes {
        let sent = change(pool, n % 2 == 0).await?;
        match tokio::time::timeout(Duration::from_secs(5), arrivals.recv()).await {
            Ok(Some(arrived)) => samples.push(arrived.saturating_duration_since(sent)),
            _ => anyhow::bail!("probe {n} never reached the client"),
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    set_paused(
        pool,
        Platform::Android,
        false,
        Utc::now(),
        &expo_controller::audit::Actor::cli(),
    )
    .await?;
    let _ = load.await?;
    Ok(samples)
}

/// Transactions committed or rolled back in this database so far (statistics flushed first).
pub async fn transactions(pool: &PgPool) -> anyhow::Result<i64> {
    // Backends flush their statistics at most once a second.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await?;
    Ok(sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut *conn)
    .await?)
}

/// Database transactions per second while 100 changes happen over ~3 s, with `subscribers` open
/// streams; also how many events the subscribers received in all.
async fn load_with(shared: &Shared, pool: &PgPool, subscribers: usize) -> anyhow::Result<(f64, u64)> {
    let received = Arc::new(AtomicU64::new(0));
    let mut streams = Vec::new();
    for _ in 0..subscribers {
        let mut arrivals = subscribe(shared, "").await?;
        let received = received.clone();
        streams.push(tokio::spawn(async move {
            while arrivals.recv().await.is_some() {
                received.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let before = transactions(pool).await?;
    let started = Instant::now();
    for n in 0..100 {
        change(pool, n % 2 == 0).await?;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let elapsed = started.elapsed();
    // Let the last events reach every subscriber before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = transactions(pool).await?;
    for stream in streams {
        stream.abort();
    }
    // The statistics read itself is one transaction per call: not the controller's.
    let controller_and_probes = (after - before - 2).max(0) as f64;
    Ok((
        controller_and_probes / elapsed.as_secs_f64(),
        received.load(Ordering::Relaxed),
    ))
}

/// P9b: database transactions/s with 0 and with `subscribers` open streams, same change rate.
pub async fn subscriber_load(shared: &Shared, pool: &PgPool, subscribers: usize) -> anyhow::Result<(f64, f64, u64)> {
    let (without, _) = load_with(shared, pool, 0).await?;
    let (with, received) = load_with(shared, pool, subscribers).await?;
    set_paused(
        pool,
        Platform::Android,
        false,
        Utc::now(),
        &expo_controller::audit::Actor::cli(),
    )
    .await?;
    Ok((without, with, received))
}
