//! W1 (issue #24): webhook deliveries under the P12 load. One P12 run with no subscription, one with
//! 1 and one with 10 subscriptions (each to `build.completed` and `build.failed`, what a submitter's CI
//! listens to) to a healthy receiver on loopback in this process: the delivery latency from the
//! event's commit (its `at`) to the receiver, p50/p99 (W1a: 1 subscription, W1: 10), and what the
//! subscriptions cost per build (controller and PostgreSQL CPU, builds/s; W1c), also as a share of
//! the P12 run without them (issue #25's budget: ≤ 10 %).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::scenarios::Shared;
use crate::setup::{self, API_KEY, Controller, Env};
use crate::stats::{Row, Samples};

const SUBSCRIPTIONS: usize = 10;

type Received = Arc<Mutex<Samples>>;

async fn receive(State(received): State<Received>, body: Bytes) -> StatusCode {
    let at = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["at"].as_str().and_then(|a| DateTime::parse_from_rfc3339(a).ok()));
    if let (Some(at), Ok(mut samples)) = (at, received.lock()) {
        let latency = (Utc::now() - at.with_timezone(&Utc)).to_std().unwrap_or_default();
        samples.push(latency);
    }
    StatusCode::NO_CONTENT
}

pub async fn w1(env: &Env, client: &reqwest::Client) -> anyhow::Result<Vec<Row>> {
    let secs = std::env::var("BENCH_W1_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10u64);
    let port = setup::http_port() + 5;
    let received: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = format!("http://{}/hook", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(received.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let mut measured = Vec::new();
    for subscriptions in [0, 1, SUBSCRIPTIONS] {
        crate::drain(&env.pool).await?;
        sqlx::query("DELETE FROM webhook_subscriptions")
            .execute(&env.pool)
            .await?;
        let extra = [("CONTROLLER_WEBHOOK_ALLOW_PRIVATE", "true".to_string())];
        let (controller, _) = Controller::launch_with(env, client, port, &extra).await?;
        for _ in 0..subscriptions {
            let r = client
                .post(controller.url("/api/v2/webhooks"))
                .header("X-API-Key", API_KEY)
                .json(&json!({ "url": hook, "events": ["build.completed", "build.failed"] }))
                .send()
                .await?;
            anyhow::ensure!(r.status() == 201, "subscription refused: {}", r.text().await?);
        }
        if let Ok(mut samples) = received.lock() {
            *samples = Samples::default();
        }
        let shared: Shared = Arc::new((client.clone(), controller));
        let (rate, controller_ms, postgres_ms) = crate::cycle::one_run(&shared, env, secs).await?;
        // Every delivery of the run reaches the receiver before the latencies are read.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while std::time::Instant::now() < deadline {
            let open: i64 =
                sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE state IN ('pending', 'delivering')")
                    .fetch_one(&env.pool)
                    .await?;
            if open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Failed attempts (retries are the latency tail) are named before the database is drained.
        let failures: Vec<(String, i64)> = sqlx::query_as(
            "SELECT left(coalesce(error, 'no error'), 160), count(*) FROM webhook_attempts GROUP BY 1 ORDER BY 2 DESC LIMIT 5",
        )
        .fetch_all(&env.pool)
        .await?;
        for (error, count) in failures {
            eprintln!("W1 {subscriptions} subscriptions: {count} failed attempts: {error}");
        }
        let samples = received.lock().map(|s| s.clone()).unwrap_or_default();
        eprintln!(
            "W1 {subscriptions} subscriptions: {rate:.0} builds/s, controller {controller_ms:.2} ms/build, \
             PostgreSQL {postgres_ms:.2} ms/build, {} deliveries, p50/p95/p99 {}",
            samples.0.len(),
            samples.summary()
        );
        measured.push((subscriptions, rate, controller_ms, postgres_ms, samples));
        drop(shared);
        sqlx::query("DELETE FROM webhook_subscriptions")
            .execute(&env.pool)
            .await?;
    }
    server.abort();
    crate::drain(&env.pool).await?;
    let [
        (_, rate0, cpu0, pg0, _),
        (_, _, _, _, one),
        (_, rate10, cpu10, pg10, samples),
    ] = &measured[..]
    else {
        anyhow::bail!("W1 measured {} runs", measured.len());
    };
    let latency_row = |id: &'static str, n: usize, samples: &Samples| {
        let p99 = samples.percentile(0.99);
        Row {
            id,
            scenario: format!(
                "webhook delivery, commit → healthy loopback receiver, under the P12 load ({n} subscription(s) to build.completed/failed; {} deliveries)",
                samples.0.len()
            ),
            figure: format!("p99 {}", crate::stats::ms(p99)),
            reference: "-".into(),
            ratio: "-".into(),
            latency: samples.summary(),
            target: "p99 ≤ 1 s",
            met: !samples.0.is_empty() && p99 <= Duration::from_secs(1),
        }
    };
    let base = cpu0 + pg0;
    let extra = (cpu10 + pg10) - base;
    Ok(vec![
        latency_row("W1a", 1, one),
        latency_row("W1", SUBSCRIPTIONS, samples),
        Row {
            id: "W1c",
            scenario: format!(
                "cost per build, 0 → {SUBSCRIPTIONS} subscriptions: controller CPU {cpu0:.2} → {cpu10:.2} ms/build, \
                 PostgreSQL CPU {pg0:.2} → {pg10:.2} ms/build, {rate0:.0} → {rate10:.0} builds/s ({:.0} %)",
                100.0 * rate10 / rate0.max(1e-9)
            ),
            figure: format!("+{extra:.2} ms CPU/build"),
            reference: "P12 CPU/build (0 subscriptions)".into(),
            ratio: format!("{:.1} % of P12", 100.0 * extra / base.max(1e-9)),
            latency: "-".into(),
            target: "≤ 10 % of P12 (#25)",
            met: extra <= 0.1 * base,
        },
    ])
}
