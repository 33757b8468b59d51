//! The event stream: every state change emits exactly one event from the queue layer, in the
//! transaction of the change; SSE delivers them in id order, resumable with `Last-Event-ID`, filtered,
//! and ends promptly at shutdown.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use expo_controller::ids;
use expo_controller::jobs::{Job, JobContext};
use expo_controller::queue::{self, NewBuild, Platform};
use expo_controller::storage::Storage;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::support::{self, API_KEY, TestApp, success_form};

/// One SSE frame.
#[derive(Debug, Clone)]
struct Frame {
    id: Option<i64>,
    event: String,
    data: Value,
}

/// A connected SSE client that parses frames as they arrive.
struct Stream {
    response: reqwest::Response,
    buffer: String,
}

impl Stream {
    async fn open(app: &TestApp, query: &str, last_event_id: Option<i64>) -> Stream {
        let mut request = app
            .client
            .get(app.url(&format!("/api/v2/events{query}")))
            .header("X-API-Key", API_KEY)
            .timeout(Duration::from_secs(120));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request.send().await.expect("connect");
        assert_eq!(response.status(), 200, "subscribe {query}");
        Stream {
            response,
            buffer: String::new(),
        }
    }

    /// The next frame within `within`; `None` on timeout or when the stream ended.
    async fn next(&mut self, within: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let raw: String = self.buffer.drain(..end + 2).collect();
                let mut frame = Frame {
                    id: None,
                    event: String::new(),
                    data: Value::Null,
                };
                for line in raw.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        frame.id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        frame.event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        frame.data = serde_json::from_str(v.trim()).expect("data is JSON");
                    }
                }
                if frame.event.is_empty() {
                    continue; // keep-alive comment
                }
                return Some(frame);
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }

    /// Frames until one satisfies `last` (included); panics after 15 s.
    async fn until(&mut self, last: impl Fn(&Frame) -> bool) -> Vec<Frame> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut frames = Vec::new();
        while Instant::now() < deadline {
            if let Some(frame) = self.next(Duration::from_millis(500)).await {
                let done = last(&frame);
                frames.push(frame);
                if done {
                    return frames;
                }
            }
        }
        panic!("stream did not deliver the expected event; got {frames:#?}");
    }
}

fn kinds(frames: &[Frame]) -> Vec<&str> {
    frames.iter().map(|f| f.event.as_str()).collect()
}

fn assert_increasing(frames: &[Frame]) {
    let ids: Vec<i64> = frames.iter().map(|f| f.id.expect("every event has an id")).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids strictly increase: {ids:?}");
    for frame in frames {
        assert_eq!(frame.data["id"].as_i64(), frame.id, "data.id is the SSE id");
        assert_eq!(frame.data["kind"], frame.event.as_str());
        let at = frame.data["at"].as_str().expect("at");
        assert!(
            chrono::DateTime::parse_from_rfc3339(at).is_ok() && at.ends_with('Z') && at.len() == 24,
            "{at}"
        );
    }
}

/// Outbox rows `(kind, build_id, worker_id, data)` in id order.
async fn outbox(pool: &PgPool) -> Vec<(String, Option<String>, Option<String>, Value)> {
    sqlx::query_as::<_, (String, Option<String>, Option<String>, sqlx::types::Json<Value>)>(
        "SELECT kind, build_id, worker_id, data FROM events ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(k, b, w, d)| (k, b, w, d.0))
    .collect()
}

async fn outbox_kinds_of(pool: &PgPool, build_id: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT kind FROM events WHERE build_id = $1 ORDER BY id")
        .bind(build_id)
        .fetch_all(pool)
        .await
        .unwrap()
}

fn new_build(platform: Platform) -> NewBuild {
    let id = ids::new_id();
    NewBuild {
        requirements: None,
        submitted_by: None,
        source_key: format!("builds/{id}/source.zip"),
        id,
        platform,
        priority: 0,
        max_attempts: 2,
        run_at: None,
        retry_build_failures: false,
        source_size: 1,
        certs_key: None,
        access_token_hash: ids::hash_secret("token"),
        original_build_id: None,
    }
}

async fn heartbeat(app: &TestApp, build_id: &str, worker_id: &str, body: Value) {
    let r = app
        .client
        .post(app.url(&format!("/api/builds/{build_id}/heartbeat")))
        .query(&[("worker_id", worker_id)])
        .header("X-API-Key", API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

async fn admin_post(app: &TestApp, path: &str) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_build_run_by_a_worker_emits_each_change_once_in_order() {
    let app = TestApp::spawn().await;
    let mut stream = Stream::open(&app, "", None).await;
    let (worker_id, _) = app.register("mac", &["ios"]).await;
    let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    app.poll(&worker_id).await;
    app.poll(&worker_id).await; // re-delivery of the same attempt: no change, no event
    heartbeat(&app, &id, &worker_id, json!({ "progress": 10, "stage": "pod install" })).await;
    heartbeat(&app, &id, &worker_id, json!({ "progress": 10, "stage": "pod install" })).await; // unchanged
    heartbeat(&app, &id, &worker_id, json!({})).await; // unchanged
    heartbeat(&app, &id, &worker_id, json!({ "progress": 55 })).await;
    let lines = json!({ "logs": [{ "level": "info", "message": "one" }, { "level": "info", "message": "two" }] });
    let r = app
        .client
        .post(app.url(&format!("/api/builds/{id}/logs")))
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", &worker_id)
        .json(&lines)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        app.upload_form(success_form(&id, &worker_id, b"app")).await.status(),
        200
    );

    let frames = stream.until(|f| f.event == "build.completed").await;
    assert_eq!(
        kinds(&frames),
        [
            "worker.registered",
            "build.submitted",
            "build.assigned",
            "build.building",
            "build.progress",
            "build.log",
            "build.completed"
        ]
    );
    assert_increasing(&frames);
    let data: Vec<&Value> = frames.iter().map(|f| &f.data).collect();
    assert_eq!(data[0]["worker_id"], worker_id.as_str());
    assert_eq!((&data[0]["state"], &data[0]["name"]), (&json!("idle"), &json!("mac")));
    for d in &data[1..] {
        assert_eq!((&d["build_id"], &d["platform"]), (&json!(id), &json!("ios")));
    }
    assert_eq!(data[1]["state"], "pending");
    assert_eq!(
        (&data[2]["state"], &data[2]["worker_id"]),
        (&json!("assigned"), &json!(worker_id))
    );
    assert_eq!(
        (&data[3]["state"], &data[3]["progress"], &data[3]["stage"]),
        (&json!("building"), &json!(10), &json!("pod install"))
    );
    assert_eq!(
        (&data[4]["state"], &data[4]["progress"]),
        (&json!("building"), &json!(55))
    );
    assert_eq!(
        (&data[5]["from_seq"], &data[5]["to_seq"], &data[5]["count"]),
        (&json!(2), &json!(3), &json!(2)),
        "one event per posted batch, with its sequence range (seq 1 is the assignment line)"
    );
    assert_eq!(
        (&data[6]["state"], &data[6]["worker_id"]),
        (&json!("completed"), &json!(worker_id))
    );
    assert!(stream.next(Duration::from_millis(300)).await.is_none(), "nothing else");
    // The stream is the outbox, in the same order.
    let rows = outbox(&app.pool).await;
    assert_eq!(rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), kinds(&frames));

    // A late tail after completion (the general append path) is announced too; seq 4 is "Build completed".
    let late = json!({ "logs": [{ "level": "info", "message": "flushed late" }] });
    let r = app
        .client
        .post(app.url(&format!("/api/builds/{id}/logs")))
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", &worker_id)
        .json(&late)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tail = stream.next(Duration::from_secs(10)).await.expect("late log event");
    assert_eq!(tail.event, "build.log");
    assert_eq!(
        (
            &tail.data["state"],
            &tail.data["platform"],
            &tail.data["from_seq"],
            &tail.data["to_seq"]
        ),
        (&json!("completed"), &json!("ios"), &json!(5), &json!(5))
    );
}

#[tokio::test]
async fn failures_unregistering_and_abandoned_workers_emit_their_events() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("w", &["android"]).await;
    // A reported build failure is final.
    let failed = app.submit("android", b"s").await["id"].as_str().unwrap().to_string();
    app.poll(&worker_id).await;
    let form = reqwest::multipart::Form::new()
        .text("build_id", failed.clone())
        .text("worker_id", worker_id.clone())
        .text("success", "false")
        .text("error_message", "gradle exploded");
    assert_eq!(app.upload_form(form).await.status(), 200);
    let rows = outbox(&app.pool).await;
    let last = rows.last().unwrap();
    assert_eq!(
        (last.0.as_str(), last.2.as_deref()),
        ("build.failed", Some(worker_id.as_str()))
    );
    assert_eq!(last.3["state"], "failed");
    assert_eq!(
        last.3["error"],
        json!({ "kind": "build_failure", "message": "gradle exploded" })
    );

    // Unregistering gives the held attempt back (retry scheduled) and takes the worker offline.
    let held = app.submit("android", b"s").await["id"].as_str().unwrap().to_string();
    app.poll(&worker_id).await;
    let before = outbox(&app.pool).await.len();
    assert_eq!(
        admin_post(&app, &format!("/api/workers/{worker_id}/unregister"))
            .await
            .status(),
        200
    );
    let rows = outbox(&app.pool).await;
    let new: Vec<&str> = rows[before..]
        .iter()
        .filter(|r| r.0 != "build.log")
        .map(|r| r.0.as_str())
        .collect();
    assert_eq!(new, ["build.retry_scheduled", "worker.offline"]);
    let retry = rows[before..].iter().find(|r| r.0 == "build.retry_scheduled").unwrap();
    assert_eq!(retry.1.as_deref(), Some(held.as_str()));
    assert_eq!(
        (&retry.3["state"], &retry.3["reason"]),
        (&json!("retryable"), &json!("worker_unregistered"))
    );
    assert!(retry.3["next_run_at"].is_string());
}

#[tokio::test]
async fn operator_actions_emit_one_event_each_and_only_for_real_changes() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("w", &["ios"]).await;
    let mut stream = Stream::open(
        &app,
        "?kind=build.*,queue.*,worker.draining,worker.disabled,worker.enabled,worker.offline,worker.revoked",
        None,
    )
    .await;
    let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();

    assert_eq!(
        admin_post(&app, &format!("/api/v2/builds/{id}/cancel")).await.status(),
        200
    );
    assert_eq!(
        admin_post(&app, &format!("/api/v2/builds/{id}/retry")).await.status(),
        200
    );
    app.poll(&worker_id).await;
    assert_eq!(
        admin_post(&app, &format!("/api/v2/builds/{id}/requeue")).await.status(),
        200
    );
    let r = app
        .client
        .patch(app.url(&format!("/api/v2/builds/{id}")))
        .header("X-API-Key", API_KEY)
        .json(&json!({ "priority": 7 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for path in ["pause", "pause", "resume", "resume"] {
        assert_eq!(
            admin_post(&app, &format!("/api/v2/queues/ios/{path}")).await.status(),
            200
        );
    }
    for path in ["drain", "drain", "disable", "enable"] {
        assert_eq!(
            admin_post(&app, &format!("/api/v2/workers/{worker_id}/{path}"))
                .await
                .status(),
            200
        );
    }
    let r = app
        .client
        .delete(app.url(&format!("/api/v2/workers/{worker_id}")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        admin_post(&app, &format!("/api/v2/builds/{id}/cancel")).await.status(),
        200
    );
    let r = app
        .client
        .delete(app.url(&format!("/api/v2/builds/{id}")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    let frames = stream.until(|f| f.event == "build.deleted").await;
    assert_increasing(&frames);
    let logs: Vec<&Frame> = frames.iter().filter(|f| f.event == "build.log").collect();
    assert!(
        logs.iter().all(|f| f.data["from_seq"] == f.data["to_seq"]),
        "controller-written lines are announced too"
    );
    let changes: Vec<&Frame> = frames.iter().filter(|f| f.event != "build.log").collect();
    let summary: Vec<(&str, &Value)> = changes.iter().map(|f| (f.event.as_str(), &f.data["state"])).collect();
    assert_eq!(
        summary,
        [
            ("build.submitted", &json!("pending")),
            ("build.cancelled", &json!("cancelled")),
            ("build.requeued", &json!("pending")),
            ("build.assigned", &json!("assigned")),
            ("build.requeued", &json!("pending")),
            ("build.updated", &json!("pending")),
            ("queue.paused", &json!("paused")),
            ("queue.resumed", &json!("running")),
            ("worker.draining", &json!("idle")),
            ("worker.disabled", &json!("idle")),
            ("worker.enabled", &json!("idle")),
            ("worker.offline", &json!("offline")),
            ("worker.revoked", &json!("offline")),
            ("build.cancelled", &json!("cancelled")),
            ("build.deleted", &json!("cancelled")),
        ]
    );
    assert_eq!(changes[2].data["reason"], "retry");
    assert_eq!(
        (&changes[4].data["reason"], &changes[4].data["worker_id"]),
        (&json!("operator"), &json!(worker_id))
    );
    assert_eq!(changes[5].data["priority"], 7);
    assert_eq!(changes[6].data["platform"], "ios");
    assert_eq!(changes[9].data["admin_state"], "disabled");
}

#[tokio::test]
async fn each_maintenance_job_emits_its_events() {
    let app = TestApp::spawn().await;
    let storage = Storage::local(&app.storage_dir, false).unwrap();
    let ctx = |jobs: expo_controller::config::JobsConfig| JobContext {
        pool: app.pool.clone(),
        storage: storage.clone(),
        settings: Default::default(),
        jobs,
    };
    let keep_events = expo_controller::config::JobsConfig {
        event_retention_hours: 24 * 365,
        ..Default::default()
    };
    let jobs = ctx(keep_events);
    let settings = jobs.settings.clone();
    let pool = &app.pool;
    let worker = support::worker(pool, "w", &[Platform::Ios]).await;
    let id = support::enqueue(pool, Platform::Ios, 0, 3).await;
    let now = Utc::now();
    let since = |rows: &Vec<(String, Option<String>, Option<String>, Value)>, n: usize| {
        rows[n..].iter().map(|r| (r.0.clone(), r.3.clone())).collect::<Vec<_>>()
    };

    // Rescue: the lease expired; another attempt is scheduled.
    queue::claim(pool, &worker, &settings, now).await.unwrap().unwrap();
    let n = outbox(pool).await.len();
    let later = now + chrono::Duration::hours(1);
    assert_eq!(Job::RescueExpiredLeases.run_once(&jobs, later).await.unwrap(), 1);
    let new = since(&outbox(pool).await, n);
    let rescued: Vec<_> = new.iter().filter(|(k, _)| k != "build.log").collect();
    assert_eq!(rescued.len(), 1, "{new:?}");
    assert_eq!(rescued[0].0, "build.rescued");
    assert_eq!(
        (&rescued[0].1["state"], &rescued[0].1["error"]["kind"]),
        (&json!("retryable"), &json!("infrastructure"))
    );
    assert!(rescued[0].1["next_run_at"].is_string());

    // Promotion: the retry came due.
    let n = outbox(pool).await.len();
    let much_later = now + chrono::Duration::hours(2);
    assert_eq!(Job::PromoteScheduled.run_once(&jobs, much_later).await.unwrap(), 1);
    let new = since(&outbox(pool).await, n);
    assert_eq!(new.len(), 1);
    assert_eq!(new[0].0, "build.updated");
    assert_eq!(
        (&new[0].1["state"], &new[0].1["reason"]),
        (&json!("pending"), &json!("promoted"))
    );

    // Deadline: the second attempt runs too long.
    queue::claim(pool, &worker, &settings, much_later)
        .await
        .unwrap()
        .unwrap();
    let n = outbox(pool).await.len();
    let past_deadline = much_later + chrono::Duration::hours(3);
    assert_eq!(Job::DeadlineSweep.run_once(&jobs, past_deadline).await.unwrap(), 1);
    let new = since(&outbox(pool).await, n);
    let timed_out: Vec<_> = new.iter().filter(|(k, _)| k != "build.log").collect();
    assert_eq!(timed_out.len(), 1, "{new:?}");
    assert_eq!(timed_out[0].0, "build.timed_out");
    assert_eq!(
        (&timed_out[0].1["state"], &timed_out[0].1["error"]["kind"]),
        (&json!("failed"), &json!("timeout"))
    );

    // Offline workers, and back online at the next poll.
    let n = outbox(pool).await.len();
    assert_eq!(Job::OfflineWorkers.run_once(&jobs, past_deadline).await.unwrap(), 1);
    let new = since(&outbox(pool).await, n);
    assert_eq!(
        new,
        [(
            "worker.offline".to_string(),
            json!({ "state": "offline", "admin_state": "active", "reason": "unseen" })
        )]
    );
    let offline = queue::find_worker(pool, &worker.id).await.unwrap().unwrap();
    assert!(
        queue::touch_worker(pool, &offline, &settings, past_deadline)
            .await
            .unwrap()
    );
    let new = since(&outbox(pool).await, n + 1);
    assert_eq!(
        new,
        [(
            "worker.online".to_string(),
            json!({ "state": "idle", "admin_state": "active" })
        )]
    );

    // Prune: the finished build's row goes (its objects are already gone), with an event.
    sqlx::query("UPDATE builds SET source_key = NULL WHERE id = $1")
        .bind(&id)
        .execute(pool)
        .await
        .unwrap();
    let n = outbox(pool).await.len();
    Job::Prune
        .run_once(&jobs, past_deadline + chrono::Duration::days(31))
        .await
        .unwrap();
    let new = since(&outbox(pool).await, n);
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(new[0].0, "build.deleted");
    assert_eq!(
        (&new[0].1["state"], &new[0].1["reason"]),
        (&json!("failed"), &json!("pruned"))
    );

    // Prune also trims the outbox itself, by age.
    Job::Prune
        .run_once(&ctx(Default::default()), Utc::now() + chrono::Duration::hours(25))
        .await
        .unwrap();
    assert_eq!(app.count("events").await, 0);
}

#[tokio::test]
async fn a_rolled_back_change_has_no_event_and_the_stream_moves_past_its_id() {
    let app = TestApp::spawn().await;
    let mut stream = Stream::open(&app, "", None).await;
    let mut tx = app.pool.begin().await.unwrap();
    let ghost = new_build(Platform::Ios);
    queue::enqueue(&mut tx, &ghost, Utc::now()).await.unwrap();
    tx.rollback().await.unwrap();
    let real = new_build(Platform::Ios);
    let mut conn = app.pool.acquire().await.unwrap();
    queue::enqueue(&mut conn, &real, Utc::now()).await.unwrap();

    let frame = stream
        .next(Duration::from_secs(10))
        .await
        .expect("the committed build's event");
    assert_eq!(
        (frame.event.as_str(), &frame.data["build_id"]),
        ("build.submitted", &json!(real.id))
    );
    assert!(stream.next(Duration::from_millis(300)).await.is_none());
    assert_eq!(outbox_kinds_of(&app.pool, &ghost.id).await, Vec::<String>::new());
    assert_eq!(app.count("builds").await, 1);
}

#[tokio::test]
async fn ids_committed_out_of_order_are_delivered_in_id_order() {
    let app = TestApp::spawn().await;
    let mut stream = Stream::open(&app, "", None).await;
    // A draws the lower id but commits last.
    let mut slow = app.pool.begin().await.unwrap();
    let first = new_build(Platform::Ios);
    queue::enqueue(&mut slow, &first, Utc::now()).await.unwrap();
    let second = new_build(Platform::Android);
    let mut conn = app.pool.acquire().await.unwrap();
    queue::enqueue(&mut conn, &second, Utc::now()).await.unwrap();
    assert!(
        stream.next(Duration::from_millis(500)).await.is_none(),
        "the later id waits while the earlier one may still commit"
    );
    slow.commit().await.unwrap();
    let a = stream.next(Duration::from_secs(10)).await.expect("first");
    let b = stream.next(Duration::from_secs(10)).await.expect("second");
    assert_eq!(a.data["build_id"], json!(first.id));
    assert_eq!(b.data["build_id"], json!(second.id));
    assert!(a.id < b.id);
}

#[tokio::test]
async fn resuming_after_disconnects_misses_nothing_and_repeats_nothing_under_concurrent_writers() {
    let app = TestApp::spawn().await;
    let other = TestApp::spawn_on(&app).await;
    const WRITERS: usize = 6;
    const EACH: usize = 40;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let pool = app.pool.clone();
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..EACH {
                let build = new_build(if (w + i) % 2 == 0 {
                    Platform::Ios
                } else {
                    Platform::Android
                });
                // Some transactions roll back: their ids are gaps the stream must pass.
                let mut tx = pool.begin().await.unwrap();
                queue::enqueue(&mut tx, &build, Utc::now()).await.unwrap();
                if i % 7 == 3 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                    ids.push(build.id);
                }
            }
            ids
        }));
    }
    // A reader that drops its connection every few events and resumes on alternating instances.
    let mut seen: Vec<Frame> = Vec::new();
    let mut last: Option<i64> = None;
    let mut expected: Option<HashSet<String>> = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut round = 0;
    while Instant::now() < deadline {
        let instance = if round % 2 == 0 { &app } else { &other };
        round += 1;
        let mut stream = Stream::open(instance, "?kind=build.submitted", last.or(Some(0))).await;
        for _ in 0..7 {
            let Some(frame) = stream.next(Duration::from_millis(300)).await else {
                break;
            };
            last = frame.id;
            seen.push(frame);
        }
        drop(stream);
        if expected.is_none() && writers.iter().all(|w| w.is_finished()) {
            let mut all = HashSet::new();
            for writer in writers.drain(..) {
                all.extend(writer.await.unwrap());
            }
            expected = Some(all);
        }
        if let Some(all) = &expected
            && seen.len() >= all.len()
        {
            break;
        }
    }
    let all = expected.expect("writers finished");
    assert_increasing(&seen);
    let got: Vec<String> = seen
        .iter()
        .map(|f| f.data["build_id"].as_str().unwrap().to_string())
        .collect();
    let unique: HashSet<String> = got.iter().cloned().collect();
    assert_eq!(unique.len(), got.len(), "no event twice");
    assert_eq!(unique, all, "every committed build, and only those");
}

#[tokio::test]
async fn filters_select_by_build_worker_and_kind_and_bad_ones_are_refused() {
    let app = TestApp::spawn().await;
    let (w1, _) = app.register("one", &["ios"]).await;
    let (w2, _) = app.register("two", &["android"]).await;
    let b1 = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    let mut by_build = Stream::open(&app, &format!("?build={b1}"), None).await;
    let mut by_worker = Stream::open(&app, &format!("?worker={w2}"), None).await;
    let mut logs = Stream::open(&app, "?kind=build.log", None).await;
    let mut workers = Stream::open(&app, "?kind=worker.*", None).await;
    let b2 = app.submit("android", b"s").await["id"].as_str().unwrap().to_string();
    app.poll(&w1).await;
    app.poll(&w2).await;
    admin_post(&app, &format!("/api/v2/workers/{w1}/drain")).await;
    assert_eq!(
        admin_post(&app, &format!("/api/v2/builds/{b1}/cancel")).await.status(),
        200
    );
    admin_post(&app, &format!("/api/v2/workers/{w2}/drain")).await;

    let mut frames = by_build.until(|f| f.event == "build.cancelled").await;
    // Connected right after the submission: its event may or may not come first.
    frames.retain(|f| f.event != "build.submitted");
    assert!(frames.iter().all(|f| f.data["build_id"] == json!(b1)), "{frames:?}");
    assert_eq!(kinds(&frames), ["build.assigned", "build.log", "build.cancelled"]);
    let mut frames = by_worker.until(|f| f.event == "worker.draining").await;
    // Connected shortly after the registration: its event may or may not have been delivered yet (a
    // stream without Last-Event-ID starts after what the pump has delivered).
    assert!(frames.iter().all(|f| f.data["worker_id"] == json!(w2)), "{frames:?}");
    frames.retain(|f| f.event != "worker.registered");
    assert_eq!(kinds(&frames), ["build.assigned", "worker.draining"]);
    assert_eq!(frames[0].data["build_id"], json!(b2));
    let frames = logs.until(|f| f.data["build_id"] == json!(b1)).await;
    assert_eq!(kinds(&frames), ["build.log"]);
    let mut frames = workers
        .until(|f| f.event == "worker.draining" && f.data["worker_id"] == json!(w2))
        .await;
    assert!(frames.iter().all(|f| f.event.starts_with("worker.")), "{frames:?}");
    // Connected shortly after the registrations: their events may or may not have been delivered yet.
    frames.retain(|f| f.event != "worker.registered");
    assert_eq!(kinds(&frames), ["worker.draining", "worker.draining"]);

    for bad in [
        "?build=../x",
        "?worker=%20",
        "?kind=Build",
        "?kind=build.log,",
        "?last_event_id=-1",
        "?last_event_id=x",
    ] {
        let r = app
            .client
            .get(app.url(&format!("/api/v2/events{bad}")))
            .header("X-API-Key", API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    }
    let r = app
        .client
        .get(app.url("/api/v2/events"))
        .header("X-API-Key", API_KEY)
        .header("Last-Event-ID", "soon")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = app.client.get(app.url("/api/v2/events")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn a_resume_from_before_the_replay_window_says_so_then_continues() {
    let app = TestApp::spawn_with(|c| c.events.event_replay_events = 3).await;
    let mut conn = app.pool.acquire().await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..6 {
        let build = new_build(Platform::Ios);
        queue::enqueue(&mut conn, &build, Utc::now()).await.unwrap();
        ids.push(build.id);
    }
    let last: i64 = sqlx::query_scalar("SELECT max(id) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    // Wait until this instance has delivered them all.
    let mut live = Stream::open(&app, "", Some(last - 1)).await;
    live.next(Duration::from_secs(10)).await.expect("latest");
    let mut stream = Stream::open(&app, "", Some(last - 6)).await;
    let resync = stream.next(Duration::from_secs(10)).await.expect("resync");
    assert_eq!(resync.event, "stream.resync");
    assert_eq!(resync.data["missed_after"], json!(last - 6));
    let replayed: Vec<Frame> = stream.until(|f| f.id == Some(last)).await;
    assert_eq!(replayed.len(), 3, "the last three, still in the ring");
    assert_eq!(replayed[2].data["build_id"], json!(ids[5]));
}

#[tokio::test]
async fn shutdown_ends_open_streams_at_once() {
    let mut app = TestApp::spawn_with(|c| c.shutdown_grace_secs = 60).await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(Stream::open(&app, "", None).await);
    }
    let started = Instant::now();
    app.stop().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "stop waited {took:?}: streams held shutdown (grace is 60 s)"
    );
    for stream in &mut streams {
        assert!(stream.next(Duration::from_secs(5)).await.is_none(), "stream ended");
    }
}
