//! The token-era worker and its VM over real HTTP: register → poll with `X-Worker-Token` → OTP →
//! authenticate → certs-secure → vm-ready → source with the VM token → logs batch → artifact →
//! success report without a file → heartbeat refused afterwards.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use crate::support::{API_KEY, TestApp, state_of, worker_status};

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Submits an iOS build with a raw .p12 and a separate profile; returns its id.
pub async fn submit_with_certs(app: &TestApp) -> String {
    let form = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(b"SOURCE".to_vec()).file_name("app.zip"))
        .part("certs", Part::bytes(b"\x30\x82RAWP12".to_vec()).file_name("dist.p12"))
        .part(
            "profile",
            Part::bytes(b"PROFILE".to_vec()).file_name("app.mobileprovision"),
        )
        .text("appleId", "dev@example.com")
        .text("applePassword", "app-specific-password");
    let r = app.submit_form(form).await;
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn token_era_worker_and_vm_whole_life() {
    let app = TestApp::spawn().await;
    let (worker_id, token) = app.register("Mac Studio", &["ios"]).await;
    let build_id = submit_with_certs(&app).await;

    // Poll in token mode: the job carries the OTP and baseImageId; the token comes back unchanged.
    let (status, poll) = json_of(
        app.client
            .get(app.url("/api/workers/poll"))
            .header("X-Worker-Token", &token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(poll["job"]["id"], build_id.as_str());
    assert_eq!(poll["job"]["certs_url"], format!("/api/builds/{build_id}/certs"));
    assert_eq!(poll["access_token"], token.as_str(), "stable token, no rotation");
    let otp = poll["job"]["otp"].as_str().unwrap().to_string();

    // vm-status needs a credential, and says "not ready" before the VM reports.
    let r = app
        .client
        .get(app.url(&format!("/api/builds/{build_id}/vm-status")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let vm_status_url = app.url(&format!("/api/builds/{build_id}/vm-status"));
    let (_, vm_status) = json_of(
        app.client
            .get(&vm_status_url)
            .header("X-Worker-Token", &token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(vm_status, json!({ "vm_ready": false }));

    // The VM trades the OTP, once.
    let auth_url = app.url(&format!("/api/builds/{build_id}/authenticate"));
    let (status, auth) = json_of(
        app.client
            .post(&auth_url)
            .json(&json!({ "otp": otp }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let vm_token = auth["vm_token"].as_str().unwrap().to_string();
    assert!(vm_token.len() >= 43 && auth["expires_at"].is_i64());
    let again = json_of(
        app.client
            .post(&auth_url)
            .json(&json!({ "otp": otp }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(again, (401, json!({ "error": "Invalid or expired OTP" })));
    let missing = app.client.post(&auth_url).json(&json!({})).send().await.unwrap();
    assert_eq!(missing.status(), 400);

    // certs-secure with the VM token: the raw .p12 and the separate profile come back.
    let (status, certs) = json_of(
        app.client
            .get(app.url(&format!("/api/builds/{build_id}/certs-secure")))
            .header("X-VM-Token", &vm_token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        STANDARD.decode(certs["p12"].as_str().unwrap()).unwrap(),
        b"\x30\x82RAWP12"
    );
    assert_eq!(certs["p12Password"], "");
    assert!(certs["keychainPassword"].as_str().unwrap().len() >= 32);
    assert_eq!(
        STANDARD
            .decode(certs["provisioningProfiles"][0].as_str().unwrap())
            .unwrap(),
        b"PROFILE"
    );

    // vm-ready counts as a heartbeat and moves the build to building.
    let (status, ready) = json_of(
        app.client
            .post(app.url(&format!("/api/builds/{build_id}/vm-ready")))
            .header("X-VM-Token", &vm_token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(ready["success"], true);
    let (_, vm_status) = json_of(
        app.client
            .get(&vm_status_url)
            .header("X-Worker-Token", &token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(vm_status["vm_ready"], true);
    assert_eq!(vm_status["vm_token"], vm_token.as_str());
    let state: String = state_of(&app.pool, &build_id).await;
    assert_eq!(state, "building");

    // Source with the VM token; a log batch.
    let source = app
        .client
        .get(app.url(&format!("/api/builds/{build_id}/source")))
        .header("X-VM-Token", &vm_token)
        .send()
        .await
        .unwrap();
    assert_eq!(source.bytes().await.unwrap().as_ref(), b"SOURCE");
    let batch = json!({ "logs": [
        { "level": "info", "message": "pod install" },
        { "level": "bogus", "message": "skipped" },
        { "level": "warn", "message": "slow disk" },
    ]});
    let (status, answer) = json_of(
        app.client
            .post(app.url(&format!("/api/builds/{build_id}/logs")))
            .header("X-VM-Token", &vm_token)
            .json(&batch)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, answer),
        (200, json!({ "success": true, "count": 3, "stored": 2, "skipped": 1 }))
    );

    // The VM uploads the artifact; the worker's report without a file is then a no-op success.
    let form = Form::new().part("artifact", Part::bytes(b"IPA-BYTES".to_vec()).file_name("app.ipa"));
    let (status, answer) = json_of(
        app.client
            .post(app.url(&format!("/api/builds/{build_id}/artifact")))
            .header("X-VM-Token", &vm_token)
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, answer), (200, json!({ "success": true })));
    let report = Form::new()
        .text("build_id", build_id.clone())
        .text("worker_id", worker_id.clone())
        .text("success", "true");
    let (status, answer) = json_of(
        app.client
            .post(app.url("/api/workers/upload"))
            .header("X-Worker-Token", &token)
            .multipart(report)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, answer), (200, json!({ "status": "success" })));

    // Afterwards: the VM token is revoked, and the worker's heartbeat is refused as stale.
    let hb_url = app.url(&format!("/api/builds/{build_id}/heartbeat"));
    let r = app
        .client
        .post(&hb_url)
        .header("X-VM-Token", &vm_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .post(&hb_url)
        .header("X-Worker-Token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        json_of(r).await,
        (409, json!({ "error": "Build attempt is no longer active" }))
    );

    // The owner downloads what the VM uploaded.
    let download = app
        .client
        .get(app.url(&format!("/api/builds/{build_id}/download")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        download.headers()["content-disposition"],
        format!("attachment; filename=\"{build_id}.ipa\"")
    );
    assert_eq!(download.bytes().await.unwrap().as_ref(), b"IPA-BYTES");
}

#[tokio::test]
async fn worker_tokens_are_stable_and_re_registration_is_for_the_rightful_caller() {
    let app = TestApp::spawn().await;
    let (worker_id, token) = app.register("w", &["android"]).await;
    for _ in 0..5 {
        let r = app
            .client
            .get(app.url("/api/workers/poll"))
            .header("X-Worker-Token", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "R25: the same token keeps working");
    }

    // Re-register with its own token: same id, fresh token, the old one revoked.
    let body = json!({ "id": worker_id, "name": "renamed", "capabilities": { "platforms": ["android"] } });
    let (status, again) = json_of(
        app.client
            .post(app.url("/api/workers/register"))
            .header("X-Worker-Token", &token)
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(again["status"], "re-registered");
    assert_eq!(again["id"], worker_id.as_str());
    assert_eq!(again["baseImageId"], "test-base-image");
    let fresh = again["access_token"].as_str().unwrap().to_string();
    assert_ne!(fresh, token);
    let r = app
        .client
        .get(app.url("/api/workers/poll"))
        .header("X-Worker-Token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        json_of(r).await,
        (401, json!({ "error": "Invalid or expired worker token" }))
    );

    // Another worker's token cannot take this id over; nor can anyone without credentials.
    let (_, other_token) = app.register("other", &["ios"]).await;
    let r = app
        .client
        .post(app.url("/api/workers/register"))
        .header("X-Worker-Token", &other_token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = app
        .client
        .post(app.url("/api/workers/register"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await, (401, json!({ "error": "Missing X-API-Key header" })));

    // The admin may re-register it; an unknown client-chosen id is accepted.
    let r = app
        .client
        .post(app.url("/api/workers/register"))
        .header("X-API-Key", API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await.1["status"], "re-registered");
    let chosen = json!({ "id": "my-own-id_1", "name": "x", "capabilities": {} });
    let r = app
        .client
        .post(app.url("/api/workers/register"))
        .header("X-API-Key", API_KEY)
        .json(&chosen)
        .send()
        .await
        .unwrap();
    let (_, created) = json_of(r).await;
    assert_eq!(
        (created["id"].as_str(), created["status"].as_str()),
        (Some("my-own-id_1"), Some("registered"))
    );
}

#[tokio::test]
async fn vm_tokens_die_with_their_attempt() {
    let app = TestApp::spawn().await;
    let (_, token) = app.register("w", &["android"]).await;
    let build_id = app.submit("android", b"s").await["id"].as_str().unwrap().to_string();
    let poll: Value = app
        .client
        .get(app.url("/api/workers/poll"))
        .header("X-Worker-Token", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let otp = poll["job"]["otp"].as_str().unwrap();
    let auth: Value = app
        .client
        .post(app.url(&format!("/api/builds/{build_id}/authenticate")))
        .json(&json!({ "otp": otp }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let vm_token = auth["vm_token"].as_str().unwrap();

    // The worker gives the attempt back; it is requeued and the VM token no longer works.
    let r = app
        .client
        .post(app.url("/api/workers/abandon"))
        .header("X-Worker-Token", &token)
        .json(&json!({ "build_id": build_id, "reason": "disk full" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let state: String = state_of(&app.pool, &build_id).await;
    assert_eq!(state, "retryable");
    let r = app
        .client
        .get(app.url(&format!("/api/builds/{build_id}/source")))
        .header("X-VM-Token", vm_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .post(app.url(&format!("/api/builds/{build_id}/authenticate")))
        .json(&json!({ "otp": otp }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the OTP died with the attempt");
}

#[tokio::test]
async fn unregister_by_token_requeues_the_held_build() {
    let app = TestApp::spawn().await;
    let (worker_id, token) = app.register("w", &["ios"]).await;
    let build_id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    app.client
        .get(app.url("/api/workers/poll"))
        .header("X-Worker-Token", &token)
        .send()
        .await
        .unwrap();
    let r = app
        .client
        .post(app.url("/api/workers/unregister"))
        .header("X-Worker-Token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        json_of(r).await,
        (200, json!({ "success": true, "builds_reassigned": 1 }))
    );
    let (state, errors): (String, sqlx::types::Json<Value>) =
        sqlx::query_as("SELECT state, errors FROM builds WHERE id = $1")
            .bind(&build_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(state, "retryable");
    assert_eq!(errors.0[0]["kind"], "infrastructure");
    let status: String = worker_status(&app.pool, &worker_id).await;
    assert_eq!(status, "offline");
    let r = app
        .client
        .get(app.url("/api/workers/poll"))
        .header("X-Worker-Token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the token was revoked");
}

fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    use std::io::Write;
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data) in entries {
        writer
            .start_file(*name, zip::write::SimpleFileOptions::default())
            .unwrap();
        writer.write_all(data).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

#[tokio::test]
async fn certs_endpoints_serve_the_bundle_to_the_holder_only() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("w", &["ios"]).await;
    let bundle = zip_of(&[
        ("dist.p12", b"P12"),
        ("password.txt", b"s3cret\n"),
        ("app.mobileprovision", b"PROF"),
    ]);
    let form = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(b"s".to_vec()).file_name("a.zip"))
        .part("certs", Part::bytes(bundle).file_name("certs.zip"));
    // The `POST /api/builds` alias answers 201 with the same body.
    let r = app
        .client
        .post(app.url("/api/builds"))
        .header("X-API-Key", API_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let url = |path: &str| app.url(&format!("/api/builds/{id}/{path}"));

    let r = app
        .client
        .get(url("certs"))
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", &worker_id)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "not held yet");
    let poll = app.poll(&worker_id).await;
    let r = app
        .client
        .get(url("certs"))
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", &worker_id)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-disposition"],
        format!("attachment; filename=\"{id}-certs.zip\"")
    );
    let zip_bytes = r.bytes().await.unwrap();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip_bytes.to_vec())).unwrap();
    assert_eq!(archive.len(), 3);
    assert!(archive.by_name("dist.p12").is_ok());

    let secure = |build_header: &str| {
        app.client
            .get(url("certs-secure"))
            .header("X-API-Key", API_KEY)
            .header("X-Worker-Id", &worker_id)
            .header("X-Build-Id", build_header)
            .send()
    };
    let certs: Value = secure(&id).await.unwrap().json().await.unwrap();
    assert_eq!(certs["p12Password"], "s3cret");
    assert_eq!(STANDARD.decode(certs["p12"].as_str().unwrap()).unwrap(), b"P12");
    let first_keychain = certs["keychainPassword"].as_str().unwrap().to_string();
    let again: Value = secure(&id).await.unwrap().json().await.unwrap();
    assert_ne!(
        again["keychainPassword"].as_str().unwrap(),
        first_keychain,
        "fresh each time"
    );
    assert_eq!(secure("another-build").await.unwrap().status(), 403);

    // Rule 5: a client generation sends the OTP as X-API-Key when posting logs.
    let otp = poll["job"]["otp"].as_str().unwrap();
    let r = app
        .client
        .post(url("logs"))
        .header("X-API-Key", otp)
        .header("X-Worker-Id", &worker_id)
        .json(&json!({ "level": "info", "message": "from the VM" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .client
        .post(url("logs"))
        .header("X-API-Key", "not-the-otp")
        .header("X-Worker-Id", &worker_id)
        .json(&json!({ "level": "info", "message": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await, (403, json!({ "error": "Invalid API key" })));
}

#[tokio::test]
async fn a_bundle_without_a_certificate_is_unprocessable_and_builds_without_certs_have_none() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("w", &["ios"]).await;
    let form = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(b"s".to_vec()).file_name("a.zip"))
        .part(
            "certs",
            Part::bytes(zip_of(&[("password.txt", b"x")])).file_name("certs.zip"),
        );
    let r = app.submit_form(form).await;
    let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    app.poll(&worker_id).await;
    let r = app
        .client
        .get(app.url(&format!("/api/builds/{id}/certs-secure")))
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", &worker_id)
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await, (422, json!({ "error": "Invalid certs bundle" })));

    // A corrupt zip is refused at submit, leaving nothing.
    let before = app.stored_files().len();
    let form = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(b"s".to_vec()).file_name("a.zip"))
        .part(
            "certs",
            Part::bytes(b"PK\x03\x04 not really a zip".to_vec()).file_name("certs.zip"),
        );
    let r = app.submit_form(form).await;
    assert_eq!(json_of(r).await, (400, json!({ "error": "Invalid certs bundle" })));
    assert_eq!(app.stored_files().len(), before);

    // No certs at all → 404 on both endpoints.
    let plain = app.submit("android", b"s").await["id"].as_str().unwrap().to_string();
    let (android, _) = app.register("a", &["android"]).await;
    app.poll(&android).await;
    for path in ["certs", "certs-secure"] {
        let r = app
            .client
            .get(app.url(&format!("/api/builds/{plain}/{path}")))
            .header("X-API-Key", API_KEY)
            .header("X-Worker-Id", &android)
            .send()
            .await
            .unwrap();
        assert_eq!(json_of(r).await, (404, json!({ "error": "Certs not found" })));
    }
}
