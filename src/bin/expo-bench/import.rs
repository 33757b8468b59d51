//! P11: `expo-controller import-ts` of a generated TypeScript-controller deployment — 100,000 builds with
//! 1,000,000 log lines and 100,000 small source files (`BENCH_IMPORT_BUILDS` scales it) — into a fresh
//! database on the bench PostgreSQL, timed end to end (the release binary as a child process).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use expo_controller::import::reader::OLD_SCHEMA;
use rusqlite::{Connection, params};
use sqlx::postgres::PgPoolOptions;

use crate::setup::{Env, pg_port};
use crate::stats::Row;

const LOG_LINES_PER_BUILD: usize = 10;
const T0: i64 = 1_760_000_000_000;

/// Writes the old database and storage folder under `dir`.
fn generate(dir: &Path, builds: usize) -> anyhow::Result<(PathBuf, PathBuf)> {
    let _ = std::fs::remove_dir_all(dir);
    let storage = dir.join("storage");
    for folder in ["builds", "certs", "results"] {
        std::fs::create_dir_all(storage.join(folder))?;
    }
    let sqlite = dir.join("controller.db");
    let mut db = Connection::open(&sqlite)?;
    db.execute_batch(OLD_SCHEMA)?;
    db.execute_batch("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;")?;
    let tx = db.transaction()?;
    for w in 0..10 {
        tx.execute(
            "INSERT INTO workers VALUES (?1, ?2, 'idle', '{\"platforms\":[\"ios\",\"android\"]}', ?3, ?3, 0, 0)",
            params![format!("benchWorker{w:010}"), format!("mac-{w}"), T0],
        )?;
    }
    {
        let mut build = tx.prepare(
            "INSERT INTO builds (id, status, platform, source_path, worker_id, submitted_at, started_at, completed_at,
                                 error_message, access_token) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        let mut line =
            tx.prepare("INSERT INTO build_logs (build_id, timestamp, level, message) VALUES (?1, ?2, ?3, ?4)")?;
        let source = vec![b'x'; 1024];
        for i in 0..builds {
            let id = format!("benchBuild{i:011}");
            let at = T0 + i as i64 * 1_000;
            let (status, worker, error) = match i % 20 {
                0 => ("pending", None, None),
                1 => (
                    "failed",
                    Some(format!("benchWorker{:010}", i % 10)),
                    Some("Gradle failed"),
                ),
                _ => ("completed", Some(format!("benchWorker{:010}", i % 10)), None),
            };
            let finished = (status != "pending").then_some(at + 60_000);
            build.execute(params![
                id,
                status,
                if i % 2 == 0 { "ios" } else { "android" },
                format!("/srv/old/storage/builds/{id}.zip"),
                worker,
                at,
                finished.map(|f| f - 50_000),
                finished,
                error,
                format!("{id}-token-0123456789abcdefghij")
            ])?;
            for n in 0..LOG_LINES_PER_BUILD {
                line.execute(params![
                    id,
                    at + n as i64,
                    "info",
                    format!("step {n} of build {id}: compiling module")
                ])?;
            }
            std::fs::write(storage.join(format!("builds/{id}.zip")), &source)?;
        }
    }
    tx.commit()?;
    Ok((sqlite, storage))
}

pub async fn p11(env: &Env) -> anyhow::Result<Row> {
    let builds: usize = std::env::var("BENCH_IMPORT_BUILDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = env.root.join("import");
    let generated = Instant::now();
    let (sqlite, storage) = generate(&dir, builds)?;
    eprintln!(
        "P11 fixture: {builds} builds generated in {:.1} s",
        generated.elapsed().as_secs_f64()
    );

    let admin_url = format!("postgres://postgres@127.0.0.1:{}/postgres", pg_port());
    let admin = PgPoolOptions::new().max_connections(1).connect(&admin_url).await?;
    sqlx::query("DROP DATABASE IF EXISTS bench_import WITH (FORCE)")
        .execute(&admin)
        .await?;
    sqlx::query("CREATE DATABASE bench_import").execute(&admin).await?;
    admin.close().await;
    let database_url = format!("postgres://postgres@127.0.0.1:{}/bench_import", pg_port());
    let store = dir.join("store");

    let binary = std::env::current_exe()?.with_file_name("expo-controller");
    let started = Instant::now();
    let status = Command::new(binary)
        .arg("import-ts")
        .arg("--sqlite")
        .arg(&sqlite)
        .arg("--storage")
        .arg(&storage)
        .env("DATABASE_URL", &database_url)
        .env("CONTROLLER_CERTS_KEY", &env.certs_key)
        .env("CONTROLLER_STORAGE_DIR", &store)
        // As the reference PostgreSQL and the other scenarios: no fsync.
        .env("CONTROLLER_STORAGE_FSYNC", "false")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()?;
    let took = started.elapsed().as_secs_f64();
    anyhow::ensure!(status.success(), "import-ts exited with {status}");
    let rate = builds as f64 / took.max(1e-9);
    eprintln!("P11 {rate:.0} builds/s ({took:.1} s)");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Row {
        id: "P11",
        scenario: format!(
            "import-ts: {builds} builds, {} log lines, {builds} files",
            builds * LOG_LINES_PER_BUILD
        ),
        figure: format!("{rate:.0} builds/s"),
        reference: "-".into(),
        ratio: "-".into(),
        latency: format!("total {took:.1} s"),
        target: "≥ 2,000 builds/s",
        met: rate >= 2_000.0,
    })
}
