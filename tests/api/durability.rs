//! Nothing lost or leaked when the database or the store fails at the worst moment (#19). Each window
//! is made to happen deterministically: a lock the test holds keeps the insert or the completion
//! waiting, then the commit's answer is lost (its backend terminated while it waits for a synchronous
//! standby that does not exist), the instance is killed, or the store goes down before the cleanup.
//! Afterwards no committed row names a missing object, and once `sweep_unlinked` has run no object is
//! left that no row names.

use std::time::{Duration, Instant};

use expo_controller::ids;
use expo_controller::server;
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres, Transaction};

use crate::resilience::OwnPostgres;
use crate::s3::{Controller, S3Server};
use crate::support::{API_KEY, config, fresh_database, success_form};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// Waits (at most 15 s) for a backend of this database waiting on `wait` (a wait event such as
/// `SyncRep`, or a wait event type such as `Lock`) whose statement contains `marker`; returns its pid.
async fn waiting_backend(pool: &PgPool, wait: &str, marker: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND $1 IN (wait_event, wait_event_type) AND strpos(query, $2) > 0
             LIMIT 1",
        )
        .bind(wait)
        .bind(marker)
        .fetch_optional(pool)
        .await
        .expect("pg_stat_activity");
        if let Some(pid) = pid {
            return pid;
        }
        if Instant::now() > deadline {
            let seen: Vec<String> = sqlx::query_scalar(
                "SELECT concat_ws(' ', state, wait_event_type, wait_event, left(query, 60)) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .fetch_all(pool)
            .await
            .expect("pg_stat_activity");
            panic!("no backend waiting on {wait} for `{marker}`; backends: {seen:#?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits (at most 15 s) until backend `pid` waits on `wait`.
async fn wait_for(pool: &PgPool, pid: i32, wait: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND $2 IN (wait_event, wait_event_type))",
        )
        .bind(pid)
        .bind(wait)
        .fetch_one(pool)
        .await
        .expect("pg_stat_activity");
        if waiting {
            return;
        }
        assert!(Instant::now() < deadline, "backend {pid} never waited on {wait}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn terminate(pool: &PgPool, pid: i32) {
    let done: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(pool)
        .await
        .expect("terminate");
    assert!(done, "backend {pid} terminated");
}

/// Commits wait for a synchronous standby that does not exist (`on`), or no longer (`off`).
async fn synchronous_standby(pool: &PgPool, on: bool) {
    let set = if on {
        "ALTER SYSTEM SET synchronous_standby_names = 'nonexistent_standby'"
    } else {
        "ALTER SYSTEM RESET synchronous_standby_names"
    };
    sqlx::query(set).execute(pool).await.expect("alter system");
    sqlx::query("SELECT pg_reload_conf()")
        .execute(pool)
        .await
        .expect("reload");
    // The checkpointer publishes the setting to every backend's commit shortly after the reload: a
    // probe commit on a fresh connection shows when it has (waiting on `SyncRep`, or not waiting).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if probe_commit_waits(pool).await == on {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "commits never {} for the standby",
            if on { "waited" } else { "stopped waiting" }
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Whether a commit now waits for the synchronous standby: a probe transaction that writes commits on
/// its own connection; if it has not answered within 200 ms and its backend waits on `SyncRep`, it
/// does (the probe's backend is then terminated; its empty commit is harmless).
async fn probe_commit_waits(pool: &PgPool) -> bool {
    let mut probe = pool.acquire().await.expect("probe connection").detach();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut probe)
        .await
        .expect("probe pid");
    // A commit waits only if its transaction wrote WAL: a temporary table's catalog rows do.
    let commit = sqlx::query("CREATE TEMP TABLE sync_probe ()").execute(&mut probe);
    if tokio::time::timeout(Duration::from_millis(200), commit).await.is_ok() {
        return false;
    }
    let waits: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'SyncRep')")
            .bind(pid)
            .fetch_one(pool)
            .await
            .expect("pg_stat_activity");
    terminate(pool, pid).await;
    drop(probe);
    waits
}

/// Holds `lock` until the returned transaction ends.
async fn hold(pool: &PgPool, lock: &str, id: Option<&str>) -> Transaction<'static, Postgres> {
    let mut tx = pool.begin().await.expect("begin");
    let mut query = sqlx::query(sqlx::AssertSqlSafe(lock.to_string()));
    if let Some(id) = id {
        query = query.bind(id.to_string());
    }
    query.execute(&mut *tx).await.expect("lock");
    tx
}

/// Markers of the completion's and the insert's statements, within the first 1 KiB that
/// `pg_stat_activity` shows.
const COMPLETING: &str = "UPDATE builds SET state = 'completed'";
const INSERTING: &str = "INSERT INTO builds (id, state, queue";

const LOCK_INSERTS: &str = "LOCK TABLE builds IN SHARE ROW EXCLUSIVE MODE";
const LOCK_ROW: &str = "SELECT 1 FROM builds WHERE id = $1 FOR UPDATE";

async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.expect("json")
}

fn source_form(source: &[u8]) -> Form {
    Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(source.to_vec()).file_name("app.zip"))
}

/// D2 and the minor item, on local storage: a completion, a submit and a retry whose commits' answers are lost
/// (the backend waiting for the synchronous standby is terminated) are answered from the rows that
/// exist, and the objects those rows name stay; the same attempt re-sending the same file gets 200.
#[tokio::test]
async fn a_commit_whose_answer_is_lost_never_deletes_what_its_row_names() {
    let postgres = OwnPostgres::start_in("durable");
    let storage_dir = postgres.dir.with_extension("storage");
    let mut cfg = config(&postgres.url(), storage_dir.clone());
    cfg.db.db_statement_timeout_ms = 60_000;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let running = server::start(cfg, Some(listener), true).await.expect("start");
    let base = format!("http://{}", running.addr);
    let url = |path: &str| format!("{base}{path}");
    let http = client();
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .connect(&postgres.url())
        .await
        .expect("connect");

    let worker: Value = json_of(
        http.post(url("/api/workers/register"))
            .header("X-API-Key", API_KEY)
            .json(&serde_json::json!({ "name": "mac", "capabilities": { "platforms": ["ios"] } }))
            .send()
            .await
            .expect("register"),
    )
    .await;
    let worker_id = worker["id"].as_str().expect("worker id").to_string();
    let submitted = json_of(
        http.post(url("/api/builds/submit"))
            .header("X-API-Key", API_KEY)
            .multipart(source_form(b"first source"))
            .send()
            .await
            .expect("submit"),
    )
    .await;
    let id = submitted["id"].as_str().expect("id").to_string();
    let polled = json_of(
        http.get(url("/api/workers/poll"))
            .query(&[("worker_id", worker_id.as_str())])
            .header("X-API-Key", API_KEY)
            .send()
            .await
            .expect("poll"),
    )
    .await;
    assert_eq!(polled["job"]["id"], id.as_str());

    // The completion commits, but its answer is lost.
    let result = b"the built app".to_vec();
    let locked = hold(&pool, LOCK_ROW, Some(&id)).await;
    let upload = tokio::spawn(
        http.post(url("/api/workers/upload"))
            .header("X-API-Key", API_KEY)
            .multipart(success_form(&id, &worker_id, &result))
            .send(),
    );
    waiting_backend(&pool, "Lock", COMPLETING).await;
    synchronous_standby(&pool, true).await;
    locked.rollback().await.expect("release");
    let pid = waiting_backend(&pool, "SyncRep", COMPLETING).await;
    terminate(&pool, pid).await;
    synchronous_standby(&pool, false).await;
    let answer = upload.await.expect("join").expect("upload");
    assert_eq!(answer.status(), 200, "the committed completion is a success");
    let download = http
        .get(url(&format!("/api/builds/{id}/download")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .expect("download");
    assert_eq!(download.status(), 200, "the completed build's result is there");
    assert_eq!(download.bytes().await.expect("bytes").as_ref(), result.as_slice());

    // The worker's retry of the same upload: the same bytes are a success, other bytes are not.
    let again = http
        .post(url("/api/workers/upload"))
        .header("X-API-Key", API_KEY)
        .multipart(success_form(&id, &worker_id, &result))
        .send()
        .await
        .expect("upload again");
    assert_eq!(again.status(), 200, "the same attempt re-sending the same file");
    let other = http
        .post(url("/api/workers/upload"))
        .header("X-API-Key", API_KEY)
        .multipart(success_form(&id, &worker_id, b"different bytes"))
        .send()
        .await
        .expect("upload other");
    assert_eq!(other.status(), 409, "a different file is still refused");

    // A submit whose insert commits with its answer lost: the client gets the build that exists.
    let locked = hold(&pool, LOCK_INSERTS, None).await;
    let submit = tokio::spawn(
        http.post(url("/api/builds/submit"))
            .header("X-API-Key", API_KEY)
            .multipart(source_form(b"second source"))
            .send(),
    );
    waiting_backend(&pool, "Lock", INSERTING).await;
    synchronous_standby(&pool, true).await;
    locked.rollback().await.expect("release");
    let pid = waiting_backend(&pool, "SyncRep", INSERTING).await;
    terminate(&pool, pid).await;
    synchronous_standby(&pool, false).await;
    let answer = submit.await.expect("join").expect("submit");
    assert_eq!(answer.status(), 200, "the committed submit is answered with its build");
    let second = json_of(answer).await;
    let second_id = second["id"].as_str().expect("id").to_string();
    let status = http
        .get(url(&format!("/api/builds/{second_id}/status")))
        .header("X-Build-Token", second["access_token"].as_str().expect("token"))
        .send()
        .await
        .expect("status");
    assert_eq!(status.status(), 200, "the answer's token is the row's");

    // A retry whose transaction commits with its answer lost: answered with the new build, whose
    // copied source stays.
    let locked = hold(&pool, LOCK_INSERTS, None).await;
    let retry = tokio::spawn(
        http.post(url(&format!("/api/builds/{id}/retry")))
            .header("X-API-Key", API_KEY)
            .send(),
    );
    let pid = waiting_backend(&pool, "Lock", INSERTING).await;
    synchronous_standby(&pool, true).await;
    locked.rollback().await.expect("release");
    wait_for(&pool, pid, "SyncRep").await;
    terminate(&pool, pid).await;
    synchronous_standby(&pool, false).await;
    let answer = retry.await.expect("join").expect("retry");
    assert_eq!(answer.status(), 200, "the committed retry is answered with its build");
    let retried = json_of(answer).await;
    assert_eq!(retried["original_build_id"], id.as_str());

    // Every key a row names is stored; nothing else is, and nothing is left pending.
    let named: Vec<String> = sqlx::query_scalar(
        "SELECT k FROM builds, unnest(ARRAY[source_key, certs_key, result_key]) AS k WHERE k IS NOT NULL ORDER BY k",
    )
    .fetch_all(&pool)
    .await
    .expect("keys");
    assert_eq!(named.len(), 4, "three sources and one result: {named:?}");
    let mut stored = files_under(&storage_dir);
    stored.sort();
    assert_eq!(stored, named, "the store holds exactly what the rows name");
    // Nothing is left pending but spare keys (recorded ahead for later requests: no object, no row).
    let pending: Vec<String> = sqlx::query_scalar("SELECT key FROM pending_writes")
        .fetch_all(&pool)
        .await
        .expect("pending");
    let unsettled: Vec<&String> = pending
        .iter()
        .filter(|k| stored.contains(k) || named.contains(k))
        .collect();
    assert_eq!(unsettled, Vec::<&String>::new(), "pending: {pending:?}");

    running.stop().await;
    pool.close().await;
    let _ = std::fs::remove_dir_all(&storage_dir);
}

/// Relative paths of the files under `root` (a local store).
fn files_under(root: &std::path::Path) -> Vec<String> {
    fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if let Ok(relative) = path.strip_prefix(root) {
                out.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

/// D1 on S3: an instance killed while its insert waits (the source is stored, no row), an instance
/// killed while its completion waits (the result is moved under the build, no row names it), and a
/// refused completion whose cleanup fails because the store is down. Every such object stays named in
/// `pending_writes`, and `sweep_unlinked` deletes them all — and nothing a row names — counting them.
#[tokio::test]
async fn objects_no_row_names_are_swept_after_kills_and_failed_cleanups() {
    let mut s3 = S3Server::start().await;
    let (db, pool) = fresh_database(3).await;
    let certs_key = ids::new_key32();
    let http = client();
    let first = Controller::start(&db, &s3, &certs_key, &[]).await;
    let live: Value = json_of(
        http.post(first.url("/api/builds/submit"))
            .header("X-API-Key", API_KEY)
            .multipart(source_form(b"live source"))
            .send()
            .await
            .expect("submit"),
    )
    .await;
    let live = live["id"].as_str().expect("id").to_string();
    let worker: Value = json_of(
        http.post(first.url("/api/workers/register"))
            .header("X-API-Key", API_KEY)
            .json(&serde_json::json!({ "name": "mac", "capabilities": { "platforms": ["ios"] } }))
            .send()
            .await
            .expect("register"),
    )
    .await;
    let worker_id = worker["id"].as_str().expect("id").to_string();

    // (a) Killed between storing a source and inserting its row.
    let locked = hold(&pool, LOCK_INSERTS, None).await;
    let submit = tokio::spawn(
        http.post(first.url("/api/builds/submit"))
            .header("X-API-Key", API_KEY)
            .multipart(source_form(b"orphan source"))
            .send(),
    );
    let pid = waiting_backend(&pool, "Lock", INSERTING).await;
    drop(first);
    terminate(&pool, pid).await;
    locked.rollback().await.expect("release");
    assert!(
        submit.await.expect("join").is_err(),
        "the killed instance never answered"
    );

    // (b) Killed between moving a result under its build and completing.
    let second = Controller::start(&db, &s3, &certs_key, &[]).await;
    let polled = json_of(
        http.get(second.url("/api/workers/poll"))
            .query(&[("worker_id", worker_id.as_str())])
            .header("X-API-Key", API_KEY)
            .send()
            .await
            .expect("poll"),
    )
    .await;
    assert_eq!(polled["job"]["id"], live.as_str());
    let locked = hold(&pool, LOCK_ROW, Some(&live)).await;
    let upload = tokio::spawn(
        http.post(second.url("/api/workers/upload"))
            .header("X-API-Key", API_KEY)
            .multipart(success_form(&live, &worker_id, b"killed result"))
            .send(),
    );
    let pid = waiting_backend(&pool, "Lock", COMPLETING).await;
    drop(second);
    terminate(&pool, pid).await;
    locked.rollback().await.expect("release");
    assert!(
        upload.await.expect("join").is_err(),
        "the killed instance never answered"
    );

    // (c) A refused completion (the attempt moved on while it waited) whose cleanup meets a store
    // outage: its delete fails, and nothing in the request can retry it.
    let third = Controller::start(&db, &s3, &certs_key, &[]).await;
    let mut locked = hold(&pool, LOCK_ROW, Some(&live)).await;
    let upload = tokio::spawn(
        http.post(third.url("/api/workers/upload"))
            .header("X-API-Key", API_KEY)
            .multipart(success_form(&live, &worker_id, b"refused result"))
            .send(),
    );
    waiting_backend(&pool, "Lock", COMPLETING).await;
    s3.kill();
    sqlx::query("UPDATE builds SET lease_owner = 'another-worker' WHERE id = $1")
        .bind(&live)
        .execute(&mut *locked)
        .await
        .expect("reassign");
    locked.commit().await.expect("commit");
    let refused = upload.await.expect("join").expect("upload");
    assert_eq!(refused.status(), 409, "the stale completion is refused");
    s3.restart().await;
    drop(third);

    // Three objects no row names; the live source is named.
    let mut objects = s3.objects();
    objects.sort();
    let live_source = format!("builds/{live}/source.zip");
    assert_eq!(objects.len(), 4, "{objects:?}");
    assert!(objects.contains(&live_source));
    let named: Vec<String> = sqlx::query_scalar(
        "SELECT k FROM builds, unnest(ARRAY[source_key, certs_key, result_key]) AS k WHERE k IS NOT NULL",
    )
    .fetch_all(&pool)
    .await
    .expect("named");
    assert_eq!(named, vec![live_source.clone()]);

    // Past the staging cut-off, the sweep deletes them and counts them; the named object stays.
    sqlx::query("UPDATE pending_writes SET queued_at = now() - interval '7 hours'")
        .execute(&pool)
        .await
        .expect("age");
    let sweeper = Controller::start(
        &db,
        &s3,
        &certs_key,
        &[("CONTROLLER_JOB_SCHEDULES", "sweep_unlinked=* * * * * *")],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_writes")
            .fetch_one(&pool)
            .await
            .expect("pending");
        if pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sweep_unlinked did not settle the pending keys"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s3.objects(), vec![live_source], "only what a row names is left");
    let metrics = http
        .get(sweeper.url("/metrics"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.lines().any(|l| l == "expo_unlinked_objects_deleted_total 3"),
        "the sweep's count is a metric:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("unlinked"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A TCP proxy to the S3 test server that resets every connection on which a delete request
/// arrives (the store refusing deletes, as in an outage) and passes everything else through.
async fn delete_resetting_proxy(upstream: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let answers = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    client_write
                });
                // Requests one by one: the head, then `Content-Length` bytes of body.
                let mut buffer = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                'requests: loop {
                    let head_end = loop {
                        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                        match client_read.read(&mut chunk).await {
                            Ok(0) | Err(_) => break 'requests,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
                    let line = head.lines().next().unwrap_or_default();
                    // `DELETE` of one object, or the bulk `POST ?delete` (DeleteObjects).
                    if line.starts_with("DELETE ") || (line.starts_with("POST ") && line.contains("?delete ")) {
                        answers.abort();
                        // A reset (RST), not an orderly close: the store's answer never comes.
                        if let Ok(client_write) = answers.await
                            && let Ok(stream) = client_read.reunite(client_write)
                        {
                            let _ = stream.set_zero_linger();
                        }
                        return;
                    }
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            let (name, value) = l.split_once(':')?;
                            name.eq_ignore_ascii_case("content-length")
                                .then(|| value.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buffer.len() < head_end + length {
                        match client_read.read(&mut chunk).await {
                            Ok(0) | Err(_) => break 'requests,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                    }
                    if server_write.write_all(&buffer[..head_end + length]).await.is_err() {
                        break;
                    }
                    buffer.drain(..head_end + length);
                }
                answers.abort();
            });
        }
    });
    format!("http://{addr}")
}

/// D1 (b) and (c) on S3 with the store refusing deletes: a result sent before its build id (so staged,
/// then moved) is copied under its build but the staging delete that ends the move is reset, so the upload fails after the copy (503), and the
/// cleanup's own delete of that copy is reset too. The copy stays named in `pending_writes`, the worker's
/// retry through a healthy path completes, and `sweep_unlinked` deletes the copy no row names.
#[tokio::test]
async fn a_result_whose_deletes_are_reset_is_swept_and_the_retry_completes() {
    let s3 = S3Server::start().await;
    let (db, pool) = fresh_database(3).await;
    let certs_key = ids::new_key32();
    let http = client();
    let proxy = delete_resetting_proxy(s3.endpoint().trim_start_matches("http://").to_string()).await;
    let refusing = Controller::start(&db, &s3, &certs_key, &[("AWS_ENDPOINT", proxy.as_str())]).await;
    let built: Value = json_of(
        http.post(refusing.url("/api/builds/submit"))
            .header("X-API-Key", API_KEY)
            .multipart(source_form(b"a source"))
            .send()
            .await
            .expect("submit"),
    )
    .await;
    let id = built["id"].as_str().expect("id").to_string();
    let worker: Value = json_of(
        http.post(refusing.url("/api/workers/register"))
            .header("X-API-Key", API_KEY)
            .json(&serde_json::json!({ "name": "mac", "capabilities": { "platforms": ["ios"] } }))
            .send()
            .await
            .expect("register"),
    )
    .await;
    let worker_id = worker["id"].as_str().expect("id").to_string();
    let polled = json_of(
        http.get(refusing.url("/api/workers/poll"))
            .query(&[("worker_id", worker_id.as_str())])
            .header("X-API-Key", API_KEY)
            .send()
            .await
            .expect("poll"),
    )
    .await;
    assert_eq!(polled["job"]["id"], id.as_str());
    let failed = http
        .post(refusing.url("/api/workers/upload"))
        .header("X-API-Key", API_KEY)
        .multipart(
            Form::new()
                .part("result", Part::bytes(b"the result".to_vec()).file_name("app.bin"))
                .text("build_id", id.clone())
                .text("worker_id", worker_id.clone())
                .text("success", "true"),
        )
        .send()
        .await
        .expect("upload");
    assert_eq!(failed.status(), 503, "the move could not finish");
    let copies: Vec<String> = s3
        .objects()
        .into_iter()
        .filter(|k| k.starts_with(&format!("builds/{id}/result-")))
        .collect();
    assert_eq!(copies.len(), 1, "the copy under the build is left: {:?}", s3.objects());
    drop(refusing);

    // The worker retries on a healthy instance: completed, with its own result.
    let healthy = Controller::start(&db, &s3, &certs_key, &[]).await;
    let retried = http
        .post(healthy.url("/api/workers/upload"))
        .header("X-API-Key", API_KEY)
        .multipart(success_form(&id, &worker_id, b"the result"))
        .send()
        .await
        .expect("upload again");
    assert_eq!(retried.status(), 200);
    let result_key: String = sqlx::query_scalar("SELECT result_key FROM builds WHERE id = $1")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .expect("result key");
    assert_ne!(copies[0], result_key);
    drop(healthy);

    sqlx::query("UPDATE pending_writes SET queued_at = now() - interval '7 hours'")
        .execute(&pool)
        .await
        .expect("age");
    let _sweeper = Controller::start(
        &db,
        &s3,
        &certs_key,
        &[("CONTROLLER_JOB_SCHEDULES", "sweep_unlinked=* * * * * *")],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while s3.objects().contains(&copies[0]) {
        assert!(
            Instant::now() < deadline,
            "sweep_unlinked did not delete the unlinked copy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut under_builds: Vec<String> = s3.objects().into_iter().filter(|k| k.starts_with("builds/")).collect();
    under_builds.sort();
    let mut named = vec![format!("builds/{id}/source.zip"), result_key];
    named.sort();
    assert_eq!(under_builds, named, "under builds/, only what the row names is left");
}

/// R63: the sweep's delete is claimed, not checked-then-done. A submit whose source stream ended but
/// whose insert waits (a lock the test holds) while its pending key passes the cut-off: the sweep dooms
/// the key and deletes the source; the insert, released, cannot claim the key and refuses (503 with
/// `Retry-After`) — no row ever names the deleted object, and nothing is left.
#[tokio::test]
async fn a_source_the_sweep_doomed_makes_the_late_insert_refuse() {
    let s3 = S3Server::start().await;
    let (db, pool) = fresh_database(3).await;
    let certs_key = ids::new_key32();
    let http = client();
    let controller = Controller::start(
        &db,
        &s3,
        &certs_key,
        &[("CONTROLLER_JOB_SCHEDULES", "sweep_unlinked=* * * * * *")],
    )
    .await;
    let locked = hold(&pool, LOCK_INSERTS, None).await;
    let submit = tokio::spawn(
        http.post(controller.url("/api/builds/submit"))
            .header("X-API-Key", API_KEY)
            .multipart(source_form(b"slow source"))
            .send(),
    );
    waiting_backend(&pool, "Lock", INSERTING).await;
    let pending: Vec<String> = sqlx::query_scalar("SELECT key FROM pending_writes")
        .fetch_all(&pool)
        .await
        .expect("pending");
    assert_eq!(pending.len(), 1, "the source is pending: {pending:?}");
    assert_eq!(s3.objects().len(), 1, "the source is stored");

    // Past the cut-off while the insert waits: the sweep dooms the key and deletes the source.
    sqlx::query("UPDATE pending_writes SET queued_at = now() - interval '7 hours'")
        .execute(&pool)
        .await
        .expect("age");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_writes")
            .fetch_one(&pool)
            .await
            .expect("pending");
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "sweep_unlinked never settled the key");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(s3.objects().is_empty(), "the sweep deleted the source");

    locked.rollback().await.expect("release");
    let answer = submit.await.expect("join").expect("submit");
    assert_eq!(answer.status(), 503, "the late insert refuses");
    assert!(answer.headers().contains_key("retry-after"), "with Retry-After");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM builds")
        .fetch_one(&pool)
        .await
        .expect("builds");
    assert_eq!(rows, 0, "no row names the deleted source");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_writes")
        .fetch_one(&pool)
        .await
        .expect("pending");
    assert_eq!(left, 0);
    assert!(s3.objects().is_empty());

    // Sent again, the same submit succeeds.
    let again = http
        .post(controller.url("/api/builds/submit"))
        .header("X-API-Key", API_KEY)
        .multipart(source_form(b"slow source"))
        .send()
        .await
        .expect("submit again");
    assert_eq!(again.status(), 200);
}
