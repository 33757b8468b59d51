//! F1–F3 (scheduling.md): fair share between submitters, measured on the claim itself.
//! F1: submitters of weights 1, 1 and 2 keep their queues full; 4 workers run builds of equal length,
//! then 1 worker whose builds end at once; each submitter's share of claims against weight ÷ total.
//! F2: claim latency over HTTP with 1,000,000 builds in `builds`, 10,000 queued from 1,000 submitters.
//! F3: a list page of 50 queued builds with waiting reasons over HTTP, on F2's data.

use std::collections::HashMap;
use std::time::Instant;

use chrono::Utc;
use expo_controller::config::QueueConfig;
use expo_controller::queue::{self, Holder, Platform, RegisterRequest, ResultFile, Worker};
use serde_json::Value;
use sqlx::PgPool;

use crate::scenarios::Shared;
use crate::setup::{API_KEY, insert_finished, insert_workers};
use crate::stats::{Row, Samples, ms};

const WEIGHTS: [(&str, i32); 3] = [("a", 1), ("b", 1), ("c", 2)];
const CLAIMS: usize = 400;

fn tag() -> String {
    expo_controller::ids::new_id()[..6].to_string()
}

/// Submitter keys with weights; returns their ids in `WEIGHTS` order.
async fn keys(pool: &PgPool, tag: &str) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for (name, weight) in WEIGHTS {
        let id = format!("f1-{tag}-{name}");
        sqlx::query(
            "INSERT INTO api_keys (id, name, role, prefix, secret_hash, created_at, weight)
             VALUES ($1, $1, 'submitter', 'bench', sha256($1::bytea), now(), $2)",
        )
        .bind(&id)
        .bind(weight)
        .execute(pool)
        .await?;
        ids.push(id);
    }
    Ok(ids)
}

async fn fill(pool: &PgPool, prefix: &str, submitter: &str, count: i64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO builds (id, state, queue, run_at, submitted_at, source_key, source_size, submitted_by)
         SELECT $1 || g, 'pending', 'ios', now() - interval '1 minute', now(), 'builds/' || $1 || g || '/source.zip', 1, $3
         FROM generate_series(1, $2) g",
    )
    .bind(prefix)
    .bind(count)
    .bind(submitter)
    .execute(pool)
    .await?;
    Ok(())
}

async fn worker(pool: &PgPool, name: &str) -> anyhow::Result<Worker> {
    let request = RegisterRequest {
        registered_by: None,
        id: None,
        name: name.to_string(),
        capabilities: serde_json::json!({}),
        platforms: vec![Platform::Ios],
        caller_worker: None,
    };
    Ok(queue::register(pool, &request, &QueueConfig::default(), Utc::now())
        .await?
        .worker)
}

async fn finish(pool: &PgPool, w: &Worker, claim: &queue::Claim) -> anyhow::Result<()> {
    let id = &claim.build.id;
    let result = ResultFile {
        key: format!("builds/{id}/result-f1.bin"),
        size: 1,
        sha256: "00".into(),
    };
    let token = claim.build.lease_token.unwrap_or_default();
    queue::record_writes(pool, &[result.key.as_str()]).await?;
    queue::complete(pool, id, Holder::attempt(&w.id, token), &result, Utc::now()).await?;
    Ok(())
}

/// Shares of `CLAIMS` claims with `workers` workers (builds of equal length: they end in the order
/// they started); returns the largest relative deviation from weight ÷ total and the shares.
async fn shares(pool: &PgPool, workers: usize) -> anyhow::Result<(f64, String)> {
    // Only this run's submitters have queued builds (the previous run leaves its queues full).
    sqlx::query("UPDATE builds SET state = 'cancelled', completed_at = now() WHERE state IN ('pending', 'scheduled', 'retryable')")
        .execute(pool)
        .await?;
    let tag = tag();
    let ids = keys(pool, &tag).await?;
    for (n, id) in ids.iter().enumerate() {
        fill(pool, &format!("f1-{tag}-{n}-"), id, CLAIMS as i64).await?;
    }
    let settings = QueueConfig::default();
    let mut pool_of = Vec::new();
    for n in 0..workers {
        pool_of.push(worker(pool, &format!("f1-{tag}-w{n}")).await?);
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut running: Vec<Option<queue::Claim>> = (0..workers).map(|_| None).collect();
    for n in 0..CLAIMS {
        let slot = n % workers;
        if let Some(claim) = running[slot].take() {
            finish(pool, &pool_of[slot], &claim).await?;
        }
        let Some(claim) = queue::claim(pool, &pool_of[slot], &settings, Utc::now()).await? else {
            anyhow::bail!("F1: no build for a worker while every queue is full");
        };
        *counts
            .entry(claim.build.submitted_by.clone().unwrap_or_default())
            .or_default() += 1;
        if workers == 1 {
            finish(pool, &pool_of[slot], &claim).await?;
        } else {
            running[slot] = Some(claim);
        }
    }
    for (slot, claim) in running.into_iter().enumerate() {
        if let Some(claim) = claim {
            finish(pool, &pool_of[slot], &claim).await?;
        }
    }
    let total: i32 = WEIGHTS.iter().map(|(_, w)| w).sum();
    let mut worst: f64 = 0.0;
    let mut shown = Vec::new();
    for ((name, weight), id) in WEIGHTS.iter().zip(&ids) {
        let expected = f64::from(*weight) / f64::from(total);
        let got = counts.get(id).copied().unwrap_or(0) as f64 / CLAIMS as f64;
        worst = worst.max((got - expected).abs() / expected);
        shown.push(format!("{name}(w{weight}) {:.1} %", got * 100.0));
    }
    Ok((worst, shown.join(", ")))
}

pub async fn f1(pool: &PgPool) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (id, workers) in [("F1", 4usize), ("F1s", 1)] {
        let (worst, shown) = shares(pool, workers).await?;
        eprintln!("{id} {shown} (worst {:.1} %)", worst * 100.0);
        rows.push(Row {
            id,
            scenario: format!("fair share, weights 1/1/2, {workers} worker(s), {CLAIMS} claims"),
            figure: shown,
            reference: "25 / 25 / 50 %".into(),
            ratio: format!("worst {:.1} % off", worst * 100.0),
            latency: "-".into(),
            target: "each within ±10 % of its weight share",
            met: worst <= 0.10,
        });
    }
    Ok(rows)
}

/// F2 and F3 on one data set: 1,000,000 builds of history, 10,000 queued from 1,000 submitters.
pub async fn f2_f3(shared: &Shared, pool: &PgPool, f2: bool, f3: bool) -> anyhow::Result<Vec<Row>> {
    let tag = tag();
    insert_finished(pool, &format!("f2h-{tag}-"), 1_000_000 - 10_000).await?;
    sqlx::query(
        "INSERT INTO api_keys (id, name, role, prefix, secret_hash, created_at, weight)
         SELECT $1 || g, $1 || g, 'submitter', 'bench', sha256(($1 || g)::bytea), now(), 1 + g % 3
         FROM generate_series(1, 1000) g",
    )
    .bind(format!("f2k-{tag}-"))
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO builds (id, state, queue, run_at, submitted_at, source_key, source_size, submitted_by)
         SELECT $1 || g, 'pending', 'ios', now() - interval '1 hour' + g * interval '1 ms', now(),
                'builds/' || $1 || g || '/source.zip', 1, $2 || (1 + g % 1000)
         FROM generate_series(1, 10000) g",
    )
    .bind(format!("f2q-{tag}-"))
    .bind(format!("f2k-{tag}-"))
    .execute(pool)
    .await?;
    sqlx::query("VACUUM ANALYZE builds").execute(pool).await?;
    sqlx::query("ANALYZE submitter_shares").execute(pool).await?;
    let workers = insert_workers(pool, &format!("f2w-{tag}-"), 400, "ios").await?;
    let mut rows = Vec::new();
    if f2 {
        rows.push(f2_claims(shared, workers).await?);
    }
    if f3 {
        rows.push(f3_list_page(shared).await?);
    }
    Ok(rows)
}

/// F2: 400 claims over HTTP (400 workers, each polling once).
async fn f2_claims(shared: &Shared, workers: Vec<(String, String)>) -> anyhow::Result<Row> {
    let (client, controller) = &**shared;
    let mut samples = Samples::default();
    let started = Instant::now();
    for (id, _) in workers {
        let t = Instant::now();
        let body: Value = client
            .get(controller.url("/api/workers/poll"))
            .query(&[("worker_id", &id)])
            .header("X-API-Key", API_KEY)
            .send()
            .await?
            .json()
            .await?;
        if body["job"]["id"].is_string() {
            samples.push(t.elapsed());
        }
    }
    eprintln!("F2 {} in {:?}", samples.summary(), started.elapsed());
    let (p50, p99) = (samples.percentile(0.5), samples.percentile(0.99));
    Ok(Row {
        id: "F2",
        scenario: format!(
            "claim over HTTP, 1M builds, 10,000 queued from 1,000 submitters ({} claims)",
            samples.0.len()
        ),
        figure: format!("p50 {} / p99 {}", ms(p50), ms(p99)),
        reference: "-".into(),
        ratio: "-".into(),
        latency: samples.summary(),
        target: "p50 ≤ 2 ms, p99 ≤ 10 ms",
        met: samples.0.len() >= 390
            && p50 <= std::time::Duration::from_millis(2)
            && p99 <= std::time::Duration::from_millis(10),
    })
}

/// F3: a list page of 50 queued builds with their waiting reasons and positions (scheduling.md: ≤ 20 ms
/// at 1,000,000 rows), over HTTP.
async fn f3_list_page(shared: &Shared) -> anyhow::Result<Row> {
    const PAGES: usize = 100;
    let (client, controller) = &**shared;
    let mut samples = Samples::default();
    for n in 0..=PAGES {
        let t = Instant::now();
        let body: Value = client
            .get(controller.url("/api/v2/builds"))
            .query(&[("state", "pending"), ("limit", "50")])
            .header("X-API-Key", API_KEY)
            .send()
            .await?
            .json()
            .await?;
        let took = t.elapsed();
        let items = body["items"].as_array().map_or(0, Vec::len);
        let ranked = body["items"]
            .as_array()
            .map_or(0, |items| items.iter().filter(|b| b["position"].is_i64()).count());
        anyhow::ensure!(
            items == 50 && ranked == 50,
            "F3: {items} items, {ranked} with a position"
        );
        // The first page warms the connection and the plans.
        if n > 0 {
            samples.push(took);
        }
    }
    eprintln!("F3 {}", samples.summary());
    let p50 = samples.percentile(0.5);
    Ok(Row {
        id: "F3",
        scenario: "list page of 50 queued builds with waiting reasons, 1M builds, 10,000 queued".into(),
        figure: format!("p50 {} / p99 {}", ms(p50), ms(samples.percentile(0.99))),
        reference: "-".into(),
        ratio: "-".into(),
        latency: samples.summary(),
        target: "p50 ≤ 20 ms",
        met: p50 <= std::time::Duration::from_millis(20),
    })
}
