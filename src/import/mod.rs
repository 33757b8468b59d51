//! `expo-controller import-ts`: moves a TypeScript controller's SQLite database and storage folder into
//! this controller (import.md), with the same `DATABASE_URL` and storage settings as `serve`.
//!
//! Order: workers, then builds in batches, then diagnostics, then a look for files without a row.
//! A batch of builds is committed in one transaction with its attempts, log lines and CPU samples, **after**
//! its files are stored; so a crash at any point leaves either the whole batch or none of it (files of an
//! uncommitted batch are simply written again, to the same keys, by the next run). Rows already present are
//! recognised by id and left alone, so a second run imports nothing twice and a killed run is finished by
//! the next. Bad rows are reported and skipped; `--dry-run` reads everything, judges it and writes nothing.
//! An advisory lock keeps two imports from running at once.

mod compose;
pub mod files;
pub mod mapping;
pub mod reader;
pub mod report;
mod writer;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use sqlx::PgPool;

use crate::config::Config;
use crate::storage::{Key, Storage};
use compose::{BuildFiles, compose};
use files::Copied;
use mapping::{FileRef, PlannedBuild, skip};
use reader::{ChildIndex, OldDb, Row};
use report::{Progress, Summary};
use writer::Batch;

/// The options of `import-ts` (besides the database and storage settings it shares with `serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// The TypeScript controller's SQLite database (opened read-only).
    #[arg(long)]
    pub sqlite: PathBuf,
    /// The TypeScript controller's storage folder, holding builds/, certs/ and results/ (only read).
    #[arg(long)]
    pub storage: PathBuf,
    /// Read and check everything and print the summary, without writing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Builds per transaction.
    #[arg(long, env = "CONTROLLER_IMPORT_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: usize,
}

/// Test hook: exit abruptly (as a kill would) once this many batches are committed, with the next
/// batch's files already stored.
const ABORT_HOOK: &str = "EXPO_IMPORT_TEST_ABORT_AFTER_BATCHES";

/// Files copied at once.
const FILE_CONCURRENCY: usize = 16;

/// Notes of the summary.
const NOTE_REQUEUED: &str = "builds queued again after an interrupted attempt";
const NOTE_CANCELLED: &str = "failed builds imported as cancelled";
const NOTE_NO_SOURCE: &str = "queued builds failed because their source is missing";
const NOTE_MISSING: &str = "files named by a row but missing (build imported without them)";
const NOTE_CAPABILITIES: &str = "workers with unreadable capabilities (given both platforms)";
const NOTE_RETRIES: &str = "retried builds linked to their original";
const NOTE_THINNED: &str = "CPU samples left out (more than CONTROLLER_MAX_SAMPLES_PER_BUILD per build)";
const NOTE_REFRESHED: &str = "builds changed in the old database since the last import (imported again)";
const NOTE_PRUNED: &str =
    "finished builds older than CONTROLLER_RETENTION_DAYS (the next prune deletes them: raise it first to keep them)";
const NOTE_ARTIFACTS: &str =
    "finished builds with files older than CONTROLLER_ARTIFACT_RETENTION_DAYS (the next prune deletes the files)";

/// Runs the import and returns its summary; `Err` only for problems that stop it as a whole.
pub async fn run(args: &ImportArgs, config: &Config) -> anyhow::Result<Summary> {
    let started = Instant::now();
    if !(1..=10_000).contains(&args.batch_size) {
        bail!("--batch-size must be between 1 and 10000");
    }
    let certs_key = match config.certs_key.as_deref().map(crate::ids::decode_key32) {
        Some(Some(key)) => key,
        Some(None) => bail!("CONTROLLER_CERTS_KEY must be base64 of exactly 32 bytes"),
        None => bail!(
            "CONTROLLER_CERTS_KEY is not set: imported certificates are encrypted with it (use the key `serve` uses)"
        ),
    };
    if !args.storage.is_dir() {
        bail!(
            "the storage folder {} does not exist or is not a folder",
            args.storage.display()
        );
    }
    let sqlite = args.sqlite.clone();
    let old = tokio::task::spawn_blocking(move || OldDb::open(&sqlite)).await??;
    let pool = crate::db::connect(&config.db).await?;
    let _lock = if args.dry_run {
        None
    } else {
        crate::db::migrate(&pool).await.context("applying migrations")?;
        Some(
            writer::lock(&pool)
                .await?
                .ok_or_else(|| anyhow!("another import-ts is running against this database"))?,
        )
    };
    let schema = writer::schema_exists(&pool).await?;
    let fingerprints = schema && writer::has_fingerprints(&pool).await?;
    let storage = if args.dry_run {
        None
    } else {
        // The store `serve` uses: local directory or S3 bucket.
        Some(crate::server::open_storage(config).await?)
    };
    let listing = files::list(&args.storage).with_context(|| format!("listing {}", args.storage.display()))?;
    let mut importer = Importer {
        old: Arc::new(Mutex::new(old)),
        pool,
        storage,
        // Old files must resolve inside this (a symlinked `builds/` or a link out of the folder is refused).
        root: std::fs::canonicalize(&args.storage).unwrap_or_else(|_| args.storage.clone()),
        certs_key,
        max_certs_bytes: config.max_certs_bytes,
        max_samples: usize::try_from(config.queue.max_samples_per_build).unwrap_or(usize::MAX),
        max_attempts: config.queue.max_attempts,
        retry_build_failures: config.queue.retry_build_failures,
        batch_size: args.batch_size,
        schema,
        fingerprints,
        summary: Summary::new(args.dry_run),
        now: Utc::now(),
        prune_before: Utc::now() - chrono::Duration::days(config.jobs.retention_days.min(36_500) as i64),
        artifacts_before: Utc::now() - chrono::Duration::days(config.jobs.artifact_retention_days.min(36_500) as i64),
        known_workers: HashSet::new(),
        files_on_disk: listing.iter().cloned().collect(),
        handled_files: HashSet::new(),
        skipped_builds: HashSet::new(),
        abort_after: std::env::var(ABORT_HOOK).ok().and_then(|v| v.parse().ok()),
    };
    importer.summary.table("files").read = listing.len() as u64;
    importer.workers().await?;
    importer.builds().await?;
    importer.diagnostics().await?;
    importer.unclaimed_files(&listing).await?;
    importer.summary.elapsed = started.elapsed();
    Ok(importer.summary)
}

struct Importer {
    old: Arc<Mutex<OldDb>>,
    pool: PgPool,
    /// `None` in a dry run.
    storage: Option<Storage>,
    root: PathBuf,
    certs_key: [u8; 32],
    max_certs_bytes: u64,
    /// `CONTROLLER_MAX_SAMPLES_PER_BUILD`: more old samples of a build are thinned.
    max_samples: usize,
    max_attempts: i32,
    retry_build_failures: bool,
    batch_size: usize,
    /// The PostgreSQL schema exists (a dry run on an empty database has nothing present).
    schema: bool,
    /// The import bookkeeping columns exist (not before migrations, which a dry run does not apply).
    fingerprints: bool,
    summary: Summary,
    now: DateTime<Utc>,
    /// What the prune job deletes: finished builds, and the files of finished builds, completed before these.
    prune_before: DateTime<Utc>,
    artifacts_before: DateTime<Utc>,
    known_workers: HashSet<String>,
    files_on_disk: HashSet<String>,
    handled_files: HashSet<String>,
    skipped_builds: HashSet<String>,
    abort_after: Option<u64>,
}

impl Importer {
    fn dry_run(&self) -> bool {
        self.storage.is_none()
    }

    /// Runs `f` on the old database on a blocking thread.
    async fn old<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&OldDb) -> anyhow::Result<T> + Send + 'static,
    {
        let old = self.old.clone();
        tokio::task::spawn_blocking(move || {
            let guard = old.lock().map_err(|_| anyhow!("SQLite reader poisoned"))?;
            f(&guard)
        })
        .await?
    }

    async fn page(&self, table: &'static str, after: i64) -> anyhow::Result<Vec<Row>> {
        let limit = self.batch_size;
        self.old(move |db| db.page(table, after, limit)).await
    }

    async fn present(&self, table: &str, ids: &[String]) -> anyhow::Result<HashSet<String>> {
        if !self.schema || ids.is_empty() {
            return Ok(HashSet::new());
        }
        match table {
            "workers" => writer::present_workers(&self.pool, ids).await,
            _ => writer::present_reports(&self.pool, ids).await,
        }
    }

    async fn workers(&mut self) -> anyhow::Result<()> {
        let mut after = 0;
        loop {
            let rows = self.page("workers", after).await?;
            let Some(last) = rows.last() else { break };
            after = last.rowid;
            let mut mapped = Vec::new();
            for row in &rows {
                self.summary.table("workers").read += 1;
                match mapping::worker(row) {
                    Ok(worker) => mapped.push(worker),
                    Err(skip) => self.summary.skip("workers", skip),
                }
            }
            let ids: Vec<String> = mapped.iter().map(|w| w.id.clone()).collect();
            let present = self.present("workers", &ids).await?;
            let fresh: Vec<_> = mapped.into_iter().filter(|w| !present.contains(&w.id)).collect();
            let broken = fresh.iter().filter(|w| w.broken_capabilities).count() as u64;
            let imported = if self.dry_run() || fresh.is_empty() {
                fresh.len() as u64
            } else {
                writer::insert_workers(&self.pool, &fresh).await?
            };
            let counts = self.summary.table("workers");
            counts.imported += imported;
            counts.present += ids.len() as u64 - imported;
            self.summary.note(NOTE_CAPABILITIES, broken);
            self.known_workers.extend(ids);
        }
        Ok(())
    }

    async fn builds(&mut self) -> anyhow::Result<()> {
        let (mut logs, mut samples, retries, total) = self
            .old(|db| {
                Ok((
                    db.child_index("build_logs")?,
                    db.child_index("cpu_snapshots")?,
                    db.retries()?,
                    db.count("builds")?,
                ))
            })
            .await?;
        for (table, index) in [("build_logs", &mut logs), ("cpu_snapshots", &mut samples)] {
            self.summary.table(table).read = index.rows;
            for (rowid, reason) in std::mem::take(&mut index.bad) {
                self.summary
                    .skip(table, skip("bad build_id", format!("row {rowid}: {reason}")));
            }
        }
        let mut progress = Progress::new(total);
        let mut after = 0;
        let mut committed = 0u64;
        // One batch is committed while the next one is read and its files are copied; batches still commit
        // in order, each only after its own files are stored.
        let mut inserting: Option<tokio::task::JoinHandle<anyhow::Result<u64>>> = None;
        loop {
            let rows = self.page("builds", after).await?;
            let Some(last) = rows.last() else { break };
            after = last.rowid;
            let batch = self.build_batch(&rows, &mut logs, &mut samples, &retries).await?;
            if batch.builds.is_empty() || self.dry_run() {
                progress.advance(rows.len() as u64);
                continue;
            }
            if let Some(previous) = inserting.take() {
                progress.advance(previous.await??);
                committed += 1;
            }
            if self.abort_after.is_some_and(|n| committed >= n) {
                progress.message("test hook: exiting before committing this batch");
                std::process::exit(86);
            }
            let (pool, rows_in_page) = (self.pool.clone(), rows.len() as u64);
            let (max_attempts, retry) = (self.max_attempts, self.retry_build_failures);
            inserting = Some(tokio::spawn(async move {
                writer::insert_batch(&pool, &batch, max_attempts, retry).await?;
                Ok(rows_in_page)
            }));
        }
        if let Some(previous) = inserting.take() {
            progress.advance(previous.await??);
        }
        progress.finish();
        for (table, index) in [("build_logs", logs), ("cpu_snapshots", samples)] {
            for (build_id, rowids) in index.by_build {
                let reason = if self.skipped_builds.contains(&build_id) {
                    "build row skipped"
                } else {
                    "no build row"
                };
                for rowid in rowids {
                    self.summary
                        .skip(table, skip(reason, format!("row {rowid} of build {build_id:?}")));
                }
            }
        }
        Ok(())
    }

    /// Judges one page of builds, copies the files of the new ones and composes their rows.
    async fn build_batch(
        &mut self,
        rows: &[Row],
        logs: &mut ChildIndex,
        samples: &mut ChildIndex,
        retries: &HashMap<String, String>,
    ) -> anyhow::Result<Batch> {
        let mut planned = Vec::new();
        for row in rows {
            self.summary.table("builds").read += 1;
            match mapping::build(row) {
                Ok(mut build) => {
                    build.original_build_id = retries.get(&build.id).cloned();
                    let lines = logs.by_build.get(&build.id).map_or(&[][..], Vec::as_slice);
                    let points = samples.by_build.get(&build.id).map_or(&[][..], Vec::as_slice);
                    build.fingerprint = mapping::fingerprint(row, lines, points);
                    planned.push(build);
                }
                Err(skip) => {
                    if let Some(id) = row.cell(0).text() {
                        self.skipped_builds.insert(id.to_string());
                    }
                    self.summary.skip("builds", skip);
                }
            }
        }
        let ids: Vec<String> = planned.iter().map(|b| b.id.clone()).collect();
        let present: HashMap<String, writer::PresentBuild> = if self.schema && !ids.is_empty() {
            writer::present_builds(&self.pool, &ids, self.fingerprints)
                .await?
                .into_iter()
                .map(|p| (p.id.clone(), p))
                .collect()
        } else {
            HashMap::new()
        };
        let mut fresh = Vec::new();
        let mut replace = Vec::new();
        for build in planned {
            match present.get(&build.id) {
                None => fresh.push(build),
                Some(p)
                    if p.import_fingerprint.is_none() || p.import_fingerprint.as_ref() == Some(&build.fingerprint) =>
                {
                    self.summary.table("builds").present += 1;
                    self.account_present(&build, logs, samples);
                }
                Some(p) if !p.touched => {
                    self.summary.note(NOTE_REFRESHED, 1);
                    replace.push(build.id.clone());
                    fresh.push(build);
                }
                Some(_) => {
                    self.account_present(&build, logs, samples);
                    let detail = format!(
                        "build {}: changed in the old database, but this controller has run it since",
                        build.id
                    );
                    self.summary.skip("builds", skip("changed in both controllers", detail));
                }
            }
        }
        let log_ids: Vec<i64> = fresh
            .iter()
            .flat_map(|b| logs.by_build.remove(&b.id).unwrap_or_default())
            .collect();
        let sample_ids: Vec<i64> = fresh
            .iter()
            .flat_map(|b| samples.by_build.remove(&b.id).unwrap_or_default())
            .collect();
        let children = self.old(move |db| {
            Ok((
                db.rows_by_id("build_logs", &log_ids)?,
                db.rows_by_id("cpu_snapshots", &sample_ids)?,
            ))
        });
        self.record_pending(&fresh).await?;
        let (children, copied) = tokio::join!(children, self.copy_files(&fresh));
        let (log_rows, sample_rows) = children?;
        let mut lines_of: HashMap<String, Vec<mapping::NewLogLine>> = HashMap::new();
        for row in &log_rows {
            match mapping::log_line(row) {
                Ok(line) => lines_of.entry(build_id_of(row)).or_default().push(line),
                Err(skip) => self.summary.skip("build_logs", skip),
            }
        }
        let mut samples_of: HashMap<String, Vec<mapping::NewSample>> = HashMap::new();
        for row in &sample_rows {
            match mapping::sample(row) {
                Ok(sample) => samples_of.entry(build_id_of(row)).or_default().push(sample),
                Err(skip) => self.summary.skip("cpu_snapshots", skip),
            }
        }
        let mut batch = Batch {
            replace,
            ..Batch::default()
        };
        // Recorded keys whose copy wrote nothing (the file missing or refused) are no longer pending; a
        // copy that failed may have written, and stays pending for sweep_unlinked.
        let unwritten: Vec<String> = fresh
            .iter()
            .zip(&copied)
            .flat_map(|(build, copies)| {
                [
                    (&copies.source, Key::source(&build.id)),
                    (&copies.certs, Key::certs(&build.id)),
                    (&copies.result, Key::result(&build.id, files::IMPORTED_RESULT)),
                ]
            })
            .filter(|(copied, _)| matches!(copied, Copied::Missing(_) | Copied::Refused(_)))
            .filter_map(|(_, key)| key.map(|k| k.as_str().to_string()))
            .collect();
        if !self.dry_run() {
            crate::queue::forget_writes(&self.pool, &unwritten).await?;
        }
        for (build, files) in fresh.iter().zip(copied) {
            self.account_files(&files);
            let lines = lines_of.remove(&build.id).unwrap_or_default();
            let mut points = samples_of.remove(&build.id).unwrap_or_default();
            let thinned = mapping::thin_samples(&mut points, self.max_samples);
            self.summary.note(NOTE_THINNED, thinned as u64);
            self.summary.table("build_logs").imported += lines.len() as u64;
            self.summary.table("cpu_snapshots").imported += points.len() as u64;
            let composed = compose(build, &files, lines, points, self.now);
            self.summary.table("builds").imported += 1;
            self.summary.note(NOTE_REQUEUED, u64::from(composed.requeued));
            self.summary
                .note(NOTE_NO_SOURCE, u64::from(composed.failed_without_source));
            self.summary
                .note(NOTE_CANCELLED, u64::from(composed.build.state == "cancelled"));
            self.summary
                .note(NOTE_RETRIES, u64::from(build.original_build_id.is_some()));
            self.note_retention(&composed.build);
            batch.attempts.extend(composed.attempt);
            batch.logs.extend(composed.logs);
            batch.samples.extend(composed.samples);
            batch.builds.push(composed.build);
        }
        Ok(batch)
    }

    /// A build already imported: its children and files count as present.
    fn account_present(&mut self, build: &PlannedBuild, logs: &mut ChildIndex, samples: &mut ChildIndex) {
        let lines = logs.by_build.remove(&build.id).map_or(0, |v| v.len() as u64);
        let points = samples.by_build.remove(&build.id).map_or(0, |v| v.len() as u64);
        self.summary.table("build_logs").present += lines;
        self.summary.table("cpu_snapshots").present += points;
        for file in [&build.source, &build.certs, &build.result] {
            if let FileRef::At(relative) = file
                && self.files_on_disk.contains(relative)
                && self.handled_files.insert(relative.clone())
            {
                self.summary.table("files").present += 1;
            }
        }
    }

    /// Imported history that the retention settings will delete: worth knowing before `serve` starts.
    fn note_retention(&mut self, build: &writer::BuildRow) {
        let Some(completed_at) = build.completed_at else { return };
        if completed_at < self.prune_before {
            self.summary.note(NOTE_PRUNED, 1);
        } else if completed_at < self.artifacts_before && (build.source_key.is_some() || build.result_key.is_some()) {
            self.summary.note(NOTE_ARTIFACTS, 1);
        }
    }

    /// Records the keys these builds' files are copied to as pending writes before the copies: the
    /// batch's insert claims (forgets) those its rows name; whatever an interrupted import copied is
    /// deleted by `sweep_unlinked`.
    async fn record_pending(&self, builds: &[PlannedBuild]) -> anyhow::Result<()> {
        if self.dry_run() {
            return Ok(());
        }
        let mut keys = Vec::new();
        for build in builds {
            let result_key = Key::result(&build.id, files::IMPORTED_RESULT);
            let targets = [
                (&build.source, Key::source(&build.id)),
                (&build.certs, Key::certs(&build.id)),
                (&build.result, result_key),
            ];
            for (file, key) in targets {
                if let (FileRef::At(_), Some(key)) = (file, key) {
                    keys.push(key.as_str().to_string());
                }
            }
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        crate::queue::record_writes(&self.pool, &keys).await?;
        Ok(())
    }

    /// Copies (or in a dry run, checks) the files of these builds, a few at a time.
    async fn copy_files(&self, builds: &[PlannedBuild]) -> Vec<BuildFiles> {
        let storage = self.storage.as_ref();
        let root = &self.root;
        let sealing = (&self.certs_key, self.max_certs_bytes);
        let tasks = builds.iter().map(|build| async move {
            let source = files::copy(root, &build.source, Key::source(&build.id), storage, None);
            let certs = files::copy(root, &build.certs, Key::certs(&build.id), storage, Some(sealing));
            let result_key = Key::result(&build.id, files::IMPORTED_RESULT);
            let result = files::copy(root, &build.result, result_key, storage, None);
            let (source, certs, result) = tokio::join!(source, certs, result);
            BuildFiles { source, certs, result }
        });
        futures_util::stream::iter(tasks)
            .buffered(FILE_CONCURRENCY)
            .collect()
            .await
    }

    fn account_files(&mut self, files: &BuildFiles) {
        for copied in [&files.source, &files.certs, &files.result] {
            match copied {
                Copied::NoFile => {}
                Copied::Missing(_) => self.summary.note(NOTE_MISSING, 1),
                Copied::Refused(file) => {
                    self.handled_files.insert(file.clone());
                    self.summary.skip("files", skip(files::NOT_REGULAR, file.clone()));
                }
                Copied::Failed { file, reason } => {
                    self.handled_files.insert(file.clone());
                    self.summary
                        .skip("files", skip("unreadable", format!("{file}: {reason}")));
                }
                Copied::Stored { file, .. } => {
                    self.handled_files.insert(file.clone());
                    self.summary.table("files").imported += 1;
                }
            }
        }
    }

    async fn diagnostics(&mut self) -> anyhow::Result<()> {
        let mut after = 0;
        loop {
            let rows = self.page("diagnostics", after).await?;
            let Some(last) = rows.last() else { break };
            after = last.rowid;
            let mut mapped = Vec::new();
            for row in &rows {
                self.summary.table("diagnostics").read += 1;
                match mapping::report(row) {
                    Ok(report) => mapped.push(report),
                    Err(skip) => self.summary.skip("diagnostics", skip),
                }
            }
            let unknown: Vec<String> = mapped
                .iter()
                .filter(|r| !self.known_workers.contains(&r.worker_id))
                .map(|r| r.worker_id.clone())
                .collect();
            let elsewhere = self.present("workers", &unknown).await?;
            let (valid, orphans): (Vec<_>, Vec<_>) = mapped
                .into_iter()
                .partition(|r| self.known_workers.contains(&r.worker_id) || elsewhere.contains(&r.worker_id));
            for report in orphans {
                let detail = format!("report {} of worker {}", report.old_id, report.worker_id);
                self.summary.skip("diagnostics", skip("unknown worker", detail));
            }
            let ids: Vec<String> = valid.iter().map(|r| r.id.clone()).collect();
            let present = self.present("diagnostics", &ids).await?;
            let fresh: Vec<_> = valid.into_iter().filter(|r| !present.contains(&r.id)).collect();
            let imported = if self.dry_run() || fresh.is_empty() {
                fresh.len() as u64
            } else {
                writer::insert_reports(&self.pool, &fresh).await?
            };
            let counts = self.summary.table("diagnostics");
            counts.imported += imported;
            counts.present += ids.len() as u64 - imported;
        }
        Ok(())
    }

    /// Files of the old folder that no imported (or present) row took: reported, left where they are.
    async fn unclaimed_files(&mut self, listing: &[String]) -> anyhow::Result<()> {
        let ids = self.old(|db| db.build_ids()).await?;
        for file in listing {
            if self.handled_files.contains(file) {
                continue;
            }
            let owner = file.split_once('/').and_then(|(_, name)| files::owner_of(name));
            let reason = match owner {
                Some(id) if self.skipped_builds.contains(id) => "build row skipped",
                Some(id) if ids.contains(id) => "not named by its row",
                _ => "no build row",
            };
            self.summary.skip("files", skip(reason, file.clone()));
        }
        Ok(())
    }
}

fn build_id_of(row: &Row) -> String {
    row.cell(1).text().unwrap_or_default().to_string()
}
