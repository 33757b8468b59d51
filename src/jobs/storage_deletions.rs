//! Storage deletions: objects of deleted builds whose deletion failed (store unreachable) are queued
//! in `pending_deletions`; each tick retries one batch, so no object outlives its row for long.

use sqlx::PgPool;

use super::{BATCH, JobContext};
use crate::queue::{QueueResult, operator};
use crate::storage::{Key, Storage};

pub async fn run_once(ctx: &JobContext) -> QueueResult<u64> {
    let keys = operator::pending_deletions(&ctx.pool, BATCH).await?;
    delete_objects(&ctx.pool, &ctx.storage, &keys).await
}

/// Deletes queued objects from the store and forgets those deleted; returns how many. A failure is
/// logged and left queued for the next tick.
pub async fn delete_objects(pool: &PgPool, storage: &Storage, keys: &[String]) -> QueueResult<u64> {
    let mut deleted = Vec::new();
    for stored in keys {
        let outcome = match Key::parse(stored) {
            Some(key) => storage.delete(&key).await,
            // Not a key this controller writes: nothing to delete.
            None => Ok(()),
        };
        match outcome {
            Ok(()) => deleted.push(stored.clone()),
            Err(error) => {
                tracing::warn!(key = %stored, %error, "could not delete an object; the storage_deletions job retries");
            }
        }
    }
    operator::forget_deletions(pool, &deleted).await?;
    for key in &deleted {
        tracing::info!(key = %key, "object of a deleted build removed from the store");
    }
    Ok(deleted.len() as u64)
}
