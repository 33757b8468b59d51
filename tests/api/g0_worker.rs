//! The first-generation worker path over real HTTP: register → submit → poll → source → upload → status.

use std::collections::HashSet;

use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use crate::support::{API_KEY, TestApp, success_form};

#[tokio::test]
async fn register_submit_poll_source_upload_status() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("Mac mini", &["ios"]).await;
    let submitted = app.submit("ios", b"PK\x03\x04 source bytes").await;
    let build_id = submitted["id"].as_str().unwrap().to_string();
    assert_eq!(submitted["status"], "pending");
    assert_eq!(build_id.len(), 21);
    assert!(submitted["submitted_at"].is_i64());
    let build_token = submitted["access_token"].as_str().unwrap().to_string();

    let job = app.poll(&worker_id).await["job"].clone();
    assert_eq!(job["id"], build_id.as_str());
    assert_eq!(job["platform"], "ios");
    assert_eq!(job["source_url"], format!("/api/builds/{build_id}/source"));
    assert_eq!(job["certs_url"], Value::Null);
    assert_eq!(job["baseImageId"], "test-base-image");
    assert_eq!(job["attempt"], 1);
    assert!(job["otp"].as_str().unwrap().len() >= 43);
    assert_eq!(job["submitted_at"], submitted["submitted_at"]);

    let source = app
        .client
        .get(app.url(job["source_url"].as_str().unwrap()))
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", &worker_id)
        .send()
        .await
        .unwrap();
    assert_eq!(source.status(), 200);
    assert_eq!(source.headers()["content-type"], "application/zip");
    assert_eq!(
        source.headers()["content-disposition"],
        format!("attachment; filename=\"{build_id}.zip\"")
    );
    assert_eq!(source.bytes().await.unwrap().as_ref(), b"PK\x03\x04 source bytes");

    let status: Value = app
        .client
        .get(app.url(&format!("/api/builds/{build_id}/status")))
        .header("X-Build-Token", &build_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "assigned");
    assert_eq!(status["worker_id"], worker_id.as_str());

    let form = success_form(&build_id, &worker_id, b"IPA");
    let upload = app.upload_form(form).await;
    assert_eq!(upload.status(), 200);
    assert_eq!(
        upload.json::<Value>().await.unwrap(),
        serde_json::json!({ "status": "success" })
    );

    let status: Value = app.admin_json(&format!("/api/builds/{build_id}/status")).await;
    for key in [
        "id",
        "status",
        "platform",
        "worker_id",
        "submitted_at",
        "started_at",
        "completed_at",
        "error_message",
    ] {
        assert!(status.get(key).is_some(), "status carries {key}");
    }
    assert_eq!(status["status"], "completed");
    assert!(status["completed_at"].is_i64() && status["started_at"].is_i64());
    assert_eq!(status["error_message"], Value::Null);
    let (size, sha): (i64, String) = sqlx::query_as("SELECT result_size, result_sha256 FROM builds WHERE id = $1")
        .bind(&build_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(size, 3);
    // sha256("IPA")
    assert_eq!(
        sha,
        expo_controller::ids::hex(&<sha2::Sha256 as sha2::Digest>::digest(b"IPA"))
    );

    // The worker is free again: an empty poll answers `{"job": null}`.
    assert_eq!(app.poll(&worker_id).await, serde_json::json!({ "job": null }));
}

#[tokio::test]
async fn a_failure_report_fails_the_build_and_a_late_upload_cannot_flip_it() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("w", &["android"]).await;
    let build_id = app.submit("android", b"src").await["id"].as_str().unwrap().to_string();
    app.poll(&worker_id).await;
    let fail = Form::new()
        .text("build_id", build_id.clone())
        .text("worker_id", worker_id.clone())
        .text("success", "false")
        .text("error_message", "gradle failed");
    let answer = app.upload_form(fail).await;
    assert_eq!(
        answer.json::<Value>().await.unwrap(),
        serde_json::json!({ "status": "failed" })
    );

    let late = success_form(&build_id, &worker_id, b"APK");
    let answer = app.upload_form(late).await;
    assert_eq!(answer.status(), 409);
    assert_eq!(
        answer.json::<Value>().await.unwrap(),
        serde_json::json!({ "error": "Build attempt is no longer active" })
    );
    let status: Value = app.admin_json(&format!("/api/builds/{build_id}/status")).await;
    assert_eq!(status["status"], "failed");
    assert_eq!(status["error_message"], "gradle failed");
    assert!(
        app.stored_files().iter().all(|f| !f.contains("result")),
        "the late result was not kept: {:?}",
        app.stored_files()
    );
}

#[tokio::test]
async fn only_the_holder_reads_the_source_or_uploads() {
    let app = TestApp::spawn().await;
    let (holder, _) = app.register("holder", &["ios"]).await;
    let (other, _) = app.register("other", &["ios"]).await;
    let build_id = app.submit("ios", b"src").await["id"].as_str().unwrap().to_string();
    let source_url = app.url(&format!("/api/builds/{build_id}/source"));

    // Pending build: nobody holds it, so nobody reads it (R26).
    let r = app
        .client
        .get(&source_url)
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", &other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "Worker not authorized for this build"
    );
    let r = app.client.get(&source_url).send().await.unwrap();
    assert_eq!(r.status(), 401);

    app.poll(&holder).await;
    let r = app
        .client
        .get(&source_url)
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", &other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = app
        .client
        .get(&source_url)
        .header("X-API-Key", API_KEY)
        .query(&[("worker_id", &holder)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let form = success_form(&build_id, &other, b"IPA");
    let r = app.upload_form(form).await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "Worker not authorized for this build"
    );
    assert!(
        app.stored_files()
            .iter()
            .all(|f| !f.contains("result") && !f.contains("staging")),
        "{:?}",
        app.stored_files()
    );
}

#[tokio::test]
async fn concurrent_http_pollers_receive_each_build_once() {
    let app = TestApp::spawn().await;
    let mut builds = HashSet::new();
    for _ in 0..60 {
        builds.insert(app.submit("android", b"s").await["id"].as_str().unwrap().to_string());
    }
    let mut workers = Vec::new();
    for n in 0..12 {
        workers.push(app.register(&format!("w{n}"), &["android"]).await.0);
    }
    let app = std::sync::Arc::new(app);
    let mut tasks = Vec::new();
    for worker_id in workers {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let job = app.poll(&worker_id).await["job"].clone();
                if job.is_null() {
                    break got;
                }
                let id = job["id"].as_str().unwrap().to_string();
                let form = success_form(&id, &worker_id, b"x");
                let r = app.upload_form(form).await;
                assert_eq!(r.status(), 200);
                got.push(id);
            }
        }));
    }
    let mut delivered = Vec::new();
    for t in tasks {
        delivered.extend(t.await.unwrap());
    }
    assert_eq!(delivered.len(), 60, "each build delivered once");
    assert_eq!(delivered.into_iter().collect::<HashSet<_>>(), builds);
}

#[tokio::test]
async fn first_generation_worker_whole_life() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("Mac mini G0", &["android"]).await;
    let build_id = app.submit("android", b"SRC").await["id"].as_str().unwrap().to_string();
    let job = app.poll(&worker_id).await["job"].clone();
    assert_eq!(job["id"], build_id.as_str());
    let build_url = |path: &str| app.url(&format!("/api/builds/{build_id}/{path}"));

    let source = app
        .client
        .get(build_url("source"))
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", &worker_id)
        .send()
        .await
        .unwrap();
    assert_eq!(source.bytes().await.unwrap().as_ref(), b"SRC");

    // The host monitor: no key, only the worker and build ids.
    let telemetry = |body: Value| {
        app.client
            .post(build_url("telemetry"))
            .header("X-Worker-Id", &worker_id)
            .header("X-Build-Id", &build_id)
            .json(&body)
            .send()
    };
    let r = telemetry(json!({ "type": "monitor_started", "data": {} }))
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.json::<Value>().await.unwrap()),
        (200, json!({ "status": "ok" }))
    );
    telemetry(json!({ "type": "cpu_snapshot", "timestamp": 1, "data": { "cpu_percent": 150.5, "memory_mb": 2048 } }))
        .await
        .unwrap();
    let r = telemetry(json!({ "type": "cpu_snapshot", "data": { "cpu_percent": "lots", "memory_mb": -1 } }))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "bad values are answered 200 and not stored");
    telemetry(
        json!({ "type": "heartbeat", "data": { "stage": "build", "heartbeat_count": 3,
        "metrics": { "cpu_percent": 80, "memory_mb": 1000, "disk_percent": 40 } } }),
    )
    .await
    .unwrap();
    let samples: i64 = sqlx::query_scalar("SELECT count(*) FROM cpu_snapshots WHERE build_id = $1")
        .bind(&build_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(samples, 1);
    let r = app
        .client
        .post(build_url("telemetry"))
        .header("X-Worker-Id", "someone-else")
        .header("X-Build-Id", &build_id)
        .json(&json!({"type": "heartbeat"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "telemetry from a worker that does not hold the build");

    // Heartbeat with ?worker_id= and a progress report.
    let r = app
        .client
        .post(build_url("heartbeat"))
        .query(&[("worker_id", &worker_id)])
        .header("X-API-Key", API_KEY)
        .json(&json!({ "progress": 40, "stage": "gradle" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let hb: Value = r.json().await.unwrap();
    assert_eq!(hb["status"], "ok");
    assert!(hb["timestamp"].is_i64() && hb.get("cancel_requested").is_none());
    let r = app
        .client
        .post(build_url("heartbeat"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({ "error": "worker_id required" })
    );
    let (other, _) = app.register("other", &["android"]).await;
    let r = app
        .client
        .post(build_url("heartbeat"))
        .query(&[("worker_id", &other)])
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.json::<Value>().await.unwrap()),
        (403, json!({ "error": "Build not assigned to this worker" }))
    );

    // Logs: single and batch, with the worker id header.
    let post_log = |body: Value| {
        app.client
            .post(build_url("logs"))
            .header("X-API-Key", API_KEY)
            .header("X-Worker-Id", &worker_id)
            .json(&body)
            .send()
    };
    let r = post_log(json!({ "level": "info", "message": "Building…" }))
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({ "success": true }));
    let r = post_log(json!({ "level": "fatal", "message": "x" })).await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.json::<Value>().await.unwrap()),
        (
            400,
            json!({ "error": "Invalid log level. Must be: info, warn, or error" })
        )
    );
    let r = post_log(json!({ "text": "x" })).await.unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({ "error": "Invalid body. Expected { level, message } or { logs: [...] }" })
    );

    let form = success_form(&build_id, &worker_id, b"APK");
    let r = app.upload_form(form).await;
    assert_eq!(r.status(), 200);

    // A late log line from the last holder is still accepted (VMs flush their tail late).
    assert_eq!(
        post_log(json!({ "level": "debug", "message": "tail" }))
            .await
            .unwrap()
            .status(),
        200
    );
    let logs: Value = app
        .client
        .get(build_url("logs"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let messages: Vec<&str> = logs["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    // Keyless (rule 4) telemetry adds samples only, never log lines (T4).
    assert!(!messages.iter().any(|m| m.starts_with("[VM]")), "{messages:?}");
    assert!(messages.contains(&"Building…") && messages.contains(&"tail"));

    let stats: Value = app.admin_json(&format!("/api/workers/{worker_id}/stats")).await;
    assert_eq!(stats["totalBuilds"], 1);
    assert_eq!(stats["successfulBuilds"], 1);
    assert_eq!(stats["failedBuilds"], 0);
    assert_eq!(stats["workerName"], "Mac mini G0");
    assert_eq!(stats["status"], "idle");
    assert!(stats["uptime"].as_str().unwrap().ends_with('s'));
    let r = app
        .client
        .get(app.url("/api/workers/nobody/stats"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({ "error": "Worker not found" }));

    let r = app
        .client
        .post(app.url(&format!("/api/workers/{worker_id}/unregister")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({ "success": true, "builds_reassigned": 0 })
    );
}

#[tokio::test]
async fn heartbeats_tell_the_worker_its_build_was_cancelled() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("w", &["ios"]).await;
    let build_id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    app.poll(&worker_id).await;
    let r = app
        .client
        .post(app.url(&format!("/api/builds/{build_id}/cancel")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({ "status": "cancelled" }));
    let r = app
        .client
        .post(app.url(&format!("/api/builds/{build_id}/heartbeat")))
        .query(&[("worker_id", &worker_id)])
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-build-cancelled"], "true");
    assert_eq!(r.json::<Value>().await.unwrap()["cancel_requested"], true);
    // The upload that follows is refused; the G0 status reads failed with the cancel message.
    let form = success_form(&build_id, &worker_id, b"x");
    let r = app.upload_form(form).await;
    assert_eq!(r.status(), 409);
    let status: Value = app.admin_json(&format!("/api/builds/{build_id}/status")).await;
    assert_eq!(status["status"], "failed");
    assert_eq!(status["error_message"], "Build cancelled by user");
    assert_eq!(
        app.poll(&worker_id).await,
        json!({ "job": null }),
        "the worker is free and the build is never handed out"
    );
}

#[tokio::test]
async fn failure_alias_accepts_json_and_result_alias_reports_success() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("w", &["ios"]).await;
    let failed = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    app.poll(&worker_id).await;
    let r = app
        .client
        .post(app.url("/api/workers/fail"))
        .header("X-API-Key", API_KEY)
        .json(&json!({ "build_id": failed, "worker_id": worker_id, "error_message": "signing failed" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({ "status": "failed" }));
    let ok = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    app.poll(&worker_id).await;
    let form = Form::new()
        .text("build_id", ok.clone())
        .text("worker_id", worker_id.clone())
        .part("result", Part::bytes(b"x".to_vec()).file_name("r"));
    let r = app
        .client
        .post(app.url("/api/workers/result"))
        .header("X-API-Key", API_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({ "status": "success" }));
}

#[tokio::test]
async fn diagnostics_reports_are_stored_and_listed_newest_first() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("w", &["ios"]).await;
    let post = |body: Value| {
        app.client
            .post(app.url("/api/diagnostics/report"))
            .header("X-API-Key", API_KEY)
            .json(&body)
            .send()
    };
    let report = |status: &str| json!({ "worker_id": worker_id, "status": status, "duration_ms": 1234, "auto_fixed": true, "checks": [{ "name": "disk", "ok": true }] });
    let r = post(report("healthy")).await.unwrap();
    let stored: Value = r.json().await.unwrap();
    assert_eq!(stored["status"], "stored");
    assert_eq!(stored["id"].as_str().unwrap().len(), 36, "a uuid");
    post(report("critical")).await.unwrap();

    let errors = [
        (
            json!({ "worker_id": worker_id, "status": "healthy" }),
            400,
            "Missing required fields: worker_id, status, duration_ms, checks",
        ),
        (
            json!({ "worker_id": worker_id, "status": "meh", "duration_ms": 1, "checks": [] }),
            400,
            "Invalid status. Must be: healthy, warning, or critical",
        ),
        (
            json!({ "worker_id": worker_id, "status": "healthy", "duration_ms": 1, "checks": {} }),
            400,
            "checks must be an array",
        ),
        (
            json!({ "worker_id": "ghost", "status": "healthy", "duration_ms": 1, "checks": [] }),
            404,
            "Worker not found",
        ),
    ];
    for (body, status, message) in errors {
        let r = post(body).await.unwrap();
        assert_eq!(
            (r.status().as_u16(), r.json::<Value>().await.unwrap()),
            (status, json!({ "error": message }))
        );
    }

    let list: Value = app.admin_json(&format!("/api/diagnostics/{worker_id}")).await;
    assert_eq!(list["worker_id"], worker_id.as_str());
    let reports = list["reports"].as_array().unwrap();
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[0]["status"], "critical", "newest first");
    assert_eq!(reports[0]["checks"][0]["name"], "disk");
    assert_eq!(reports[0]["auto_fixed"], true);
    assert!(reports[0]["run_at"].is_i64());
    let latest: Value = app.admin_json(&format!("/api/diagnostics/{worker_id}/latest")).await;
    assert_eq!(latest["id"], reports[0]["id"]);
    let one: Value = app
        .client
        .get(app.url(&format!("/api/diagnostics/{worker_id}")))
        .query(&[("limit", "1")])
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["reports"].as_array().unwrap().len(), 1);
    let r = app
        .client
        .get(app.url(&format!("/api/diagnostics/{worker_id}")))
        .query(&[("limit", "abc")])
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (other, _) = app.register("quiet", &["ios"]).await;
    let r = app
        .client
        .get(app.url(&format!("/api/diagnostics/{other}/latest")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.json::<Value>().await.unwrap()),
        (404, json!({ "error": "No diagnostic reports found" }))
    );
}

#[tokio::test]
async fn vm_status_accepts_the_admin_key_with_the_holder_id_only() {
    let app = TestApp::spawn().await;
    let (holder, _) = app.register("holder", &["ios"]).await;
    let (other, _) = app.register("other", &["ios"]).await;
    let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    app.poll(&holder).await;
    let url = app.url(&format!("/api/builds/{id}/vm-status"));
    let r = app
        .client
        .get(&url)
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", &holder)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({ "vm_ready": false }));
    let r = app
        .client
        .get(&url)
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", &other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = app.client.get(&url).header("X-API-Key", API_KEY).send().await.unwrap();
    assert_eq!(r.status(), 401);
}
