//! Statements of the retention jobs: offline workers, once-per-tick claims, pruning of old history.

use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;

use super::QueueResult;

/// Claims `(job, tick)` for this instance; false when another instance already ran that tick.
pub async fn claim_tick(pool: &PgPool, job: &str, tick: DateTime<Utc>, instance: &str) -> QueueResult<bool> {
    let inserted = sqlx::query("INSERT INTO cron_ticks (job, tick, ran_by) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
        .bind(job)
        .bind(tick)
        .bind(instance)
        .execute(pool)
        .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Marks workers unseen since `now - after` offline (up to `batch`); returns their ids. Their held
/// attempts are left to the lease rescue: a worker may be busy building without polling.
pub async fn mark_offline(pool: &PgPool, after: Duration, now: DateTime<Utc>, batch: i64) -> QueueResult<Vec<String>> {
    Ok(sqlx::query_scalar(
        "WITH gone AS (
            UPDATE workers SET status = 'offline' WHERE id IN (
                SELECT id FROM workers WHERE status <> 'offline' AND last_seen_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)
            RETURNING id, admin_state
         ), event AS (
            INSERT INTO events (kind, worker_id, data)
            SELECT 'worker.offline', id, jsonb_build_object('state', 'offline', 'admin_state', admin_state, 'reason', 'unseen')
            FROM gone
         )
         SELECT id FROM gone",
    )
    .bind(now - after)
    .bind(batch)
    .fetch_all(pool)
    .await?)
}

/// Stored objects of finished builds older than `cutoff` (up to `batch`): `(build id, keys)`.
pub async fn stale_artifacts(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    batch: i64,
) -> QueueResult<Vec<(String, Vec<String>)>> {
    Ok(sqlx::query_as(
        "SELECT id, array_remove(ARRAY[source_key, result_key], NULL) FROM builds
         WHERE state IN ('completed', 'failed', 'cancelled') AND completed_at < $1
           AND (source_key IS NOT NULL OR result_key IS NOT NULL)
         ORDER BY completed_at LIMIT $2",
    )
    .bind(cutoff)
    .bind(batch)
    .fetch_all(pool)
    .await?)
}

/// Forgets the stored objects of a build after they were deleted.
pub async fn forget_artifacts(pool: &PgPool, build_id: &str) -> QueueResult<()> {
    sqlx::query("UPDATE builds SET source_key = NULL, result_key = NULL WHERE id = $1")
        .bind(build_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Finished builds older than `cutoff` whose objects are gone (up to `batch`).
pub async fn prunable_builds(pool: &PgPool, cutoff: DateTime<Utc>, batch: i64) -> QueueResult<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM builds WHERE state IN ('completed', 'failed', 'cancelled') AND completed_at < $1
           AND source_key IS NULL AND result_key IS NULL AND certs_key IS NULL
         ORDER BY completed_at LIMIT $2",
    )
    .bind(cutoff)
    .bind(batch)
    .fetch_all(pool)
    .await?)
}

/// Deletes build rows (their logs, attempts and CPU samples go with them) and old reports and ticks;
/// returns the ids of the builds deleted.
pub async fn delete_history(
    pool: &PgPool,
    build_ids: &[String],
    cutoff: DateTime<Utc>,
    batch: i64,
) -> QueueResult<Vec<String>> {
    let builds: Vec<String> = sqlx::query_scalar(
        "WITH deleted AS (DELETE FROM builds WHERE id = ANY($1) RETURNING id, queue, state, submitted_by),
         event AS (
            INSERT INTO events (kind, build_id, data, submitted_by)
            SELECT 'build.deleted', id, jsonb_build_object('platform', queue, 'state', state, 'reason', 'pruned'),
                   submitted_by
            FROM deleted)
         SELECT id FROM deleted",
    )
    .bind(build_ids)
    .fetch_all(pool)
    .await?;
    sqlx::query("DELETE FROM diagnostics WHERE id IN (SELECT id FROM diagnostics WHERE run_at < $1 LIMIT $2)")
        .bind(cutoff)
        .bind(batch)
        .execute(pool)
        .await?;
    sqlx::query(
        "DELETE FROM cron_ticks WHERE (job, tick) IN (SELECT job, tick FROM cron_ticks WHERE tick < $1 LIMIT $2)",
    )
    .bind(Utc::now() - Duration::days(1))
    .bind(batch)
    .execute(pool)
    .await?;
    Ok(builds)
}

/// Deletes events created before `cutoff`, oldest first, at most `batch`; returns how many.
pub async fn prune_events(pool: &PgPool, cutoff: DateTime<Utc>, batch: i64) -> QueueResult<u64> {
    const SQL: &str =
        "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE created_at < $1 ORDER BY id LIMIT $2)";
    let deleted = sqlx::query(SQL).bind(cutoff).bind(batch).execute(pool).await?;
    Ok(deleted.rows_affected())
}
