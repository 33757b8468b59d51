//! One test per reviews.md finding that concerns the API and is not proven elsewhere (see
//! docs/review-findings.md for the full map).

use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::{Duration as ChronoDuration, Utc};
use expo_controller::jobs::{Job, JobContext};
use expo_controller::storage::Storage;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use crate::support::{API_KEY, TestApp, free_port, fresh_database, serve_command, success_form, wait_ready};
use crate::token_worker::submit_with_certs;

/// R7: no key, a short key → refuse to start, naming the variable.
#[tokio::test]
async fn r7_the_server_refuses_to_start_without_a_strong_key() {
    for (key, expected) in [
        (None, "CONTROLLER_API_KEY is not set"),
        (Some("short-key"), "CONTROLLER_API_KEY is too short"),
    ] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_expo-controller"));
        command
            .arg("serve")
            .env_remove("CONTROLLER_API_KEY")
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
            .env("CONTROLLER_CERTS_KEY", expo_controller::ids::new_key32())
            .env("CONTROLLER_LISTEN", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(key) = key {
            command.env("CONTROLLER_API_KEY", key);
        }
        let output = command.output().expect("run controller");
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
}

/// R39: the startup log names the real bound address (port 0 becomes a real port).
#[tokio::test]
async fn r39_startup_logs_the_bound_address() {
    let (url, _pool) = fresh_database(1).await;
    let storage = std::env::temp_dir().join(format!("expo-r39-{}", expo_controller::ids::new_id()));
    let mut child = serve_command(&url, &storage, 0, &expo_controller::ids::new_key32())
        .env("CONTROLLER_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("listening on"))
    });
    let line = tokio::time::timeout(Duration::from_secs(20), line)
        .await
        .unwrap()
        .unwrap()
        .expect("a listening line");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&storage);
    let record: Value = serde_json::from_str(&line).unwrap();
    let addr = record["fields"]["addr"].as_str().unwrap();
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "{addr}");
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    assert!(port > 0);
}

/// R9: an internal failure answers a generic 500 with a request id; no path or cause leaks.
#[tokio::test]
async fn r9_internal_errors_reveal_nothing() {
    let app = TestApp::spawn().await;
    // Break storage: the root becomes a plain file.
    std::fs::remove_dir_all(&app.storage_dir).unwrap();
    std::fs::write(&app.storage_dir, b"not a directory").unwrap();
    let form = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(b"s".to_vec()).file_name("a.zip"));
    let r = app.submit_form(form).await;
    assert_eq!(r.status(), 500);
    assert!(r.headers().contains_key("x-request-id"));
    let body = r.text().await.unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({ "error": "Internal server error" })
    );
    assert!(!body.contains("/tmp") && !body.contains("expo-test-storage"));
    std::fs::remove_file(&app.storage_dir).unwrap();
    assert_eq!(app.count("builds").await, 0);
}

/// R11: messages are cut at 8 KiB; past the per-build cap lines are counted, and one marker says how many.
#[tokio::test]
async fn r11_logs_are_bounded() {
    let app = TestApp::spawn_with(|c| c.max_log_lines = 10).await;
    let (worker_id, _) = app.register("w", &["ios"]).await;
    let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    app.poll(&worker_id).await; // writes one system line ("assigned")
    let post = |body: Value| {
        app.client
            .post(app.url(&format!("/api/builds/{id}/logs")))
            .header("X-API-Key", API_KEY)
            .header("X-Worker-Id", &worker_id)
            .json(&body)
            .send()
    };
    post(json!({ "level": "info", "message": "x".repeat(20_000) }))
        .await
        .unwrap();
    let batch: Vec<Value> = (0..20)
        .map(|n| json!({ "level": "info", "message": format!("line {n}") }))
        .collect();
    let r = post(json!({ "logs": batch })).await.unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({ "success": true, "count": 20, "stored": 8, "skipped": 12 })
    );
    post(json!({ "logs": [{ "level": "info", "message": "more" }] }))
        .await
        .unwrap();
    let logs: Value = app.admin_json(&format!("/api/builds/{id}/logs")).await;
    let logs = logs["logs"].as_array().unwrap();
    assert_eq!(logs.len(), 11, "10 lines + one marker");
    assert_eq!(logs[1]["message"].as_str().unwrap().len(), 8 * 1024);
    let markers: Vec<&Value> = logs
        .iter()
        .filter(|l| l["message"].as_str().unwrap().contains("dropped"))
        .collect();
    assert_eq!(markers.len(), 1);
    assert_eq!(
        markers[0]["message"],
        "Log limit of 10 lines reached: 13 later lines were dropped"
    );
}

/// R14: concurrent posters never collide on sequence numbers; counters are exact.
#[tokio::test]
async fn r14_counters_are_atomic() {
    let app = std::sync::Arc::new(TestApp::spawn().await);
    let (worker_id, _) = app.register("w", &["android"]).await;
    let id = app.submit("android", b"s").await["id"].as_str().unwrap().to_string();
    app.poll(&worker_id).await;
    let mut tasks = Vec::new();
    for n in 0..20 {
        let (app, id, worker_id) = (app.clone(), id.clone(), worker_id.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({ "logs": (0..5).map(|k| json!({ "level": "info", "message": format!("{n}-{k}") })).collect::<Vec<_>>() });
            let r = app.client.post(app.url(&format!("/api/builds/{id}/logs"))).header("X-API-Key", API_KEY).header("X-Worker-Id", &worker_id).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (lines, distinct, max_seq): (i64, i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT seq), max(seq) FROM build_logs WHERE build_id = $1")
            .bind(&id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((lines, distinct, max_seq), (101, 101, 101));
}

/// R19: `/api/stats` counts only today's completions (UTC) and serves real numbers.
#[tokio::test]
async fn r19_stats_are_real_with_a_utc_day_boundary() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("w", &["ios"]).await;
    for _ in 0..2 {
        let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
        app.poll(&worker_id).await;
        let form = success_form(&id, &worker_id, b"r");
        app.upload_form(form).await;
    }
    app.submit("ios", b"queued").await;
    // Move one completion to just before today's UTC midnight.
    let midnight = Utc::now().date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    sqlx::query("UPDATE builds SET completed_at = $1, started_at = $1 - interval '90 seconds' WHERE id = (SELECT id FROM builds WHERE state = 'completed' LIMIT 1)")
        .bind(midnight - ChronoDuration::seconds(1))
        .execute(&app.pool)
        .await
        .unwrap();
    let stats: Value = app
        .client
        .get(app.url("/api/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["buildsToday"], 1);
    assert_eq!(stats["totalBuilds"], 3);
    assert_eq!(stats["buildsQueued"], 1);
    assert_eq!(stats["activeBuilds"], 0);
    assert_eq!(stats["nodesOnline"], 1);
    assert!(stats["totalBuildTimeMs"].as_i64().unwrap() >= 90_000);
    assert!(stats["totalCpuCycles"].is_i64());
}

/// R20: past a limit, 429 with Retry-After; other clients are unaffected.
#[tokio::test]
async fn r20_rate_limits_answer_429_with_retry_after() {
    let app = TestApp::spawn_with(|c| {
        c.rate_limit_per_ip = 5;
        c.rate_limit_per_credential = 1000;
    })
    .await;
    let mut limited = None;
    for _ in 0..40 {
        let r = app.client.get(app.url("/health")).send().await.unwrap();
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("the per-IP limit was reached");
    assert!(r.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({ "error": "Too many requests" })
    );
    // Another source address is a different client.
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    assert_eq!(other.get(app.url("/health")).send().await.unwrap().status(), 200);
}

/// R20: one credential cannot exhaust the server for others.
#[tokio::test]
async fn r20_per_credential_limits() {
    let app = TestApp::spawn_with(|c| {
        c.rate_limit_per_ip = 0;
        c.rate_limit_per_credential = 3;
    })
    .await;
    let (worker_id, token) = app.register("w", &["ios"]).await;
    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(
            app.client
                .get(app.url("/api/workers/poll"))
                .header("X-Worker-Token", &token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    let r = app
        .client
        .get(app.url("/api/workers/poll"))
        .query(&[("worker_id", &worker_id)])
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "another credential still gets through");
}

/// R36: certs are encrypted at rest and deleted once the build is final.
#[tokio::test]
async fn r36_certs_are_encrypted_and_purged_at_the_final_state() {
    let app = TestApp::spawn().await;
    let id = submit_with_certs(&app).await;
    let path = app.storage_dir.join(format!("builds/{id}/certs.bin"));
    let sealed = std::fs::read(&path).unwrap();
    assert!(!sealed.windows(6).any(|w| w == b"RAWP12"), "no plaintext at rest");
    let ctx = JobContext {
        pool: app.pool.clone(),
        storage: Storage::local(&app.storage_dir, false).unwrap(),
        settings: Default::default(),
        jobs: Default::default(),
    };
    assert_eq!(
        Job::PurgeCerts.run_once(&ctx, Utc::now()).await.unwrap(),
        0,
        "kept while the build can run"
    );
    app.client
        .post(app.url(&format!("/api/builds/{id}/cancel")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(Job::PurgeCerts.run_once(&ctx, Utc::now()).await.unwrap(), 1);
    assert!(!path.exists());
    let key: Option<String> = sqlx::query_scalar("SELECT certs_key FROM builds WHERE id = $1")
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(key, None);
    assert_eq!(
        Job::PurgeCerts.run_once(&ctx, Utc::now()).await.unwrap(),
        0,
        "idempotent"
    );
}

/// R38: a result deleted before or during a download: a clean 404, or a cleanly ended stream, and the
/// server keeps serving.
#[tokio::test]
async fn r38_downloads_survive_a_deleted_file() {
    let app = TestApp::spawn_with(|c| c.max_result_bytes = 64 * 1024 * 1024).await;
    let (worker_id, _) = app.register("w", &["android"]).await;
    let id = app.submit("android", b"s").await["id"].as_str().unwrap().to_string();
    app.poll(&worker_id).await;
    let big = vec![42u8; 16 * 1024 * 1024];
    let form = success_form(&id, &worker_id, &big);
    assert_eq!(app.upload_form(form).await.status(), 200);
    let key: String = sqlx::query_scalar("SELECT result_key FROM builds WHERE id = $1")
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let file = app.storage_dir.join(&key);

    let mut response = app
        .client
        .get(app.url(&format!("/api/builds/{id}/download")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().unwrap();
    assert!(!first.is_empty());
    std::fs::remove_file(&file).unwrap();
    let mut received = first.len();
    while let Ok(Some(chunk)) = response.chunk().await {
        received += chunk.len();
    }
    assert!(received <= 16 * 1024 * 1024);

    let r = app
        .client
        .get(app.url(&format!("/api/builds/{id}/download")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.json::<Value>().await.unwrap()),
        (404, json!({ "error": "Build result not found" }))
    );
    assert_eq!(app.client.get(app.url("/health")).send().await.unwrap().status(), 200);
}

/// R23: structured logs — every line inside a request carries its request id, build id and worker id.
#[tokio::test]
async fn r23_request_logs_carry_request_build_and_worker_ids() {
    use std::io::{BufRead, BufReader};
    let (url, _pool) = fresh_database(1).await;
    let storage = std::env::temp_dir().join(format!("expo-r23-{}", expo_controller::ids::new_id()));
    let port = free_port();
    let mut child = serve_command(&url, &storage, port, &expo_controller::ids::new_key32())
        .env("CONTROLLER_LOG_FORMAT", "json")
        .env("CONTROLLER_RUN_JOBS", "false")
        .env("RUST_LOG", "info,tower_http=debug")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await;
    let form = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(b"s".to_vec()).file_name("a.zip"));
    let submitted: Value = client
        .post(format!("{base}/api/builds/submit"))
        .header("X-API-Key", API_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = submitted["id"].as_str().unwrap().to_string();
    let r = client
        .get(format!("{base}/api/builds/{id}/status"))
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", "wkr-1")
        .send()
        .await
        .unwrap();
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let stdout = child.stdout.take().unwrap();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&storage);
    let line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
        .find(|record| record["span"]["request_id"] == request_id.as_str())
        .expect("a log line of that request");
    assert_eq!(line["span"]["build_id"], id.as_str());
    assert_eq!(line["span"]["worker_id"], "wkr-1");
}
