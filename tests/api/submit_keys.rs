//! Idempotent submits (`Idempotency-Key`, webhooks.md): one build per key and submitter, also under 64
//! concurrent identical submits, on both submit routes; a changed request with a used key is 422.

use std::collections::BTreeSet;

use reqwest::multipart::{Form, Part};
use serde_json::Value;

use crate::identity::create_key;
use crate::support::{API_KEY, TestApp};

fn form(platform: &str, source: &[u8]) -> Form {
    Form::new()
        .part("source", Part::bytes(source.to_vec()).file_name("app.zip"))
        .text("platform", platform.to_string())
}

async fn submit(app: &TestApp, path: &str, key: &str, idempotency: Option<&str>, form: Form) -> (u16, Value) {
    let mut request = app.client.post(app.url(path)).header("X-API-Key", key).multipart(form);
    if let Some(idempotency) = idempotency {
        request = request.header("Idempotency-Key", idempotency);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn builds(app: &TestApp) -> i64 {
    app.count("builds").await
}

/// 64 identical submits at once with one key: one build, every answer its id and token, one source
/// object stored.
#[tokio::test]
async fn sixty_four_concurrent_identical_submits_make_one_build() {
    let app = TestApp::spawn().await;
    let source = vec![7u8; 64 * 1024];
    let answers = futures_util::future::join_all((0..64).map(|_| {
        let (app, source) = (&app, &source);
        async move {
            submit(
                app,
                "/api/builds/submit",
                API_KEY,
                Some("ci-run-1"),
                form("ios", source),
            )
            .await
        }
    }))
    .await;
    let ids: BTreeSet<String> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 200, "{body}");
            body["id"].as_str().unwrap().to_string()
        })
        .collect();
    let tokens: BTreeSet<&str> = answers
        .iter()
        .map(|(_, b)| b["access_token"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(tokens.len(), 1);
    assert_eq!(builds(&app).await, 1);
    // The token answered to the replays is the build's.
    let id = ids.first().unwrap();
    let r = app
        .client
        .get(app.url(&format!("/api/builds/{id}/status")))
        .header("X-Build-Token", *tokens.first().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // What the 63 replays streamed was discarded: one source object is left.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let files = app.stored_files();
        let sources = files.iter().filter(|f| f.contains("source")).count();
        if sources == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{files:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The same key on the other submit route answers the same build (201 there).
    let (status, body) = submit(&app, "/api/builds", API_KEY, Some("ci-run-1"), form("ios", &source)).await;
    assert_eq!((status, body["id"].as_str()), (201, Some(id.as_str())));
    assert_eq!(builds(&app).await, 1);
}

/// A used key with another platform or source size is 422 `idempotency_key_reused` and creates nothing;
/// keys are per submitter; a malformed key is 400 before the body is read; no key, no deduplication.
#[tokio::test]
async fn a_changed_request_with_a_used_key_is_refused() {
    let app = TestApp::spawn().await;
    let (status, first) = submit(&app, "/api/builds/submit", API_KEY, Some("k1"), form("ios", b"PK one")).await;
    assert_eq!(status, 200);
    for changed in [form("android", b"PK one"), form("ios", b"PK one but longer")] {
        let (status, body) = submit(&app, "/api/builds/submit", API_KEY, Some("k1"), changed).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["code"], "idempotency_key_reused", "{body}");
    }
    assert_eq!(builds(&app).await, 1);
    // Another submitter's "k1" is its own.
    let (_, alice) = create_key(&app, "alice", "submitter").await;
    let (status, theirs) = submit(&app, "/api/builds/submit", &alice, Some("k1"), form("ios", b"PK one")).await;
    assert_eq!(status, 200);
    assert_ne!(theirs["id"], first["id"]);
    let (_, again) = submit(&app, "/api/builds/submit", &alice, Some("k1"), form("ios", b"PK one")).await;
    assert_eq!(again["id"], theirs["id"]);
    assert_eq!(builds(&app).await, 2);
    // Malformed keys.
    for bad in ["x".repeat(256), String::new()] {
        let (status, body) = submit(&app, "/api/builds/submit", API_KEY, Some(&bad), form("ios", b"PK")).await;
        assert_eq!(status, 400, "{body}");
    }
    // Without a key, every submit is a build.
    submit(&app, "/api/builds/submit", API_KEY, None, form("ios", b"PK one")).await;
    submit(&app, "/api/builds/submit", API_KEY, None, form("ios", b"PK one")).await;
    assert_eq!(builds(&app).await, 4);
    // A refused submit (bad platform) does not use the key up.
    let (status, _) = submit(&app, "/api/builds/submit", API_KEY, Some("k2"), form("beos", b"PK")).await;
    assert_eq!(status, 400);
    let (status, _) = submit(&app, "/api/builds/submit", API_KEY, Some("k2"), form("android", b"PK")).await;
    assert_eq!(status, 200);
    assert_eq!(builds(&app).await, 5);
}

async fn submit_fields(app: &TestApp, key: &str, platform: &str, fields: &[(&str, &str)]) -> String {
    let mut form = form(platform, b"PK source");
    for (name, value) in fields {
        form = form.text(name.to_string(), value.to_string());
    }
    let (status, body) = submit(app, "/api/builds/submit", key, None, form).await;
    assert_eq!(status, 200, "{body}");
    body["id"].as_str().unwrap().to_string()
}

async fn state_and_error(app: &TestApp, id: &str) -> (String, Option<String>) {
    sqlx::query_as("SELECT state, error_message FROM builds WHERE id = $1")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// A submit with a `supersede_key` cancels its submitter's older queued builds with that key and
/// platform (`Superseded by <id>`, with the cancel's event and audit row); running ones only with
/// `supersede_running=true`; other keys, platforms and submitters are untouched.
#[tokio::test]
async fn a_submit_supersedes_older_builds_with_its_key() {
    let app = TestApp::spawn().await;
    let (_, alice) = create_key(&app, "alice", "submitter").await;
    let (_, bob) = create_key(&app, "bob", "submitter").await;
    let main = [("supersede_key", "app/main")];
    let running = submit_fields(&app, &alice, "ios", &main).await;
    let (worker, _) = app.register("mac", &["ios"]).await;
    let job = app.poll(&worker).await;
    assert_eq!(job["job"]["id"], running.as_str(), "{job}");
    let queued = submit_fields(&app, &alice, "ios", &main).await;
    let android = submit_fields(&app, &alice, "android", &main).await;
    let other_key = submit_fields(&app, &alice, "ios", &[("supersede_key", "app/feature")]).await;
    let no_key = submit_fields(&app, &alice, "ios", &[]).await;
    let bobs = submit_fields(&app, &bob, "ios", &main).await;

    let newer = submit_fields(&app, &alice, "ios", &main).await;
    assert_eq!(
        state_and_error(&app, &queued).await,
        ("cancelled".to_string(), Some(format!("Superseded by {newer}")))
    );
    for untouched in [&android, &other_key, &no_key, &bobs, &newer] {
        assert_eq!(state_and_error(&app, untouched).await.0, "pending", "{untouched}");
    }
    assert_eq!(state_and_error(&app, &running).await.0, "assigned");
    // The G0 status says why.
    let status = app.admin_json(&format!("/api/builds/{queued}/status")).await;
    assert_eq!(
        status["error_message"],
        format!("Superseded by {newer}").as_str(),
        "{status}"
    );
    // As any cancel: an event with the reason, an audit row by the submitter.
    let reason: String =
        sqlx::query_scalar("SELECT data->>'reason' FROM events WHERE kind = 'build.cancelled' AND build_id = $1")
            .bind(&queued)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(reason, "superseded");
    let audited: String =
        sqlx::query_scalar("SELECT actor_name FROM audit_events WHERE action = 'build.cancel' AND target_id = $1")
            .bind(&queued)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(audited, "alice");

    // supersede_running=true: the running one goes too (its worker learns at its next heartbeat).
    let newest = submit_fields(
        &app,
        &alice,
        "ios",
        &[("supersede_key", "app/main"), ("supersede_running", "true")],
    )
    .await;
    for gone in [&running, &newer] {
        assert_eq!(
            state_and_error(&app, gone).await,
            ("cancelled".to_string(), Some(format!("Superseded by {newest}"))),
            "{gone}"
        );
    }
    assert_eq!(state_and_error(&app, &newest).await.0, "pending");
    assert_eq!(state_and_error(&app, &android).await.0, "pending");
    // Bad fields are 400 and create nothing.
    let before = builds(&app).await;
    for fields in [
        vec![("supersede_key", "k"), ("supersede_running", "maybe")],
        vec![("supersede_running", "true")],
    ] {
        let mut form = form("ios", b"PK");
        for (name, value) in fields {
            form = form.text(name, value);
        }
        let (status, body) = submit(&app, "/api/builds/submit", &alice, None, form).await;
        assert_eq!(status, 400, "{body}");
    }
    let long = "k".repeat(256);
    let (status, _) = submit(
        &app,
        "/api/builds/submit",
        &alice,
        None,
        form("ios", b"PK").text("supersede_key", long),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(builds(&app).await, before);
}

/// A submitter key with `max_queued` (v2 keys route).
async fn submitter_with_quota(app: &TestApp, name: &str, max_queued: i64) -> String {
    let r = app
        .client
        .post(app.url("/api/v2/keys"))
        .header("X-API-Key", API_KEY)
        .json(&serde_json::json!({ "name": name, "role": "submitter", "max_queued": max_queued }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    body["key"].as_str().unwrap().to_string()
}

/// The CI retry of a submit whose answer was lost gets its build, even though that build filled the
/// submitter's quota; a new submit is refused.
#[tokio::test]
async fn a_retried_submit_gets_its_build_although_it_filled_the_quota() {
    let app = TestApp::spawn().await;
    let alice = submitter_with_quota(&app, "alice", 1).await;
    let (status, first) = submit(&app, "/api/builds/submit", &alice, Some("run-7"), form("ios", b"PK")).await;
    assert_eq!(status, 200, "{first}");
    let (status, again) = submit(&app, "/api/builds/submit", &alice, Some("run-7"), form("ios", b"PK")).await;
    assert_eq!((status, &again["id"]), (200, &first["id"]), "{again}");
    let (status, other) = submit(&app, "/api/builds/submit", &alice, Some("run-8"), form("ios", b"PK")).await;
    assert_eq!(status, 429, "{other}");
    assert_eq!(other["code"], "submitter_queue_full");
    assert_eq!(builds(&app).await, 1);
}

/// Two submits that both pass the quota check before their bodies (both upload at once) meet the
/// quota again at the insert: one build, one 429.
#[tokio::test]
async fn submits_uploading_at_once_are_held_to_the_quota_at_the_insert() {
    use bytes::Bytes;
    let app = TestApp::spawn().await;
    let alice = submitter_with_quota(&app, "alice", 1).await;
    let mut senders = Vec::new();
    let mut pending = Vec::new();
    for _ in 0..2 {
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let stream = futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx));
        let form = Form::new().text("platform", "ios").part(
            "source",
            Part::stream(reqwest::Body::wrap_stream(stream)).file_name("app.zip"),
        );
        let request = app
            .client
            .post(app.url("/api/builds/submit"))
            .header("X-API-Key", &alice)
            .multipart(form)
            .send();
        pending.push(tokio::spawn(request));
        senders.push(sender);
    }
    for sender in &senders {
        sender.send(Ok(Bytes::from_static(b"PK first half"))).await.unwrap();
    }
    // Both are past the check before the body: each has its source key recorded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_writes WHERE key LIKE '%source%'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        if recorded == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "both uploads should be under way");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(senders);
    let mut statuses = Vec::new();
    for p in pending {
        let r = p.await.unwrap().unwrap();
        statuses.push(r.status().as_u16());
    }
    statuses.sort();
    assert_eq!(statuses, vec![200, 429]);
    assert_eq!(builds(&app).await, 1);
}

/// Submits with one supersede key leave only the newest queued, whichever marks first.
#[tokio::test]
async fn superseding_submits_marked_in_either_order_leave_the_newest() {
    let app = TestApp::spawn().await;
    let older = submit_fields(&app, API_KEY, "ios", &[]).await;
    let newer = submit_fields(&app, API_KEY, "ios", &[]).await;
    let actor = expo_controller::audit::Actor::cli();
    let now = chrono::Utc::now();
    // The newer submit marks first (it sees no older build marked yet), then the older one.
    expo_controller::queue::supersede::supersede(&app.pool, &newer, "app/main", false, now, &actor)
        .await
        .unwrap();
    expo_controller::queue::supersede::supersede(&app.pool, &older, "app/main", false, now, &actor)
        .await
        .unwrap();
    assert_eq!(
        state_and_error(&app, &older).await,
        ("cancelled".to_string(), Some(format!("Superseded by {newer}")))
    );
    assert_eq!(state_and_error(&app, &newer).await.0, "pending");
}

/// A repeated `platform` or `requirements` part is refused (each would run the matching queries again).
#[tokio::test]
async fn a_repeated_platform_part_is_refused() {
    let app = TestApp::spawn().await;
    let form = Form::new()
        .text("platform", "ios")
        .text("platform", "ios")
        .part("source", Part::bytes(b"PK".to_vec()).file_name("app.zip"));
    let (status, body) = submit(&app, "/api/builds/submit", API_KEY, None, form).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "Duplicate platform field");
    assert_eq!(builds(&app).await, 0);
}
