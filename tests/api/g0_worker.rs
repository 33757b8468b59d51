//! The first-generation worker path over real HTTP: register → submit → poll → source → upload → status.

use std::collections::HashSet;

use reqwest::multipart::{Form, Part};
use serde_json::Value;

use crate::support::{API_KEY, TestApp};

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

    let form = Form::new()
        .text("build_id", build_id.clone())
        .text("worker_id", worker_id.clone())
        .text("success", "true")
        .part("result", Part::bytes(b"IPA".to_vec()).file_name("app.ipa"));
    let upload = app
        .client
        .post(app.url("/api/workers/upload"))
        .header("X-API-Key", API_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 200);
    assert_eq!(
        upload.json::<Value>().await.unwrap(),
        serde_json::json!({ "status": "success" })
    );

    let status: Value = app
        .client
        .get(app.url(&format!("/api/builds/{build_id}/status")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
    let answer = app
        .client
        .post(app.url("/api/workers/upload"))
        .header("X-API-Key", API_KEY)
        .multipart(fail)
        .send()
        .await
        .unwrap();
    assert_eq!(
        answer.json::<Value>().await.unwrap(),
        serde_json::json!({ "status": "failed" })
    );

    let late = Form::new()
        .text("build_id", build_id.clone())
        .text("worker_id", worker_id.clone())
        .text("success", "true")
        .part("result", Part::bytes(b"APK".to_vec()).file_name("app.apk"));
    let answer = app
        .client
        .post(app.url("/api/workers/upload"))
        .header("X-API-Key", API_KEY)
        .multipart(late)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 409);
    assert_eq!(
        answer.json::<Value>().await.unwrap(),
        serde_json::json!({ "error": "Build attempt is no longer active" })
    );
    let status: Value = app
        .client
        .get(app.url(&format!("/api/builds/{build_id}/status")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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

    let form = Form::new()
        .text("build_id", build_id.clone())
        .text("worker_id", other.clone())
        .text("success", "true")
        .part("result", Part::bytes(b"IPA".to_vec()).file_name("a.ipa"));
    let r = app
        .client
        .post(app.url("/api/workers/upload"))
        .header("X-API-Key", API_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
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
                let form = Form::new()
                    .text("build_id", id.clone())
                    .text("worker_id", worker_id.clone())
                    .text("success", "true")
                    .part("result", Part::bytes(b"x".to_vec()).file_name("r"));
                let r = app
                    .client
                    .post(app.url("/api/workers/upload"))
                    .header("X-API-Key", API_KEY)
                    .multipart(form)
                    .send()
                    .await
                    .unwrap();
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
