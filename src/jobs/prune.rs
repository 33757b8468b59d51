//! Prune: sources and results of finished builds older than the artifact retention (7 days) are
//! deleted; rows of finished builds older than the retention (30 days) go with their logs, attempts and
//! CPU samples, as do old diagnostic reports and tick records; events older than
//! `CONTROLLER_EVENT_RETENTION_HOURS` are deleted from the outbox, audit rows older than
//! `CONTROLLER_AUDIT_RETENTION_DAYS` from the audit log, delivered or failed webhook deliveries older
//! than the retention with their attempts. Bounded per tick.

use chrono::{DateTime, Duration, Utc};

use super::{BATCH, JobContext};
use crate::queue::{self, QueueResult};
use crate::storage::Key;

/// Events deleted per statement, and statements per tick at most.
const EVENT_BATCH: i64 = 10_000;
const EVENT_BATCHES: usize = 50;

pub async fn run_once(ctx: &JobContext, now: DateTime<Utc>) -> QueueResult<u64> {
    let artifact_cutoff = now - Duration::days(ctx.jobs.artifact_retention_days as i64);
    let mut handled = 0;
    for (build_id, keys) in queue::stale_artifacts(&ctx.pool, artifact_cutoff, BATCH).await? {
        let mut deleted_all = true;
        for key in keys.iter().filter_map(|k| Key::parse(k)) {
            if let Err(error) = ctx.storage.delete(&key).await {
                tracing::warn!(build_id = %build_id, %error, "could not delete an artifact; the next tick retries");
                deleted_all = false;
            }
        }
        if deleted_all {
            queue::forget_artifacts(&ctx.pool, &build_id).await?;
            tracing::info!(build_id = %build_id, "artifacts past retention deleted");
            handled += 1;
        }
    }
    let row_cutoff = now - Duration::days(ctx.jobs.retention_days as i64);
    let old = queue::prunable_builds(&ctx.pool, row_cutoff, BATCH).await?;
    let deleted = queue::delete_history(&ctx.pool, &old, row_cutoff, BATCH).await?;
    handled += deleted.len() as u64;
    for build_id in &deleted {
        tracing::info!(build_id = %build_id, "build past retention deleted with its logs and attempts");
    }
    // Events are many and small: up to EVENT_BATCHES batches per tick (not counted as rows handled).
    let event_cutoff = now - Duration::hours(ctx.jobs.event_retention_hours as i64);
    let mut events = 0;
    for _ in 0..EVENT_BATCHES {
        let deleted = queue::prune_events(&ctx.pool, event_cutoff, EVENT_BATCH).await?;
        events += deleted;
        if deleted < EVENT_BATCH as u64 {
            break;
        }
    }
    if events > 0 {
        tracing::info!(events, "events past retention deleted");
    }
    // The audit log's only deletion (identity.md): rows past CONTROLLER_AUDIT_RETENTION_DAYS.
    let audit_cutoff = now - Duration::days(ctx.jobs.audit_retention_days.min(100_000) as i64);
    let audited = crate::audit::prune(&ctx.pool, audit_cutoff, EVENT_BATCH).await?;
    if audited > 0 {
        tracing::info!(audited, "audit rows past retention deleted");
    }
    // Finished webhook deliveries (with their attempts) are kept as long as finished builds.
    let deliveries = crate::webhooks::prune(&ctx.pool, row_cutoff, EVENT_BATCH).await?;
    if deliveries > 0 {
        tracing::info!(deliveries, "webhook deliveries past retention deleted");
    }
    let keys = queue::idempotency::prune(&ctx.pool, EVENT_BATCH).await?;
    if keys > 0 {
        tracing::info!(keys, "idempotency keys past their window deleted");
    }
    Ok(handled)
}
