//! Maintenance jobs that keep the queue moving: each tick runs one bounded sweep of `crate::queue`.
//!
//! The runner here ticks each job on its interval in this process; sweeps are safe to run from
//! several instances at once (rows are locked with `SKIP LOCKED`, so each is handled once).

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::queue::{self, Settings};
use crate::storage::{Key, Storage};

/// What the jobs work on.
#[derive(Clone)]
pub struct JobContext {
    pub pool: PgPool,
    pub storage: Storage,
    pub settings: Settings,
}

/// Rows handled per sweep tick at most.
pub const BATCH: i64 = 500;

/// One maintenance job: its name, interval, and one bounded run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    RescueExpiredLeases,
    DeadlineSweep,
    PromoteScheduled,
    PurgeCerts,
}

impl Job {
    pub const ALL: [Job; 4] = [
        Job::RescueExpiredLeases,
        Job::DeadlineSweep,
        Job::PromoteScheduled,
        Job::PurgeCerts,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Job::RescueExpiredLeases => "rescue_expired_leases",
            Job::DeadlineSweep => "deadline_sweep",
            Job::PromoteScheduled => "promote_scheduled",
            Job::PurgeCerts => "purge_certs",
        }
    }

    pub fn interval(self) -> Duration {
        match self {
            Job::RescueExpiredLeases => Duration::from_secs(15),
            Job::DeadlineSweep => Duration::from_secs(60),
            Job::PromoteScheduled => Duration::from_secs(5),
            Job::PurgeCerts => Duration::from_secs(60),
        }
    }

    /// Runs one batch at `now`; returns the number of builds handled.
    pub async fn run_once(self, ctx: &JobContext, now: chrono::DateTime<Utc>) -> queue::QueueResult<u64> {
        let (pool, settings) = (&ctx.pool, &ctx.settings);
        match self {
            Job::RescueExpiredLeases => queue::rescue_expired(pool, settings, now, BATCH).await,
            Job::DeadlineSweep => queue::fail_past_deadline(pool, settings, now, BATCH).await,
            Job::PromoteScheduled => queue::promote_due(pool, now, BATCH).await,
            Job::PurgeCerts => purge_certs(ctx).await,
        }
    }
}

/// Deletes the certs bundles of builds in a final state (R36), then forgets them.
async fn purge_certs(ctx: &JobContext) -> queue::QueueResult<u64> {
    let mut purged = 0;
    for (build_id, stored) in queue::certs_to_purge(&ctx.pool, BATCH).await? {
        if let Some(key) = Key::parse(&stored)
            && let Err(error) = ctx.storage.delete(&key).await
        {
            tracing::warn!(build_id, %error, "could not delete certs; will retry");
            continue;
        }
        queue::clear_certs(&ctx.pool, &build_id).await?;
        purged += 1;
    }
    Ok(purged)
}

/// Ticks every job until `shutdown` flips; errors (e.g. the database is down) are logged and retried
/// at the next tick, so the jobs survive outages.
pub async fn run(ctx: JobContext, mut shutdown: watch::Receiver<bool>) {
    let mut tasks = Vec::new();
    for job in Job::ALL {
        let ctx = ctx.clone();
        let mut stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(job.interval());
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop.changed() => break,
                }
                match job.run_once(&ctx, Utc::now()).await {
                    Ok(0) => {}
                    Ok(moved) => tracing::info!(job = job.name(), moved, "maintenance tick"),
                    Err(error) => {
                        tracing::warn!(job = job.name(), %error, "maintenance tick failed; retrying next tick")
                    }
                }
            }
        }));
    }
    let _ = shutdown.changed().await;
    for task in tasks {
        let _ = task.await;
    }
}
