//! The `expo-free-agent` CLI's calls over real HTTP: submit with certs and profile, status and logs
//! with the build token alone, download with Range, list as a bare array, cancel with an empty JSON
//! body, retry with the token alone.

use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use crate::support::{API_KEY, TestApp, success_form};
use crate::token_worker::submit_with_certs;

async fn submit_full(app: &TestApp, platform: &str) -> Value {
    let form = Form::new()
        .text("platform", platform.to_string())
        .part("source", Part::bytes(b"SOURCE-ZIP".to_vec()).file_name("project.zip"))
        .part("certs", Part::bytes(b"\x30\x82P12".to_vec()).file_name("cert.p12"))
        .part(
            "profile",
            Part::bytes(b"PROFILE".to_vec()).file_name("a.mobileprovision"),
        )
        .text("appleId", "dev@example.com")
        .text("applePassword", "never-store-me");
    app.submit_form(form).await.json().await.unwrap()
}

#[tokio::test]
async fn cli_submit_follow_download() {
    let app = TestApp::spawn().await;
    let submitted = submit_full(&app, "ios").await;
    let id = submitted["id"].as_str().unwrap().to_string();
    let token = submitted["access_token"].as_str().unwrap().to_string();
    let url = |path: &str| app.url(&format!("/api/builds/{id}/{path}"));

    let status: Value = app
        .client
        .get(url("status"))
        .header("X-Build-Token", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "pending");
    let r = app
        .client
        .get(url("status"))
        .header("X-Build-Token", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.json::<Value>().await.unwrap()),
        (403, json!({ "error": "Invalid or expired build token" }))
    );
    let r = app.client.get(url("status")).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.json::<Value>().await.unwrap()),
        (401, json!({ "error": "Missing X-API-Key or X-Build-Token header" }))
    );
    let r = app
        .client
        .get(url("download"))
        .header("X-Build-Token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.json::<Value>().await.unwrap()),
        (400, json!({ "error": "Build not completed" }))
    );

    // A worker runs it.
    let (worker_id, _) = app.register("w", &["ios"]).await;
    app.poll(&worker_id).await;
    let lines = json!({ "logs": [{ "level": "info", "message": "one" }, { "level": "info", "message": "two" }] });
    app.client
        .post(url("logs"))
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", &worker_id)
        .json(&lines)
        .send()
        .await
        .unwrap();
    let result: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let form = success_form(&id, &worker_id, &result.clone());
    assert_eq!(app.upload_form(form).await.status(), 200);

    // Logs with the token alone: whole list (with seq), then incremental.
    let logs: Value = app
        .client
        .get(url("logs"))
        .header("X-Build-Token", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(logs["build_id"], id.as_str());
    let entries = logs["logs"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .all(|e| e["timestamp"].is_i64() && e["seq"].is_i64() && e["level"].is_string())
    );
    let seqs: Vec<i64> = entries.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "oldest first, increasing seq");
    let one = entries.iter().find(|e| e["message"] == "one").unwrap()["seq"]
        .as_i64()
        .unwrap();
    let tail: Value = app
        .client
        .get(url("logs"))
        .query(&[("after", one.to_string()), ("limit", "1".into())])
        .header("X-Build-Token", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tail["logs"].as_array().unwrap().len(), 1);
    assert_eq!(tail["logs"][0]["message"], "two");
    let r = app
        .client
        .get(url("logs"))
        .query(&[("after", "-1")])
        .header("X-Build-Token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Download, whole and by range.
    let r = app
        .client
        .get(url("download"))
        .header("X-Build-Token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(
        r.headers()["content-disposition"],
        format!("attachment; filename=\"{id}.ipa\"")
    );
    assert_eq!(r.headers()["content-length"], "10000");
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert_eq!(r.bytes().await.unwrap().as_ref(), result.as_slice());
    let r = app
        .client
        .get(url("download/result"))
        .header("X-Build-Token", &token)
        .header("Range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 100-199/10000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &result[100..200]);
    let r = app
        .client
        .get(url("download"))
        .header("X-Build-Token", &token)
        .header("Range", "bytes=20000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    let r = app
        .client
        .get(url("download/source"))
        .header("X-Build-Token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"SOURCE-ZIP");

    // The Apple password was never stored anywhere: not in the database, not in storage.
    let found: i64 =
        sqlx::query_scalar("SELECT count(*) FROM builds WHERE row_to_json(builds)::text LIKE '%never-store-me%'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(found, 0);
    for file in app.stored_files() {
        let bytes = std::fs::read(app.storage_dir.join(&file)).unwrap();
        assert!(!bytes.windows(14).any(|w| w == b"never-store-me"), "{file}");
        assert!(
            !bytes.windows(7).any(|w| w == b"PROFILE"),
            "certs are encrypted at rest: {file}"
        );
    }
}

#[tokio::test]
async fn cli_list_is_a_bare_paginated_array() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            app.submit(if n % 2 == 0 { "ios" } else { "android" }, b"s").await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let list = |q: &[(&str, &str)]| {
        app.client
            .get(app.url("/api/builds"))
            .query(q)
            .header("X-API-Key", API_KEY)
            .send()
    };
    let all: Value = list(&[]).await.unwrap().json().await.unwrap();
    let all = all.as_array().expect("a bare JSON array");
    assert_eq!(all.len(), 5);
    let listed: Vec<&str> = all.iter().map(|b| b["id"].as_str().unwrap()).collect();
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(listed, newest_first);
    assert_eq!(all[0]["status"], "pending");
    assert!(all[0]["createdAt"].as_str().unwrap().ends_with('Z'));
    assert!(all[0].get("completedAt").is_none(), "omitted while unset");

    let page: Value = list(&[("limit", "2")]).await.unwrap().json().await.unwrap();
    assert_eq!(page.as_array().unwrap().len(), 2);
    let cursor = page[1]["id"].as_str().unwrap().to_string();
    let next: Value = list(&[("limit", "2"), ("before", &cursor)])
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(next[0]["id"], newest_first[2]);
    let ios: Value = list(&[("platform", "ios")]).await.unwrap().json().await.unwrap();
    assert_eq!(ios.as_array().unwrap().len(), 3);
    for bad in [
        ("limit", "0"),
        ("limit", "501"),
        ("limit", "ten"),
        ("status", "weird"),
        ("platform", "windows"),
    ] {
        assert_eq!(list(&[bad]).await.unwrap().status(), 400, "{bad:?}");
    }
    let active: Value = app.admin_json("/api/builds/active").await;
    assert_eq!(active, json!({ "builds": [] }));
}

#[tokio::test]
async fn cli_cancel_with_an_empty_json_body_and_retry_with_the_token() {
    let app = TestApp::spawn().await;
    let id = submit_with_certs(&app).await;
    let token = {
        // A fresh build whose token we know.
        let submitted = submit_full(&app, "android").await;
        (
            submitted["id"].as_str().unwrap().to_string(),
            submitted["access_token"].as_str().unwrap().to_string(),
        )
    };
    let (cancel_id, cancel_token) = token;
    let cancel = |build: &str, token: &str| {
        app.client
            .post(app.url(&format!("/api/builds/{build}/cancel")))
            .header("X-Build-Token", token)
            .header("Content-Type", "application/json")
            .body("")
            .send()
    };
    let r = cancel(&cancel_id, &cancel_token).await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.json::<Value>().await.unwrap()),
        (200, json!({ "status": "cancelled" }))
    );
    let r = cancel(&cancel_id, &cancel_token).await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.json::<Value>().await.unwrap()),
        (400, json!({ "error": "Build already finished" }))
    );

    let r = app
        .client
        .post(app.url(&format!("/api/builds/{cancel_id}/retry")))
        .header("X-Build-Token", &cancel_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let retried: Value = r.json().await.unwrap();
    assert_eq!(retried["status"], "pending");
    assert_eq!(retried["original_build_id"], cancel_id.as_str());
    assert_ne!(retried["id"], cancel_id.as_str());
    let new_id = retried["id"].as_str().unwrap();
    let new_token = retried["access_token"].as_str().unwrap();
    let status: Value = app
        .client
        .get(app.url(&format!("/api/builds/{new_id}/status")))
        .header("X-Build-Token", new_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "pending");
    let src = app
        .client
        .get(app.url(&format!("/api/builds/{new_id}/download/source")))
        .header("X-Build-Token", new_token)
        .send()
        .await
        .unwrap();
    assert_eq!(src.bytes().await.unwrap().as_ref(), b"SOURCE-ZIP");
    let r = app
        .client
        .post(app.url(&format!("/api/builds/{id}/retry")))
        .header("X-Build-Token", &cancel_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "one build's token grants nothing on another");
    let r = app
        .client
        .post(app.url("/api/builds/nosuchbuild/retry"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Once the source is gone, retry says so (after the first retry finished: a build token may have
    // only one unfinished retry, R49).
    let r = cancel(new_id, new_token).await.unwrap();
    assert_eq!(r.status(), 200);
    std::fs::remove_file(app.storage_dir.join(format!("builds/{cancel_id}/source.zip"))).unwrap();
    let r = app
        .client
        .post(app.url(&format!("/api/builds/{cancel_id}/retry")))
        .header("X-Build-Token", &cancel_token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.json::<Value>().await.unwrap()),
        (
            400,
            json!({ "error": "Original build source no longer available. Please submit a new build." })
        )
    );
}
