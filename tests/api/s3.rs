//! S3-compatible artifact storage (issue #10), against a real S3 server — `s3s-fs` from crates.io,
//! started here on loopback (`make test` installs it; `S3S_FS_BIN` names it) — and controller
//! processes configured through `CONTROLLER_STORAGE_URL` and the standard `AWS_*` variables.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use expo_controller::ids;
use reqwest::multipart::{Form, Part};
use serde_json::Value;

use crate::support::{API_KEY, free_port, fresh_database, serve_command, success_form};

const ACCESS_KEY: &str = "expo-test-access";
const SECRET_KEY: &str = "expo-test-secret-0123456789";
pub const BUCKET: &str = "artifacts";
/// Every controller here stores under this prefix of the bucket.
pub const PREFIX: &str = "ci";

/// Where the S3 test server binary is: `S3S_FS_BIN`, else the path `scripts/s3s-fs.sh` installs to.
/// Absent, the test fails (never skips): run it through `make test`.
fn s3s_fs_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("S3S_FS_BIN") {
        return PathBuf::from(path);
    }
    let installed =
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/expo-controller-tools/bin/s3s-fs");
    assert!(
        installed.is_file(),
        "the S3-compatible test server s3s-fs was not found: run the tests with `make test` \
         (scripts/s3s-fs.sh installs it from crates.io) or set S3S_FS_BIN"
    );
    installed
}

/// Waits (bounded) until `condition` holds.
async fn eventually(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

/// An s3s-fs process serving `root` on a loopback port.
pub struct S3Server {
    root: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl S3Server {
    pub async fn start() -> S3Server {
        let root = std::env::temp_dir().join(format!("expo-s3-{}", ids::new_id()));
        std::fs::create_dir_all(root.join(BUCKET)).expect("bucket dir");
        let mut server = S3Server {
            root,
            port: free_port(),
            child: None,
        };
        server.restart().await;
        server
    }

    /// (Re)starts the server on the same port and data.
    pub async fn restart(&mut self) {
        let child = Command::new(s3s_fs_binary())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start on {addr}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Stops the server at once (SIGKILL), as a crashed or unreachable store.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment a controller (or any S3 client) needs for this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
        ]
    }

    /// Keys of the stored objects under the controllers' prefix (read from the server's data).
    pub fn objects(&self) -> Vec<String> {
        fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
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
        let base = self.root.join(BUCKET).join(PREFIX);
        let mut out = Vec::new();
        walk(&base, &base, &mut out);
        out.sort();
        out
    }

    /// The bytes of a stored object.
    pub fn object(&self, key: &str) -> Vec<u8> {
        std::fs::read(self.root.join(BUCKET).join(PREFIX).join(key)).expect("stored object")
    }

    /// Open (neither completed nor aborted) multipart uploads. s3s-fs does not implement
    /// ListMultipartUploads; it keeps each open upload as `.upload-<id>.json` (and its parts as
    /// `.upload_id-<id>.part-<n>`) in its data root, so those files are the list.
    pub fn open_uploads(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .filter(|name| name.starts_with(".upload"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// An `expo-controller serve` process on S3 storage, with its own (unused) local directory, as on its
/// own host.
pub struct Controller {
    pub base: String,
    pub storage_dir: PathBuf,
    child: Child,
}

impl Controller {
    pub async fn start(database_url: &str, s3: &S3Server, certs_key: &str, extra: &[(&str, &str)]) -> Controller {
        let storage_dir = std::env::temp_dir().join(format!("expo-s3-host-{}", ids::new_id()));
        let port = free_port();
        let mut command = serve_command(database_url, &storage_dir, port, certs_key);
        command
            .env("CONTROLLER_STORAGE_URL", format!("s3://{BUCKET}/{PREFIX}"))
            .env("CONTROLLER_MAX_SOURCE_BYTES", (16 * 1024 * 1024).to_string())
            .env("CONTROLLER_MAX_RESULT_BYTES", (16 * 1024 * 1024).to_string())
            .env("CONTROLLER_RATE_LIMIT_PER_IP", "0")
            .env("CONTROLLER_RATE_LIMIT_PER_CREDENTIAL", "0");
        for (name, value) in s3.env() {
            command.env(name, value);
        }
        for (name, value) in extra {
            command.env(name, value);
        }
        let child = command.spawn().expect("spawn controller");
        let base = format!("http://127.0.0.1:{port}");
        crate::support::wait_ready(&client(), &base).await;
        Controller {
            base,
            storage_dir,
            child,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.storage_dir);
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed as u32) as u8)
        .collect()
}

async fn submit(c: &Controller, source: &[u8], certs: Option<&[u8]>) -> (String, String) {
    let mut form = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(source.to_vec()).file_name("app.zip"));
    if let Some(certs) = certs {
        form = form.part("certs", Part::bytes(certs.to_vec()).file_name("dist.p12"));
    }
    let r = client()
        .post(c.url("/api/builds/submit"))
        .header("X-API-Key", API_KEY)
        .multipart(form)
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status(), 200, "submit");
    let body: Value = r.json().await.expect("json");
    (
        body["id"].as_str().expect("id").to_string(),
        body["access_token"].as_str().expect("token").to_string(),
    )
}

async fn register(c: &Controller) -> String {
    let body: Value = client()
        .post(c.url("/api/workers/register"))
        .header("X-API-Key", API_KEY)
        .json(&serde_json::json!({ "name": "mac", "capabilities": { "platforms": ["ios"] } }))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("json");
    body["id"].as_str().expect("id").to_string()
}

async fn poll(c: &Controller, worker: &str) -> Value {
    client()
        .get(c.url("/api/workers/poll"))
        .query(&[("worker_id", worker)])
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .expect("poll")
        .json()
        .await
        .expect("json")
}

async fn upload_result(c: &Controller, build: &str, worker: &str, result: &[u8]) -> reqwest::Response {
    client()
        .post(c.url("/api/workers/upload"))
        .header("X-API-Key", API_KEY)
        .multipart(success_form(build, worker, result))
        .send()
        .await
        .expect("upload")
}

/// An oversized upload was refused: 413, or — when the server answered and closed the connection while
/// the client was still writing the rest of the body — a cut connection (the client never reads the 413
/// then). What the store and the database hold afterwards is what the tests check.
fn assert_refused_as_too_large(sent: reqwest::Result<reqwest::Response>) {
    match sent {
        Ok(r) => assert_eq!(r.status(), 413),
        Err(error) => assert!(
            error.is_request() || error.is_body(),
            "neither a 413 nor a connection cut while sending: {error:?}"
        ),
    }
}

async fn get_bytes(request: reqwest::RequestBuilder) -> (u16, Bytes) {
    let r = request.send().await.expect("get");
    let status = r.status().as_u16();
    (status, r.bytes().await.expect("body"))
}

/// A submitted build, claimed by a worker and completed with `result`, all on `c`.
async fn completed_build(c: &Controller, source: &[u8], result: &[u8]) -> (String, String) {
    let (id, token) = submit(c, source, None).await;
    let worker = register(c).await;
    assert_eq!(poll(c, &worker).await["job"]["id"], id.as_str());
    assert_eq!(upload_result(c, &id, &worker, result).await.status(), 200);
    (id, token)
}

#[tokio::test]
async fn two_instances_on_one_bucket_serve_the_whole_cycle() {
    let s3 = S3Server::start().await;
    let (db, pool) = fresh_database(2).await;
    let certs_key = ids::new_key32();
    let a = Controller::start(&db, &s3, &certs_key, &[]).await;
    let b = Controller::start(&db, &s3, &certs_key, &[]).await;
    let http = client();

    // Submit through A (larger than one part), with a certificate.
    let source = pattern(7 * 1024 * 1024 + 123, 1);
    let (id, token) = submit(&a, &source, Some(b"\x30\x82S3P12SECRET")).await;
    assert_eq!(
        s3.objects(),
        vec![format!("builds/{id}/certs.bin"), format!("builds/{id}/source.zip")]
    );
    assert!(
        !s3.object(&format!("builds/{id}/certs.bin"))
            .windows(11)
            .any(|w| w == b"S3P12SECRET"),
        "certs are encrypted before they reach the store"
    );
    assert_eq!(s3.object(&format!("builds/{id}/source.zip")), source);

    // A worker registered and claiming through B downloads the source and certs through A.
    let worker = register(&b).await;
    assert_eq!(poll(&b, &worker).await["job"]["id"], id.as_str());
    let (status, bytes) = get_bytes(
        http.get(a.url(&format!("/api/builds/{id}/source")))
            .header("X-API-Key", API_KEY)
            .header("X-Worker-Id", &worker),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        bytes.as_ref() == source.as_slice(),
        "source through A is the bytes uploaded"
    );
    let certs: Value = http
        .get(a.url(&format!("/api/builds/{id}/certs-secure")))
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", &worker)
        .send()
        .await
        .expect("certs")
        .json()
        .await
        .expect("json");
    assert_eq!(
        STANDARD.decode(certs["p12"].as_str().expect("p12")).expect("b64"),
        b"\x30\x82S3P12SECRET"
    );

    // The result goes up through B and comes down through A (whole and by range) and B.
    let result = pattern(9 * 1024 * 1024 + 7, 2);
    assert_eq!(upload_result(&b, &id, &worker, &result).await.status(), 200);
    let status: String = sqlx::query_scalar("SELECT state FROM builds WHERE id = $1")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .expect("state");
    assert_eq!(status, "completed");
    for c in [&a, &b] {
        let (status, bytes) = get_bytes(
            http.get(c.url(&format!("/api/builds/{id}/download")))
                .header("X-Build-Token", &token),
        )
        .await;
        assert_eq!(status, 200);
        assert!(bytes.as_ref() == result.as_slice(), "result through {}", c.base);
    }
    let (status, bytes) = get_bytes(
        http.get(a.url(&format!("/api/builds/{id}/download")))
            .header("X-Build-Token", &token)
            .header("Range", "bytes=100-199"),
    )
    .await;
    assert_eq!(status, 206);
    assert_eq!(bytes.as_ref(), &result[100..200]);
    let (status, _) = get_bytes(
        http.get(a.url(&format!("/api/builds/{id}/download")))
            .header("X-Build-Token", &token)
            .header("Range", format!("bytes={}-", result.len() + 5)),
    )
    .await;
    assert_eq!(status, 416);
    let (status, bytes) = get_bytes(
        http.get(b.url(&format!("/api/builds/{id}/download/source")))
            .header("X-Build-Token", &token),
    )
    .await;
    assert_eq!(status, 200);
    assert!(bytes.as_ref() == source.as_slice());

    // Nothing of the build touched either host's disk, and no staging or open upload is left.
    for c in [&a, &b] {
        assert!(!c.storage_dir.exists(), "{} wrote to its local directory", c.base);
    }
    let objects = s3.objects();
    assert_eq!(objects.len(), 3, "{objects:?}");
    assert!(
        objects.iter().all(|k| k.starts_with(&format!("builds/{id}/"))),
        "{objects:?}"
    );
    assert!(s3.open_uploads().is_empty(), "{:?}", s3.open_uploads());
}

#[tokio::test]
async fn refused_uploads_leave_no_object_and_no_open_multipart_upload() {
    let s3 = S3Server::start().await;
    let (db, pool) = fresh_database(2).await;
    let a = Controller::start(
        &db,
        &s3,
        &ids::new_key32(),
        &[
            ("CONTROLLER_MAX_SOURCE_BYTES", "8388608"),
            ("CONTROLLER_MAX_RESULT_BYTES", "8388608"),
        ],
    )
    .await;
    // A source past the limit, after one part already reached the store.
    let form = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(pattern(20 * 1024 * 1024, 3)).file_name("app.zip"));
    let sent = client()
        .post(a.url("/api/builds/submit"))
        .header("X-API-Key", API_KEY)
        .multipart(form)
        .send()
        .await;
    assert_refused_as_too_large(sent);
    let builds: i64 = sqlx::query_scalar("SELECT count(*) FROM builds")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(builds, 0);
    assert!(s3.objects().is_empty(), "{:?}", s3.objects());
    assert!(s3.open_uploads().is_empty(), "{:?}", s3.open_uploads());

    // A result past the limit: 413, the build is still held, nothing stored.
    let (id, _) = submit(&a, b"src", None).await;
    let worker = register(&a).await;
    poll(&a, &worker).await;
    let sent = client()
        .post(a.url("/api/workers/upload"))
        .header("X-API-Key", API_KEY)
        .multipart(success_form(&id, &worker, &pattern(20 * 1024 * 1024, 4)))
        .send()
        .await;
    assert_refused_as_too_large(sent);
    assert_eq!(s3.objects(), vec![format!("builds/{id}/source.zip")]);
    assert!(s3.open_uploads().is_empty(), "{:?}", s3.open_uploads());
}

#[tokio::test]
async fn deleting_a_build_deletes_its_objects_and_retries_while_the_store_is_down() {
    let mut s3 = S3Server::start().await;
    let (db, pool) = fresh_database(2).await;
    let a = Controller::start(
        &db,
        &s3,
        &ids::new_key32(),
        &[("CONTROLLER_JOB_SCHEDULES", "storage_deletions=* * * * * *")],
    )
    .await;
    let (id, _) = completed_build(&a, b"source", b"result").await;
    let (other, _) = submit(&a, b"queued", None).await;
    assert_eq!(s3.objects().len(), 3);
    let delete = |id: String| {
        client()
            .delete(a.url(&format!("/api/v2/builds/{id}")))
            .header("X-API-Key", API_KEY)
            .send()
    };
    let r = delete(id.clone()).await.expect("delete");
    assert_eq!(r.status(), 204);
    assert_eq!(s3.objects(), vec![format!("builds/{other}/source.zip")]);

    // With the store down, the row goes at once and its objects are queued, then deleted by the job
    // once the store is back: never a row pointing nowhere, and no object left behind.
    let http = client();
    let r = http
        .post(a.url(&format!("/api/builds/{other}/cancel")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status(), 200);
    s3.kill();
    let r = delete(other.clone()).await.expect("delete");
    assert_eq!(r.status(), 204);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM builds")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rows, 0);
    let queued: Vec<String> = sqlx::query_scalar("SELECT key FROM pending_deletions")
        .fetch_all(&pool)
        .await
        .expect("queued");
    assert_eq!(queued, vec![format!("builds/{other}/source.zip")]);
    assert_eq!(s3.objects(), vec![format!("builds/{other}/source.zip")]);
    s3.restart().await;
    eventually("the job to delete the queued object", Duration::from_secs(30), || {
        s3.objects().is_empty()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_deletions")
            .fetch_one(&pool)
            .await
            .expect("count");
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "pending deletion not forgotten");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_store_that_stops_mid_upload_answers_503_and_keeps_nothing_half_written() {
    let mut s3 = S3Server::start().await;
    let (db, pool) = fresh_database(2).await;
    let a = Controller::start(&db, &s3, &ids::new_key32(), &[]).await;
    let http = client();

    // Stream a source; once the multipart upload is open on the store, stop the store, then finish.
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(tokio_stream_from(receiver));
    let part = Part::stream(body).file_name("app.zip");
    let form = Form::new().text("platform", "ios").part("source", part);
    let request = http
        .post(a.url("/api/builds/submit"))
        .header("X-API-Key", API_KEY)
        .multipart(form)
        .send();
    let pending = tokio::spawn(request);
    let storage_errors_before = storage_errors(&a, &http).await;
    sender
        .send(Ok(Bytes::from(pattern(1024 * 1024, 5))))
        .await
        .expect("send");
    eventually("the multipart upload to open", Duration::from_secs(20), || {
        !s3.open_uploads().is_empty()
    })
    .await;
    s3.kill();
    sender
        .send(Ok(Bytes::from(pattern(1024 * 1024, 6))))
        .await
        .expect("send");
    drop(sender);
    let response = pending.await.expect("join").expect("response");
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_some(), "Retry-After is set");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "Storage unavailable");
    // Counted for the storage alert (which a 503 for a full queue does not trip).
    assert!(storage_errors(&a, &http).await > storage_errors_before);

    // While the store is down: /ready says so, new uploads get 503, downloads too.
    let r = http.get(a.url("/ready")).send().await.expect("ready");
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let form = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(b"small".to_vec()).file_name("app.zip"));
    let r = http
        .post(a.url("/api/builds/submit"))
        .header("X-API-Key", API_KEY)
        .multipart(form)
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status(), 503);

    // Back up: ready again, and no build row nor object was left by either attempt.
    s3.restart().await;
    crate::support::wait_ready(&http, &a.base).await;
    let builds: i64 = sqlx::query_scalar("SELECT count(*) FROM builds")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(builds, 0);
    assert!(s3.objects().is_empty(), "{:?}", s3.objects());
    // The store works again end to end.
    let (id, token) = completed_build(&a, b"after", b"done").await;
    let (status, bytes) = get_bytes(
        http.get(a.url(&format!("/api/builds/{id}/download")))
            .header("X-Build-Token", &token),
    )
    .await;
    assert_eq!((status, bytes.as_ref()), (200, &b"done"[..]));
}

/// A `Stream` over an mpsc receiver (no extra dependency).
/// `expo_storage_errors_total` as the instance exports it (one recorder per test process: it only grows).
async fn storage_errors(c: &Controller, http: &reqwest::Client) -> f64 {
    let text = http
        .get(c.url("/metrics"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|l| l.strip_prefix("expo_storage_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("expo_storage_errors_total is exported")
}

fn tokio_stream_from(
    mut receiver: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

#[tokio::test]
async fn presigned_redirects_download_the_same_bytes() {
    let s3 = S3Server::start().await;
    let (db, _pool) = fresh_database(2).await;
    let a = Controller::start(&db, &s3, &ids::new_key32(), &[("CONTROLLER_PRESIGN_DOWNLOADS", "true")]).await;
    let source = pattern(300_000, 7);
    let result = pattern(2 * 1024 * 1024 + 1, 8);
    let (id, token) = completed_build(&a, &source, &result).await;

    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    for (path, expected) in [
        ("download", &result),
        ("download/result", &result),
        ("download/source", &source),
    ] {
        let r = no_redirects
            .get(a.url(&format!("/api/builds/{id}/{path}")))
            .header("X-Build-Token", &token)
            .send()
            .await
            .expect("download");
        assert_eq!(r.status(), 302, "{path}");
        let location = r.headers()["location"].to_str().expect("location").to_string();
        assert!(location.starts_with(&s3.endpoint()), "{location}");
        assert!(location.contains("X-Amz-Signature="), "{location}");
        // Fetched with no credential at all, as a browser or curl would.
        let (status, bytes) = get_bytes(no_redirects.get(&location)).await;
        assert_eq!(status, 200, "{path}");
        assert!(bytes.as_ref() == expected.as_slice(), "{path}");
        // A client that follows redirects (the CLI) gets the same bytes in one call.
        let (status, bytes) = get_bytes(
            client()
                .get(a.url(&format!("/api/builds/{id}/{path}")))
                .header("X-Build-Token", &token),
        )
        .await;
        assert_eq!(status, 200);
        assert!(bytes.as_ref() == expected.as_slice(), "{path}");
    }
    // The operator CLI follows the redirect to the store (without its key) and saves the same bytes.
    let out = std::env::temp_dir().join(format!("expo-s3-cli-{}.bin", ids::new_id()));
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_expo-controller"))
        .args([
            "builds",
            "download",
            &id,
            "--json",
            "--server",
            &a.base,
            "--api-key",
            API_KEY,
            "-o",
        ])
        .arg(&out)
        .env_remove("DATABASE_URL")
        .output()
        .expect("cli");
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    assert!(
        std::fs::read(&out).expect("downloaded") == result,
        "CLI download through the redirect"
    );
    let _ = std::fs::remove_file(&out);
    // Still owner-only: no credential, no redirect.
    let r = no_redirects
        .get(a.url(&format!("/api/builds/{id}/download")))
        .send()
        .await
        .expect("download");
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn a_missing_bucket_or_wrong_credentials_refuse_to_start() {
    let s3 = S3Server::start().await;
    let (db, _pool) = fresh_database(1).await;
    for (url, secret) in [
        ("s3://no-such-bucket", SECRET_KEY),
        (&*format!("s3://{BUCKET}"), "wrong-secret-0123456789"),
    ] {
        let dir = std::env::temp_dir().join(format!("expo-s3-refuse-{}", ids::new_id()));
        let mut command = serve_command(&db, &dir, free_port(), &ids::new_key32());
        command.env("CONTROLLER_STORAGE_URL", url);
        for (name, value) in s3.env() {
            command.env(name, value);
        }
        command.env("AWS_SECRET_ACCESS_KEY", secret).stderr(Stdio::piped());
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("join")
            .expect("run");
        assert!(!output.status.success(), "{url} started");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("is not usable"), "{url}: {stderr}");
        assert!(!stderr.contains(secret), "the secret is never printed");
    }
}

#[tokio::test]
async fn storage_copy_moves_a_local_store_into_the_bucket_resumably() {
    let s3 = S3Server::start().await;
    // A single-host deployment on its local directory with a finished and a queued build.
    let local = crate::support::TestApp::spawn_with(|c| c.max_source_bytes = 16 * 1024 * 1024).await;
    let (worker, _) = local.register("w", &["ios"]).await;
    let big = pattern(7 * 1024 * 1024, 9);
    let done = local.submit("ios", &big).await["id"].as_str().expect("id").to_string();
    local.poll(&worker).await;
    assert_eq!(
        local
            .upload_form(success_form(&done, &worker, b"the result"))
            .await
            .status(),
        200
    );
    // Results uploaded right after their claim are stored loose (`results/<upload>.bin`): they move too.
    // A round slower than the claim's hand-off window stores its result under the build instead, so a
    // loaded machine gets up to 20 rounds to produce one loose result.
    for round in 0..20 {
        let id = local.submit("ios", b"quick").await["id"]
            .as_str()
            .expect("id")
            .to_string();
        local.poll(&worker).await;
        let form = success_form(&id, &worker, format!("quick result {round}").as_bytes());
        assert_eq!(local.upload_form(form).await.status(), 200);
        if local.stored_files().iter().any(|f| f.starts_with("results/")) {
            break;
        }
    }
    assert!(
        local.stored_files().iter().any(|f| f.starts_with("results/")),
        "a loose result was stored"
    );
    let queued = local.submit("ios", b"queued").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let stored = local.stored_files().len();

    let copy = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_expo-controller"));
        command
            .args(["storage", "copy", "--to", &format!("s3://{BUCKET}/{PREFIX}")])
            .env("CONTROLLER_STORAGE_DIR", &local.storage_dir)
            .env_remove("CONTROLLER_STORAGE_URL");
        for (name, value) in s3.env() {
            command.env(name, value);
        }
        command
    };
    let output = copy().output().expect("copy");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).expect("report");
    assert_eq!(report["copied"].as_u64(), Some(stored as u64));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(&format!("[{stored}/{stored}]")),
        "progress is shown"
    );
    let mut expected = local.stored_files();
    expected.sort();
    assert_eq!(s3.objects(), expected);
    assert!(s3.object(&format!("builds/{done}/source.zip")) == big);

    // Resumable: a damaged copy is copied again, good ones are verified and skipped.
    let damaged = s3
        .root
        .join(BUCKET)
        .join(PREFIX)
        .join(format!("builds/{queued}/source.zip"));
    std::fs::write(&damaged, b"QUEUED").expect("damage");
    let output = copy().output().expect("copy again");
    assert!(output.status.success());
    let report: Value = serde_json::from_slice(&output.stdout).expect("report");
    assert_eq!(
        (report["copied"].as_u64(), report["skipped"].as_u64()),
        (Some(1), Some(stored as u64 - 1))
    );
    assert_eq!(s3.object(&format!("builds/{queued}/source.zip")), b"queued");

    // A controller on the bucket and the same database serves what the local one stored.
    let certs_key = ids::new_key32();
    let moved = Controller::start(&local.database_url, &s3, &certs_key, &[]).await;
    let (status, bytes) = get_bytes(
        client()
            .get(moved.url(&format!("/api/builds/{done}/download")))
            .header("X-API-Key", API_KEY),
    )
    .await;
    assert_eq!((status, bytes.as_ref()), (200, &b"the result"[..]));
}

#[tokio::test]
async fn the_staging_sweep_cleans_the_bucket_too() {
    let s3 = S3Server::start().await;
    let (db, _pool) = fresh_database(2).await;
    let staging = s3.root.join(BUCKET).join(PREFIX).join("staging");
    std::fs::create_dir_all(&staging).expect("staging");
    // A staged object left by a crashed instance a day ago, and one being written now.
    let old = staging.join("crashed.bin");
    std::fs::write(&old, b"left behind").expect("write");
    std::fs::File::options()
        .write(true)
        .open(&old)
        .expect("open")
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(86_400))
        .expect("mtime");
    std::fs::write(staging.join("fresh.bin"), b"in flight").expect("write");
    let _a = Controller::start(
        &db,
        &s3,
        &ids::new_key32(),
        &[
            ("CONTROLLER_JOB_SCHEDULES", "sweep_staging=* * * * * *"),
            ("CONTROLLER_STAGING_MAX_AGE_SECS", "3600"),
        ],
    )
    .await;
    eventually(
        "the sweep to delete the old staged object",
        Duration::from_secs(20),
        || !old.exists(),
    )
    .await;
    assert_eq!(s3.objects(), vec!["staging/fresh.bin".to_string()]);
}

/// Rows of `pending_writes` (keys recorded before a write and not yet linked or settled) that name an
/// object or that a row names: not the spare keys (recorded ahead by a link for a later request of the
/// instance, with no object and no row yet).
async fn pending_writes(pool: &sqlx::PgPool, s3: &S3Server) -> Vec<String> {
    let objects = s3.objects();
    let keys: Vec<(String, bool)> = sqlx::query_as(
        "SELECT key, EXISTS (SELECT 1 FROM builds b WHERE p.key IN (b.source_key, b.certs_key, b.result_key))
         FROM pending_writes p ORDER BY key",
    )
    .fetch_all(pool)
    .await
    .expect("pending writes");
    keys.into_iter()
        .filter(|(key, named)| *named || objects.contains(key))
        .map(|(key, _)| key)
        .collect()
}

/// Issue #25: a result whose form names the build (and its holder) before the file streams straight to
/// its final key — no staging object and no server-side copy. While the request is still open (a
/// trailing part held back), the finished file is already under its build and staging is empty; with
/// the file first, it goes to staging as before and is moved once the build is known.
#[tokio::test]
async fn a_result_whose_build_comes_first_streams_to_its_final_key() {
    let s3 = S3Server::start().await;
    let (db, pool) = fresh_database(2).await;
    let a = Controller::start(&db, &s3, &ids::new_key32(), &[]).await;
    let http = client();
    let result = pattern(7 * 1024 * 1024 + 11, 9);
    for build_first in [true, false] {
        let (id, token) = submit(&a, b"src", None).await;
        let worker = register(&a).await;
        assert_eq!(poll(&a, &worker).await["job"]["id"], id.as_str());
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let held = Part::stream(reqwest::Body::wrap_stream(tokio_stream_from(receiver)));
        let file = Part::bytes(result.clone()).file_name("app.ipa");
        let fields = |form: Form| {
            form.text("build_id", id.clone())
                .text("worker_id", worker.clone())
                .text("success", "true")
        };
        let form = if build_first {
            fields(Form::new()).part("result", file)
        } else {
            fields(Form::new().part("result", file))
        };
        let request = http
            .post(a.url("/api/workers/upload"))
            .header("X-API-Key", API_KEY)
            .multipart(form.part("note", held))
            .send();
        let pending = tokio::spawn(request);
        let (expected, unexpected) = if build_first {
            (format!("builds/{id}/result-"), "staging/".to_string())
        } else {
            ("staging/".to_string(), format!("builds/{id}/result-"))
        };
        eventually("the stored file", Duration::from_secs(30), || {
            s3.objects().iter().any(|k| k.starts_with(&expected))
        })
        .await;
        let objects = s3.objects();
        assert!(!objects.iter().any(|k| k.starts_with(&unexpected)), "{objects:?}");
        sender.send(Ok(Bytes::from_static(b"done"))).await.expect("send");
        drop(sender);
        let response = pending.await.expect("join").expect("response");
        assert_eq!(response.status(), 200, "build first: {build_first}");

        // Either way: one result under the build, nothing in staging, nothing pending, the same bytes.
        let objects: Vec<String> = s3
            .objects()
            .into_iter()
            .filter(|k| !k.ends_with("source.zip"))
            .collect();
        assert_eq!(objects.len(), 1, "{objects:?}");
        assert!(objects[0].starts_with(&format!("builds/{id}/result-")), "{objects:?}");
        assert_eq!(s3.object(&objects[0]), result);
        assert!(s3.open_uploads().is_empty(), "{:?}", s3.open_uploads());
        assert_eq!(pending_writes(&pool, &s3).await, Vec::<String>::new());
        let (status, bytes) = get_bytes(
            http.get(a.url(&format!("/api/builds/{id}/download")))
                .header("X-Build-Token", &token),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(bytes.as_ref(), result.as_slice());
        // The next round's objects are told apart from this one's by build id.
        let r = http
            .delete(a.url(&format!("/api/v2/builds/{id}")))
            .header("X-API-Key", API_KEY)
            .send()
            .await
            .expect("delete");
        assert_eq!(r.status(), 204);
    }
}

/// Issue #25: a result streaming straight to its final key whose attempt ends mid-upload (the build is
/// cancelled) loses: 409, and neither the object, nor an open multipart upload, nor its pending key is
/// left behind; the build names no result.
#[tokio::test]
async fn a_fenced_out_direct_upload_leaves_nothing_behind() {
    let s3 = S3Server::start().await;
    let (db, pool) = fresh_database(2).await;
    let a = Controller::start(&db, &s3, &ids::new_key32(), &[]).await;
    let http = client();
    let (id, _) = submit(&a, b"src", None).await;
    let worker = register(&a).await;
    assert_eq!(poll(&a, &worker).await["job"]["id"], id.as_str());

    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let file = Part::stream(reqwest::Body::wrap_stream(tokio_stream_from(receiver))).file_name("app.ipa");
    let form = Form::new()
        .text("build_id", id.clone())
        .text("worker_id", worker.clone())
        .text("success", "true")
        .part("result", file);
    let request = http
        .post(a.url("/api/workers/upload"))
        .header("X-API-Key", API_KEY)
        .multipart(form)
        .send();
    let pending = tokio::spawn(request);
    sender
        .send(Ok(Bytes::from(pattern(1024 * 1024, 10))))
        .await
        .expect("send");
    eventually("the multipart upload to open", Duration::from_secs(20), || {
        !s3.open_uploads().is_empty()
    })
    .await;
    // Recorded before its first byte: a kill from here on leaves a key the sweep settles.
    let recorded: Vec<String> = sqlx::query_scalar("SELECT key FROM pending_writes WHERE key LIKE '%/result-%'")
        .fetch_all(&pool)
        .await
        .expect("pending");
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert!(recorded[0].starts_with(&format!("builds/{id}/result-")), "{recorded:?}");

    let r = http
        .post(a.url(&format!("/api/builds/{id}/cancel")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status(), 200);
    for seed in 11..19 {
        sender
            .send(Ok(Bytes::from(pattern(1024 * 1024, seed))))
            .await
            .expect("send");
    }
    drop(sender);
    let response = pending.await.expect("join").expect("response");
    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "Build attempt is no longer active");

    assert_eq!(s3.objects(), vec![format!("builds/{id}/source.zip")]);
    assert!(s3.open_uploads().is_empty(), "{:?}", s3.open_uploads());
    assert_eq!(pending_writes(&pool, &s3).await, Vec::<String>::new());
    let result_key: Option<String> = sqlx::query_scalar("SELECT result_key FROM builds WHERE id = $1")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .expect("build");
    assert_eq!(result_key, None);
}
