//! The operator API (`/api/v2`) and its event stream.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::support::{API_KEY, TestApp, success_form};

async fn v2(app: &TestApp, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = app.client.request(method, app.url(path)).header("X-API-Key", API_KEY);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

use reqwest::Method;

#[tokio::test]
async fn builds_are_listed_with_cursors_filters_and_etags() {
    let app = TestApp::spawn().await;
    for n in 0..5 {
        app.submit(if n < 3 { "ios" } else { "android" }, b"s").await;
    }
    let (status, page) = v2(&app, Method::GET, "/api/v2/builds?limit=2", None).await;
    assert_eq!(status, 200);
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let (_, next) = v2(
        &app,
        Method::GET,
        &format!("/api/v2/builds?limit=2&cursor={cursor}"),
        None,
    )
    .await;
    assert_eq!(next["items"].as_array().unwrap().len(), 2);
    let (_, last) = v2(
        &app,
        Method::GET,
        &format!(
            "/api/v2/builds?limit=2&cursor={}",
            next["next_cursor"].as_str().unwrap()
        ),
        None,
    )
    .await;
    assert_eq!(last["items"].as_array().unwrap().len(), 1);
    assert_eq!(last["next_cursor"], Value::Null);
    let (_, ios) = v2(&app, Method::GET, "/api/v2/builds?platform=ios&state=pending", None).await;
    assert_eq!(ios["items"].as_array().unwrap().len(), 3);
    assert!(ios["items"][0]["submitted_at"].as_str().unwrap().ends_with('Z'));
    let (_, none) = v2(&app, Method::GET, "/api/v2/builds?since=2999-01-01T00:00:00Z", None).await;
    assert_eq!(none["items"], json!([]));
    for bad in ["state=done", "limit=0", "since=yesterday", "platform=tv"] {
        assert_eq!(
            v2(&app, Method::GET, &format!("/api/v2/builds?{bad}"), None).await.0,
            400,
            "{bad}"
        );
    }
    // ETag: a second read with If-None-Match is 304.
    let r = app
        .client
        .get(app.url("/api/v2/builds?platform=ios"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let r = app
        .client
        .get(app.url("/api/v2/builds?platform=ios"))
        .header("X-API-Key", API_KEY)
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(v2(&app, Method::GET, "/api/v2/builds", None).await.0, 200);
    let r = app.client.get(app.url("/api/v2/builds")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn an_operator_pauses_drains_requeues_retries_patches_and_deletes() {
    // No requeue cool-off: the requeued build may go back to the only worker (R51 tests the cool-off).
    let app = TestApp::spawn_with(|c| c.queue.requeue_cooloff_secs = 0).await;
    let (worker_id, _) = app.register("w", &["ios"]).await;

    // Pause: nothing is handed out; the queue view says so.
    assert_eq!(v2(&app, Method::POST, "/api/v2/queues/ios/pause", None).await.0, 200);
    let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    assert_eq!(app.poll(&worker_id).await["job"], Value::Null);
    let (_, queues) = v2(&app, Method::GET, "/api/v2/queues", None).await;
    let ios = queues["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "ios")
        .unwrap()
        .clone();
    assert_eq!(ios["paused"], true);
    assert_eq!(ios["depth"]["pending"], 1);
    assert!(ios["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(v2(&app, Method::POST, "/api/v2/queues/ios/resume", None).await.0, 200);
    assert_eq!(v2(&app, Method::POST, "/api/v2/queues/tv/pause", None).await.0, 404);

    // Patch while queued; refused once running.
    let (status, patched) = v2(
        &app,
        Method::PATCH,
        &format!("/api/v2/builds/{id}"),
        Some(json!({ "priority": 50, "max_attempts": 5 })),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        (patched["priority"].as_i64(), patched["max_attempts"].as_i64()),
        (Some(50), Some(5))
    );
    assert_eq!(
        v2(
            &app,
            Method::PATCH,
            &format!("/api/v2/builds/{id}"),
            Some(json!({ "priority": 500 }))
        )
        .await
        .0,
        400
    );
    assert_eq!(app.poll(&worker_id).await["job"]["id"], id.as_str());
    assert_eq!(
        v2(
            &app,
            Method::PATCH,
            &format!("/api/v2/builds/{id}"),
            Some(json!({ "priority": 1 }))
        )
        .await
        .0,
        409
    );

    // Drain: the worker keeps its build but gets no new one.
    let (_, drained) = v2(&app, Method::POST, &format!("/api/v2/workers/{worker_id}/drain"), None).await;
    assert_eq!(drained["admin_state"], "draining");
    let other = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    assert_eq!(
        app.poll(&worker_id).await["job"]["id"],
        id.as_str(),
        "its own build is re-delivered"
    );

    // Requeue the running attempt: the build is pending again, the worker idle.
    let (status, requeued) = v2(&app, Method::POST, &format!("/api/v2/builds/{id}/requeue"), None).await;
    assert_eq!((status, requeued["state"].as_str()), (200, Some("pending")));
    assert_eq!(
        v2(&app, Method::POST, &format!("/api/v2/builds/{id}/requeue"), None)
            .await
            .0,
        409
    );
    assert_eq!(app.poll(&worker_id).await["job"], Value::Null, "draining: nothing new");
    v2(&app, Method::POST, &format!("/api/v2/workers/{worker_id}/enable"), None).await;
    assert_eq!(
        app.poll(&worker_id).await["job"]["id"],
        id.as_str(),
        "priority 50 first"
    );

    // Cancel then retry the same build; detail shows attempts and errors.
    assert_eq!(
        v2(&app, Method::POST, &format!("/api/v2/builds/{id}/cancel"), None)
            .await
            .0,
        200
    );
    assert_eq!(
        v2(&app, Method::POST, &format!("/api/v2/builds/{id}/cancel"), None)
            .await
            .0,
        409
    );
    let (status, retried) = v2(&app, Method::POST, &format!("/api/v2/builds/{id}/retry"), None).await;
    assert_eq!(
        (status, retried["id"].as_str(), retried["state"].as_str()),
        (200, Some(id.as_str()), Some("pending"))
    );
    assert_eq!(
        v2(&app, Method::POST, &format!("/api/v2/builds/{other}/retry"), None)
            .await
            .0,
        409
    );
    let (_, detail) = v2(&app, Method::GET, &format!("/api/v2/builds/{id}"), None).await;
    assert_eq!(detail["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(detail["attempts"][0]["outcome"], "requeued");
    assert_eq!(detail["attempts"][1]["outcome"], "cancelled");
    assert_eq!(detail["artifacts"]["source"]["size"], 1);
    let (_, attempts) = v2(&app, Method::GET, &format!("/api/v2/builds/{id}/attempts"), None).await;
    assert_eq!(attempts["items"].as_array().unwrap().len(), 2);

    // Delete: only finished builds; files and rows go.
    assert_eq!(
        v2(&app, Method::DELETE, &format!("/api/v2/builds/{id}"), None).await.0,
        409
    );
    v2(&app, Method::POST, &format!("/api/v2/builds/{other}/cancel"), None).await;
    let r = app
        .client
        .delete(app.url(&format!("/api/v2/builds/{other}")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        v2(&app, Method::GET, &format!("/api/v2/builds/{other}"), None).await.0,
        404
    );
    assert!(app.stored_files().iter().all(|f| !f.contains(&other)));
}

#[tokio::test]
async fn revoking_a_worker_and_a_build_token() {
    let app = TestApp::spawn().await;
    let (worker_id, token) = app.register("w", &["android"]).await;
    let submitted = app.submit("android", b"s").await;
    let id = submitted["id"].as_str().unwrap().to_string();
    let build_token = submitted["access_token"].as_str().unwrap().to_string();
    app.client
        .get(app.url("/api/workers/poll"))
        .header("X-Worker-Token", &token)
        .send()
        .await
        .unwrap();

    let (status, worker) = v2(&app, Method::DELETE, &format!("/api/v2/workers/{worker_id}"), None).await;
    assert_eq!(
        (status, worker["admin_state"].as_str(), worker["status"].as_str()),
        (200, Some("revoked"), Some("offline"))
    );
    let r = app
        .client
        .get(app.url("/api/workers/poll"))
        .header("X-Worker-Token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (_, build) = v2(&app, Method::GET, &format!("/api/v2/builds/{id}"), None).await;
    assert_eq!(build["state"], "retryable", "its attempt went back to the queue");
    let (_, workers) = v2(&app, Method::GET, "/api/v2/workers", None).await;
    assert_eq!(workers["items"][0]["id"], worker_id.as_str());

    let status_url = app.url(&format!("/api/builds/{id}/status"));
    assert_eq!(
        app.client
            .get(&status_url)
            .header("X-Build-Token", &build_token)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        v2(&app, Method::POST, &format!("/api/v2/builds/{id}/tokens/revoke"), None)
            .await
            .0,
        200
    );
    assert_eq!(
        app.client
            .get(&status_url)
            .header("X-Build-Token", &build_token)
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
}

async fn sse_subscribers(app: &TestApp) -> f64 {
    let text = app
        .client
        .get(app.url("/metrics"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with("expo_sse_subscribers "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(-1.0)
}

#[tokio::test]
async fn the_event_stream_delivers_changes_in_order_and_releases_gone_subscribers() {
    let app = TestApp::spawn().await;
    let response = app
        .client
        .get(app.url("/api/v2/events"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert_eq!(sse_subscribers(&app).await, 1.0);

    let (worker_id, _) = app.register("w", &["ios"]).await;
    let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    app.poll(&worker_id).await;
    let form = success_form(&id, &worker_id, b"r");
    app.upload_form(form).await;

    let mut stream = response.bytes_stream();
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !text.contains("build.completed") && Instant::now() < deadline {
        if let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    let kinds: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(
        kinds,
        vec![
            "worker.registered",
            "build.submitted",
            "build.assigned",
            "build.completed"
        ],
        "{text}"
    );
    assert!(text.contains(&id));

    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sse_subscribers(&app).await != 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        sse_subscribers(&app).await,
        0.0,
        "the subscription ended with its client"
    );
}

/// A refused operator action ends its transaction at once: a dropped one is rolled back only when the
/// pool next uses its connection, and until then its row lock hid the pending build from claims
/// (`SKIP LOCKED`), so the poll right after a refused retry, patch or requeue answered `{"job": null}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_action_does_not_hide_the_build_from_the_next_poll() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("w", &["ios"]).await;
    for round in 0..12 {
        let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
        let refused = match round % 2 {
            0 => v2(&app, Method::POST, &format!("/api/v2/builds/{id}/retry"), None).await,
            _ => v2(&app, Method::POST, &format!("/api/v2/builds/{id}/requeue"), None).await,
        };
        assert_eq!(refused.0, 409, "round {round}: {}", refused.1);
        let polled = app.poll(&worker_id).await;
        assert_eq!(polled["job"]["id"], id.as_str(), "round {round}: {polled}");
        let (status, _) = v2(&app, Method::POST, &format!("/api/v2/builds/{id}/cancel"), None).await;
        assert_eq!(status, 200);
    }
}
