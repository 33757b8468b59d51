//! Prune: sources and results of finished builds older than the artifact retention (7 days) are
//! deleted; rows of finished builds older than the retention (30 days) go with their logs, attempts and
//! CPU samples, as do old diagnostic reports and tick records. Bounded per tick.

use chrono::{DateTime, Duration, Utc};

use super::{BATCH, JobContext};
use crate::queue::{self, QueueResult};
use crate::storage::Key;

pub async fn run_once(ctx: &JobContext, now: DateTime<Utc>) -> QueueResult<u64> {
    let artifact_cutoff = now - Duration::days(ctx.jobs.artifact_retention_days as i64);
    let mut handled = 0;
    for (build_id, keys) in queue::stale_artifacts(&ctx.pool, artifact_cutoff, BATCH).await? {
        let mut deleted_all = true;
        for key in keys.iter().filter_map(|k| Key::parse(k)) {
            if let Err(error) = ctx.storage.delete(&key).await {
                tracing::warn!(build_id, %error, "could not delete an artifact; the next tick retries");
                deleted_all = false;
            }
        }
        if deleted_all {
            queue::forget_artifacts(&ctx.pool, &build_id).await?;
            handled += 1;
        }
    }
    let row_cutoff = now - Duration::days(ctx.jobs.retention_days as i64);
    let old = queue::prunable_builds(&ctx.pool, row_cutoff, BATCH).await?;
    handled += queue::delete_history(&ctx.pool, &old, row_cutoff, BATCH).await?;
    Ok(handled)
}
