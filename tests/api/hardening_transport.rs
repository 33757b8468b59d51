//! Issue #8, transport half: credentials before bytes (R41), bounded multipart (R42), connection
//! timeouts (R43), durable commits (R55), the admin key's own rate limit (R56), no secrets in
//! `--help` or logs (R57).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{self, API_KEY, TestApp};

const MIB: u64 = 1024 * 1024;
const BOUNDARY: &str = "hardeningBoundary7MA4YWxk";

/// What became of a request whose body the client kept streaming.
struct Sent {
    status: Option<u16>,
    /// Body bytes the client had written when the answer (or the end of the connection) arrived.
    body_bytes_sent: u64,
}

/// Sends `POST path` with `headers`, a multipart body of `total` bytes that starts with `prefix` and
/// continues with `filler`, written as fast as the server takes it. Stops at the first answer (or
/// when the server closes the connection) and reports how much of the body had been sent by then.
async fn stream_body(base: &str, path: &str, headers: &[(&str, &str)], prefix: &[u8], filler: u8, total: u64) -> Sent {
    let addr = base.trim_start_matches("http://");
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n\
         Content-Length: {total}\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    writer.write_all(head.as_bytes()).await.expect("write head");
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let prefix = prefix.to_vec();
    let write = tokio::spawn(async move {
        if writer.write_all(&prefix).await.is_err() {
            return;
        }
        counter.fetch_add(prefix.len() as u64, Ordering::SeqCst);
        let chunk = vec![filler; 64 * 1024];
        let mut left = total - prefix.len() as u64;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if writer.write_all(&chunk[..n]).await.is_err() {
                return;
            }
            counter.fetch_add(n as u64, Ordering::SeqCst);
            left -= n as u64;
        }
        // Keep the write half open until the test is done with the connection.
        std::future::pending::<()>().await;
    });
    let status = tokio::time::timeout(Duration::from_secs(120), response_status(&mut reader))
        .await
        .expect("the server answered or closed within 120 s");
    let body_bytes_sent = sent.load(Ordering::SeqCst);
    write.abort();
    Sent {
        status,
        body_bytes_sent,
    }
}

/// The opening of a file part whose body follows.
fn file_part_prefix(name: &str) -> Vec<u8> {
    format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"app.ipa\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes()
}

/// R41: a bogus worker or VM token on an upload route is refused before the body is read: a 300 MiB
/// body gets 401 after (almost) nothing of it was sent, and nothing reaches staging.
#[tokio::test]
async fn r41_upload_routes_authenticate_before_reading_the_body() {
    let app = TestApp::spawn_with(|c| c.max_result_bytes = 1024 * MIB).await;
    let cases: [(&str, &str, &str); 4] = [
        ("/api/workers/upload", "X-Worker-Token", "bogus-worker-token"),
        ("/api/workers/result", "X-Worker-Token", "bogus-worker-token"),
        ("/api/workers/upload", "X-VM-Token", "bogus-vm-token"),
        ("/api/workers/result", "X-VM-Token", "bogus-vm-token"),
    ];
    for (path, header, token) in cases {
        let sent = stream_body(
            &app.base,
            path,
            &[(header, token)],
            &file_part_prefix("result"),
            0,
            300 * MIB,
        )
        .await;
        assert!(
            sent.body_bytes_sent < 32 * MIB,
            "{path} with {header}: {} MiB of the body were taken before the answer",
            sent.body_bytes_sent / MIB
        );
        assert_eq!(sent.status, Some(401), "{path} with {header}");
        assert!(app.stored_files().is_empty(), "{:?}", app.stored_files());
    }
    // A valid worker token still uploads.
    let (worker_id, token) = app.register("w", &["ios"]).await;
    let build = app.submit("ios", b"source").await;
    let build_id = build["id"].as_str().unwrap().to_string();
    let job = app.poll(&worker_id).await;
    assert_eq!(job["job"]["id"], build_id.as_str());
    let r = app
        .client
        .post(app.url("/api/workers/upload"))
        .header("X-Worker-Token", &token)
        .multipart(support::success_form(&build_id, &worker_id, b"artifact"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(support::state_of(&app.pool, &build_id).await, "completed");
}

/// Peak resident set size of a process (VmHWM), in bytes: growth shows even when the memory was
/// freed again before it was measured.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

/// A controller binary of its own, so that its memory can be measured alone.
struct Spawned {
    child: std::process::Child,
    base: String,
    _storage: tempdir::Dir,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn spawn_binary(envs: &[(&str, &str)]) -> Spawned {
    let (url, _pool) = support::fresh_database(1).await;
    let storage = tempdir::Dir(std::env::temp_dir().join(format!("expo-hardening-{}", expo_controller::ids::new_id())));
    let port = support::free_port();
    let mut command = support::serve_command(&url, &storage.0, port, &expo_controller::ids::new_key32());
    command.envs(envs.iter().copied());
    let child = command.spawn().expect("spawn controller");
    let base = format!("http://127.0.0.1:{port}");
    let spawned = Spawned {
        child,
        base,
        _storage: storage,
    };
    support::wait_ready(&reqwest::Client::new(), &spawned.base).await;
    spawned
}

/// R42: a part header that never ends is refused at once with 413, on an authenticated route and on
/// an upload route with a bogus token; the server's memory does not grow with the bytes sent.
#[tokio::test]
async fn r42_endless_part_headers_are_bounded() {
    let server = spawn_binary(&[]).await;
    let pid = server.child.id();
    let endless_header = format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"source\"; filename=\"");
    let before = peak_rss_bytes(pid);
    let cases: [(&str, (&str, &str), u16); 2] = [
        ("/api/builds/submit", ("X-API-Key", API_KEY), 413),
        ("/api/workers/upload", ("X-Worker-Token", "bogus-worker-token"), 401),
    ];
    for (path, header, expected) in cases {
        let sent = stream_body(
            &server.base,
            path,
            &[header],
            endless_header.as_bytes(),
            b'a',
            200 * MIB,
        )
        .await;
        let after = peak_rss_bytes(pid);
        eprintln!(
            "{path}: peak RSS {} -> {} KiB; {} KiB of the body taken before the answer",
            before / 1024,
            after / 1024,
            sent.body_bytes_sent / 1024
        );
        assert!(
            after < before + 32 * MIB,
            "{path}: peak RSS grew from {} MiB to {} MiB",
            before / MIB,
            after / MIB
        );
        assert!(
            sent.body_bytes_sent < 32 * MIB,
            "{path}: {} MiB were taken before the answer",
            sent.body_bytes_sent / MIB
        );
        assert_eq!(sent.status, Some(expected), "{path}");
    }
    // The answer names the limit.
    let client = reqwest::Client::new();
    let mut body = endless_header.into_bytes();
    body.extend(std::iter::repeat_n(b'a', 64 * 1024));
    let r = client
        .post(format!("{}/api/builds/submit", server.base))
        .header("X-API-Key", API_KEY)
        .header("Content-Type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        serde_json::json!({ "error": "Multipart part headers too large" })
    );
}

/// R42: more parts than allowed is 400 at once, even when the parts are ignored ones.
#[tokio::test]
async fn r42_too_many_parts_are_refused() {
    let app = TestApp::spawn().await;
    let mut form = reqwest::multipart::Form::new().text("platform", "ios");
    for i in 0..200 {
        form = form.text(format!("unknown{i}"), "x");
    }
    let r = app.submit_form(form).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        serde_json::json!({ "error": "Too many multipart parts" })
    );
    assert_eq!(app.count("builds").await, 0);
}

/// Waits (at most `limit`) until the server ends the connection; returns how long that took.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buffer = [0u8; 1024];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection was still open after {limit:?}");
    started.elapsed()
}

async fn short_timeouts() -> TestApp {
    TestApp::spawn_with(|c| {
        c.http.header_timeout_secs = 1;
        c.http.body_read_timeout_secs = 1;
    })
    .await
}

/// R43: a connection that sends nothing, or trickles its request head, is closed after the header
/// timeout; so is a kept-alive connection that goes idle.
#[tokio::test]
async fn r43_silent_trickling_and_idle_connections_are_closed() {
    let app = short_timeouts().await;
    let addr = app.base.trim_start_matches("http://").to_string();

    let mut silent = TcpStream::connect(&addr).await.unwrap();
    closed_within(&mut silent, Duration::from_secs(10)).await;

    let mut trickling = TcpStream::connect(&addr).await.unwrap();
    trickling
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (mut reader, mut writer) = trickling.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            if writer.write_all(b"X").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let started = Instant::now();
    let mut buffer = [0u8; 256];
    let ended = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "a trickled head kept its connection open");
    assert!(started.elapsed() < Duration::from_secs(8));
    trickle.abort();

    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = idle.read(&mut buffer).await.unwrap();
        assert!(n > 0, "closed before answering");
        response.extend_from_slice(&buffer[..n]);
    }
    assert!(response.starts_with(b"HTTP/1.1 200"));
    closed_within(&mut idle, Duration::from_secs(10)).await;
}

/// R43: an upload whose body stops arriving is cut after the body read timeout.
#[tokio::test]
async fn r43_stalled_upload_is_cut() {
    let app = short_timeouts().await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let prefix = file_part_prefix("source");
    let head = format!(
        "POST /api/builds/submit HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n\
         Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {}\r\n\r\n",
        prefix.len() + 100_000
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&prefix).await.unwrap();
    stream.write_all(&[0u8; 1000]).await.unwrap();
    // ... and nothing more: the server answers (400) or closes within the timeout, not never.
    closed_within(&mut stream, Duration::from_secs(10)).await;
    assert!(app.stored_files().is_empty(), "{:?}", app.stored_files());
    assert_eq!(app.count("builds").await, 0);
}

/// R43: a slow upload that keeps making progress is never cut, though it lasts longer than both
/// timeouts.
#[tokio::test]
async fn r43_slow_but_steady_upload_completes() {
    let app = short_timeouts().await;
    let source = vec![7u8; 256 * 1024];
    let mut body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"platform\"\r\n\r\nios\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"source\"; filename=\"app.zip\"\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&source);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body.chunks(8 * 1024).map(|c| Ok(c.to_vec())).collect();
    let length = body.len();
    let slow = futures_util::StreamExt::then(futures_util::stream::iter(chunks), |chunk| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        chunk
    });
    let started = Instant::now();
    let r = app
        .client
        .post(app.url("/api/builds/submit"))
        .header("X-API-Key", API_KEY)
        .header("Content-Type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .header("Content-Length", length)
        .body(reqwest::Body::wrap_stream(slow))
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() > Duration::from_secs(2), "the upload was not slow");
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(app.count("builds").await, 1);
}

/// R55: the server's connections commit synchronously even on a cluster configured with
/// `synchronous_commit=off` (as the test cluster is); the opt-out is explicit.
#[tokio::test]
async fn r55_controller_connections_commit_synchronously() {
    let app = TestApp::spawn().await;
    let cluster: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        cluster, "off",
        "the test cluster is expected to run with synchronous_commit=off"
    );
    assert!(default_config().db.db_synchronous_commit, "on by default");
    for (value, expected) in [("off", false), ("false", false), ("on", true), ("true", true)] {
        let parsed = parse_config(&["--db-synchronous-commit", value]);
        assert_eq!(parsed.db.db_synchronous_commit, expected, "{value}");
    }
    let pool = expo_controller::db::connect(&expo_controller::config::DbConfig::new(&app.database_url))
        .await
        .unwrap();
    let setting: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(setting, "on");
    let opted_out = expo_controller::config::DbConfig {
        db_synchronous_commit: false,
        ..expo_controller::config::DbConfig::new(&app.database_url)
    };
    let pool = expo_controller::db::connect(&opted_out).await.unwrap();
    let setting: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(setting, "off");
}

/// Sends `count` GETs of `path` with `header` from `client`, 32 at a time; returns the statuses.
async fn burst(client: &reqwest::Client, url: &str, header: (&str, &str), count: usize) -> Vec<u16> {
    use futures_util::StreamExt;
    futures_util::stream::iter(0..count)
        .map(|_| {
            let request = client.get(url).header(header.0, header.1);
            async move { request.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
        })
        .buffer_unordered(32)
        .collect()
        .await
}

/// The configuration `expo-controller serve` would have with `args` (and defaults for the rest).
fn parse_config(args: &[&str]) -> expo_controller::config::Config {
    use clap::Parser;
    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        config: expo_controller::config::Config,
    }
    let all = ["serve", "--database-url", "postgres://unused/db"].iter().chain(args);
    Serve::try_parse_from(all).expect("arguments parse").config
}

fn default_config() -> expo_controller::config::Config {
    parse_config(&[])
}

/// A client whose requests come from `ip` (another client, for the per-IP limit).
fn client_from(ip: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(ip))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// R56: with the default limits, a burst of admin requests is not refused, while a worker token
/// (and a wrong admin key) still is limited.
#[tokio::test]
async fn r56_admin_key_is_not_limited_like_a_worker_token() {
    let defaults = default_config();
    let app = TestApp::spawn_with(|c| {
        c.rate_limit_per_ip = defaults.rate_limit_per_ip;
        c.rate_limit_per_credential = defaults.rate_limit_per_credential;
        c.http = defaults.http.clone();
    })
    .await;
    assert!(
        defaults.rate_limit_per_credential > 0 && defaults.rate_limit_per_ip >= 2 * defaults.rate_limit_per_credential
    );
    let url = app.url("/health");
    let admin = burst(&client_from([127, 0, 0, 1]), &url, ("X-API-Key", API_KEY), 1_200).await;
    let refused = admin.iter().filter(|s| **s != 200).count();
    assert_eq!(refused, 0, "{refused} of 1,200 admin requests were refused");
    // A wrong key is just another credential, limited as such. (Each burst comes from its own
    // address, so that only the per-credential limit can refuse it.)
    let wrong_key = ("X-API-Key", "not-the-admin-key-but-long-enough-1234");
    let wrong = burst(&client_from([127, 0, 0, 2]), &url, wrong_key, 3_000).await;
    assert!(wrong.contains(&429), "a wrong admin key was not limited");
    let (_, token) = app.register("w", &["ios"]).await;
    let worker = burst(&client_from([127, 0, 0, 3]), &url, ("X-Worker-Token", &token), 3_000).await;
    assert!(worker.contains(&429), "a worker token was not limited");
}

/// R57: `--help` never prints the database password (nor the keys), and start-up logs redact it.
#[tokio::test]
async fn r57_help_and_logs_hide_secrets() {
    let url = "postgres://expo:hunter2-db-password@127.0.0.1:1/expo";
    for args in [&["serve", "--help"][..], &["migrate", "--help"], &["builds", "--help"]] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_expo-controller"))
            .args(args)
            .env("DATABASE_URL", url)
            .env("CONTROLLER_API_KEY", API_KEY)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(text.contains("DATABASE_URL"), "{args:?}: {text}");
        assert!(
            !text.contains("hunter2-db-password"),
            "{args:?} shows the password: {text}"
        );
        assert!(!text.contains(API_KEY), "{args:?} shows the admin key: {text}");
    }
    // A start that fails to reach the database logs the URL without its password.
    let storage = std::env::temp_dir().join(format!("expo-r57-{}", expo_controller::ids::new_id()));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_expo-controller"))
        .arg("serve")
        .env("DATABASE_URL", url)
        .env("CONTROLLER_API_KEY", API_KEY)
        .env("CONTROLLER_CERTS_KEY", expo_controller::ids::new_key32())
        .env("CONTROLLER_LISTEN", format!("127.0.0.1:{}", support::free_port()))
        .env("CONTROLLER_STORAGE_DIR", &storage)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&storage);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success());
    assert!(text.contains("postgres://expo:***@127.0.0.1:1/expo"), "{text}");
    assert!(
        !text.contains("hunter2-db-password"),
        "the log shows the password: {text}"
    );
}

/// R43: the header timeout covers only the wait for a request head: a long poll held longer than it,
/// and the next request on the same connection, are answered.
#[tokio::test]
async fn r43_long_polls_outlast_the_header_timeout() {
    let app = short_timeouts().await;
    let (_, token) = app.register("w", &["ios"]).await;
    for _ in 0..2 {
        let started = Instant::now();
        let r = app
            .client
            .get(app.url("/api/workers/poll?wait=3"))
            .header("X-Worker-Token", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["job"], Value::Null);
        assert!(started.elapsed() >= Duration::from_secs(3));
    }
}

/// Sends `POST path` declaring a `declared`-byte JSON body but writing only its first `written` bytes,
/// then waits (5 s at most) for an answer: the status, or `None` when the server still waits for the rest.
async fn answer_to_partial_body(
    base: &str,
    path: &str,
    headers: &[(&str, &str)],
    declared: u64,
    written: usize,
) -> Option<u16> {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("write head");
    let _ = stream.write_all(&vec![b' '; written]).await;
    tokio::time::timeout(Duration::from_secs(5), response_status(&mut stream))
        .await
        .unwrap_or(None)
}

/// The status of the HTTP response read from `reader`, or `None` when the connection ends first.
async fn response_status(reader: &mut (impl AsyncReadExt + Unpin)) -> Option<u16> {
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => response.extend_from_slice(&buffer[..n]),
        }
        if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&response[..end]);
            return head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
        }
    }
}

/// R41 for the build-scoped reports (logs, heartbeat, telemetry): a stranger's credential is refused
/// before the body is read — the answer comes while most of a declared 1.5 MB body was never sent — and
/// the public OTP exchange reads at most 4 KiB.
#[tokio::test]
async fn r41_build_reports_authenticate_before_reading_the_body() {
    let app = TestApp::spawn().await;
    let build_id = app.submit("ios", b"source").await["id"].as_str().unwrap().to_string();
    let (worker_id, _) = app.register("w", &["ios"]).await;
    assert_eq!(app.poll(&worker_id).await["job"]["id"], build_id.as_str());
    let strangers: [(&[(&str, &str)], u16); 4] = [
        (&[("X-Worker-Id", worker_id.as_str()), ("X-API-Key", "wrong-key")], 403),
        (&[("X-Worker-Token", "bogus-worker-token")], 401),
        (&[("X-VM-Token", "bogus-vm-token")], 401),
        (&[("X-Worker-Id", "someone-else")], 401),
    ];
    for report in ["logs", "heartbeat", "telemetry"] {
        let path = format!("/api/builds/{build_id}/{report}");
        for (headers, expected) in strangers {
            let status = answer_to_partial_body(&app.base, &path, headers, 1_500_000, 64 * 1024).await;
            assert_eq!(
                status,
                Some(expected),
                "{report} with {headers:?}: refused before the body"
            );
        }
    }
    // The holder still reports, and an oversized report from the holder is 413.
    let holder = [("X-Worker-Id", worker_id.as_str()), ("X-API-Key", API_KEY)];
    let heartbeat = format!("/api/builds/{build_id}/heartbeat");
    let r = app
        .client
        .post(app.url(&heartbeat))
        .headers(header_map(&holder))
        .json(&serde_json::json!({ "progress": 10 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .client
        .post(app.url(&heartbeat))
        .headers(header_map(&holder))
        .header("Content-Type", "application/json")
        .body(format!("{{\"stage\": \"{}\"}}", "x".repeat(100 * 1024)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let otp = format!("/api/builds/{build_id}/authenticate");
    let status = answer_to_partial_body(&app.base, &otp, &[], 1_500_000, 16 * 1024).await;
    assert_eq!(status, Some(413), "the OTP exchange reads at most 4 KiB");
}

fn header_map(headers: &[(&str, &str)]) -> reqwest::header::HeaderMap {
    let mut map = reqwest::header::HeaderMap::new();
    for (name, value) in headers {
        map.insert(
            reqwest::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    map
}

/// Writes `head` then trickles `body` a byte every 200 ms; returns how long the server took to answer
/// or close (`None`: still waiting after 8 s, the trickle then had ~40 bytes to go).
async fn trickled_body_cut_after(base: &str, head: String, body: Vec<u8>) -> Option<Duration> {
    trickled_body_answer(base, head, body).await.0
}

/// [`trickled_body_cut_after`], with what the server wrote before closing.
async fn trickled_body_answer(base: &str, head: String, body: Vec<u8>) -> (Option<Duration>, String) {
    let addr = base.trim_start_matches("http://");
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    writer.write_all(head.as_bytes()).await.expect("head");
    let trickle = tokio::spawn(async move {
        for byte in body {
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Keep the connection open (never finish the request) until the test ends.
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    let started = Instant::now();
    let mut buffer = [0u8; 1024];
    let mut answer = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    trickle.abort();
    (
        ended.ok().map(|()| started.elapsed()),
        String::from_utf8_lossy(&answer).into_owned(),
    )
}

/// T1: declaring a large body does not buy a trickle: the first 64 KiB of any body must arrive within
/// the header timeout, so an OTP exchange declaring 100,000 bytes and sending a byte every 200 ms is cut
/// (before, the deadline was armed only for a declared length of at most 64 KiB); a body cut by the
/// deadline is answered 408 by every extractor (the sign-in form read as bytes was 400).
#[tokio::test]
async fn t1_a_large_declared_length_does_not_escape_the_small_body_deadline() {
    let app = short_timeouts().await;
    let build_id = app.submit("ios", b"source").await["id"].as_str().unwrap().to_string();
    let otp = br#"{"otp":"0123456789012345678901234567890123456789"}"#.to_vec();
    let head = format!(
        "POST /api/builds/{build_id}/authenticate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 100000\r\n\r\n"
    );
    let (cut, answer) = trickled_body_answer(&app.base, head, otp).await;
    assert!(
        cut.is_some_and(|t| t < Duration::from_secs(5)),
        "a trickled OTP body declaring 100000 bytes held its connection ({cut:?})"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    let form = format!("key={}", "k".repeat(60)).into_bytes();
    let head = format!(
        "POST /dashboard/login HTTP/1.1\r\nHost: x\r\nOrigin: {}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
        app.base,
        form.len()
    );
    let (cut, answer) = trickled_body_answer(&app.base, head, form).await;
    assert!(cut.is_some_and(|t| t < Duration::from_secs(5)), "{cut:?}");
    assert!(answer.starts_with("HTTP/1.1 408"), "a late sign-in form: {answer}");
}

/// T1: a body trickled a byte at a time to the routes that read before any credential (OTP exchange,
/// dashboard sign-in) is cut once the header timeout after its head has passed, although each byte
/// arrives well within the body read timeout; rule-4 telemetry (ids only) checks the hold before it reads.
#[tokio::test]
async fn t1_trickled_bodies_and_keyless_telemetry_do_not_hold_connections() {
    let app = short_timeouts().await;
    let build_id = app.submit("ios", b"source").await["id"].as_str().unwrap().to_string();
    let (worker_id, _) = app.register("w", &["ios"]).await;
    assert_eq!(app.poll(&worker_id).await["job"]["id"], build_id.as_str());

    let otp = br#"{"otp":"0123456789012345678901234567890123456789"}"#.to_vec();
    let head = format!(
        "POST /api/builds/{build_id}/authenticate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        otp.len() + 20
    );
    let cut = trickled_body_cut_after(&app.base, head, otp).await;
    assert!(
        cut.is_some_and(|t| t < Duration::from_secs(5)),
        "a trickled OTP body held its connection ({cut:?})"
    );

    let form = format!("key={}", "k".repeat(60)).into_bytes();
    let head = format!(
        "POST /dashboard/login HTTP/1.1\r\nHost: x\r\nOrigin: {}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
        app.base,
        form.len()
    );
    let cut = trickled_body_cut_after(&app.base, head, form).await;
    assert!(
        cut.is_some_and(|t| t < Duration::from_secs(5)),
        "a trickled sign-in held its connection ({cut:?})"
    );

    // Rule 4 names a worker and a build, no secret: a stranger is refused before its body is read.
    let telemetry = format!("/api/builds/{build_id}/telemetry");
    let stranger = [
        ("X-Worker-Id", "someoneElse000000000"),
        ("X-Build-Id", build_id.as_str()),
    ];
    let status = answer_to_partial_body(&app.base, &telemetry, &stranger, 10_000, 10).await;
    assert_eq!(
        status,
        Some(403),
        "keyless telemetry of a build the worker does not hold"
    );
    // The holder's keyless telemetry still works.
    let r = app
        .client
        .post(app.url(&telemetry))
        .header("X-Worker-Id", &worker_id)
        .header("X-Build-Id", &build_id)
        .json(&serde_json::json!({ "type": "cpu_snapshot", "data": { "cpu_percent": 50, "memory_mb": 10 } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// T1: a client that sends requests but never reads the answers is cut once the server could write
/// nothing for `CONTROLLER_WRITE_TIMEOUT_SECS`, instead of holding the connection and its buffers.
#[tokio::test]
async fn t1_a_client_that_never_reads_is_cut() {
    let app = TestApp::spawn_with(|c| {
        c.http.header_timeout_secs = 30;
        c.http.write_timeout_secs = 1;
    })
    .await;
    let document = app.client.get(app.url("/api/v2/openapi.json")).send().await.unwrap();
    let size = document.bytes().await.unwrap().len() as u64;
    let requests: u64 = (64 * MIB / size).max(200);
    let addr = app.base.trim_start_matches("http://").to_string();
    let stream = TcpStream::connect(&addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let sender = tokio::spawn(async move {
        let request = b"GET /api/v2/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n";
        for _ in 0..requests {
            if writer.write_all(request).await.is_err() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    // Read nothing while the server's writes stall past the write timeout, then drain what was sent.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut received = 0u64;
    let mut buffer = vec![0u8; 256 * 1024];
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match reader.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n as u64,
            }
        }
    })
    .await;
    sender.abort();
    assert!(drained.is_ok(), "the connection stayed open");
    assert!(
        received < requests * size / 2,
        "the server kept answering a client that did not read: {received} of {} bytes",
        requests * size
    );
    // The server itself is fine.
    let health = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

/// T9: when the form names the build and the caller before the file, a caller that does not hold the
/// build is refused before the file is read: 403 while most of a 300 MiB result was never sent, and
/// nothing staged (before, the file streamed to staging up to the size limit first).
#[tokio::test]
async fn t9_the_hold_is_checked_before_the_result_file_is_read() {
    let app = TestApp::spawn_with(|c| c.max_result_bytes = 1024 * MIB).await;
    let build_id = app.submit("ios", b"source").await["id"].as_str().unwrap().to_string();
    let (holder, _) = app.register("holder", &["ios"]).await;
    let (stranger, stranger_token) = app.register("stranger", &["ios"]).await;
    assert_eq!(app.poll(&holder).await["job"]["id"], build_id.as_str());
    let field = |name: &str, value: &str| {
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
    };
    let cases: [(&[(&str, &str)], String); 2] = [
        (
            &[("X-API-Key", API_KEY)],
            field("build_id", &build_id) + &field("worker_id", &stranger) + &field("success", "true"),
        ),
        (
            &[("X-Worker-Token", stranger_token.as_str())],
            field("build_id", &build_id) + &field("success", "true"),
        ),
    ];
    for (headers, fields) in cases {
        let mut prefix = fields.into_bytes();
        prefix.extend_from_slice(&file_part_prefix("result"));
        let sent = stream_body(&app.base, "/api/workers/upload", headers, &prefix, 0, 300 * MIB).await;
        assert_eq!(sent.status, Some(403), "{headers:?}");
        assert!(
            sent.body_bytes_sent < 32 * MIB,
            "{} MiB were taken before the refusal",
            sent.body_bytes_sent / MIB
        );
        assert!(
            app.stored_files().iter().all(|f| !f.contains("staging")),
            "{:?}",
            app.stored_files()
        );
    }
    assert_eq!(support::state_of(&app.pool, &build_id).await, "assigned");
    let r = app
        .upload_form(support::success_form(&build_id, &holder, b"artifact"))
        .await;
    assert_eq!(r.status(), 200, "the holder still uploads");
}

/// T13 (and the new settings): presigned URLs are short-lived (at most an hour: a longer configured
/// lifetime, allowed before, is clamped rather than refusing to start), and the new limits have their
/// documented defaults and refuse nonsense.
#[test]
fn t13_presigned_urls_are_short_lived_and_new_limits_are_checked() {
    let defaults = default_config();
    assert_eq!(defaults.http.write_timeout_secs, 60);
    assert_eq!(defaults.queue.max_samples_per_build, 2_000);
    assert_eq!(defaults.queue.max_retries_per_build, 10);
    let problems = |args: &[&str]| match parse_config(args).validate() {
        Ok(_) => String::new(),
        Err(problems) => problems.to_string(),
    };
    let day = [
        "--api-key",
        "0123456789abcdef0123456789abcdef01234567",
        "--storage-url",
        "s3://bucket",
        "--presign-downloads",
        "true",
        "--presign-ttl-secs",
        "86400",
    ];
    // A lifetime above an hour (allowed before the bound) still starts, clamped to an hour.
    assert!(!problems(&day).contains("PRESIGN"), "{}", problems(&day));
    assert_eq!(parse_config(&day).storage.effective_presign_ttl_secs(), 3600);
    let mut zero = day;
    zero[7] = "0";
    assert!(
        problems(&zero).contains("CONTROLLER_PRESIGN_TTL_SECS must be positive"),
        "{}",
        problems(&zero)
    );
    for zero in [
        "--write-timeout-secs",
        "--max-samples-per-build",
        "--max-retries-per-build",
    ] {
        let args = ["--api-key", "0123456789abcdef0123456789abcdef01234567", zero, "0"];
        assert!(
            problems(&args).contains(&zero[2..].to_uppercase().replace('-', "_")),
            "{zero}: {}",
            problems(&args)
        );
    }
}
