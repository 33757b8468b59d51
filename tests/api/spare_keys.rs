//! Issue #25: a submit and a result each in one statement. The pending key of a submit's source (and of
//! a result streamed right after its claim) is recorded ahead, by the statement that linked the previous
//! one (`queue::SpareKeys`), so nothing runs before the body; the full-queue check before the body runs
//! only when this instance saw a queue at its limit (`queue::FullQueues`).

use chrono::Utc;
use expo_controller::jobs::{Job, JobContext};
use expo_controller::storage::Storage;
use reqwest::multipart::{Form, Part};

use crate::support::{API_KEY, TestApp, success_form};

async fn pending(app: &TestApp, like: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT key FROM pending_writes WHERE key LIKE $1 ORDER BY key")
        .bind(like)
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

async fn column(app: &TestApp, column: &str, id: &str) -> String {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT {column} FROM builds WHERE id = $1"
    )))
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

async fn download(app: &TestApp, path: &str) -> Vec<u8> {
    let r = app
        .client
        .get(app.url(path))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.bytes().await.unwrap().to_vec()
}

/// The first submit's insert records a spare source key (pending, named by no row, no object yet); the
/// next submit streams its source to that key without a statement before its body, and its insert
/// links it (no longer pending) and records the next spare.
#[tokio::test]
async fn a_submit_streams_to_the_source_key_the_previous_insert_recorded() {
    let app = TestApp::spawn().await;
    app.submit("ios", b"one").await;
    let spares = pending(&app, "%").await;
    assert_eq!(spares.len(), 1, "the insert recorded one spare: {spares:?}");
    assert!(
        spares[0].starts_with("builds/") && spares[0].ends_with("/source.zip"),
        "{spares:?}"
    );
    assert!(
        !app.storage_dir.join(&spares[0]).exists(),
        "nothing written under a spare yet"
    );

    let second = app.submit("ios", b"two").await;
    let id = second["id"].as_str().unwrap();
    assert_eq!(
        column(&app, "source_key", id).await,
        spares[0],
        "the spare became the build's source"
    );
    let now = pending(&app, "%").await;
    assert_eq!(now.len(), 1, "linked, and the next spare recorded: {now:?}");
    assert_ne!(now[0], spares[0]);
    assert_eq!(
        download(&app, &format!("/api/builds/{id}/download/source")).await,
        b"two"
    );
}

/// The full-queue hint only decides whether the queue is counted before the body: once a build left
/// the queue, the next submit is accepted (the count finds room), and a full queue is still refused
/// before the body.
#[tokio::test]
async fn the_full_queue_hint_never_refuses_a_queue_with_room() {
    let app = TestApp::spawn_with(|c| c.queue.max_queued_builds = 1).await;
    let first = app.submit("ios", b"one").await;
    let full = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(b"two".to_vec()).file_name("app.zip"));
    assert_eq!(app.submit_form(full).await.status(), 503, "the queue is full");
    let id = first["id"].as_str().unwrap();
    let r = app
        .client
        .post(app.url(&format!("/api/builds/{id}/cancel")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let again = Form::new()
        .text("platform", "ios")
        .part("source", Part::bytes(b"three".to_vec()).file_name("app.zip"));
    assert_eq!(app.submit_form(again).await.status(), 200, "room again: accepted");
}

/// A result sent right after its claim (the build and worker before the file) streams to a loose key
/// the previous completion recorded; the sweep forgets a loose key a row names (never deleting it) and
/// deletes the object of one no row names.
#[tokio::test]
async fn a_result_right_after_its_claim_streams_to_the_key_the_previous_completion_recorded() {
    let app = TestApp::spawn().await;
    let (worker, _) = app.register("w", &["ios"]).await;
    let first = app.submit("ios", b"s1").await["id"].as_str().unwrap().to_string();
    app.poll(&worker).await;
    assert_eq!(
        app.upload_form(success_form(&first, &worker, b"first")).await.status(),
        200
    );
    let loose = pending(&app, "results/%").await;
    assert_eq!(
        loose.len(),
        1,
        "the completion recorded one loose result key: {loose:?}"
    );

    // The handed row is dropped when an event of the build reaches this instance after the claim (the
    // submit's own event, when the pump is late under load): that round goes to the database. A few
    // rounds, so that one runs right after its claim.
    let mut taken = None;
    for round in 0..5u64 {
        let spares = pending(&app, "results/%").await;
        assert!(!spares.is_empty(), "a completion always leaves a spare here");
        let id = app.submit("ios", b"s2").await["id"].as_str().unwrap().to_string();
        tokio::time::sleep(std::time::Duration::from_millis(300 * round)).await;
        app.poll(&worker).await;
        assert_eq!(
            app.upload_form(success_form(&id, &worker, b"second")).await.status(),
            200
        );
        let key = column(&app, "result_key", &id).await;
        if spares.contains(&key) {
            taken = Some((id, key));
            break;
        }
    }
    let (second, key) = taken.expect("a result right after its claim streams to a spare loose key");
    assert!(key.starts_with("results/"), "{key}");
    assert_eq!(
        download(&app, &format!("/api/builds/{second}/download/result")).await,
        b"second"
    );
    let next = pending(&app, "results/%").await;
    assert!(
        !next.is_empty() && !next.contains(&key),
        "linked, and the next spare recorded: {next:?}"
    );
    let loose = [key];

    // A killed upload's object under the next spare, and (as if never forgotten) the linked key, both
    // past the cut-off: the sweep deletes the first and keeps the second.
    std::fs::create_dir_all(app.storage_dir.join("results")).unwrap();
    std::fs::write(app.storage_dir.join(&next[0]), b"cut").unwrap();
    sqlx::query("INSERT INTO pending_writes (key) VALUES ($1)")
        .bind(&loose[0])
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE pending_writes SET queued_at = now() - interval '7 hours'")
        .execute(&app.pool)
        .await
        .unwrap();
    let ctx = JobContext {
        pool: app.pool.clone(),
        storage: Storage::local(&app.storage_dir, false).unwrap(),
        settings: Default::default(),
        jobs: Default::default(),
    };
    assert_eq!(Job::SweepUnlinked.run_once(&ctx, Utc::now()).await.unwrap(), 1);
    assert!(
        !app.storage_dir.join(&next[0]).exists(),
        "the unlinked object is deleted"
    );
    assert_eq!(
        download(&app, &format!("/api/builds/{second}/download/result")).await,
        b"second"
    );
    assert_eq!(pending(&app, "%").await, Vec::<String>::new(), "every key settled");
}
