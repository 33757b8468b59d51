//! Reads of build rows: single builds, filtered listings, queue depth and fleet statistics.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::lease::{Holder, held_by};
use super::{Build, Platform, QueueCounts, QueueResult, Settings};

/// The build with this id, if any.
pub async fn find_build(pool: &PgPool, id: &str) -> QueueResult<Option<Build>> {
    Ok(sqlx::query_as("SELECT * FROM builds WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?)
}

/// Filters of a build listing; every field narrows it. Newest first, keyset-paginated by `before`.
#[derive(Debug, Clone, Default)]
pub struct BuildFilter {
    /// Native states to include (`None`: all).
    pub states: Option<Vec<String>>,
    pub platform: Option<Platform>,
    /// A worker's id or name.
    pub worker_id: Option<String>,
    /// Only builds older than this build (the previous page's last id).
    pub before: Option<String>,
    /// Only builds submitted at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only builds this key submitted (a submitter key's view).
    pub submitted_by: Option<String>,
    pub limit: i64,
}

/// Builds matching `filter`, newest first.
pub async fn list_builds(pool: &PgPool, filter: &BuildFilter) -> QueueResult<Vec<Build>> {
    Ok(sqlx::query_as(
        "SELECT * FROM builds
         WHERE ($1::text[] IS NULL OR state = ANY($1))
           AND ($2::text IS NULL OR queue = $2)
           AND ($3::text IS NULL OR worker_id = $3 OR worker_id IN (SELECT id FROM workers WHERE name = $3))
           AND ($4::text IS NULL OR (submitted_at, id) < (SELECT submitted_at, id FROM builds WHERE id = $4))
           AND ($6::timestamptz IS NULL OR submitted_at >= $6)
           AND ($7::text IS NULL OR submitted_by = $7)
         ORDER BY submitted_at DESC, id DESC
         LIMIT $5",
    )
    .bind(&filter.states)
    .bind(filter.platform.map(Platform::as_str))
    .bind(&filter.worker_id)
    .bind(&filter.before)
    .bind(filter.limit)
    .bind(filter.since)
    .bind(&filter.submitted_by)
    .fetch_all(pool)
    .await?)
}

/// Builds held by a worker right now (bounded by the fleet size; capped for safety).
pub async fn active_builds(pool: &PgPool) -> QueueResult<Vec<Build>> {
    Ok(
        sqlx::query_as("SELECT * FROM builds WHERE state IN ('assigned', 'building') ORDER BY started_at LIMIT 10000")
            .fetch_all(pool)
            .await?,
    )
}

/// Builds waiting (any queued state) and builds held by a worker.
pub async fn queue_counts(pool: &PgPool) -> QueueResult<QueueCounts> {
    let (pending, active): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state IN ('pending', 'scheduled', 'retryable')),
                count(*) FILTER (WHERE state IN ('assigned', 'building'))
         FROM builds WHERE state IN ('pending', 'scheduled', 'retryable', 'assigned', 'building')",
    )
    .fetch_one(pool)
    .await?;
    Ok(QueueCounts { pending, active })
}

/// Fleet statistics for `/api/stats`, all measured from rows.
#[derive(Debug, Clone, Copy, Default, sqlx::FromRow)]
pub struct FleetStats {
    pub nodes_online: i64,
    pub builds_queued: i64,
    pub active_builds: i64,
    /// Builds completed since UTC midnight of `now`.
    pub builds_today: i64,
    pub total_builds: i64,
    /// Sum of (completed_at − started_at) over completed builds.
    pub total_build_time_ms: i64,
    /// CPU time measured by the VM monitors, in core-seconds (Σ cpu% / 100 × sample interval).
    pub total_cpu_seconds: i64,
}

/// Workers seen within this window count as online.
pub const ONLINE_WINDOW_SECS: i64 = 120;

pub async fn fleet_stats(pool: &PgPool, now: DateTime<Utc>) -> QueueResult<FleetStats> {
    let midnight = now.date_naive().and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
    Ok(sqlx::query_as(
        "SELECT
            (SELECT count(*) FROM workers WHERE status <> 'offline' AND admin_state <> 'revoked' AND unregistered_at IS NULL AND last_seen_at > $1 - $3::bigint * interval '1 second') AS nodes_online,
            (SELECT count(*) FROM builds WHERE state IN ('pending', 'scheduled', 'retryable')) AS builds_queued,
            (SELECT count(*) FROM builds WHERE state IN ('assigned', 'building')) AS active_builds,
            (SELECT count(*) FROM builds WHERE state = 'completed' AND completed_at >= $2 AND completed_at <= $1) AS builds_today,
            (SELECT count(*) FROM builds) AS total_builds,
            (SELECT coalesce(sum(extract(epoch FROM completed_at - started_at) * 1000), 0)::bigint
               FROM builds WHERE state = 'completed' AND started_at IS NOT NULL) AS total_build_time_ms,
            (SELECT coalesce(sum(cpu_seconds), 0)::bigint FROM builds) AS total_cpu_seconds",
    )
    .bind(now)
    .bind(midnight)
    .bind(ONLINE_WINDOW_SECS)
    .fetch_one(pool)
    .await?)
}

/// Stores one CPU sample of a build.
pub async fn record_cpu_sample(
    pool: &PgPool,
    build_id: &str,
    holder: Holder<'_>,
    cpu_percent: f64,
    memory_mb: f64,
    settings: &Settings,
    now: DateTime<Utc>,
) -> QueueResult<()> {
    // Only the holder's samples are kept, and at most `max_samples_per_build` of them (T3): when one more
    // would exceed it, every other one of the oldest half goes, so a long run keeps its whole curve at a
    // coarser step for its start. The build row keeps the count and the CPU seconds (so neither the cap
    // nor `/api/stats` ever counts samples), and its row lock orders concurrent posters.
    const SQL: &str = concat!(
        "UPDATE builds SET cpu_samples = cpu_samples + 1, cpu_sample_at = $4,
            cpu_seconds = cpu_seconds + $5 / 100.0
                * least(coalesce(extract(epoch FROM $4 - cpu_sample_at), 0), 60)
         WHERE ",
        held_by!(),
        " RETURNING cpu_samples"
    );
    let mut tx = pool.begin().await?;
    let count: Option<i32> = sqlx::query_scalar(SQL)
        .bind(build_id)
        .bind(holder.worker_id)
        .bind(holder.lease_token)
        .bind(now)
        .bind(cpu_percent)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(count) = count else {
        drop(tx);
        return Err(super::lease::refusal(pool, build_id, holder.worker_id).await?);
    };
    sqlx::query("INSERT INTO cpu_snapshots (build_id, ts, cpu_percent, memory_mb) VALUES ($1, $2, $3, $4)")
        .bind(build_id)
        .bind(now)
        .bind(cpu_percent)
        .bind(memory_mb)
        .execute(&mut *tx)
        .await?;
    if i64::from(count) > settings.max_samples_per_build {
        sqlx::query(
            "WITH oldest AS (
                SELECT ctid, row_number() OVER (ORDER BY ts) AS n FROM cpu_snapshots
                WHERE build_id = $1 ORDER BY ts LIMIT $2 / 2
             ), thinned AS (
                DELETE FROM cpu_snapshots WHERE ctid IN (SELECT ctid FROM oldest WHERE n % 2 = 0) RETURNING 1
             )
             UPDATE builds SET cpu_samples = cpu_samples - (SELECT count(*) FROM thinned) WHERE id = $1",
        )
        .bind(build_id)
        .bind(settings.max_samples_per_build)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Final builds that still hold a certs bundle (up to `batch`): `(id, certs_key)`.
pub async fn certs_to_purge(pool: &PgPool, batch: i64) -> QueueResult<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT id, certs_key FROM builds
         WHERE certs_key IS NOT NULL AND state IN ('completed', 'failed', 'cancelled')
         ORDER BY completed_at LIMIT $1",
    )
    .bind(batch)
    .fetch_all(pool)
    .await?)
}

/// Forgets a purged certs bundle.
pub async fn clear_certs(pool: &PgPool, build_id: &str) -> QueueResult<()> {
    sqlx::query("UPDATE builds SET certs_key = NULL WHERE id = $1 AND state IN ('completed', 'failed', 'cancelled')")
        .bind(build_id)
        .execute(pool)
        .await?;
    Ok(())
}
