//! What surrounds every tick, written once: the apalis-cron worker per job, the once-per-tick claim,
//! the tracing span, retries of transient database errors, and the logging.

use std::sync::Arc;
use std::time::Duration;

use apalis_core::error::BoxDynError;
use apalis_core::task::data::Data;
use apalis_core::worker::builder::WorkerBuilder;
use apalis_cron::{CronScheduler, Tick};
use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tracing::Instrument;

use super::{Job, JobContext, schedules};
use crate::queue;

/// This instance's name in `cron_ticks.ran_by`.
#[derive(Debug, Clone)]
pub struct Instance(pub String);

impl Instance {
    pub fn new() -> Self {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        Self(format!(
            "{}-{}-{}",
            host.trim(),
            std::process::id(),
            &crate::ids::new_id()[..6]
        ))
    }
}

impl Default for Instance {
    fn default() -> Self {
        Self::new()
    }
}

/// One job's tick handler state.
#[derive(Clone)]
struct TickRunner {
    job: Job,
    ctx: JobContext,
    instance: Arc<Instance>,
}

/// Attempts per tick when the database errors transiently.
const ATTEMPTS: u32 = 3;

impl TickRunner {
    /// Claims the tick, then runs the job; retries transient failures; never fails the worker.
    async fn tick(&self, tick: DateTime<Utc>) {
        let span = tracing::info_span!("job", job = %self.job.name(), tick = %tick.to_rfc3339());
        async {
            for attempt in 1..=ATTEMPTS {
                match self.claim_and_run(tick).await {
                    // Per-instance jobs claim nothing, so they say so differently from claimed ticks.
                    Ok(Some(handled)) if self.job.per_instance() => {
                        tracing::debug!(instance = %self.instance.0, handled, "per-instance tick ran");
                        return;
                    }
                    Ok(None) => {
                        tracing::debug!(instance = %self.instance.0, "tick ran on another instance");
                        return;
                    }
                    Ok(Some(handled)) => {
                        crate::metrics::job_ran(self.job.name(), false);
                        if handled == 0 {
                            tracing::debug!(instance = %self.instance.0, handled, "tick ran");
                        } else {
                            tracing::info!(instance = %self.instance.0, handled, "tick ran");
                        }
                        return;
                    }
                    Err(error) if attempt < ATTEMPTS => {
                        tracing::warn!(%error, attempt, "tick failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    }
                    Err(error) => {
                        crate::metrics::job_ran(self.job.name(), true);
                        tracing::error!(%error, "tick failed; the next tick will try again");
                    }
                }
            }
        }
        .instrument(span)
        .await;
    }

    async fn claim_and_run(&self, tick: DateTime<Utc>) -> queue::QueueResult<Option<u64>> {
        if !self.job.per_instance()
            && !queue::claim_tick(&self.ctx.pool, self.job.name(), tick, &self.instance.0).await?
        {
            return Ok(None);
        }
        Ok(Some(self.job.run_once(&self.ctx, Utc::now()).await?))
    }
}

async fn on_tick(tick: Tick, runner: Data<TickRunner>) -> Result<(), BoxDynError> {
    let at = DateTime::from_timestamp(tick.get_timestamp() as i64, 0).unwrap_or_else(Utc::now);
    runner.tick(at).await;
    Ok(())
}

/// Runs every job on its schedule until `shutdown` flips.
pub async fn run(ctx: JobContext, shutdown: watch::Receiver<bool>) {
    let schedules = match schedules(&ctx.jobs.job_schedules) {
        Ok(schedules) => schedules,
        Err(problem) => {
            tracing::error!(%problem, "maintenance jobs not started");
            return;
        }
    };
    let instance = Arc::new(Instance::new());
    let mut workers = tokio::task::JoinSet::new();
    for (job, schedule) in schedules {
        let runner = TickRunner {
            job,
            ctx: ctx.clone(),
            instance: instance.clone(),
        };
        let mut stop = shutdown.clone();
        let worker = WorkerBuilder::new(job.name())
            .backend(CronScheduler::new(schedule))
            .data(runner)
            .build(on_tick);
        workers.spawn(async move {
            let signal = async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
                Ok::<(), std::io::Error>(())
            };
            if let Err(error) = worker.run_until(signal).await {
                tracing::error!(job = job.name(), %error, "job scheduler ended");
            }
        });
    }
    while workers.join_next().await.is_some() {}
}
