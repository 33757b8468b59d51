//! Offline workers: workers unseen for `CONTROLLER_OFFLINE_AFTER_SECS` are marked offline. Their held
//! attempts are not touched here: the lease rescue takes them once the lease expires, since a worker
//! may be busy building without polling.

use chrono::{DateTime, Duration, Utc};

use super::{BATCH, JobContext};
use crate::queue::{self, QueueResult};

pub async fn run_once(ctx: &JobContext, now: DateTime<Utc>) -> QueueResult<u64> {
    let after = Duration::seconds(ctx.jobs.offline_after_secs as i64);
    // After an outage the clock stops first, so undelivered polls do not take workers offline.
    queue::clock::catch_up(&ctx.pool, &ctx.settings).await?;
    let offline = queue::mark_offline(&ctx.pool, after, now, BATCH).await?;
    for worker_id in &offline {
        tracing::info!(worker_id = %worker_id, "worker went offline");
    }
    Ok(offline.len() as u64)
}
