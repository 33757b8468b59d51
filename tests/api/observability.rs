//! `/metrics`: Prometheus text that moves as builds move (R23). The recorder is process-wide, so
//! counters are compared before and after; gauges are read from this test's own database.

use reqwest::multipart::{Form, Part};

use crate::support::{API_KEY, TestApp};

async fn scrape(app: &TestApp) -> String {
    let r = app
        .client
        .get(app.url("/metrics"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    r.text().await.unwrap()
}

/// The value of the first sample whose line starts with `prefix` (name plus labels), or 0.
fn value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_move_with_the_builds() {
    let app = TestApp::spawn().await;
    let r = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 401, "metrics need the admin key");
    let before = scrape(&app).await;
    for _ in 0..3 {
        app.submit("ios", b"s").await;
    }
    let (worker_id, _) = app.register("w", &["ios"]).await;
    let job = app.poll(&worker_id).await;
    let id = job["job"]["id"].as_str().unwrap().to_string();
    let form = Form::new()
        .text("build_id", id.clone())
        .text("worker_id", worker_id.clone())
        .text("success", "true")
        .part("result", Part::bytes(vec![1u8; 1000]).file_name("r"));
    app.upload_form(form).await;
    app.client
        .get(app.url(&format!("/api/builds/{id}/status")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();

    let after = scrape(&app).await;
    assert_eq!(
        value(&after, r#"expo_queue_depth{queue="ios",state="pending"}"#),
        2.0,
        "{after}"
    );
    assert_eq!(value(&after, r#"expo_queue_depth{queue="ios",state="assigned"}"#), 0.0);
    let completed = r#"expo_builds_finished_total{outcome="completed"}"#;
    assert!(value(&after, completed) >= value(&before, completed) + 1.0);
    assert!(
        value(&after, "expo_claim_duration_seconds_count") >= value(&before, "expo_claim_duration_seconds_count") + 1.0
    );
    assert!(value(&after, "expo_upload_bytes_total") >= value(&before, "expo_upload_bytes_total") + 1000.0);
    assert!(
        after.contains(r#"route="/api/builds/{id}/status""#),
        "HTTP durations by route template"
    );
    assert!(value(&after, r#"expo_oldest_pending_age_seconds{queue="ios"}"#) >= 0.0);
    let bearer = app
        .client
        .get(app.url("/metrics"))
        .header("Authorization", format!("Bearer {API_KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 200);
}

/// Logs an operator can use: one INFO line per request (route, status, duration, request id, ids), no
/// colour codes when the output is not a terminal, no scheduler chatter at the default level.
#[tokio::test]
async fn one_plain_info_line_per_request() {
    let server = LoggingServer::start(&[]).await;
    let mut request_ids = Vec::new();
    for (path, worker) in [
        ("/api/builds/active", "wkr-1"),
        ("/api/builds/nosuchbuild/status", "-"),
        ("/nowhere", "-"),
    ] {
        let r = server.send(path, None, &[("X-Worker-Id", worker)]).await;
        request_ids.push((
            r.headers()["x-request-id"].to_str().unwrap().to_string(),
            r.status().as_u16(),
        ));
    }
    let output = server.stop();

    assert!(!output.contains('\u{1b}'), "no colour codes in a pipe:\n{output}");
    assert!(
        !output.contains("Worker prune started"),
        "no scheduler chatter:\n{output}"
    );
    for (request_id, status) in request_ids {
        let lines: Vec<&str> = output
            .lines()
            .filter(|l| l.contains(&request_id) && l.contains(" request") && l.contains("route="))
            .collect();
        assert_eq!(lines.len(), 1, "one line for {request_id}:\n{output}");
        assert!(lines[0].contains("INFO"), "{}", lines[0]);
        assert!(lines[0].contains(&format!("status={status}")), "{}", lines[0]);
        assert!(lines[0].contains("duration_ms="), "{}", lines[0]);
        // T12: text values are quoted, so no value can pose as another field.
        assert!(
            lines[0].contains(&format!("request_id=\"{request_id}\"")),
            "{}",
            lines[0]
        );
    }
    assert!(
        output
            .lines()
            .any(|l| l.contains("worker_id=\"wkr-1\"") && l.contains("route=/api/builds/active")),
        "the worker id is on the line:\n{output}"
    );
}

/// Maintenance jobs say what they did with ids: a lease rescue names the build and the worker.
#[tokio::test]
async fn a_lease_rescue_logs_the_build_and_worker_ids() {
    let server = LoggingServer::start(&[
        ("CONTROLLER_LEASE_TIMEOUT_SECS", "1"),
        ("CONTROLLER_FIRST_HEARTBEAT_GRACE_SECS", "1"),
        ("CONTROLLER_JOB_SCHEDULES", "rescue_expired_leases=* * * * * *"),
    ])
    .await;
    let form = Form::new()
        .part("source", Part::bytes(b"src".to_vec()).file_name("app.zip"))
        .text("platform", "ios");
    let submitted: serde_json::Value = server
        .client
        .post(format!("{}/api/builds/submit", server.base))
        .header("X-API-Key", API_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let build_id = submitted["id"].as_str().unwrap().to_string();
    let capabilities = serde_json::json!({ "name": "silent", "capabilities": { "platforms": ["ios"] } });
    let registered: serde_json::Value = server
        .send("/api/workers/register", Some(capabilities), &[])
        .await
        .json()
        .await
        .unwrap();
    let worker_id = registered["id"].as_str().unwrap().to_string();
    let poll = format!("/api/workers/poll?worker_id={worker_id}");
    let job: serde_json::Value = server.send(&poll, None, &[]).await.json().await.unwrap();
    assert_eq!(job["job"]["id"], build_id.as_str());
    // The worker never heartbeats: the lease expires and the rescue (every second here) takes it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let path = format!("/api/builds/{build_id}/status");
        let status: serde_json::Value = server.send(&path, None, &[]).await.json().await.unwrap();
        if status["status"] != "assigned" && status["status"] != "building" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never rescued: {status}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let output = server.stop();
    let line = output
        .lines()
        .find(|l| l.contains("attempt ended by a sweep"))
        .unwrap_or_else(|| panic!("no rescue line:\n{output}"));
    assert!(line.contains("INFO"), "{line}");
    assert!(line.contains(&format!("build_id={build_id}")), "{line}");
    assert!(line.contains(&format!("worker_id={worker_id}")), "{line}");
    assert!(line.contains("job=rescue_expired_leases"), "the job's span: {line}");
}

/// The real binary at its default log settings (text, INFO) with `env`, its stdout captured.
struct LoggingServer {
    child: std::process::Child,
    storage: std::path::PathBuf,
    base: String,
    client: reqwest::Client,
}

impl LoggingServer {
    async fn start(env: &[(&str, &str)]) -> LoggingServer {
        use crate::support::{free_port, fresh_database, serve_command, wait_ready};

        let (url, _pool) = fresh_database(1).await;
        let storage = std::env::temp_dir().join(format!("expo-logs-{}", expo_controller::ids::new_id()));
        let port = free_port();
        let mut command = serve_command(&url, &storage, port, &expo_controller::ids::new_key32());
        command
            .env_remove("RUST_LOG")
            .env_remove("CONTROLLER_LOG_FORMAT")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped());
        let server = LoggingServer {
            child: command.spawn().unwrap(),
            storage,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        wait_ready(&server.client, &server.base).await;
        server
    }

    /// GET (or POST with `json`) `path` with the admin key and `headers`; the response.
    async fn send(&self, path: &str, json: Option<serde_json::Value>, headers: &[(&str, &str)]) -> reqwest::Response {
        let url = format!("{}{path}", self.base);
        let mut request = match json {
            Some(body) => self.client.post(url).json(&body),
            None => self.client.get(url),
        }
        .header("X-API-Key", API_KEY);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    /// Stops the server (SIGTERM) and returns everything it logged.
    fn stop(mut self) -> String {
        use std::io::Read;

        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let mut output = String::new();
        self.child.stdout.take().unwrap().read_to_string(&mut output).unwrap();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.storage);
        output
    }
}
