//! Fleet health (fleet-health.md): leases survive the controller's own outages.

use std::time::{Duration, Instant};

use expo_controller::config::Config;
use expo_controller::server;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::resilience::{OwnPostgres, storage};
use crate::support::{API_KEY, TestApp, config, state_of, success_form, worker_status};

/// Lease 4 s, the rescue, offline and promotion sweeps every second, retries after 1 s.
fn short_leases(cfg: &mut Config) {
    cfg.queue.lease_timeout_secs = 4;
    cfg.queue.backoff_base_secs = 1;
    cfg.queue.backoff_cap_secs = 1;
    cfg.jobs.offline_after_secs = 6;
    cfg.jobs.job_schedules =
        "rescue_expired_leases=* * * * * *;offline_workers=* * * * * *;promote_scheduled=* * * * * *".to_string();
}

async fn register(client: &reqwest::Client, base: &str, name: &str) -> (String, String) {
    let body: Value = client
        .post(format!("{base}/api/workers/register"))
        .header("X-API-Key", API_KEY)
        .json(&json!({ "name": name, "capabilities": { "platforms": ["ios"] } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        body["id"].as_str().unwrap().to_string(),
        body["access_token"].as_str().unwrap().to_string(),
    )
}

async fn submit(client: &reqwest::Client, base: &str) -> String {
    let form = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(b"s".to_vec()).file_name("a.zip"));
    let body: Value = client
        .post(format!("{base}/api/builds/submit"))
        .header("X-API-Key", API_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["id"].as_str().unwrap().to_string()
}

/// A token poll; the build id handed out, if any.
async fn poll(client: &reqwest::Client, base: &str, token: &str) -> Option<String> {
    let body: Value = client
        .get(format!("{base}/api/workers/poll"))
        .header("X-Worker-Token", token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["job"]["id"].as_str().map(str::to_string)
}

async fn heartbeat(client: &reqwest::Client, base: &str, token: &str, build: &str) -> u16 {
    client
        .post(format!("{base}/api/builds/{build}/heartbeat"))
        .header("X-Worker-Token", token)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn complete(client: &reqwest::Client, base: &str, worker: &str, build: &str) {
    let r = client
        .post(format!("{base}/api/workers/upload"))
        .header("X-API-Key", API_KEY)
        .multipart(success_form(build, worker, b"app"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "completing {build}");
}

async fn wait_ready(client: &reqwest::Client, base: &str, limit: Duration) {
    let started = Instant::now();
    while client
        .get(format!("{base}/ready"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
        != 200
    {
        assert!(started.elapsed() < limit, "{base} not ready within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `build` leaves `building`; returns how long that took.
async fn until_rescued(pool: &PgPool, build: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let state: String = state_of(pool, build).await;
        if state != "building" {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{build} not rescued within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn attempts(pool: &PgPool, build: &str) -> Vec<(i32, Option<String>)> {
    sqlx::query_as("SELECT attempt, outcome FROM build_attempts WHERE build_id = $1 ORDER BY attempt")
        .bind(build)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// The reproduction of the issue (lease 4 s, PostgreSQL stopped 10 s), as a small chaos run: three
/// workers keep building through the outage and one vanishes. Afterwards the three keep their attempts
/// (0 rescued, 0 run twice), the vanished one's build is rescued one lease timeout after recovery and
/// runs elsewhere (0 lost).
#[tokio::test]
async fn a_database_outage_longer_than_the_lease_rescues_nothing_alive_and_loses_nothing() {
    let postgres = OwnPostgres::start();
    let mut cfg = config(&postgres.url(), storage(&postgres.dir));
    cfg.db.db_statement_timeout_ms = 5_000;
    short_leases(&mut cfg);
    cfg.jobs.offline_after_secs = 30;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = server::start(cfg, Some(listener), true).await.unwrap();
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    wait_ready(&client, &base, Duration::from_secs(10)).await;

    let mut workers = Vec::new();
    for n in 0..4 {
        workers.push(register(&client, &base, &format!("mac{n}")).await);
    }
    let mut builds = Vec::new();
    for _ in 0..4 {
        builds.push(submit(&client, &base).await);
    }
    let mut held = Vec::new();
    for (_, token) in &workers {
        let build = poll(&client, &base, token).await.expect("a build for every worker");
        assert_eq!(heartbeat(&client, &base, token, &build).await, 200);
        held.push(build);
    }
    // Let the controller stamp its contact after the claims.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    postgres.down();
    tokio::time::sleep(Duration::from_secs(10)).await;
    postgres.up();
    wait_ready(&client, &base, Duration::from_secs(20)).await;
    // The rescue sweep runs every second; the workers heartbeat within their interval (2 s < lease).
    tokio::time::sleep(Duration::from_millis(2000)).await;
    for n in 0..3 {
        assert_eq!(
            heartbeat(&client, &base, &workers[n].1, &held[n]).await,
            200,
            "worker {n} kept its lease through the outage"
        );
    }
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&postgres.url())
        .await
        .unwrap();
    // The vanished worker's build is still rescued, one lease timeout after recovery.
    let vanished = &held[3];
    let heartbeat_loop = async {
        let until = Instant::now() + Duration::from_secs(8);
        while Instant::now() < until {
            for n in 0..3 {
                assert_eq!(heartbeat(&client, &base, &workers[n].1, &held[n]).await, 200);
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    };
    let (_, waited) = tokio::join!(heartbeat_loop, until_rescued(&pool, vanished, Duration::from_secs(12)));
    let since_recovery = Duration::from_secs(2) + waited;
    assert!(
        since_recovery >= Duration::from_secs(3) && since_recovery <= Duration::from_secs(9),
        "rescued {since_recovery:?} after recovery (lease 4 s)"
    );
    for n in 0..3 {
        let state: String = state_of(&pool, &held[n]).await;
        assert_eq!(state, "building", "build {n} was not rescued");
        complete(&client, &base, &workers[n].0, &held[n]).await;
    }
    // The rescued build runs elsewhere and completes: nothing lost.
    let deadline = Instant::now() + Duration::from_secs(15);
    let rerun = loop {
        if let Some(build) = poll(&client, &base, &workers[0].1).await {
            break build;
        }
        assert!(Instant::now() < deadline, "the rescued build came back");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(&rerun, vanished);
    complete(&client, &base, &workers[0].0, vanished).await;
    for (n, build) in held.iter().enumerate() {
        let state: String = state_of(&pool, build).await;
        assert_eq!(state, "completed", "build {n}");
        let tries = attempts(&pool, build).await;
        if n < 3 {
            assert_eq!(tries, vec![(1, Some("completed".to_string()))], "build {n} ran once");
        } else {
            assert_eq!(tries.len(), 2, "the vanished worker's build ran again: {tries:?}");
            assert_eq!(tries[1].1.as_deref(), Some("completed"));
        }
    }
    pool.close().await;
    running.stop().await;
    let _ = std::fs::remove_dir_all(storage(&postgres.dir));
}

/// No instance runs for longer than the lease timeout and the offline window: after a restart the
/// heartbeating worker keeps its build, the idle worker stays online, the vanished one is rescued.
#[tokio::test]
async fn every_instance_down_longer_than_the_lease_rescues_only_vanished_workers() {
    let mut app = TestApp::spawn_with(short_leases).await;
    let client = app.client.clone();
    let (_, alive_token) = register(&client, &app.base, "alive").await;
    let (_, gone_token) = register(&client, &app.base, "gone").await;
    let (idle, idle_token) = register(&client, &app.base, "idle").await;
    let (a, v) = (submit(&client, &app.base).await, submit(&client, &app.base).await);
    let got_a = poll(&client, &app.base, &alive_token).await.unwrap();
    let got_v = poll(&client, &app.base, &gone_token).await.unwrap();
    assert_eq!((got_a.as_str(), got_v.as_str()), (a.as_str(), v.as_str()));
    assert_eq!(heartbeat(&client, &app.base, &alive_token, &a).await, 200);
    assert_eq!(heartbeat(&client, &app.base, &gone_token, &v).await, 200);
    assert_eq!(poll(&client, &app.base, &idle_token).await, None);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    app.stop().await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut cfg = config(&app.database_url, app.storage_dir.clone());
    short_leases(&mut cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = server::start(cfg, Some(listener), false).await.unwrap();
    let base = format!("http://{}", running.addr);
    wait_ready(&client, &base, Duration::from_secs(10)).await;
    // Several rescue and offline ticks pass before the workers' next heartbeat and poll.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        worker_status(&app.pool, &idle).await,
        "idle",
        "the idle worker is not offline"
    );
    assert_eq!(heartbeat(&client, &base, &alive_token, &a).await, 200, "lease kept");
    assert_eq!(poll(&client, &base, &idle_token).await, None);
    let heartbeats = async {
        let until = Instant::now() + Duration::from_secs(7);
        while Instant::now() < until {
            assert_eq!(heartbeat(&client, &base, &alive_token, &a).await, 200);
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    };
    tokio::join!(heartbeats, until_rescued(&app.pool, &v, Duration::from_secs(10)));
    assert_eq!(state_of(&app.pool, &a).await, "building");
    assert_eq!(attempts(&app.pool, &a).await, vec![(1, None)]);
    running.stop().await;
}
