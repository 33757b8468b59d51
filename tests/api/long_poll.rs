//! Long polls (`GET /api/workers/poll?wait=`): woken by NOTIFY, never double-delivered, released on
//! timeout and on shutdown. Waits here are bounded conditions, not timing targets.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{API_KEY, TestApp};

async fn long_poll(app: &TestApp, token: &str, wait: u32) -> Value {
    app.client
        .get(app.url("/api/workers/poll"))
        .query(&[("wait", wait.to_string())])
        .header("X-Worker-Token", token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_waiting_worker_is_woken_by_a_submit() {
    let app = Arc::new(TestApp::spawn().await);
    let (_, token) = app.register("w", &["ios"]).await;
    let waiter = {
        let app = app.clone();
        tokio::spawn(async move { long_poll(&app, &token, 30).await })
    };
    // Let the poll start waiting (bounded: the re-check would also find the build within a second).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let submitted_at = Instant::now();
    let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    let answer = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("woken well before the wait ends")
        .unwrap();
    assert_eq!(answer["job"]["id"], id.as_str());
    assert!(submitted_at.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn a_long_poll_without_work_ends_with_no_job() {
    let app = TestApp::spawn().await;
    let (_, token) = app.register("w", &["ios"]).await;
    app.submit("android", b"other platform").await;
    let started = Instant::now();
    let answer = long_poll(&app, &token, 1).await;
    assert_eq!(answer["job"], Value::Null);
    assert!(started.elapsed() >= Duration::from_millis(900), "it waited");
    let r = app
        .client
        .get(app.url("/api/workers/poll"))
        .query(&[("wait", "61")])
        .header("X-Worker-Token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn many_waiting_workers_receive_each_build_once() {
    let app = Arc::new(TestApp::spawn().await);
    let mut waiters = Vec::new();
    for n in 0..16 {
        let (_, token) = app.register(&format!("w{n}"), &["android"]).await;
        let app = app.clone();
        waiters.push(tokio::spawn(async move { long_poll(&app, &token, 10).await }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut submitted = HashSet::new();
    for _ in 0..10 {
        submitted.insert(app.submit("android", b"s").await["id"].as_str().unwrap().to_string());
    }
    let mut delivered = Vec::new();
    for waiter in waiters {
        let answer = tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .unwrap()
            .unwrap();
        if let Some(id) = answer["job"]["id"].as_str() {
            delivered.push(id.to_string());
        }
    }
    assert_eq!(delivered.len(), 10, "ten builds, ten deliveries: {delivered:?}");
    assert_eq!(delivered.into_iter().collect::<HashSet<_>>(), submitted);
}

#[tokio::test]
async fn shutdown_releases_waiting_polls_at_once() {
    let mut app = TestApp::spawn().await;
    let (_, token) = app.register("w", &["ios"]).await;
    let client = app.client.clone();
    let url = app.url("/api/workers/poll?wait=60");
    let waiter = tokio::spawn(async move {
        client
            .get(url)
            .header("X-Worker-Token", token)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    app.stop().await;
    let answer = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("released, not held for 60 s")
        .unwrap();
    assert_eq!(answer["job"], json!(null));
    assert!(stopping.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_build_submitted_through_another_instance_wakes_the_waiter() {
    // Two servers on one database: the submit goes to the second, the waiter polls the first.
    let first = Arc::new(TestApp::spawn().await);
    let second = TestApp::spawn_on(&first).await;
    let (_, token) = first.register("w", &["ios"]).await;
    let waiter = {
        let first = first.clone();
        tokio::spawn(async move { long_poll(&first, &token, 30).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let form = reqwest::multipart::Form::new().text("platform", "ios").part(
        "source",
        reqwest::multipart::Part::bytes(b"s".to_vec()).file_name("a.zip"),
    );
    let submitted: Value = second
        .client
        .post(second.url("/api/builds/submit"))
        .header("X-API-Key", API_KEY)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer["job"]["id"], submitted["id"]);
}
