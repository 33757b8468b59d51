//! Long-poll wake-ups. Each instance LISTENs once on [`NOTIFY_CHANNEL`]; every notification names one
//! claimable build (`<queue>:<id>`) and wakes **one** waiting poller of that queue (no thundering herd).
//! A waiter registers before it checks the queue, so a build committed in between is never missed; a
//! re-check every second (and after every reconnect) covers notifications lost while disconnected.
//! Waiting requests hold no database connection.
//!
//! The same notifications keep an **emptiness hint** per queue. A claim that found nothing for anyone
//! marks the queue empty as of the tick at which it started. From then on the hint accounts for every
//! build by id: a notification announces its build, a claim on this instance takes it off again, and a
//! local change (a submit or an operator action on this instance) counts as pending until its
//! notification comes back. The queue is known empty while nothing announced or local is outstanding
//! and nothing happened that the hint cannot account for (a wake-up without a build id, a resumed
//! queue, a reconnect); then polls for it — short ones, and long ones before they park — are answered
//! without touching the database, so a worker that finishes a build does not run an empty claim before
//! it waits. [`EMPTY_HINT_TTL`] bounds any staleness the notifications cannot show (a `run_at` coming
//! due before promotion, a submitter dropping below its max running); waiting polls are covered by the
//! re-check meanwhile. A build is never lost to the hint: it only decides whether a poll looks before
//! waiting, and every notification still wakes one subscribed poller (subscribed before it looked).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Builds (announced, or claimed before their notification came) and local changes tracked per queue
/// at most; past it the hint gives up until the next empty claim.
const TRACKED: usize = 10_000;

/// How long a build claimed here before its notification arrived waits for that notification. A
/// notification comes milliseconds after its commit; an older entry is stale (the build was claimed
/// before a notification it never got, e.g. promoted from `scheduled`), and a later notification of
/// the same id (a requeue) announces it again rather than being taken for the old one.
const CLAIMED_EARLY_WINDOW: Duration = Duration::from_secs(1);

/// Per-queue wake-ups for the long polls of this instance, and the emptiness hints.
#[derive(Debug, Default)]
pub struct Wakeups {
    queues: [Arc<Notify>; 2],
    waiting: [AtomicUsize; 2],
    hints: Mutex<[Hint; 2]>,
}

/// What this instance knows about whether one queue has claimable work.
#[derive(Debug, Default)]
struct Hint {
    /// Bumped by every notification and every local change of the queue.
    tick: u64,
    /// (tick at which it started, when it ended) of the last claim that found the queue empty for everyone.
    empty: Option<(u64, Instant)>,
    /// Tick of the last change the hint cannot account for build by build.
    dirty: u64,
    /// Builds notified since and not claimed on this instance, with the tick of their notification.
    announced: HashMap<String, u64>,
    /// Builds claimed on this instance before their notification arrived, with when.
    claimed_early: HashMap<String, Instant>,
    /// Ticks of local changes whose notification has not come back yet.
    local: VecDeque<u64>,
}

impl Hint {
    fn bump(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// A change the hint cannot account for: nothing is known empty until a claim that starts later.
    fn dirty(&mut self) {
        self.dirty = self.bump();
    }

    fn announce(&mut self, build_id: &str) {
        let tick = self.bump();
        self.local.pop_front();
        let covered = self
            .claimed_early
            .remove(build_id)
            .is_some_and(|at| at.elapsed() < CLAIMED_EARLY_WINDOW);
        if !covered {
            if self.announced.len() >= TRACKED {
                self.announced.clear();
                self.dirty();
            }
            self.announced.insert(build_id.to_string(), tick);
        }
    }

    fn claimed(&mut self, build_id: &str) {
        if self.announced.remove(build_id).is_none() {
            if self.claimed_early.len() >= TRACKED {
                self.claimed_early.retain(|_, at| at.elapsed() < CLAIMED_EARLY_WINDOW);
                if self.claimed_early.len() >= TRACKED {
                    self.claimed_early.clear();
                }
            }
            self.claimed_early.insert(build_id.to_string(), Instant::now());
        }
    }

    fn local_change(&mut self) {
        let tick = self.bump();
        if self.local.len() >= TRACKED {
            self.local.clear();
            self.dirty();
        }
        self.local.push_back(tick);
    }

    /// A claim that started at `started` found nothing for anyone: what was announced or changed locally
    /// before it started was in its snapshot, so it is claimed, gone or held by a claim in flight.
    fn mark_empty(&mut self, started: u64, now: Instant) {
        if self.empty.is_none_or(|(tick, _)| tick <= started) {
            self.empty = Some((started, now));
        }
        self.announced.retain(|_, tick| *tick > started);
        self.local.retain(|tick| *tick > started);
        self.claimed_early.retain(|_, at| at.elapsed() < CLAIMED_EARLY_WINDOW);
    }

    fn known_empty(&self) -> bool {
        matches!(self.empty, Some((started, at)) if started >= self.dirty && at.elapsed() < EMPTY_HINT_TTL)
            && self.announced.is_empty()
            && self.local.is_empty()
    }
}

/// Notification ticks of some queues, taken before a claim looks at them.
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

    fn hint<T>(&self, platform: Platform, change: impl FnOnce(&mut Hint) -> T) -> Option<T> {
        let mut hints = self.hints.lock().ok()?;
        Some(change(&mut hints[slot(platform)]))
    }

    /// Wakes one poller waiting for `platform` (or the next one to wait) without naming a build (the
    /// re-check found work): the queue is no longer known empty.
    pub fn wake(&self, platform: Platform) {
        self.hint(platform, Hint::dirty);
        self.queues[slot(platform)].notify_one();
    }

    /// Wakes one poller waiting for `platform` (or the next one to wait) for this build: the queue is
    /// not known empty until the build is claimed here or a claim finds the queue empty.
    pub fn announce(&self, platform: Platform, build_id: &str) {
        self.hint(platform, |hint| hint.announce(build_id));
        self.queues[slot(platform)].notify_one();
    }

    /// Wakes every poller waiting for `platform` (and the next one to wait): many builds may have become
    /// claimable at once, e.g. when a paused queue is resumed.
    pub fn wake_all(&self, platform: Platform) {
        self.hint(platform, Hint::dirty);
        self.queues[slot(platform)].notify_waiters();
        self.queues[slot(platform)].notify_one();
    }

    /// Forgets the emptiness hint of `platform` without waking anyone: this instance just made work
    /// claimable there, and its next poll must look even before the notification arrives.
    pub fn invalidate(&self, platform: Platform) {
        self.hint(platform, Hint::local_change);
    }

    /// Forgets every emptiness hint (after a reconnect, when notifications may have been lost).
    pub fn forget_hints(&self) {
        for platform in Platform::ALL {
            self.hint(platform, Hint::dirty);
        }
    }

    /// The current ticks of `platforms`; take them before claiming.
    pub fn generations(&self, platforms: &[Platform]) -> Generations {
        Generations(
            platforms
                .iter()
                .map(|p| (*p, self.hint(*p, |hint| hint.tick).unwrap_or(0)))
                .collect(),
        )
    }

    /// Records that a claim which started at `seen` found every queue in it empty.
    pub fn mark_empty(&self, seen: &Generations) {
        let now = Instant::now();
        for (platform, started) in &seen.0 {
            self.hint(*platform, |hint| hint.mark_empty(*started, now));
        }
    }

    /// Records that this instance claimed a build (a new attempt, not a re-delivery) of `platform`.
    pub fn claimed(&self, platform: Platform, build_id: &str) {
        self.hint(platform, |hint| hint.claimed(build_id));
    }

    /// Whether all `platforms` are known to have nothing claimable right now.
    pub fn known_empty(&self, platforms: &[Platform]) -> bool {
        !platforms.is_empty()
            && platforms
                .iter()
                .all(|p| self.hint(*p, |hint| hint.known_empty()).unwrap_or(false))
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
            Some(platform) if build.is_empty() => self.wake(platform),
            Some(platform) => self.announce(platform, build),
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
        events.webhooks.wake();
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
                        events.webhooks.wake();
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

    #[test]
    fn a_stale_early_claim_does_not_swallow_a_later_announcement() {
        let wakeups = Wakeups::new();
        // Claimed here without a notification of its own (e.g. promoted from scheduled) …
        wakeups.claimed(Platform::Ios, "x");
        std::thread::sleep(CLAIMED_EARLY_WINDOW + Duration::from_millis(50));
        wakeups.mark_empty(&wakeups.generations(&[Platform::Ios]));
        assert!(wakeups.known_empty(&[Platform::Ios]));
        // … then requeued: its notification announces it again.
        wakeups.dispatch("ios:x");
        assert!(!wakeups.known_empty(&[Platform::Ios]), "the requeued build is pending");
    }

    #[test]
    fn a_build_claimed_here_keeps_the_queue_known_empty() {
        let wakeups = Wakeups::new();
        wakeups.mark_empty(&wakeups.generations(&[Platform::Ios]));
        assert!(wakeups.known_empty(&[Platform::Ios]));
        // A local submit, then its notification: pending until claimed.
        wakeups.invalidate(Platform::Ios);
        assert!(!wakeups.known_empty(&[Platform::Ios]), "a local submit is pending");
        wakeups.dispatch("ios:first");
        assert!(!wakeups.known_empty(&[Platform::Ios]), "an announced build is pending");
        wakeups.claimed(Platform::Ios, "first");
        assert!(wakeups.known_empty(&[Platform::Ios]), "claimed here: empty again");
        // Claimed before its notification arrived: the late notification announces nothing.
        wakeups.claimed(Platform::Ios, "second");
        wakeups.dispatch("ios:second");
        assert!(wakeups.known_empty(&[Platform::Ios]));
        // Two builds, one claim: not empty.
        wakeups.dispatch("ios:third");
        wakeups.dispatch("ios:fourth");
        wakeups.claimed(Platform::Ios, "third");
        assert!(!wakeups.known_empty(&[Platform::Ios]), "one build still announced");
        assert!(!wakeups.known_empty(&[Platform::Android]), "never marked");
        // A claim that started after the announcement and found nothing: it was taken elsewhere.
        wakeups.mark_empty(&wakeups.generations(&[Platform::Ios]));
        assert!(wakeups.known_empty(&[Platform::Ios]));
        // A claim that started before an announcement does not clear it.
        let before = wakeups.generations(&[Platform::Ios]);
        wakeups.dispatch("ios:fifth");
        wakeups.mark_empty(&before);
        assert!(
            !wakeups.known_empty(&[Platform::Ios]),
            "announced after the claim started"
        );
        // A wake-up without a build id (the re-check found work) is not accounted for.
        wakeups.claimed(Platform::Ios, "fifth");
        assert!(wakeups.known_empty(&[Platform::Ios]));
        let before = wakeups.generations(&[Platform::Ios]);
        wakeups.wake(Platform::Ios);
        wakeups.mark_empty(&before);
        assert!(!wakeups.known_empty(&[Platform::Ios]), "dirty until a later claim");
        wakeups.mark_empty(&wakeups.generations(&[Platform::Ios]));
        assert!(wakeups.known_empty(&[Platform::Ios]));
    }
}
