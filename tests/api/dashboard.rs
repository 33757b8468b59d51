//! The dashboard: sign-in, sessions and cross-site protection over real HTTP, the metrics families the
//! overview needs, and the whole dashboard in a real browser (tests/browser/dashboard.mjs, Debian's
//! Chromium driven by playwright-core) against this server and its PostgreSQL database.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::{API_KEY, TestApp};

/// A client that shows redirects instead of following them (shared with `dashboard_cache`).
pub(crate) fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Signs in; returns the `name=value` of the session cookie.
pub(crate) async fn sign_in(app: &TestApp, client: &reqwest::Client) -> String {
    let r = login(app, client, format!("key={API_KEY}")).await;
    assert_eq!(r.status(), 303);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for flag in ["HttpOnly", "SameSite=Strict", "Max-Age=", "Path=/"] {
        assert!(set.contains(flag), "{flag} missing from {set}");
    }
    assert!(!set.contains(API_KEY), "the cookie never carries the key");
    set.split(';').next().unwrap().to_string()
}

/// Posts the sign-in form (`body`, e.g. `key=…&next=…`) from the dashboard's own origin.
pub(crate) async fn login(app: &TestApp, client: &reqwest::Client, body: String) -> reqwest::Response {
    client
        .post(app.url("/dashboard/login"))
        .header("Origin", &app.base)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Signs in to the dashboard with `key`; the session cookie (`name=value`), or the refusal's status.
pub(crate) async fn sign_in_as(app: &TestApp, client: &reqwest::Client, key: &str) -> Result<String, u16> {
    let r = login(app, client, format!("key={key}")).await;
    if r.status() != 303 {
        return Err(r.status().as_u16());
    }
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    Ok(set.split(';').next().unwrap().to_string())
}

pub(crate) fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + "name=\"csrf\" value=\"".len();
    html[at..].split('"').next().unwrap().to_string()
}

/// A same-origin form POST to the dashboard, with the session `cookie` when given.
pub(crate) async fn post_form(
    client: &reqwest::Client,
    app: &TestApp,
    path: &str,
    cookie: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut request = client.post(app.url(path)).header("Origin", &app.base);
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    request.body(body).send().await.unwrap()
}

#[tokio::test]
async fn sign_in_sessions_and_cross_site_protection() {
    let app = TestApp::spawn_with(|c| c.dashboard.dashboard_signins_per_minute = 3).await;
    let client = no_redirects();
    let r = client.get(app.url("/")).send().await.unwrap();
    assert_eq!(r.headers()["location"], "/dashboard");
    for path in [
        "/dashboard",
        "/dashboard/builds",
        "/dashboard/workers",
        "/dashboard/queues",
    ] {
        let r = client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 303, "{path} without a session");
        // The page asked for rides along, so sign-in leads back to it (the overview needs no hint).
        let wanted = if path == "/dashboard" {
            "/dashboard/login".to_string()
        } else {
            format!("/dashboard/login?next={}", path.replace('/', "%2F"))
        };
        assert_eq!(r.headers()["location"], wanted.as_str());
    }
    let r = client.get(app.url("/dashboard/events")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // A wrong key: refused after the delay, no cookie, no session row.
    let started = Instant::now();
    let r = post_form(
        &client,
        &app,
        "/dashboard/login",
        None,
        "key=wrong-key-wrong-key-wrong-key-wrong",
    )
    .await;
    assert_eq!(r.status(), 401);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "answered after {:?}",
        started.elapsed()
    );
    assert!(r.headers().get("set-cookie").is_none());
    assert_eq!(app.count("dashboard_sessions").await, 0);

    // The right key from another origin is refused too.
    let r = client
        .post(app.url("/dashboard/login"))
        .header("Origin", "http://evil.example")
        .body(format!("key={API_KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let cookie = sign_in(&app, &client).await;
    let id = cookie.split_once('=').unwrap().1;
    let stored: Vec<u8> = sqlx::query_scalar("SELECT id_hash FROM dashboard_sessions")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        stored,
        expo_controller::ids::hash_secret(id),
        "only a hash of the session id is stored"
    );

    // T6: wrong keys are limited per IP (3 per minute here, 1 used above); the right key never is, so
    // someone guessing behind the same address cannot lock the operator out.
    // Every wrong key waits out the delay, the limited ones (429) too, so a guesser gains no pace from
    // the limit.
    for expected in [401, 401, 429, 429] {
        let started = std::time::Instant::now();
        let r = post_form(&client, &app, "/dashboard/login", None, "key=wrong-again").await;
        assert_eq!(r.status(), expected);
        assert!(
            started.elapsed() >= expo_controller::dashboard::session::WRONG_KEY_DELAY,
            "a wrong key ({expected}) answered after {:?}",
            started.elapsed()
        );
    }
    let r = post_form(&client, &app, "/dashboard/login", None, format!("key={API_KEY}")).await;
    assert_eq!(r.status(), 303, "the right key after the limit was reached");
    assert!(r.headers().get("set-cookie").is_some());

    let page = client
        .get(app.url("/dashboard/queues"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let csrf = csrf_of(&page.text().await.unwrap());

    let paused = || async {
        sqlx::query_scalar::<_, bool>("SELECT paused FROM queues WHERE name = 'ios'")
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };
    for (origin, body) in [
        ("http://evil.example", format!("csrf={csrf}")),
        (app.base.as_str(), "csrf=forged".to_string()),
        (app.base.as_str(), String::new()),
    ] {
        let r = client
            .post(app.url("/dashboard/queues/ios/pause"))
            .header("cookie", &cookie)
            .header("Origin", origin)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "origin {origin}, body {body}");
        assert!(!paused().await, "a refused request changes nothing");
    }
    let r = post_form(
        &client,
        &app,
        "/dashboard/queues/ios/pause",
        Some(&cookie),
        format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(r.status(), 303);
    assert!(paused().await);

    // Oversized form bodies are refused before anything is read into memory.
    let r = post_form(&client, &app, "/dashboard/login", None, vec![b'a'; 64 * 1024]).await;
    assert!(r.status() == 413 || r.status() == 429, "{}", r.status());
    // A caller without a session gets no more than a couple of KiB read for a sign-in.
    let r = post_form(
        &client,
        &app,
        "/dashboard/login",
        None,
        format!("key={}", "a".repeat(4 * 1024)),
    )
    .await;
    assert!(r.status() == 413 || r.status() == 429, "{}", r.status());

    // Log-out ends the session on the server: the same cookie no longer works.
    let r = post_form(
        &client,
        &app,
        "/dashboard/logout",
        Some(&cookie),
        format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(r.status(), 303);
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    assert_eq!(
        app.count("dashboard_sessions").await,
        1,
        "only the session of the T6 sign-in is left"
    );
    let r = client
        .get(app.url("/dashboard/queues"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
}

#[tokio::test]
async fn pages_render_and_bad_input_is_refused() {
    let app = TestApp::spawn().await;
    let client = no_redirects();
    let cookie = sign_in(&app, &client).await;
    let submitted = app.submit("ios", b"source").await;
    let id = submitted["id"].as_str().unwrap();
    let get = |path: String| {
        let (client, cookie) = (client.clone(), cookie.clone());
        let url = app.url(&path);
        async move { client.get(url).header("cookie", cookie).send().await.unwrap() }
    };
    for path in [
        "/dashboard".to_string(),
        "/dashboard?fragment=1".to_string(),
        "/dashboard/builds?state=pending&platform=ios&within=24".to_string(),
        format!("/dashboard/builds?id={id}"),
        format!("/dashboard/builds/{id}"),
        format!("/dashboard/builds/{id}/logs?after=0"),
        "/dashboard/workers".to_string(),
        "/dashboard/queues".to_string(),
        "/dashboard/assets/app.js".to_string(),
    ] {
        let r = get(path.clone()).await;
        assert_eq!(r.status(), 200, "{path}");
    }
    let list = get("/dashboard/builds?state=pending".to_string())
        .await
        .text()
        .await
        .unwrap();
    assert!(list.contains(&format!("data-build=\"{id}\"")));
    let none = get("/dashboard/builds?state=completed".to_string())
        .await
        .text()
        .await
        .unwrap();
    assert!(
        !none.contains(&format!("data-build=\"{id}\"")),
        "the state filter applies"
    );
    for path in [
        "/dashboard/builds?state=nonsense",
        "/dashboard/builds?platform=windows",
        "/dashboard/builds?within=5",
        "/dashboard/builds?before=..%2Fetc",
        "/dashboard/builds/x/logs?after=-1",
    ] {
        let r = get(path.to_string()).await;
        assert!(r.status() == 400 || r.status() == 404, "{path}: {}", r.status());
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    }
    let r = get("/dashboard/builds/NOPE0000000000000000000000".to_string()).await;
    assert_eq!(r.status(), 404);
    // Downloads stream the source for a signed-in operator only.
    let r = get(format!("/dashboard/builds/{id}/download/source")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"source");
    let r = client
        .get(app.url(&format!("/dashboard/builds/{id}/download/source")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
}

#[tokio::test]
async fn metrics_families_are_described_and_present_from_start() {
    let app = TestApp::spawn().await;
    let text = app
        .client
        .get(app.url("/metrics"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for family in [
        "expo_workers",
        "expo_build_duration_seconds",
        "expo_build_queue_wait_seconds",
        "expo_build_failures_total",
        "expo_job_runs_total",
        "expo_job_errors_total",
        "expo_db_pool_connections",
        "expo_builds_finished_total",
        "expo_queue_depth",
    ] {
        assert!(text.contains(&format!("# HELP {family} ")), "no HELP for {family}");
    }
    for series in [
        "expo_workers{status=\"idle\"}",
        "expo_workers{status=\"busy\"}",
        "expo_workers{status=\"offline\"}",
        "expo_build_failures_total{reason=\"build_failure\"}",
        "expo_build_failures_total{reason=\"timeout\"}",
        "expo_job_runs_total{job=\"rescue_expired_leases\"}",
        "expo_job_errors_total{job=\"prune\"}",
        "expo_db_pool_connections{state=\"in_use\"}",
        "expo_build_queue_wait_seconds_count{platform=\"ios\"}",
        "expo_build_duration_seconds_count{platform=\"android\",outcome=\"completed\"}",
    ] {
        assert!(text.contains(series), "{series} missing from /metrics");
    }
}

/// The whole dashboard in Chromium; screenshots land in `target/screenshots/`.
#[tokio::test]
async fn dashboard_in_a_real_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/browser/dashboard.mjs");
    assert!(
        std::process::Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "node is required for the browser tests (apt-get install nodejs; make test installs it: scripts/setup.sh)"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "Debian's Chromium is required for the browser tests: apt-get install chromium (make test installs it: scripts/setup.sh)"
    );
    assert!(
        root.join("tests/browser/node_modules/playwright-core").exists(),
        "playwright-core is missing: npm ci --prefix tests/browser (scripts/test.sh does it)"
    );
    let app = TestApp::spawn().await;
    let base = app.base.clone();
    let shots = root.join("target/screenshots");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(script)
            .arg(base)
            .arg(API_KEY)
            .arg(shots)
            .current_dir(root)
            .output()
    })
    .await
    .unwrap()
    .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(output.status.success(), "browser tests failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("dashboard browser tests passed"));
}

/// T15: a CR/LF (or any control character) in a bulk form's return path is a redirect to the list, not
/// a 500 from building an impossible `Location` header.
#[tokio::test]
async fn t15_control_characters_in_a_bulk_form_are_not_a_500() {
    let app = TestApp::spawn().await;
    let client = no_redirects();
    let cookie = sign_in(&app, &client).await;
    let page = client
        .get(app.url("/dashboard/builds"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let csrf = csrf_of(&page.text().await.unwrap());
    let id = app.submit("ios", b"source").await["id"].as_str().unwrap().to_string();
    for ret in [
        "/dashboard/builds%0D%0ASet-Cookie:%20x=1",
        "/dashboard/builds%0A",
        "/dashboard/builds%09x",
    ] {
        let body = format!("csrf={csrf}&action=cancel&id={id}&return={ret}");
        let r = post_form(&client, &app, "/dashboard/builds/bulk", Some(&cookie), body).await;
        assert_eq!(r.status(), 303, "{ret}");
        let location = r.headers()["location"].to_str().unwrap().to_string();
        assert!(location.starts_with("/dashboard/builds?"), "{location}");
        assert!(r.headers().get("set-cookie").is_none());
    }
}
