//! Fleet health (fleet-health.md): leases survive the controller's own outages.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use expo_controller::config::{Config, QueueConfig};
use expo_controller::queue::{self, Failure, FailureKind, Holder, Platform, ResultFile, Worker};
use expo_controller::server;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::resilience::{OwnPostgres, storage};
use crate::support::{
    API_KEY, TestApp, config, enqueue, fresh_database, state_of, success_form, worker, worker_status,
};

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

// ---------- reputation, quarantine, retry elsewhere ----------

async fn support_worker(pool: &PgPool, name: &str) -> Worker {
    worker(pool, name, &[Platform::Ios]).await
}

/// The operator CLI in database mode; its stdout (stderr on failure).
fn support_cli(app: &TestApp, args: &[&str]) -> String {
    let (group, rest) = args.split_first().expect("a command group");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_expo-controller"))
        .env_remove("CONTROLLER_URL")
        .env_remove("CONTROLLER_API_KEY")
        .args([*group, "--table", "--database-url", &app.database_url])
        .args(rest)
        .output()
        .unwrap();
    let text = if output.status.success() {
        output.stdout
    } else {
        output.stderr
    };
    String::from_utf8_lossy(&text).into_owned()
}

fn result_file(id: &str) -> ResultFile {
    ResultFile {
        key: format!("builds/{id}/result-x.bin"),
        size: 1,
        sha256: "00".into(),
    }
}

fn infra(message: &str) -> Failure {
    Failure {
        kind: FailureKind::Infrastructure,
        message: message.to_string(),
    }
}

/// Claims for `worker` at `at` and fails the attempt as an infrastructure failure; the build's id.
async fn claim_and_break(pool: &PgPool, worker: &Worker, settings: &QueueConfig, at: DateTime<Utc>) -> String {
    let claim = queue::claim(pool, worker, settings, at)
        .await
        .unwrap()
        .expect("a build for the worker");
    let id = claim.build.id.clone();
    queue::fail(pool, &id, Holder::worker(&worker.id), &infra("VM hung"), settings, at)
        .await
        .unwrap();
    id
}

/// Whole seconds, rounded (stored times have micro- or millisecond precision).
fn secs(d: chrono::Duration) -> i64 {
    (d.num_milliseconds() as f64 / 1000.0).round() as i64
}

async fn worker_json(app: &TestApp, id: &str) -> Value {
    app.admin_json(&format!("/api/v2/workers/{id}")).await
}

/// Three infrastructure failures in the last five attempts quarantine the worker in the transaction of
/// the third (event, metric, API); after the quarantine it is on probation; a relapse doubles the
/// quarantine; a completed build clears it; a critical diagnostics report quarantines until a healthy
/// one; an operator releases it.
#[tokio::test]
async fn infrastructure_failures_quarantine_a_worker_until_probation_or_release() {
    let app = TestApp::spawn().await;
    let pool = &app.pool;
    let settings = QueueConfig::default();
    let bad = support_worker(pool, "imac").await;
    // Simulated time starts a little ahead, so builds enqueued now are due.
    let t0 = Utc::now() + chrono::Duration::seconds(10);
    for n in 0..3 {
        assert_eq!(worker_json(&app, &bad.id).await["health"], "ok", "before failure {n}");
        enqueue(pool, Platform::Ios, 0, 1).await;
        claim_and_break(pool, &bad, &settings, t0 + chrono::Duration::seconds(n)).await;
    }
    let shown = worker_json(&app, &bad.id).await;
    assert_eq!(shown["health"], "quarantined", "{shown}");
    assert!(
        shown["quarantine_reason"]
            .as_str()
            .unwrap()
            .contains("3 infrastructure failures in its last 3 attempts")
    );
    let until = chrono::DateTime::parse_from_rfc3339(shown["quarantined_until"].as_str().unwrap()).unwrap();
    assert_eq!(secs(until.to_utc() - t0), 3600 + 2);
    let event: Value =
        sqlx::query_scalar("SELECT data FROM events WHERE kind = 'worker.quarantined' AND worker_id = $1")
            .bind(&bad.id)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(event["failures"].as_array().unwrap().len(), 3, "{event}");
    assert_eq!(event["failures"][0]["message"], "VM hung");
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("expo_workers{status=\"quarantined\"} 1"), "{metrics}");
    let output = support_cli(&app, &["workers", "show", &bad.id]);
    assert!(output.contains("quarantined (quarantine until"), "{output}");

    // Quarantined: no new build, even with one waiting.
    let waiting = enqueue(pool, Platform::Ios, 0, 3).await;
    let during = t0 + chrono::Duration::seconds(600);
    assert!(queue::claim(pool, &bad, &settings, during).await.unwrap().is_none());

    // Probation after the quarantine: it may take a build; a relapse quarantines it twice as long.
    let probation = t0 + chrono::Duration::seconds(3603);
    assert_eq!(claim_and_break(pool, &bad, &settings, probation).await, waiting);
    let until: DateTime<Utc> = sqlx::query_scalar("SELECT quarantined_until FROM workers WHERE id = $1")
        .bind(&bad.id)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(secs(until - probation), 7200);
    assert!(
        queue::claim(pool, &bad, &settings, probation + chrono::Duration::seconds(7000))
            .await
            .unwrap()
            .is_none()
    );

    // On probation again, a completed build clears the record.
    let later = probation + chrono::Duration::seconds(7201);
    let claim = queue::claim(pool, &bad, &settings, later)
        .await
        .unwrap()
        .expect("probation");
    queue::complete(
        pool,
        &claim.build.id,
        Holder::worker(&bad.id),
        &result_file(&claim.build.id),
        later,
    )
    .await
    .unwrap();
    let health: (String, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT health, quarantined_until FROM workers WHERE id = $1")
            .bind(&bad.id)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(health, ("ok".to_string(), None));
    // Its record starts over: two more failures do not quarantine it.
    for n in 0..2 {
        enqueue(pool, Platform::Ios, 0, 1).await;
        claim_and_break(pool, &bad, &settings, later + chrono::Duration::seconds(n + 1)).await;
    }
    assert_eq!(worker_json(&app, &bad.id).await["health"], "ok");

    // A critical diagnostics report quarantines it until a healthy one.
    let report = |status: &str| {
        json!({ "worker_id": bad.id, "status": status, "duration_ms": 5,
                "checks": [{ "name": "disk", "status": status }, { "name": "vm", "status": "ok" }] })
    };
    let post = |body: Value| {
        app.client
            .post(app.url("/api/diagnostics/report"))
            .header("X-API-Key", API_KEY)
            .json(&body)
            .send()
    };
    assert_eq!(post(report("critical")).await.unwrap().status(), 200);
    let shown = worker_json(&app, &bad.id).await;
    assert_eq!(
        (
            &shown["health"],
            &shown["quarantined_until"],
            &shown["quarantine_reason"]
        ),
        (
            &json!("quarantined"),
            &Value::Null,
            &json!("critical diagnostics report: disk")
        )
    );
    let now = Utc::now();
    let next = enqueue(pool, Platform::Ios, 0, 3).await;
    assert!(queue::claim(pool, &bad, &settings, now).await.unwrap().is_none());
    assert_eq!(post(report("warning")).await.unwrap().status(), 200);
    assert_eq!(worker_json(&app, &bad.id).await["health"], "ok");

    // An operator's release, over the API and from the CLI.
    assert_eq!(post(report("critical")).await.unwrap().status(), 200);
    let released = app
        .client
        .post(app.url(&format!("/api/v2/workers/{}/release", bad.id)))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), 200);
    let released: Value = released.json().await.unwrap();
    assert_eq!(
        (&released["health"], &released["quarantine_reason"]),
        (&json!("ok"), &Value::Null)
    );
    let claim = queue::claim(pool, &bad, &settings, Utc::now())
        .await
        .unwrap()
        .expect("released");
    assert_eq!(claim.build.id, next);
    let kinds: Vec<String> = sqlx::query_scalar(
        "SELECT kind FROM events WHERE worker_id = $1 AND kind IN ('worker.quarantined', 'worker.released') ORDER BY id",
    )
    .bind(&bad.id)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        kinds,
        [
            "worker.quarantined",
            "worker.quarantined",
            "worker.quarantined",
            "worker.released",
            "worker.quarantined",
            "worker.released"
        ]
    );
    assert_eq!(post(report("critical")).await.unwrap().status(), 200);
    let output = support_cli(&app, &["workers", "release", &bad.id]);
    assert!(output.contains("health") && output.contains(" ok"), "{output}");
    assert_eq!(worker_json(&app, &bad.id).await["health"], "ok");
    let missing = app
        .client
        .post(app.url("/api/v2/workers/nope/release"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

/// A build whose attempt ended in an infrastructure failure is not handed back to that worker while
/// another matching worker is online; with none online, it is.
#[tokio::test]
async fn a_broken_attempt_is_retried_elsewhere_while_another_worker_is_online() {
    let (_, pool) = fresh_database(4).await;
    let settings = QueueConfig::default();
    let (a, b) = (support_worker(&pool, "a").await, support_worker(&pool, "b").await);
    let build = enqueue(&pool, Platform::Ios, 0, 3).await;
    let t = Utc::now();
    assert_eq!(claim_and_break(&pool, &a, &settings, t).await, build);
    let retry_at = t + chrono::Duration::seconds(120);
    assert!(
        queue::claim(&pool, &a, &settings, retry_at).await.unwrap().is_none(),
        "not handed back to the worker it broke on"
    );
    assert!(
        queue::held_back_by_requeue(&pool, &a.id, &settings, retry_at)
            .await
            .unwrap()
    );
    let claim = queue::claim(&pool, &b, &settings, retry_at)
        .await
        .unwrap()
        .expect("b takes it");
    assert_eq!(claim.build.id, build);
    queue::fail(
        &pool,
        &build,
        Holder::worker(&b.id),
        &infra("lid closed"),
        &settings,
        retry_at,
    )
    .await
    .unwrap();
    // b broke it too, and a is the only other worker; once a goes offline, b may take it back.
    let again = retry_at + chrono::Duration::seconds(120);
    sqlx::query("UPDATE workers SET status = 'offline' WHERE id = $1")
        .bind(&a.id)
        .execute(&pool)
        .await
        .unwrap();
    let claim = queue::claim(&pool, &b, &settings, again)
        .await
        .unwrap()
        .expect("no one else online");
    assert_eq!(claim.build.id, build);
}

/// One bad worker among four in simulated time: it fails every attempt at once and polls first; the
/// good ones fail one attempt in ten. At least 99 % of retries land on another worker than the one the
/// build broke on, the bad one is quarantined within its first 5 attempts, and no build runs out of
/// attempts.
#[tokio::test]
async fn one_bad_worker_among_four_retries_land_elsewhere() {
    let (_, pool) = fresh_database(4).await;
    let settings = QueueConfig::default();
    let bad = support_worker(&pool, "bad").await;
    let mut good = Vec::new();
    for n in 0..3 {
        good.push(support_worker(&pool, &format!("good{n}")).await);
    }
    let mut broke_on: std::collections::HashMap<String, String> = Default::default();
    let (mut retries, mut elsewhere, mut bad_attempts_before_quarantine) = (0, 0, 0);
    let (mut quarantined, mut good_attempts) = (false, 0);
    let start = Utc::now() + chrono::Duration::seconds(5);
    for round in 0..120i64 {
        let t = start + chrono::Duration::seconds(round * 60);
        for _ in 0..2 {
            enqueue(&pool, Platform::Ios, 0, 3).await;
        }
        // The bad worker fails fast, so it polls three times a round, before the others.
        for k in 0..3 {
            let at = t + chrono::Duration::seconds(k);
            let Some(claim) = queue::claim(&pool, &bad, &settings, at).await.unwrap() else {
                continue;
            };
            if claim.build.attempt > 1 {
                retries += 1;
                if broke_on.get(&claim.build.id) != Some(&bad.id) {
                    elsewhere += 1;
                }
            }
            if !quarantined {
                bad_attempts_before_quarantine += 1;
            }
            queue::fail(
                &pool,
                &claim.build.id,
                Holder::worker(&bad.id),
                &infra("VM hung"),
                &settings,
                at,
            )
            .await
            .unwrap();
            broke_on.insert(claim.build.id.clone(), bad.id.clone());
            let health: String = sqlx::query_scalar("SELECT health FROM workers WHERE id = $1")
                .bind(&bad.id)
                .fetch_one(&pool)
                .await
                .unwrap();
            quarantined |= health == "quarantined";
        }
        for (n, worker) in good.iter().enumerate() {
            let at = t + chrono::Duration::seconds(10 + n as i64);
            let Some(claim) = queue::claim(&pool, worker, &settings, at).await.unwrap() else {
                continue;
            };
            if claim.build.attempt > 1 {
                retries += 1;
                if broke_on.get(&claim.build.id) != Some(&worker.id) {
                    elsewhere += 1;
                }
            }
            good_attempts += 1;
            if good_attempts % 10 == 0 {
                // Good Macs have bad moments too: their retries must also go elsewhere.
                queue::fail(
                    &pool,
                    &claim.build.id,
                    Holder::worker(&worker.id),
                    &infra("Wi-Fi lost"),
                    &settings,
                    at,
                )
                .await
                .unwrap();
                broke_on.insert(claim.build.id.clone(), worker.id.clone());
                continue;
            }
            queue::complete(
                &pool,
                &claim.build.id,
                Holder::worker(&worker.id),
                &result_file(&claim.build.id),
                at,
            )
            .await
            .unwrap();
        }
    }
    eprintln!(
        "{elsewhere} of {retries} retries elsewhere; bad worker quarantined after {bad_attempts_before_quarantine} attempts"
    );
    assert!(quarantined, "the bad worker was quarantined");
    assert!(
        bad_attempts_before_quarantine <= 5,
        "{bad_attempts_before_quarantine} attempts"
    );
    assert!(retries >= 30, "{retries} retries");
    assert!(
        elsewhere * 100 >= retries * 99,
        "{elsewhere} of {retries} retries landed on another worker"
    );
    let lost: i64 = sqlx::query_scalar("SELECT count(*) FROM builds WHERE state = 'failed'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(lost, 0, "no build ran out of attempts on the bad worker");
}

// ---------- giving a build back for its owner ----------

async fn abandon(app: &TestApp, token: &str, build: &str, reason: &str) -> (u16, Value) {
    let r = app
        .client
        .post(app.url("/api/workers/abandon"))
        .header("X-Worker-Token", token)
        .json(&json!({ "build_id": build, "reason": reason }))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// `owner_reclaimed` releases the attempt: pending again at the front of its queue (its run_at kept),
/// `attempt` counts it but `max_attempts` does not, no reputation damage, not handed back to that worker
/// while another is online; past `CONTROLLER_MAX_RELEASES` a release is an infrastructure failure.
#[tokio::test]
async fn owner_reclaimed_gives_a_build_back_without_spending_an_attempt() {
    let app = TestApp::spawn_with(|cfg| {
        cfg.queue.max_releases = 2;
        cfg.queue.quarantine_failures = 1;
        cfg.queue.quarantine_window = 1;
    })
    .await;
    let (mac, mac_token) = app.register("mac", &["ios"]).await;
    let (other, other_token) = app.register("other", &["ios"]).await;
    let first = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    let second = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    let run_at = |id: String| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, DateTime<Utc>>("SELECT run_at FROM builds WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let submitted_run_at = run_at(first.clone()).await;
    // max_attempts 1 would leave no retry after a failure: releases must not spend it.
    sqlx::query("UPDATE builds SET max_attempts = 1 WHERE id = $1")
        .bind(&first)
        .execute(&app.pool)
        .await
        .unwrap();

    assert_eq!(
        poll(&app.client, &app.base, &mac_token).await.as_deref(),
        Some(first.as_str())
    );
    assert_eq!(
        abandon(&app, &mac_token, &first, "owner_reclaimed").await,
        (200, json!({ "success": true, "status": "pending" }))
    );
    assert_eq!(state_of(&app.pool, &first).await, "pending");
    assert_eq!(run_at(first.clone()).await, submitted_run_at, "front of its queue");
    assert_eq!(worker_json(&app, &mac).await["health"], "ok", "no reputation damage");
    let event: Value = sqlx::query_scalar("SELECT data FROM events WHERE kind = 'build.released' AND build_id = $1")
        .bind(&first)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        (&event["reason"], &event["releases"]),
        (&json!("owner_reclaimed"), &json!(1))
    );
    // Not handed back to the Mac while another worker is online; the other one gets it before `second`.
    assert_eq!(
        poll(&app.client, &app.base, &mac_token).await.as_deref(),
        Some(second.as_str())
    );
    assert_eq!(
        poll(&app.client, &app.base, &other_token).await.as_deref(),
        Some(first.as_str())
    );
    // Released again by the other worker (release 2 of 2), then claimed and released a third time:
    // that one is an infrastructure failure, and with max_attempts 1 spent by none of the releases,
    // attempt 3 fails the build for good.
    assert_eq!(abandon(&app, &other_token, &first, "owner_reclaimed").await.0, 200);
    let (_, third_token) = app.register("third", &["ios"]).await;
    assert_eq!(
        poll(&app.client, &app.base, &third_token).await.as_deref(),
        Some(first.as_str())
    );
    let attempt: i32 = sqlx::query_scalar("SELECT attempt FROM builds WHERE id = $1")
        .bind(&first)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(attempt, 3, "attempt counts the releases");
    assert_eq!(
        abandon(&app, &third_token, &first, "owner_reclaimed").await,
        (200, json!({ "success": true, "status": "failed" }))
    );
    let outcomes: Vec<Option<String>> =
        sqlx::query_scalar("SELECT outcome FROM build_attempts WHERE build_id = $1 ORDER BY attempt")
            .bind(&first)
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        outcomes,
        [
            Some("released".to_string()),
            Some("released".to_string()),
            Some("infrastructure".to_string())
        ]
    );
    // A plain abandon is still an infrastructure failure (and, with a window of one, quarantines).
    assert_eq!(abandon(&app, &mac_token, &second, "disk full").await.0, 200);
    assert_eq!(worker_json(&app, &mac).await["health"], "quarantined");
    let _ = other;
}

// ---------- reconciliation: one test per invariant ----------

async fn reconcile_kind(pool: &PgPool, kind: &str) -> u64 {
    let found = queue::reconcile(pool, &QueueConfig::default(), Utc::now(), 100)
        .await
        .unwrap();
    let again = queue::reconcile(pool, &QueueConfig::default(), Utc::now(), 100)
        .await
        .unwrap();
    assert!(again.iter().all(|(_, n)| *n == 0), "repaired for good: {again:?}");
    let total: u64 = found.iter().map(|(_, n)| n).sum();
    let this = found.iter().find(|(k, _)| *k == kind).unwrap().1;
    assert_eq!(total, this, "only {kind}: {found:?}");
    this
}

#[tokio::test]
async fn reconcile_frees_a_busy_worker_without_a_build() {
    let (_, pool) = fresh_database(4).await;
    let (stuck, holding) = (
        support_worker(&pool, "stuck").await,
        support_worker(&pool, "holding").await,
    );
    enqueue(&pool, Platform::Ios, 0, 3).await;
    queue::claim(&pool, &holding, &QueueConfig::default(), Utc::now())
        .await
        .unwrap()
        .unwrap();
    sqlx::query("UPDATE workers SET status = 'busy' WHERE id = $1")
        .bind(&stuck.id)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(reconcile_kind(&pool, "busy_worker_without_attempt").await, 1);
    assert_eq!(worker_status(&pool, &stuck.id).await, "idle");
    assert_eq!(
        worker_status(&pool, &holding.id).await,
        "busy",
        "a worker holding a build stays busy"
    );
}

#[tokio::test]
async fn reconcile_closes_a_live_attempt_of_a_final_build() {
    let (_, pool) = fresh_database(4).await;
    let w = support_worker(&pool, "w").await;
    let running = enqueue(&pool, Platform::Ios, 0, 3).await;
    let done = enqueue(&pool, Platform::Ios, 0, 3).await;
    let settings = QueueConfig::default();
    let claim = queue::claim(&pool, &w, &settings, Utc::now()).await.unwrap().unwrap();
    assert_eq!(claim.build.id, running);
    queue::complete(
        &pool,
        &running,
        Holder::worker(&w.id),
        &result_file(&running),
        Utc::now(),
    )
    .await
    .unwrap();
    let claim = queue::claim(&pool, &w, &settings, Utc::now()).await.unwrap().unwrap();
    assert_eq!(claim.build.id, done);
    // A crash left the first build's attempt open although the build completed.
    sqlx::query("UPDATE build_attempts SET finished_at = NULL, outcome = NULL WHERE build_id = $1")
        .bind(&running)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(reconcile_kind(&pool, "live_attempt_of_idle_build").await, 1);
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM build_attempts WHERE finished_at IS NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(open, 1, "only the attempt really running stays open");
    let outcome: String = sqlx::query_scalar("SELECT outcome FROM build_attempts WHERE build_id = $1")
        .bind(&running)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(outcome, "reconciled");
}

#[tokio::test]
async fn reconcile_takes_a_build_back_from_a_revoked_worker() {
    let app = TestApp::spawn().await;
    let pool = &app.pool;
    let w = support_worker(pool, "revoked").await;
    let build = enqueue(pool, Platform::Ios, 0, 3).await;
    queue::claim(pool, &w, &QueueConfig::default(), Utc::now())
        .await
        .unwrap()
        .unwrap();
    // Revoked without its attempt ending (a crash between the two).
    sqlx::query("UPDATE workers SET admin_state = 'revoked' WHERE id = $1")
        .bind(&w.id)
        .execute(pool)
        .await
        .unwrap();
    let ctx = expo_controller::jobs::JobContext {
        pool: pool.clone(),
        storage: expo_controller::storage::Storage::local(&app.storage_dir, false).unwrap(),
        settings: QueueConfig::default(),
        jobs: Default::default(),
    };
    assert_eq!(
        expo_controller::jobs::Job::Reconcile
            .run_once(&ctx, Utc::now())
            .await
            .unwrap(),
        1,
        "the job runs the reconciliation"
    );
    assert_eq!(state_of(pool, &build).await, "retryable");
    let errors: Value = sqlx::query_scalar("SELECT errors FROM builds WHERE id = $1")
        .bind(&build)
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(
        errors[0]["message"].as_str().unwrap().contains("was revoked"),
        "{errors}"
    );
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("expo_reconciled_total{kind=\"build_held_by_revoked_worker\"}"),
        "{metrics}"
    );
    assert_eq!(reconcile_kind(pool, "build_held_by_revoked_worker").await, 0);
}

#[tokio::test]
async fn reconcile_clears_the_lease_of_a_pending_build() {
    let (_, pool) = fresh_database(4).await;
    let build = enqueue(&pool, Platform::Ios, 0, 3).await;
    sqlx::query("UPDATE builds SET lease_owner = 'ghost', lease_expires_at = now() + interval '1 hour' WHERE id = $1")
        .bind(&build)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(reconcile_kind(&pool, "queued_build_with_lease").await, 1);
    let lease: (Option<String>, Option<DateTime<Utc>>, String) =
        sqlx::query_as("SELECT lease_owner, lease_expires_at, state FROM builds WHERE id = $1")
            .bind(&build)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(lease, (None, None, "pending".to_string()));
    let w = support_worker(&pool, "w").await;
    let claim = queue::claim(&pool, &w, &QueueConfig::default(), Utc::now())
        .await
        .unwrap();
    assert_eq!(claim.map(|c| c.build.id), Some(build), "claimable as before");
}

/// The dashboard's workers page says why and until when a worker is quarantined, and its Release
/// button (same-origin + CSRF, like drain) releases it through the same operation as the API.
#[tokio::test]
async fn the_dashboard_shows_a_quarantine_and_releases_the_worker() {
    use crate::dashboard::{csrf_of, no_redirects, post_form, sign_in};
    let app = TestApp::spawn().await;
    let (id, _) = app.register("imac", &["ios"]).await;
    let r = app
        .client
        .post(app.url("/api/diagnostics/report"))
        .header("X-API-Key", API_KEY)
        .json(&json!({ "worker_id": id, "status": "critical", "duration_ms": 5,
                       "checks": [{ "name": "disk", "status": "critical" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let client = no_redirects();
    let cookie = sign_in(&app, &client).await;
    let page = client
        .get(app.url("/dashboard/workers"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("quarantined"), "{page}");
    assert!(
        page.contains("critical diagnostics report: disk"),
        "the reason is shown"
    );
    assert!(page.contains("until a healthy diagnostics report or a release"));
    let action = format!("/dashboard/workers/{id}/release");
    assert!(page.contains(&action), "a Release button");
    let csrf = csrf_of(&page);
    let forged = post_form(&client, &app, &action, Some(&cookie), "csrf=forged").await;
    assert_eq!(forged.status(), 403);
    assert_eq!(
        worker_json(&app, &id).await["health"],
        "quarantined",
        "a refused request changes nothing"
    );
    let r = post_form(&client, &app, &action, Some(&cookie), format!("csrf={csrf}")).await;
    assert_eq!(r.status(), 303);
    assert_eq!(worker_json(&app, &id).await["health"], "ok");
}
