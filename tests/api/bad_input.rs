//! Bad input gets the exact 4xx of api.md and changes nothing: no row, no file.

use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use crate::support::{API_KEY, TestApp, raw_status};

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    assert!(
        response.headers().contains_key("x-request-id"),
        "every response carries x-request-id"
    );
    (status, response.json().await.expect("JSON error body"))
}

#[tokio::test]
async fn submit_rejections_leave_nothing_behind() {
    let app = TestApp::spawn_with(|c| c.max_source_bytes = 1000).await;
    let submit = |form: Form| {
        app.client
            .post(app.url("/api/builds/submit"))
            .header("X-API-Key", API_KEY)
            .multipart(form)
            .send()
    };

    let too_large = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(vec![7u8; 5000]).file_name("a.zip"));
    assert_eq!(
        error_of(submit(too_large).await.unwrap()).await,
        (413, json!({ "error": "Source file too large" }))
    );

    let no_source = Form::new().text("platform", "ios");
    assert_eq!(
        error_of(submit(no_source).await.unwrap()).await,
        (400, json!({ "error": "Source file required" }))
    );

    let bad_platform = Form::new()
        .text("platform", "windows")
        .part("source", Part::bytes(vec![1u8; 10]).file_name("a.zip"));
    assert_eq!(
        error_of(submit(bad_platform).await.unwrap()).await,
        (400, json!({ "error": "Valid platform required (ios|android)" }))
    );
    let no_platform = Form::new().part("source", Part::bytes(vec![1u8; 10]).file_name("a.zip"));
    assert_eq!(error_of(submit(no_platform).await.unwrap()).await.0, 400);

    let bad_priority = Form::new()
        .text("platform", "ios")
        .text("priority", "high")
        .part("source", Part::bytes(vec![1]).file_name("a"));
    assert_eq!(error_of(submit(bad_priority).await.unwrap()).await.0, 400);

    let not_multipart = app
        .client
        .post(app.url("/api/builds/submit"))
        .header("X-API-Key", API_KEY)
        .json(&json!({ "platform": "ios" }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(not_multipart).await,
        (400, json!({ "error": "Content must be multipart/form-data" }))
    );

    let no_key = app
        .client
        .post(app.url("/api/builds/submit"))
        .multipart(Form::new().text("platform", "ios"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(no_key).await,
        (401, json!({ "error": "Missing X-API-Key header" }))
    );
    let wrong_key = app
        .client
        .post(app.url("/api/builds/submit"))
        .header("X-API-Key", "wrong-key-wrong-key-wrong-key-wrong-key")
        .multipart(Form::new().text("platform", "ios"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(wrong_key).await, (403, json!({ "error": "Invalid API key" })));

    assert_eq!(app.count("builds").await, 0, "no row");
    assert!(app.stored_files().is_empty(), "no file: {:?}", app.stored_files());
}

#[tokio::test]
async fn invalid_ids_are_rejected_before_any_lookup() {
    let app = TestApp::spawn().await;
    let long = "x".repeat(65);
    for bad in [
        "a.b",
        "..%2F..%2Fetc",
        "%2e%2e",
        "%2E%2E",
        "a%00b",
        "%C3%A9t%C3%A9",
        "a%5Cb",
        "%2Fetc%2Fpasswd",
        &long,
    ] {
        let status = raw_status(
            &app.base,
            "GET",
            &format!("/api/builds/{bad}/status"),
            &[("X-API-Key", API_KEY)],
        )
        .await;
        assert_eq!(status, 400, "{bad}");
        let headers = [("X-API-Key", API_KEY), ("X-Worker-Id", "w")];
        assert_eq!(
            raw_status(&app.base, "GET", &format!("/api/builds/{bad}/source"), &headers).await,
            400,
            "{bad}"
        );
    }
    // A malformed worker id header is rejected too.
    let build_id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    let headers = [("X-API-Key", API_KEY), ("X-Worker-Id", "..%2F")];
    assert_eq!(
        raw_status(&app.base, "GET", &format!("/api/builds/{build_id}/source"), &headers).await,
        400
    );
    let r = app
        .client
        .get(app.url("/api/workers/poll"))
        .query(&[("worker_id", "../../etc")])
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = app
        .client
        .get(app.url("/api/builds/unknownbuild/status"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await, (404, json!({ "error": "Build not found" })));
}

#[tokio::test]
async fn worker_endpoint_errors_have_the_exact_wording() {
    let app = TestApp::spawn().await;
    let register = |body: Value| {
        app.client
            .post(app.url("/api/workers/register"))
            .header("X-API-Key", API_KEY)
            .json(&body)
            .send()
    };
    assert_eq!(
        error_of(register(json!({ "name": "x" })).await.unwrap()).await,
        (400, json!({ "error": "Name and capabilities required" }))
    );
    assert_eq!(
        error_of(register(json!({ "capabilities": {} })).await.unwrap()).await.0,
        400
    );
    let malformed = app
        .client
        .post(app.url("/api/workers/register"))
        .header("X-API-Key", API_KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (status, body) = error_of(malformed).await;
    assert_eq!(status, 400);
    assert!(body["error"].is_string());

    let poll = |q: &'static [(&str, &str)]| {
        app.client
            .get(app.url("/api/workers/poll"))
            .query(q)
            .header("X-API-Key", API_KEY)
            .send()
    };
    assert_eq!(
        error_of(poll(&[]).await.unwrap()).await,
        (400, json!({ "error": "worker_id required" }))
    );
    assert_eq!(
        error_of(poll(&[("worker_id", "nobody")]).await.unwrap()).await,
        (404, json!({ "error": "Worker not found" }))
    );
    let (worker_id, _) = app.register("w", &["ios"]).await;
    let r = app
        .client
        .get(app.url("/api/workers/poll"))
        .query(&[("worker_id", worker_id.as_str()), ("wait", "abc")])
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, 400);
    let r = app
        .client
        .get(app.url("/api/workers/poll"))
        .header("X-Worker-Token", "bogus")
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_of(r).await,
        (401, json!({ "error": "Invalid or expired worker token" }))
    );

    let upload = |form: Form| {
        app.client
            .post(app.url("/api/workers/upload"))
            .header("X-API-Key", API_KEY)
            .multipart(form)
            .send()
    };
    assert_eq!(
        error_of(upload(Form::new().text("success", "true")).await.unwrap()).await,
        (400, json!({ "error": "build_id and worker_id required" }))
    );
    assert_eq!(
        error_of(
            upload(
                Form::new()
                    .text("build_id", "nope")
                    .text("worker_id", worker_id.clone())
                    .text("success", "true")
            )
            .await
            .unwrap()
        )
        .await,
        (404, json!({ "error": "Build not found" }))
    );
    let too_big = |build_id: &str| {
        Form::new()
            .text("build_id", build_id.to_string())
            .text("worker_id", worker_id.clone())
            .text("success", "true")
            .part("result", Part::bytes(vec![0u8; 2 * 1024 * 1024]).file_name("r"))
    };
    // The form names the build before the file: an unknown build is refused before the file (T9).
    assert_eq!(
        error_of(upload(too_big("nope")).await.unwrap()).await,
        (404, json!({ "error": "Build not found" }))
    );
    assert!(app.stored_files().is_empty(), "{:?}", app.stored_files());

    // A held build: an oversized result, then none.
    let build_id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    app.poll(&worker_id).await;
    let stored_before = app.stored_files();
    assert_eq!(
        error_of(upload(too_big(&build_id)).await.unwrap()).await,
        (413, json!({ "error": "Result file too large" }))
    );
    assert_eq!(app.stored_files(), stored_before);
    assert_eq!(
        error_of(
            upload(
                Form::new()
                    .text("build_id", build_id)
                    .text("worker_id", worker_id)
                    .text("success", "true")
            )
            .await
            .unwrap()
        )
        .await,
        (400, json!({ "error": "Missing result file" }))
    );
}

#[tokio::test]
async fn framework_errors_are_json_too() {
    let app = TestApp::spawn().await;
    let r = app.client.get(app.url("/no/such/route")).send().await.unwrap();
    assert_eq!(error_of(r).await, (404, json!({ "error": "Not found" })));
    let r = app
        .client
        .delete(app.url("/api/workers/register"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await, (405, json!({ "error": "Method not allowed" })));
}

#[tokio::test]
async fn health_and_ready_answer_without_a_key() {
    let app = TestApp::spawn().await;
    app.submit("ios", b"s").await;
    for path in ["/health", "/api/health"] {
        let body: Value = app
            .client
            .get(app.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body, json!({ "status": "ok", "queue": { "pending": 1, "active": 0 } }));
    }
    let r = app.client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
