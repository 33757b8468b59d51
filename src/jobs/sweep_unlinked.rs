//! Sweep unlinked objects (D1): every object key is recorded in `pending_writes` before its object is
//! written and forgotten in the transaction that links it to its build row. A key still pending after
//! the staging cut-off (`CONTROLLER_STAGING_MAX_AGE_SECS`, counted from the end of its write) belongs
//! to a write that was killed, whose commit answer was lost, or whose cleanup failed. The sweep first
//! marks its batch doomed in one committed transaction (forgetting keys a row names), then deletes
//! their objects and forgets only the keys it deleted; a linking statement refuses a doomed key, so a
//! slow request never links an object being deleted. A key whose delete fails is made young again and
//! retried after the others. `expo_unlinked_objects_deleted_total` counts objects that existed and were
//! deleted (keys whose object was never written are forgotten without counting).

use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;

use super::{BATCH, JobContext};
use crate::queue::{self, QueueResult};
use crate::storage::{Key, Storage};

pub async fn run_once(ctx: &JobContext, now: DateTime<Utc>) -> QueueResult<u64> {
    let cutoff = now - Duration::seconds(ctx.jobs.staging_max_age_secs.min(i64::MAX as u64) as i64);
    let doomed = queue::doom_stale_writes(&ctx.pool, cutoff, BATCH).await?;
    let mut settled = Vec::new();
    let mut failed = Vec::new();
    let mut deleted = 0;
    for pending in doomed {
        match delete_if_present(&ctx.storage, &pending).await {
            Ok(existed) => {
                if existed {
                    tracing::info!(key = %pending, "object no build row names deleted");
                    deleted += 1;
                }
                settled.push(pending);
            }
            Err(error) => {
                tracing::warn!(key = %pending, %error, "could not delete an unlinked object; retried after the others");
                failed.push(pending);
            }
        }
    }
    crate::metrics::unlinked_deleted(deleted);
    queue::forget_writes(&ctx.pool, &settled).await?;
    queue::postpone_writes(&ctx.pool, &failed).await?;
    Ok(deleted)
}

/// Deletes the object of a pending key; whether it existed (a write killed before its first byte
/// leaves none).
async fn delete_if_present(storage: &Storage, key: &str) -> object_store::Result<bool> {
    let Some(key) = Key::parse(key) else {
        return Ok(false);
    };
    let existed = match storage.size(&key).await {
        Ok(_) => true,
        Err(object_store::Error::NotFound { .. }) => false,
        Err(error) => return Err(error),
    };
    storage.delete(&key).await?;
    Ok(existed)
}

/// Deletes objects that were written for a request whose row was definitely not created or linked
/// (a refusal, never a database error whose commit may have happened), then forgets their pending
/// keys. The keys are first claimed (doomed): one the sweep already doomed is left to it. Whatever
/// cannot be deleted now stays pending and doomed, and `sweep_unlinked` retries it.
pub async fn discard_unlinked(pool: &PgPool, storage: &Storage, keys: &[&Key]) {
    let names: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    let owned = match queue::doom_writes(pool, &names).await {
        Ok(owned) => owned,
        Err(error) => {
            tracing::warn!(%error, "could not claim unused objects for deletion; sweep_unlinked settles them");
            return;
        }
    };
    let mut deleted = Vec::new();
    for key in keys.iter().filter(|k| owned.iter().any(|o| o == k.as_str())) {
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
