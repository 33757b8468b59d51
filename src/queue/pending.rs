//! Pending writes: every object key is recorded before its object is written and forgotten in the
//! transaction that links it to its row (a build's insert or its completion). What a kill, a lost
//! commit answer or a failed cleanup leaves behind is therefore always named here, and the
//! `sweep_unlinked` job deletes the objects of old keys that no row names.
//!
//! Deleting is claimed, never checked-then-done: whoever deletes an object first marks its key
//! `doomed` (and commits), and a linking statement claims its keys under a row lock only while they
//! are present and not doomed, or refuses ([`QueueError::ObjectsGone`]). So a row that commits never
//! names an object being deleted, however slow the request that wrote it.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{QueueError, QueueResult};

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

/// Makes pending keys young again once their (slow) writes have finished, right before the statement
/// that links them: the sweep's age cut-off counts from the end of the write, not its start. A key
/// already doomed (or deleted and forgotten) is not brought back; the linking statement refuses it.
pub async fn refresh_writes(pool: &PgPool, keys: &[&str]) -> QueueResult<()> {
    sqlx::query("UPDATE pending_writes SET queued_at = now() WHERE key = ANY($1) AND NOT doomed")
        .bind(keys)
        .execute(pool)
        .await?;
    Ok(())
}

/// [`refresh_writes`] for keys recorded at `recorded`, once their writes have ended, only when the writes
/// took a quarter of the staging cut-off or more: a faster write's keys are still young from their
/// recording, and the statement that links them follows at once (it refuses a doomed key in any case,
/// so skipping the refresh saves a round trip, never a guarantee).
pub async fn refresh_slow_writes(
    pool: &PgPool,
    keys: &[&str],
    recorded: std::time::Instant,
    staging_max_age_secs: u64,
) -> QueueResult<()> {
    if recorded.elapsed() < std::time::Duration::from_secs(staging_max_age_secs / 4) {
        return Ok(());
    }
    refresh_writes(pool, keys).await
}

/// Names `key` again as a doomed pending write after its writer's delete failed following a definite
/// refusal (the sweep may already have forgotten it): `sweep_unlinked` then retries the delete.
pub async fn doom_forgotten_write(pool: &PgPool, key: &str) -> QueueResult<()> {
    sqlx::query(
        "INSERT INTO pending_writes (key, doomed) VALUES ($1, true) ON CONFLICT (key) DO UPDATE SET doomed = true",
    )
    .bind(key)
    .execute(pool)
    .await?;
    Ok(())
}

/// Claims `keys` for deletion by their writer after a definite refusal: returns those this caller
/// now owns (present and not doomed before). A key already doomed belongs to the sweep.
pub async fn doom_writes(pool: &PgPool, keys: &[&str]) -> QueueResult<Vec<String>> {
    Ok(
        sqlx::query_scalar("UPDATE pending_writes SET doomed = true WHERE key = ANY($1) AND NOT doomed RETURNING key")
            .bind(keys)
            .fetch_all(pool)
            .await?,
    )
}

/// Forgets doomed keys whose objects are deleted.
pub async fn forget_writes(pool: &PgPool, keys: &[String]) -> QueueResult<()> {
    if !keys.is_empty() {
        sqlx::query("DELETE FROM pending_writes WHERE key = ANY($1)")
            .bind(keys)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Makes keys whose objects could not be deleted young again, so the next batches take the others
/// first and a key whose delete always fails never holds the sweep back.
pub async fn postpone_writes(pool: &PgPool, keys: &[String]) -> QueueResult<()> {
    if !keys.is_empty() {
        sqlx::query("UPDATE pending_writes SET queued_at = now() WHERE key = ANY($1)")
            .bind(keys)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// The sweep's batch, in one transaction: up to `limit` keys recorded before `cutoff` (oldest first,
/// skipping keys a linking statement holds) that a row names are forgotten (live, never deleted);
/// the others are marked doomed and returned, to be deleted by the caller. Keys live under
/// `builds/<id>/`, so the check reads one row by its primary key (a loose result's, by its key through a
/// partial index). Overlapping sweeps take disjoint
/// batches or the same doomed keys, whose deletes are idempotent.
pub async fn doom_stale_writes(pool: &PgPool, cutoff: DateTime<Utc>, limit: i64) -> QueueResult<Vec<String>> {
    let mut tx = pool.begin().await?;
    let batch: Vec<(String, bool)> = sqlx::query_as(
        "SELECT p.key, EXISTS (
                SELECT 1 FROM builds b WHERE b.id = split_part(p.key, '/', 2)
                  AND p.key IN (b.source_key, b.certs_key, b.result_key)
            ) OR (p.key LIKE 'results/%' AND EXISTS (
                -- a loose result (storage::Key::loose_result) names no build: found by its key through
                -- builds_loose_result_idx (its completion forgets it in any case)
                SELECT 1 FROM builds b WHERE b.result_key = p.key AND b.result_key LIKE 'results/%'
            )) AS linked
         FROM pending_writes p WHERE p.queued_at < $1
         ORDER BY p.queued_at, p.key LIMIT $2
         FOR UPDATE OF p SKIP LOCKED",
    )
    .bind(cutoff)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await
    .map_err(QueueError::DbUncommitted)?;
    let (linked, unlinked): (Vec<_>, Vec<_>) = batch.into_iter().partition(|(_, linked)| *linked);
    let linked: Vec<String> = linked.into_iter().map(|(key, _)| key).collect();
    let doomed: Vec<String> = unlinked.into_iter().map(|(key, _)| key).collect();
    sqlx::query("DELETE FROM pending_writes WHERE key = ANY($1)")
        .bind(&linked)
        .execute(&mut *tx)
        .await
        .map_err(QueueError::DbUncommitted)?;
    sqlx::query("UPDATE pending_writes SET doomed = true WHERE key = ANY($1)")
        .bind(&doomed)
        .execute(&mut *tx)
        .await
        .map_err(QueueError::DbUncommitted)?;
    tx.commit().await?;
    Ok(doomed)
}

/// Keys recorded as pending writes ahead of their writes, by the statement that linked an earlier
/// object (a submit's insert records one spare source key for a later submit of this instance): a
/// request that takes one writes its object without a statement before its body. A spare is an
/// ordinary pending key, so every guarantee of the protocol holds for it unchanged — it is named
/// before its object is written (a kill leaves a key `sweep_unlinked` settles), and the linking
/// statement claims it under a row lock only while it is present and not doomed. A spare is taken
/// only while young (a quarter of the staging cut-off, counted from before its recording), so the
/// sweep's cut-off is not reached before the write that takes it ends ([`refresh_slow_writes`] counts
/// the write from that recording); spares never taken have no object and the sweep forgets them.
#[derive(Debug, Default)]
pub struct SpareKeys {
    /// Ids (e.g. build ids) whose keys are recorded, with when (before the recording statement).
    ids: std::sync::Mutex<Vec<(String, std::time::Instant)>>,
}

impl SpareKeys {
    /// At most this many spares per instance (one is taken per request, one recorded per link).
    pub const MAX: usize = 64;

    /// A spare recorded less than `max_age` ago, if any (older ones are dropped: the sweep settles them).
    pub fn take(&self, max_age: std::time::Duration) -> Option<(String, std::time::Instant)> {
        let mut ids = super::locked(&self.ids);
        ids.retain(|(_, recorded)| recorded.elapsed() < max_age);
        ids.pop()
    }

    /// Whether another spare is wanted.
    pub fn wanted(&self) -> bool {
        super::locked(&self.ids).len() < Self::MAX
    }

    /// A spare whose key was recorded by a statement that began at `recorded` and committed.
    pub fn put(&self, id: String, recorded: std::time::Instant) {
        let mut ids = super::locked(&self.ids);
        if ids.len() < Self::MAX {
            ids.push((id, recorded));
        }
    }
}
