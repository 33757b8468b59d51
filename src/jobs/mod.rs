//! Maintenance jobs that keep the queue moving: each tick runs one bounded sweep of `crate::queue`.
//!
//! The runner here ticks each job on its interval in this process; sweeps are safe to run from
//! several instances at once (rows are locked with `SKIP LOCKED`, so each is handled once).

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::queue::{self, Settings};

/// Rows handled per sweep tick at most.
pub const BATCH: i64 = 500;

/// One maintenance job: its name, interval, and one bounded run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    RescueExpiredLeases,
    DeadlineSweep,
    PromoteScheduled,
}

impl Job {
    pub const ALL: [Job; 3] = [Job::RescueExpiredLeases, Job::DeadlineSweep, Job::PromoteScheduled];

    pub fn name(self) -> &'static str {
        match self {
            Job::RescueExpiredLeases => "rescue_expired_leases",
            Job::DeadlineSweep => "deadline_sweep",
            Job::PromoteScheduled => "promote_scheduled",
        }
    }

    pub fn interval(self) -> Duration {
        match self {
            Job::RescueExpiredLeases => Duration::from_secs(15),
            Job::DeadlineSweep => Duration::from_secs(60),
            Job::PromoteScheduled => Duration::from_secs(5),
        }
    }

    /// Runs one batch at `now`; returns the number of builds moved.
    pub async fn run_once(
        self,
        pool: &PgPool,
        settings: &Settings,
        now: chrono::DateTime<Utc>,
    ) -> queue::QueueResult<u64> {
        match self {
            Job::RescueExpiredLeases => queue::rescue_expired(pool, settings, now, BATCH).await,
            Job::DeadlineSweep => queue::fail_past_deadline(pool, settings, now, BATCH).await,
            Job::PromoteScheduled => queue::promote_due(pool, now, BATCH).await,
        }
    }
}

/// Ticks every job until `shutdown` flips; errors (e.g. the database is down) are logged and retried
/// at the next tick, so the jobs survive outages.
pub async fn run(pool: PgPool, settings: Settings, mut shutdown: watch::Receiver<bool>) {
    let mut tasks = Vec::new();
    for job in Job::ALL {
        let pool = pool.clone();
        let settings = settings.clone();
        let mut stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(job.interval());
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop.changed() => break,
                }
                match job.run_once(&pool, &settings, Utc::now()).await {
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
