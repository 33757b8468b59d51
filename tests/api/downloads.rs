//! Downloads from the local store read the file directly in 1 MiB chunks (issue #13): whole objects and
//! ranges that cross chunk boundaries come back byte for byte, with the right status and headers.

use crate::support::{API_KEY, TestApp, success_form};

/// A result larger than several read chunks, with no repeating pattern at chunk size.
fn artifact(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) ^ (i >> 11)) as u8).collect()
}

#[tokio::test]
async fn large_downloads_and_ranges_across_chunks_are_exact() {
    let app = TestApp::spawn_with(|c| c.max_result_bytes = 8 * 1024 * 1024).await;
    let (worker_id, _) = app.register("w", &["android"]).await;
    let id = app.submit("android", b"source").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(app.poll(&worker_id).await["job"]["id"], id.as_str());
    let result = artifact(3 * 1024 * 1024 + 12_345);
    assert_eq!(
        app.upload_form(success_form(&id, &worker_id, &result)).await.status(),
        200
    );

    let get = |range: Option<&str>| {
        let mut request = app
            .client
            .get(app.url(&format!("/api/builds/{id}/download")))
            .header("X-API-Key", API_KEY);
        if let Some(range) = range {
            request = request.header("Range", range);
        }
        request.send()
    };
    let whole = get(None).await.unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.headers()["content-length"], result.len().to_string().as_str());
    assert_eq!(whole.bytes().await.unwrap().as_ref(), result.as_slice());

    let len = result.len() as u64;
    for (header, start, end) in [
        ("bytes=1048570-2097160", 1_048_570u64, 2_097_161u64),
        ("bytes=0-0", 0, 1),
        ("bytes=3000000-", 3_000_000, len),
        ("bytes=-100000", len - 100_000, len),
        ("bytes=2097152-99999999", 2_097_152, len),
    ] {
        let part = get(Some(header)).await.unwrap();
        assert_eq!(part.status(), 206, "{header}");
        assert_eq!(
            part.headers()["content-range"],
            format!("bytes {start}-{}/{len}", end - 1).as_str(),
            "{header}"
        );
        assert_eq!(
            part.bytes().await.unwrap().as_ref(),
            &result[start as usize..end as usize],
            "{header}"
        );
    }
    let beyond = get(Some(&format!("bytes={len}-"))).await.unwrap();
    assert_eq!(beyond.status(), 416);
    assert_eq!(beyond.headers()["content-range"], format!("bytes */{len}").as_str());
}

/// A holder's source download right after its claim is checked against the row the claim kept on this
/// instance (no read of the build); a build cancelled (by its submitter or an operator) or given back
/// on this instance meanwhile is refused at once, as when the row was read, and a worker that does not
/// hold the build is refused too.
#[tokio::test]
async fn a_download_right_after_a_claim_follows_a_cancel_or_an_abandon() {
    let app = TestApp::spawn().await;
    let (worker_id, token) = app.register("w", &["ios"]).await;
    let (_, stranger) = app.register("other", &["ios"]).await;
    let (app, worker_id, token, stranger) = (&app, &worker_id, &token, &stranger);
    let source = move |id: &str, token: &str| {
        app.client
            .get(app.url(&format!("/api/builds/{id}/source")))
            .header("X-Worker-Token", token)
            .send()
    };
    let claim = move |body: &'static [u8]| async move {
        let id = app.submit("ios", body).await["id"].as_str().unwrap().to_string();
        assert_eq!(app.poll(worker_id).await["job"]["id"], id.as_str());
        let r = source(&id, token).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().as_ref(), body);
        assert_eq!(source(&id, stranger).await.unwrap().status(), 403, "not its build");
        id
    };

    let cancel = move |path: String| async move {
        let r = app
            .client
            .post(app.url(&path))
            .header("X-API-Key", API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    };

    let by_submitter = claim(b"first").await;
    cancel(format!("/api/builds/{by_submitter}/cancel")).await;
    assert_eq!(
        source(&by_submitter, token).await.unwrap().status(),
        403,
        "cancelled by its submitter"
    );

    let by_operator = claim(b"second").await;
    cancel(format!("/api/v2/builds/{by_operator}/cancel")).await;
    assert_eq!(
        source(&by_operator, token).await.unwrap().status(),
        403,
        "cancelled by an operator"
    );

    let abandoned = claim(b"third").await;
    let r = app
        .client
        .post(app.url("/api/workers/abandon"))
        .header("X-Worker-Token", token)
        .json(&serde_json::json!({ "build_id": abandoned, "reason": "disk full" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(source(&abandoned, token).await.unwrap().status(), 403, "given back");
}

/// The row a claim kept on one instance follows a cancel made on another: the former holder's next
/// source download is refused once the event stream delivered the cancel there, well within the
/// cache's 2 s TTL (it was served from that row before the cancel).
#[tokio::test]
async fn a_download_right_after_a_claim_follows_a_cancel_made_on_another_instance() {
    let app = TestApp::spawn().await;
    let other = TestApp::spawn_on(&app).await;
    let (worker_id, token) = app.register("w", &["ios"]).await;
    let id = app.submit("ios", b"source").await["id"].as_str().unwrap().to_string();
    assert_eq!(app.poll(&worker_id).await["job"]["id"], id.as_str());
    let source = || {
        app.client
            .get(app.url(&format!("/api/builds/{id}/source")))
            .header("X-Worker-Token", &token)
            .send()
    };
    assert_eq!(source().await.unwrap().status(), 200);
    let r = other
        .client
        .post(other.url(&format!("/api/v2/builds/{id}/cancel")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cancelled = std::time::Instant::now();
    loop {
        let status = source().await.unwrap().status();
        if status == 403 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            cancelled.elapsed() < std::time::Duration::from_millis(1500),
            "the former holder still downloads the source 1.5 s after a cancel on another instance"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
