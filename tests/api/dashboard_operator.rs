//! The operator's day (issue 23) over real HTTP: names where the tables held ids, a worker page, the
//! whole log (earlier lines, search, a plain-text download), short-id search, links that survive
//! sign-in, an HTML 404 for unknown dashboard pages and idle counts that count only Macs that can work.

use crate::dashboard::{no_redirects, sign_in};
use crate::support::{API_KEY, TestApp};

async fn page(app: &TestApp, client: &reqwest::Client, cookie: &str, path: &str) -> (u16, String, String) {
    let r = client.get(app.url(path)).header("cookie", cookie).send().await.unwrap();
    let status = r.status().as_u16();
    let kind = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_string())
        .unwrap_or_default();
    (status, kind, r.text().await.unwrap())
}

#[tokio::test]
async fn names_worker_page_whole_log_and_short_ids() {
    let app = TestApp::spawn().await;
    let client = no_redirects();
    let cookie = sign_in(&app, &client).await;
    let (worker, _) = app.register("mac-mini-m1-ams", &["ios"]).await;
    let submitted = app.submit("ios", b"source").await;
    let id = submitted["id"].as_str().unwrap().to_string();
    assert_eq!(app.poll(&worker).await["job"]["id"], id.as_str());
    let logs: Vec<_> = (1..=600)
        .map(|i| serde_json::json!({"level": "info", "message": format!("\u{1b}[1m\u{1b}[32m✔\u{1b}[0m line {i}")}))
        .collect();
    let r = app
        .client
        .post(app.url(&format!("/api/builds/{id}/logs?worker_id={worker}")))
        .header("X-API-Key", API_KEY)
        .json(&serde_json::json!({ "logs": logs }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Names, with the id on hover, in the builds list and on the build page.
    let (_, _, list) = page(&app, &client, &cookie, "/dashboard/builds").await;
    assert!(list.contains(">mac-mini-m1-ams</a>"), "the worker's name in the list");
    assert!(list.contains(&format!("href=\"/dashboard/workers/{worker}\"")));
    // The worker filter takes a name as well as an id.
    for filter in ["mac-mini-m1-ams", worker.as_str()] {
        let (status, _, found) = page(&app, &client, &cookie, &format!("/dashboard/builds?worker={filter}")).await;
        assert_eq!(status, 200);
        assert!(
            found.contains(&format!("data-build=\"{id}\"")),
            "worker filter {filter}"
        );
    }
    // The first ten characters, as the tables show them, find the build.
    let (_, _, found) = page(&app, &client, &cookie, &format!("/dashboard/builds?id={}", &id[..10])).await;
    assert!(found.contains(&format!("data-build=\"{id}\"")), "short-id search");

    // The build page: colours as classes, the tail only, then every earlier line on request.
    let (_, _, build) = page(&app, &client, &cookie, &format!("/dashboard/builds/{id}")).await;
    assert!(
        build.contains("<span class=\"ansi-b ansi-fg2\">✔</span> line 600"),
        "coloured line"
    );
    assert!(!build.contains('\u{1b}'), "no raw escape codes");
    assert!(!build.contains("data-seq=\"1\""), "the first line is not in the tail");
    assert!(build.contains("id=\"log-earlier\""));
    let (_, _, earlier) = page(
        &app,
        &client,
        &cookie,
        &format!("/dashboard/builds/{id}/logs?before=401"),
    )
    .await;
    assert!(earlier.contains("data-seq=\"1\"") && earlier.contains("data-seq=\"400\""));
    assert!(!earlier.contains("data-seq=\"401\""));
    // Search within the whole log.
    let (_, _, searched) = page(&app, &client, &cookie, &format!("/dashboard/builds/{id}?q=line+7")).await;
    assert!(searched.contains("id=\"log-results\""));
    assert!(
        searched.contains("line 7</span>") || searched.contains("line 7<"),
        "{searched}"
    );
    // The whole log as plain text.
    let r = client
        .get(app.url(&format!("/dashboard/builds/{id}/log.txt")))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    assert!(
        r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .contains("attachment")
    );
    let text = r.text().await.unwrap();
    // Every line the worker sent (after the controller's own, e.g. the assignment), colour codes removed.
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("✔ line ")).collect();
    assert_eq!(lines.len(), 600);
    assert!(
        lines[0].ends_with("✔ line 1") && lines[599].ends_with("✔ line 600"),
        "{}",
        lines[0]
    );
    assert!(!text.contains('\u{1b}'));

    // The worker's page.
    let (status, _, worker_page) = page(&app, &client, &cookie, &format!("/dashboard/workers/{worker}")).await;
    assert_eq!(status, 200);
    assert!(worker_page.contains("mac-mini-m1-ams"));
    assert!(
        worker_page.contains(&format!("href=\"/dashboard/builds/{id}\"")),
        "its current build"
    );
    assert!(worker_page.contains("Drain"), "its actions");
    let (status, kind, missing) = page(&app, &client, &cookie, "/dashboard/workers/nobody").await;
    assert_eq!((status, kind.starts_with("text/html")), (404, true), "{missing}");

    // A requeued build waits: no heartbeat, progress or running duration of the attempt it lost.
    let r = app
        .client
        .post(app.url(&format!("/api/builds/{id}/heartbeat?worker_id={worker}")))
        .header("X-API-Key", API_KEY)
        .json(&serde_json::json!({"progress": 90, "stage": "Archiving"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .client
        .post(app.url(&format!("/api/v2/builds/{id}/requeue")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The dashboard's read cache may answer from before the requeue until its event arrives (≤ 1 s TTL).
    let mut waiting = String::new();
    for _ in 0..30 {
        waiting = page(&app, &client, &cookie, &format!("/dashboard/builds/{id}?fragment=1"))
            .await
            .2;
        if waiting.contains("<dt>Duration</dt><dd>—</dd>") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(waiting.contains("<dt>Duration</dt><dd>—</dd>"), "{waiting}");
    for field in ["Progress", "Last heartbeat"] {
        assert!(
            waiting.contains(&format!("<dt>{field}</dt><dd><span class=\"muted\">—</span></dd>")),
            "{field} of a waiting build: {waiting}"
        );
    }
    assert!(!waiting.contains("Archiving"));
}

#[tokio::test]
async fn unknown_pages_are_html_and_links_survive_sign_in() {
    let app = TestApp::spawn().await;
    let client = no_redirects();
    let r = client
        .get(app.url("/dashboard/builds?state=failed"))
        .send()
        .await
        .unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(location, "/dashboard/login?next=%2Fdashboard%2Fbuilds%3Fstate%3Dfailed");
    let r = crate::dashboard::login(
        &app,
        &client,
        format!("key={API_KEY}&next=%2Fdashboard%2Fbuilds%3Fstate%3Dfailed"),
    )
    .await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/dashboard/builds?state=failed");
    // Nowhere else: another host or a scheme falls back to the overview.
    for next in [
        "%2F%2Fevil.example%2Fdashboard",
        "https%3A%2F%2Fevil.example",
        "%2Fdashboard%2F%2Fevil",
    ] {
        let r = crate::dashboard::login(&app, &client, format!("key={API_KEY}&next={next}")).await;
        assert_eq!(r.headers()["location"], "/dashboard", "next={next}");
    }
    let cookie = sign_in(&app, &client).await;
    let (status, kind, body) = page(&app, &client, &cookie, "/dashboard/nowhere/at/all").await;
    assert_eq!(status, 404);
    assert!(kind.starts_with("text/html"), "{kind}");
    assert!(body.contains("Back to the dashboard"));
}

#[tokio::test]
async fn idle_counts_only_macs_that_can_take_work() {
    let app = TestApp::spawn().await;
    let client = no_redirects();
    let cookie = sign_in(&app, &client).await;
    let (_active, _) = app.register("active", &["ios"]).await;
    let (drained, _) = app.register("drained", &["ios"]).await;
    let (disabled, _) = app.register("disabled", &["ios"]).await;
    for (id, action) in [(&drained, "drain"), (&disabled, "disable")] {
        let r = app
            .client
            .post(app.url(&format!("/api/v2/workers/{id}/{action}")))
            .header("X-API-Key", API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{action}");
    }
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("expo_workers{status=\"idle\"} 1\n"), "{metrics}");
    let (_, _, overview) = page(&app, &client, &cookie, "/dashboard").await;
    assert!(overview.contains("<dt>Idle</dt><dd>1</dd>"), "{overview}");
    assert!(
        overview.contains("<dt>Draining</dt><dd>0</dd>"),
        "a finished drain is not draining"
    );
    assert!(overview.contains("1 drained"));
}

/// "All matching the filter" acts on the builds the list's filter finds (not only the ones shown).
#[tokio::test]
async fn bulk_action_on_everything_matching_the_filter() {
    let app = TestApp::spawn().await;
    let client = no_redirects();
    let cookie = sign_in(&app, &client).await;
    let keep = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    let mut android = Vec::new();
    for _ in 0..3 {
        android.push(app.submit("android", b"s").await["id"].as_str().unwrap().to_string());
    }
    let (_, _, html) = page(&app, &client, &cookie, "/dashboard/builds").await;
    let csrf = crate::dashboard::csrf_of(&html);
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("csrf", &csrf)
        .append_pair("return", "/dashboard/builds?state=pending&platform=android")
        .append_pair("scope", "matching")
        .append_pair("action", "cancel")
        .finish();
    let r = crate::dashboard::post_form(&client, &app, "/dashboard/builds/bulk", Some(&cookie), body).await;
    assert_eq!(r.status(), 303);
    assert!(
        r.headers()["location"].to_str().unwrap().contains("3+build"),
        "{:?}",
        r.headers()
    );
    for id in &android {
        assert_eq!(
            app.admin_json(&format!("/api/v2/builds/{id}")).await["state"],
            "cancelled"
        );
    }
    assert_eq!(
        app.admin_json(&format!("/api/v2/builds/{keep}")).await["state"],
        "pending"
    );
}
