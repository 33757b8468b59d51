//! Keys with a role (identity.md): creation and bad input, revocation across instances, the worker
//! binding, enrollment keys, submitters owning their builds, G0 clients on their own keys, and the role
//! matrix generated from the route table.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Method;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use crate::support::{API_KEY, TestApp};

/// Creates a key with the admin key; answers (id, secret).
pub async fn create_key(app: &TestApp, name: &str, role: &str) -> (String, String) {
    create_key_with(app, json!({ "name": name, "role": role })).await
}

async fn create_key_with(app: &TestApp, body: Value) -> (String, String) {
    let r = app
        .client
        .post(app.url("/api/v2/keys"))
        .header("X-API-Key", API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "create key {body}");
    let created: Value = r.json().await.unwrap();
    (
        created["id"].as_str().unwrap().to_string(),
        created["key"].as_str().unwrap().to_string(),
    )
}

async fn call(app: &TestApp, method: Method, path: &str, key: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut request = app.client.request(method, app.url(path));
    if let Some(key) = key {
        request = request.header("X-API-Key", key);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The seed CLI's submit: multipart with source, certs, profile and the Apple fields, `X-API-Key`.
async fn seed_cli_submit(app: &TestApp, key: &str, source: &[u8]) -> (u16, Value) {
    let form = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(source.to_vec()).file_name("project.zip"))
        .part("certs", Part::bytes(b"\x30\x82P12".to_vec()).file_name("cert.p12"))
        .part(
            "profile",
            Part::bytes(b"PROFILE".to_vec()).file_name("a.mobileprovision"),
        )
        .text("appleId", "dev@example.com")
        .text("applePassword", "never-store-me");
    let r = app
        .client
        .post(app.url("/api/builds/submit"))
        .header("X-API-Key", key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn register_with(app: &TestApp, key: &str, id: Option<&str>) -> (u16, Value) {
    let mut body = json!({ "name": "volunteer mac", "capabilities": { "platforms": ["ios"] } });
    if let Some(id) = id {
        body["id"] = json!(id);
    }
    call(app, Method::POST, "/api/workers/register", Some(key), Some(body)).await
}

#[tokio::test]
async fn keys_are_shown_once_stored_as_hashes_and_bad_input_is_named() {
    let app = TestApp::spawn().await;
    let (status, created) = call(
        &app,
        Method::POST,
        "/api/v2/keys",
        Some(API_KEY),
        Some(json!({ "name": "wall screen", "role": "viewer", "expires_in_secs": 3600 })),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let secret = created["key"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(secret.starts_with("efa_") && secret.len() >= 4 + 27, "{secret}");
    assert_eq!(created["role"], "viewer");
    assert_eq!(created["weight"], 1);
    assert!(secret.starts_with(created["prefix"].as_str().unwrap()));
    assert!(created["expires_at"].is_string());

    // Never again: not in the listing, the detail, the table.
    let (_, list) = call(&app, Method::GET, "/api/v2/keys", Some(API_KEY), None).await;
    assert_eq!(list["items"][0]["id"], id.as_str());
    assert!(list["items"][0].get("key").is_none());
    let (_, shown) = call(&app, Method::GET, &format!("/api/v2/keys/{id}"), Some(API_KEY), None).await;
    assert!(shown.get("key").is_none() && shown["revoked_at"].is_null());
    assert!(!list.to_string().contains(&secret) && !shown.to_string().contains(&secret));
    let row: String = sqlx::query_scalar("SELECT row_to_json(k)::text FROM api_keys k")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(!row.contains(&secret[4..]), "the secret is stored");

    // The key works, with its role.
    let (status, _) = call(&app, Method::GET, "/api/v2/builds", Some(&secret), None).await;
    assert_eq!(status, 200);

    let bad = [
        (json!({ "name": "x", "role": "root" }), "Unknown role"),
        (json!({ "name": "x".repeat(257), "role": "viewer" }), "256 bytes"),
        (json!({ "name": "", "role": "viewer" }), "name required"),
        (
            json!({ "name": "x", "role": "viewer", "expires_in_secs": -5 }),
            "expiry in the past",
        ),
        (json!({ "name": "x", "role": "submitter", "weight": 0 }), "weight"),
        (json!({ "name": "x", "role": "submitter", "weight": 101 }), "weight"),
        (
            json!({ "name": "x", "role": "submitter", "max_queued": -1 }),
            "max_queued",
        ),
        (json!({ "name": "x", "role": "viewer", "enroll": true }), "enrollment"),
        (json!({ "name": "x", "role": "viewer", "colour": "red" }), ""),
    ];
    let before = app.count("api_keys").await;
    for (body, words) in bad {
        let (status, answer) = call(&app, Method::POST, "/api/v2/keys", Some(API_KEY), Some(body.clone())).await;
        assert_eq!(status, 400, "{body} → {answer}");
        assert!(answer["error"].as_str().unwrap().contains(words), "{body} → {answer}");
    }
    assert_eq!(app.count("api_keys").await, before, "bad input changed nothing");

    // Update, then revoke once (204), twice (409); unknown ids are 404.
    let (status, updated) = call(
        &app,
        Method::PATCH,
        &format!("/api/v2/keys/{id}"),
        Some(API_KEY),
        Some(json!({ "weight": 7, "max_running": 2 })),
    )
    .await;
    assert_eq!(
        (status, updated["weight"].clone(), updated["max_running"].clone()),
        (200, json!(7), json!(2))
    );
    let (status, _) = call(&app, Method::DELETE, &format!("/api/v2/keys/{id}"), Some(API_KEY), None).await;
    assert_eq!(status, 204);
    let (status, answer) = call(&app, Method::DELETE, &format!("/api/v2/keys/{id}"), Some(API_KEY), None).await;
    assert_eq!((status, answer["error"].clone()), (409, json!("Key already revoked")));
    let (status, _) = call(&app, Method::GET, "/api/v2/keys/nope", Some(API_KEY), None).await;
    assert_eq!(status, 404);
    let (status, answer) = call(&app, Method::GET, "/api/v2/builds", Some(&secret), None).await;
    assert_eq!((status, answer["error"].clone()), (401, json!("API key revoked")));

    // An expired key is refused with its reason.
    let (expiring, expiring_secret) = create_key(&app, "short", "viewer").await;
    sqlx::query("UPDATE api_keys SET expires_at = now() - interval '1 minute' WHERE id = $1")
        .bind(&expiring)
        .execute(&app.pool)
        .await
        .unwrap();
    tokio::time::sleep(expo_controller::identity::CACHE_TTL).await;
    let (status, answer) = call(&app, Method::GET, "/api/v2/builds", Some(&expiring_secret), None).await;
    assert_eq!((status, answer["error"].clone()), (401, json!("API key expired")));

    // Non-admins cannot manage keys; the built-in key always can.
    let (_, operator) = create_key(&app, "ops", "operator").await;
    let (status, answer) = call(&app, Method::GET, "/api/v2/keys", Some(&operator), None).await;
    assert_eq!(
        (status, answer),
        (403, json!({"error": "Insufficient role", "code": "insufficient_role"}))
    );
}

#[tokio::test]
async fn a_revoked_key_is_refused_by_another_instance_within_two_seconds() {
    let a = TestApp::spawn().await;
    let b = TestApp::spawn_on(&a).await;
    let (id, secret) = create_key(&a, "wall", "viewer").await;
    // Instance B has the key in its cache.
    for _ in 0..3 {
        let (status, _) = call(&b, Method::GET, "/api/v2/queues", Some(&secret), None).await;
        assert_eq!(status, 200);
    }
    let (status, _) = call(&a, Method::DELETE, &format!("/api/v2/keys/{id}"), Some(API_KEY), None).await;
    assert_eq!(status, 204);
    // At once on the instance that revoked it; on the other one no later than 2 s after.
    let (status, _) = call(&a, Method::GET, "/api/v2/queues", Some(&secret), None).await;
    assert_eq!(status, 401);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, answer) = call(&b, Method::GET, "/api/v2/queues", Some(&secret), None).await;
    assert_eq!((status, answer["error"].clone()), (401, json!("API key revoked")));
}

#[tokio::test]
async fn a_worker_key_acts_only_for_the_workers_it_registered() {
    let app = TestApp::spawn().await;
    let (key_a, secret_a) = create_key(&app, "alice's mac", "worker").await;
    let (_, secret_b) = create_key(&app, "bob's mac", "worker").await;
    let (status, mine) = register_with(&app, &secret_a, None).await;
    assert_eq!(status, 200, "{mine}");
    let mine = mine["id"].as_str().unwrap().to_string();
    let (_, theirs) = register_with(&app, &secret_b, None).await;
    let theirs = theirs["id"].as_str().unwrap().to_string();
    let bound: Option<String> = sqlx::query_scalar("SELECT registered_by FROM workers WHERE id = $1")
        .bind(&mine)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(bound.as_deref(), Some(key_a.as_str()));

    let poll = |worker: String, key: String| {
        let app = &app;
        async move {
            call(
                app,
                Method::GET,
                &format!("/api/workers/poll?worker_id={worker}"),
                Some(&key),
                None,
            )
            .await
        }
    };
    assert_eq!(
        poll(mine.clone(), secret_a.clone()).await,
        (200, json!({ "job": null }))
    );
    let refused = (403, json!({ "error": "Worker not registered with this key" }));
    assert_eq!(poll(theirs.clone(), secret_a.clone()).await, refused);
    assert_eq!(poll("no-such-worker".into(), secret_a.clone()).await, refused);
    // Nor take another's id over by re-registering it.
    let (status, answer) = register_with(&app, &secret_a, Some(&theirs)).await;
    assert_eq!((status, answer), refused);
    // The admin key still acts for any worker.
    assert_eq!(poll(theirs.clone(), API_KEY.into()).await.0, 200);

    // A build held by Bob's worker: Alice's key cannot report on it or read its source as Bob's worker.
    let build = app.submit("ios", b"SRC").await["id"].as_str().unwrap().to_string();
    let (status, job) = poll(theirs.clone(), secret_b.clone()).await;
    assert_eq!((status, job["job"]["id"].clone()), (200, json!(build)));
    let r = app
        .client
        .get(app.url(&format!("/api/builds/{build}/source")))
        .header("X-API-Key", &secret_a)
        .header("X-Worker-Id", &theirs)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let form = crate::support::success_form(&build, &theirs, b"IPA");
    let r = app
        .client
        .post(app.url("/api/workers/upload"))
        .header("X-API-Key", &secret_a)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(crate::support::state_of(&app.pool, &build).await, "assigned");

    // A worker key is no operator and no submitter.
    let (status, answer) = call(&app, Method::GET, "/api/v2/builds", Some(&secret_a), None).await;
    assert_eq!((status, answer["code"].clone()), (403, json!("insufficient_role")));
    let (status, answer) = seed_cli_submit(&app, &secret_a, b"SRC").await;
    assert_eq!((status, answer), (403, json!({ "error": "Invalid API key" })));
}

#[tokio::test]
async fn an_enrollment_key_registers_exactly_one_worker() {
    let app = TestApp::spawn().await;
    let (status, created) = call(
        &app,
        Method::POST,
        "/api/v2/keys",
        Some(API_KEY),
        Some(json!({ "name": "new volunteer", "role": "worker", "enroll": true })),
    )
    .await;
    assert_eq!(status, 201);
    // 24 h unless told otherwise.
    let expires = chrono::DateTime::parse_from_rfc3339(created["expires_at"].as_str().unwrap()).unwrap();
    let hours = (expires.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_minutes() as f64 / 60.0;
    assert!((23.9..=24.0).contains(&hours), "{hours}");
    let secret = created["key"].as_str().unwrap().to_string();

    // It only registers.
    let (status, _) = call(&app, Method::GET, "/api/workers/poll?worker_id=x", Some(&secret), None).await;
    assert_eq!(status, 403);

    let (status, registered) = register_with(&app, &secret, None).await;
    assert_eq!(status, 200, "{registered}");
    let token = registered["access_token"].as_str().unwrap().to_string();
    let (status, answer) = register_with(&app, &secret, None).await;
    assert_eq!(
        (status, answer),
        (401, json!({ "error": "Enrollment key already used" }))
    );
    assert_eq!(app.count("workers").await, 1);

    // The worker continues with its token.
    let r = app
        .client
        .get(app.url("/api/workers/poll"))
        .header("X-Worker-Token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// The seed repository's CLI on a `submitter` key and the Swift worker on a `worker` key, with their
/// exact G0 requests; a second submitter can neither see nor touch the first one's build.
#[tokio::test]
async fn g0_clients_work_on_their_own_keys_and_submitters_own_their_builds() {
    let app = TestApp::spawn().await;
    let (alice_id, alice) = create_key(&app, "alice ci", "submitter").await;
    let (_, bob) = create_key(&app, "bob", "submitter").await;
    let (_, mac) = create_key(&app, "volunteer", "worker").await;

    let (status, submitted) = seed_cli_submit(&app, &alice, b"PK\x03\x04 alice's app").await;
    assert_eq!(status, 200, "{submitted}");
    let build = submitted["id"].as_str().unwrap().to_string();
    let submitted_by: Option<String> = sqlx::query_scalar("SELECT submitted_by FROM builds WHERE id = $1")
        .bind(&build)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(submitted_by.as_deref(), Some(alice_id.as_str()));
    let (_, bobs) = seed_cli_submit(&app, &bob, b"bob's app").await;
    let bobs = bobs["id"].as_str().unwrap().to_string();

    // The seed CLI's `list`: a submitter sees its own builds only.
    let (status, list) = call(&app, Method::GET, "/api/builds", Some(&alice), None).await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![build.as_str()]);

    // The Swift worker: register, poll, source, log, upload, on its worker key.
    let (status, registered) = register_with(&app, &mac, None).await;
    assert_eq!(status, 200);
    let worker = registered["id"].as_str().unwrap().to_string();
    let (status, job) = call(
        &app,
        Method::GET,
        &format!("/api/workers/poll?worker_id={worker}"),
        Some(&mac),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let claimed = job["job"]["id"].as_str().unwrap().to_string();
    let source = app
        .client
        .get(app.url(&format!("/api/builds/{claimed}/source")))
        .header("X-API-Key", &mac)
        .header("X-Worker-Id", &worker)
        .send()
        .await
        .unwrap();
    assert_eq!(source.status(), 200);
    let r = app
        .client
        .post(app.url(&format!("/api/builds/{claimed}/logs")))
        .header("X-API-Key", &mac)
        .header("X-Worker-Id", &worker)
        .json(&json!({ "level": "info", "message": "building" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let form = crate::support::success_form(&claimed, &worker, b"IPA-BYTES");
    let r = app
        .client
        .post(app.url("/api/workers/upload"))
        .header("X-API-Key", &mac)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Whichever build the worker got, its submitter follows and downloads it; the other cannot.
    let (owner, stranger) = if claimed == build {
        (&alice, &bob)
    } else {
        (&bob, &alice)
    };
    let (status, answer) = call(
        &app,
        Method::GET,
        &format!("/api/builds/{claimed}/status"),
        Some(owner),
        None,
    )
    .await;
    assert_eq!((status, answer["status"].clone()), (200, json!("completed")));
    let r = app
        .client
        .get(app.url(&format!("/api/builds/{claimed}/download")))
        .header("X-API-Key", owner.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"IPA-BYTES");
    let not_found = (404, json!({ "error": "Build not found" }));
    for (method, path) in [
        (Method::GET, "status"),
        (Method::GET, "logs"),
        (Method::GET, "download"),
        (Method::POST, "cancel"),
        (Method::POST, "retry"),
    ] {
        let answer = call(
            &app,
            method,
            &format!("/api/builds/{claimed}/{path}"),
            Some(stranger),
            Some(json!({})),
        )
        .await;
        assert_eq!(answer, not_found, "{path}");
    }
    let other = if claimed == build { &bobs } else { &build };
    let (status, _) = call(
        &app,
        Method::POST,
        &format!("/api/builds/{other}/cancel"),
        Some(stranger),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200, "a submitter cancels its own build");
    // A retry of one's own build is one's own again.
    let (status, retried) = call(
        &app,
        Method::POST,
        &format!("/api/builds/{other}/retry"),
        Some(stranger),
        None,
    )
    .await;
    assert_eq!(status, 200, "{retried}");
    let (status, _) = call(
        &app,
        Method::GET,
        &format!("/api/builds/{}/status", retried["id"].as_str().unwrap()),
        Some(stranger),
        None,
    )
    .await;
    assert_eq!(status, 200);
}

/// The least role of every route, as identity.md's table says; a route missing here (a new one) or
/// here but gone fails the test.
const EXPECTED: &[(&str, &str, &str)] = &[
    ("get", "/health", "none"),
    ("get", "/ready", "none"),
    ("get", "/api/health", "none"),
    ("get", "/api/stats", "none"),
    ("get", "/api/v2/openapi.json", "none"),
    ("post", "/api/workers/register", "worker"),
    ("get", "/api/workers/poll", "worker"),
    ("post", "/api/workers/upload", "worker"),
    ("post", "/api/workers/result", "worker"),
    ("post", "/api/workers/fail", "worker"),
    ("post", "/api/workers/unregister", "none"),
    ("post", "/api/workers/abandon", "none"),
    ("get", "/api/builds/{id}/source", "worker"),
    ("get", "/api/builds/{id}/certs", "worker"),
    ("get", "/api/builds/{id}/certs-secure", "worker"),
    ("post", "/api/builds/{id}/logs", "worker"),
    ("post", "/api/builds/{id}/heartbeat", "worker"),
    ("post", "/api/builds/{id}/telemetry", "worker"),
    ("get", "/api/builds/{id}/vm-status", "worker"),
    ("post", "/api/builds/{id}/vm-ready", "none"),
    ("post", "/api/builds/{id}/artifact", "none"),
    ("post", "/api/builds/{id}/authenticate", "none"),
    ("post", "/api/diagnostics/report", "worker"),
    ("post", "/api/builds/submit", "submitter"),
    ("post", "/api/builds", "submitter"),
    ("get", "/api/builds/{id}/status", "submitter"),
    ("get", "/api/builds/{id}/logs", "submitter"),
    ("get", "/api/builds/{id}/download", "submitter"),
    ("get", "/api/builds/{id}/download/result", "submitter"),
    ("get", "/api/builds/{id}/download/source", "submitter"),
    ("post", "/api/builds/{id}/cancel", "submitter"),
    ("post", "/api/builds/{id}/retry", "submitter"),
    ("get", "/api/builds", "submitter_or_viewer"),
    ("get", "/api/builds/active", "viewer"),
    ("get", "/api/workers/{id}/stats", "viewer"),
    ("get", "/api/diagnostics/{worker_id}", "viewer"),
    ("get", "/api/diagnostics/{worker_id}/latest", "viewer"),
    ("get", "/metrics", "viewer"),
    ("get", "/api/v2/builds", "viewer"),
    ("get", "/api/v2/builds/{id}", "viewer"),
    ("get", "/api/v2/builds/{id}/attempts", "viewer"),
    ("get", "/api/v2/workers", "viewer"),
    ("get", "/api/v2/workers/{id}", "viewer"),
    ("get", "/api/v2/queues", "viewer"),
    ("get", "/api/v2/events", "viewer"),
    ("post", "/api/v2/builds/{id}/cancel", "operator"),
    ("post", "/api/v2/builds/{id}/retry", "operator"),
    ("post", "/api/v2/builds/{id}/requeue", "operator"),
    ("patch", "/api/v2/builds/{id}", "operator"),
    ("post", "/api/v2/workers/{id}/drain", "operator"),
    ("post", "/api/v2/workers/{id}/release", "operator"),
    ("post", "/api/v2/workers/{id}/disable", "operator"),
    ("post", "/api/v2/workers/{id}/enable", "operator"),
    ("post", "/api/v2/queues/{platform}/pause", "operator"),
    ("post", "/api/v2/queues/{platform}/resume", "operator"),
    ("post", "/api/workers/{id}/unregister", "operator"),
    ("delete", "/api/v2/builds/{id}", "admin"),
    ("post", "/api/v2/builds/{id}/tokens/revoke", "admin"),
    ("delete", "/api/v2/workers/{id}", "admin"),
    ("get", "/api/v2/keys", "admin"),
    ("post", "/api/v2/keys", "admin"),
    ("get", "/api/v2/keys/{id}", "admin"),
    ("patch", "/api/v2/keys/{id}", "admin"),
    ("delete", "/api/v2/keys/{id}", "admin"),
    ("get", "/api/v2/audit", "admin"),
    ("get", "/api/v2/webhooks", "submitter"),
    ("post", "/api/v2/webhooks", "submitter"),
    ("get", "/api/v2/webhooks/{id}", "submitter"),
    ("patch", "/api/v2/webhooks/{id}", "submitter"),
    ("delete", "/api/v2/webhooks/{id}", "submitter"),
    ("post", "/api/v2/webhooks/{id}/test", "submitter"),
    ("get", "/api/v2/webhooks/{id}/deliveries", "submitter"),
    ("post", "/api/v2/webhooks/deliveries/{id}/redeliver", "submitter"),
];

/// Who calls, in the order the matrix calls them (the admin last: its actions delete and revoke).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Who {
    NoKey,
    WrongKey,
    Revoked,
    Expired,
    Viewer,
    OtherSubmitter,
    Worker,
    Submitter,
    Operator,
    Admin,
}

impl Who {
    const ALL: [Who; 10] = [
        Who::NoKey,
        Who::WrongKey,
        Who::Revoked,
        Who::Expired,
        Who::Viewer,
        Who::OtherSubmitter,
        Who::Worker,
        Who::Submitter,
        Who::Operator,
        Who::Admin,
    ];

    fn admitted_by(self, role: &str) -> bool {
        let allowed: &[Who] = match role {
            "worker" => &[Who::Worker, Who::Admin],
            "submitter" => &[Who::Submitter, Who::OtherSubmitter, Who::Admin],
            "submitter_or_viewer" => &[
                Who::Submitter,
                Who::OtherSubmitter,
                Who::Viewer,
                Who::Operator,
                Who::Admin,
            ],
            "viewer" => &[Who::Viewer, Who::Operator, Who::Admin],
            "operator" => &[Who::Operator, Who::Admin],
            "admin" => &[Who::Admin],
            other => panic!("unknown role {other}"),
        };
        allowed.contains(&self)
    }
}

/// Every route × every caller answers as the role table implies: no key 401, a wrong key 403, a
/// revoked or expired key 401 with its reason, too small a role 403 (`Insufficient role` on `/api/v2`,
/// `Invalid API key` on G0 routes), another submitter's build 404, and an admitted caller is never
/// refused for its credential. Generated from the served route table, which must match [`EXPECTED`].
#[tokio::test]
async fn role_matrix_from_the_route_table() {
    let app = TestApp::spawn().await;
    let (_, doc) = call(&app, Method::GET, "/api/v2/openapi.json", None, None).await;
    let mut served = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let role = operation["x-role"].as_str().unwrap_or("undecided").to_string();
            served.insert((method.clone(), path.clone()), role);
        }
    }
    let expected: BTreeMap<(String, String), String> = EXPECTED
        .iter()
        .map(|(m, p, r)| ((m.to_string(), p.to_string()), r.to_string()))
        .collect();
    assert_eq!(
        served, expected,
        "the route table and the role table differ: decide the role of every route"
    );

    // The cast.
    let (_, submitter) = create_key(&app, "alice", "submitter").await;
    let (_, other_submitter) = create_key(&app, "bob", "submitter").await;
    let (_, worker_key) = create_key(&app, "mac", "worker").await;
    let (_, viewer) = create_key(&app, "wall", "viewer").await;
    let (_, operator) = create_key(&app, "ops", "operator").await;
    let (revoked_id, revoked) = create_key(&app, "gone", "admin").await;
    let (expired_id, expired) = create_key(&app, "old", "admin").await;
    let (target_key, _) = create_key(&app, "target", "viewer").await;
    call(
        &app,
        Method::DELETE,
        &format!("/api/v2/keys/{revoked_id}"),
        Some(API_KEY),
        None,
    )
    .await;
    sqlx::query("UPDATE api_keys SET expires_at = now() - interval '1 minute' WHERE id = $1")
        .bind(&expired_id)
        .execute(&app.pool)
        .await
        .unwrap();
    let (status, build) = seed_cli_submit(&app, &submitter, b"SRC").await;
    assert_eq!(status, 200);
    let build = build["id"].as_str().unwrap().to_string();
    let (_, worker) = register_with(&app, &worker_key, None).await;
    let worker = worker["id"].as_str().unwrap().to_string();
    let wrong = format!("efa_{}", "A".repeat(43));

    let mut failures = Vec::new();
    for who in Who::ALL {
        let key = match who {
            Who::NoKey => None,
            Who::WrongKey => Some(wrong.as_str()),
            Who::Revoked => Some(revoked.as_str()),
            Who::Expired => Some(expired.as_str()),
            Who::Viewer => Some(viewer.as_str()),
            Who::OtherSubmitter => Some(other_submitter.as_str()),
            Who::Worker => Some(worker_key.as_str()),
            Who::Submitter => Some(submitter.as_str()),
            Who::Operator => Some(operator.as_str()),
            Who::Admin => Some(API_KEY),
        };
        for (method, path, role) in EXPECTED {
            let concrete = path
                .replace("/keys/{id}", &format!("/keys/{target_key}"))
                .replace("/workers/{id}", &format!("/workers/{worker}"))
                .replace("{worker_id}", &worker)
                .replace("{id}", &build)
                .replace("{platform}", "ios");
            let concrete = if *path == "/api/workers/poll" {
                format!("{concrete}?worker_id={worker}")
            } else {
                concrete
            };
            let mut request = app
                .client
                .request(
                    Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                    app.url(&concrete),
                )
                .timeout(Duration::from_secs(10));
            if let Some(key) = key {
                request = request.header("X-API-Key", key).header("X-Worker-Id", &worker);
            }
            if *method != "get" && *method != "delete" {
                request = request.json(&json!({}));
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            // Only refusals are read (the event stream never ends).
            let body: Value = if matches!(status, 401 | 403 | 404) {
                response.json().await.unwrap_or(Value::Null)
            } else {
                Value::Null
            };
            let error = body["error"].as_str().unwrap_or("").to_string();
            let native = path.starts_with("/api/v2/");
            let refused_for_key = (status == 401)
                || (status == 403
                    && matches!(
                        error.as_str(),
                        "Invalid API key" | "Insufficient role" | "Worker not registered with this key"
                    ));
            let ok = if *role == "none" {
                // The key changes nothing: public, or a token the caller does not have.
                matches!(status, 200 | 400 | 401)
                    && (status != 401 || error.starts_with("Missing X-") || error.contains("token"))
            } else {
                match who {
                    Who::NoKey => status == 401 && error.starts_with("Missing"),
                    Who::WrongKey => status == 403 && error == "Invalid API key",
                    Who::Revoked => status == 401 && error == "API key revoked",
                    Who::Expired => status == 401 && error == "API key expired",
                    _ if !who.admitted_by(role) => {
                        let wording = if native { "Insufficient role" } else { "Invalid API key" };
                        status == 403 && error == wording && (!native || body["code"] == "insufficient_role")
                    }
                    Who::OtherSubmitter if *role == "submitter" && path.starts_with("/api/builds/{id}") => {
                        (status, error.as_str()) == (404, "Build not found")
                    }
                    _ => !refused_for_key,
                }
            };
            if !ok {
                failures.push(format!("{who:?} {} {path} → {status} {body}", method.to_uppercase()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} answers differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

async fn dashboard_page(app: &TestApp, client: &reqwest::Client, cookie: &str, path: &str) -> String {
    let r = client.get(app.url(path)).header("cookie", cookie).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.text().await.unwrap()
}

/// The dashboard signs in with viewer, operator and admin keys and names who is signed in; a viewer sees
/// no action controls and a forged action post is 403 (nothing changes); an operator acts but does not
/// revoke; worker and submitter keys do not sign in; a revoked key's session ends.
#[tokio::test]
async fn the_dashboard_knows_who_signed_in_and_what_the_role_may_do() {
    let app = TestApp::spawn().await;
    let client = crate::dashboard::no_redirects();
    let (viewer_id, viewer) = create_key(&app, "lobby screen", "viewer").await;
    let (_, operator) = create_key(&app, "night shift", "operator").await;
    let (_, worker_key) = create_key(&app, "mac", "worker").await;
    let (_, submitter) = create_key(&app, "ci", "submitter").await;
    let (worker, _) = app.register("mac mini", &["ios"]).await;
    let build = app.submit("ios", b"SRC").await["id"].as_str().unwrap().to_string();

    for key in [&worker_key, &submitter] {
        assert_eq!(crate::dashboard::sign_in_as(&app, &client, key).await, Err(401));
    }

    let cookie = crate::dashboard::sign_in_as(&app, &client, &viewer).await.unwrap();
    let workers = dashboard_page(&app, &client, &cookie, "/dashboard/workers").await;
    assert!(
        workers.contains("lobby screen · viewer"),
        "the top bar names the key and role"
    );
    assert!(
        !workers.contains("/drain") && !workers.contains("/revoke"),
        "no action controls for a viewer"
    );
    let build_page = dashboard_page(&app, &client, &cookie, &format!("/dashboard/builds/{build}")).await;
    assert!(!build_page.contains("/cancel") && !build_page.contains("Set priority"));
    let builds = dashboard_page(&app, &client, &cookie, "/dashboard/builds").await;
    assert!(!builds.contains("/dashboard/builds/bulk"));
    // The session's token is on the page (log out); a forged action with it is still refused.
    let csrf = crate::dashboard::csrf_of(&workers);
    let forged = [
        (format!("/dashboard/workers/{worker}/drain"), format!("csrf={csrf}")),
        (format!("/dashboard/builds/{build}/cancel"), format!("csrf={csrf}")),
        ("/dashboard/queues/ios/pause".to_string(), format!("csrf={csrf}")),
        (
            "/dashboard/builds/bulk".to_string(),
            format!("csrf={csrf}&action=cancel&id={build}"),
        ),
    ];
    for (path, body) in &forged {
        let r = crate::dashboard::post_form(&client, &app, path, Some(&cookie), body.clone()).await;
        assert_eq!(r.status(), 403, "{path}");
    }
    let r = client
        .get(app.url(&format!("/dashboard/builds/{build}/download/source")))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "no sources for a viewer");
    assert_eq!(crate::support::worker_status(&app.pool, &worker).await, "idle");
    assert_eq!(crate::support::state_of(&app.pool, &build).await, "pending");
    let (_, queues) = call(&app, Method::GET, "/api/v2/queues", Some(API_KEY), None).await;
    assert!(queues.to_string().contains("\"paused\":false") && !queues.to_string().contains("\"paused\":true"));

    // An operator acts, but revoking a worker is the admin's.
    let ops = crate::dashboard::sign_in_as(&app, &client, &operator).await.unwrap();
    let workers = dashboard_page(&app, &client, &ops, "/dashboard/workers").await;
    assert!(workers.contains("night shift · operator"));
    assert!(workers.contains("/drain") && !workers.contains("/revoke"));
    let csrf = crate::dashboard::csrf_of(&workers);
    let r = crate::dashboard::post_form(
        &client,
        &app,
        &format!("/dashboard/workers/{worker}/revoke"),
        Some(&ops),
        format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(r.status(), 403);
    let r = crate::dashboard::post_form(
        &client,
        &app,
        &format!("/dashboard/workers/{worker}/drain"),
        Some(&ops),
        format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(r.status(), 303);
    let admin_state: String = sqlx::query_scalar("SELECT admin_state FROM workers WHERE id = $1")
        .bind(&worker)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(admin_state, "draining");

    // The built-in key signs in as admin and sees Revoke.
    let admin = crate::dashboard::sign_in_as(&app, &client, API_KEY).await.unwrap();
    let workers = dashboard_page(&app, &client, &admin, "/dashboard/workers").await;
    assert!(workers.contains("admin · admin") && workers.contains("/revoke"));

    // Revoking the viewer's key ends its session (within the session cache's lifetime).
    call(
        &app,
        Method::DELETE,
        &format!("/api/v2/keys/{viewer_id}"),
        Some(API_KEY),
        None,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = client
        .get(app.url("/dashboard/workers"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "a revoked key's session is over");
}

/// The admin's Keys page: create (the secret on the answer, once), list without secrets, revoke; other
/// roles get neither the link nor the page.
#[tokio::test]
async fn the_keys_page_is_the_admins() {
    let app = TestApp::spawn().await;
    let client = crate::dashboard::no_redirects();
    let (_, operator) = create_key(&app, "night shift", "operator").await;
    let ops = crate::dashboard::sign_in_as(&app, &client, &operator).await.unwrap();
    let page = dashboard_page(&app, &client, &ops, "/dashboard/workers").await;
    assert!(!page.contains("href=\"/dashboard/keys\""));
    let r = client
        .get(app.url("/dashboard/keys"))
        .header("cookie", &ops)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let csrf = crate::dashboard::csrf_of(&page);
    let r = crate::dashboard::post_form(
        &client,
        &app,
        "/dashboard/keys",
        Some(&ops),
        format!("csrf={csrf}&name=sneaky&role=admin"),
    )
    .await;
    assert_eq!(r.status(), 403);
    assert_eq!(app.count("api_keys").await, 1, "an operator creates no key");

    let admin = crate::dashboard::sign_in_as(&app, &client, API_KEY).await.unwrap();
    let page = dashboard_page(&app, &client, &admin, "/dashboard/keys").await;
    assert!(page.contains("href=\"/dashboard/keys\"") && page.contains("night shift"));
    let csrf = crate::dashboard::csrf_of(&page);
    let r = crate::dashboard::post_form(
        &client,
        &app,
        "/dashboard/keys",
        Some(&admin),
        format!("csrf={csrf}&name=app+team&role=submitter&expires_in_days=30"),
    )
    .await;
    assert_eq!(r.status(), 200);
    let created = r.text().await.unwrap();
    let at = created.find("id=\"new-key-secret\">").expect("the new secret") + "id=\"new-key-secret\">".len();
    let secret = created[at..].split('<').next().unwrap().to_string();
    assert!(secret.starts_with("efa_"));
    let (status, _) = seed_cli_submit(&app, &secret, b"SRC").await;
    assert_eq!(status, 200, "the new submitter key submits");
    let listed = dashboard_page(&app, &client, &admin, "/dashboard/keys").await;
    assert!(
        listed.contains("app team") && !listed.contains(&secret),
        "listed, never with its secret"
    );
    // Bad input is named, nothing is created.
    let r = crate::dashboard::post_form(
        &client,
        &app,
        "/dashboard/keys",
        Some(&admin),
        format!("csrf={csrf}&name=x&role=root"),
    )
    .await;
    assert!(r.text().await.unwrap().contains("Unknown role"));
    assert_eq!(app.count("api_keys").await, 2);

    let id: String = sqlx::query_scalar("SELECT id FROM api_keys WHERE name = 'app team'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let r = crate::dashboard::post_form(
        &client,
        &app,
        &format!("/dashboard/keys/{id}/revoke"),
        Some(&admin),
        format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(r.status(), 303);
    let (status, answer) = seed_cli_submit(&app, &secret, b"SRC").await;
    assert_eq!((status, answer["error"].clone()), (401, json!("API key revoked")));
}
