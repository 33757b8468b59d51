//! The dashboard's read cache: however many pages follow the same event, one instance reads each
//! region's data once per TTL. Statements are counted by a small TCP proxy between the server and
//! PostgreSQL (every `Execute` and simple `Query` message the server sends), so the count is the real
//! database work, session lookups included.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::dashboard::{csrf_of, no_redirects, post_form, sign_in};
use crate::support::TestApp;

/// Counts the statements clients send through it to `upstream`.
async fn counting_proxy(listener: TcpListener, upstream: String, statements: Arc<AtomicU64>) {
    while let Ok((client, _)) = listener.accept().await {
        let upstream = upstream.clone();
        let statements = statements.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                return;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let back = tokio::spawn(async move { tokio::io::copy(&mut server_read, &mut client_write).await });
            let mut pending: Vec<u8> = Vec::new();
            let mut started = false;
            let mut chunk = vec![0u8; 16 * 1024];
            loop {
                let n = match client_read.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if server_write.write_all(&chunk[..n]).await.is_err() {
                    break;
                }
                pending.extend_from_slice(&chunk[..n]);
                // Startup-phase messages have no type byte; SSL/GSS requests precede the startup message.
                loop {
                    let header = if started { 5 } else { 4 };
                    if pending.len() < header {
                        break;
                    }
                    let at = header - 4;
                    let len = u32::from_be_bytes(pending[at..at + 4].try_into().unwrap()) as usize;
                    if pending.len() < at + len {
                        break;
                    }
                    if started {
                        if matches!(pending[0], b'E' | b'Q') {
                            statements.fetch_add(1, Ordering::SeqCst);
                        }
                    } else {
                        let code = u32::from_be_bytes(pending[4..8].try_into().unwrap());
                        started = !matches!(code, 80_877_103 | 80_877_104);
                    }
                    pending.drain(..at + len);
                }
            }
            back.abort();
        });
    }
}

/// A server whose database connections go through a counting proxy.
async fn counted_app(cache_ms: u64) -> (TestApp, Arc<AtomicU64>) {
    let statements = Arc::new(AtomicU64::new(0));
    let counter = statements.clone();
    let app = TestApp::spawn_with(move |c| {
        c.dashboard.dashboard_cache_ms = cache_ms;
        let mut url = reqwest::Url::parse(&c.db.database_url).unwrap();
        let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let listener = TcpListener::from_std(listener).unwrap();
        tokio::spawn(counting_proxy(listener, upstream, counter));
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(port)).unwrap();
        url.query_pairs_mut().append_pair("sslmode", "disable");
        c.db.database_url = url.to_string();
    })
    .await;
    (app, statements)
}

async fn get(app: &TestApp, client: &reqwest::Client, cookie: &str, path: &str) -> String {
    let r = client
        .get(app.url(path))
        .header("cookie", cookie)
        .header("hx-request", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.text().await.unwrap()
}

/// A dashboard action (pause or resume the ios queue), as a page's form posts it.
async fn queue_action(app: &TestApp, client: &reqwest::Client, cookie: &str, csrf: &str, action: &str) {
    let r = post_form(
        client,
        app,
        &format!("/dashboard/queues/ios/{action}"),
        Some(cookie),
        format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(r.status(), 303, "{action}");
}

/// Reads the page's event stream until an event of `kind` arrives (this instance has delivered it).
async fn wait_event(stream: &mut reqwest::Response, seen: &mut String, kind: &str) {
    let needle = format!("event: {kind}");
    tokio::time::timeout(Duration::from_secs(20), async {
        while !seen.contains(&needle) {
            let chunk = stream.chunk().await.unwrap().expect("the stream stays open");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind} event in {seen}"));
    seen.clear();
}

/// `viewers` pages (across two sessions) each re-fetch every region at once, as after an event;
/// returns the statements the server sent meanwhile.
async fn refresh_all(
    app: &TestApp,
    statements: &AtomicU64,
    cookies: &[String],
    paths: &[String],
    viewers: usize,
    expect: &str,
) -> (u64, std::time::Duration) {
    let started = std::time::Instant::now();
    let before = statements.load(Ordering::SeqCst);
    let mut tasks = Vec::new();
    for viewer in 0..viewers {
        for path in paths {
            let (base, cookie, path, expect) = (
                app.base.clone(),
                cookies[viewer % cookies.len()].clone(),
                path.clone(),
                expect.to_string(),
            );
            tasks.push(tokio::spawn(async move {
                let r = no_redirects()
                    .get(format!("{base}{path}"))
                    .header("cookie", cookie)
                    .header("hx-request", "true")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "{path}");
                let body = r.text().await.unwrap();
                if path.contains("builds") {
                    assert!(body.contains(&expect), "{path} shows the new build");
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    (statements.load(Ordering::SeqCst) - before, started.elapsed())
}

/// Statements the server runs by itself (maintenance jobs, the controller clock's pulse) per second,
/// measured over an idle window, so a slow machine's longer rounds are not counted against the cache.
async fn background_per_sec(statements: &AtomicU64) -> f64 {
    let window = std::time::Duration::from_secs(3);
    let before = statements.load(Ordering::SeqCst);
    tokio::time::sleep(window).await;
    (statements.load(Ordering::SeqCst) - before) as f64 / window.as_secs_f64()
}

#[tokio::test]
async fn open_dashboards_share_reads_and_still_show_changes() {
    // A TTL far longer than a burst of requests on a slow machine: here entries end with events.
    let (app, statements) = counted_app(10_000).await;
    let http = no_redirects();
    let cookies = [sign_in(&app, &http).await, sign_in(&app, &http).await];
    let csrf = csrf_of(&get(&app, &http, &cookies[0], "/dashboard/queues").await);
    let mut events = http
        .get(app.url("/dashboard/events"))
        .header("cookie", &cookies[0])
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let mut seen = String::new();
    let first = app.submit("ios", b"first source").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_event(&mut events, &mut seen, "build.submitted").await;
    let paths: Vec<String> = [
        "/dashboard?fragment=1",
        "/dashboard/builds?fragment=1",
        "/dashboard/workers?fragment=1",
        "/dashboard/queues?fragment=1",
    ]
    .iter()
    .map(|p| p.to_string())
    .chain([format!("/dashboard/builds/{first}?fragment=1")])
    .collect();

    // Each round follows a change made on the dashboard (which empties the cache) and its event, as
    // the pages' re-fetches do.
    queue_action(&app, &http, &cookies[0], &csrf, "pause").await;
    wait_event(&mut events, &mut seen, "queue.paused").await;
    let (one, _) = refresh_all(&app, &statements, &cookies, &paths, 1, &first).await;
    queue_action(&app, &http, &cookies[0], &csrf, "resume").await;
    wait_event(&mut events, &mut seen, "queue.resumed").await;
    let (fifty, took) = refresh_all(&app, &statements, &cookies, &paths, 50, &first).await;
    let background = (background_per_sec(&statements).await * took.as_secs_f64()).ceil() as u64;
    println!(
        "statements for one viewer: {one}; for 50 viewers: {fifty} in {took:?} ({background} by the server itself)"
    );
    assert!(one > 0, "the proxy counts the server's statements");
    assert!(
        fifty <= one + 15 + background,
        "50 viewers cost {fifty} statements ({background} of them background), one viewer {one}: the cost grows with the viewers"
    );

    // The page an action redirects back to shows the change at once, though it was just cached (and
    // before its event arrives).
    let cached = get(&app, &http, &cookies[0], "/dashboard/queues?fragment=1").await;
    assert!(!cached.contains("paused"), "resumed");
    let other_csrf = csrf_of(&get(&app, &http, &cookies[1], "/dashboard/queues").await);
    queue_action(&app, &http, &cookies[1], &other_csrf, "pause").await;
    let after = get(&app, &http, &cookies[0], "/dashboard/queues?fragment=1").await;
    assert!(after.contains("paused"), "the action's change is shown right away");

    // A change made elsewhere (the API) shows as soon as its event is delivered, well within the TTL.
    let page = get(&app, &http, &cookies[0], "/dashboard/builds?fragment=1").await;
    assert!(page.contains(&first));
    let second = app.submit("ios", b"second source").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_event(&mut events, &mut seen, "build.submitted").await;
    let page = get(&app, &http, &cookies[0], "/dashboard/builds?fragment=1").await;
    assert!(
        page.contains(&second),
        "the new build shows once its event is delivered"
    );
}

/// A page read from the cache before the pump delivered a change committed earlier still follows that
/// change: the page's event stream resumes after the newest event delivered before the page was read,
/// so the change's event reaches it even when the stream opens after the delivery (the page would
/// otherwise stay without the change until some later event).
#[tokio::test]
async fn a_page_read_before_a_change_was_delivered_still_hears_it() {
    let app = TestApp::spawn_with(|c| c.dashboard.dashboard_cache_ms = 60_000).await;
    let client = no_redirects();
    let cookie = sign_in(&app, &client).await;
    let first = app.submit("ios", b"PK\x03\x04 first").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !get(&app, &client, &cookie, "/dashboard/builds").await.contains(&first) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the first build is shown once its event is delivered");

    // An uncommitted event holds the pump back: the next build is committed but not yet delivered.
    let mut gap = app.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO events (kind) VALUES ('test.gap')")
        .execute(&mut *gap)
        .await
        .unwrap();
    // What committed before the gap is delivered; then the cache holds the page as of now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(get(&app, &client, &cookie, "/dashboard/builds").await.contains(&first));
    let second = app.submit("ios", b"PK\x03\x04 second").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let page = client
        .get(app.url("/dashboard/builds"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(&first) && !page.contains(&second),
        "the page is the cached read"
    );
    let at = page.find("data-events=\"").expect("the page names its stream") + "data-events=\"".len();
    let stream_path = page[at..].split('"').next().unwrap().replace("&amp;", "&");

    // Delivered now; the page's stream opens only afterwards, and still hears the second build.
    gap.rollback().await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !get(&app, &client, &cookie, "/dashboard/builds").await.contains(&second) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the second build's event is delivered");
    let mut stream = client
        .get(app.url(&stream_path))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200, "{stream_path}");
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !(seen.contains("event: build.submitted") && seen.contains(&second)) {
            let chunk = stream.chunk().await.unwrap().expect("the stream stays open");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the page's stream ({stream_path}) never carried the second build: {seen}"));
}
