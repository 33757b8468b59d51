//! Certs purge: the certs bundle of a build in a final state is deleted (R36), then forgotten.

use super::{BATCH, JobContext};
use crate::queue::{self, QueueResult};
use crate::storage::Key;

pub async fn run_once(ctx: &JobContext) -> QueueResult<u64> {
    let mut purged = 0;
    for (build_id, stored) in queue::certs_to_purge(&ctx.pool, BATCH).await? {
        if let Some(key) = Key::parse(&stored)
            && let Err(error) = ctx.storage.delete(&key).await
        {
            tracing::warn!(build_id = %build_id, %error, "could not delete certs; the next tick retries");
            continue;
        }
        queue::clear_certs(&ctx.pool, &build_id).await?;
        tracing::info!(build_id = %build_id, "certs of a finished build deleted");
        purged += 1;
    }
    Ok(purged)
}
