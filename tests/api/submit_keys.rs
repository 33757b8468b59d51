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
