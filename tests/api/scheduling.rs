//! Scheduling (scheduling.md) against a real PostgreSQL: weighted fair share between submitters in the
//! claim, no starvation behind a heavy submitter, idle time not banked, max running; max queued.

use std::collections::HashMap;

use chrono::Utc;
use expo_controller::config::QueueConfig;
use expo_controller::ids;
use expo_controller::queue::{self, Holder, NewBuild, Platform, ResultFile, Worker};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{API_KEY, TestApp, fresh_database, worker};

/// A submitter key with a weight and a max running (0 = unlimited), inserted directly.
pub async fn submitter(pool: &PgPool, id: &str, weight: i32, max_running: i32) {
    sqlx::query(
        "INSERT INTO api_keys (id, name, role, prefix, secret_hash, created_at, weight, max_running)
         VALUES ($1, $1, 'submitter', 'efa_sub', $2, now(), $3, $4)",
    )
    .bind(id)
    .bind(ids::hash_secret(id))
    .bind(weight)
    .bind(max_running)
    .execute(pool)
    .await
    .expect("key");
}

/// Enqueues `n` iOS builds of `submitter` (`None`: the built-in admin key) directly; returns their ids.
pub async fn enqueue_for(pool: &PgPool, submitter: Option<&str>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let id = ids::new_id();
        let new = NewBuild {
            requirements: None,
            submitted_by: submitter.map(str::to_string),
            id: id.clone(),
            platform: Platform::Ios,
            priority: 0,
            max_attempts: 3,
            run_at: None,
            retry_build_failures: false,
            source_key: format!("builds/{id}/source.zip"),
            source_size: 1,
            certs_key: None,
            access_token_hash: ids::hash_secret("token"),
            original_build_id: None,
        };
        let mut conn = pool.acquire().await.expect("conn");
        queue::enqueue(&mut conn, &new, Utc::now()).await.expect("enqueue");
        out.push(id);
    }
    out
}

/// Claims for `w`; returns (build id, submitter) of a new attempt.
async fn claim(pool: &PgPool, w: &Worker) -> Option<(String, String, i64)> {
    let c = queue::claim(pool, w, &QueueConfig::default(), Utc::now())
        .await
        .expect("claim")?;
    assert!(!c.redelivered);
    Some((
        c.build.id.clone(),
        c.build.submitted_by.clone().unwrap_or_else(|| "admin".into()),
        c.build.lease_token.expect("token"),
    ))
}

async fn complete(pool: &PgPool, w: &Worker, build_id: &str, token: i64) {
    let result = ResultFile {
        key: format!("builds/{build_id}/result-x.bin"),
        size: 1,
        sha256: "00".into(),
    };
    queue::record_writes(pool, &[result.key.as_str()])
        .await
        .expect("pending");
    queue::complete(pool, build_id, Holder::attempt(&w.id, token), &result, Utc::now())
        .await
        .expect("complete");
}

fn assert_shares(counts: &HashMap<String, usize>, weights: &[(&str, f64)], total: usize, what: &str) {
    let weight_sum: f64 = weights.iter().map(|(_, w)| w).sum();
    for (name, weight) in weights {
        let expected = weight / weight_sum;
        let got = counts.get(*name).copied().unwrap_or(0) as f64 / total as f64;
        assert!(
            (got - expected).abs() <= expected * 0.10,
            "{what}: {name} got {got:.3} of the claims, weight share {expected:.3} ({counts:?})"
        );
    }
}

/// Weights 1, 1, 2 with full queues (the heavy one submitted first): four workers running builds of
/// equal length, claims in the order the workers finish.
#[tokio::test]
async fn shares_follow_weights_with_four_workers() {
    let (_, pool) = fresh_database(5).await;
    for (key, weight) in [("a", 1), ("b", 1), ("c", 2)] {
        submitter(&pool, key, weight, 0).await;
    }
    for key in ["c", "a", "b"] {
        enqueue_for(&pool, Some(key), 120).await;
    }
    let mut workers = Vec::new();
    for n in 0..4 {
        workers.push(worker(&pool, &format!("w{n}"), &[Platform::Ios]).await);
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut running = Vec::new();
    for w in &workers {
        let (id, who, token) = claim(&pool, w).await.expect("a build");
        *counts.entry(who).or_default() += 1;
        running.push((id, token));
    }
    // Equal lengths: the workers finish in the order they started, and each claims again at once.
    let total = 200;
    for n in 4..total {
        let slot = n % 4;
        let (id, token) = running[slot].clone();
        complete(&pool, &workers[slot], &id, token).await;
        let (id, who, token) = claim(&pool, &workers[slot]).await.expect("a build");
        *counts.entry(who).or_default() += 1;
        running[slot] = (id, token);
    }
    assert_shares(&counts, &[("a", 1.0), ("b", 1.0), ("c", 2.0)], total, "four workers");
}

/// The same with one worker whose builds end at once: fairness does not depend on builds overlapping.
#[tokio::test]
async fn shares_follow_weights_with_one_worker_and_instant_builds() {
    let (_, pool) = fresh_database(5).await;
    for (key, weight) in [("a", 1), ("b", 1), ("c", 2)] {
        submitter(&pool, key, weight, 0).await;
    }
    for key in ["c", "a", "b"] {
        enqueue_for(&pool, Some(key), 120).await;
    }
    let w = worker(&pool, "solo", &[Platform::Ios]).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    let total = 200;
    for _ in 0..total {
        let (id, who, token) = claim(&pool, &w).await.expect("a build");
        *counts.entry(who).or_default() += 1;
        complete(&pool, &w, &id, token).await;
    }
    assert_shares(&counts, &[("a", 1.0), ("b", 1.0), ("c", 2.0)], total, "one worker");
}

/// A submitter with 100 queued builds and another submitting one (including the built-in admin key,
/// which counts as the submitter `admin`): the one build is among the next 2 claims.
#[tokio::test]
async fn a_single_build_is_among_the_next_two_claims_behind_another_submitters_hundred() {
    let (_, pool) = fresh_database(5).await;
    submitter(&pool, "heavy", 1, 0).await;
    submitter(&pool, "light", 1, 0).await;
    enqueue_for(&pool, Some("heavy"), 100).await;
    let w = worker(&pool, "solo", &[Platform::Ios]).await;
    // The heavy submitter has been served alone for a while.
    for _ in 0..10 {
        let (id, who, token) = claim(&pool, &w).await.expect("a build");
        assert_eq!(who, "heavy");
        complete(&pool, &w, &id, token).await;
    }
    for late in [Some("light"), None] {
        let single = enqueue_for(&pool, late, 1).await.remove(0);
        let mut next = Vec::new();
        for _ in 0..2 {
            let (id, _, token) = claim(&pool, &w).await.expect("a build");
            complete(&pool, &w, &id, token).await;
            next.push(id);
        }
        assert!(
            next.contains(&single),
            "{late:?}'s build is among the next 2 claims: {next:?}"
        );
    }
}

/// Idle time is not banked: a submitter that had nothing queued while another was served rejoins at the
/// current minimum pass, so its burst shares the worker instead of taking every claim until it caught up.
#[tokio::test]
async fn a_returning_submitter_does_not_bank_its_idle_time() {
    let (_, pool) = fresh_database(5).await;
    submitter(&pool, "steady", 1, 0).await;
    submitter(&pool, "burst", 1, 0).await;
    enqueue_for(&pool, Some("burst"), 1).await;
    enqueue_for(&pool, Some("steady"), 100).await;
    let w = worker(&pool, "solo", &[Platform::Ios]).await;
    let mut first = Vec::new();
    for _ in 0..40 {
        let (id, who, token) = claim(&pool, &w).await.expect("a build");
        complete(&pool, &w, &id, token).await;
        first.push(who);
    }
    assert_eq!(first.iter().filter(|w| *w == "burst").count(), 1);
    enqueue_for(&pool, Some("burst"), 20).await;
    let mut burst = 0;
    for _ in 0..20 {
        let (id, who, token) = claim(&pool, &w).await.expect("a build");
        complete(&pool, &w, &id, token).await;
        burst += usize::from(who == "burst");
    }
    assert!(
        (9..=11).contains(&burst),
        "the returning submitter shares the worker: {burst} of 20 claims"
    );
}

/// Priority stays absolute: an operator's priority build goes first whoever has the lowest pass.
#[tokio::test]
async fn priority_comes_before_fair_share() {
    let (_, pool) = fresh_database(5).await;
    submitter(&pool, "a", 1, 0).await;
    submitter(&pool, "b", 1, 0).await;
    enqueue_for(&pool, Some("a"), 3).await;
    let urgent = enqueue_for(&pool, Some("a"), 1).await.remove(0);
    sqlx::query("UPDATE builds SET priority = 5 WHERE id = $1")
        .bind(&urgent)
        .execute(&pool)
        .await
        .expect("priority");
    enqueue_for(&pool, Some("b"), 3).await;
    let w = worker(&pool, "solo", &[Platform::Ios]).await;
    let (id, _, token) = claim(&pool, &w).await.expect("a build");
    assert_eq!(id, urgent);
    complete(&pool, &w, &id, token).await;
    // a has been served: b goes next.
    let (_, who, _) = claim(&pool, &w).await.expect("a build");
    assert_eq!(who, "b");
}

/// A submitter with max running 1 and two queued builds: a second worker gets another submitter's build
/// (or nothing), never its second one, until its first ends.
#[tokio::test]
async fn max_running_holds_a_submitters_extra_builds_back() {
    let (_, pool) = fresh_database(5).await;
    submitter(&pool, "capped", 1, 1).await;
    submitter(&pool, "other", 1, 0).await;
    enqueue_for(&pool, Some("capped"), 2).await;
    let w1 = worker(&pool, "w1", &[Platform::Ios]).await;
    let w2 = worker(&pool, "w2", &[Platform::Ios]).await;
    let w3 = worker(&pool, "w3", &[Platform::Ios]).await;
    let (first, who, token) = claim(&pool, &w1).await.expect("a build");
    assert_eq!(who, "capped");
    assert_eq!(claim(&pool, &w2).await.map(|c| c.1), None, "its second build waits");
    let other = enqueue_for(&pool, Some("other"), 1).await.remove(0);
    let (got, _, _) = claim(&pool, &w2).await.expect("another submitter's build");
    assert_eq!(got, other);
    complete(&pool, &w1, &first, token).await;
    let (_, who, _) = claim(&pool, &w3).await.expect("its second build, now");
    assert_eq!(who, "capped");
}

/// The claims and completions of a build cycle update the worker's row in place (HOT updates: no new
/// index entries, old versions pruned within the page), issue #25: an index on `workers.last_seen_at` or
/// `workers.status` (changed by every claim and completion) would make each of these updates write an
/// entry in every index of the table and leave a dead version for each reader of the row.
#[tokio::test]
async fn claims_and_completions_update_the_worker_row_in_place() {
    // One connection: every update below is counted by the backend whose statistics are flushed at the end.
    let (_, pool) = fresh_database(1).await;
    submitter(&pool, "a", 1, 0).await;
    submitter(&pool, "b", 2, 0).await;
    enqueue_for(&pool, Some("a"), 10).await;
    enqueue_for(&pool, Some("b"), 10).await;
    let w = worker(&pool, "hot", &[Platform::Ios]).await;
    for _ in 0..20 {
        let (id, _, token) = claim(&pool, &w).await.expect("a build");
        complete(&pool, &w, &id, token).await;
    }
    assert_eq!(claim(&pool, &w).await, None);
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&pool)
        .await
        .expect("flush");
    let (updated, hot): (i64, i64) =
        sqlx::query_as("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'workers'")
            .fetch_one(&pool)
            .await
            .expect("table statistics");
    assert!(updated >= 40, "{updated} updates of workers counted");
    assert!(
        hot * 10 >= updated * 9,
        "only {hot} of {updated} updates of workers were HOT"
    );
}

/// Updates of `submitter_shares` counted so far by this pool's one backend (flushed first).
async fn share_row_updates(pool: &PgPool) -> i64 {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(pool)
        .await
        .expect("flush");
    sqlx::query_scalar("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'submitter_shares'")
        .fetch_one(pool)
        .await
        .expect("table statistics")
}

/// A claim updates its submitter's fair-share row once (issue #25, migration 0280): the pass advance by
/// 1 / weight and the queued count's decrement in one update, not two versions of the row (the hot row
/// every submit and claim of a single heavy submitter waits for). The passes still follow the weights.
#[tokio::test]
async fn a_claim_updates_its_submitters_share_row_once() {
    // One connection: every update below is counted by the backend whose statistics are flushed.
    let (_, pool) = fresh_database(1).await;
    submitter(&pool, "a", 1, 0).await;
    submitter(&pool, "b", 2, 0).await;
    enqueue_for(&pool, Some("a"), 10).await;
    enqueue_for(&pool, Some("b"), 10).await;
    let w = worker(&pool, "one", &[Platform::Ios]).await;
    let before = share_row_updates(&pool).await;
    let mut claims = 0;
    while let Some((id, _, token)) = claim(&pool, &w).await {
        claims += 1;
        complete(&pool, &w, &id, token).await;
    }
    assert_eq!(claims, 20);
    let updates = share_row_updates(&pool).await - before;
    assert_eq!(
        updates, claims,
        "{updates} updates of submitter_shares for {claims} claims"
    );
    let shares: Vec<(String, f64, i32)> = sqlx::query_as(
        "SELECT submitter, pass, queued FROM submitter_shares WHERE queue = 'ios' AND submitter IN ('a', 'b')
         ORDER BY submitter",
    )
    .fetch_all(&pool)
    .await
    .expect("shares");
    assert_eq!(
        shares,
        vec![("a".to_string(), 10.0, 0), ("b".to_string(), 5.0, 0)],
        "each claim advances its submitter's pass by 1 / weight"
    );
}

async fn submit_as(app: &TestApp, key: &str) -> reqwest::Response {
    let form = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(b"source".to_vec()).file_name("app.zip"));
    app.client
        .post(app.url("/api/builds/submit"))
        .header("X-API-Key", key)
        .multipart(form)
        .send()
        .await
        .expect("submit")
}

/// The status a submit answers while only 64 KiB of a declared 50 MB multipart body were sent.
async fn answer_to_partial_submit(base: &str, key: &str) -> Option<u16> {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /api/builds/submit HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: {key}\r\n\
         Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 50000000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    let _ = stream.write_all(&vec![b'x'; 64 * 1024]).await;
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            }
            if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&answer[..end]).to_string();
                return head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), read)
        .await
        .unwrap_or(None)
}

/// Max queued, across two instances: past it, submit and retry answer 429 `submitter_queue_full` with
/// `Retry-After` before the body is read; the built-in admin key and other keys are not limited; a
/// build leaving the queue makes room again.
#[tokio::test]
async fn max_queued_refuses_submits_and_retries_with_429_across_instances() {
    let a = TestApp::spawn().await;
    let b = TestApp::spawn_on(&a).await;
    let created: Value = a
        .client
        .post(a.url("/api/v2/keys"))
        .header("X-API-Key", API_KEY)
        .json(&json!({ "name": "ci", "role": "submitter", "max_queued": 2 }))
        .send()
        .await
        .expect("create key")
        .json()
        .await
        .expect("key json");
    let key = created["key"].as_str().expect("secret").to_string();
    let first: Value = submit_as(&a, &key).await.json().await.expect("json");
    let r = submit_as(&b, &key).await;
    assert_eq!(r.status(), 200, "the second build fits");
    let r = submit_as(&b, &key).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "30");
    let body: Value = r.json().await.expect("json");
    // The spec's shape on every route, G0 included.
    assert_eq!(
        body,
        json!({ "error": "Submitter queue limit reached", "code": "submitter_queue_full" })
    );
    assert_eq!(
        answer_to_partial_submit(&a.base, &key).await,
        Some(429),
        "refused before the body"
    );
    assert_eq!(a.count("builds").await, 2, "nothing was added");
    // The admin key has no quota; a key with max_queued 0 (the default) is unlimited.
    a.submit("ios", b"admin").await;
    // A build leaving the queue (cancelled) makes room; its retry would be the third queued build.
    let id = first["id"].as_str().expect("id");
    let r = a
        .client
        .post(a.url(&format!("/api/builds/{id}/cancel")))
        .header("X-API-Key", &key)
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status(), 200);
    assert_eq!(submit_as(&b, &key).await.status(), 200, "room again");
    let r = b
        .client
        .post(b.url(&format!("/api/builds/{id}/retry")))
        .header("X-API-Key", &key)
        .send()
        .await
        .expect("retry");
    assert_eq!(r.status(), 429, "a retry counts against max queued too");
    assert_eq!(r.headers()["retry-after"], "30");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["code"], "submitter_queue_full", "the G0 retry names the code too");
    // The other submit route answers the same body.
    let form = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(b"source".to_vec()).file_name("app.zip"));
    let r = b
        .client
        .post(b.url("/api/builds"))
        .header("X-API-Key", &key)
        .multipart(form)
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "30");
    let body: Value = r.json().await.expect("json");
    assert_eq!(
        body,
        json!({ "error": "Submitter queue limit reached", "code": "submitter_queue_full" })
    );
}

/// The deployed Swift worker's capabilities document, exactly.
const DEPLOYED_CAPABILITIES: &str =
    r#"{"platforms":["ios"],"maxConcurrentBuilds":1,"maxMemoryGB":16,"maxCPUPercent":80,"xcode_version":"15.0"}"#;

async fn register_with(app: &TestApp, name: &str, capabilities: &str) -> String {
    let capabilities: Value = serde_json::from_str(capabilities).expect("capabilities");
    let body: Value = app
        .client
        .post(app.url("/api/workers/register"))
        .header("X-API-Key", API_KEY)
        .json(&json!({ "name": name, "capabilities": capabilities }))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("register json");
    body["id"].as_str().expect("id").to_string()
}

/// A submit with `requirements` before its source part (as clients send the text fields first).
async fn submit_requiring(app: &TestApp, requirements: &str) -> (u16, Value) {
    let form = Form::new()
        .text("platform", "ios")
        .text("requirements", requirements.to_string())
        .part("source", Part::bytes(b"source".to_vec()).file_name("app.zip"));
    let r = app
        .client
        .post(app.url("/api/builds/submit"))
        .header("X-API-Key", API_KEY)
        .multipart(form)
        .send()
        .await
        .expect("submit");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Requirements are matched against what workers declare, including the deployed worker's exact JSON
/// (`xcode_version`, `maxMemoryGB`); a submit no registered worker could run is 422 naming the unmet
/// requirement, before its source is stored; bad requirements are 400 naming the problem.
#[tokio::test]
async fn requirements_match_declared_capabilities_and_unrunnable_submits_are_refused() {
    let app = TestApp::spawn().await;
    let deployed = register_with(&app, "deployed", DEPLOYED_CAPABILITIES).await;
    let newer = register_with(
        &app,
        "newer",
        r#"{"platforms":["ios"],"xcode_versions":["15.4","16.2"],"macos_version":"15.1","arch":"arm64",
            "memory_gb":32,"labels":["fast-disk"]}"#,
    )
    .await;
    // Needs Xcode 16.2+: the deployed worker (15.0) never gets it, the newer one does.
    let (status, needs_16) = submit_requiring(&app, r#"{"xcode": ">=16.2", "labels": ["fast-disk"]}"#).await;
    assert_eq!(status, 200, "{needs_16}");
    assert_eq!(app.poll(&deployed).await["job"], Value::Null);
    assert_eq!(app.poll(&newer).await["job"]["id"], needs_16["id"]);
    // Xcode 15 with 16 GB: the deployed worker's exact document satisfies it.
    let (status, fits_deployed) = submit_requiring(&app, r#"{"xcode": ">=15,<15.1", "min_memory_gb": 16}"#).await;
    assert_eq!(status, 200, "{fits_deployed}");
    assert_eq!(app.poll(&deployed).await["job"]["id"], fits_deployed["id"]);

    // Nobody has Xcode 17: 422 naming it and what is registered; nothing stored, no row.
    let (rows, files) = (app.count("builds").await, app.stored_files().len());
    let (status, refused) = submit_requiring(&app, r#"{"xcode": ">=17", "arch": "arm64"}"#).await;
    assert_eq!(status, 422);
    assert_eq!(
        refused["error"],
        "No worker can run this build: needs xcode >=17 (registered: 15.0, 15.4, 16.2)"
    );
    let (status, refused) = submit_requiring(&app, r#"{"macos": ">=15", "min_memory_gb": 64}"#).await;
    assert_eq!(status, 422);
    assert_eq!(
        refused["error"],
        "No worker can run this build: needs min_memory_gb 64 (registered: 16, 32)"
    );
    // Each is satisfied by some worker, but none has both.
    let (status, refused) = submit_requiring(&app, r#"{"xcode": "15.0", "arch": "arm64"}"#).await;
    assert_eq!(status, 422);
    assert_eq!(
        refused["error"],
        "No worker can run this build: no registered worker has xcode =15.0 and arch arm64 together"
    );
    assert_eq!(app.count("builds").await, rows, "no row inserted");
    assert_eq!(app.stored_files().len(), files, "no source stored");

    // Malformed requirements: 400 naming the problem.
    for (requirements, names) in [
        (r#"{"gpu": "m3"}"#, "unknown field `gpu`"),
        (r#"{"xcode": ">>16"}"#, "xcode must be a version range"),
        (r#"{"xcode": ">=17,<16"}"#, "can never be satisfied"),
        ("[1, 2]", "Invalid requirements"),
    ] {
        let (status, refused) = submit_requiring(&app, requirements).await;
        assert_eq!(status, 400, "{requirements}");
        let message = refused["error"].as_str().unwrap_or_default();
        assert!(message.contains(names), "{requirements}: {message}");
    }
    assert_eq!(app.count("builds").await, rows);
}

/// With `CONTROLLER_ACCEPT_UNMATCHED` an unrunnable build is accepted and waits; a worker that registers
/// later with the capability takes it.
#[tokio::test]
async fn accept_unmatched_lets_a_build_wait_for_a_matching_worker() {
    let app = TestApp::spawn_with(|c| c.queue.accept_unmatched = true).await;
    let deployed = register_with(&app, "deployed", DEPLOYED_CAPABILITIES).await;
    let (status, waiting) = submit_requiring(&app, r#"{"xcode": ">=16"}"#).await;
    assert_eq!(status, 200, "{waiting}");
    assert_eq!(app.poll(&deployed).await["job"], Value::Null);
    let later = register_with(&app, "later", r#"{"platforms":["ios"],"xcode_version":"16.0"}"#).await;
    assert_eq!(app.poll(&later).await["job"]["id"], waiting["id"]);
}

async fn v2(app: &TestApp, method: reqwest::Method, path: &str) -> Value {
    let r = app
        .client
        .request(method, app.url(path))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .expect("v2");
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json().await.expect("v2 json")
}

async fn submit_fields(app: &TestApp, key: &str, fields: &[(&str, &str)]) -> String {
    let mut form = Form::new();
    for (name, value) in fields {
        form = form.text(name.to_string(), value.to_string());
    }
    let form = form.part("source", Part::bytes(b"source".to_vec()).file_name("app.zip"));
    let r = app
        .client
        .post(app.url("/api/builds/submit"))
        .header("X-API-Key", key)
        .multipart(form)
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    body["id"].as_str().expect("id").to_string()
}

async fn reason_of(app: &TestApp, id: &str) -> (Value, Value) {
    let shown = v2(app, reqwest::Method::GET, &format!("/api/v2/builds/{id}")).await;
    (shown["waiting_reason"].clone(), shown["position"].clone())
}

/// Every waiting reason, in `/api/v2` build views (show and list), counted per queue in `/api/v2/queues`
/// and exported as `expo_builds_waiting{queue,reason}`; builds that are not queued have none.
#[tokio::test]
async fn each_waiting_reason_is_shown_and_counted() {
    let app = TestApp::spawn_with(|c| c.queue.accept_unmatched = true).await;
    let busy = register_with(&app, "busy", DEPLOYED_CAPABILITIES).await;
    let offline = register_with(&app, "offline", r#"{"platforms":["ios"],"xcode_version":"16.0"}"#).await;
    sqlx::query("UPDATE workers SET status = 'offline' WHERE id = $1")
        .bind(&offline)
        .execute(&app.pool)
        .await
        .expect("offline");
    let android = register_with(&app, "android", r#"{"platforms":["android"]}"#).await;
    let created: Value = app
        .client
        .post(app.url("/api/v2/keys"))
        .header("X-API-Key", API_KEY)
        .json(&json!({ "name": "capped", "role": "submitter", "max_running": 1 }))
        .send()
        .await
        .expect("key")
        .json()
        .await
        .expect("key json");
    let capped = created["key"].as_str().expect("secret").to_string();

    // android: the capped submitter runs one build; its second waits for it.
    let running = submit_fields(&app, &capped, &[("platform", "android")]).await;
    let limited = submit_fields(&app, &capped, &[("platform", "android")]).await;
    assert_eq!(app.poll(&android).await["job"]["id"], running.as_str());
    // ios: the only online worker is busy; one build is next, the one behind it waits for the busy worker.
    let held = submit_fields(&app, API_KEY, &[("platform", "ios")]).await;
    assert_eq!(app.poll(&busy).await["job"]["id"], held.as_str());
    let next = submit_fields(&app, API_KEY, &[("platform", "ios")]).await;
    let behind = submit_fields(&app, API_KEY, &[("platform", "ios")]).await;
    let later = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let scheduled = submit_fields(&app, API_KEY, &[("platform", "ios"), ("run_at", &later)]).await;
    let backoff = submit_fields(&app, API_KEY, &[("platform", "ios")]).await;
    sqlx::query("UPDATE builds SET state = 'retryable', run_at = now() + interval '1 hour' WHERE id = $1")
        .bind(&backoff)
        .execute(&app.pool)
        .await
        .expect("retryable");
    let unregistered = submit_fields(
        &app,
        API_KEY,
        &[("platform", "ios"), ("requirements", r#"{"xcode": ">=17"}"#)],
    )
    .await;
    let not_online = submit_fields(
        &app,
        API_KEY,
        &[("platform", "ios"), ("requirements", r#"{"xcode": ">=16"}"#)],
    )
    .await;

    assert_eq!(
        reason_of(&app, &held).await,
        (Value::Null, Value::Null),
        "running: no reason"
    );
    assert_eq!(reason_of(&app, &limited).await.0, "submitter_limit");
    assert_eq!(reason_of(&app, &next).await, (json!("next"), json!(0)));
    assert_eq!(
        reason_of(&app, &behind).await,
        (json!("matching_workers_busy"), json!(1))
    );
    assert_eq!(reason_of(&app, &scheduled).await, (json!("scheduled"), Value::Null));
    assert_eq!(reason_of(&app, &backoff).await.0, "retry_backoff");
    assert_eq!(reason_of(&app, &unregistered).await.0, "no_matching_worker_registered");
    assert_eq!(reason_of(&app, &not_online).await.0, "no_matching_worker_online");
    // The list shows the same, with a sentence for people.
    let page = v2(&app, reqwest::Method::GET, "/api/v2/builds?limit=50").await;
    let listed = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|b| b["id"] == behind.as_str())
        .expect("listed")
        .clone();
    assert_eq!(listed["waiting_reason"], "matching_workers_busy");
    assert_eq!(listed["waiting_sentence"], "Matching workers are online and all busy");

    let queues = v2(&app, reqwest::Method::GET, "/api/v2/queues").await;
    let waiting = |name: &str| {
        queues["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|q| q["name"] == name)
            .expect("queue")["waiting"]
            .clone()
    };
    assert_eq!(
        waiting("ios"),
        json!({ "scheduled": 1, "retry_backoff": 1, "queue_paused": 0, "submitter_limit": 0,
                "no_matching_worker_registered": 1, "no_matching_worker_online": 1,
                "matching_workers_busy": 1, "next": 1 })
    );
    assert_eq!(waiting("android")["submitter_limit"], 1);
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains(r#"expo_builds_waiting{queue="ios",reason="no_matching_worker_online"}"#),
        "{metrics}"
    );

    // The dashboard shows the reason on the build page and the counts on the overview.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let cookie = crate::dashboard::sign_in(&app, &browser).await;
    let page = |path: String| {
        let (app, browser, cookie) = (&app, &browser, cookie.clone());
        async move {
            let r = browser
                .get(app.url(&path))
                .header("cookie", cookie)
                .send()
                .await
                .expect("page");
            assert_eq!(r.status(), 200, "{path}");
            r.text().await.expect("html")
        }
    };
    let html = page(format!("/dashboard/builds/{behind}")).await;
    assert!(html.contains("matching_workers_busy"), "build page shows the reason");
    assert!(html.contains("#2 in line"), "and its position");
    let html = page("/dashboard/builds?state=pending".to_string()).await;
    let row = html
        .split("<tr data-build=")
        .find(|r| r.contains(behind.as_str()))
        .expect("the builds list shows the build");
    assert!(
        row.contains("matching_workers_busy"),
        "builds list shows the reason: {row}"
    );
    assert!(row.contains("#2"), "and the position: {row}");
    let html = page("/dashboard".to_string()).await;
    assert!(html.contains("no_matching_worker_online"), "overview counts reasons");

    // A paused queue comes first.
    v2(&app, reqwest::Method::POST, "/api/v2/queues/ios/pause").await;
    assert_eq!(reason_of(&app, &next).await.0, "queue_paused");
}

/// The positions of a page (computed for those builds only, not by ranking the queue) are the order in
/// which one worker whose builds end at once then claims them: priority first, then fair share across
/// submitters of weights 1, 2 and 1 and the built-in admin key, ties by submitter.
#[tokio::test]
async fn positions_of_a_page_are_the_claim_order() {
    positions_are_the_claim_order(Variant::Priority).await;
}

/// The same with every queued build due and of one priority: the positions come from the fair-share
/// counts, without reading the queue.
#[tokio::test]
async fn positions_of_a_uniform_queue_are_the_claim_order() {
    positions_are_the_claim_order(Variant::Uniform).await;
}

/// The same with one build scheduled for later among them: not yet due, it is ahead of nobody, so the
/// fair-share counts (which include it) must not be used as they are.
#[tokio::test]
async fn positions_ignore_a_build_scheduled_for_later() {
    positions_are_the_claim_order(Variant::Later).await;
}

#[derive(PartialEq)]
enum Variant {
    Priority,
    Uniform,
    Later,
}

async fn positions_are_the_claim_order(variant: Variant) {
    let (_, pool) = fresh_database(5).await;
    submitter(&pool, "a", 1, 0).await;
    submitter(&pool, "b", 2, 0).await;
    submitter(&pool, "c", 1, 0).await;
    let w = worker(&pool, "solo", &[Platform::Ios]).await;
    enqueue_for(&pool, Some("a"), 5).await;
    // The worker is busy with a's first build: a's pass has moved on.
    let (mut held, _, mut token) = claim(&pool, &w).await.expect("a build");
    enqueue_for(&pool, Some("b"), 5).await;
    enqueue_for(&pool, Some("c"), 2).await;
    enqueue_for(&pool, None, 2).await;
    let urgent = enqueue_for(&pool, Some("c"), 1).await.remove(0);
    if variant == Variant::Priority {
        sqlx::query("UPDATE builds SET priority = 5 WHERE id = $1")
            .bind(&urgent)
            .execute(&pool)
            .await
            .expect("priority");
    }
    if variant == Variant::Later {
        let later = enqueue_for(&pool, Some("b"), 1).await.remove(0);
        sqlx::query("UPDATE builds SET state = 'scheduled', run_at = now() + interval '1 hour' WHERE id = $1")
            .bind(&later)
            .execute(&pool)
            .await
            .expect("scheduled");
    }
    let queued: Vec<String> = sqlx::query_scalar("SELECT id FROM builds WHERE state = 'pending' ORDER BY id")
        .fetch_all(&pool)
        .await
        .expect("queued");
    assert_eq!(queued.len(), 14);
    let waiting = queue::waiting_of(&pool, &queued, Utc::now()).await.expect("waiting");
    let mut by_position: Vec<(i64, String)> = waiting
        .iter()
        .map(|w| (w.position.expect("ranked builds have a position"), w.id.clone()))
        .collect();
    by_position.sort();
    let positions: Vec<i64> = by_position.iter().map(|(p, _)| *p).collect();
    assert_eq!(positions, (0..14).collect::<Vec<i64>>(), "one position each");
    if variant == Variant::Priority {
        assert_eq!(by_position[0].1, urgent, "priority first");
    }
    // The only worker is busy: the first in line is next, the others wait for it.
    for w in &waiting {
        let expected = if w.position == Some(0) {
            "next"
        } else {
            "matching_workers_busy"
        };
        assert_eq!(w.reason, expected, "{w:?}");
    }
    // A page of a few builds gets the same positions as the whole queue.
    let page: Vec<String> = queued.iter().step_by(5).cloned().collect();
    for w in queue::waiting_of(&pool, &page, Utc::now()).await.expect("page") {
        let whole = waiting.iter().find(|x| x.id == w.id).expect("same build");
        assert_eq!(w.position, whole.position, "{}", w.id);
    }
    for (position, expected) in by_position {
        complete(&pool, &w, &held, token).await;
        let (id, who, next_token) = claim(&pool, &w).await.expect("a build");
        assert_eq!(id, expected, "claim #{position} (submitter {who})");
        (held, token) = (id, next_token);
    }
}

/// The v2 mutations that leave a build queued (retry, patch) answer its waiting reason and position as
/// show does.
#[tokio::test]
async fn v2_mutations_answer_the_waiting_reason() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("mac", &["ios"]).await;
    let first = app.submit("ios", b"first").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(
        app.poll(&worker_id).await["job"]["id"],
        first.as_str(),
        "the only worker is busy"
    );
    let id = app.submit("ios", b"second").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let cancelled = v2(&app, reqwest::Method::POST, &format!("/api/v2/builds/{id}/cancel")).await;
    assert_eq!(cancelled["state"], "cancelled");
    let retried = v2(&app, reqwest::Method::POST, &format!("/api/v2/builds/{id}/retry")).await;
    assert_eq!(retried["state"], "pending");
    assert_eq!(
        (retried["waiting_reason"].clone(), retried["position"].clone()),
        (json!("next"), json!(0)),
        "{retried}"
    );
    let patched: Value = app
        .client
        .patch(app.url(&format!("/api/v2/builds/{id}")))
        .header("X-API-Key", API_KEY)
        .json(&json!({ "priority": 3 }))
        .send()
        .await
        .expect("patch")
        .json()
        .await
        .expect("json");
    assert_eq!(patched["priority"], 3);
    assert_eq!(patched["waiting_reason"], "next", "{patched}");
    assert_eq!(
        patched["waiting_sentence"],
        "The next poll of a matching worker takes it"
    );
}
