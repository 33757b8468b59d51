//! The scenarios P1–P7 of performance.md and the SQL references they are compared with. Every loop
//! is bounded in count and time and targets loopback only.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::setup::{API_KEY, Controller, insert_finished, insert_pending, insert_workers};
use crate::stats::Samples;

pub type Shared = Arc<(reqwest::Client, Controller)>;

/// Runs `clients` copies of `statement` for `duration`; returns statements per second.
pub async fn raw_rate(
    pool: &PgPool,
    statement: &'static str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let stop = Instant::now() + duration;
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (pool, count) = (pool.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                if sqlx::query(statement).execute(&pool).await.is_err() {
                    break;
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / duration.as_secs_f64())
}

/// The claim statement alone, as the raw reference for P2 (on a pre-filled table).
pub const RAW_CLAIM: &str = "UPDATE builds SET state = 'assigned', attempt = attempt + 1, lease_owner = 'raw-' || id,
        worker_id = 'raw', lease_token = nextval('lease_token_seq'), lease_expires_at = now() + interval '5 minutes'
    WHERE id = (SELECT id FROM builds WHERE state = 'pending' AND queue = 'ios' AND run_at <= now()
                ORDER BY priority DESC, run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING id";

/// An indexed `SELECT … FOR UPDATE SKIP LOCKED` that finds nothing: the raw reference for P1.
pub const RAW_EMPTY_SELECT: &str = "SELECT id FROM builds WHERE state IN ('pending', 'scheduled', 'retryable')
    AND queue = 'android' AND run_at <= now() ORDER BY priority DESC, run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED";

/// P1: empty polls by 64 token workers for `duration`.
pub async fn empty_polls(shared: &Shared, pool: &PgPool, duration: Duration) -> anyhow::Result<(f64, Samples)> {
    let workers = insert_workers(pool, "p1-", 64, "android").await?;
    let stop = Instant::now() + duration;
    let mut tasks = Vec::new();
    for (_, token) in workers {
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let (client, controller) = &*shared;
            let url = controller.url("/api/workers/poll");
            let mut samples = Samples::default();
            while Instant::now() < stop {
                let t = Instant::now();
                let r = client.get(&url).header("X-Worker-Token", &token).send().await;
                if let Ok(r) = r
                    && r.status() == 200
                    && r.bytes().await.is_ok()
                {
                    samples.push(t.elapsed());
                }
            }
            samples
        }));
    }
    let mut all = Samples::default();
    for t in tasks {
        all.extend(t.await?);
    }
    Ok((all.0.len() as f64 / duration.as_secs_f64(), all))
}

/// P1k: 64 workers bound to a stored `worker` key; returns their ids and that key's secret. The same
/// workers poll with the built-in admin key and with this key, so the two differ only in the key.
pub async fn g0_worker_key(pool: &PgPool) -> anyhow::Result<(Vec<String>, String)> {
    let workers = insert_workers(pool, "p1k-", 64, "android").await?;
    let new = expo_controller::identity::NewKey {
        name: Some("bench worker key".into()),
        role: Some("worker".into()),
        ..Default::default()
    };
    let (stored, secret) = expo_controller::identity::create(
        pool,
        &new,
        Default::default(),
        chrono::Utc::now(),
        &expo_controller::audit::Actor::cli(),
    )
    .await?;
    let ids: Vec<String> = workers.into_iter().map(|w| w.0).collect();
    sqlx::query("UPDATE workers SET registered_by = $1 WHERE id = ANY($2)")
        .bind(&stored.id)
        .bind(&ids)
        .execute(pool)
        .await?;
    Ok((ids, secret))
}

/// P1k: G0 empty polls (`X-API-Key` + `?worker_id=`) by `workers` for `duration` with `key` (the built-in
/// admin key or their stored worker key): what key look-ups and the worker binding cost. Returns the
/// answered polls per second, the controller's CPU microseconds per poll, and the latencies.
pub async fn empty_polls_g0(
    shared: &Shared,
    workers: &[String],
    key: &str,
    duration: Duration,
) -> anyhow::Result<(f64, f64, Samples)> {
    let cpu_before = shared.1.cpu_secs();
    let stop = Instant::now() + duration;
    let mut tasks = Vec::new();
    for id in workers {
        let shared = shared.clone();
        let (id, key) = (id.clone(), key.to_string());
        tasks.push(tokio::spawn(async move {
            let (client, controller) = &*shared;
            let url = controller.url("/api/workers/poll");
            let mut samples = Samples::default();
            while Instant::now() < stop {
                let t = Instant::now();
                let r = client
                    .get(&url)
                    .query(&[("worker_id", &id)])
                    .header("X-API-Key", &key)
                    .send()
                    .await;
                if let Ok(r) = r
                    && r.status() == 200
                    && r.bytes().await.is_ok()
                {
                    samples.push(t.elapsed());
                }
            }
            samples
        }));
    }
    let mut all = Samples::default();
    for t in tasks {
        all.extend(t.await?);
    }
    let polls = all.0.len() as f64;
    let cpu_us = if polls > 0.0 {
        (shared.1.cpu_secs() - cpu_before) * 1e6 / polls
    } else {
        0.0
    };
    Ok((polls / duration.as_secs_f64(), cpu_us, all))
}

/// P2: claims over HTTP from a pre-filled queue, 32 concurrent pollers, each worker claiming once.
pub async fn http_claims(shared: &Shared, pool: &PgPool, duration: Duration) -> anyhow::Result<(f64, Samples)> {
    const PER_TASK: usize = 800;
    insert_pending(pool, "p2-", 32 * PER_TASK as i64, "android").await?;
    let workers = insert_workers(pool, "p2w-", 32 * PER_TASK, "android").await?;
    let started = Instant::now();
    let stop = started + duration;
    let mut tasks = Vec::new();
    for chunk in workers.chunks(PER_TASK) {
        let shared = shared.clone();
        let ids: Vec<String> = chunk.iter().map(|w| w.0.clone()).collect();
        tasks.push(tokio::spawn(async move {
            let (client, controller) = &*shared;
            let url = controller.url("/api/workers/poll");
            let mut samples = Samples::default();
            for id in ids {
                if Instant::now() >= stop {
                    break;
                }
                let t = Instant::now();
                let r = client
                    .get(&url)
                    .query(&[("worker_id", &id)])
                    .header("X-API-Key", API_KEY)
                    .send()
                    .await;
                let Ok(r) = r else { continue };
                let body: Value = r.json().await.unwrap_or(Value::Null);
                if body["job"]["id"].is_string() {
                    samples.push(t.elapsed());
                }
            }
            samples
        }));
    }
    let mut all = Samples::default();
    for t in tasks {
        all.extend(t.await?);
    }
    let elapsed = started.elapsed().min(duration).as_secs_f64();
    Ok((all.0.len() as f64 / elapsed, all))
}

fn small_submit() -> Form {
    Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(vec![7u8; 2048]).file_name("app.zip"))
}

/// P3: full lifecycles with 32 workers and 8 submitters for `duration`.
pub async fn lifecycles(shared: &Shared, duration: Duration) -> anyhow::Result<(f64, Samples)> {
    let (client, controller) = &**shared;
    let mut tokens = Vec::new();
    for n in 0..32 {
        let body: Value = client
            .post(controller.url("/api/workers/register"))
            .header("X-API-Key", API_KEY)
            .json(&json!({ "name": format!("p3-{n}"), "capabilities": { "platforms": ["ios"] } }))
            .send()
            .await?
            .json()
            .await?;
        tokens.push(body["access_token"].as_str().unwrap_or_default().to_string());
    }
    let started = Instant::now();
    let stop = started + duration;
    let running = Arc::new(AtomicBool::new(true));
    let mut submitters = Vec::new();
    for _ in 0..8 {
        let (shared, running) = (shared.clone(), running.clone());
        submitters.push(tokio::spawn(async move {
            let (client, controller) = &*shared;
            while running.load(Ordering::Relaxed) {
                let _ = client
                    .post(controller.url("/api/builds/submit"))
                    .header("X-API-Key", API_KEY)
                    .multipart(small_submit())
                    .send()
                    .await;
            }
        }));
    }
    let mut workers = Vec::new();
    for token in tokens {
        let shared = shared.clone();
        workers.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            while Instant::now() < stop {
                let t = Instant::now();
                if lifecycle_once(&shared, &token).await.unwrap_or(false) {
                    samples.push(t.elapsed());
                }
            }
            samples
        }));
    }
    let mut all = Samples::default();
    for w in workers {
        all.extend(w.await?);
    }
    running.store(false, Ordering::Relaxed);
    for s in submitters {
        s.await?;
    }
    Ok((all.0.len() as f64 / duration.as_secs_f64(), all))
}

/// One build's life on a worker: claim, source, 2 heartbeats, 5 log lines, result, status.
async fn lifecycle_once(shared: &Shared, token: &str) -> anyhow::Result<bool> {
    let (client, controller) = &**shared;
    let poll: Value = client
        .get(controller.url("/api/workers/poll?wait=1"))
        .header("X-Worker-Token", token)
        .send()
        .await?
        .json()
        .await?;
    let Some(id) = poll["job"]["id"].as_str() else {
        return Ok(false);
    };
    let build = |path: &str| controller.url(&format!("/api/builds/{id}/{path}"));
    client
        .get(build("source"))
        .header("X-Worker-Token", token)
        .send()
        .await?
        .bytes()
        .await?;
    for progress in [30, 60] {
        client
            .post(build("heartbeat"))
            .header("X-Worker-Token", token)
            .json(&json!({ "progress": progress }))
            .send()
            .await?
            .bytes()
            .await?;
    }
    let lines: Vec<Value> = (0..5)
        .map(|n| json!({ "level": "info", "message": format!("step {n}") }))
        .collect();
    client
        .post(build("logs"))
        .header("X-Worker-Token", token)
        .json(&json!({ "logs": lines }))
        .send()
        .await?
        .bytes()
        .await?;
    let form = Form::new()
        .text("build_id", id.to_string())
        .text("success", "true")
        .part("result", Part::bytes(vec![1u8; 4096]).file_name("app.ipa"));
    let r = client
        .post(controller.url("/api/workers/upload"))
        .header("X-Worker-Token", token)
        .multipart(form)
        .send()
        .await?;
    let ok = r.status() == 200;
    r.bytes().await?;
    client
        .get(build("status"))
        .header("X-API-Key", API_KEY)
        .send()
        .await?
        .bytes()
        .await?;
    Ok(ok)
}

/// P4: submit-accepted → job-delivered latency with 200 long-polling workers.
pub async fn pickup_latency(shared: &Shared, pool: &PgPool, builds: usize) -> anyhow::Result<Samples> {
    let workers = insert_workers(pool, "p4-", 200, "android").await?;
    let delivered = Arc::new(std::sync::Mutex::new(
        std::collections::HashMap::<String, Instant>::new(),
    ));
    let running = Arc::new(AtomicBool::new(true));
    let mut tasks = Vec::new();
    for (_, token) in workers {
        let (shared, delivered, running) = (shared.clone(), delivered.clone(), running.clone());
        tasks.push(tokio::spawn(async move {
            let (client, controller) = &*shared;
            while running.load(Ordering::Relaxed) {
                let Ok(r) = client
                    .get(controller.url("/api/workers/poll?wait=2"))
                    .header("X-Worker-Token", &token)
                    .send()
                    .await
                else {
                    continue;
                };
                let Ok(body) = r.json::<Value>().await else { continue };
                let Some(id) = body["job"]["id"].as_str() else { continue };
                if let Ok(mut map) = delivered.lock() {
                    map.insert(id.to_string(), Instant::now());
                }
                let _ = client
                    .post(controller.url("/api/workers/fail"))
                    .header("X-Worker-Token", &token)
                    .json(&json!({ "build_id": id, "error_message": "bench" }))
                    .send()
                    .await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await; // all 200 are waiting
    let (client, controller) = &**shared;
    let mut accepted = Vec::new();
    for _ in 0..builds {
        let form = Form::new()
            .text("platform", "android")
            .part("source", Part::bytes(vec![7u8; 512]).file_name("a.zip"));
        let body: Value = client
            .post(controller.url("/api/builds/submit"))
            .header("X-API-Key", API_KEY)
            .multipart(form)
            .send()
            .await?
            .json()
            .await?;
        accepted.push((body["id"].as_str().unwrap_or_default().to_string(), Instant::now()));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.store(false, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let delivered = delivered.lock().map(|m| m.clone()).unwrap_or_default();
    let mut samples = Samples::default();
    for (id, at) in accepted {
        if let Some(got) = delivered.get(&id) {
            samples.push(got.saturating_duration_since(at));
        }
    }
    Ok(samples)
}

fn gib_stream(bytes: u64) -> reqwest::Body {
    const CHUNK: usize = 256 * 1024;
    let chunk = Bytes::from(vec![0x5au8; CHUNK]);
    let count = bytes.div_ceil(CHUNK as u64);
    reqwest::Body::wrap_stream(futures_util::stream::iter(
        (0..count).map(move |_| Ok::<Bytes, std::io::Error>(chunk.clone())),
    ))
}

pub async fn claim_and_upload(shared: &Shared, token: &str, bytes: u64) -> anyhow::Result<String> {
    let (client, controller) = &**shared;
    let poll: Value = client
        .get(controller.url("/api/workers/poll"))
        .header("X-Worker-Token", token)
        .send()
        .await?
        .json()
        .await?;
    let id = poll["job"]["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no job to upload for"))?
        .to_string();
    let part = Part::stream_with_length(gib_stream(bytes), bytes).file_name("big.ipa");
    let form = Form::new()
        .text("build_id", id.clone())
        .text("success", "true")
        .part("result", part);
    let r = client
        .post(controller.url("/api/workers/upload"))
        .header("X-Worker-Token", token)
        .multipart(form)
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "upload failed: {}", r.status());
    Ok(id)
}

/// P5a: RSS growth (KiB) while one 1 GiB result is uploaded and another downloaded at once.
pub async fn big_transfers(shared: &Shared, pool: &PgPool) -> anyhow::Result<u64> {
    const GIB: u64 = 1 << 30;
    let workers = insert_workers(pool, "p5-", 2, "ios").await?;
    insert_pending(pool, "p5b-", 2, "ios").await?;
    let first = claim_and_upload(shared, &workers[0].1, GIB).await?;
    let peak = PeakRss::start(shared);
    let upload = claim_and_upload(shared, &workers[1].1, GIB);
    let (up, down) = tokio::join!(upload, download_owned(shared, &first, GIB));
    up?;
    down?;
    peak.growth_kib().await
}

/// Samples the controller's RSS every 20 ms from its start until [`PeakRss::growth_kib`].
pub struct PeakRss {
    baseline: u64,
    peak: Arc<AtomicU64>,
    sampling: Arc<AtomicBool>,
    sampler: tokio::task::JoinHandle<()>,
}

impl PeakRss {
    pub fn start(shared: &Shared) -> PeakRss {
        let (baseline, _) = shared.1.rss_kib();
        let peak = Arc::new(AtomicU64::new(baseline));
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (shared, peak, sampling) = (shared.clone(), peak.clone(), sampling.clone());
            tokio::spawn(async move {
                while sampling.load(Ordering::Relaxed) {
                    peak.fetch_max(shared.1.rss_kib().0, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        PeakRss {
            baseline,
            peak,
            sampling,
            sampler,
        }
    }

    /// Stops sampling: the peak's growth over the baseline, in KiB.
    pub async fn growth_kib(self) -> anyhow::Result<u64> {
        self.sampling.store(false, Ordering::Relaxed);
        self.sampler.await?;
        Ok(self.peak.load(Ordering::Relaxed).saturating_sub(self.baseline))
    }
}

/// The owner's download of build `id`'s result through the controller, checked to be `bytes` long.
pub async fn download_owned(shared: &Shared, id: &str, bytes: u64) -> anyhow::Result<()> {
    let (client, controller) = &**shared;
    let r = client
        .get(controller.url(&format!("/api/builds/{id}/download")))
        .header("X-API-Key", API_KEY)
        .send()
        .await?;
    let mut stream = r.bytes_stream();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        total += chunk?.len() as u64;
    }
    anyhow::ensure!(total == bytes, "downloaded {total} bytes through the controller");
    Ok(())
}

/// P5b: RSS growth (KiB) with 2,000 idle long polls held open.
pub async fn idle_long_polls(pool: &PgPool, controller_url: String, rss: impl Fn() -> u64) -> anyhow::Result<u64> {
    let workers = insert_workers(pool, "p5i-", 2000, "android").await?;
    sqlx::query("UPDATE queues SET paused = true WHERE name = 'android'")
        .execute(pool)
        .await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()?;
    let baseline = rss();
    let mut tasks = Vec::new();
    for (_, token) in workers {
        let (client, url) = (client.clone(), format!("{controller_url}/api/workers/poll?wait=8"));
        tasks.push(tokio::spawn(async move {
            client
                .get(url)
                .header("X-Worker-Token", token)
                .send()
                .await
                .map(|r| r.status())
        }));
    }
    let mut peak = baseline;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss());
    }
    for t in tasks {
        let _ = t.await?;
    }
    sqlx::query("UPDATE queues SET paused = false WHERE name = 'android'")
        .execute(pool)
        .await?;
    Ok(peak.saturating_sub(baseline))
}

/// P6: claim latency over HTTP with `history` finished rows in `builds` (p50 of `claims` claims).
pub async fn claim_latency_at(
    shared: &Shared,
    pool: &PgPool,
    label: &str,
    history: i64,
    claims: usize,
) -> anyhow::Result<Samples> {
    if history > 0 {
        insert_finished(pool, &format!("{label}h-"), history).await?;
    }
    insert_pending(pool, &format!("{label}q-"), claims as i64, "ios").await?;
    let workers = insert_workers(pool, &format!("{label}w-"), claims, "ios").await?;
    let (client, controller) = &**shared;
    let mut samples = Samples::default();
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
    Ok(samples)
}
