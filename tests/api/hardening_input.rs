//! Issue #8, input rules and semantics (R45–R58): each test failed on the main branch before the fix.

use reqwest::Method;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use crate::support::{API_KEY, TestApp, state_of, success_form, worker_status};

/// Sends `method path` with the admin key and an optional JSON body; (status, JSON answer).
async fn admin(app: &TestApp, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = app.client.request(method, app.url(path)).header("X-API-Key", API_KEY);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A G0 worker (admin key + id) that claimed a freshly submitted `platform` build: (worker, build).
async fn claimed_build(app: &TestApp, name: &str) -> (String, String) {
    let (worker, _) = app.register(name, &["ios"]).await;
    let build = app.submit("ios", b"source").await["id"].as_str().unwrap().to_string();
    assert_eq!(app.poll(&worker).await["job"]["id"], build.as_str());
    (worker, build)
}

async fn post_logs(app: &TestApp, build: &str, worker: &str, body: Value) -> (u16, Value) {
    let response = app
        .client
        .post(app.url(&format!("/api/builds/{build}/logs")))
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", worker)
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn messages(app: &TestApp, build: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT message FROM build_logs WHERE build_id = $1 ORDER BY seq")
        .bind(build)
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

/// R45: a NUL in any stored text is replaced by U+FFFD; nothing answers 500, nothing is lost.
#[tokio::test]
async fn r45_nul_bytes_are_replaced_in_every_stored_text() {
    let app = TestApp::spawn().await;

    // Worker name and capabilities.
    let (status, registered) = admin(
        &app,
        Method::POST,
        "/api/workers/register",
        Some(json!({ "name": "mac\u{0}mini", "capabilities": { "platforms": ["ios"], "note\u{0}": "x\u{0}y" } })),
    )
    .await;
    assert_eq!(status, 200, "{registered}");
    let worker = registered["id"].as_str().unwrap().to_string();
    let token = registered["access_token"].as_str().unwrap().to_string();
    let (name, capabilities): (String, Value) = sqlx::query_as("SELECT name, capabilities FROM workers WHERE id = $1")
        .bind(&worker)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(name, "mac\u{FFFD}mini");
    assert_eq!(capabilities["note\u{FFFD}"], "x\u{FFFD}y");

    let build = app.submit("ios", b"source").await["id"].as_str().unwrap().to_string();
    assert_eq!(app.poll(&worker).await["job"]["id"], build.as_str());

    // Heartbeat stage.
    let heartbeat = app
        .client
        .post(app.url(&format!("/api/builds/{build}/heartbeat?worker_id={worker}")))
        .header("X-API-Key", API_KEY)
        .json(&json!({ "progress": 10, "stage": "clone\u{0}" }))
        .send()
        .await
        .unwrap();
    assert_eq!(heartbeat.status(), 200);
    let stage: Option<String> = sqlx::query_scalar("SELECT stage FROM builds WHERE id = $1")
        .bind(&build)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stage.as_deref(), Some("clone\u{FFFD}"));

    // A single log line, and a batch whose bad entry does not lose the others.
    let (status, _) = post_logs(&app, &build, &worker, json!({ "level": "info", "message": "one\u{0}" })).await;
    assert_eq!(status, 200);
    let batch = json!({ "logs": [
        { "level": "info", "message": "two" },
        { "level": "warn", "message": "three\u{0}" },
    ] });
    assert_eq!(
        post_logs(&app, &build, &worker, batch).await,
        (200, json!({ "success": true, "count": 2, "stored": 2, "skipped": 0 }))
    );
    let stored = messages(&app, &build).await;
    for expected in ["one\u{FFFD}", "two", "three\u{FFFD}"] {
        assert!(stored.iter().any(|m| m == expected), "{expected:?} in {stored:?}");
    }

    // Telemetry (the monitors never retry: it must not be a 500).
    let telemetry = app
        .client
        .post(app.url(&format!("/api/builds/{build}/telemetry")))
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", &worker)
        .json(&json!({ "type": "heartbeat", "data": { "stage": "sign\u{0}", "heartbeat_count": 3 } }))
        .send()
        .await
        .unwrap();
    assert_eq!(telemetry.status(), 200);
    assert!(
        messages(&app, &build)
            .await
            .iter()
            .any(|m| m.contains("stage=sign\u{FFFD}"))
    );

    // Diagnostics checks.
    let (status, report) = admin(
        &app,
        Method::POST,
        "/api/diagnostics/report",
        Some(json!({ "worker_id": worker, "status": "healthy", "duration_ms": 5,
                     "checks": [{ "name": "disk\u{0}", "message": "\u{0}" }] })),
    )
    .await;
    assert_eq!((status, report["status"].as_str()), (200, Some("stored")), "{report}");

    // The failure report is accepted: the build fails (not retried later as an infrastructure failure).
    let failure = Form::new()
        .text("build_id", build.clone())
        .text("worker_id", worker.clone())
        .text("success", "false")
        .text("error_message", "xcodebuild\u{0} failed");
    let response = app.upload_form(failure).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), json!({ "status": "failed" }));
    let message: Option<String> = sqlx::query_scalar("SELECT error_message FROM builds WHERE id = $1")
        .bind(&build)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(message.as_deref(), Some("xcodebuild\u{FFFD} failed"));
    assert_eq!(state_of(&app.pool, &build).await, "failed");

    // The abandon reason of a token worker.
    let second = app.submit("ios", b"source").await["id"].as_str().unwrap().to_string();
    let polled: Value = app
        .client
        .get(app.url("/api/workers/poll"))
        .header("X-Worker-Token", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(polled["job"]["id"], second.as_str());
    let abandon = app
        .client
        .post(app.url("/api/workers/abandon"))
        .header("X-Worker-Token", &token)
        .json(&json!({ "build_id": second, "reason": "vm\u{0}crashed" }))
        .send()
        .await
        .unwrap();
    assert_eq!(abandon.status(), 200);
    let errors: Value = sqlx::query_scalar("SELECT errors FROM builds WHERE id = $1")
        .bind(&second)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(
        errors[0]["message"].as_str().unwrap().contains("vm\u{FFFD}crashed"),
        "{errors}"
    );
}

/// R46: a batch answers the G0 shape plus what it stored and skipped.
#[tokio::test]
async fn r46_log_batches_say_what_they_stored() {
    let app = TestApp::spawn().await;
    let (worker, build) = claimed_build(&app, "w").await;
    let before = messages(&app, &build).await.len();
    let batch = json!({ "logs": [
        { "level": "info", "message": "kept" },
        { "level": "loud", "message": "bad level" },
        { "level": "info" },
        { "level": "error", "message": "kept too" },
    ] });
    assert_eq!(
        post_logs(&app, &build, &worker, batch).await,
        (200, json!({ "success": true, "count": 4, "stored": 2, "skipped": 2 }))
    );
    assert_eq!(messages(&app, &build).await.len(), before + 2);
}

/// R47: errors name their cause; unknown v2 query parameters are 400; v2 errors carry a `code`.
#[tokio::test]
async fn r47_errors_keep_their_cause() {
    let app = TestApp::spawn().await;
    let register = |body: &'static str, content_type: &'static str| {
        app.client
            .post(app.url("/api/workers/register"))
            .header("X-API-Key", API_KEY)
            .header("Content-Type", content_type)
            .body(body)
            .send()
    };
    let answer = |r: reqwest::Response| async move { (r.status().as_u16(), r.json::<Value>().await.unwrap()) };

    let (status, mismatch) = answer(
        register(r#"{"name": 5, "capabilities": {}}"#, "application/json")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    let text = mismatch["error"].as_str().unwrap();
    assert!(
        text.starts_with("Invalid JSON body: invalid type: integer `5`, expected a string at line 1 column"),
        "{text}"
    );
    let (status, malformed) = answer(register(r#"{"name": "#, "application/json").await.unwrap()).await;
    assert_eq!(status, 400);
    let text = malformed["error"].as_str().unwrap();
    assert!(text.starts_with("Invalid JSON body: EOF while parsing"), "{text}");
    let (status, wrong_type) = answer(register(r#"{"name": "a"}"#, "text/plain").await.unwrap()).await;
    assert_eq!(
        (status, wrong_type),
        (400, json!({ "error": "Expected Content-Type: application/json" }))
    );

    // Unknown query parameters on v2 listings are refused instead of listing everything.
    app.register("w", &["ios"]).await;
    for path in [
        "/api/v2/workers?status=busy",
        "/api/v2/builds?status=failed",
        "/api/v2/queues?x=1",
    ] {
        let (status, body) = admin(&app, Method::GET, path, None).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["code"], "invalid_query", "{path}: {body}");
        assert!(body["error"].as_str().unwrap().contains("unknown field"), "{body}");
    }
    assert_eq!(admin(&app, Method::GET, "/api/v2/workers?limit=5", None).await.0, 200);

    // v2 answers carry a stable code; G0 answers keep their exact shape.
    assert_eq!(
        admin(&app, Method::GET, "/api/v2/builds/nosuchbuild", None).await,
        (404, json!({ "error": "Build not found", "code": "build_not_found" }))
    );
    assert_eq!(
        admin(&app, Method::GET, "/api/v2/nothing-here", None).await,
        (404, json!({ "error": "Not found", "code": "not_found" }))
    );
    assert_eq!(
        admin(&app, Method::GET, "/api/builds/nosuchbuild/status", None).await,
        (404, json!({ "error": "Build not found" }))
    );
}

/// R48: worker names and capability documents are bounded; nothing is stored past the bounds.
#[tokio::test]
async fn r48_worker_names_and_capabilities_are_bounded() {
    let app = TestApp::spawn().await;
    let (status, body) = admin(
        &app,
        Method::POST,
        "/api/workers/register",
        Some(json!({ "name": "n".repeat(1_000_000), "capabilities": {} })),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("Worker name too long"),
        "{body}"
    );
    let (status, body) = admin(
        &app,
        Method::POST,
        "/api/workers/register",
        Some(json!({ "name": "ok", "capabilities": { "blob": "b".repeat(20_000) } })),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("Capabilities too large"),
        "{body}"
    );
    assert_eq!(app.count("workers").await, 0);
    // A normal registration still works, and so does a long-but-bounded name.
    app.register(&"n".repeat(256), &["ios"]).await;
    assert_eq!(app.count("workers").await, 1);
}

/// R49: a build token retries only a finished build, and only one unfinished retry at a time.
#[tokio::test]
async fn r49_a_build_token_cannot_mint_unlimited_builds() {
    let app = TestApp::spawn().await;
    let submitted = app.submit("ios", b"source").await;
    let id = submitted["id"].as_str().unwrap().to_string();
    let token = submitted["access_token"].as_str().unwrap().to_string();
    let with_token = |method: Method, path: String, token: String| {
        let request = app
            .client
            .request(method, app.url(&path))
            .header("X-Build-Token", token);
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };

    let (status, body) = with_token(Method::POST, format!("/api/builds/{id}/retry"), token.clone()).await;
    assert_eq!(status, 409, "pending build: {body}");
    assert_eq!(app.count("builds").await, 1);

    let (status, _) = with_token(Method::POST, format!("/api/builds/{id}/cancel"), token.clone()).await;
    assert_eq!(status, 200);
    let (status, first) = with_token(Method::POST, format!("/api/builds/{id}/retry"), token.clone()).await;
    assert_eq!(status, 200, "{first}");
    let retry_id = first["id"].as_str().unwrap().to_string();
    for _ in 0..3 {
        let (status, body) = with_token(Method::POST, format!("/api/builds/{id}/retry"), token.clone()).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["retry_build_id"], retry_id.as_str(), "{body}");
        assert!(body["error"].as_str().unwrap().contains(&retry_id), "{body}");
    }
    assert_eq!(app.count("builds").await, 2);

    // Once that retry is finished, the original may be retried again.
    let retry_token = first["access_token"].as_str().unwrap().to_string();
    let (status, _) = with_token(Method::POST, format!("/api/builds/{retry_id}/cancel"), retry_token).await;
    assert_eq!(status, 200);
    let (status, _) = with_token(Method::POST, format!("/api/builds/{id}/retry"), token).await;
    assert_eq!(status, 200);
    assert_eq!(app.count("builds").await, 3);
}

/// R50: revoked is final; unregistered stays offline and gets no work until it registers again.
#[tokio::test]
async fn r50_revoked_and_unregistered_workers_stay_out() {
    let app = TestApp::spawn().await;
    let (revoked, _) = app.register("revoked", &["ios"]).await;
    assert_eq!(
        admin(&app, Method::DELETE, &format!("/api/v2/workers/{revoked}"), None)
            .await
            .0,
        200
    );
    let build = app.submit("ios", b"source").await["id"].as_str().unwrap().to_string();
    assert_eq!(app.poll(&revoked).await["job"], Value::Null);
    assert_eq!(worker_status(&app.pool, &revoked).await, "offline");
    for action in ["drain", "enable", "disable"] {
        let (status, body) = admin(&app, Method::POST, &format!("/api/v2/workers/{revoked}/{action}"), None).await;
        assert_eq!(status, 409, "{action}: {body}");
    }
    let admin_state: String = sqlx::query_scalar("SELECT admin_state FROM workers WHERE id = $1")
        .bind(&revoked)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(admin_state, "revoked");
    assert_eq!(app.poll(&revoked).await["job"], Value::Null);
    // Registering with its id is a new worker.
    let (_, again) = admin(
        &app,
        Method::POST,
        "/api/workers/register",
        Some(json!({ "id": revoked, "name": "revoked", "capabilities": { "platforms": ["ios"] } })),
    )
    .await;
    assert_ne!(again["id"], revoked.as_str(), "{again}");
    let stats: Value = app
        .client
        .get(app.url("/api/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["nodesOnline"], 1, "only the new registration is online: {stats}");

    let (gone, _) = app.register("gone", &["ios"]).await;
    let (status, _) = admin(&app, Method::POST, &format!("/api/workers/{gone}/unregister"), None).await;
    assert_eq!(status, 200);
    assert_eq!(
        app.poll(&gone).await["job"],
        Value::Null,
        "unregistered: never handed work"
    );
    assert_eq!(worker_status(&app.pool, &gone).await, "offline");
    assert_eq!(state_of(&app.pool, &build).await, "pending");
    // Registering again brings it back.
    let (status, _) = admin(
        &app,
        Method::POST,
        "/api/workers/register",
        Some(json!({ "id": gone, "name": "gone", "capabilities": { "platforms": ["ios"] } })),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(app.poll(&gone).await["job"]["id"], build.as_str());
}

/// R51: a requeued build does not go back to the worker it came from; `?drain=true` drains it.
#[tokio::test]
async fn r51_requeue_moves_work_off_the_worker() {
    let app = TestApp::spawn().await;
    let (first, build) = claimed_build(&app, "first").await;
    let (status, body) = admin(&app, Method::POST, &format!("/api/v2/builds/{build}/requeue"), None).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("pending")), "{body}");
    assert_eq!(
        app.poll(&first).await["job"],
        Value::Null,
        "not handed back to the same worker"
    );
    let (second, _) = app.register("second", &["ios"]).await;
    assert_eq!(app.poll(&second).await["job"]["id"], build.as_str());

    // Requeue with drain: the worker it came from is draining in the same call.
    let (status, _) = admin(
        &app,
        Method::POST,
        &format!("/api/v2/builds/{build}/requeue?drain=true"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (_, worker) = admin(&app, Method::GET, &format!("/api/v2/workers/{second}"), None).await;
    assert_eq!(worker["admin_state"], "draining");
    assert_eq!(app.poll(&second).await["job"], Value::Null);
    let (third, _) = app.register("third", &["ios"]).await;
    assert_eq!(
        app.poll(&third).await["job"]["id"],
        build.as_str(),
        "another worker takes it"
    );
}

/// R51: with no cool-off configured, the same worker may take it back at once.
#[tokio::test]
async fn r51_the_cool_off_is_configurable() {
    let app = TestApp::spawn_with(|c| c.queue.requeue_cooloff_secs = 0).await;
    let (first, build) = claimed_build(&app, "first").await;
    admin(&app, Method::POST, &format!("/api/v2/builds/{build}/requeue"), None).await;
    assert_eq!(app.poll(&first).await["job"]["id"], build.as_str());
}

/// R53: a stale worker's no-file success report is 409, like every other stale call; a stranger 403.
#[tokio::test]
async fn r53_stale_no_file_success_is_409() {
    let app = TestApp::spawn_with(|c| c.queue.requeue_cooloff_secs = 0).await;
    let (stale, build) = claimed_build(&app, "stale").await;
    admin(&app, Method::POST, &format!("/api/v2/builds/{build}/requeue"), None).await;
    let (holder, _) = app.register("holder", &["ios"]).await;
    assert_eq!(app.poll(&holder).await["job"]["id"], build.as_str());
    let no_file = |worker: &str| {
        Form::new()
            .text("build_id", build.clone())
            .text("worker_id", worker.to_string())
            .text("success", "true")
    };
    let response = app.upload_form(no_file(&stale)).await;
    assert_eq!(response.status(), 409);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({ "error": "Build attempt is no longer active" })
    );
    let (stranger, _) = app.register("stranger", &["android"]).await;
    assert_eq!(app.upload_form(no_file(&stranger)).await.status(), 403);
    // The holder still completes it.
    assert_eq!(
        app.upload_form(success_form(&build, &holder, b"ipa")).await.status(),
        200
    );
}

/// R54: diagnostics of an unknown worker are 404 `Worker not found` (the CLI's `doctor` relies on it).
#[tokio::test]
async fn r54_diagnostics_of_an_unknown_worker_are_404() {
    let app = TestApp::spawn().await;
    for path in ["/api/diagnostics/nosuchworker", "/api/diagnostics/nosuchworker/latest"] {
        assert_eq!(
            admin(&app, Method::GET, path, None).await,
            (404, json!({ "error": "Worker not found" })),
            "{path}"
        );
    }
    let (worker, _) = app.register("w", &["ios"]).await;
    let (status, body) = admin(&app, Method::GET, &format!("/api/diagnostics/{worker}"), None).await;
    assert_eq!((status, body["reports"].clone()), (200, json!([])));
}

/// R58: past `CONTROLLER_MAX_QUEUED_BUILDS` queued builds of a platform, submit and retry answer 503
/// with `Retry-After` and store nothing; the operator view and the metrics show it.
/// R58 across instances: a queue filled through another instance is refused before the body here too,
/// once the watcher (every second) has seen it at half its limit.
#[tokio::test]
async fn r58_a_queue_filled_through_another_instance_pushes_back_before_the_body() {
    let app = TestApp::spawn_with(|c| c.queue.max_queued_builds = 2).await;
    let other = TestApp::spawn_on_with(&app, |c| c.queue.max_queued_builds = 2).await;
    other.submit("ios", b"one").await;
    other.submit("ios", b"two").await;
    other.submit("android", b"three").await;
    other.submit("android", b"four").await;
    // The watcher looks every second.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    use futures_util::StreamExt;
    // A body that never ends: answered only if the refusal comes before the body is read.
    const BOUNDARY: &str = "XyZfullqueue";
    let head = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"platform\"\r\n\r\nios\r\n--{BOUNDARY}\r\n\
         Content-Disposition: form-data; name=\"source\"; filename=\"app.zip\"\r\nContent-Type: application/zip\r\n\r\n"
    );
    let body = futures_util::stream::once(async move { Ok::<_, std::io::Error>(head.into_bytes()) })
        .chain(futures_util::stream::pending());
    let sent = app
        .client
        .post(app.url("/api/builds/submit"))
        .header("X-API-Key", API_KEY)
        .header("Content-Type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(reqwest::Body::wrap_stream(body))
        .send();
    let response = tokio::time::timeout(std::time::Duration::from_secs(5), sent)
        .await
        .expect("refused before the body ended")
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({ "error": "Build queue is full" })
    );
    assert_eq!(app.count("builds").await, 4);
}

#[tokio::test]
async fn r58_a_full_queue_pushes_back() {
    let app = TestApp::spawn_with(|c| c.queue.max_queued_builds = 2).await;
    let first = app.submit("ios", b"one").await;
    app.submit("ios", b"two").await;
    let files_before = app.stored_files().len();

    let form = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(vec![7u8; 200_000]).file_name("app.zip"));
    let response = app.submit_form(form).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({ "error": "Build queue is full" })
    );
    assert_eq!(app.count("builds").await, 2);
    assert_eq!(app.stored_files().len(), files_before, "nothing stored");

    // Another platform's queue is not affected.
    app.submit("android", b"three").await;

    // A retry into the full queue is refused the same way.
    let id = first["id"].as_str().unwrap();
    admin(&app, Method::POST, &format!("/api/builds/{id}/cancel"), None).await;
    let retry = app
        .client
        .post(app.url(&format!("/api/builds/{id}/retry")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    // One ios build is queued now (the other was cancelled): the retry fits.
    assert_eq!(retry.status(), 200);
    let retry = app
        .client
        .post(app.url(&format!("/api/builds/{id}/retry")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), 503);
    assert!(retry.headers().contains_key("retry-after"));
    assert_eq!(app.count("builds").await, 4);

    // When every queue is full, the body is refused before it is read.
    app.submit("android", b"four").await;
    let response = app
        .submit_form(Form::new().part("source", Part::bytes(vec![1u8; 10]).file_name("a.zip")))
        .await;
    assert_eq!(response.status(), 503);
    // The answer comes although not one byte of the announced 300 MiB body was sent.
    let head = head_only_submit(&app.base, 300 * 1024 * 1024).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");

    let (_, queues) = admin(&app, Method::GET, "/api/v2/queues", None).await;
    let ios = queues["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "ios")
        .unwrap()
        .clone();
    assert_eq!(
        (ios["full"].as_bool(), ios["max_queued"].as_i64()),
        (Some(true), Some(2)),
        "{ios}"
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
        metrics
            .lines()
            .any(|l| l.starts_with("expo_queue_full_rejections_total{queue=\"ios\"}")),
        "{metrics}"
    );
}

/// Sends only the head of a multipart submit announcing `length` body bytes, and returns the head of
/// the answer (bounded wait: a server that waits for the body fails the test instead of hanging).
async fn head_only_submit(base: &str, length: u64) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/builds/submit HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: {API_KEY}\r\n\
         Content-Type: multipart/form-data; boundary=XYZ\r\nContent-Length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = async {
        let mut buffer = [0u8; 1024];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buffer).await.unwrap();
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buffer[..n]);
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("answered without the body");
    String::from_utf8_lossy(&answer).to_string()
}

/// Posts a CPU sample as the holder (admin key + worker id).
async fn post_sample(app: &TestApp, build: &str, worker: &str, cpu: f64) -> u16 {
    app.client
        .post(app.url(&format!("/api/builds/{build}/telemetry")))
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", worker)
        .json(&json!({ "type": "cpu_snapshot", "data": { "cpu_percent": cpu, "memory_mb": 100 } }))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// T3: at most `CONTROLLER_MAX_SAMPLES_PER_BUILD` samples are kept per build (the oldest thinned, the
/// first and the latest kept), and `/api/stats` reads per-build totals, never the samples table.
#[tokio::test]
async fn t3_samples_are_bounded_and_stats_do_not_scan_them() {
    let app = TestApp::spawn_with(|c| c.queue.max_samples_per_build = 10).await;
    let (worker, build) = claimed_build(&app, "sampler").await;
    for i in 0..25 {
        assert_eq!(post_sample(&app, &build, &worker, f64::from(i)).await, 200);
    }
    let kept: Vec<f64> = sqlx::query_scalar("SELECT cpu_percent FROM cpu_snapshots WHERE build_id = $1 ORDER BY ts")
        .bind(&build)
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert!(kept.len() <= 10 && kept.len() >= 5, "{kept:?}");
    assert_eq!(kept.first(), Some(&0.0), "the first sample is kept: {kept:?}");
    assert_eq!(kept.last(), Some(&24.0), "the latest sample is kept: {kept:?}");

    // Rows the API never saw (60 s apart at 100 %: 60 core-seconds if the table were summed).
    let other = app.submit("ios", b"other").await["id"].as_str().unwrap().to_string();
    sqlx::query(
        "INSERT INTO cpu_snapshots (build_id, ts, cpu_percent, memory_mb)
         VALUES ($1, now() - interval '60 seconds', 100, 1), ($1, now(), 100, 1)",
    )
    .bind(&other)
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
    let cpu = stats["totalCpuCycles"].as_i64().unwrap();
    assert!(cpu < 5, "stats summed the samples table: {stats}");
}

/// T4: rule-4 telemetry (worker and build ids, no secret) adds CPU samples only: no log lines, no
/// lease extension.
#[tokio::test]
async fn t4_keyless_telemetry_carries_samples_only() {
    let app = TestApp::spawn().await;
    let (worker, build) = claimed_build(&app, "monitor").await;
    let lease = || async {
        sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
            "SELECT lease_expires_at FROM builds WHERE id = $1",
        )
        .bind(&build)
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    let before = (lease().await, messages(&app, &build).await);
    for body in [
        json!({ "type": "monitor_started", "data": {} }),
        json!({ "type": "heartbeat", "data": { "stage": "flood", "heartbeat_count": 1 } }),
        json!({ "type": "cpu_snapshot", "data": { "cpu_percent": 10, "memory_mb": 5 } }),
    ] {
        let r = app
            .client
            .post(app.url(&format!("/api/builds/{build}/telemetry")))
            .header("X-Worker-Id", &worker)
            .header("X-Build-Id", &build)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!((lease().await, messages(&app, &build).await), before);
    assert_eq!(app.count("cpu_snapshots").await, 1);
}

/// T5: the per-credential limit counts what authenticates: varying `X-Worker-Id` beside the same
/// (wrong) key or token does not make a new credential.
#[tokio::test]
async fn t5_varying_the_worker_id_does_not_escape_the_credential_limit() {
    let app = TestApp::spawn_with(|c| c.rate_limit_per_credential = 5).await;
    let mut limited = 0;
    for i in 0..40 {
        for header in ["X-API-Key", "X-Worker-Token"] {
            let r = app
                .client
                .get(app.url("/api/workers/poll"))
                .header(header, "guessed-secret-guessed-secret-guessed")
                .header("X-Worker-Id", format!("worker{i:016}"))
                .send()
                .await
                .unwrap();
            limited += u32::from(r.status() == 429);
        }
    }
    assert!(limited >= 40, "only {limited} of 80 requests were limited");
}

/// T5: a worker token's route ignores `X-API-Key`, so a junk key that varies per request must not buy
/// the token a fresh bucket each time: every credential header present is charged, and 429 follows
/// once the token's own bucket is empty (before, only the `X-API-Key` was counted).
#[tokio::test]
async fn t5_a_varying_junk_api_key_beside_a_token_does_not_escape_the_limit() {
    let app = TestApp::spawn_with(|c| c.rate_limit_per_credential = 1).await;
    let (worker_id, token) = app.register("w", &["ios"]).await;
    let mut statuses = Vec::new();
    for i in 0..40 {
        let r = app
            .client
            .get(app.url("/api/workers/poll"))
            .header("X-Worker-Token", &token)
            .header("X-Worker-Id", &worker_id)
            .header("X-API-Key", format!("junk-key-{i:032}"))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert!(statuses.contains(&200), "{statuses:?}");
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(
        limited >= 20,
        "only {limited} of 40 requests were limited: {statuses:?}"
    );
}

/// T7: dashboard routes are under the per-IP limit too.
#[tokio::test]
async fn t7_the_dashboard_is_rate_limited_per_ip() {
    let app = TestApp::spawn_with(|c| c.rate_limit_per_ip = 2).await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let r = app.client.get(app.url("/dashboard/login")).send().await.unwrap();
        statuses.push(r.status().as_u16());
    }
    assert!(statuses.contains(&429), "{statuses:?}");
}

/// T8: a build token cannot keep minting builds with retry → cancel → retry (nor by retrying the
/// retry with its own token): at most `CONTROLLER_MAX_RETRIES_PER_BUILD` per family; the admin key can.
#[tokio::test]
async fn t8_a_build_token_retries_a_build_a_bounded_number_of_times() {
    let app = TestApp::spawn_with(|c| c.queue.max_retries_per_build = 2).await;
    let submitted = app.submit("ios", b"source").await;
    let id = submitted["id"].as_str().unwrap().to_string();
    let token = submitted["access_token"].as_str().unwrap().to_string();
    let call = |path: String, token: String| {
        let request = app.client.post(app.url(&path)).header("X-Build-Token", token);
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, _) = call(format!("/api/builds/{id}/cancel"), token.clone()).await;
    assert_eq!(status, 200);
    let mut last = (id.clone(), token.clone());
    for _ in 0..2 {
        let (status, retried) = call(format!("/api/builds/{id}/retry"), token.clone()).await;
        assert_eq!(status, 200, "{retried}");
        last = (
            retried["id"].as_str().unwrap().to_string(),
            retried["access_token"].as_str().unwrap().to_string(),
        );
        let (status, _) = call(format!("/api/builds/{}/cancel", last.0), last.1.clone()).await;
        assert_eq!(status, 200);
    }
    let (status, body) = call(format!("/api/builds/{id}/retry"), token.clone()).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("retried 2 times"), "{body}");
    let (status, body) = call(format!("/api/builds/{}/retry", last.0), last.1.clone()).await;
    assert_eq!(status, 409, "retrying the retry: {body}");
    assert_eq!(app.count("builds").await, 3);
    let (status, _) = admin(&app, Method::POST, &format!("/api/builds/{id}/retry"), None).await;
    assert_eq!(status, 200, "the admin key is not limited");
}

/// T8: retries of different finished members of one family, sent at once, never take the family past
/// the limit: the count runs under a lock on the family's first build (before, the lock was on the
/// build being retried, so every member's retry passed the same count in parallel).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t8_parallel_retries_of_family_members_stay_within_the_limit() {
    const LIMIT: usize = 5;
    let app = TestApp::spawn_with(|c| c.queue.max_retries_per_build = LIMIT as i64).await;
    let post = |path: String, token: String| {
        let request = app.client.post(app.url(&path)).header("X-Build-Token", token);
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    // A family of LIMIT finished builds (the first and LIMIT - 1 retries): one retry left.
    let submitted = app.submit("ios", b"source").await;
    let mut members = vec![(
        submitted["id"].as_str().unwrap().to_string(),
        submitted["access_token"].as_str().unwrap().to_string(),
    )];
    for _ in 1..LIMIT {
        let (id, token) = members.last().unwrap().clone();
        let (status, _) = post(format!("/api/builds/{id}/cancel"), token.clone()).await;
        assert_eq!(status, 200);
        let (status, retried) = post(format!("/api/builds/{id}/retry"), token).await;
        assert_eq!(status, 200, "{retried}");
        members.push((
            retried["id"].as_str().unwrap().to_string(),
            retried["access_token"].as_str().unwrap().to_string(),
        ));
    }
    let (id, token) = members.last().unwrap().clone();
    assert_eq!(post(format!("/api/builds/{id}/cancel"), token).await.0, 200);

    // Line the retries up inside their transactions: the events outbox is locked, so each retry that
    // got past its count waits at its insert; once all wait (or wait for the family lock), let go.
    let mut blocker = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN SHARE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let retries: Vec<_> = members
        .iter()
        .map(|(id, token)| tokio::spawn(post(format!("/api/builds/{id}/retry"), token.clone())))
        .collect();
    let waiting = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    let started = std::time::Instant::now();
    while waiting().await < LIMIT as i64 && started.elapsed() < std::time::Duration::from_secs(20) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    blocker.rollback().await.unwrap();
    let mut answers = Vec::new();
    for retry in retries {
        answers.push(retry.await.unwrap());
    }
    let accepted = answers.iter().filter(|(status, _)| *status == 200).count();
    assert_eq!(accepted, 1, "{answers:?}");
    assert!(
        answers.iter().all(|(status, _)| [200, 409].contains(status)),
        "{answers:?}"
    );
    assert_eq!(app.count("builds").await, (LIMIT + 1) as i64);
}

/// T12: a client's `X-Request-Id` is kept only when it is short and of a safe alphabet; anything else
/// (spaces, `=`, control characters) is replaced, so it cannot forge fields in a log line.
#[tokio::test]
async fn t12_request_ids_cannot_forge_log_fields() {
    let app = TestApp::spawn().await;
    let answered = |id: String| {
        let request = app.client.get(app.url("/health")).header("X-Request-Id", id);
        async move {
            let r = request.send().await.unwrap();
            r.headers()["x-request-id"].to_str().unwrap().to_string()
        }
    };
    assert_eq!(answered("req-123_abc.def:9".into()).await, "req-123_abc.def:9");
    for forged in [
        "x status=500 user=admin".to_string(),
        "a\"b".to_string(),
        "z".repeat(65),
    ] {
        let id = answered(forged.clone()).await;
        assert_ne!(id, forged);
        assert!(
            !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)),
            "{id:?}"
        );
    }
}

/// T14: a junk build token gets the same answer for a build that exists and one that does not (no
/// existence oracle); `/docs` carries a CSP that forbids framing, and `nosniff`.
#[tokio::test]
async fn t14_no_existence_oracle_and_docs_cannot_be_framed() {
    let app = TestApp::spawn().await;
    let id = app.submit("ios", b"source").await["id"].as_str().unwrap().to_string();
    let mut answers = Vec::new();
    for build in [id.as_str(), "noSuchBuild000000000a"] {
        for path in ["status", "logs", "download"] {
            let r = app
                .client
                .get(app.url(&format!("/api/builds/{build}/{path}")))
                .header("X-Build-Token", "junk-token")
                .send()
                .await
                .unwrap();
            answers.push((path, r.status().as_u16(), r.text().await.unwrap()));
        }
    }
    assert_eq!(answers[..3], answers[3..], "{answers:?}");
    let docs = app.client.get(app.url("/docs/")).send().await.unwrap();
    let csp = docs.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(docs.headers()["x-frame-options"], "DENY");
    assert_eq!(docs.headers()["x-content-type-options"], "nosniff");
}
