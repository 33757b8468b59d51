//! Test harness: a database per test, a server on an ephemeral port, typed helpers.

use std::path::PathBuf;
use std::time::Duration;

use chrono::Utc;
use expo_controller::config::{Config, DbConfig, QueueConfig};
use expo_controller::ids;
use expo_controller::queue::{self, NewBuild, Platform, RegisterRequest, Worker};
use expo_controller::server::{self, Running};
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// The admin URL of the throwaway cluster started by `make test`.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .expect("TEST_DATABASE_URL is not set: run the tests with `make test`, which starts a throwaway PostgreSQL")
}

/// A fresh, migrated database; returns its URL and a pool.
pub async fn fresh_database(pool_size: u32) -> (String, PgPool) {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin_url())
        .await
        .expect("connect admin");
    let name = format!("t_{}", ids::new_id().to_lowercase().replace('-', "_"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .expect("create db");
    admin.close().await;
    let base = admin_url();
    let url = format!("{}/{name}", base.rsplit_once('/').expect("url with a database").0);
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .connect(&url)
        .await
        .expect("connect test db");
    expo_controller::db::migrate(&pool).await.expect("migrate");
    (url, pool)
}

pub const API_KEY: &str = "test-admin-key-0123456789abcdef0123456789";

/// A configuration for a test server on `database_url`.
pub fn config(database_url: &str, storage_dir: PathBuf) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        db: DbConfig {
            db_pool_size: 10,
            ..DbConfig::new(database_url)
        },
        api_key: Some(API_KEY.to_string()),
        storage_dir,
        storage_fsync: false,
        storage: Default::default(),
        certs_key: Some(ids::new_key32()),
        base_image_id: "test-base-image".to_string(),
        max_source_bytes: 1024 * 1024,
        max_certs_bytes: 64 * 1024,
        max_result_bytes: 1024 * 1024,
        submitter_max_running: 0,
        submitter_max_queued: 0,
        max_log_lines: 10_000,
        rate_limit_per_ip: 0,
        rate_limit_per_credential: 0,
        http: Default::default(),
        queue: QueueConfig::default(),
        jobs: Default::default(),
        dashboard: Default::default(),
        events: Default::default(),
        webhooks: Default::default(),
        shutdown_grace_secs: 10,
        log_format: "text".to_string(),
    }
}

/// A running server with its own database and storage directory.
pub struct TestApp {
    pub base: String,
    pub pool: PgPool,
    pub client: reqwest::Client,
    pub storage_dir: PathBuf,
    pub database_url: String,
    owns_storage: bool,
    /// Dropping it aborts the server's tasks.
    running: Option<Running>,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
        let (database_url, pool) = fresh_database(10).await;
        let storage_dir = std::env::temp_dir().join(format!("expo-test-storage-{}", ids::new_id()));
        Self::start(database_url, pool, storage_dir, adjust).await
    }

    /// A second instance on the same database and storage as `other`.
    pub async fn spawn_on(other: &TestApp) -> TestApp {
        Self::spawn_on_with(other, |_| {}).await
    }

    /// [`TestApp::spawn_on`] with its configuration adjusted.
    pub async fn spawn_on_with(other: &TestApp, adjust: impl FnOnce(&mut Config)) -> TestApp {
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .connect(&other.database_url)
            .await
            .expect("connect");
        let mut app = Self::start(other.database_url.clone(), pool, other.storage_dir.clone(), adjust).await;
        app.owns_storage = false;
        app
    }

    async fn start(
        database_url: String,
        pool: PgPool,
        storage_dir: PathBuf,
        adjust: impl FnOnce(&mut Config),
    ) -> TestApp {
        let mut config = config(&database_url, storage_dir.clone());
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let running = server::start(config, Some(listener), false)
            .await
            .expect("start server");
        TestApp {
            base: format!("http://{}", running.addr),
            pool,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            storage_dir,
            database_url,
            owns_storage: true,
            running: Some(running),
        }
    }

    /// Graceful shutdown, as on SIGTERM.
    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Registers a worker over HTTP with the admin key; returns (id, token).
    pub async fn register(&self, name: &str, platforms: &[&str]) -> (String, String) {
        let body: Value = self
            .client
            .post(self.url("/api/workers/register"))
            .header("X-API-Key", API_KEY)
            .json(&serde_json::json!({ "name": name, "capabilities": { "platforms": platforms } }))
            .send()
            .await
            .expect("register")
            .json()
            .await
            .expect("register json");
        (
            body["id"].as_str().expect("id").to_string(),
            body["access_token"].as_str().expect("token").to_string(),
        )
    }

    /// Submits a build over HTTP; returns the answer's JSON.
    pub async fn submit(&self, platform: &str, source: &[u8]) -> Value {
        self.submit_with_key(platform, source, API_KEY).await
    }

    /// Submits a build over HTTP with `key` (a stored key or the admin key); returns the answer's JSON.
    pub async fn submit_with_key(&self, platform: &str, source: &[u8], key: &str) -> Value {
        let form = Form::new()
            .part("source", Part::bytes(source.to_vec()).file_name("app.zip"))
            .text("platform", platform.to_string());
        let response = self
            .client
            .post(self.url("/api/builds/submit"))
            .header("X-API-Key", key)
            .multipart(form)
            .send()
            .await
            .expect("submit");
        assert_eq!(response.status(), 200, "submit failed");
        response.json().await.expect("submit json")
    }

    /// G0 poll with the admin key and `?worker_id=`.
    pub async fn poll(&self, worker_id: &str) -> Value {
        self.client
            .get(self.url("/api/workers/poll"))
            .query(&[("worker_id", worker_id)])
            .header("X-API-Key", API_KEY)
            .send()
            .await
            .expect("poll")
            .json()
            .await
            .expect("poll json")
    }

    /// Posts a submit form to `/api/builds/submit` with the admin key.
    pub async fn submit_form(&self, form: Form) -> reqwest::Response {
        self.client
            .post(self.url("/api/builds/submit"))
            .header("X-API-Key", API_KEY)
            .multipart(form)
            .send()
            .await
            .expect("submit")
    }

    /// Posts a worker report form to `/api/workers/upload` with the admin key.
    pub async fn upload_form(&self, form: Form) -> reqwest::Response {
        self.client
            .post(self.url("/api/workers/upload"))
            .header("X-API-Key", API_KEY)
            .multipart(form)
            .send()
            .await
            .expect("upload")
    }

    /// GET with the admin key; the JSON answer.
    pub async fn admin_json(&self, path: &str) -> Value {
        let response = self
            .client
            .get(self.url(path))
            .header("X-API-Key", API_KEY)
            .send()
            .await
            .expect("get");
        response.json().await.expect("json")
    }

    /// Files under the storage root (relative paths), to prove nothing was left behind.
    pub fn stored_files(&self) -> Vec<String> {
        fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut Vec<String>) {
            let Ok(entries) = std::fs::read_dir(dir) else { return };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, root, out);
                } else if let Ok(rel) = path.strip_prefix(root) {
                    out.push(rel.to_string_lossy().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.storage_dir, &self.storage_dir, &mut out);
        out
    }

    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if self.owns_storage {
            let _ = std::fs::remove_dir_all(&self.storage_dir);
        }
    }
}

/// Inserts a worker directly through the queue layer.
pub async fn worker(pool: &PgPool, name: &str, platforms: &[Platform]) -> Worker {
    let request = RegisterRequest {
        registered_by: None,
        id: None,
        name: name.to_string(),
        capabilities: serde_json::json!({}),
        platforms: platforms.to_vec(),
        caller_worker: None,
    };
    queue::register(pool, &request, &QueueConfig::default(), Utc::now())
        .await
        .expect("register")
        .worker
}

/// Enqueues a build directly (no files) and returns its id.
pub async fn enqueue(pool: &PgPool, platform: Platform, priority: i32, max_attempts: i32) -> String {
    let id = ids::new_id();
    enqueue_with(pool, &id, platform, priority, max_attempts).await;
    id
}

/// Enqueues a build with a chosen id directly (no files).
pub async fn enqueue_as(pool: &PgPool, id: &str, platform: Platform) {
    enqueue_with(pool, id, platform, 0, 3).await;
}

async fn enqueue_with(pool: &PgPool, id: &str, platform: Platform, priority: i32, max_attempts: i32) {
    let new = NewBuild {
        requirements: None,
        submitted_by: None,
        id: id.to_string(),
        platform,
        priority,
        max_attempts,
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
}

/// The status column of a worker.
pub async fn worker_status(pool: &PgPool, id: &str) -> String {
    sqlx::query_scalar("SELECT status FROM workers WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("status")
}

/// The state column of a build.
pub async fn state_of(pool: &PgPool, id: &str) -> String {
    sqlx::query_scalar("SELECT state FROM builds WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("state")
}

/// Sends one raw HTTP/1.1 request (for paths an HTTP client would normalise) and returns the status.
pub async fn raw_status(base: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line")
}

/// A G0 success report: `build_id`, `worker_id`, `success=true` and the `result` file.
pub fn success_form(build_id: &str, worker_id: &str, result: &[u8]) -> Form {
    Form::new()
        .text("build_id", build_id.to_string())
        .text("worker_id", worker_id.to_string())
        .text("success", "true")
        .part("result", Part::bytes(result.to_vec()).file_name("app.bin"))
}

/// A free loopback port for a server started later, below the ephemeral range (32768+): a port from
/// that range can be taken by any outgoing connection between this check and the server's bind (or
/// while a test restarts its PostgreSQL). Ports are handed out in turn from a per-process random start
/// in 12000..30000, each checked bindable, so concurrent tests never get the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 12_000;
    const SPAN: u32 = 18_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = (std::process::id().wrapping_mul(7_919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()))
        % SPAN;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN)
}

/// `expo-controller serve` on `port` with the test key, `certs_key` and `storage`; the caller adds
/// environment and stdio.
pub fn serve_command(
    database_url: &str,
    storage: &std::path::Path,
    port: u16,
    certs_key: &str,
) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_expo-controller"));
    command
        .arg("serve")
        .env("DATABASE_URL", database_url)
        .env("CONTROLLER_API_KEY", API_KEY)
        .env("CONTROLLER_CERTS_KEY", certs_key)
        .env("CONTROLLER_LISTEN", format!("127.0.0.1:{port}"))
        .env("CONTROLLER_STORAGE_DIR", storage)
        .stderr(std::process::Stdio::null());
    command
}

/// Waits (at most 20 s) until `base/ready` answers 200.
pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{base}/ready")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("controller at {base} did not become ready");
}
