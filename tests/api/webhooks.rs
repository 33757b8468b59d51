//! Webhooks (webhooks.md): deliveries signed the Standard Webhooks way (verified with the reference
//! library, not with code of ours), subscriptions scoped to a submitter key's own builds, a receiver
//! down for a while then up, a controller killed right after the changes, the SSRF refusals, and the
//! delivery rows committed (or rolled back) with the event.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use crate::identity::create_key;
use crate::support::{API_KEY, TestApp, free_port, fresh_database, serve_command, wait_ready};

/// One request a receiver got.
#[derive(Clone)]
struct Hit {
    headers: HeaderMap,
    body: Bytes,
}

impl Hit {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("json body")
    }

    fn message_id(&self) -> String {
        self.headers["webhook-id"].to_str().expect("id").to_string()
    }
}

/// A webhook receiver on loopback: records every request and answers with `status`.
struct Receiver {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    status: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

type ReceiverState = (Arc<Mutex<Vec<Hit>>>, Arc<AtomicU16>);

async fn record(State((hits, status)): State<ReceiverState>, headers: HeaderMap, body: Bytes) -> StatusCode {
    hits.lock().unwrap().push(Hit { headers, body });
    StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap()
}

impl Receiver {
    async fn start() -> Receiver {
        Self::on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    fn on(listener: tokio::net::TcpListener) -> Receiver {
        let hits = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(200));
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(record))
            .with_state((hits.clone(), status.clone()));
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            addr,
            hits,
            status,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Waits (at most `secs`) until `done` holds for the hits so far.
    async fn wait_until(&self, secs: u64, done: impl Fn(&[Hit]) -> bool) -> Vec<Hit> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let hits = self.hits();
            if done(&hits) {
                return hits;
            }
            assert!(
                Instant::now() < deadline,
                "receiver did not get what was expected in {secs} s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Kinds delivered per build id.
fn kinds_by_build(hits: &[Hit]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for hit in hits {
        let body = hit.json();
        if let (Some(build), Some(kind)) = (body["build_id"].as_str(), body["kind"].as_str()) {
            out.entry(build.to_string()).or_default().insert(kind.to_string());
        }
    }
    out
}

async fn call(app: &TestApp, method: reqwest::Method, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = app.client.request(method, app.url(path)).header("X-API-Key", key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn subscribe(app: &TestApp, key: &str, url: &str, events: &[&str]) -> Value {
    let (status, body) = call(
        app,
        reqwest::Method::POST,
        "/api/v2/webhooks",
        key,
        Some(json!({ "url": url, "events": events, "description": "test" })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body
}

async fn submit_as(base: &str, client: &reqwest::Client, key: &str) -> String {
    let form = Form::new()
        .part(
            "source",
            Part::bytes(b"PK\x03\x04 source".to_vec()).file_name("app.zip"),
        )
        .text("platform", "ios");
    let r = client
        .post(format!("{base}/api/builds/submit"))
        .header("X-API-Key", key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    body["id"].as_str().unwrap().to_string()
}

/// A subscription's deliveries page, as the admin reads it.
async fn deliveries(app: &TestApp, id: &str) -> (u16, Value) {
    call(
        app,
        reqwest::Method::GET,
        &format!("/api/v2/webhooks/{id}/deliveries"),
        API_KEY,
        None,
    )
    .await
}

/// Waits (at most 10 s) until no delivery is pending or in flight: every attempt is recorded.
async fn settled(pool: &sqlx::PgPool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE state IN ('pending', 'delivering')")
                .fetch_one(pool)
                .await
                .unwrap();
        if open == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{open} deliveries still open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn allow_private() -> TestApp {
    TestApp::spawn_with(|c| c.webhooks.webhook_allow_private = true).await
}

/// Every delivery carries the `/api/v2/events` object, signed so that the Standard Webhooks reference
/// library accepts it; a changed body or another secret is rejected by the same library.
#[tokio::test]
async fn deliveries_verify_with_the_standard_webhooks_library() {
    let app = allow_private().await;
    let receiver = Receiver::start().await;
    let created = subscribe(&app, API_KEY, &receiver.url(), &["build.submitted"]).await;
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"), "{created}");
    // The secret is shown once: never in a listing or a view.
    let (_, listed) = call(&app, reqwest::Method::GET, "/api/v2/webhooks", API_KEY, None).await;
    assert!(!listed.to_string().contains(secret));
    assert!(listed["items"][0].get("secret").is_none());

    let build = app.submit("ios", b"PK\x03\x04 source").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let hits = receiver.wait_until(10, |h| !h.is_empty()).await;
    let hit = &hits[0];
    let body = hit.json();
    assert_eq!(body["kind"], "build.submitted");
    assert_eq!(body["build_id"], build.as_str());
    assert_eq!(body["platform"], "ios");
    assert!(body["id"].as_i64().is_some(), "{body}");

    let verifier = standardwebhooks::Webhook::new(secret).expect("secret");
    let mut headers = axum::http::HeaderMap::new();
    for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        headers.insert(name, hit.headers[name].clone());
    }
    verifier.verify(&hit.body, &headers).expect("signature verifies");
    let mut tampered = hit.body.to_vec();
    tampered.push(b' ');
    assert!(verifier.verify(&tampered, &headers).is_err());
    let other = standardwebhooks::Webhook::new(&expo_controller::webhooks::new_secret()).unwrap();
    assert!(other.verify(&hit.body, &headers).is_err());

    // The delivery and its attempt are visible.
    let id = created["id"].as_str().unwrap();
    settled(&app.pool).await;
    let (status, page) = deliveries(&app, id).await;
    assert_eq!(status, 200);
    let delivery = &page["items"][0];
    assert_eq!(delivery["state"], "delivered", "{page}");
    assert_eq!(delivery["message_id"], hit.message_id().as_str());
    assert_eq!(delivery["attempts"][0]["status_code"], 200);

    // Redelivery: the same message id again.
    let (status, _) = call(
        &app,
        reqwest::Method::POST,
        &format!("/api/v2/webhooks/deliveries/{}/redeliver", delivery["id"]),
        API_KEY,
        None,
    )
    .await;
    assert_eq!(status, 202);
    let hits = receiver.wait_until(10, |h| h.len() >= 2).await;
    assert_eq!(hits[1].message_id(), hits[0].message_id());
    assert_eq!(hits[1].body, hits[0].body);
}

/// Several subscriptions, each with its own secret, to the same events, in a burst (so that one claim
/// takes deliveries of one event to several subscriptions, which share the event's body and open each
/// secret once): every request verifies with its own subscription's secret and no other, the bodies of
/// one event are the same bytes at every receiver, and each delivery has its own message id.
#[tokio::test]
async fn deliveries_of_one_event_to_several_subscriptions_are_each_signed_with_their_own_secret() {
    let app = allow_private().await;
    let receivers = [
        Receiver::start().await,
        Receiver::start().await,
        Receiver::start().await,
    ];
    let mut verifiers = Vec::new();
    for receiver in &receivers {
        let created = subscribe(&app, API_KEY, &receiver.url(), &["build.submitted"]).await;
        verifiers.push(standardwebhooks::Webhook::new(created["secret"].as_str().unwrap()).expect("secret"));
    }
    const BURST: usize = 20;
    futures_util::future::join_all((0..BURST).map(|_| app.submit("ios", b"PK\x03\x04 source"))).await;
    let mut bodies: BTreeMap<i64, BTreeSet<Vec<u8>>> = BTreeMap::new();
    let mut message_ids = BTreeSet::new();
    for (n, receiver) in receivers.iter().enumerate() {
        let hits = receiver.wait_until(20, |h| h.len() >= BURST).await;
        assert_eq!(hits.len(), BURST);
        for hit in &hits {
            let mut headers = HeaderMap::new();
            for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
                headers.insert(name, hit.headers[name].clone());
            }
            for (m, verifier) in verifiers.iter().enumerate() {
                assert_eq!(
                    verifier.verify(&hit.body, &headers).is_ok(),
                    m == n,
                    "receiver {n}'s request checked with subscription {m}'s secret"
                );
            }
            assert!(message_ids.insert(hit.message_id()), "one message id per delivery");
            let event = hit.json()["id"].as_i64().expect("event id");
            bodies.entry(event).or_default().insert(hit.body.to_vec());
        }
    }
    assert_eq!(bodies.len(), BURST, "one event per build");
    assert!(
        bodies.values().all(|b| b.len() == 1),
        "one body per event at every receiver"
    );
}

/// A burst of deliveries (claimed and recorded in batches) reaches the receiver once each; a first-try
/// success is recorded on the delivery row alone (no `webhook_attempts` row) yet listed as its attempt,
/// and a redelivery keeps that earlier success in the history.
#[tokio::test]
async fn a_burst_is_delivered_once_each_and_first_try_successes_stay_listed() {
    let app = allow_private().await;
    let receiver = Receiver::start().await;
    let created = subscribe(&app, API_KEY, &receiver.url(), &["build.submitted"]).await;
    let id = created["id"].as_str().unwrap();
    const BURST: usize = 40;
    let submitted = futures_util::future::join_all((0..BURST).map(|_| app.submit("ios", b"PK\x03\x04 source"))).await;
    let builds: BTreeSet<String> = submitted
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(builds.len(), BURST);
    receiver.wait_until(20, |h| h.len() >= BURST).await;
    settled(&app.pool).await;
    let hits = receiver.hits();
    assert_eq!(hits.len(), BURST, "each delivery sent once");
    let ids: BTreeSet<String> = hits.iter().map(Hit::message_id).collect();
    assert_eq!(ids.len(), BURST);
    let delivered: BTreeSet<String> = hits
        .iter()
        .map(|h| h.json()["build_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(delivered, builds);
    assert_eq!(
        app.count("webhook_attempts").await,
        0,
        "first-try successes insert no attempt row"
    );

    let (status, page) = call(
        &app,
        reqwest::Method::GET,
        &format!("/api/v2/webhooks/{id}/deliveries?limit=100"),
        API_KEY,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let items = page["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), BURST, "{page}");
    for d in &items {
        assert_eq!(d["state"], "delivered", "{d}");
        let attempts = d["attempts"].as_array().cloned().unwrap_or_default();
        assert_eq!(attempts.len(), 1, "{d}");
        assert_eq!(attempts[0]["status_code"], 200, "{d}");
        assert!(
            attempts[0]["error"].is_null() && attempts[0]["next_retry_at"].is_null(),
            "{d}"
        );
        assert!(
            attempts[0]["at"].is_string() && attempts[0]["latency_ms"].is_i64(),
            "{d}"
        );
    }

    // Redelivered: the earlier success stays in the history, the new one is listed after it.
    let first = &items[0];
    let (status, _) = call(
        &app,
        reqwest::Method::POST,
        &format!("/api/v2/webhooks/deliveries/{}/redeliver", first["id"]),
        API_KEY,
        None,
    )
    .await;
    assert_eq!(status, 202);
    receiver.wait_until(10, |h| h.len() > BURST).await;
    settled(&app.pool).await;
    let (_, view) = call(
        &app,
        reqwest::Method::GET,
        &format!("/api/v2/webhooks/{id}/deliveries?limit=1"),
        API_KEY,
        None,
    )
    .await;
    let again = &view["items"][0];
    assert_eq!(again["id"], first["id"], "{view}");
    assert_eq!(again["state"], "delivered", "{view}");
    let attempts = again["attempts"].as_array().cloned().unwrap_or_default();
    assert_eq!(attempts.len(), 2, "{view}");
    assert_eq!(attempts[0]["at"], first["attempts"][0]["at"], "{view}");
    assert!(attempts.iter().all(|a| a["status_code"] == 200), "{view}");
}

/// A submitter key's subscription carries only its own builds; the admin's carries every build. A
/// submitter sees and changes only its own subscriptions.
#[tokio::test]
async fn a_submitters_subscription_carries_only_its_own_builds() {
    let app = allow_private().await;
    let (_, alice) = create_key(&app, "alice", "submitter").await;
    let (_, bob) = create_key(&app, "bob", "submitter").await;
    let (alice_hook, admin_hook) = (Receiver::start().await, Receiver::start().await);
    let mine = subscribe(&app, &alice, &alice_hook.url(), &["build.*"]).await;
    let every = subscribe(&app, API_KEY, &admin_hook.url(), &["*"]).await;
    assert_eq!(mine["owner_name"], "alice");
    assert!(every["owner"].is_null());

    let alices = submit_as(&app.base, &app.client, &alice).await;
    let bobs = submit_as(&app.base, &app.client, &bob).await;
    let admins = submit_as(&app.base, &app.client, API_KEY).await;
    admin_hook.wait_until(10, |h| kinds_by_build(h).len() == 3).await;
    alice_hook.wait_until(10, |h| !h.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = kinds_by_build(&alice_hook.hits());
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        vec![alices.clone()],
        "{seen:?}"
    );
    let all = kinds_by_build(&admin_hook.hits());
    for build in [&alices, &bobs, &admins] {
        assert!(all.contains_key(build.as_str()), "{all:?}");
    }

    // Alice lists only hers; the admin's and Bob's view of hers are 404.
    let (_, listed) = call(&app, reqwest::Method::GET, "/api/v2/webhooks", &alice, None).await;
    let ids: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![mine["id"].as_str().unwrap()]);
    let every_path = format!("/api/v2/webhooks/{}", every["id"].as_str().unwrap());
    let mine_path = format!("/api/v2/webhooks/{}", mine["id"].as_str().unwrap());
    assert_eq!(call(&app, reqwest::Method::GET, &every_path, &alice, None).await.0, 404);
    assert_eq!(
        call(&app, reqwest::Method::DELETE, &every_path, &alice, None).await.0,
        404
    );
    assert_eq!(call(&app, reqwest::Method::DELETE, &mine_path, &bob, None).await.0, 404);
    // The admin sees both; a viewer none.
    let (_, listed) = call(&app, reqwest::Method::GET, "/api/v2/webhooks", API_KEY, None).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);
    let (_, viewer) = create_key(&app, "val", "viewer").await;
    assert_eq!(
        call(&app, reqwest::Method::GET, "/api/v2/webhooks", &viewer, None)
            .await
            .0,
        403
    );
    // Alice deletes hers: nothing more arrives there.
    assert_eq!(
        call(&app, reqwest::Method::DELETE, &mine_path, &alice, None).await.0,
        204
    );
    let before = alice_hook.hits().len();
    submit_as(&app.base, &app.client, &alice).await;
    admin_hook.wait_until(10, |h| kinds_by_build(h).len() == 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(alice_hook.hits().len(), before);
}

/// A receiver that is down (nothing listening) gets every event once it is up, each with the message
/// id of its first attempt; the failed attempts are recorded with their next retry.
#[tokio::test]
async fn a_receiver_down_for_a_while_gets_everything_once_up() {
    let app = allow_private().await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let created = subscribe(&app, API_KEY, &url, &["build.submitted"]).await;
    let id = created["id"].as_str().unwrap();
    let mut builds = BTreeSet::new();
    for _ in 0..3 {
        builds.insert(
            app.submit("ios", b"PK\x03\x04 source").await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // Every delivery fails at least once while the receiver is down.
    let deadline = Instant::now() + Duration::from_secs(10);
    let first_ids = loop {
        let (_, page) = deliveries(&app, id).await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        if items.len() == 3
            && items
                .iter()
                .all(|d| d["attempts"].as_array().is_some_and(|a| !a.is_empty()))
        {
            for d in &items {
                let attempt = &d["attempts"][0];
                assert!(attempt["status_code"].is_null(), "{attempt}");
                assert!(
                    attempt["error"].as_str().is_some_and(|e| e.contains("connection")),
                    "{attempt}"
                );
                assert!(attempt["next_retry_at"].is_string(), "{attempt}");
                // Waiting for its next try (or already in it: the first retry comes after about 1 s).
                assert!(d["state"] == "pending" || d["state"] == "delivering", "{d}");
            }
            break items
                .iter()
                .map(|d| d["message_id"].as_str().unwrap().to_string())
                .collect::<BTreeSet<_>>();
        }
        assert!(Instant::now() < deadline, "deliveries were not attempted: {page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Up, but failing with 503 for a while, then healthy.
    let receiver = Receiver::on(tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap());
    receiver.status.store(503, Ordering::SeqCst);
    receiver.wait_until(20, |h| !h.is_empty()).await;
    receiver.status.store(200, Ordering::SeqCst);
    receiver
        .wait_until(30, |h| {
            let ok: BTreeSet<String> = h
                .iter()
                .map(|hit| hit.json()["build_id"].as_str().unwrap_or("").to_string())
                .collect();
            builds.iter().all(|b| ok.contains(b)) && h.len() >= 4
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, page) = deliveries(&app, id).await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        if items.iter().all(|d| d["state"] == "delivered") {
            break;
        }
        assert!(Instant::now() < deadline, "not all delivered: {page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let hits = receiver.hits();
    let seen: BTreeSet<String> = hits.iter().map(Hit::message_id).collect();
    assert_eq!(seen, first_ids, "retries carry the message id of the first attempt");
    let builds_seen: BTreeSet<String> = hits
        .iter()
        .map(|h| h.json()["build_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(builds_seen, builds);
}

struct Controller(Child);

impl Controller {
    fn start(database_url: &str, storage: &std::path::Path, port: u16, certs_key: &str) -> Controller {
        Controller(
            serve_command(database_url, storage, port, certs_key)
                .env("RUST_LOG", "warn")
                .env("CONTROLLER_WEBHOOK_ALLOW_PRIVATE", "true")
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn controller"),
        )
    }

    fn kill(mut self) {
        let _ = self.0.kill(); // SIGKILL
        let _ = self.0.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Deliveries are committed with their changes: a controller killed (-9) right after the changes,
/// before anything reached the receiver, delivers every event after its restart.
#[tokio::test]
async fn a_controller_killed_after_the_changes_delivers_everything_after_restart() {
    let (url, pool) = fresh_database(2).await;
    let storage = std::env::temp_dir().join(format!("expo-webhooks-{}", expo_controller::ids::new_id()));
    let certs_key = expo_controller::ids::new_key32();
    let client = reqwest::Client::new();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let controller = Controller::start(&url, &storage, port, &certs_key);
    wait_ready(&client, &base).await;

    // The receiver is not up yet: nothing can be delivered before the kill.
    let hook_port = free_port();
    let r = client
        .post(format!("{base}/api/v2/webhooks"))
        .header("X-API-Key", API_KEY)
        .json(&json!({ "url": format!("http://127.0.0.1:{hook_port}/hook"), "events": ["build.*"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mut builds = BTreeSet::new();
    for _ in 0..5 {
        builds.insert(submit_as(&base, &client, API_KEY).await);
    }
    controller.kill();
    let expected: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE kind LIKE 'build.%'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(expected >= 5);
    let delivered: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(delivered, 0);

    let receiver = Receiver::on(tokio::net::TcpListener::bind(("127.0.0.1", hook_port)).await.unwrap());
    let controller = Controller::start(&url, &storage, port, &certs_key);
    wait_ready(&client, &base).await;
    let hits = receiver
        .wait_until(60, |h| {
            h.iter()
                .map(|hit| hit.json()["id"].as_i64())
                .collect::<BTreeSet<_>>()
                .len() as i64
                == expected
        })
        .await;
    let seen: BTreeSet<String> = hits
        .iter()
        .map(|h| h.json()["build_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(seen, builds);
    controller.kill();
    let _ = std::fs::remove_dir_all(&storage);
}

/// Cloud metadata addresses are refused at creation whatever the setting; private literals too unless
/// allowed; a name that resolves to loopback is accepted at creation but never connected to.
#[tokio::test]
async fn private_and_metadata_targets_are_refused() {
    let app = TestApp::spawn().await;
    for url in [
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://127.0.0.1:9/hook",
        "http://[::1]:9/hook",
        "http://10.0.0.1/hook",
        "ftp://example.com/hook",
    ] {
        let (status, body) = call(
            &app,
            reqwest::Method::POST,
            "/api/v2/webhooks",
            API_KEY,
            Some(json!({ "url": url, "events": ["*"] })),
        )
        .await;
        assert_eq!(status, 400, "{url}: {body}");
        assert_eq!(body["code"], "webhook_target_refused", "{url}: {body}");
    }
    assert_eq!(app.count("webhook_subscriptions").await, 0);

    // localhost passes creation (it is a name) and is refused after resolution, at connect time.
    let receiver = Receiver::start().await;
    let url = format!("http://localhost:{}/hook", receiver.addr.port());
    let created = subscribe(&app, API_KEY, &url, &["build.submitted"]).await;
    app.submit("ios", b"PK\x03\x04 source").await;
    let id = created["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, page) = deliveries(&app, id).await;
        if let Some(error) = page["items"][0]["attempts"][0]["error"].as_str() {
            assert!(error.contains("refused"), "{error}");
            break;
        }
        assert!(Instant::now() < deadline, "no attempt: {page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(receiver.hits().is_empty());

    // A metadata address is refused even where private targets are allowed.
    let open = allow_private().await;
    let (status, body) = call(
        &open,
        reqwest::Method::POST,
        "/api/v2/webhooks",
        API_KEY,
        Some(json!({ "url": "http://169.254.169.254/", "events": ["*"] })),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("webhook_target_refused")));
}

/// The delivery row exists exactly when the event's transaction committed.
#[tokio::test]
async fn delivery_rows_commit_and_roll_back_with_the_event() {
    let app = allow_private().await;
    let receiver = Receiver::start().await;
    subscribe(&app, API_KEY, &receiver.url(), &["test.*"]).await;
    let mut tx = app.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO events (kind, data) VALUES ('test.rolled_back', '{}')")
        .execute(&mut *tx)
        .await
        .unwrap();
    let inside: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(inside, 1, "written by the event's own transaction");
    tx.rollback().await.unwrap();
    assert_eq!(app.count("webhook_deliveries").await, 0);
    sqlx::query("INSERT INTO events (kind, data) VALUES ('test.committed', '{}'), ('other.kind', '{}')")
        .execute(&app.pool)
        .await
        .unwrap();
    let hits = receiver.wait_until(10, |h| !h.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.hits().len(), 1);
    assert_eq!(hits[0].json()["kind"], "test.committed");
}

/// Runs `expo-controller webhooks … --json` over HTTP (`--server`) or on the database; (success, JSON).
fn cli(app: &TestApp, over_http: bool, args: &[&str]) -> (bool, Value) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_expo-controller"));
    command
        .env_remove("DATABASE_URL")
        .env_remove("CONTROLLER_URL")
        .env_remove("CONTROLLER_API_KEY")
        .env_remove("CONTROLLER_CERTS_KEY")
        .args(["webhooks", "--json"]);
    if over_http {
        command.args(["--server", &app.base, "--api-key", API_KEY]);
    } else {
        command.args(["--database-url", &app.database_url]);
    }
    let output = command.args(args).output().unwrap();
    let text = if output.status.success() {
        output.stdout
    } else {
        output.stderr
    };
    (
        output.status.success(),
        serde_json::from_slice(&text).unwrap_or(Value::Null),
    )
}

/// `webhooks create|list|show|test|deliveries|redeliver|delete` in both modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_webhooks_in_both_modes() {
    let app = allow_private().await;
    let receiver = Receiver::start().await;
    let url = receiver.url();
    let (ok, created) = cli(
        &app,
        true,
        &["create", "--url", &url, "--event", "build.completed,build.failed"],
    );
    assert!(ok, "{created}");
    assert!(created["secret"].as_str().is_some_and(|s| s.starts_with("whsec_")));
    assert_eq!(created["events"], json!(["build.completed", "build.failed"]));
    let id = created["id"].as_str().unwrap();
    for over_http in [true, false] {
        let (ok, listed) = cli(&app, over_http, &["list"]);
        assert!(ok, "{listed}");
        assert_eq!(listed["items"][0]["id"], id);
        assert!(listed["items"][0].get("secret").is_none());
        let (ok, shown) = cli(&app, over_http, &["show", id]);
        assert!(ok && shown["url"] == url.as_str(), "{shown}");
    }
    // Database mode cannot seal a secret without the server's certs key: a clear refusal.
    let (ok, refused) = cli(&app, false, &["create", "--url", &url, "--event", "*"]);
    assert!(
        !ok && refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("CONTROLLER_CERTS_KEY")),
        "{refused}"
    );
    let (ok, refused) = cli(
        &app,
        true,
        &["create", "--url", "http://169.254.169.254/", "--event", "*"],
    );
    assert!(!ok && refused["code"] == "webhook_target_refused", "{refused}");

    let (ok, queued) = cli(&app, true, &["test", id]);
    assert!(ok && queued["kind"] == "webhook.test", "{queued}");
    let hits = receiver.wait_until(10, |h| !h.is_empty()).await;
    assert_eq!(hits[0].json()["kind"], "webhook.test");
    settled(&app.pool).await;
    let (ok, deliveries) = cli(&app, false, &["deliveries", id]);
    assert!(ok && deliveries["items"][0]["state"] == "delivered", "{deliveries}");
    let delivery = deliveries["items"][0]["id"].to_string();
    let (ok, again) = cli(&app, true, &["redeliver", &delivery]);
    // Queued again with the same message id (the delivery loop may already be sending it).
    assert!(
        ok && again["message_id"] == deliveries["items"][0]["message_id"],
        "{again}"
    );
    receiver.wait_until(10, |h| h.len() == 2).await;
    let (ok, _) = cli(&app, true, &["delete", id]);
    assert!(ok);
    let (ok, gone) = cli(&app, false, &["show", id]);
    assert!(!ok && gone["error"] == "Webhook not found", "{gone}");
}

/// The dashboard's Webhooks page (the admin's): create one (the secret shown on the answer, once),
/// its deliveries listed with their answers, a test sent; a viewer has no such page.
#[tokio::test]
async fn the_dashboard_webhooks_page() {
    use crate::dashboard::{csrf_of, no_redirects, post_form, sign_in, sign_in_as};
    let app = allow_private().await;
    let receiver = Receiver::start().await;
    let client = no_redirects();
    let cookie = sign_in(&app, &client).await;
    let page = |cookie: String| {
        let (client, url) = (client.clone(), app.url("/dashboard/webhooks"));
        async move {
            let r = client.get(url).header("cookie", cookie).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (status, html) = page(cookie.clone()).await;
    assert_eq!(status, 200);
    assert!(html.contains("No webhooks yet."));
    let csrf = csrf_of(&html);
    let body = format!(
        "csrf={csrf}&url={}&events=build.submitted%2Cbuild.cancelled&description=CI",
        form_urlencoded::byte_serialize(receiver.url().as_bytes()).collect::<String>()
    );
    let r = post_form(&client, &app, "/dashboard/webhooks", Some(&cookie), body).await;
    assert_eq!(r.status(), 200);
    let created = r.text().await.unwrap();
    let secret = created
        .split("id=\"new-webhook-secret\">")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap();
    assert!(secret.starts_with("whsec_"), "{secret}");

    let build = app.submit("ios", b"PK\x03\x04 source").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    receiver.wait_until(10, |h| !h.is_empty()).await;
    settled(&app.pool).await;
    let (_, html) = page(cookie.clone()).await;
    assert!(!html.contains(secret), "the secret is shown once");
    assert!(html.contains(&receiver.url()) && html.contains("build.submitted"));
    assert!(html.contains(&build[..10]) && html.contains("HTTP 200"), "{html}");
    let id = app.admin_json("/api/v2/webhooks").await["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = post_form(
        &client,
        &app,
        &format!("/dashboard/webhooks/{id}/test"),
        Some(&cookie),
        format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(r.status(), 303);
    receiver
        .wait_until(10, |h| h.iter().any(|hit| hit.json()["kind"] == "webhook.test"))
        .await;

    let (_, viewer) = create_key(&app, "val", "viewer").await;
    let viewer_cookie = sign_in_as(&app, &client, &viewer).await.unwrap();
    let (status, _) = page(viewer_cookie.clone()).await;
    assert_eq!(status, 403);
    let (_, overview) = {
        let r = client
            .get(app.url("/dashboard"))
            .header("cookie", viewer_cookie)
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    };
    assert!(
        !overview.contains("/dashboard/webhooks"),
        "no Webhooks link for a viewer"
    );
}

/// A key's subscriptions stop with the key: after a stored admin key (whose subscription carries every
/// build) is revoked, nothing more is fanned out to it or delivered.
#[tokio::test]
async fn a_revoked_keys_subscriptions_carry_nothing_more() {
    let app = allow_private().await;
    let (key_id, admin) = create_key(&app, "ops-bot", "admin").await;
    let hook = Receiver::start().await;
    let sub = subscribe(&app, &admin, &hook.url(), &["build.submitted"]).await;
    let first = submit_as(&app.base, &app.client, API_KEY).await;
    hook.wait_until(10, |h| kinds_by_build(h).contains_key(first.as_str()))
        .await;

    let (status, body) = call(
        &app,
        reqwest::Method::DELETE,
        &format!("/api/v2/keys/{key_id}"),
        API_KEY,
        None,
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let second = submit_as(&app.base, &app.client, API_KEY).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!kinds_by_build(&hook.hits()).contains_key(second.as_str()));
    let fanned: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM webhook_deliveries d JOIN webhook_payloads p USING (event_id)
              WHERE d.subscription_id = $1 AND p.build_id = $2",
    )
    .bind(sub["id"].as_str().unwrap())
    .bind(&second)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(fanned, 0);
    let (_, shown) = call(
        &app,
        reqwest::Method::GET,
        &format!("/api/v2/webhooks/{}", sub["id"].as_str().unwrap()),
        API_KEY,
        None,
    )
    .await;
    assert_eq!(shown["active"], false, "{shown}");
}

/// A submitter's subscription hears of its build's deletion, although the row is gone when the event is
/// written; another submitter's subscription does not.
#[tokio::test]
async fn a_submitters_subscription_hears_its_build_deleted() {
    let app = allow_private().await;
    let (_, alice) = create_key(&app, "alice", "submitter").await;
    let (_, bob) = create_key(&app, "bob", "submitter").await;
    let (alice_hook, bob_hook) = (Receiver::start().await, Receiver::start().await);
    subscribe(&app, &alice, &alice_hook.url(), &["build.deleted"]).await;
    subscribe(&app, &bob, &bob_hook.url(), &["build.deleted"]).await;
    let build = submit_as(&app.base, &app.client, &alice).await;
    let (status, body) = call(
        &app,
        reqwest::Method::POST,
        &format!("/api/builds/{build}/cancel"),
        API_KEY,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(
        &app,
        reqwest::Method::DELETE,
        &format!("/api/v2/builds/{build}"),
        API_KEY,
        None,
    )
    .await;
    assert!(status == 200 || status == 204, "{status} {body}");
    alice_hook
        .wait_until(10, |h| {
            kinds_by_build(h)
                .get(build.as_str())
                .is_some_and(|k| k.contains("build.deleted"))
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(bob_hook.hits().is_empty());
}

/// Deleting a subscription deletes its deliveries (a trigger on the subscriptions, not a foreign key
/// checked at every delivery insert); a delivery left without its subscription (its fan-out raced with
/// the deletion) is never sent and goes with the next prune, which keeps every other delivery.
#[tokio::test]
async fn a_deleted_subscriptions_deliveries_go_and_the_prune_takes_orphans() {
    use expo_controller::jobs::{Job, JobContext};
    let app = allow_private().await;
    let receiver = Receiver::start().await;
    // The receiver fails every attempt: the deliveries stay pending (retried with backoff).
    receiver.status.store(503, Ordering::SeqCst);
    let gone = subscribe(&app, API_KEY, &receiver.url(), &["test.*"]).await;
    let kept = subscribe(&app, API_KEY, &receiver.url(), &["test.*"]).await;
    let (gone, kept) = (gone["id"].as_str().unwrap(), kept["id"].as_str().unwrap());
    sqlx::query("INSERT INTO events (kind, data) VALUES ('test.one', '{}'), ('test.two', '{}')")
        .execute(&app.pool)
        .await
        .unwrap();
    let per_subscription = |id: &str| {
        let (pool, id) = (app.pool.clone(), id.to_string());
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM webhook_deliveries WHERE subscription_id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!((per_subscription(gone).await, per_subscription(kept).await), (2, 2));

    let (status, body) = call(
        &app,
        reqwest::Method::DELETE,
        &format!("/api/v2/webhooks/{gone}"),
        API_KEY,
        None,
    )
    .await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(
        (per_subscription(gone).await, per_subscription(kept).await),
        (0, 2),
        "the deleted subscription's deliveries went with it, the other's stay"
    );

    // What a fan-out that raced with a deletion leaves: a due delivery whose subscription is gone.
    let orphan: i64 = sqlx::query_scalar(
        "INSERT INTO webhook_deliveries (subscription_id, event_id, kind, data, event_at)
         VALUES ($1, 0, 'test.orphan', '{}', now()) RETURNING id",
    )
    .bind(gone)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM webhook_deliveries WHERE id = $1")
        .bind(orphan)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(attempts, 0, "an orphan is never claimed");
    assert!(
        !receiver.hits().iter().any(|h| h.json()["kind"] == "test.orphan"),
        "an orphan is never sent"
    );

    let ctx = JobContext {
        pool: app.pool.clone(),
        storage: expo_controller::storage::Storage::local(&app.storage_dir, false).unwrap(),
        settings: Default::default(),
        jobs: Default::default(),
    };
    Job::Prune.run_once(&ctx, chrono::Utc::now()).await.unwrap();
    assert_eq!(
        (per_subscription(gone).await, per_subscription(kept).await),
        (0, 2),
        "the prune took the orphan and kept the live subscription's pending deliveries"
    );
}

/// A claim of deliveries that fails (here: its table briefly lacks the column it orders by) is tried
/// again at the periodic look, without a new event to wake the deliverer: the delivery of the one build
/// arrives once the table is whole again, although nothing else happens meanwhile.
#[tokio::test]
async fn deliveries_resume_after_a_failed_claim_without_a_new_event() {
    let app = allow_private().await;
    let receiver = Receiver::start().await;
    subscribe(&app, API_KEY, &receiver.url(), &["build.submitted"]).await;
    sqlx::query("ALTER TABLE webhook_deliveries RENAME COLUMN run_at TO run_at_hidden")
        .execute(&app.pool)
        .await
        .expect("hide run_at");
    let build = app.submit("ios", b"PK\x03\x04 source").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The fan-out's row exists (it sets no run_at), and the woken claim fails meanwhile.
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM webhook_deliveries d JOIN webhook_payloads p USING (event_id) WHERE p.build_id = $1",
    )
    .bind(&build)
    .fetch_one(&app.pool)
    .await
    .expect("deliveries");
    assert_eq!(rows, 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(receiver.hits().is_empty(), "delivered although the claim cannot run");
    sqlx::query("ALTER TABLE webhook_deliveries RENAME COLUMN run_at_hidden TO run_at")
        .execute(&app.pool)
        .await
        .expect("restore run_at");
    let hits = receiver.wait_until(10, |h| !h.is_empty()).await;
    assert_eq!(hits[0].json()["build_id"], build.as_str());
}

/// A receiver that records a request on arrival and answers 200 only after `hold`.
async fn slow_receiver(hold: Duration) -> (String, Arc<Mutex<Vec<Hit>>>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                move |State(hits): State<Arc<Mutex<Vec<Hit>>>>, headers: HeaderMap, body: Bytes| async move {
                    hits.lock().unwrap().push(Hit { headers, body });
                    tokio::time::sleep(hold).await;
                    StatusCode::OK
                },
            ),
        )
        .with_state(hits.clone());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, hits, task)
}

/// A delivery in flight is `delivering` to the API (its redelivery refused) while its row stays
/// `pending` under a lease, so that the claim left the due index alone; once answered it is delivered.
#[tokio::test]
async fn a_delivery_in_flight_is_delivering_under_a_lease() {
    let app = allow_private().await;
    let (url, hits, task) = slow_receiver(Duration::from_secs(3)).await;
    let created = subscribe(&app, API_KEY, &url, &["build.submitted"]).await;
    let id = created["id"].as_str().unwrap();
    app.submit("ios", b"PK\x03\x04 source").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while hits.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the delivery never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, page) = deliveries(&app, id).await;
    assert_eq!(status, 200);
    let delivery = page["items"][0].clone();
    assert_eq!(delivery["state"], "delivering", "{page}");
    let (status, body) = call(
        &app,
        reqwest::Method::POST,
        &format!("/api/v2/webhooks/deliveries/{}/redeliver", delivery["id"]),
        API_KEY,
        None,
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (state, run_at_moved, leased): (String, bool, bool) = sqlx::query_as(
        "SELECT state, run_at > created_at + interval '5 seconds', leased_until > now() FROM webhook_deliveries",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(state, "pending", "the claim changed the indexed state");
    assert!(!run_at_moved, "the claim moved the indexed run_at");
    assert!(leased, "no lease on a delivery in flight");
    settled(&app.pool).await;
    let (_, page) = deliveries(&app, id).await;
    assert_eq!(page["items"][0]["state"], "delivered", "{page}");
    assert_eq!(hits.lock().unwrap().len(), 1);
    task.abort();
}

/// Claiming deliveries is a HOT update (no new index entries): after a burst, PostgreSQL counts at least
/// one HOT update per delivery (the claim; the record of the outcome moves the row out of the due index).
#[tokio::test]
async fn claims_of_deliveries_are_hot_updates() {
    let app = allow_private().await;
    let receiver = Receiver::start().await;
    subscribe(&app, API_KEY, &receiver.url(), &["build.submitted"]).await;
    const BURST: usize = 30;
    futures_util::future::join_all((0..BURST).map(|_| app.submit("ios", b"PK\x03\x04 source"))).await;
    receiver.wait_until(20, |h| h.len() >= BURST).await;
    settled(&app.pool).await;
    // The statistics of other backends arrive when they go idle (PostgreSQL 15: within about 10 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&app.pool)
            .await
            .unwrap();
        let (updated, hot): (i64, i64) = sqlx::query_as(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'webhook_deliveries'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if updated >= 2 * BURST as i64 {
            assert!(
                hot >= BURST as i64,
                "{hot} of {updated} updates HOT for {BURST} deliveries"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "statistics never arrived: {updated} updates, {hot} HOT"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The fan-out's pre-filter (the trigger's WHEN clause, migration 0241) follows every change of the
/// subscriptions: a kind no active subscription wants writes no delivery, a pattern added by PATCH, a
/// pause and a resume take effect for the next event, and without subscriptions the trigger never fires.
#[tokio::test]
async fn the_fanout_filter_follows_subscription_changes() {
    let app = allow_private().await;
    let receiver = Receiver::start().await;
    let created = subscribe(&app, API_KEY, &receiver.url(), &["build.completed"]).await;
    let id = created["id"].as_str().unwrap().to_string();
    // The delivery rows commit with the submit's event, so they are counted as soon as it answers.
    let submitted_rows = |pool: sqlx::PgPool| async move {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM webhook_deliveries d JOIN webhook_payloads p USING (event_id)
              WHERE p.kind = 'build.submitted'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        n
    };
    let trigger = |pool: sqlx::PgPool| async move {
        let def: String =
            sqlx::query_scalar("SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'webhook_fanout'")
                .fetch_one(&pool)
                .await
                .unwrap();
        def
    };
    assert!(
        trigger(app.pool.clone()).await.contains("build.completed"),
        "{}",
        trigger(app.pool.clone()).await
    );
    app.submit("ios", b"PK\x03\x04 source").await;
    assert_eq!(submitted_rows(app.pool.clone()).await, 0);

    let patch = |body: Value| {
        let path = format!("/api/v2/webhooks/{id}");
        let app = &app;
        async move {
            let (status, view) = call(app, reqwest::Method::PATCH, &path, API_KEY, Some(body)).await;
            assert_eq!(status, 200, "{view}");
        }
    };
    patch(json!({ "events": ["build.*"] })).await;
    app.submit("ios", b"PK\x03\x04 source").await;
    assert_eq!(
        submitted_rows(app.pool.clone()).await,
        1,
        "a family pattern added by PATCH"
    );
    patch(json!({ "active": false })).await;
    app.submit("ios", b"PK\x03\x04 source").await;
    assert_eq!(submitted_rows(app.pool.clone()).await, 1, "a paused subscription");
    patch(json!({ "active": true })).await;
    app.submit("ios", b"PK\x03\x04 source").await;
    assert_eq!(submitted_rows(app.pool.clone()).await, 2, "a resumed subscription");
    receiver.wait_until(10, |h| h.len() >= 2).await;

    let (status, _) = call(
        &app,
        reqwest::Method::DELETE,
        &format!("/api/v2/webhooks/{id}"),
        API_KEY,
        None,
    )
    .await;
    assert_eq!(status, 204);
    assert!(
        trigger(app.pool.clone()).await.contains("WHEN (false)"),
        "{}",
        trigger(app.pool.clone()).await
    );
}

/// One payload per event (migration 0300): an event matching three subscriptions is three small delivery
/// rows (no copy of the event in them) and one payload row counting them; every receiver gets the event,
/// the listing shows its kind and build; the payload goes with the last delivery that references it.
#[tokio::test]
async fn an_event_for_several_subscriptions_is_stored_once() {
    use expo_controller::jobs::{Job, JobContext};
    let app = allow_private().await;
    let receiver = Receiver::start().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let created = subscribe(&app, API_KEY, &receiver.url(), &["build.submitted"]).await;
        ids.push(created["id"].as_str().unwrap().to_string());
    }
    let build = app.submit("ios", b"PK\x03\x04 source").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (rows, copies): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE data IS NOT NULL OR kind IS NOT NULL OR build_id IS NOT NULL)
           FROM webhook_deliveries",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        (rows, copies),
        (3, 0),
        "three delivery rows, none with a copy of the event"
    );
    let payloads: Vec<(String, Option<String>, i32)> =
        sqlx::query_as("SELECT kind, build_id, deliveries FROM webhook_payloads")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(payloads, vec![("build.submitted".to_string(), Some(build.clone()), 3)]);

    let hits = receiver.wait_until(10, |h| h.len() >= 3).await;
    for hit in &hits {
        assert_eq!(hit.json()["kind"], "build.submitted");
        assert_eq!(hit.json()["build_id"], build.as_str());
    }
    settled(&app.pool).await;
    let (status, page) = deliveries(&app, &ids[0]).await;
    assert_eq!(status, 200);
    assert_eq!(page["items"][0]["kind"], "build.submitted", "{page}");
    assert_eq!(page["items"][0]["build_id"], build.as_str(), "{page}");
    assert_eq!(page["items"][0]["state"], "delivered", "{page}");

    // A deleted subscription's delivery releases its share of the payload.
    let (status, _) = call(
        &app,
        reqwest::Method::DELETE,
        &format!("/api/v2/webhooks/{}", ids[0]),
        API_KEY,
        None,
    )
    .await;
    assert_eq!(status, 204);
    let count: i32 = sqlx::query_scalar("SELECT deliveries FROM webhook_payloads")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(count, 2);
    // The prune of finished deliveries past the retention takes the rest, and the payload with them.
    let ctx = JobContext {
        pool: app.pool.clone(),
        storage: expo_controller::storage::Storage::local(&app.storage_dir, false).unwrap(),
        settings: Default::default(),
        jobs: Default::default(),
    };
    Job::Prune
        .run_once(&ctx, chrono::Utc::now() + chrono::Duration::days(400))
        .await
        .unwrap();
    assert_eq!(app.count("webhook_deliveries").await, 0);
    assert_eq!(
        app.count("webhook_payloads").await,
        0,
        "the payload went with its last delivery"
    );
}

/// A record of outcomes that fails (here: the table briefly lacks a column the record writes) is written
/// again with the next record statement: the delivery is `delivered` after one request, not sent a second
/// time once its 30 s lease runs out.
#[tokio::test]
async fn a_failed_record_is_written_again_not_resent_after_the_lease() {
    let app = allow_private().await;
    let receiver = Receiver::start().await;
    subscribe(&app, API_KEY, &receiver.url(), &["build.submitted"]).await;
    sqlx::query("ALTER TABLE webhook_deliveries RENAME COLUMN last_latency_ms TO last_latency_hidden")
        .execute(&app.pool)
        .await
        .expect("hide last_latency_ms");
    app.submit("ios", b"PK\x03\x04 source").await;
    receiver.wait_until(10, |h| !h.is_empty()).await;
    // The record of the outcome fails meanwhile (at least once).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let state: String = sqlx::query_scalar("SELECT state FROM webhook_deliveries")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(state, "pending", "recorded although the record cannot run");
    sqlx::query("ALTER TABLE webhook_deliveries RENAME COLUMN last_latency_hidden TO last_latency_ms")
        .execute(&app.pool)
        .await
        .expect("restore last_latency_ms");
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let (state, attempts): (String, i32) = sqlx::query_as("SELECT state, attempts FROM webhook_deliveries")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        if state == "delivered" {
            assert_eq!(attempts, 1);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the outcome was not recorded after the failed record ({state}, {attempts} attempts)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(receiver.hits().len(), 1, "sent once");
}

/// A claim takes more deliveries than the instance has slots (a hand of a few per slot), so its rate is
/// not capped at one claim of `concurrency` rows per coalescing interval; the POSTs in flight stay within
/// the slots. With one slot and a receiver that holds each request, several deliveries are leased at
/// once while the receiver never sees two requests at a time, and each arrives once.
#[tokio::test]
async fn a_claim_takes_more_than_the_free_slots_and_posts_stay_within_them() {
    let app = TestApp::spawn_with(|c| {
        c.webhooks.webhook_allow_private = true;
        c.webhooks.webhook_concurrency = 1;
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    // (requests in flight, most in flight at once, requests received)
    let counts: Arc<Mutex<(usize, usize, usize)>> = Arc::default();
    // Set by the test once it saw two deliveries leased; the first request is held until then (at most
    // 5 s), and `held_until_seen` says whether the test saw them while that one POST was in flight.
    let seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let held_until_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    type Shared = (
        Arc<Mutex<(usize, usize, usize)>>,
        Arc<std::sync::atomic::AtomicBool>,
        Arc<std::sync::atomic::AtomicBool>,
    );
    let receiver = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(|State((counts, seen, held_until_seen)): State<Shared>| async move {
                let first = {
                    let mut c = counts.lock().unwrap();
                    c.0 += 1;
                    c.1 = c.1.max(c.0);
                    c.2 += 1;
                    c.2 == 1
                };
                if first {
                    let started = Instant::now();
                    while !seen.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(5) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    held_until_seen.store(seen.load(Ordering::SeqCst), Ordering::SeqCst);
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                counts.lock().unwrap().0 -= 1;
                StatusCode::OK
            }),
        )
        .with_state((counts.clone(), seen.clone(), held_until_seen.clone()));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, receiver).await;
    });
    subscribe(&app, API_KEY, &url, &["build.submitted"]).await;
    const BUILDS: usize = 4;
    futures_util::future::join_all((0..BUILDS).map(|_| app.submit("ios", b"PK\x03\x04 source"))).await;
    let mut most_leased = 0i64;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leased: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM webhook_deliveries WHERE state = 'pending' AND leased_until > now()",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        most_leased = most_leased.max(leased);
        if leased >= 2 {
            seen.store(true, Ordering::SeqCst);
        }
        let delivered: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        if delivered == BUILDS as i64 {
            break;
        }
        assert!(Instant::now() < deadline, "{delivered} of {BUILDS} delivered");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let (_, most_in_flight, received) = *counts.lock().unwrap();
    assert!(
        most_leased >= 2 && held_until_seen.load(Ordering::SeqCst),
        "at most {most_leased} deliveries leased at once while the one slot's POST was held: a claim took only the free slots"
    );
    assert_eq!(most_in_flight, 1, "more POSTs in flight than slots");
    assert_eq!(received, BUILDS, "each delivery sent once");
    task.abort();
}

/// Deliveries claimed and still waiting for a slot when the instance shuts down give their leases back
/// (review of the claim's hand): they are claimable again at once, with the claim's attempt taken back,
/// instead of sitting leased and unsent for up to a lease.
#[tokio::test]
async fn deliveries_waiting_for_a_slot_give_their_leases_back_at_shutdown() {
    let mut app = TestApp::spawn_with(|c| {
        c.webhooks.webhook_allow_private = true;
        c.webhooks.webhook_concurrency = 1;
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let received: Arc<Mutex<usize>> = Arc::default();
    let receiver = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(|State(received): State<Arc<Mutex<usize>>>| async move {
                *received.lock().unwrap() += 1;
                // Holds the one slot well past the shutdown.
                tokio::time::sleep(Duration::from_secs(30)).await;
                StatusCode::OK
            }),
        )
        .with_state(received.clone());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, receiver).await;
    });
    subscribe(&app, API_KEY, &url, &["build.submitted"]).await;
    const BUILDS: i64 = 4;
    futures_util::future::join_all((0..BUILDS).map(|_| app.submit("ios", b"PK\x03\x04 source"))).await;
    // Every delivery claimed (the hand holds 4 with one slot) and one POST in flight.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leased: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM webhook_deliveries WHERE state = 'pending' AND leased_until > now()",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if leased == BUILDS && *received.lock().unwrap() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{leased} of {BUILDS} deliveries leased");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    app.stop().await;
    let (released, leased): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE leased_until IS NULL AND attempts = 0),
                count(*) FILTER (WHERE leased_until IS NOT NULL)
           FROM webhook_deliveries WHERE state = 'pending'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        (released, leased),
        (BUILDS - 1, 1),
        "the deliveries that waited for a slot keep their leases after the shutdown (only the POST in flight should)"
    );
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_attempts")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(attempts, 0, "a delivery given back unsent is no attempt");
    assert_eq!(*received.lock().unwrap(), 1, "only one POST was sent");
    task.abort();
}
