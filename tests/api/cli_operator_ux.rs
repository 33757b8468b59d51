//! The operator CLI as people and scripts use it: the newer commands in both modes (database and
//! `--server`), paging, tables on request, following logs and state, timeouts, TLS against a plain port,
//! non-JSON error bodies, encoded query values, exit codes and secrets kept out of help and errors.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{API_KEY, TestApp, free_port, success_form};

fn cli() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_expo-controller"));
    command
        .env_remove("DATABASE_URL")
        .env_remove("CONTROLLER_URL")
        .env_remove("CONTROLLER_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// `group [target] rest…`: the target goes right after the command group.
fn command(app: &TestApp, over_http: bool, args: &[&str]) -> Command {
    let mut command = cli();
    let (group, rest) = args.split_first().expect("a command group");
    command.arg(group);
    if over_http {
        command.args(["--server", &app.base, "--api-key", API_KEY]);
    } else {
        command.args(["--database-url", &app.database_url]);
    }
    command.args(rest);
    command
}

/// Waits (bounded) for a child to end; a CLI that hangs fails the test instead of hanging it.
async fn finish(child: Child, within: Duration) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut child = child;
        let deadline = Instant::now() + within;
        loop {
            if child.try_wait().expect("try_wait").is_some() {
                return child.wait_with_output().expect("output");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!(
                    "the CLI did not finish within {within:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .expect("join")
}

/// Runs a command to its end: (exit code, stdout, stderr).
async fn run(mut command: Command) -> (i32, String, String) {
    let out = finish(command.spawn().expect("spawn"), Duration::from_secs(30)).await;
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Runs in JSON mode; the exit code and the stdout JSON (or the stderr JSON on failure).
async fn json_of(app: &TestApp, over_http: bool, args: &[&str]) -> (i32, Value) {
    let mut command = command(app, over_http, args);
    command.arg("--json");
    let (code, out, err) = run(command).await;
    let text = if code == 0 { out } else { err };
    (code, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn post_logs(app: &TestApp, id: &str, worker_id: &str, messages: &[&str]) {
    let logs: Vec<Value> = messages
        .iter()
        .map(|m| json!({ "level": "info", "message": m }))
        .collect();
    let r = app
        .client
        .post(app.url(&format!("/api/builds/{id}/logs")))
        .header("X-API-Key", API_KEY)
        .header("X-Worker-Id", worker_id)
        .json(&json!({ "logs": logs }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_commands_work_the_same_in_both_modes() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("w", &["ios"]).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.submit("ios", b"s").await["id"].as_str().unwrap().to_string());
    }

    for over_http in [true, false] {
        // Queues: depth per platform.
        let (code, queues) = json_of(&app, over_http, &["queues", "list"]).await;
        assert_eq!(code, 0, "{queues}");
        let ios = queues["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == "ios")
            .cloned();
        assert_eq!(ios.unwrap()["depth"]["pending"], 3, "{queues}");

        // Paging: a page of one, the next page by cursor, and every page.
        let (_, first) = json_of(&app, over_http, &["builds", "list", "--limit", "1"]).await;
        assert_eq!(first["items"].as_array().unwrap().len(), 1);
        let cursor = first["next_cursor"].as_str().expect("a next cursor").to_string();
        let (_, second) = json_of(
            &app,
            over_http,
            &["builds", "list", "--limit", "1", "--cursor", &cursor],
        )
        .await;
        assert_ne!(second["items"][0]["id"], first["items"][0]["id"]);
        let (_, all) = json_of(&app, over_http, &["builds", "list", "--limit", "1", "--all"]).await;
        let mut listed: Vec<String> = all["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect();
        listed.sort();
        let mut expected = ids.clone();
        expected.sort();
        assert_eq!(listed, expected);
        assert_eq!(all["next_cursor"], Value::Null);
        let (_, workers) = json_of(&app, over_http, &["workers", "list", "--all"]).await;
        assert_eq!(workers["items"][0]["id"], worker_id.as_str());

        // Priority, with the API's bounds.
        let (code, changed) = json_of(&app, over_http, &["builds", "priority", &ids[0], "7"]).await;
        assert_eq!((code, &changed["priority"]), (0, &json!(7)), "{changed}");
        let (code, changed) = json_of(&app, over_http, &["builds", "priority", &ids[0], "-3"]).await;
        assert_eq!((code, &changed["priority"]), (0, &json!(-3)), "{changed}");
        let (code, refused) = json_of(&app, over_http, &["builds", "priority", &ids[0], "101"]).await;
        assert_eq!(code, 1);
        assert_eq!(refused["error"], "priority must be an integer from -100 to 100");

        // Workers: disable, show, enable.
        let (code, disabled) = json_of(&app, over_http, &["workers", "disable", &worker_id]).await;
        assert_eq!((code, &disabled["admin_state"]), (0, &json!("disabled")), "{disabled}");
        let (_, shown) = json_of(&app, over_http, &["workers", "show", &worker_id]).await;
        assert_eq!(shown["admin_state"], "disabled");
        let (code, enabled) = json_of(&app, over_http, &["workers", "enable", &worker_id]).await;
        assert_eq!((code, &enabled["admin_state"]), (0, &json!("active")), "{enabled}");
        let (code, missing) = json_of(&app, over_http, &["workers", "show", "nosuchworker"]).await;
        assert_eq!(
            (code, missing),
            (1, json!({ "error": "Worker not found", "code": "worker_not_found" }))
        );
    }
    // Both modes print the same JSON for the same state (ages aside).
    let without_ages = |(code, mut value): (i32, Value)| {
        for item in value["items"].as_array_mut().into_iter().flatten() {
            item["oldest_pending_age_seconds"] = Value::Null;
        }
        (code, value)
    };
    for args in [["queues", "list"], ["workers", "list"]] {
        assert_eq!(
            without_ages(json_of(&app, true, &args).await),
            without_ages(json_of(&app, false, &args).await),
            "{args:?}"
        );
    }
    // Database mode reads the server's settings from the same variables.
    let mut limited = command(&app, false, &["queues", "list", "--json"]);
    limited.env("CONTROLLER_MAX_QUEUED_BUILDS", "3");
    let (code, out, err) = run(limited).await;
    assert_eq!(code, 0, "{err}");
    let ios = serde_json::from_str::<Value>(&out).unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "ios")
        .cloned()
        .unwrap();
    assert_eq!((&ios["max_queued"], &ios["full"]), (&json!(3), &json!(true)), "{ios}");
    let mut invalid = command(&app, false, &["queues", "list", "--json"]);
    invalid.env("CONTROLLER_MAX_ATTEMPTS", "0");
    let (code, _, err) = run(invalid).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("CONTROLLER_MAX_ATTEMPTS"), "{err}");

    // Logs: a build's lines in both modes.
    let polled = app.poll(&worker_id).await;
    let running = polled["job"]["id"].as_str().unwrap().to_string();
    post_logs(&app, &running, &worker_id, &["one", "two & three"]).await;
    // In JSON (a pipe), one object per log line.
    let ndjson = |over_http: bool| {
        let mut logs = command(&app, over_http, &["builds", "logs", &running]);
        logs.arg("--json");
        async move {
            let (code, out, err) = run(logs).await;
            assert_eq!(code, 0, "{err}");
            out.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(ndjson(true).await, ndjson(false).await);
    for over_http in [true, false] {
        let logs = ndjson(over_http).await;
        let messages: Vec<&str> = logs.iter().map(|l| l["message"].as_str().unwrap()).collect();
        assert!(messages.ends_with(&["one", "two & three"]), "{messages:?}");
        let mut table = command(&app, over_http, &["builds", "logs", &running]);
        table.arg("--table");
        let (code, out, _) = run(table).await;
        assert_eq!(code, 0);
        assert!(out.lines().any(|l| l.ends_with(" info  two & three")), "{out}");
    }
}

/// A running CLI whose stdout is read line by line as it comes.
struct Streamed {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Streamed {
    fn start(mut command: Command) -> Streamed {
        let mut child = command.spawn().expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Streamed {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (at most 30 s) for a line containing `text`.
    async fn wait_for(&mut self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.seen.iter().any(|l| l.contains(text)) {
            assert!(Instant::now() < deadline, "no line with {text:?}: {:?}", self.seen);
            match self.lines.try_recv() {
                Ok(line) => self.seen.push(line),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Waits (bounded) for the end; the exit code and every line printed.
    async fn end(mut self) -> (Option<i32>, Vec<String>) {
        let output = finish(self.child, Duration::from_secs(30)).await;
        self.seen.extend(self.lines.try_iter());
        (output.status.code(), self.seen)
    }
}

/// `builds logs -f` prints lines as they come and ends when the build is final; `builds watch` prints
/// state changes and ends with the build; the exit code tells how the build ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_and_watch_end_with_the_build() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("w", &["ios"]).await;
    for over_http in [true, false] {
        let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
        let fast = ["--interval-ms", "100"];
        let mut watch = command(&app, over_http, &["builds", "watch", &id, "--json"]);
        watch.args(fast);
        let mut watch = Streamed::start(watch);
        watch.wait_for("\"pending\"").await;
        let mut follow = command(&app, over_http, &["builds", "logs", &id, "-f", "--table"]);
        follow.args(fast);
        let mut follow = Streamed::start(follow);

        assert_eq!(app.poll(&worker_id).await["job"]["id"], id.as_str());
        watch.wait_for("\"assigned\"").await;
        post_logs(&app, &id, &worker_id, &["compiling"]).await;
        follow.wait_for(" info  compiling").await;
        post_logs(&app, &id, &worker_id, &["signing"]).await;
        follow.wait_for(" info  signing").await;
        assert_eq!(
            app.upload_form(success_form(&id, &worker_id, b"ipa")).await.status(),
            200
        );

        let (code, lines) = follow.end().await;
        assert_eq!(code, Some(0), "{lines:?}");
        assert_eq!(
            lines.iter().filter(|l| l.contains(" info  compiling")).count(),
            1,
            "{lines:?}"
        );

        let (code, lines) = watch.end().await;
        assert_eq!(code, Some(0), "{lines:?}");
        let states: Vec<String> = lines
            .iter()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["state"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(states.first().map(String::as_str), Some("pending"), "{states:?}");
        assert_eq!(states.last().map(String::as_str), Some("completed"), "{states:?}");

        // A cancelled build: watch ends with exit code 6.
        let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
        let mut watch = command(&app, over_http, &["builds", "watch", &id, "--table"]);
        watch.args(fast);
        let mut watch = Streamed::start(watch);
        watch.wait_for("pending").await;
        let (code, _) = json_of(&app, !over_http, &["builds", "cancel", &id]).await;
        assert_eq!(code, 0);
        let (code, lines) = watch.end().await;
        assert_eq!(code, Some(6), "{lines:?}");
        assert!(lines.last().is_some_and(|l| l.contains("cancelled")), "{lines:?}");
    }
}

/// Tables (forced with --table, since stdout here is a pipe) have a header row and aligned columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_are_readable() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("mac-mini-7", &["ios"]).await;
    let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    for over_http in [true, false] {
        let table = |args: &[&str]| {
            let mut c = command(&app, over_http, args);
            c.arg("--table");
            c
        };
        let (code, out, _) = run(table(&["builds", "list"])).await;
        assert_eq!(code, 0);
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("ID") && lines[0].contains("STATE") && lines[0].contains("AGE"),
            "{out}"
        );
        assert!(lines[1].starts_with(&id) && lines[1].contains("pending"), "{out}");
        let state_column = lines[0].find("STATE").unwrap();
        assert_eq!(lines[1].find("pending"), Some(state_column), "aligned: {out}");

        let (_, out, _) = run(table(&["workers", "list"])).await;
        assert!(
            out.starts_with("ID") && out.contains("mac-mini-7") && out.contains(&worker_id),
            "{out}"
        );
        let (_, out, _) = run(table(&["queues", "list"])).await;
        assert!(
            out.starts_with("QUEUE") && out.lines().any(|l| l.starts_with("ios ")),
            "{out}"
        );
        let (_, out, _) = run(table(&["builds", "show", &id])).await;
        assert!(
            out.lines().any(|l| l.starts_with("state") && l.ends_with("pending")),
            "{out}"
        );

        // Errors read as sentences on stderr.
        let (code, out, err) = run(table(&["builds", "show", "nosuchbuild"])).await;
        assert_eq!((code, out.as_str()), (1, ""));
        assert_eq!(err.trim(), "error: Build not found (build_not_found)");
    }
}

/// A query value holding `&` stays one value: the server sees the whole (invalid) state, not a second
/// parameter; a path segment with `/` stays one segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_encoded() {
    let app = TestApp::spawn().await;
    app.submit("ios", b"s").await;
    app.submit("ios", b"s").await;
    for over_http in [true, false] {
        let (code, refused) = json_of(&app, over_http, &["builds", "list", "--state", "pending&limit=1"]).await;
        assert_eq!((code, &refused["error"]), (1, &json!("Invalid state")), "{refused}");
        // A worker is named or identified: the whole value is one name that no worker has.
        let (code, none) = json_of(&app, over_http, &["builds", "list", "--worker", "w&state=failed"]).await;
        assert_eq!((code, &none["items"]), (0, &json!([])), "{none}");
    }
    let (code, missing) = json_of(&app, true, &["builds", "show", "../../api/v2/queues"]).await;
    // Encoded, it is one (invalid) id; unencoded, it would have been normalised to the queue list.
    assert_eq!(code, 1, "{missing}");
    assert!(
        missing["error"].is_string() && missing.get("items").is_none(),
        "{missing}"
    );
}

/// A listener that answers every request with `response` (raw HTTP/1.1), or never answers when `None`.
async fn fake_server(response: Option<&'static str>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            match response {
                Some(text) => {
                    tokio::spawn(async move {
                        let mut buffer = [0u8; 4096];
                        let _ = socket.read(&mut buffer).await;
                        let _ = socket.write_all(text.as_bytes()).await;
                        let _ = socket.shutdown().await;
                    });
                }
                None => held.push(socket),
            }
        }
    });
    format!("http://{addr}")
}

fn against(server: &str, args: &[&str]) -> Command {
    let mut command = cli();
    command.args(args).args(["--server", server, "--api-key", API_KEY]);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_failures_are_explained_with_their_exit_codes() {
    let app = TestApp::spawn().await;

    // https:// to a plain-HTTP port: a clear message, promptly, exit 3.
    let https = app.base.replace("http://", "https://");
    let started = Instant::now();
    let (code, _, err) = run(against(&https, &["builds", "list", "--table"])).await;
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("cannot connect to https://") && err.contains("use http://"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));

    // Nothing listening: exit 3.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let (code, _, err) = run(against(&closed, &["queues", "list", "--json"])).await;
    assert_eq!(code, 3, "{err}");
    assert!(
        serde_json::from_str::<Value>(&err).unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("cannot connect")
    );

    // A server that accepts and never answers: --timeout is honoured, exit 4.
    let silent = fake_server(None).await;
    let started = Instant::now();
    let (code, _, err) = run(against(&silent, &["builds", "list", "--timeout", "1", "--table"])).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("did not answer within 1s"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());

    // A proxy's non-JSON error: status and text shown, never `null`; 5xx exit 5, 4xx exit 1.
    let proxy = fake_server(Some(
        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 13\r\nConnection: close\r\n\r\nupstream down",
    ))
    .await;
    let (code, _, err) = run(against(&proxy, &["builds", "list", "--json"])).await;
    assert_eq!(code, 5, "{err}");
    let error: Value = serde_json::from_str(&err).unwrap();
    assert_eq!(error["status"], 502);
    let message = error["error"].as_str().unwrap();
    assert!(
        message.contains("HTTP 502 Bad Gateway") && message.contains("upstream down"),
        "{message}"
    );
    let html = fake_server(Some(
        "HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 20\r\nConnection: close\r\n\r\n<h1>no such app</h1>",
    ))
    .await;
    let (code, _, err) = run(against(&html, &["workers", "list", "--table"])).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("HTTP 404 Not Found: <h1>no such app</h1>"), "{err}");

    // Wrong key: refused, exit 1, the server's message.
    let mut wrong = cli();
    wrong.args([
        "builds",
        "list",
        "--json",
        "--server",
        &app.base,
        "--api-key",
        "wrong-key",
    ]);
    let (code, _, err) = run(wrong).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        serde_json::from_str::<Value>(&err).unwrap()["error"].is_string(),
        "{err}"
    );

    // Usage: nowhere to act, an unknown flag, a bad URL.
    let (code, _, err) = run({
        let mut c = cli();
        c.args(["builds", "list"]);
        c
    })
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--server") && err.contains("DATABASE_URL"), "{err}");
    let (code, _, _) = run(against(&app.base, &["builds", "list", "--no-such-flag"])).await;
    assert_eq!(code, 2);
    let (code, _, err) = run(against("ftp://example.com", &["builds", "list"])).await;
    assert_eq!(code, 2, "{err}");
}

/// Secrets stay out of `--help` and of error messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_help_and_errors() {
    let secret_url = format!("postgres://app:topsecret@127.0.0.1:{}/expo", free_port());
    for args in [
        vec!["builds", "--help"],
        vec!["builds", "list", "--help"],
        vec!["workers", "--help"],
        vec!["serve", "--help"],
        vec!["migrate", "--help"],
    ] {
        let mut c = cli();
        c.args(&args)
            .env("DATABASE_URL", &secret_url)
            .env("CONTROLLER_URL", "https://ops:urlsecret@ctl.example.com")
            .env("CONTROLLER_API_KEY", "keysecret-0123456789abcdef0123456789");
        let (code, out, err) = run(c).await;
        assert_eq!(code, 0, "{args:?}: {err}");
        for secret in ["topsecret", "urlsecret", "keysecret"] {
            assert!(
                !out.contains(secret) && !err.contains(secret),
                "{args:?} shows {secret}: {out}"
            );
        }
    }

    // An unreachable database: exit 3, the URL shown without its password.
    let mut c = cli();
    c.args(["queues", "list", "--table"]).env("DATABASE_URL", &secret_url);
    let (code, _, err) = run(c).await;
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("postgres://app:***@127.0.0.1") && !err.contains("topsecret"),
        "{err}"
    );

    // An unreachable server given with credentials in its URL.
    let mut c = cli();
    let url = format!("http://ops:urlsecret@127.0.0.1:{}", free_port());
    c.args(["queues", "list", "--table", "--server", &url, "--api-key", API_KEY]);
    let (code, _, err) = run(c).await;
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("http://ops:***@127.0.0.1") && !err.contains("urlsecret"),
        "{err}"
    );
}

/// A TLS front (tokio-rustls, the fixture certificate for 127.0.0.1) forwarding to `backend`.
async fn tls_front(backend: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tls");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = backend.trim_start_matches("http://").to_string();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let backend = backend.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(&backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    format!("https://127.0.0.1:{}", addr.port())
}

/// `--server https://…` speaks TLS: it works against a controller behind TLS whose CA is given with
/// `--ca-cert`, and refuses (exit 3, saying why) a certificate it cannot verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_servers_work_and_unknown_certificates_are_refused() {
    let app = TestApp::spawn().await;
    let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    let https = tls_front(&app.base).await;
    let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tls/ca.pem");

    let mut trusted = against(&https, &["builds", "show", &id, "--json"]);
    trusted.arg("--ca-cert").arg(&ca);
    let (code, out, err) = run(trusted).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["id"], id.as_str());

    let (code, _, err) = run(against(&https, &["builds", "show", &id, "--table"])).await;
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("cannot connect to https://127.0.0.1") && err.to_lowercase().contains("certificate"),
        "{err}"
    );

    let mut missing = against(&https, &["builds", "list"]);
    missing.args(["--ca-cert", "/nonexistent/ca.pem"]);
    let (code, _, err) = run(missing).await;
    assert_eq!(code, 2, "{err}");
}

/// `builds download`: the result and the source saved byte for byte (SHA-256 printed), never over an
/// existing file without --force, a refused download leaves no file, and database mode says what to do.
#[tokio::test]
async fn builds_download_saves_the_bytes() {
    let app = TestApp::spawn().await;
    let source = b"PK source bytes".repeat(1000);
    let result: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let id = app.submit("ios", &source).await["id"].as_str().unwrap().to_string();
    let (worker_id, _) = app.register("w", &["ios"]).await;
    assert_eq!(app.poll(&worker_id).await["job"]["id"], id.as_str());
    assert_eq!(
        app.upload_form(success_form(&id, &worker_id, &result)).await.status(),
        200
    );

    let dir = std::env::temp_dir().join(format!("expo-cli-dl-{}", expo_controller::ids::new_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("app.ipa");
    let (code, body) = json_of(&app, true, &["builds", "download", &id, "-o", out.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{body}");
    assert_eq!(std::fs::read(&out).unwrap(), result);
    assert_eq!(body["bytes"], result.len());
    use sha2::Digest;
    assert_eq!(
        body["sha256"],
        expo_controller::ids::hex(&sha2::Sha256::digest(&result))
    );
    assert!(!dir.join("app.ipa.part").exists());

    let (code, body) = json_of(&app, true, &["builds", "download", &id, "-o", out.to_str().unwrap()]).await;
    assert_eq!(code, 1, "an existing file is kept: {body}");
    assert!(body["error"].as_str().unwrap().contains("--force"), "{body}");
    let src = dir.join("src.zip");
    let args = [
        "builds",
        "download",
        &id,
        "--artifact",
        "source",
        "-o",
        src.to_str().unwrap(),
        "--force",
    ];
    let (code, body) = json_of(&app, true, &args).await;
    assert_eq!(code, 0, "{body}");
    assert_eq!(std::fs::read(&src).unwrap(), source);

    let missing = dir.join("missing.bin");
    let (code, body) = json_of(
        &app,
        true,
        &["builds", "download", "nosuchbuild", "-o", missing.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 1, "{body}");
    assert!(body["error"].is_string(), "{body}");
    assert!(!missing.exists() && !dir.join("missing.bin.part").exists());

    let (code, body) = json_of(&app, false, &["builds", "download", &id]).await;
    assert_eq!(code, 2, "{body}");
    assert!(body["error"].as_str().unwrap().contains("--server"), "{body}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// T11: `builds download -o FILE` never writes through a planted `FILE.part` symlink: the link's target
/// is untouched and FILE gets the bytes.
#[tokio::test]
async fn t11_download_does_not_follow_a_planted_part_file() {
    let app = TestApp::spawn().await;
    let result = b"the real artifact".repeat(100);
    let id = app.submit("ios", b"source").await["id"].as_str().unwrap().to_string();
    let (worker_id, _) = app.register("w", &["ios"]).await;
    assert_eq!(app.poll(&worker_id).await["job"]["id"], id.as_str());
    assert_eq!(
        app.upload_form(success_form(&id, &worker_id, &result)).await.status(),
        200
    );
    let dir = std::env::temp_dir().join(format!("expo-cli-part-{}", expo_controller::ids::new_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    let out = dir.join("app.ipa");
    std::os::unix::fs::symlink(&victim, dir.join("app.ipa.part")).unwrap();
    let (code, body) = json_of(&app, true, &["builds", "download", &id, "-o", out.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{body}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert_eq!(std::fs::read(&out).unwrap(), result);
    assert!(!std::fs::symlink_metadata(&out).unwrap().file_type().is_symlink());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The CLI ends quietly (exit 0, no panic) when its output pipe closes early, as with `| head`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_into_a_closed_pipe_exits_quietly() {
    let app = TestApp::spawn().await;
    let id = app.submit("ios", b"source").await["id"].as_str().unwrap().to_string();
    let (worker_id, _) = app.register("w", &["ios"]).await;
    assert_eq!(app.poll(&worker_id).await["job"]["id"], id.as_str());
    let lines: Vec<String> = (0..500).map(|i| format!("line {i} {}", "x".repeat(200))).collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    post_logs(&app, &id, &worker_id, &refs).await;
    for _ in 0..3 {
        app.submit("android", b"more").await;
    }
    let id_arg = id.as_str();
    let cases: [&[&str]; 6] = [
        &["builds", "logs", id_arg],
        &["builds", "logs", id_arg, "--table"],
        &["builds", "list", "--all", "--limit", "1"],
        &["builds", "show", id_arg],
        &["builds", "watch", id_arg],
        &["builds", "watch", id_arg, "--table"],
    ];
    for args in cases {
        for over_http in [true, false] {
            let mut child = command(&app, over_http, args).spawn().expect("spawn");
            drop(child.stdout.take());
            let out = finish(child, Duration::from_secs(30)).await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(0), "{args:?} (http: {over_http}): {stderr}");
            assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        }
    }
    // The commands outside the operator groups too: gen-key (a println! panicked with exit 101).
    let mut child = cli().arg("gen-key").spawn().expect("spawn");
    drop(child.stdout.take());
    let out = finish(child, Duration::from_secs(30)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "gen-key: {stderr}");
    assert!(!stderr.contains("panicked"), "gen-key: {stderr}");
}

/// Into a real `| head`: `builds logs`, `builds list --all` and `watch` end quietly with success (never
/// exit 101), and what `head` got is whole JSON objects, one per line, for `logs` and `watch`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_into_head_prints_json_lines_and_exits_quietly() {
    let app = TestApp::spawn().await;
    let id = app.submit("ios", b"source").await["id"].as_str().unwrap().to_string();
    let (worker_id, _) = app.register("mac-mini-m1-ams", &["ios"]).await;
    assert_eq!(app.poll(&worker_id).await["job"]["id"], id.as_str());
    let lines: Vec<String> = (0..3000).map(|i| format!("line {i} {}", "x".repeat(100))).collect();
    for chunk in lines.chunks(500) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        post_logs(&app, &id, &worker_id, &refs).await;
    }
    for _ in 0..120 {
        app.submit("android", b"more").await;
    }
    // The worker filter takes the worker's name.
    let (code, mine) = json_of(&app, true, &["builds", "list", "--worker", "mac-mini-m1-ams"]).await;
    assert_eq!(
        (code, mine["items"][0]["id"].as_str()),
        (0, Some(id.as_str())),
        "{mine}"
    );
    // The build keeps moving (and is never final), so `watch` only ends by its closed pipe.
    let (client, base, build, worker) = (app.client.clone(), app.base.clone(), id.clone(), worker_id.clone());
    let heartbeats = tokio::spawn(async move {
        for progress in 1..=95 {
            let _ = client
                .post(format!("{base}/api/builds/{build}/heartbeat?worker_id={worker}"))
                .header("X-API-Key", API_KEY)
                .json(&json!({ "progress": progress, "stage": "compiling" }))
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let exe = env!("CARGO_BIN_EXE_expo-controller");
    let cases: [(&str, bool); 3] = [
        ("builds logs {id}", true),
        ("builds list --all --limit 5", false),
        ("builds watch {id} --interval-ms 50", true),
    ];
    for (args, json_lines) in cases {
        for over_http in [true, false] {
            let target = if over_http {
                format!("--server {} --api-key {API_KEY}", app.base)
            } else {
                format!("--database-url '{}'", app.database_url)
            };
            let args = args.replace("{id}", &id);
            let (group, rest) = args.split_once(' ').unwrap();
            // `watch` of a running build never ends by itself: head takes one line, the next change
            // meets the closed pipe.
            let head = if args.contains("watch") { 1 } else { 3 };
            let script =
                format!("'{exe}' {group} {target} {rest} | head -n {head}; echo \"exit=${{PIPESTATUS[0]}}\" >&2");
            let out = tokio::task::spawn_blocking(move || {
                std::process::Command::new("bash")
                    .args(["-c", &script])
                    .env_remove("DATABASE_URL")
                    .env_remove("CONTROLLER_URL")
                    .env_remove("CONTROLLER_API_KEY")
                    .output()
                    .unwrap()
            });
            let out = tokio::time::timeout(Duration::from_secs(60), out)
                .await
                .expect("the pipeline ends")
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("exit=0"), "{args} (http: {over_http}): {stderr}");
            assert!(!stderr.contains("panicked"), "{args}: {stderr}");
            assert_eq!(stdout.lines().count(), head, "{args}: {stdout}");
            if json_lines {
                for line in stdout.lines() {
                    let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{args}: {e}: {line}"));
                    assert!(value.is_object(), "{line}");
                }
            }
        }
    }
    heartbeats.abort();
}
