//! Several instances on one database, and the maintenance jobs.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use expo_controller::jobs::{Job, JobContext};
use expo_controller::storage::Storage;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use crate::support::{
    API_KEY, TestApp, free_port, fresh_database, serve_command, state_of, success_form, wait_ready, worker_status,
};

struct Instance {
    child: Child,
    base: String,
}

fn start(url: &str, storage: &std::path::Path, certs_key: &str) -> Instance {
    let port = free_port();
    let child = serve_command(url, storage, port, certs_key)
        .env("CONTROLLER_LOG_FORMAT", "json")
        .env(
            "CONTROLLER_JOB_SCHEDULES",
            "promote_scheduled=* * * * * *;rescue_expired_leases=* * * * * *",
        )
        .env("RUST_LOG", "warn,expo_controller::jobs=debug")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    Instance {
        child,
        base: format!("http://127.0.0.1:{port}"),
    }
}

/// `(job, tick)` pairs.
type Ticks = HashSet<(String, String)>;

/// (job, tick) pairs an instance ran, and those it found already run, from its JSON log.
fn ticks(instance: Instance) -> (Ticks, Ticks) {
    let Instance { mut child, .. } = instance;
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let stdout = child.stdout.take().unwrap();
    let _ = child.wait();
    let (mut ran, mut skipped) = (HashSet::new(), HashSet::new());
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let Ok(record) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let span = &record["span"];
        let key = (
            span["job"].as_str().unwrap_or_default().to_string(),
            span["tick"].as_str().unwrap_or_default().to_string(),
        );
        match record["fields"]["message"].as_str() {
            Some("tick ran") => ran.insert(key),
            Some("tick ran on another instance") => skipped.insert(key),
            _ => false,
        };
    }
    (ran, skipped)
}

#[tokio::test]
async fn two_instances_claim_exclusively_and_run_each_tick_once() {
    let (url, pool) = fresh_database(4).await;
    let storage = std::env::temp_dir().join(format!("expo-fleet-{}", expo_controller::ids::new_id()));
    let certs_key = expo_controller::ids::new_key32();
    let client = reqwest::Client::new();
    let (a, b) = (start(&url, &storage, &certs_key), start(&url, &storage, &certs_key));
    wait_ready(&client, &a.base).await;
    wait_ready(&client, &b.base).await;
    let bases = [a.base.clone(), b.base.clone()];

    // Builds submitted through both, claimed by workers polling both.
    let mut submitted = HashSet::new();
    for n in 0..30 {
        let form = Form::new()
            .text("platform", "android")
            .part("source", Part::bytes(b"s".to_vec()).file_name("a.zip"));
        let body: Value = client
            .post(format!("{}/api/builds/submit", bases[n % 2]))
            .header("X-API-Key", API_KEY)
            .multipart(form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        submitted.insert(body["id"].as_str().unwrap().to_string());
    }
    let mut tasks = Vec::new();
    for n in 0..8 {
        let (client, bases) = (client.clone(), bases.clone());
        tasks.push(tokio::spawn(async move {
            let register: Value = client
                .post(format!("{}/api/workers/register", bases[0]))
                .header("X-API-Key", API_KEY)
                .json(&json!({ "name": format!("w{n}"), "capabilities": { "platforms": ["android"] } }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let token = register["access_token"].as_str().unwrap().to_string();
            let mut got = Vec::new();
            for round in 0.. {
                let base = &bases[(n + round) % 2];
                let poll: Value = client
                    .get(format!("{base}/api/workers/poll"))
                    .header("X-Worker-Token", &token)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let Some(id) = poll["job"]["id"].as_str().map(str::to_string) else {
                    break;
                };
                let r = client
                    .post(format!("{base}/api/workers/fail"))
                    .header("X-Worker-Token", &token)
                    .json(&json!({ "build_id": id, "error_message": "x" }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                got.push(id);
            }
            got
        }));
    }
    let mut delivered = Vec::new();
    for t in tasks {
        delivered.extend(t.await.unwrap());
    }
    assert_eq!(delivered.len(), 30, "each build claimed exactly once");
    assert_eq!(delivered.into_iter().collect::<HashSet<_>>(), submitted);

    // Let both instances see a few one-second ticks.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (ran_a, skipped_a) = ticks(a);
    let (ran_b, skipped_b) = ticks(b);
    assert!(ran_a.is_disjoint(&ran_b), "no tick ran on both instances");
    let ran: HashSet<_> = ran_a.union(&ran_b).cloned().collect();
    assert!(
        ran.iter().filter(|(job, _)| job == "promote_scheduled").count() >= 3,
        "{ran:?}"
    );
    // Every tick one instance skipped, the other ran: both schedulers fired, the database chose one.
    for skipped in skipped_a.iter().chain(&skipped_b) {
        assert!(ran.contains(skipped), "skipped tick {skipped:?} ran nowhere");
    }
    assert!(
        !skipped_a.is_empty() || !skipped_b.is_empty(),
        "both instances attempted the same ticks"
    );
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM cron_ticks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(recorded as usize >= ran.len());
    let _ = std::fs::remove_dir_all(&storage);
}

fn ctx(app: &TestApp, adjust: impl FnOnce(&mut JobContext)) -> JobContext {
    let mut ctx = JobContext {
        pool: app.pool.clone(),
        storage: Storage::local(&app.storage_dir, false).unwrap(),
        settings: Default::default(),
        jobs: Default::default(),
    };
    adjust(&mut ctx);
    ctx
}

#[tokio::test]
async fn unseen_workers_go_offline_but_keep_their_lease_until_it_expires() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("w", &["ios"]).await;
    let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    app.poll(&worker_id).await;
    let ctx = ctx(&app, |_| {});
    assert_eq!(Job::OfflineWorkers.run_once(&ctx, Utc::now()).await.unwrap(), 0);
    let later = Utc::now() + chrono::Duration::minutes(3);
    assert_eq!(Job::OfflineWorkers.run_once(&ctx, later).await.unwrap(), 1);
    let status: String = worker_status(&app.pool, &worker_id).await;
    assert_eq!(status, "offline");
    let state: String = state_of(&app.pool, &id).await;
    assert_eq!(state, "assigned", "not rescued before the lease expires");
    assert_eq!(
        Job::RescueExpiredLeases
            .run_once(&ctx, later + chrono::Duration::minutes(10))
            .await
            .unwrap(),
        1
    );
    // Polling again brings it back online.
    app.poll(&worker_id).await;
    let status: String = worker_status(&app.pool, &worker_id).await;
    assert_ne!(status, "offline");
}

#[tokio::test]
async fn prune_deletes_old_artifacts_then_old_rows() {
    let app = TestApp::spawn().await;
    let (worker_id, _) = app.register("w", &["ios"]).await;
    let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    app.poll(&worker_id).await;
    let form = success_form(&id, &worker_id, b"r");
    app.upload_form(form).await;
    let fresh = app.submit("ios", b"still queued").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ctx = ctx(&app, |_| {});
    assert_eq!(
        Job::Prune.run_once(&ctx, Utc::now()).await.unwrap(),
        0,
        "nothing is old yet"
    );
    assert_eq!(app.stored_files().len(), 3);

    let in_8_days = Utc::now() + chrono::Duration::days(8);
    assert_eq!(Job::Prune.run_once(&ctx, in_8_days).await.unwrap(), 1);
    assert_eq!(
        app.stored_files(),
        vec![format!("builds/{fresh}/source.zip")],
        "artifacts of the finished build are gone"
    );
    let r = app
        .client
        .get(app.url(&format!("/api/builds/{id}/download")))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let in_31_days = Utc::now() + chrono::Duration::days(31);
    Job::Prune.run_once(&ctx, in_31_days).await.unwrap();
    let remaining: Vec<String> = sqlx::query_scalar("SELECT id FROM builds")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(remaining, vec![fresh], "the old row went; the queued build stays");
    let logs: i64 = sqlx::query_scalar("SELECT count(*) FROM build_logs WHERE build_id = $1")
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(logs, 0);
}
