//! Submitter quotas (scheduling.md): max queued is checked here before a submit or retry reads anything;
//! max running is part of the claim's eligibility (`claim.rs`).

use sqlx::{PgConnection, PgPool};

use super::QueueResult;

/// Whether the submitter `key_id` already has `max_queued` builds queued (pending, scheduled, retryable;
/// all platforms) or more. `max_queued = 0` means unlimited; the built-in admin key (`None`) has no
/// quota. Reads the key's row and the per-queue counts of `submitter_shares`: a few index lookups.
pub async fn submitter_queue_full(pool: &PgPool, key_id: Option<&str>) -> QueueResult<bool> {
    let mut conn = pool.acquire().await?;
    submitter_queue_full_on(&mut conn, key_id).await
}

/// [`submitter_queue_full`] on a connection (e.g. the one whose insert was just refused).
pub async fn submitter_queue_full_on(conn: &mut PgConnection, key_id: Option<&str>) -> QueueResult<bool> {
    let Some(key_id) = key_id else { return Ok(false) };
    let full: Option<bool> = sqlx::query_scalar(
        "SELECT k.max_queued > 0 AND k.max_queued <= COALESCE((SELECT sum(s.queued) FROM submitter_shares s
             WHERE s.queue IN (SELECT name FROM queues) AND s.submitter = k.id), 0)
         FROM api_keys k WHERE k.id = $1",
    )
    .bind(key_id)
    .fetch_optional(conn)
    .await?;
    Ok(full.unwrap_or(false))
}
