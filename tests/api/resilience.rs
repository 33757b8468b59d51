//! The controller survives a PostgreSQL restart without being restarted itself (R31), and shuts down
//! gracefully. The restart test runs its own PostgreSQL so that no other test is disturbed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use expo_controller::server;
use reqwest::multipart::{Form, Part};
use serde_json::Value;

use crate::support::{API_KEY, TestApp, config, state_of};

fn pg(args: &[&str]) {
    let status = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg.sh"))
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "pg.sh {args:?}");
}

/// A PostgreSQL cluster of its own, for tests that restart it or change its server settings.
pub(crate) struct OwnPostgres {
    pub(crate) dir: PathBuf,
    port: u16,
    mode: &'static str,
}

impl OwnPostgres {
    pub(crate) fn start() -> Self {
        Self::start_in("fast")
    }

    /// `mode` `durable` keeps synchronous commits (which synchronous replication needs).
    pub(crate) fn start_in(mode: &'static str) -> Self {
        let dir = std::env::temp_dir().join(format!("expo-resilience-pg-{}", expo_controller::ids::new_id()));
        let port = crate::support::free_port();
        let pg = OwnPostgres { dir, port, mode };
        pg.up();
        pg
    }

    pub(crate) fn up(&self) {
        pg(&["start", self.dir.to_str().unwrap(), &self.port.to_string(), self.mode]);
    }

    pub(crate) fn down(&self) {
        pg(&["stop", self.dir.to_str().unwrap()]);
    }

    pub(crate) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        self.down();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn status_within(client: &reqwest::Client, url: &str, want: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let status = client.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0);
        if status == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{url} did not answer {want} within {limit:?} (last {status})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn storage(dir: &Path) -> PathBuf {
    dir.with_extension("storage")
}

/// The pool pings only a connection that sat idle for a while (`db::connect`; not every connection it
/// hands out, which cost a round trip per statement): one whose backend went away meanwhile is replaced
/// before use, not handed to a request that would fail on it.
#[tokio::test]
async fn a_pooled_connection_whose_backend_ended_while_idle_is_replaced_before_use() {
    let (url, admin) = crate::support::fresh_database(1).await;
    let pool = expo_controller::db::connect(&expo_controller::config::DbConfig {
        db_pool_size: 1,
        ..expo_controller::config::DbConfig::new(url)
    })
    .await
    .unwrap();
    let backend = || sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()").fetch_one(&pool);
    let pid = backend().await.unwrap();
    assert_eq!(backend().await.unwrap(), pid, "one pooled connection, kept");
    let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
        .bind(pid)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(ended, "backend {pid} ended");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let replaced = backend()
        .await
        .expect("a connection idle for a while is checked before use, and replaced if dead");
    assert_ne!(replaced, pid);
    pool.close().await;
    admin.close().await;
}

#[tokio::test]
async fn a_database_restart_needs_no_controller_restart() {
    let postgres = OwnPostgres::start();
    let mut cfg = config(&postgres.url(), storage(&postgres.dir));
    cfg.db.db_statement_timeout_ms = 5_000;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = server::start(cfg, Some(listener), true).await.unwrap();
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    status_within(&client, &format!("{base}/ready"), 200, Duration::from_secs(10)).await;

    postgres.down();
    status_within(&client, &format!("{base}/ready"), 503, Duration::from_secs(15)).await;
    let started = Instant::now();
    let r = client
        .get(format!("{base}/api/builds"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        503,
        "a request needing the database gets 503 rather than hanging"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "Service unavailable");

    postgres.up();
    status_within(&client, &format!("{base}/ready"), 200, Duration::from_secs(20)).await;
    // Everything works again, including the LISTEN loop: a waiting worker is woken by a submit.
    let register: Value = client
        .post(format!("{base}/api/workers/register"))
        .header("X-API-Key", API_KEY)
        .json(&serde_json::json!({ "name": "w", "capabilities": { "platforms": ["ios"] } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = register["access_token"].as_str().unwrap().to_string();
    let waiter = {
        let (client, base) = (client.clone(), base.clone());
        tokio::spawn(async move {
            client
                .get(format!("{base}/api/workers/poll?wait=15"))
                .header("X-Worker-Token", token)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let form = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(b"s".to_vec()).file_name("a.zip"));
    let submitted: Value = client
        .post(format!("{base}/api/builds/submit"))
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
    running.stop().await;
    let _ = std::fs::remove_dir_all(storage(&postgres.dir));
}

#[tokio::test]
async fn graceful_shutdown_finishes_an_upload_in_flight() {
    let mut app = TestApp::spawn().await;
    let (worker_id, _) = app.register("w", &["ios"]).await;
    let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    app.poll(&worker_id).await;

    // A result that takes about a second to arrive.
    let chunks = futures_util::stream::unfold(0, |n| async move {
        if n == 10 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok::<Bytes, std::io::Error>(Bytes::from(vec![7u8; 1024])), n + 1))
    });
    let part = Part::stream_with_length(reqwest::Body::wrap_stream(chunks), 10 * 1024).file_name("app.ipa");
    let form = Form::new()
        .text("build_id", id.clone())
        .text("worker_id", worker_id.clone())
        .text("success", "true")
        .part("result", part);
    let upload = app
        .client
        .post(app.url("/api/workers/upload"))
        .header("X-API-Key", API_KEY)
        .multipart(form)
        .send();
    let upload = tokio::spawn(upload);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = app.base.clone();
    app.stop().await;
    let response = upload.await.unwrap().unwrap();
    assert_eq!(response.status(), 200, "the in-flight upload finished");
    let state: String = state_of(&app.pool, &id).await;
    assert_eq!(state, "completed");
    assert!(
        reqwest::get(format!("{base}/health")).await.is_err(),
        "no longer accepting connections"
    );
}
