//! The import's statements. Rows go in as multi-row inserts over `unnest` of column arrays (one round
//! trip per table per batch); a batch of builds goes in with its attempts, log lines and CPU samples in
//! one transaction, and the queued ones NOTIFY the waiting workers when it commits.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::pool::PoolConnection;
use sqlx::postgres::Postgres;

use super::mapping::{NewReport, NewWorker};

/// A build row of the new schema, complete.
#[derive(Debug, Clone)]
pub struct BuildRow {
    pub id: String,
    pub state: &'static str,
    pub queue: &'static str,
    pub run_at: DateTime<Utc>,
    pub attempt: i32,
    pub worker_id: Option<String>,
    pub submitted_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub finished_reason: Option<&'static str>,
    pub error_message: Option<String>,
    /// The `errors` JSON array, as text.
    pub errors: String,
    pub access_token_hash: Vec<u8>,
    pub source_key: Option<String>,
    pub source_size: Option<i64>,
    pub certs_key: Option<String>,
    pub result_key: Option<String>,
    pub result_size: Option<i64>,
    pub result_sha256: Option<String>,
    pub result_attempt: Option<i32>,
    pub original_build_id: Option<String>,
    pub log_seq: i64,
    pub import_fingerprint: Vec<u8>,
}

/// The one attempt the old controller ran (or started) for a build.
#[derive(Debug, Clone)]
pub struct AttemptRow {
    pub build_id: String,
    pub worker_id: String,
    pub assigned_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: &'static str,
    pub error_message: Option<String>,
}

#[derive(Debug, Clone)]
pub struct LogRow {
    pub build_id: String,
    pub seq: i64,
    pub ts: DateTime<Utc>,
    pub level: String,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct SampleRow {
    pub build_id: String,
    pub ts: DateTime<Utc>,
    pub cpu_percent: f64,
    pub memory_mb: f64,
}

/// Everything of one batch of builds.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Earlier imports of builds that changed in the old database since: replaced by this batch.
    pub replace: Vec<String>,
    pub builds: Vec<BuildRow>,
    pub attempts: Vec<AttemptRow>,
    pub logs: Vec<LogRow>,
    pub samples: Vec<SampleRow>,
}

/// Key of the advisory lock that keeps two imports from running at once.
const IMPORT_LOCK: i64 = 0x6578_706f_5f69_6d70; // "expo_imp"

/// Holds the import lock for as long as the returned connection lives; `None` if another import holds it.
pub async fn lock(pool: &PgPool) -> anyhow::Result<Option<PoolConnection<Postgres>>> {
    let mut conn = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(IMPORT_LOCK)
        .fetch_one(&mut *conn)
        .await?;
    Ok(locked.then_some(conn))
}

/// Whether the database has this controller's schema (a dry run does not migrate).
pub async fn schema_exists(pool: &PgPool) -> anyhow::Result<bool> {
    let found: Option<String> = sqlx::query_scalar("SELECT to_regclass('builds')::text")
        .fetch_one(pool)
        .await?;
    Ok(found.is_some())
}

async fn existing(pool: &PgPool, sql: &'static str, ids: &[String]) -> anyhow::Result<HashSet<String>> {
    let found: Vec<String> = sqlx::query_scalar(sql).bind(ids).fetch_all(pool).await?;
    Ok(found.into_iter().collect())
}

/// A build already in the database: how it was imported (if it was) and whether this controller has
/// touched it since (it logged, ran or holds it).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PresentBuild {
    pub id: String,
    pub import_fingerprint: Option<Vec<u8>>,
    pub touched: bool,
}

/// Whether the import bookkeeping columns exist (a dry run does not migrate).
pub async fn has_fingerprints(pool: &PgPool) -> anyhow::Result<bool> {
    let found: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                        WHERE table_name = 'builds' AND column_name = 'import_fingerprint'
                          AND table_schema = current_schema())",
    )
    .fetch_one(pool)
    .await?;
    Ok(found)
}

pub async fn present_builds(pool: &PgPool, ids: &[String], fingerprints: bool) -> anyhow::Result<Vec<PresentBuild>> {
    let sql = if fingerprints {
        "SELECT id, import_fingerprint,
                (import_log_seq IS DISTINCT FROM log_seq OR state IN ('assigned', 'building')) AS touched
         FROM builds WHERE id = ANY($1)"
    } else {
        "SELECT id, NULL::bytea AS import_fingerprint, true AS touched FROM builds WHERE id = ANY($1)"
    };
    Ok(sqlx::query_as(sql).bind(ids).fetch_all(pool).await?)
}

pub async fn present_workers(pool: &PgPool, ids: &[String]) -> anyhow::Result<HashSet<String>> {
    existing(pool, "SELECT id FROM workers WHERE id = ANY($1)", ids).await
}

pub async fn present_reports(pool: &PgPool, ids: &[String]) -> anyhow::Result<HashSet<String>> {
    existing(
        pool,
        "SELECT id::text FROM diagnostics WHERE id = ANY($1::text[]::uuid[])",
        ids,
    )
    .await
}

/// Inserts workers that are not there yet; returns how many were inserted.
pub async fn insert_workers(pool: &PgPool, workers: &[NewWorker]) -> anyhow::Result<u64> {
    let ids: Vec<&str> = workers.iter().map(|w| w.id.as_str()).collect();
    let names: Vec<&str> = workers.iter().map(|w| w.name.as_str()).collect();
    let capabilities: Vec<String> = workers.iter().map(|w| w.capabilities.to_string()).collect();
    let platforms: Vec<String> = workers
        .iter()
        .map(|w| w.platforms.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(","))
        .collect();
    let statuses: Vec<&str> = workers.iter().map(|w| w.status).collect();
    let registered: Vec<DateTime<Utc>> = workers.iter().map(|w| w.registered_at).collect();
    let seen: Vec<DateTime<Utc>> = workers.iter().map(|w| w.last_seen_at).collect();
    let completed: Vec<i64> = workers.iter().map(|w| w.builds_completed).collect();
    let failed: Vec<i64> = workers.iter().map(|w| w.builds_failed).collect();
    let done = sqlx::query(
        "INSERT INTO workers (id, name, capabilities, platforms, status, registered_at, last_seen_at,
                              builds_completed, builds_failed)
         SELECT id, name, caps::jsonb, string_to_array(platforms, ','), status, registered_at, last_seen_at,
                completed, failed
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
                     $7::timestamptz[], $8::bigint[], $9::bigint[])
              AS t(id, name, caps, platforms, status, registered_at, last_seen_at, completed, failed)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&ids)
    .bind(&names)
    .bind(&capabilities)
    .bind(&platforms)
    .bind(&statuses)
    .bind(&registered)
    .bind(&seen)
    .bind(&completed)
    .bind(&failed)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Inserts diagnostics reports that are not there yet; returns how many were inserted.
pub async fn insert_reports(pool: &PgPool, reports: &[NewReport]) -> anyhow::Result<u64> {
    let ids: Vec<&str> = reports.iter().map(|r| r.id.as_str()).collect();
    let workers: Vec<&str> = reports.iter().map(|r| r.worker_id.as_str()).collect();
    let statuses: Vec<&str> = reports.iter().map(|r| r.status.as_str()).collect();
    let run_at: Vec<DateTime<Utc>> = reports.iter().map(|r| r.run_at).collect();
    let durations: Vec<i64> = reports.iter().map(|r| r.duration_ms).collect();
    let fixed: Vec<bool> = reports.iter().map(|r| r.auto_fixed).collect();
    let checks: Vec<String> = reports.iter().map(|r| r.checks.to_string()).collect();
    let done = sqlx::query(
        "INSERT INTO diagnostics (id, worker_id, status, run_at, duration_ms, auto_fixed, checks)
         SELECT id::uuid, worker_id, status, run_at, duration_ms, auto_fixed, checks::jsonb
         FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::bigint[], $6::bool[], $7::text[])
              AS t(id, worker_id, status, run_at, duration_ms, auto_fixed, checks)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&ids)
    .bind(&workers)
    .bind(&statuses)
    .bind(&run_at)
    .bind(&durations)
    .bind(&fixed)
    .bind(&checks)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// One batch of builds with their attempts, logs and samples, in one transaction; queued builds are
/// announced to waiting workers when it commits.
pub async fn insert_batch(
    pool: &PgPool,
    batch: &Batch,
    max_attempts: i32,
    retry_build_failures: bool,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    if !batch.replace.is_empty() {
        // Logs, samples and attempts go with them (ON DELETE CASCADE).
        sqlx::query("DELETE FROM builds WHERE id = ANY($1)")
            .bind(&batch.replace)
            .execute(&mut *tx)
            .await?;
    }
    // The copied objects the rows name are claimed from the pending writes (forgotten at commit); one
    // that `sweep_unlinked` doomed meanwhile (an import slower than the staging cut-off) fails the
    // batch rather than commit a row naming a deleted object.
    let named: Vec<&str> = batch
        .builds
        .iter()
        .flat_map(|b| [&b.source_key, &b.certs_key, &b.result_key])
        .filter_map(|k| k.as_deref())
        .collect();
    let claimed: Vec<String> =
        sqlx::query_scalar("DELETE FROM pending_writes WHERE key = ANY($1) AND NOT doomed RETURNING key")
            .bind(&named)
            .fetch_all(&mut *tx)
            .await?;
    let doomed = named.iter().filter(|k| !claimed.iter().any(|c| c == *k)).count();
    if doomed > 0 {
        anyhow::bail!(
            "{doomed} copied file(s) of this batch were deleted by sweep_unlinked meanwhile (the import ran longer \
             than CONTROLLER_STAGING_MAX_AGE_SECS); run the import again"
        );
    }
    insert_builds(&mut tx, &batch.builds, max_attempts, retry_build_failures).await?;
    insert_attempts(&mut tx, &batch.attempts).await?;
    insert_logs(&mut tx, &batch.logs).await?;
    insert_samples(&mut tx, &batch.samples).await?;
    let queued: Vec<(&str, &str)> = batch
        .builds
        .iter()
        .filter(|b| b.state == "pending")
        .map(|b| (b.queue, b.id.as_str()))
        .collect();
    if !queued.is_empty() {
        crate::queue::notify_ready(&mut tx, &queued).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn insert_builds(
    conn: &mut sqlx::PgConnection,
    builds: &[BuildRow],
    max_attempts: i32,
    retry_build_failures: bool,
) -> anyhow::Result<()> {
    fn col<T, F: Fn(&BuildRow) -> T>(builds: &[BuildRow], f: F) -> Vec<T> {
        builds.iter().map(f).collect()
    }
    sqlx::query(
        "INSERT INTO builds (id, state, queue, run_at, attempt, worker_id, submitted_at, started_at, completed_at,
                             finished_reason, error_message, errors, access_token_hash, source_key, source_size,
                             certs_key, result_key, result_size, result_sha256, result_attempt, original_build_id,
                             log_seq, import_fingerprint, import_log_seq, max_attempts, retry_build_failures)
         SELECT id, state, queue, run_at, attempt, worker_id, submitted_at, started_at, completed_at,
                finished_reason, error_message, errors::jsonb, access_token_hash, source_key, source_size,
                certs_key, result_key, result_size, result_sha256, result_attempt, original_build_id,
                log_seq, import_fingerprint, log_seq, $23, $24
         FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::int[], $6::text[],
                     $7::timestamptz[], $8::timestamptz[], $9::timestamptz[], $10::text[], $11::text[], $12::text[],
                     $13::bytea[], $14::text[], $15::bigint[], $16::text[], $17::text[], $18::bigint[], $19::text[],
                     $20::int[], $21::text[], $22::bigint[], $25::bytea[])
              AS t(id, state, queue, run_at, attempt, worker_id, submitted_at, started_at, completed_at,
                   finished_reason, error_message, errors, access_token_hash, source_key, source_size,
                   certs_key, result_key, result_size, result_sha256, result_attempt, original_build_id, log_seq,
                   import_fingerprint)",
    )
    .bind(col(builds, |b| b.id.clone()))
    .bind(col(builds, |b| b.state))
    .bind(col(builds, |b| b.queue))
    .bind(col(builds, |b| b.run_at))
    .bind(col(builds, |b| b.attempt))
    .bind(col(builds, |b| b.worker_id.clone()))
    .bind(col(builds, |b| b.submitted_at))
    .bind(col(builds, |b| b.started_at))
    .bind(col(builds, |b| b.completed_at))
    .bind(col(builds, |b| b.finished_reason))
    .bind(col(builds, |b| b.error_message.clone()))
    .bind(col(builds, |b| b.errors.clone()))
    .bind(col(builds, |b| b.access_token_hash.clone()))
    .bind(col(builds, |b| b.source_key.clone()))
    .bind(col(builds, |b| b.source_size))
    .bind(col(builds, |b| b.certs_key.clone()))
    .bind(col(builds, |b| b.result_key.clone()))
    .bind(col(builds, |b| b.result_size))
    .bind(col(builds, |b| b.result_sha256.clone()))
    .bind(col(builds, |b| b.result_attempt))
    .bind(col(builds, |b| b.original_build_id.clone()))
    .bind(col(builds, |b| b.log_seq))
    .bind(max_attempts)
    .bind(retry_build_failures)
    .bind(col(builds, |b| b.import_fingerprint.clone()))
    .execute(conn)
    .await?;
    Ok(())
}

async fn insert_attempts(conn: &mut sqlx::PgConnection, attempts: &[AttemptRow]) -> anyhow::Result<()> {
    if attempts.is_empty() {
        return Ok(());
    }
    let build_ids: Vec<&str> = attempts.iter().map(|a| a.build_id.as_str()).collect();
    let workers: Vec<&str> = attempts.iter().map(|a| a.worker_id.as_str()).collect();
    let assigned: Vec<DateTime<Utc>> = attempts.iter().map(|a| a.assigned_at).collect();
    let started: Vec<Option<DateTime<Utc>>> = attempts.iter().map(|a| a.started_at).collect();
    let finished: Vec<Option<DateTime<Utc>>> = attempts.iter().map(|a| a.finished_at).collect();
    let outcomes: Vec<&str> = attempts.iter().map(|a| a.outcome).collect();
    let errors: Vec<Option<&str>> = attempts.iter().map(|a| a.error_message.as_deref()).collect();
    sqlx::query(
        "INSERT INTO build_attempts (build_id, attempt, worker_id, lease_token, assigned_at, started_at,
                                     finished_at, outcome, error_message)
         SELECT build_id, 1, worker_id, nextval('lease_token_seq'), assigned_at, started_at, finished_at,
                outcome, error_message
         FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::timestamptz[],
                     $6::text[], $7::text[])
              AS t(build_id, worker_id, assigned_at, started_at, finished_at, outcome, error_message)",
    )
    .bind(&build_ids)
    .bind(&workers)
    .bind(&assigned)
    .bind(&started)
    .bind(&finished)
    .bind(&outcomes)
    .bind(&errors)
    .execute(conn)
    .await?;
    Ok(())
}

async fn insert_logs(conn: &mut sqlx::PgConnection, logs: &[LogRow]) -> anyhow::Result<()> {
    if logs.is_empty() {
        return Ok(());
    }
    let build_ids: Vec<&str> = logs.iter().map(|l| l.build_id.as_str()).collect();
    let seqs: Vec<i64> = logs.iter().map(|l| l.seq).collect();
    let ts: Vec<DateTime<Utc>> = logs.iter().map(|l| l.ts).collect();
    let levels: Vec<&str> = logs.iter().map(|l| l.level.as_str()).collect();
    let messages: Vec<&str> = logs.iter().map(|l| l.message.as_str()).collect();
    sqlx::query(
        "INSERT INTO build_logs (build_id, seq, ts, level, message)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::text[], $5::text[])",
    )
    .bind(&build_ids)
    .bind(&seqs)
    .bind(&ts)
    .bind(&levels)
    .bind(&messages)
    .execute(conn)
    .await?;
    Ok(())
}

async fn insert_samples(conn: &mut sqlx::PgConnection, samples: &[SampleRow]) -> anyhow::Result<()> {
    if samples.is_empty() {
        return Ok(());
    }
    let build_ids: Vec<&str> = samples.iter().map(|s| s.build_id.as_str()).collect();
    let ts: Vec<DateTime<Utc>> = samples.iter().map(|s| s.ts).collect();
    let cpu: Vec<f64> = samples.iter().map(|s| s.cpu_percent).collect();
    let memory: Vec<f64> = samples.iter().map(|s| s.memory_mb).collect();
    sqlx::query(
        "INSERT INTO cpu_snapshots (build_id, ts, cpu_percent, memory_mb)
         SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::float8[], $4::float8[])",
    )
    .bind(&build_ids)
    .bind(&ts)
    .bind(&cpu)
    .bind(&memory)
    .execute(&mut *conn)
    .await?;
    // The per-build totals that live samples keep up to date (count, last time, CPU seconds).
    sqlx::query(
        "UPDATE builds b SET cpu_samples = t.n, cpu_sample_at = t.last, cpu_seconds = t.seconds
         FROM (
            SELECT build_id, count(*) AS n, max(ts) AS last, sum(cpu_percent / 100.0 * least(gap, 60)) AS seconds
            FROM (
                SELECT build_id, ts, cpu_percent,
                       coalesce(extract(epoch FROM ts - lag(ts) OVER (PARTITION BY build_id ORDER BY ts)), 0) AS gap
                FROM cpu_snapshots WHERE build_id = ANY($1)
            ) s
            GROUP BY build_id
         ) t
         WHERE b.id = t.build_id",
    )
    .bind(&build_ids)
    .execute(conn)
    .await?;
    Ok(())
}
