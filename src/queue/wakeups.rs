//! Long-poll wake-ups. Each instance LISTENs once on [`NOTIFY_CHANNEL`]; every notification names one
//! claimable build (`<queue>:<id>`) and wakes **one** waiting poller of that queue (no thundering herd).
//! A waiter registers before it checks the queue, so a build committed in between is never missed; a
//! re-check every second (and after every reconnect) covers notifications lost while disconnected.
//! Waiting requests hold no database connection.
//!
//! The same notifications keep an **emptiness hint** per queue: a claim that found nothing records the
//! queue's notification generation; until a notification for that queue arrives (or [`EMPTY_HINT_TTL`]
//! passes, bounding any staleness, e.g. a `run_at` coming due before promotion), empty polls for it are
//! answered without touching the database.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::future::select_all;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{Notify, watch};

use super::{NOTIFY_CHANNEL, Platform};
use crate::events::{EVENTS_CHANNEL, Events};
use crate::webhooks::deliver::CHANNEL as WEBHOOKS_CHANNEL;

/// Notification payload suffix meaning "every build of this queue" (`ios:*`).
pub const ALL_BUILDS: &str = "*";

/// How often waiting queues are re-checked for work whose notification was lost.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long a queue found empty is trusted to stay empty without a notification.
pub const EMPTY_HINT_TTL: Duration = Duration::from_secs(1);

/// Per-queue wake-ups for the long polls of this instance, and the emptiness hints.
#[derive(Debug, Default)]
pub struct Wakeups {
    queues: [Arc<Notify>; 2],
    waiting: [AtomicUsize; 2],
    /// Bumped by every notification for the queue.
    generation: [AtomicU64; 2],
    /// (generation, when) at which a claim last found the queue empty.
    empty: Mutex<[Option<(u64, Instant)>; 2]>,
}

/// Notification generations of some queues, taken before a claim looks at them.
#[derive(Debug, Clone)]
pub struct Generations(Vec<(Platform, u64)>);

fn slot(platform: Platform) -> usize {
    match platform {
        Platform::Ios => 0,
        Platform::Android => 1,
    }
}

impl Wakeups {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Wakes one poller waiting for `platform` (or the next one to wait); the queue is no longer known empty.
    pub fn wake(&self, platform: Platform) {
        self.generation[slot(platform)].fetch_add(1, Ordering::AcqRel);
        self.queues[slot(platform)].notify_one();
    }

    /// Wakes every poller waiting for `platform` (and the next one to wait): many builds may have become
    /// claimable at once, e.g. when a paused queue is resumed.
    pub fn wake_all(&self, platform: Platform) {
        self.generation[slot(platform)].fetch_add(1, Ordering::AcqRel);
        self.queues[slot(platform)].notify_waiters();
        self.queues[slot(platform)].notify_one();
    }

    /// Forgets the emptiness hint of `platform` without waking anyone: this instance just made work
    /// claimable there, and its next poll must look even before the notification arrives.
    pub fn invalidate(&self, platform: Platform) {
        self.generation[slot(platform)].fetch_add(1, Ordering::AcqRel);
    }

    /// Forgets every emptiness hint (after a reconnect, when notifications may have been lost).
    pub fn forget_hints(&self) {
        for platform in Platform::ALL {
            self.generation[slot(platform)].fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The current generations of `platforms`; take them before claiming.
    pub fn generations(&self, platforms: &[Platform]) -> Generations {
        Generations(
            platforms
                .iter()
                .map(|p| (*p, self.generation[slot(*p)].load(Ordering::Acquire)))
                .collect(),
        )
    }

    /// Records that a claim which started at `seen` found every queue in it empty.
    pub fn mark_empty(&self, seen: &Generations) {
        let now = Instant::now();
        if let Ok(mut empty) = self.empty.lock() {
            for (platform, generation) in &seen.0 {
                empty[slot(*platform)] = Some((*generation, now));
            }
        }
    }

    /// Whether all `platforms` are known to have nothing claimable right now.
    pub fn known_empty(&self, platforms: &[Platform]) -> bool {
        let Ok(empty) = self.empty.lock() else { return false };
        !platforms.is_empty() && platforms.iter().all(|p| {
            let current = self.generation[slot(*p)].load(Ordering::Acquire);
            matches!(empty[slot(*p)], Some((generation, at)) if generation == current && at.elapsed() < EMPTY_HINT_TTL)
        })
    }

    /// Pollers currently waiting for `platform`.
    pub fn waiting(&self, platform: Platform) -> usize {
        self.waiting[slot(platform)].load(Ordering::Relaxed)
    }

    /// Registers interest in `platforms`; call before checking the queue, then [`Subscription::wait`].
    pub fn subscribe(self: &Arc<Self>, platforms: &[Platform]) -> Subscription {
        let mut notified = Vec::with_capacity(platforms.len());
        for platform in platforms {
            let mut future = Box::pin(self.queues[slot(*platform)].clone().notified_owned());
            future.as_mut().enable();
            self.waiting[slot(*platform)].fetch_add(1, Ordering::Relaxed);
            notified.push(future);
        }
        Subscription {
            wakeups: self.clone(),
            platforms: platforms.to_vec(),
            notified,
        }
    }

    /// Dispatches one notification payload: `<queue>:<build id>` wakes one poller, `<queue>:*` (a
    /// resumed queue) wakes them all.
    pub fn dispatch(&self, payload: &str) {
        let (queue, build) = payload.split_once(':').unwrap_or((payload, ""));
        match Platform::parse(queue) {
            Some(platform) if build == ALL_BUILDS => self.wake_all(platform),
            Some(platform) => self.wake(platform),
            None => {}
        }
    }
}

/// Interest in one or more queues; wakes when one of them gets work.
pub struct Subscription {
    wakeups: Arc<Wakeups>,
    platforms: Vec<Platform>,
    notified: Vec<Pin<Box<OwnedNotified>>>,
}

impl Subscription {
    /// Resolves when one of the subscribed queues was woken.
    pub fn wait(&mut self) -> impl Future<Output = ()> + '_ {
        let futures: Vec<_> = self.notified.iter_mut().map(|f| f.as_mut()).collect();
        async move {
            if futures.is_empty() {
                std::future::pending::<()>().await;
            }
            select_all(futures).await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        for platform in &self.platforms {
            self.wakeups.waiting[slot(*platform)].fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Wakes a waiter on every queue that has waiters and claimable work.
async fn recheck(pool: &PgPool, wakeups: &Wakeups) {
    for platform in Platform::ALL {
        if wakeups.waiting(platform) == 0 {
            continue;
        }
        let has_work: Result<bool, sqlx::Error> = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM builds WHERE state IN ('pending', 'scheduled', 'retryable')
                AND run_at <= $1 AND queue = $2 AND queue NOT IN (SELECT name FROM queues WHERE paused))",
        )
        .bind(Utc::now())
        .bind(platform.as_str())
        .fetch_one(pool)
        .await;
        if matches!(has_work, Ok(true)) {
            wakeups.wake(platform);
        }
    }
}

/// The LISTEN loop of one instance (build wake-ups, and wake-ups of the event pump): runs until `shutdown` flips,
/// reconnecting after database outages.
pub async fn listen(pool: PgPool, wakeups: Arc<Wakeups>, events: Arc<Events>, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(RECHECK_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut listener = match connect(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "LISTEN connection failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(RECHECK_INTERVAL) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        wakeups.forget_hints();
        events.wake();
        recheck(&pool, &wakeups).await;
        loop {
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(notification)) if notification.channel() == EVENTS_CHANNEL => events.wake(),
                    Ok(Some(notification)) if notification.channel() == WEBHOOKS_CHANNEL => events.webhooks.wake(),
                    Ok(Some(notification)) => wakeups.dispatch(notification.payload()),
                    // The connection dropped; notifications may have been lost meanwhile.
                    Ok(None) => {
                        events.wake();
                        wakeups.forget_hints();
                        recheck(&pool, &wakeups).await;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "LISTEN connection lost; reconnecting");
                        break;
                    }
                },
                _ = ticker.tick() => recheck(&pool, &wakeups).await,
                _ = shutdown.changed() => return,
            }
        }
    }
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([NOTIFY_CHANNEL, EVENTS_CHANNEL, WEBHOOKS_CHANNEL])
        .await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[test]
    fn a_build_wakes_one_poller_a_resumed_queue_wakes_all() {
        let wakeups = Wakeups::new();
        let mut first = wakeups.subscribe(&[Platform::Ios]);
        let mut second = wakeups.subscribe(&[Platform::Ios]);
        let mut other = wakeups.subscribe(&[Platform::Android]);

        wakeups.dispatch("ios:someBuildId");
        let woken = [
            first.wait().now_or_never().is_some(),
            second.wait().now_or_never().is_some(),
        ];
        assert_eq!(
            woken.iter().filter(|w| **w).count(),
            1,
            "one build wakes one poller: {woken:?}"
        );

        let mut first = wakeups.subscribe(&[Platform::Ios]);
        let mut second = wakeups.subscribe(&[Platform::Ios]);
        wakeups.dispatch(&format!("ios:{ALL_BUILDS}"));
        assert!(first.wait().now_or_never().is_some(), "resume wakes every poller");
        assert!(second.wait().now_or_never().is_some(), "resume wakes every poller");
        assert!(other.wait().now_or_never().is_none(), "another queue stays asleep");
    }

    #[test]
    fn local_changes_forget_the_emptiness_hint() {
        let wakeups = Wakeups::new();
        let seen = wakeups.generations(&[Platform::Ios]);
        wakeups.mark_empty(&seen);
        assert!(wakeups.known_empty(&[Platform::Ios]));
        wakeups.invalidate(Platform::Ios);
        assert!(!wakeups.known_empty(&[Platform::Ios]), "invalidate forgets the hint");
        wakeups.mark_empty(&wakeups.generations(&[Platform::Ios]));
        wakeups.wake_all(Platform::Ios);
        assert!(!wakeups.known_empty(&[Platform::Ios]), "wake_all forgets the hint");
    }
}
