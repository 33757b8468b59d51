//! `expo-controller import-ts` (issue #11, import.md): a TypeScript controller's SQLite database and storage
//! folder, generated here with exactly the old schema, imported by the real binary, then checked over
//! real HTTP against the real server and PostgreSQL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use expo_controller::ids;
use expo_controller::import::reader::OLD_SCHEMA;
use expo_controller::storage::certs;
use reqwest::multipart::Form;
use rusqlite::{Connection, params};
use serde_json::Value;
use sqlx::PgPool;

use crate::support::{API_KEY, TestApp, fresh_database};

/// 2023-11-14T22:13:20Z in epoch milliseconds: every old time is an offset from it.
const T0: i64 = 1_700_000_000_000;
/// Where the old server said its files were (not where they are now).
const OLD_ROOT: &str = "/var/lib/expo-controller-ts/storage";

const W_IOS: &str = "wIosMacMini0000000001";
const W_BROKEN: &str = "wBrokenCaps0000000002";
const W_OFF: &str = "wOfflineMac0000000003";
const P0: &str = "bPendingOldest0000000";
const P1: &str = "bPendingWithCerts0001";
const P2: &str = "bPendingNewest0000002";
const A1: &str = "bAssignedInterrupted1";
const B1: &str = "bBuildingAndroid00001";
const C1: &str = "bCompletedIos00000001";
const F1: &str = "bFailedThenRetried001";
const R1: &str = "bRetryOfFailed0000001";
const X1: &str = "bCancelledByUser00001";
const M1: &str = "bPendingNoSource00001";
const BAD: &str = "bUnknownStatus0000001";
const GHOST: &str = "bFileWithoutRow000001";

/// (id, status, platform, worker, submitted offset, error, certs?, result?, source on disk?)
type OldBuild = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    i64,
    Option<&'static str>,
    bool,
    bool,
    bool,
);

/// The old database and folder, and what the test needs to know about them.
struct Fixture {
    dir: PathBuf,
    sqlite: PathBuf,
    storage: PathBuf,
    tokens: BTreeMap<&'static str, String>,
    result: Vec<u8>,
    certs: Vec<u8>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn old_path(folder: &str, file: &str) -> String {
    format!("{OLD_ROOT}/{folder}/{file}")
}

/// A TypeScript controller's database with every state, a cancelled build, a retried pair, a worker
/// with broken capabilities, logs, diagnostics, samples, a row whose file is missing, a file without a
/// row, an extra column (`last_heartbeat_at`, which the old server wrote) and bad rows.
fn fixture() -> Fixture {
    let dir = std::env::temp_dir().join(format!("expo-import-{}", ids::new_id()));
    let storage = dir.join("storage");
    for folder in ["builds", "certs", "results"] {
        std::fs::create_dir_all(storage.join(folder)).unwrap();
    }
    let sqlite = dir.join("controller.db");
    let db = Connection::open(&sqlite).unwrap();
    db.execute_batch(OLD_SCHEMA).unwrap();
    db.execute_batch("ALTER TABLE builds ADD COLUMN last_heartbeat_at INTEGER")
        .unwrap();

    let workers: [(&str, &str, &str, &str, i64, i64); 4] = [
        (
            W_IOS,
            "mac-mini",
            "idle",
            r#"{"platforms":["ios"],"xcode_version":"16.0"}"#,
            7,
            2,
        ),
        (W_BROKEN, "old-imac", "building", "{platforms: ios", 1, 0),
        (W_OFF, "laptop", "offline", "{}", 0, 0),
        ("bad worker id!", "x", "idle", "{}", 0, 0),
    ];
    for (id, name, status, caps, done, failed) in workers {
        db.execute(
            "INSERT INTO workers (id, name, status, capabilities, registered_at, last_seen_at, builds_completed, builds_failed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![id, name, status, caps, T0, T0 + 50_000, done, failed],
        )
        .unwrap();
    }

    let mut tokens = BTreeMap::new();
    let builds: [OldBuild; 11] = [
        (P1, "pending", "ios", None, 1_000, None, true, false, true),
        (C1, "completed", "ios", Some(W_IOS), 100, None, false, true, true),
        (P2, "pending", "ios", None, 2_000, None, false, false, true),
        (A1, "assigned", "ios", Some(W_IOS), 1_500, None, false, false, true),
        (
            B1,
            "building",
            "android",
            Some(W_BROKEN),
            1_200,
            None,
            false,
            false,
            true,
        ),
        (
            F1,
            "failed",
            "android",
            Some(W_BROKEN),
            200,
            Some("Gradle failed"),
            false,
            false,
            true,
        ),
        (R1, "pending", "android", None, 1_800, None, false, false, true),
        (
            X1,
            "failed",
            "ios",
            None,
            300,
            Some("Build cancelled by user"),
            false,
            false,
            true,
        ),
        (M1, "pending", "ios", None, 1_100, None, false, false, false),
        (BAD, "exploded", "ios", None, 400, None, false, false, true),
        (P0, "pending", "ios", None, 500, None, false, false, true),
    ];
    for (id, status, platform, worker, offset, error, with_certs, with_result, source_on_disk) in builds {
        let token = ids::new_secret();
        tokens.insert(id, token.clone());
        let started = worker.map(|_| T0 + offset + 10_000);
        let completed = matches!(status, "completed" | "failed").then_some(T0 + offset + 60_000);
        let certs_path = with_certs.then(|| old_path("certs", &format!("{id}.zip")));
        let result_path = with_result.then(|| old_path("results", &format!("{id}.ipa")));
        db.execute(
            "INSERT INTO builds (id, status, platform, source_path, certs_path, result_path, worker_id, submitted_at,
                                 started_at, completed_at, error_message, access_token, last_heartbeat_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?9)",
            params![
                id,
                status,
                platform,
                old_path("builds", &format!("{id}.zip")),
                certs_path,
                result_path,
                worker,
                T0 + offset,
                started,
                completed,
                error,
                token
            ],
        )
        .unwrap();
        if source_on_disk {
            std::fs::write(storage.join(format!("builds/{id}.zip")), format!("source of {id}")).unwrap();
        }
    }
    let certs = b"PK\x03\x04 pretend certs bundle".to_vec();
    std::fs::write(storage.join(format!("certs/{P1}.zip")), &certs).unwrap();
    let result: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(storage.join(format!("results/{C1}.ipa")), &result).unwrap();
    std::fs::write(storage.join(format!("builds/{GHOST}.zip")), b"nobody's source").unwrap();

    let logs: [(&str, i64, &str, &str); 8] = [
        (C1, 1, "info", "Build assigned to worker mac-mini"),
        (F1, 2, "error", "Gradle failed"),
        (C1, 3, "warn", "Signing took long"),
        (F1, 4, "info", &format!("Retried as build {R1}")),
        (C1, 5, "info", "Build completed"),
        (BAD, 6, "info", "line of a skipped build"),
        ("noSuchBuild000000000", 7, "info", "line without a build"),
        (A1, 8, "info", "Cloning the VM"),
    ];
    for (build, offset, level, message) in logs {
        db.execute(
            "INSERT INTO build_logs (build_id, timestamp, level, message) VALUES (?1, ?2, ?3, ?4)",
            params![build, T0 + 20_000 + offset, level, message],
        )
        .unwrap();
    }
    for (i, cpu) in [12.5f64, 80.0, 55.25].iter().enumerate() {
        db.execute(
            "INSERT INTO cpu_snapshots (build_id, timestamp, cpu_percent, memory_mb) VALUES (?1, ?2, ?3, ?4)",
            params![C1, T0 + 30_000 + i as i64 * 5_000, cpu, 2048.0 + i as f64],
        )
        .unwrap();
    }
    let diagnostics: [(&str, &str, &str, &str); 3] = [
        (
            "V1StGXR8_Z5jdHi6B-myT",
            W_IOS,
            "healthy",
            r#"[{"name":"disk","ok":true}]"#,
        ),
        ("diagOfGoneWorker00001", "wGoneWorker000000009", "warning", "[]"),
        ("diagWithBrokenChecks1", W_IOS, "critical", "not json"),
    ];
    for (id, worker, status, checks) in diagnostics {
        db.execute(
            "INSERT INTO diagnostics (id, worker_id, status, run_at, duration_ms, auto_fixed, checks)
             VALUES (?1, ?2, ?3, ?4, 1234, 1, ?5)",
            params![id, worker, status, T0 + 40_000, checks],
        )
        .unwrap();
    }
    drop(db);
    Fixture {
        dir,
        sqlite,
        storage,
        tokens,
        result,
        certs,
    }
}

/// Runs `expo-controller import-ts` on `fixture` into `database_url` / `store`.
async fn import(
    fixture: &Fixture,
    database_url: &str,
    store: &Path,
    certs_key: &str,
    extra: &[(&str, &str)],
) -> Output {
    import_files(&fixture.sqlite, &fixture.storage, database_url, store, certs_key, extra).await
}

async fn import_files(
    sqlite: &Path,
    old_storage: &Path,
    database_url: &str,
    store: &Path,
    certs_key: &str,
    extra: &[(&str, &str)],
) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_expo-controller"));
    command
        .arg("import-ts")
        .arg("--sqlite")
        .arg(sqlite)
        .arg("--storage")
        .arg(old_storage)
        .env("DATABASE_URL", database_url)
        .env("CONTROLLER_CERTS_KEY", certs_key)
        .env("CONTROLLER_STORAGE_DIR", store)
        .env("CONTROLLER_STORAGE_FSYNC", "false")
        .env_remove("CONTROLLER_API_KEY");
    for (flag_or_env, value) in extra {
        if let Some(flag) = flag_or_env.strip_prefix("--") {
            command.arg(format!("--{flag}"));
            if !value.is_empty() {
                command.arg(value);
            }
        } else {
            command.env(flag_or_env, value);
        }
    }
    tokio::task::spawn_blocking(move || command.output().expect("run import-ts"))
        .await
        .expect("join")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// The summary row of `table`: read, imported, already present, skipped.
fn summary_row(output: &Output, table: &str) -> [u64; 4] {
    let text = stdout(output);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(table))
        .unwrap_or_else(|| panic!("no {table} row in:\n{text}"));
    let numbers: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(4)
        .map(|n| n.parse().unwrap())
        .collect();
    [numbers[0], numbers[1], numbers[2], numbers[3]]
}

/// Every file under a directory, with its bytes.
fn files_under(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_string_lossy().to_string();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The database's content without what depends on the moment of the import (times of the lines and
/// attempt ends the import writes itself, and lease tokens from a sequence).
async fn dump(pool: &PgPool) -> Vec<String> {
    let queries = [
        "SELECT json_agg(t ORDER BY id)::text FROM (SELECT id, state, queue, run_at, attempt, worker_id, submitted_at,
            started_at, CASE WHEN finished_reason = 'infrastructure' THEN NULL ELSE completed_at END AS completed_at,
            finished_reason, error_message, jsonb_array_length(errors) AS errors, encode(access_token_hash, 'hex') AS token,
            source_key, source_size, certs_key, result_key, result_size, result_sha256, result_attempt,
            original_build_id, log_seq, max_attempts FROM builds) t",
        "SELECT json_agg(t ORDER BY build_id, seq)::text FROM (SELECT build_id, seq, level, message,
            CASE WHEN ts < '2025-01-01' THEN ts END AS ts FROM build_logs) t",
        "SELECT json_agg(t ORDER BY build_id)::text FROM (SELECT build_id, attempt, worker_id, assigned_at, started_at,
            outcome, error_message FROM build_attempts) t",
        "SELECT json_agg(t ORDER BY build_id, ts)::text FROM cpu_snapshots t",
        "SELECT json_agg(t ORDER BY id)::text FROM workers t",
        "SELECT json_agg(t ORDER BY id)::text FROM diagnostics t",
    ];
    let mut out = Vec::new();
    for sql in queries {
        let text: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(pool)
            .await
            .unwrap();
        out.push(text.unwrap_or_default());
    }
    out
}

/// Stored objects, certs decrypted (their nonces differ from run to run).
fn stored_objects(store: &Path, certs_key: &str) -> BTreeMap<String, Vec<u8>> {
    let key = ids::decode_key32(certs_key).unwrap();
    files_under(store)
        .into_iter()
        .map(|(name, bytes)| {
            let bytes = if name.ends_with("certs.bin") {
                certs::decrypt(&key, &bytes).unwrap()
            } else {
                bytes
            };
            (name, bytes)
        })
        .collect()
}

async fn get(app: &TestApp, path: &str, header: (&str, &str)) -> reqwest::Response {
    app.client
        .get(app.url(path))
        .header(header.0, header.1)
        .send()
        .await
        .unwrap()
}

/// Polls as a G0 worker, fails the build it got and polls again, until the queue is empty.
async fn drain_as(app: &TestApp, worker_id: &str) -> Vec<String> {
    let mut got = Vec::new();
    for _ in 0..20 {
        let answer = app.poll(worker_id).await;
        let Some(id) = answer["job"]["id"].as_str() else {
            return got;
        };
        got.push(id.to_string());
        let fail = Form::new()
            .text("build_id", id.to_string())
            .text("worker_id", worker_id.to_string())
            .text("success", "false")
            .text("error_message", "test drain");
        assert_eq!(app.upload_form(fail).await.status(), 200);
    }
    panic!("{worker_id} never ran out of builds: {got:?}");
}

#[tokio::test]
async fn an_imported_deployment_serves_its_workers_and_cli_users() {
    let old = fixture();
    let before = files_under(&old.dir);
    let certs_key = ids::new_key32();
    let key = certs_key.clone();
    let app = TestApp::spawn_with(move |c| {
        c.certs_key = Some(key);
        // Retention would prune these 2023 builds at its next tick; nothing may move behind the test's back.
        c.jobs.run_jobs = false;
    })
    .await;
    let output = import(&old, &app.database_url, &app.storage_dir, &certs_key, &[]).await;
    let text = stdout(&output);
    assert_eq!(
        output.status.code(),
        Some(2),
        "skipped rows exit 2:\n{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The summary: per table read / imported / already present / skipped.
    assert_eq!(summary_row(&output, "workers"), [4, 3, 0, 1]);
    assert_eq!(summary_row(&output, "builds"), [11, 10, 0, 1]);
    assert_eq!(summary_row(&output, "build_logs"), [8, 6, 0, 2]);
    assert_eq!(summary_row(&output, "diagnostics"), [3, 1, 0, 2]);
    assert_eq!(summary_row(&output, "cpu_snapshots"), [3, 3, 0, 0]);
    // 10 sources + certs + result + the file without a row; M1's source is missing.
    assert_eq!(summary_row(&output, "files"), [13, 11, 0, 2]);
    for expected in [
        "bad id: 1",
        "unknown status: 1",
        "build row skipped: 1",
        "no build row: 1",
        "unknown worker: 1",
        "bad checks: 1",
        "builds queued again after an interrupted attempt: 2",
        "failed builds imported as cancelled: 1",
        "queued builds failed because their source is missing: 1",
        "retried builds linked to their original: 1",
        "workers with unreadable capabilities (given both platforms): 1",
    ] {
        assert!(text.contains(expected), "summary lacks {expected:?}:\n{text}");
    }
    assert_eq!(app.count("builds").await, 10);
    assert_eq!(app.count("workers").await, 3);
    assert_eq!(app.count("diagnostics").await, 1);
    assert_eq!(app.count("cpu_snapshots").await, 3);

    // The old folder is untouched (no journal, no WAL, same bytes).
    assert_eq!(files_under(&old.dir), before);

    // A CLI user's saved token reads its build's status, logs and download (bytes identical)...
    let c1_token = old.tokens[C1].as_str();
    let status = get(&app, &format!("/api/builds/{C1}/status"), ("X-Build-Token", c1_token)).await;
    assert_eq!(status.status(), 200);
    let status: Value = status.json().await.unwrap();
    assert_eq!(status["status"], "completed");
    assert_eq!(status["worker_id"], W_IOS);
    assert_eq!(status["submitted_at"], T0 + 100);
    assert_eq!(status["completed_at"], T0 + 100 + 60_000);
    let logs: Value = get(&app, &format!("/api/builds/{C1}/logs"), ("X-Build-Token", c1_token))
        .await
        .json()
        .await
        .unwrap();
    let messages: Vec<&str> = logs["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        messages,
        [
            "Build assigned to worker mac-mini",
            "Signing took long",
            "Build completed"
        ]
    );
    assert_eq!(logs["logs"][1]["level"], "warn");
    assert_eq!(logs["logs"][0]["timestamp"], T0 + 20_001);
    let download = get(&app, &format!("/api/builds/{C1}/download"), ("X-Build-Token", c1_token)).await;
    assert_eq!(download.status(), 200);
    assert_eq!(download.bytes().await.unwrap().as_ref(), old.result.as_slice());
    // ...and nothing else.
    for path in [format!("/api/builds/{P1}/status"), format!("/api/builds/{P1}/logs")] {
        assert_eq!(
            get(&app, &path, ("X-Build-Token", c1_token)).await.status(),
            403,
            "{path}"
        );
    }
    assert_eq!(
        get(&app, &format!("/api/builds/{C1}/status"), ("X-Build-Token", "a-guess"))
            .await
            .status(),
        403
    );

    // The cancelled build reads as cancelled natively and in the old G0 shape.
    let native = app.admin_json(&format!("/api/v2/builds/{X1}")).await;
    assert_eq!(native["state"], "cancelled");
    let g0: Value = get(
        &app,
        &format!("/api/builds/{X1}/status"),
        ("X-Build-Token", old.tokens[X1].as_str()),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        (g0["status"].as_str(), g0["error_message"].as_str()),
        (Some("failed"), Some("Build cancelled by user"))
    );

    // The queued build without its source failed with a clear error; the retry knows its original;
    // the interrupted build counts its lost attempt and says so in its log.
    let m1 = app.admin_json(&format!("/api/v2/builds/{M1}")).await;
    assert_eq!(m1["state"], "failed");
    let r1: Option<String> = sqlx::query_scalar("SELECT original_build_id FROM builds WHERE id = $1")
        .bind(R1)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(r1.as_deref(), Some(F1));
    let (attempt, state): (i32, String) = sqlx::query_as("SELECT attempt, state FROM builds WHERE id = $1")
        .bind(A1)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!((attempt, state.as_str()), (1, "pending"));
    let a1_logs: Value = app.admin_json(&format!("/api/builds/{A1}/logs")).await;
    let last = a1_logs["logs"].as_array().unwrap().last().unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        last.contains("interrupted by the move from the TypeScript controller"),
        "{last}"
    );

    // Worker counters and platforms (broken capabilities: both).
    let broken: (Vec<String>, i64, String) =
        sqlx::query_as("SELECT platforms, builds_completed, status FROM workers WHERE id = $1")
            .bind(W_BROKEN)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        broken,
        (vec!["ios".to_string(), "android".to_string()], 1, "idle".to_string())
    );

    // The certs bundle is encrypted at rest and reaches the worker holding the build intact.
    let sealed = std::fs::read(app.storage_dir.join(format!("builds/{P1}/certs.bin"))).unwrap();
    assert!(!sealed.windows(old.certs.len()).any(|w| w == old.certs.as_slice()));
    let first = app.poll(W_IOS).await;
    assert_eq!(first["job"]["id"], P0, "oldest queued build first: {first}");
    let fail = Form::new()
        .text("build_id", P0)
        .text("worker_id", W_IOS)
        .text("success", "false")
        .text("error_message", "x");
    assert_eq!(app.upload_form(fail).await.status(), 200);
    let second = app.poll(W_IOS).await;
    assert_eq!(second["job"]["id"], P1);
    let bundle = app
        .client
        .get(app.url(&format!("/api/builds/{P1}/certs")))
        .query(&[("worker_id", W_IOS)])
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(bundle.status(), 200);
    assert_eq!(bundle.bytes().await.unwrap().as_ref(), old.certs.as_slice());
    let source = app
        .client
        .get(app.url(&format!("/api/builds/{P1}/source")))
        .query(&[("worker_id", W_IOS)])
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        source.bytes().await.unwrap().as_ref(),
        format!("source of {P1}").as_bytes()
    );
    let fail = Form::new()
        .text("build_id", P1)
        .text("worker_id", W_IOS)
        .text("success", "false")
        .text("error_message", "x");
    assert_eq!(app.upload_form(fail).await.status(), 200);

    // G0 workers polling with their imported ids get the rest of the queues oldest first.
    assert_eq!(drain_as(&app, W_IOS).await, [A1, P2]);
    assert_eq!(drain_as(&app, W_BROKEN).await, [B1, R1]);
    assert_eq!(drain_as(&app, W_OFF).await, Vec::<String>::new());
}

#[tokio::test]
async fn a_second_run_changes_nothing_and_a_killed_run_is_finished_by_the_next() {
    let old = fixture();
    let certs_key = ids::new_key32();
    let batch = [("--batch-size", "2")];

    // Uninterrupted, then again.
    let (url_a, pool_a) = fresh_database(2).await;
    let store_a = old.dir.join("store-a");
    let first = import(&old, &url_a, &store_a, &certs_key, &batch).await;
    assert_eq!(
        first.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let after_first = (dump(&pool_a).await, files_under(&store_a));
    let second = import(&old, &url_a, &store_a, &certs_key, &batch).await;
    assert_eq!(second.status.code(), Some(2));
    assert_eq!(
        (dump(&pool_a).await, files_under(&store_a)),
        after_first,
        "a second run changed something"
    );
    assert_eq!(summary_row(&second, "workers"), [4, 0, 3, 1]);
    assert_eq!(summary_row(&second, "builds"), [11, 0, 10, 1]);
    assert_eq!(summary_row(&second, "build_logs"), [8, 0, 6, 2]);
    assert_eq!(summary_row(&second, "diagnostics"), [3, 0, 1, 2]);
    assert_eq!(summary_row(&second, "cpu_snapshots"), [3, 0, 3, 0]);
    assert_eq!(summary_row(&second, "files"), [13, 0, 11, 2]);

    // Killed after two batches (the third batch's files already stored), then run again.
    let (url_b, pool_b) = fresh_database(2).await;
    let store_b = old.dir.join("store-b");
    let hook = [("--batch-size", "2"), ("EXPO_IMPORT_TEST_ABORT_AFTER_BATCHES", "2")];
    let killed = import(&old, &url_b, &store_b, &certs_key, &hook).await;
    assert_eq!(
        killed.status.code(),
        Some(86),
        "{}",
        String::from_utf8_lossy(&killed.stderr)
    );
    let partial: i64 = sqlx::query_scalar("SELECT count(*) FROM builds")
        .fetch_one(&pool_b)
        .await
        .unwrap();
    assert!(partial > 0 && partial < 10, "{partial} builds after the kill");
    // R63: the files of the batch the kill interrupted are named in `pending_writes` (sweep_unlinked
    // deletes them if no later run links them); every stored object is named by a row or a pending key.
    let named: Vec<String> = sqlx::query_scalar(
        "SELECT k FROM builds, unnest(ARRAY[source_key, certs_key, result_key]) AS k WHERE k IS NOT NULL
         UNION ALL SELECT key FROM pending_writes",
    )
    .fetch_all(&pool_b)
    .await
    .unwrap();
    let stored: Vec<String> = files_under(&store_b)
        .into_keys()
        .filter(|k| k.starts_with("builds/"))
        .collect();
    let linked: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_writes")
        .fetch_one(&pool_b)
        .await
        .unwrap();
    assert!(linked > 0, "the interrupted batch's files are pending");
    for key in &stored {
        assert!(named.contains(key), "{key} is named by no row and no pending key");
    }
    let finished = import(&old, &url_b, &store_b, &certs_key, &batch).await;
    assert_eq!(finished.status.code(), Some(2));
    assert_eq!(
        summary_row(&finished, "builds")[1..3],
        [10 - partial as u64, partial as u64]
    );
    assert_eq!(
        dump(&pool_b).await,
        after_first.0,
        "the resumed import differs from an uninterrupted one"
    );
    for pool in [&pool_a, &pool_b] {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_writes")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(pending, 0, "every copied file the rows name was linked");
    }
    assert_eq!(
        stored_objects(&store_b, &certs_key),
        stored_objects(&store_a, &certs_key)
    );
}

#[tokio::test]
async fn a_dry_run_reports_and_writes_nothing() {
    let old = fixture();
    let (url, pool) = fresh_database(2).await;
    let store = old.dir.join("store");
    let output = import(&old, &url, &store, &ids::new_key32(), &[("--dry-run", "")]).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout(&output).contains("would import"));
    assert!(stdout(&output).contains("dry run: nothing written"));
    assert_eq!(summary_row(&output, "builds"), [11, 10, 0, 1]);
    assert_eq!(summary_row(&output, "files"), [13, 11, 0, 2]);
    for table in [
        "builds",
        "workers",
        "build_logs",
        "cpu_snapshots",
        "diagnostics",
        "build_attempts",
    ] {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 0, "{table}");
    }
    assert!(!store.exists(), "a dry run created the storage folder");
}

#[tokio::test]
async fn bad_input_fails_with_a_clear_message_and_writes_nothing() {
    let old = fixture();
    let (url, pool) = fresh_database(2).await;
    let store = old.dir.join("store");
    let key = ids::new_key32();

    let not_sqlite = old.dir.join("notes.txt");
    std::fs::write(&not_sqlite, "this is not a database at all, just some text").unwrap();
    let output = import_files(&not_sqlite, &old.storage, &url, &store, &key, &[]).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not a SQLite database"), "{stderr}");

    let partial = old.dir.join("partial.db");
    let db = Connection::open(&partial).unwrap();
    db.execute_batch(&OLD_SCHEMA.replace("CREATE TABLE cpu_snapshots", "CREATE TABLE unrelated"))
        .unwrap();
    drop(db);
    let output = import_files(&partial, &old.storage, &url, &store, &key, &[]).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no `cpu_snapshots` table"), "{stderr}");

    let missing = old.dir.join("absent.db");
    let output = import_files(&missing, &old.storage, &url, &store, &key, &[]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(!missing.exists(), "the import created the database it was pointed at");

    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM builds")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 0);
    assert!(!store.exists());
}

#[tokio::test]
async fn a_final_import_after_a_live_trial_brings_the_later_changes() {
    let old = fixture();
    let certs_key = ids::new_key32();
    let (url, pool) = fresh_database(2).await;
    let store = old.dir.join("store");
    let trial = import(&old, &url, &store, &certs_key, &[]).await;
    assert_eq!(
        trial.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&trial.stderr)
    );

    // The old controller keeps running: P2 completes (with a log line and a result), P0 gets a log line.
    let db = Connection::open(&old.sqlite).unwrap();
    db.execute(
        "UPDATE builds SET status = 'completed', worker_id = ?2, started_at = ?3, completed_at = ?4, result_path = ?5
         WHERE id = ?1",
        params![
            P2,
            W_IOS,
            T0 + 90_000,
            T0 + 95_000,
            old_path("results", &format!("{P2}.ipa"))
        ],
    )
    .unwrap();
    for build in [P2, P0] {
        db.execute(
            "INSERT INTO build_logs (build_id, timestamp, level, message) VALUES (?1, ?2, 'info', 'late line')",
            params![build, T0 + 91_000],
        )
        .unwrap();
    }
    drop(db);
    std::fs::write(old.storage.join(format!("results/{P2}.ipa")), b"late result").unwrap();
    // ...while this controller already logged on P0 (as if it had been started in between).
    sqlx::query(
        "WITH s AS (UPDATE builds SET log_seq = log_seq + 1 WHERE id = $1 RETURNING log_seq)
         INSERT INTO build_logs (build_id, seq, ts, level, message) SELECT $1, log_seq, now(), 'info', 'new' FROM s",
    )
    .bind(P0)
    .execute(&pool)
    .await
    .unwrap();

    let last = import(&old, &url, &store, &certs_key, &[]).await;
    let text = stdout(&last);
    assert_eq!(last.status.code(), Some(2), "{text}");
    assert_eq!(summary_row(&last, "builds"), [11, 1, 8, 2], "{text}");
    assert!(
        text.contains("builds changed in the old database since the last import (imported again): 1"),
        "{text}"
    );
    assert!(text.contains("changed in both controllers: 1"), "{text}");
    let (state, result_size, lines): (String, Option<i64>, i64) = sqlx::query_as(
        "SELECT state, result_size, (SELECT count(*) FROM build_logs l WHERE l.build_id = b.id) FROM builds b WHERE id = $1",
    )
    .bind(P2)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), result_size, lines), ("completed", Some(11), 1));
    // P0 keeps what this controller did with it.
    let p0: Vec<String> = sqlx::query_scalar("SELECT message FROM build_logs WHERE build_id = $1 ORDER BY seq")
        .bind(P0)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(p0, ["new"]);
    // A third run finds nothing new.
    let again = import(&old, &url, &store, &certs_key, &[]).await;
    assert_eq!(summary_row(&again, "builds"), [11, 0, 9, 2]);
}

/// The same import into an S3 bucket (the store `serve` is configured with): the files land in the bucket
/// with certificates encrypted, nothing is written to local disk, and a controller on that bucket serves the
/// imported build to its saved token, bytes identical.
#[tokio::test]
async fn an_import_into_s3_serves_the_same_downloads() {
    use crate::s3::{BUCKET, Controller, PREFIX, S3Server};

    let old = fixture();
    let certs_key = ids::new_key32();
    let s3 = S3Server::start().await;
    let (database_url, _pool) = fresh_database(2).await;
    let local = std::env::temp_dir().join(format!("expo-import-s3-local-{}", ids::new_id()));
    let mut env: Vec<(&str, String)> = s3.env();
    env.push(("CONTROLLER_STORAGE_URL", format!("s3://{BUCKET}/{PREFIX}")));
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let output = import(&old, &database_url, &local, &certs_key, &extra).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "skipped rows exit 2:\n{}\n{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(summary_row(&output, "builds"), [11, 10, 0, 1]);
    assert_eq!(summary_row(&output, "files"), [13, 11, 0, 2]);
    assert!(!local.exists(), "an import into S3 writes nothing to the local store");

    let objects = s3.objects();
    assert_eq!(objects.len(), 11, "one object per imported file: {objects:?}");
    let certs_object = objects
        .iter()
        .find(|k| k.contains(P1) && k.ends_with("certs.bin"))
        .expect("P1's certs");
    let stored = s3.object(certs_object);
    assert_ne!(stored, old.certs, "certs are encrypted before they reach the store");
    let key = ids::decode_key32(&certs_key).unwrap();
    assert_eq!(certs::decrypt(&key, &stored).unwrap(), old.certs);

    // A second run changes nothing in the bucket either.
    let again = import(&old, &database_url, &local, &certs_key, &extra).await;
    assert_eq!(summary_row(&again, "builds")[1], 0, "{}", stdout(&again));
    assert_eq!(s3.objects(), objects);

    let controller = Controller::start(&database_url, &s3, &certs_key, &[("CONTROLLER_RUN_JOBS", "false")]).await;
    let download = reqwest::Client::new()
        .get(controller.url(&format!("/api/builds/{C1}/download")))
        .header("X-Build-Token", old.tokens[C1].as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200);
    assert_eq!(download.bytes().await.unwrap().as_ref(), old.result.as_slice());
}

/// T2: a symlink planted in the old folder (to the import's own environment, or any file the importing user
/// can read) or a symlinked `builds/` is never copied into the store: each is reported as skipped. T10: the
/// API's bounds apply to imported text (a 3 MiB worker name, 64 KiB capabilities, a 3 MiB log line).
#[tokio::test]
async fn symlinks_out_of_the_folder_are_refused_and_imported_text_is_bounded() {
    let old = fixture();
    let secret = old.dir.join("secret.env");
    std::fs::write(&secret, "DATABASE_URL=postgres://admin:hunter2@db/prod").unwrap();
    for file in [format!("results/{C1}.ipa"), format!("certs/{P1}.zip")] {
        let planted = old.storage.join(&file);
        std::fs::remove_file(&planted).unwrap();
        std::os::unix::fs::symlink(&secret, &planted).unwrap();
    }
    std::os::unix::fs::symlink("/proc/self/environ", old.storage.join(format!("results/{P0}.apk"))).unwrap();
    let db = Connection::open(&old.sqlite).unwrap();
    db.execute(
        "UPDATE builds SET result_path = ?1 WHERE id = ?2",
        params![old_path("results", &format!("{P0}.apk")), P0],
    )
    .unwrap();
    let huge_name = "n".repeat(3 * 1024 * 1024);
    let huge_caps = format!(r#"{{"platforms":["ios"],"pad":"{}"}}"#, "x".repeat(64 * 1024));
    db.execute(
        "INSERT INTO workers (id, name, status, capabilities, registered_at, last_seen_at, builds_completed, builds_failed)
         VALUES ('wHugeNameWorker000001', ?1, 'idle', ?2, ?3, ?3, 0, 0)",
        params![huge_name, huge_caps, T0],
    )
    .unwrap();
    db.execute(
        "INSERT INTO build_logs (build_id, timestamp, level, message) VALUES (?1, ?2, 'info', ?3)",
        params![C1, T0 + 29_000, "é".repeat(1024 * 1024 + 1)],
    )
    .unwrap();
    // T10/T3: a 3 MiB error message, and more samples than CONTROLLER_MAX_SAMPLES_PER_BUILD (10 here).
    db.execute(
        "UPDATE builds SET error_message = ?1 WHERE id = ?2",
        params!["ü".repeat(3 * 512 * 1024), F1],
    )
    .unwrap();
    for i in 0..60i64 {
        db.execute(
            "INSERT INTO cpu_snapshots (build_id, timestamp, cpu_percent, memory_mb) VALUES (?1, ?2, 50, 1024)",
            params![F1, T0 + 40_000 + i * 1_000],
        )
        .unwrap();
    }
    drop(db);

    let (url, pool) = fresh_database(2).await;
    let store = old.dir.join("store");
    let certs_key = ids::new_key32();
    let output = import(
        &old,
        &url,
        &store,
        &certs_key,
        &[("CONTROLLER_MAX_SAMPLES_PER_BUILD", "10")],
    )
    .await;
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("not a regular file inside the folder: 3"), "{text}");
    for file in [
        format!("results/{C1}.ipa"),
        format!("certs/{P1}.zip"),
        format!("results/{P0}.apk"),
    ] {
        assert!(
            text.contains(&format!("files: {file} (not a regular file inside the folder)")),
            "{file}: {text}"
        );
    }
    for (name, bytes) in stored_objects(&store, &certs_key) {
        let bytes = String::from_utf8_lossy(&bytes);
        assert!(!bytes.contains("hunter2"), "{name} holds the planted file");
        assert!(!bytes.contains("DATABASE_URL"), "{name} holds an environment");
    }
    let result: Option<String> = sqlx::query_scalar("SELECT result_key FROM builds WHERE id = $1")
        .bind(C1)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(result, None);

    let (name, caps): (i32, i32) = sqlx::query_as(
        "SELECT octet_length(name), octet_length(capabilities::text) FROM workers WHERE id = 'wHugeNameWorker000001'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(name, 256);
    assert!(caps <= 16 * 1024, "capabilities of {caps} bytes");
    let longest: i32 = sqlx::query_scalar("SELECT max(octet_length(message)) FROM build_logs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(longest <= 8 * 1024, "a log line of {longest} bytes");
    let error: i32 = sqlx::query_scalar("SELECT octet_length(error_message) FROM builds WHERE id = $1")
        .bind(F1)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        error <= 64 * 1024 && error > 60 * 1024,
        "an error message of {error} bytes"
    );
    let (samples, kept, first, last): (i64, i32, f64, f64) = sqlx::query_as(
        "SELECT count(*), max(b.cpu_samples), extract(epoch FROM min(s.ts))::float8, extract(epoch FROM max(s.ts))::float8
         FROM cpu_snapshots s JOIN builds b ON b.id = s.build_id WHERE s.build_id = $1",
    )
    .bind(F1)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (samples, kept),
        (10, 10),
        "samples of one build are thinned to the limit"
    );
    assert_eq!(
        (first * 1000.0, last * 1000.0),
        ((T0 + 40_000) as f64, (T0 + 99_000) as f64),
        "the whole curve is kept"
    );
    assert!(text.contains("CPU samples left out"), "{text}");

    // A symlinked `builds/` (its files regular, but outside the folder) is refused file by file.
    let elsewhere = old.dir.join("elsewhere");
    std::fs::rename(old.storage.join("builds"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, old.storage.join("builds")).unwrap();
    let (url, _pool) = fresh_database(2).await;
    let output = import(&old, &url, &old.dir.join("store2"), &certs_key, &[]).await;
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(
        text.contains(&format!(
            "files: builds/{P0}.zip (not a regular file inside the folder)"
        )),
        "{text}"
    );
    let stored = files_under(&old.dir.join("store2"));
    assert!(
        !stored.keys().any(|name| name.contains("source")),
        "sources copied from outside the folder: {stored:?}"
    );
}
