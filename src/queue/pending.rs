//! Pending writes: every object key is recorded before its object is written and forgotten in the
//! transaction that links it to its row (a build's insert or its completion). What a kill, a lost
//! commit answer or a failed cleanup leaves behind is therefore always named here, and the
//! `sweep_unlinked` job deletes the objects of old keys that no row names.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::QueueResult;

/// Records `keys` as being written (a key recorded again is made young again).
pub async fn record_writes(pool: &PgPool, keys: &[&str]) -> QueueResult<()> {
    sqlx::query(
        "INSERT INTO pending_writes (key) SELECT unnest($1::text[])
         ON CONFLICT (key) DO UPDATE SET queued_at = now()",
    )
    .bind(keys)
    .execute(pool)
    .await?;
    Ok(())
}

/// Forgets pending keys whose objects are deleted (or linked).
pub async fn forget_writes(pool: &PgPool, keys: &[String]) -> QueueResult<()> {
    if !keys.is_empty() {
        sqlx::query("DELETE FROM pending_writes WHERE key = ANY($1)")
            .bind(keys)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// A pending key old enough to settle, and whether a build row names it.
#[derive(Debug, sqlx::FromRow)]
pub struct PendingWrite {
    pub key: String,
    pub linked: bool,
}

/// Up to `limit` keys recorded before `cutoff`, oldest first, each with whether a row names it. Keys
/// live under `builds/<id>/`, so the check reads one row by its primary key.
pub async fn stale_writes(pool: &PgPool, cutoff: DateTime<Utc>, limit: i64) -> QueueResult<Vec<PendingWrite>> {
    Ok(sqlx::query_as(
        "SELECT p.key, EXISTS (
                SELECT 1 FROM builds b WHERE b.id = split_part(p.key, '/', 2)
                  AND p.key IN (b.source_key, b.certs_key, b.result_key)
            ) AS linked
         FROM pending_writes p WHERE p.queued_at < $1
         ORDER BY p.queued_at, p.key LIMIT $2",
    )
    .bind(cutoff)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
