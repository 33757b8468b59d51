//! Maintenance jobs (queue.md): each is scheduled in-process with apalis-cron and runs **once per tick
//! across all instances** — the runner claims a unique `(job, tick)` row first and runs only if it won.
//! Each job does one bounded, idempotent batch; see `runner` for what surrounds every tick.

mod offline;
mod prune;
mod purge_certs;
mod runner;
mod storage_deletions;
mod sweep_staging;
mod sweep_unlinked;

use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

pub use runner::{Instance, run};
pub use storage_deletions::delete_objects;
pub use sweep_unlinked::discard_unlinked;

use crate::config::{JobsConfig, QueueConfig};
use crate::queue::{self, QueueResult};
use crate::storage::Storage;

/// Rows handled per tick at most.
pub const BATCH: i64 = 500;

/// What the jobs work on.
#[derive(Clone)]
pub struct JobContext {
    pub pool: PgPool,
    pub storage: Storage,
    pub settings: QueueConfig,
    pub jobs: JobsConfig,
}

/// The maintenance jobs of queue.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    RescueExpiredLeases,
    DeadlineSweep,
    OfflineWorkers,
    PromoteScheduled,
    PurgeCerts,
    Prune,
    SweepStaging,
    StorageDeletions,
    SweepUnlinked,
    Reconcile,
}

impl Job {
    pub const ALL: [Job; 10] = [
        Job::RescueExpiredLeases,
        Job::DeadlineSweep,
        Job::OfflineWorkers,
        Job::PromoteScheduled,
        Job::PurgeCerts,
        Job::Prune,
        Job::SweepStaging,
        Job::StorageDeletions,
        Job::SweepUnlinked,
        Job::Reconcile,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Job::RescueExpiredLeases => "rescue_expired_leases",
            Job::DeadlineSweep => "deadline_sweep",
            Job::OfflineWorkers => "offline_workers",
            Job::PromoteScheduled => "promote_scheduled",
            Job::PurgeCerts => "purge_certs",
            Job::Prune => "prune",
            Job::SweepStaging => "sweep_staging",
            Job::StorageDeletions => "storage_deletions",
            Job::SweepUnlinked => "sweep_unlinked",
            Job::Reconcile => "reconcile",
        }
    }

    /// Default schedule: six-field cron, seconds first.
    pub fn default_schedule(self) -> &'static str {
        match self {
            Job::RescueExpiredLeases => "*/15 * * * * *",
            Job::DeadlineSweep => "0 * * * * *",
            Job::OfflineWorkers => "*/30 * * * * *",
            Job::PromoteScheduled => "*/5 * * * * *",
            Job::PurgeCerts => "30 * * * * *",
            Job::Prune => "0 0 * * * *",
            Job::SweepStaging => "0 */10 * * * *",
            Job::StorageDeletions => "45 * * * * *",
            Job::SweepUnlinked => "15 * * * * *",
            Job::Reconcile => "50 * * * * *",
        }
    }

    /// Jobs that run on every instance at each tick instead of once overall: local storage is per
    /// instance, so each instance sweeps its own staging.
    pub fn per_instance(self) -> bool {
        matches!(self, Job::SweepStaging)
    }

    /// Runs one batch at `now`; returns the number of rows handled.
    pub async fn run_once(self, ctx: &JobContext, now: DateTime<Utc>) -> QueueResult<u64> {
        let (pool, settings) = (&ctx.pool, &ctx.settings);
        match self {
            Job::RescueExpiredLeases => queue::rescue_expired(pool, settings, now, BATCH).await,
            Job::DeadlineSweep => queue::fail_past_deadline(pool, settings, now, BATCH).await,
            Job::OfflineWorkers => offline::run_once(ctx, now).await,
            Job::PromoteScheduled => queue::promote_due(pool, now, BATCH).await,
            Job::PurgeCerts => purge_certs::run_once(ctx).await,
            Job::Prune => prune::run_once(ctx, now).await,
            Job::SweepStaging => sweep_staging::run_once(ctx, now).await,
            Job::StorageDeletions => storage_deletions::run_once(ctx).await,
            Job::SweepUnlinked => sweep_unlinked::run_once(ctx, now).await,
            Job::Reconcile => queue::reconcile(pool, settings, now, BATCH)
                .await
                .map(|found| found.iter().map(|(_, n)| n).sum()),
        }
    }
}

/// Every job's schedule: its default unless `overrides` (`job=cron;job=cron`) names it.
pub fn schedules(overrides: &str) -> Result<Vec<(Job, cron::Schedule)>, String> {
    let mut chosen: Vec<(Job, String)> = Job::ALL
        .iter()
        .map(|j| (*j, j.default_schedule().to_string()))
        .collect();
    for entry in overrides.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, expression) = entry
            .split_once('=')
            .ok_or_else(|| format!("CONTROLLER_JOB_SCHEDULES: `{entry}` is not `job=cron`"))?;
        let slot = chosen
            .iter_mut()
            .find(|(job, _)| job.name() == name.trim())
            .ok_or_else(|| format!("CONTROLLER_JOB_SCHEDULES: unknown job `{}`", name.trim()))?;
        slot.1 = expression.trim().to_string();
    }
    chosen
        .into_iter()
        .map(|(job, expression)| {
            cron::Schedule::from_str(&expression)
                .map(|s| (job, s))
                .map_err(|e| format!("CONTROLLER_JOB_SCHEDULES: `{expression}` for {}: {e}", job.name()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_overrides_apply() {
        let all = schedules("").unwrap();
        assert_eq!(all.len(), Job::ALL.len());
        let tuned = schedules("prune = 0 0 3 * * *; promote_scheduled=* * * * * *").unwrap();
        let prune = tuned.iter().find(|(j, _)| *j == Job::Prune).unwrap();
        assert_eq!(prune.1.to_string(), "0 0 3 * * *");
        assert!(schedules("nope=* * * * * *").unwrap_err().contains("unknown job"));
        assert!(schedules("prune=every day").is_err());
        assert!(schedules("prune").is_err());
    }
}
