//! `expo-controller builds|queues|workers`: the same operations, the same JSON and the same errors
//! whether the CLI talks to a server (`--server`) or to the database directly.

use std::process::Command;

use serde_json::Value;

use crate::support::{API_KEY, TestApp};

/// Runs the CLI; returns (success, stdout JSON or stderr JSON).
fn run(app: &TestApp, over_http: bool, args: &[&str]) -> (bool, Value) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_expo-controller"));
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("CONTROLLER_URL")
        .env_remove("CONTROLLER_API_KEY");
    if over_http {
        command.args(["--server", &app.base, "--api-key", API_KEY]);
    } else {
        command.args(["--database-url", &app.database_url]);
    }
    let output = command.output().unwrap();
    let text = if output.status.success() {
        output.stdout
    } else {
        output.stderr
    };
    (
        output.status.success(),
        serde_json::from_slice(&text).unwrap_or(Value::Null),
    )
}

// The CLI runs as a blocking child process while this process serves it: multi-threaded runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_modes_behave_the_same() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("w", &["ios"]).await;
    let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();

    for args in [
        vec!["builds", "show", id.as_str()],
        vec!["builds", "list"],
        vec!["workers", "list"],
    ] {
        let (ok_http, http) = run(&app, true, &args);
        let (ok_db, db) = run(&app, false, &args);
        assert!(ok_http && ok_db, "{args:?}: {http} / {db}");
        assert_eq!(http, db, "{args:?}");
    }
    let (_, listed) = run(&app, false, &["builds", "list", "--state", "pending"]);
    assert_eq!(listed["items"][0]["id"], id.as_str());

    // Pause through the database, resume through the server: both are visible to both.
    let (ok, paused) = run(&app, false, &["queues", "pause", "ios"]);
    assert!(ok);
    assert_eq!(paused["paused"], true);
    assert_eq!(
        app.poll(&worker_id).await["job"],
        Value::Null,
        "paused queue hands out nothing"
    );
    let (ok, resumed) = run(&app, true, &["queues", "resume", "ios"]);
    assert!(ok && resumed["paused"] == false);

    // Errors are the same too.
    assert_eq!(
        run(&app, true, &["builds", "show", "nosuchbuild"]),
        (
            false,
            serde_json::json!({ "error": "Build not found", "code": "build_not_found" })
        )
    );
    assert_eq!(
        run(&app, false, &["builds", "show", "nosuchbuild"]),
        (
            false,
            serde_json::json!({ "error": "Build not found", "code": "build_not_found" })
        )
    );
    assert_eq!(
        run(&app, true, &["builds", "retry", &id]).1["error"],
        "Only failed or cancelled builds can be retried"
    );
    assert_eq!(
        run(&app, false, &["builds", "retry", &id]).1["error"],
        "Only failed or cancelled builds can be retried"
    );

    // Claim, requeue through the server, cancel through the database, retry through the server.
    assert_eq!(app.poll(&worker_id).await["job"]["id"], id.as_str());
    let (ok, requeued) = run(&app, true, &["builds", "requeue", &id]);
    assert!(ok && requeued["state"] == "pending", "{requeued}");
    let (ok, cancelled) = run(&app, false, &["builds", "cancel", &id]);
    assert!(ok && cancelled["state"] == "cancelled");
    let (ok, retried) = run(&app, true, &["builds", "retry", &id]);
    assert!(ok && retried["state"] == "pending");

    // Workers: drain through the database, revoke through the server.
    let (ok, drained) = run(&app, false, &["workers", "drain", &worker_id]);
    assert!(ok && drained["admin_state"] == "draining");
    let (ok, revoked) = run(&app, true, &["workers", "revoke", &worker_id]);
    assert!(ok && revoked["admin_state"] == "revoked");
}
