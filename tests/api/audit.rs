//! The audit log (identity.md, "Audit"): the walk over the route table (every state-changing route,
//! called successfully, writes exactly one row naming the actor and the client's address), the
//! dashboard's actions and sign-ins, the database-mode CLI, refusals that write nothing, the row in
//! the change's transaction, secrets never in a row, and reading it through `/api/v2/audit`.

use std::process::Command;

use reqwest::Method;
use serde_json::{Value, json};

use crate::identity::create_key;
use crate::support::{API_KEY, TestApp};

const AGENT: &str = "audit-walk/1.0";

/// The newest audit row.
async fn last_row(app: &TestApp) -> Value {
    sqlx::query_scalar::<_, sqlx::types::Json<Value>>("SELECT to_jsonb(a) FROM audit_events a ORDER BY id DESC LIMIT 1")
        .fetch_one(&app.pool)
        .await
        .unwrap()
        .0
}

/// Submits a build with `key`; answers its id.
async fn submit_as(app: &TestApp, key: &str) -> String {
    app.submit_with_key("ios", b"SRC", key).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn send(app: &TestApp, method: Method, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = app
        .client
        .request(method, app.url(path))
        .header("X-API-Key", key)
        .header("User-Agent", AGENT);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A build in the state a route needs, submitted with `key`.
async fn build_in(app: &TestApp, key: &str, state: &str) -> String {
    let id = submit_as(app, key).await;
    match state {
        "pending" => {}
        "cancelled" => {
            sqlx::query("UPDATE builds SET state = 'cancelled', completed_at = now() WHERE id = $1")
                .bind(&id)
                .execute(&app.pool)
                .await
                .unwrap();
        }
        "running" => {
            // Nothing else pending on ios: the new worker's poll takes this build.
            sqlx::query(
                "UPDATE builds SET state = 'cancelled', completed_at = now() WHERE id <> $1 AND state = 'pending'",
            )
            .bind(&id)
            .execute(&app.pool)
            .await
            .unwrap();
            let (worker, _) = app.register("runner", &["ios"]).await;
            let job = app.poll(&worker).await;
            assert_eq!(job["job"]["id"], id.as_str(), "{job}");
        }
        other => panic!("no fixture for a {other} build"),
    }
    id
}

/// The walk: every state-changing route of the route table (the served OpenAPI document: every
/// non-GET route an operator or admin key reaches, and the owner's actions on a build), called
/// successfully by a named key, writes exactly one audit row naming that key, its role, the client's
/// address and user agent, and the route's target. A new state-changing route fails here until it
/// has a fixture (and so an audit row).
#[tokio::test]
async fn every_state_changing_route_writes_exactly_one_audit_row() {
    let app = TestApp::spawn().await;
    let (_, doc) = send(&app, Method::GET, "/api/v2/openapi.json", API_KEY, None).await;
    let (operator_id, operator) = create_key(&app, "night shift", "operator").await;
    let (admin_id, admin) = create_key(&app, "owner", "admin").await;
    let (submitter_id, submitter) = create_key(&app, "alice", "submitter").await;

    let mut walked = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let role = operation["x-role"].as_str().unwrap_or("undecided");
            let owner_action = role == "submitter" && method == "post" && path.starts_with("/api/builds/{id}/");
            let changes = method != "get" && matches!(role, "operator" | "admin");
            if !changes && !owner_action {
                continue;
            }
            let (key, key_id, name) = match role {
                "operator" => (&operator, &operator_id, "night shift"),
                "admin" => (&admin, &admin_id, "owner"),
                _ => (&submitter, &submitter_id, "alice"),
            };
            // The target and body the route needs to succeed; builds are the owner's own, or the admin's.
            let submitter_key = if role == "submitter" {
                submitter.as_str()
            } else {
                API_KEY
            };
            let (target, body) = match (method.as_str(), path.as_str()) {
                ("post", "/api/v2/builds/{id}/cancel") | ("post", "/api/builds/{id}/cancel") => {
                    (build_in(&app, submitter_key, "pending").await, None)
                }
                ("patch", "/api/v2/builds/{id}") => (
                    build_in(&app, submitter_key, "pending").await,
                    Some(json!({ "priority": 7 })),
                ),
                ("post", "/api/v2/builds/{id}/tokens/revoke") => (build_in(&app, submitter_key, "pending").await, None),
                ("post", "/api/v2/builds/{id}/retry")
                | ("post", "/api/builds/{id}/retry")
                | ("delete", "/api/v2/builds/{id}") => (build_in(&app, submitter_key, "cancelled").await, None),
                ("post", "/api/v2/builds/{id}/requeue") => (build_in(&app, submitter_key, "running").await, None),
                ("post", "/api/v2/workers/{id}/drain")
                | ("post", "/api/v2/workers/{id}/disable")
                | ("post", "/api/v2/workers/{id}/enable")
                | ("post", "/api/v2/workers/{id}/release")
                | ("delete", "/api/v2/workers/{id}")
                | ("post", "/api/workers/{id}/unregister") => (app.register("walked", &["ios"]).await.0, None),
                ("post", "/api/v2/queues/{platform}/pause") | ("post", "/api/v2/queues/{platform}/resume") => {
                    ("ios".to_string(), None)
                }
                ("post", "/api/v2/keys") => (String::new(), Some(json!({ "name": "new one", "role": "viewer" }))),
                ("patch", "/api/v2/keys/{id}") => (
                    create_key(&app, "renamed", "viewer").await.0,
                    Some(json!({ "name": "renamed again" })),
                ),
                ("delete", "/api/v2/keys/{id}") => (create_key(&app, "to revoke", "viewer").await.0, None),
                _ => panic!(
                    "{method} {path} changes state but the walk has no fixture for it: add one (and its audit row)"
                ),
            };
            let concrete = path.replace("{id}", &target).replace("{platform}", &target);
            let before: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
                .fetch_one(&app.pool)
                .await
                .unwrap();
            let (status, answer) = send(
                &app,
                Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                &concrete,
                key,
                body,
            )
            .await;
            assert!((200..300).contains(&status), "{method} {concrete} → {status} {answer}");
            let after: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
                .fetch_one(&app.pool)
                .await
                .unwrap();
            assert_eq!(after - before, 1, "{method} {path}: exactly one audit row");
            let row = last_row(&app).await;
            assert_eq!(row["actor"], key_id.as_str(), "{method} {path}: {row}");
            assert_eq!(row["actor_name"], name, "{method} {path}: {row}");
            assert_eq!(row["role"], role, "{method} {path}: {row}");
            assert_eq!(row["client_ip"], "127.0.0.1", "{method} {path}: {row}");
            assert_eq!(row["user_agent"], AGENT, "{method} {path}: {row}");
            let target_id = if path == "/api/v2/keys" {
                answer["id"].clone()
            } else {
                json!(target)
            };
            assert_eq!(row["target_id"], target_id, "{method} {path}: {row}");
            walked.push(format!("{method} {path} → {}", row["action"].as_str().unwrap()));
        }
    }
    // Every change the spec names was walked (the document cannot silently shrink the walk).
    let actions: Vec<&str> = walked.iter().map(|w| w.rsplit(' ').next().unwrap()).collect();
    for action in [
        "build.cancel",
        "build.retry",
        "build.requeue",
        "build.priority",
        "build.delete",
        "build.token_revoke",
        "worker.drain",
        "worker.disable",
        "worker.enable",
        "worker.release",
        "worker.revoke",
        "queue.pause",
        "queue.resume",
        "key.create",
        "key.update",
        "key.revoke",
    ] {
        assert!(actions.contains(&action), "{action} not walked: {walked:?}");
    }
    assert_eq!(walked.len(), 19, "{walked:#?}");

    // Refused calls write nothing: a role that may not, a state that does not allow it, bad input.
    let (_, viewer) = create_key(&app, "wall", "viewer").await;
    let pending = build_in(&app, API_KEY, "pending").await;
    let cancelled = build_in(&app, API_KEY, "cancelled").await;
    let before = app.count("audit_events").await;
    let refusals = [
        (
            Method::POST,
            format!("/api/v2/builds/{pending}/cancel"),
            &viewer,
            None,
            403,
        ),
        (
            Method::POST,
            format!("/api/v2/builds/{cancelled}/cancel"),
            &operator,
            None,
            409,
        ),
        (
            Method::POST,
            format!("/api/v2/builds/{pending}/retry"),
            &operator,
            None,
            409,
        ),
        (
            Method::PATCH,
            format!("/api/v2/builds/{pending}"),
            &operator,
            Some(json!({ "priority": 1000 })),
            400,
        ),
        (
            Method::POST,
            "/api/v2/keys".to_string(),
            &admin,
            Some(json!({ "name": "x", "role": "root" })),
            400,
        ),
        (
            Method::POST,
            "/api/v2/queues/plan9/pause".to_string(),
            &operator,
            None,
            404,
        ),
        (
            Method::DELETE,
            "/api/v2/keys/nosuchkey0000".to_string(),
            &admin,
            None,
            404,
        ),
    ];
    for (method, path, key, body, expected) in refusals {
        let (status, answer) = send(&app, method.clone(), &path, key, body).await;
        assert_eq!(status, expected, "{method} {path}: {answer}");
    }
    assert_eq!(
        app.count("audit_events").await,
        before,
        "a refused call wrote an audit row"
    );

    // No secret in any row.
    let table: String =
        sqlx::query_scalar("SELECT coalesce(string_agg(to_jsonb(a)::text, ' '), '') FROM audit_events a")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    for secret in [&operator, &admin, &submitter, &viewer] {
        assert!(!table.contains(secret.as_str()), "a key's secret is in the audit log");
    }
    assert!(!table.contains(API_KEY));
}

/// The row is written in the change's transaction: when the audit insert fails, the change does not
/// happen (the build stays pending), and a change refused half-way leaves no row.
#[tokio::test]
async fn the_audit_row_and_the_change_commit_together() {
    let app = TestApp::spawn().await;
    let build = build_in(&app, API_KEY, "pending").await;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'audit refused'; END $$;
         CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION refuse_audit();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let (status, _) = send(
        &app,
        Method::POST,
        &format!("/api/v2/builds/{build}/cancel"),
        API_KEY,
        None,
    )
    .await;
    assert_eq!(status, 500);
    assert_eq!(
        crate::support::state_of(&app.pool, &build).await,
        "pending",
        "the change outlived its audit row"
    );
    let (status, _) = send(&app, Method::POST, "/api/v2/queues/ios/pause", API_KEY, None).await;
    assert_eq!(status, 500);
    let paused: bool = sqlx::query_scalar("SELECT paused FROM queues WHERE name = 'ios'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(!paused, "the queue paused without its audit row");
    let keys = app.count("api_keys").await;
    let (status, _) = send(
        &app,
        Method::POST,
        "/api/v2/keys",
        API_KEY,
        Some(json!({ "name": "k", "role": "viewer" })),
    )
    .await;
    assert_eq!(status, 500);
    assert_eq!(
        app.count("api_keys").await,
        keys,
        "a key was created without its audit row"
    );

    sqlx::raw_sql("DROP TRIGGER refuse_audit ON audit_events")
        .execute(&app.pool)
        .await
        .unwrap();
    let (status, _) = send(
        &app,
        Method::POST,
        &format!("/api/v2/builds/{build}/cancel"),
        API_KEY,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let row = last_row(&app).await;
    assert_eq!(row["action"], "build.cancel");
    assert_eq!(row["actor_name"], "admin");
    assert!(row["actor"].is_null());
    assert_eq!(row["before"]["state"], "pending");
    assert_eq!(row["after"]["state"], "cancelled");
}

/// Dashboard: a sign-in (success and failure, never the key), every action, and the sign-out each
/// write one row naming the session's key and the client's address; a viewer's forged action none.
#[tokio::test]
async fn dashboard_sign_ins_and_actions_are_audited() {
    let app = TestApp::spawn().await;
    let client = crate::dashboard::no_redirects();
    let (operator_id, operator) = create_key(&app, "night shift", "operator").await;
    let wrong = format!("efa_{}", "B".repeat(43));

    let before = app.count("audit_events").await;
    let r = client
        .post(app.url("/dashboard/login"))
        .header("Origin", &app.base)
        .header("User-Agent", AGENT)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("key={wrong}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(app.count("audit_events").await, before + 1);
    let row = last_row(&app).await;
    assert_eq!(row["action"], "dashboard.sign_in");
    assert_eq!(row["after"]["outcome"], "refused");
    assert_eq!(row["client_ip"], "127.0.0.1");
    assert_eq!(row["user_agent"], AGENT);
    assert!(!row.to_string().contains(&wrong[4..]), "the refused key is in the row");

    let r = crate::dashboard::login(&app, &client, format!("key={operator}")).await;
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let row = last_row(&app).await;
    assert_eq!(
        (row["action"].as_str(), row["actor"].as_str()),
        (Some("dashboard.sign_in"), Some(operator_id.as_str()))
    );
    assert_eq!(row["after"]["outcome"], "signed_in");
    assert!(!row.to_string().contains(&operator[4..]));

    let page = client
        .get(app.url("/dashboard/workers"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let csrf = crate::dashboard::csrf_of(&page.text().await.unwrap());
    // The running one first: its fixture cancels whatever else is pending.
    let running = build_in(&app, API_KEY, "running").await;
    let pending = build_in(&app, API_KEY, "pending").await;
    let other = build_in(&app, API_KEY, "pending").await;
    let cancelled = build_in(&app, API_KEY, "cancelled").await;
    let (worker, _) = app.register("mac", &["ios"]).await;
    let actions = [
        (
            format!("/dashboard/builds/{pending}/priority"),
            format!("csrf={csrf}&priority=5"),
            "build.priority",
        ),
        (
            format!("/dashboard/builds/{pending}/cancel"),
            format!("csrf={csrf}"),
            "build.cancel",
        ),
        (
            format!("/dashboard/builds/{cancelled}/retry"),
            format!("csrf={csrf}"),
            "build.retry",
        ),
        (
            format!("/dashboard/builds/{running}/requeue"),
            format!("csrf={csrf}"),
            "build.requeue",
        ),
        (
            "/dashboard/builds/bulk".to_string(),
            format!("csrf={csrf}&action=cancel&id={other}"),
            "build.cancel",
        ),
        (
            format!("/dashboard/workers/{worker}/drain"),
            format!("csrf={csrf}"),
            "worker.drain",
        ),
        (
            format!("/dashboard/workers/{worker}/disable"),
            format!("csrf={csrf}"),
            "worker.disable",
        ),
        (
            format!("/dashboard/workers/{worker}/enable"),
            format!("csrf={csrf}"),
            "worker.enable",
        ),
        (
            format!("/dashboard/workers/{worker}/release"),
            format!("csrf={csrf}"),
            "worker.release",
        ),
        (
            "/dashboard/queues/ios/pause".to_string(),
            format!("csrf={csrf}"),
            "queue.pause",
        ),
        (
            "/dashboard/queues/ios/resume".to_string(),
            format!("csrf={csrf}"),
            "queue.resume",
        ),
    ];
    for (path, body, action) in &actions {
        let before = app.count("audit_events").await;
        let r = crate::dashboard::post_form(&client, &app, path, Some(&cookie), body.clone()).await;
        assert_eq!(r.status(), 303, "{path}");
        let location = r.headers()["location"].to_str().unwrap().to_string();
        assert!(!location.contains("error="), "{path} → {location}");
        assert_eq!(app.count("audit_events").await, before + 1, "{path}");
        let row = last_row(&app).await;
        assert_eq!(row["action"], *action, "{path}: {row}");
        assert_eq!(row["actor"], operator_id.as_str(), "{path}: {row}");
        assert_eq!(row["actor_name"], "night shift");
        assert_eq!(row["role"], "operator");
        assert_eq!(row["client_ip"], "127.0.0.1");
    }

    // The admin's: create and revoke a key.
    let admin_cookie = crate::dashboard::sign_in(&app, &client).await;
    let page = client
        .get(app.url("/dashboard/keys"))
        .header("cookie", &admin_cookie)
        .send()
        .await
        .unwrap();
    let admin_csrf = crate::dashboard::csrf_of(&page.text().await.unwrap());
    let before = app.count("audit_events").await;
    let r = crate::dashboard::post_form(
        &client,
        &app,
        "/dashboard/keys",
        Some(&admin_cookie),
        format!("csrf={admin_csrf}&name=lobby&role=viewer"),
    )
    .await;
    assert_eq!(r.status(), 200);
    let created = last_row(&app).await;
    assert_eq!(
        (created["action"].as_str(), created["actor_name"].as_str()),
        (Some("key.create"), Some("admin"))
    );
    let key_id = created["target_id"].as_str().unwrap().to_string();
    let r = crate::dashboard::post_form(
        &client,
        &app,
        &format!("/dashboard/keys/{key_id}/revoke"),
        Some(&admin_cookie),
        format!("csrf={admin_csrf}"),
    )
    .await;
    assert_eq!(r.status(), 303);
    assert_eq!(last_row(&app).await["action"], "key.revoke");
    assert_eq!(app.count("audit_events").await, before + 2);

    // Sign-out.
    let r = crate::dashboard::post_form(
        &client,
        &app,
        "/dashboard/logout",
        Some(&cookie),
        format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(r.status(), 303);
    let row = last_row(&app).await;
    assert_eq!(
        (row["action"].as_str(), row["actor"].as_str()),
        (Some("dashboard.sign_out"), Some(operator_id.as_str()))
    );

    // A viewer's forged action is refused and writes nothing.
    let (_, viewer) = create_key(&app, "wall", "viewer").await;
    let r = crate::dashboard::login(&app, &client, format!("key={viewer}")).await;
    let viewer_cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let page = client
        .get(app.url("/dashboard/workers"))
        .header("cookie", &viewer_cookie)
        .send()
        .await
        .unwrap();
    let viewer_csrf = crate::dashboard::csrf_of(&page.text().await.unwrap());
    let before = app.count("audit_events").await;
    let r = crate::dashboard::post_form(
        &client,
        &app,
        "/dashboard/queues/ios/pause",
        Some(&viewer_cookie),
        format!("csrf={viewer_csrf}"),
    )
    .await;
    assert_eq!(r.status(), 403);
    assert_eq!(app.count("audit_events").await, before);

    // The Audit page is the admin's: linked in the admin's nav, filtered like the API; refused to others.
    let page = client
        .get(app.url("/dashboard/audit?action=worker.*"))
        .header("cookie", &admin_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains("href=\"/dashboard/audit\""),
        "no Audit link for the admin"
    );
    assert!(html.contains("worker.drain") && html.contains("night shift") && html.contains("127.0.0.1"));
    assert!(!html.contains("queue.pause"), "the filter was not applied");
    let r = client
        .get(app.url("/dashboard/audit"))
        .header("cookie", &viewer_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let workers = client
        .get(app.url("/dashboard/workers"))
        .header("cookie", &viewer_cookie)
        .send()
        .await
        .unwrap();
    assert!(
        !workers.text().await.unwrap().contains("/dashboard/audit"),
        "an Audit link for a viewer"
    );
}

/// The database-mode CLI names its user (`cli:<$USER>`); `audit list` reads the log in both modes.
// The CLI runs as a blocking child process while this process serves it: multi-threaded runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_mode_cli_is_audited_as_its_os_user() {
    let app = TestApp::spawn().await;
    let build = build_in(&app, API_KEY, "pending").await;
    let output = Command::new(env!("CARGO_BIN_EXE_expo-controller"))
        .env_remove("DATABASE_URL")
        .env_remove("CONTROLLER_URL")
        .env_remove("CONTROLLER_API_KEY")
        .env("USER", "alice")
        .args([
            "builds",
            "--json",
            "--database-url",
            &app.database_url,
            "cancel",
            &build,
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let row = last_row(&app).await;
    assert_eq!(row["action"], "build.cancel");
    assert_eq!(row["actor_name"], "cli:alice");
    assert_eq!(row["target_id"], build.as_str());
    assert!(row["actor"].is_null() && row["client_ip"].is_null());

    // `audit list` reads it in both modes, with the same JSON.
    let list = |over_http: bool, args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_expo-controller"));
        command
            .env_remove("DATABASE_URL")
            .env_remove("CONTROLLER_URL")
            .env_remove("CONTROLLER_API_KEY")
            .args(["audit", "--json"]);
        if over_http {
            command.args(["--server", &app.base, "--api-key", API_KEY]);
        } else {
            command.args(["--database-url", &app.database_url]);
        }
        let output = command.arg("list").args(args).output().unwrap();
        let text = if output.status.success() {
            output.stdout
        } else {
            output.stderr
        };
        (
            output.status.code(),
            serde_json::from_slice::<Value>(&text).unwrap_or(Value::Null),
        )
    };
    let filters = [
        "--actor",
        "cli:alice",
        "--action",
        "build.cancel",
        "--target",
        build.as_str(),
    ];
    let (code_db, db) = list(false, &filters);
    let (code_http, http) = list(true, &filters);
    assert_eq!((code_db, code_http), (Some(0), Some(0)), "{db} / {http}");
    assert_eq!(db, http);
    assert_eq!(db["items"].as_array().unwrap().len(), 1, "{db}");
    assert_eq!(db["items"][0]["actor_name"], "cli:alice");
    let (_, none) = list(false, &["--actor", "cli:bob"]);
    assert!(none["items"].as_array().unwrap().is_empty());
    // Ids may begin with '-' (one in 64 does): `--target` takes them as values, in both modes.
    for over_http in [false, true] {
        let (code, none) = list(over_http, &["--target", "-Ab3_leading-hyphen"]);
        assert_eq!(code, Some(0), "{none}");
    }
    for over_http in [false, true] {
        let (code, refused) = list(over_http, &["--since", "yesterday"]);
        assert_eq!(code, Some(1), "{refused}");
        assert!(refused["error"].as_str().unwrap().contains("since"), "{refused}");
    }
}

/// `GET /api/v2/audit`: the admin's, newest first, with actor/action/target/since filters, a cursor,
/// and bad filters refused with 400.
#[tokio::test]
async fn the_audit_log_is_read_through_the_api_with_filters() {
    let app = TestApp::spawn().await;
    let (operator_id, operator) = create_key(&app, "night shift", "operator").await;
    let first = build_in(&app, API_KEY, "pending").await;
    let second = build_in(&app, API_KEY, "pending").await;
    for id in [&first, &second] {
        let (status, _) = send(
            &app,
            Method::POST,
            &format!("/api/v2/builds/{id}/cancel"),
            &operator,
            None,
        )
        .await;
        assert_eq!(status, 200);
    }
    let (status, _) = send(&app, Method::POST, "/api/v2/queues/ios/pause", API_KEY, None).await;
    assert_eq!(status, 200);

    let (status, page) = send(&app, Method::GET, "/api/v2/audit", API_KEY, None).await;
    assert_eq!(status, 200, "{page}");
    let items = page["items"].as_array().unwrap();
    assert_eq!(items[0]["action"], "queue.pause", "newest first");
    let (_, mine) = send(
        &app,
        Method::GET,
        &format!("/api/v2/audit?actor={operator_id}"),
        API_KEY,
        None,
    )
    .await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 2);
    let (_, by_name) = send(
        &app,
        Method::GET,
        "/api/v2/audit?actor=night%20shift&action=build.cancel",
        API_KEY,
        None,
    )
    .await;
    assert_eq!(by_name["items"].as_array().unwrap().len(), 2);
    let (_, kind) = send(&app, Method::GET, "/api/v2/audit?action=build.*", API_KEY, None).await;
    assert!(
        kind["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["action"].as_str().unwrap().starts_with("build."))
    );
    let (_, target) = send(
        &app,
        Method::GET,
        &format!("/api/v2/audit?target={first}"),
        API_KEY,
        None,
    )
    .await;
    assert_eq!(target["items"].as_array().unwrap().len(), 1);
    assert_eq!(target["items"][0]["target_id"], first.as_str());
    let (_, one) = send(
        &app,
        Method::GET,
        "/api/v2/audit?action=build.cancel&limit=1",
        API_KEY,
        None,
    )
    .await;
    assert_eq!(one["items"][0]["target_id"], second.as_str());
    let cursor = one["next_cursor"].as_str().unwrap().to_string();
    let (_, older) = send(
        &app,
        Method::GET,
        &format!("/api/v2/audit?action=build.cancel&limit=1&cursor={cursor}"),
        API_KEY,
        None,
    )
    .await;
    assert_eq!(older["items"][0]["target_id"], first.as_str());
    let (_, future) = send(
        &app,
        Method::GET,
        "/api/v2/audit?since=2999-01-01T00:00:00Z",
        API_KEY,
        None,
    )
    .await;
    assert!(future["items"].as_array().unwrap().is_empty());

    for bad in ["since=yesterday", "cursor=abc", "limit=0", "colour=red"] {
        let (status, answer) = send(&app, Method::GET, &format!("/api/v2/audit?{bad}"), API_KEY, None).await;
        assert_eq!(status, 400, "{bad}: {answer}");
    }
    let (status, _) = send(&app, Method::GET, "/api/v2/audit", &operator, None).await;
    assert_eq!(status, 403, "the admin's");
}

/// Retention is the only deletion: the prune job drops rows older than `CONTROLLER_AUDIT_RETENTION_DAYS`
/// and keeps the rest.
#[tokio::test]
async fn the_prune_job_keeps_audit_rows_for_their_retention() {
    use expo_controller::jobs::{Job, JobContext};
    let app = TestApp::spawn().await;
    sqlx::raw_sql(
        "INSERT INTO audit_events (at, actor_name, role, action) VALUES
           (now() - interval '400 days', 'admin', 'admin', 'queue.pause'),
           (now() - interval '300 days', 'admin', 'admin', 'queue.resume')",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let ctx = JobContext {
        pool: app.pool.clone(),
        storage: expo_controller::storage::Storage::local(&app.storage_dir, false).unwrap(),
        settings: Default::default(),
        jobs: Default::default(),
    };
    Job::Prune.run_once(&ctx, chrono::Utc::now()).await.unwrap();
    let left: Vec<String> = sqlx::query_scalar("SELECT action FROM audit_events")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(left, ["queue.resume"]);
}
