//! Staging is swept (#8 item 4, R44): result uploads leave nothing under `staging/` on any path, and
//! leftovers of cut uploads older than `CONTROLLER_STAGING_MAX_AGE_SECS` are removed by a job.

use std::path::Path;
use std::time::{Duration, SystemTime};

use chrono::Utc;
use expo_controller::jobs::{Job, JobContext};
use expo_controller::storage::Storage;

use crate::support::{TestApp, success_form};

/// Everything (files and directories) under `staging/`.
fn staging_entries(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            out.push(path.strip_prefix(root).unwrap().to_string_lossy().to_string());
            if path.is_dir() {
                walk(&path, root, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root.join("staging"), root, &mut out);
    out
}

#[tokio::test]
async fn result_uploads_leave_nothing_in_staging_on_any_path() {
    let app = TestApp::spawn().await;
    let (worker, _) = app.register("w", &["ios"]).await;
    let id = app.submit("ios", b"s").await["id"].as_str().unwrap().to_string();
    app.poll(&worker).await;

    // Refused: too large (the limit is 1 MiB in tests).
    let r = app
        .upload_form(success_form(&id, &worker, &vec![7u8; 2 * 1024 * 1024]))
        .await;
    assert_eq!(r.status(), 413);
    assert_eq!(staging_entries(&app.storage_dir), Vec::<String>::new());

    // Refused: a worker that does not hold the build.
    let (other, _) = app.register("other", &["ios"]).await;
    let r = app.upload_form(success_form(&id, &other, b"not yours")).await;
    assert_eq!(r.status(), 403);
    assert_eq!(staging_entries(&app.storage_dir), Vec::<String>::new());

    // Accepted: the result is moved into place and staging is empty, not even a directory.
    let r = app.upload_form(success_form(&id, &worker, b"result")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(staging_entries(&app.storage_dir), Vec::<String>::new());

    // A late duplicate for the finished build is refused and leaves nothing either.
    let r = app.upload_form(success_form(&id, &worker, b"again")).await;
    assert_ne!(r.status(), 200);
    assert_eq!(staging_entries(&app.storage_dir), Vec::<String>::new());
}

fn write_aged(path: &Path, age: Duration) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, b"leftover").unwrap();
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() - age).unwrap();
}

#[tokio::test]
async fn the_sweep_removes_old_staging_leftovers_only() {
    let app = TestApp::spawn().await;
    let id = app.submit("ios", b"kept source").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let root = app.storage_dir.clone();
    let old = Duration::from_secs(7 * 3600);
    // Leftovers of uploads cut by a crash: a staged object, a partial staged file, an old-layout
    // per-upload directory, and a partial source file next to a real build.
    write_aged(&root.join("staging/crashed.bin"), old);
    write_aged(&root.join("staging/crashed2.bin#4"), old);
    write_aged(&root.join("staging/oldlayout/upload.bin"), old);
    write_aged(&root.join("builds/gone/source.zip#1"), old);
    // What must stay: a fresh staged upload (in progress) and every stored artifact, old or not.
    write_aged(&root.join("staging/in-progress.bin#2"), Duration::from_secs(60));
    let source = root.join(format!("builds/{id}/source.zip"));
    std::fs::File::options()
        .write(true)
        .open(&source)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(30 * 86_400))
        .unwrap();

    let ctx = JobContext {
        pool: app.pool.clone(),
        storage: Storage::local(&root, false).unwrap(),
        settings: Default::default(),
        jobs: Default::default(),
    };
    assert_eq!(Job::SweepStaging.run_once(&ctx, Utc::now()).await.unwrap(), 4);
    assert_eq!(staging_entries(&root), vec!["staging/in-progress.bin#2".to_string()]);
    assert!(!root.join("builds/gone/source.zip#1").exists());
    assert!(source.exists(), "stored artifacts are never swept");
    // Once old enough, the remaining leftover goes too.
    let later = Utc::now() + chrono::Duration::hours(7);
    assert_eq!(Job::SweepStaging.run_once(&ctx, later).await.unwrap(), 1);
    assert_eq!(staging_entries(&root), Vec::<String>::new());
    let r = app
        .client
        .get(app.url(&format!("/api/builds/{id}/download/source")))
        .header("X-API-Key", crate::support::API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
