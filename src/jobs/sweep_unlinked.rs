//! Sweep unlinked objects (D1): every object key is recorded in `pending_writes` before its object is
//! written and forgotten in the transaction that links it to its build row. A key still pending after
//! the staging cut-off (`CONTROLLER_STAGING_MAX_AGE_SECS`) belongs to a write that was killed, whose
//! commit answer was lost, or whose cleanup failed: its object is deleted unless a row names it, then
//! the key is forgotten. Runs once per tick across instances (the table is shared); the count of
//! objects deleted is `expo_unlinked_objects_deleted_total`.

use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;

use super::{BATCH, JobContext};
use crate::queue::{self, QueueResult};
use crate::storage::{Key, Storage};

pub async fn run_once(ctx: &JobContext, now: DateTime<Utc>) -> QueueResult<u64> {
    let cutoff = now - Duration::seconds(ctx.jobs.staging_max_age_secs.min(i64::MAX as u64) as i64);
    let stale = queue::stale_writes(&ctx.pool, cutoff, BATCH).await?;
    let mut settled = Vec::new();
    let mut deleted = 0;
    for pending in stale {
        if pending.linked {
            // A row names it: it is live, never deleted here.
            settled.push(pending.key);
            continue;
        }
        let outcome = match Key::parse(&pending.key) {
            Some(key) => ctx.storage.delete(&key).await,
            None => Ok(()),
        };
        match outcome {
            Ok(()) => {
                tracing::info!(key = %pending.key, "object no build row names deleted");
                deleted += 1;
                settled.push(pending.key);
            }
            Err(error) => {
                tracing::warn!(key = %pending.key, %error, "could not delete an unlinked object; the next tick retries");
            }
        }
    }
    queue::forget_writes(&ctx.pool, &settled).await?;
    crate::metrics::unlinked_deleted(deleted);
    Ok(deleted)
}

/// Deletes objects that were written for a request whose row was definitely not created or linked
/// (a refusal, never a database error whose commit may have happened), then forgets their pending
/// keys. Whatever cannot be deleted now stays pending, and `sweep_unlinked` retries it.
pub async fn discard_unlinked(pool: &PgPool, storage: &Storage, keys: &[&Key]) {
    let mut deleted = Vec::new();
    for key in keys {
        match storage.delete(key).await {
            Ok(()) => deleted.push(key.as_str().to_string()),
            Err(error) => {
                tracing::warn!(key = %key.as_str(), %error, "could not delete an unused object; sweep_unlinked retries");
            }
        }
    }
    if let Err(error) = queue::forget_writes(pool, &deleted).await {
        tracing::warn!(%error, "could not forget deleted objects; sweep_unlinked settles them");
    }
}
