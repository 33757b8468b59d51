//! Sweep staging (R44): staged uploads and partial files older than `CONTROLLER_STAGING_MAX_AGE_SECS`
//! are left by crashed or cut uploads; delete them. Runs on every instance (local stores are per
//! instance); on a shared bucket the sweeps are idempotent.

use chrono::{DateTime, Duration, Utc};

use super::JobContext;
use crate::queue::QueueResult;

pub async fn run_once(ctx: &JobContext, now: DateTime<Utc>) -> QueueResult<u64> {
    let cutoff = now - Duration::seconds(ctx.jobs.staging_max_age_secs.min(i64::MAX as u64) as i64);
    match ctx.storage.sweep_staging(cutoff).await {
        Ok(removed) => {
            if removed > 0 {
                tracing::info!(removed, "stale staged uploads deleted");
            }
            Ok(removed)
        }
        Err(error) => {
            tracing::warn!(%error, "staging sweep failed; the next tick retries");
            Ok(0)
        }
    }
}
