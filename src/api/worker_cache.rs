//! A short-lived in-process cache of worker lookups, so that a poll authenticates without a database
//! round trip. Entries live [`TTL`] from their lookup; this instance clears the cache whenever a worker
//! is registered, re-registered, unregistered or changed by an operator, and other instances see such
//! changes within the TTL.
//!
//! A claim and the end of the claimed attempt on this instance do not drop the worker: they write what
//! they changed into its cached copies (busy with that build; idle again once that same build completed),
//! so the worker's next poll still needs no look-up. A copy only goes back to idle for the build it
//! was marked busy with, so a late completion cannot hide a newer claim.
//!
//! A claim on this instance also keeps the claimed row ([`WorkerCache::handed`]) for [`TTL`]: the
//! holder's downloads right after its claim (source, certs) are checked against it instead of reading
//! the row again. It is dropped when the attempt ends here (completion, failure, abandon), when an
//! operator or submitter changes the build here, and with the worker's other copies; a change made by
//! another instance drops it when the event stream delivers that change here ([`follow_events`], the
//! pump's latency), and at the latest after the TTL. A worker this instance did not hand the build to
//! (or not within the TTL) is checked against the database as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::queue::{Build, Worker};

/// How long a cached lookup is trusted.
pub const TTL: Duration = Duration::from_secs(2);
/// Entries kept at most; past it the cache starts over.
const CAPACITY: usize = 50_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    TokenHash(Vec<u8>),
    Id(String),
}

#[derive(Debug)]
struct Entry {
    at: Instant,
    worker: Worker,
    /// The build this instance saw the worker claim (its copy says busy because of it).
    holding: Option<String>,
}

/// A build this instance handed a worker: its row as the claim returned it.
#[derive(Debug)]
struct Handed {
    at: Instant,
    build: Arc<Build>,
}

#[derive(Debug, Default)]
pub struct WorkerCache {
    entries: Mutex<HashMap<Key, Entry>>,
    /// By worker id: the build this instance last handed it, until that attempt ends here.
    handed: Mutex<HashMap<String, Handed>>,
    /// By build id: when a change of the build last dropped its handed rows (kept for [`TTL`]), so that
    /// a claim whose answer is recorded after the change was delivered does not keep its older row.
    changed: Mutex<HashMap<String, Instant>>,
    /// When every handed row was last dropped because the event stream lost track ([`follow_events`]).
    forgot: Mutex<Option<Instant>>,
}

impl WorkerCache {
    fn get(&self, key: &Key) -> Option<Worker> {
        let entries = self.entries.lock().ok()?;
        entries
            .get(key)
            .filter(|entry| entry.at.elapsed() < TTL)
            .map(|entry| entry.worker.clone())
    }

    fn put(&self, key: Key, worker: &Worker) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= CAPACITY {
                entries.clear();
            }
            let entry = Entry {
                at: Instant::now(),
                worker: worker.clone(),
                holding: None,
            };
            entries.insert(key, entry);
        }
    }

    /// Applies `change` to every cached copy of one worker.
    fn update(&self, worker_id: &str, mut change: impl FnMut(&mut Entry)) {
        if let Ok(mut entries) = self.entries.lock() {
            entries
                .values_mut()
                .filter(|entry| entry.worker.id == worker_id)
                .for_each(&mut change);
        }
    }

    pub fn by_token(&self, token_hash: &[u8]) -> Option<Worker> {
        self.get(&Key::TokenHash(token_hash.to_vec()))
    }

    pub fn put_token(&self, token_hash: &[u8], worker: &Worker) {
        self.put(Key::TokenHash(token_hash.to_vec()), worker);
    }

    pub fn by_id(&self, id: &str) -> Option<Worker> {
        self.get(&Key::Id(id.to_string()))
    }

    pub fn put_id(&self, worker: &Worker) {
        self.put(Key::Id(worker.id.clone()), worker);
    }

    /// Records a liveness write in the cached copies, so the debounce sees it.
    pub fn seen(&self, worker_id: &str, at: DateTime<Utc>) {
        self.update(worker_id, |entry| {
            let w = &mut entry.worker;
            w.last_seen_at = at;
            if w.status == "offline" && !w.is_out() {
                w.status = "idle".into();
            }
        });
    }

    /// Records a claim (or re-delivery) of `build` in the cached copies: the worker is busy with it;
    /// a new claim (`seen`: its time) also wrote the worker's `last_seen_at`. The claimed row is kept
    /// as the build handed to the worker ([`Self::handed`]) unless a change of the build was recorded
    /// here since `asked` (taken before the claim statement ran): the row may predate that change.
    pub fn claimed(&self, worker_id: &str, build: &Build, seen: Option<DateTime<Utc>>, asked: Instant) {
        self.update(worker_id, |entry| {
            entry.worker.status = "busy".into();
            if let Some(at) = seen {
                entry.worker.last_seen_at = at;
            }
            entry.holding = Some(build.id.clone());
        });
        let forgot_since = self
            .forgot
            .lock()
            .map(|f| f.is_some_and(|at| at >= asked))
            .unwrap_or(true);
        let changed_since = forgot_since
            || self
                .changed
                .lock()
                .map(|changed| changed.get(&build.id).is_some_and(|at| *at >= asked))
                .unwrap_or(true);
        if changed_since {
            return;
        }
        if let Ok(mut handed) = self.handed.lock() {
            if handed.len() >= CAPACITY {
                handed.clear();
            }
            let entry = Handed {
                at: Instant::now(),
                build: Arc::new(build.clone()),
            };
            handed.insert(worker_id.to_string(), entry);
        }
    }

    /// Notes that `build_id` changed now (see [`Self::claimed`]).
    fn note_change(&self, build_id: &str) {
        if let Ok(mut changed) = self.changed.lock() {
            if changed.len() >= CAPACITY {
                changed.retain(|_, at| at.elapsed() < TTL);
            }
            if changed.len() >= CAPACITY {
                changed.clear();
            }
            changed.insert(build_id.to_string(), Instant::now());
        }
    }

    /// The row of `build_id` as this instance handed it to `worker_id` less than [`TTL`] ago, unless
    /// that attempt ended here or the build was changed here since.
    pub fn handed(&self, worker_id: &str, build_id: &str) -> Option<Arc<Build>> {
        let handed = self.handed.lock().ok()?;
        handed
            .get(worker_id)
            .filter(|h| h.build.id == build_id && h.at.elapsed() < TTL)
            .map(|h| h.build.clone())
    }

    /// Forgets that `build_id` was handed to anyone (its attempt ended, or the build changed).
    pub fn build_changed(&self, build_id: &str) {
        self.note_change(build_id);
        if let Ok(mut handed) = self.handed.lock() {
            handed.retain(|_, h| h.build.id != build_id);
        }
    }

    /// Forgets that `build_id` was handed to anyone but `worker_id` (a new attempt went to that worker).
    fn reassigned(&self, build_id: &str, worker_id: Option<&str>) {
        self.note_change(build_id);
        if let Ok(mut handed) = self.handed.lock() {
            handed.retain(|holder, h| h.build.id != build_id || Some(holder.as_str()) == worker_id);
        }
    }

    /// Forgets every handed row (the event stream lost track of changes).
    fn forget_handed(&self) {
        if let Ok(mut forgot) = self.forgot.lock() {
            *forgot = Some(Instant::now());
        }
        if let Ok(mut handed) = self.handed.lock() {
            handed.clear();
        }
    }

    /// Records that the worker completed its attempt on `build_id`: the completion turned the busy
    /// worker idle. Copies marked busy for another build (or looked up
    /// meanwhile) are left as they are.
    pub fn finished(&self, worker_id: &str, build_id: &str) {
        self.build_changed(build_id);
        self.update(worker_id, |entry| {
            if entry.holding.as_deref() == Some(build_id) {
                if entry.worker.status == "busy" {
                    entry.worker.status = "idle".into();
                }
                entry.holding = None;
            }
        });
    }

    /// Drops the cached copies of one worker (a change the cache cannot follow, e.g. a failure that may
    /// have quarantined it).
    pub fn forget(&self, worker_id: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|_, entry| entry.worker.id != worker_id);
        }
        if let Ok(mut handed) = self.handed.lock() {
            handed.remove(worker_id);
        }
    }

    /// Drops everything (a worker's credentials or state changed).
    pub fn clear(&self) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.clear();
        }
        if let Ok(mut handed) = self.handed.lock() {
            handed.clear();
        }
    }
}

/// Event kinds during an attempt that leave what its holder may download as it was.
const WITHIN_ATTEMPT: [&str; 3] = ["build.building", "build.progress", "build.log"];

/// Follows this instance's event stream and drops handed rows of builds changed anywhere (a cancel,
/// requeue, timeout, completion or delete made on another instance, or by the jobs): the former holder's
/// next download reads the row again as soon as the change is delivered here, not only after the TTL.
/// A new attempt (`build.assigned`) keeps only the row handed to the worker it went to.
pub async fn follow_events(
    cache: Arc<WorkerCache>,
    events: Arc<crate::events::Events>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut delivered = events.watch_delivered();
    let mut cursor = events.delivered();
    loop {
        loop {
            let batch = match events.after(cursor, 1024) {
                Ok(batch) => batch,
                Err(missed) => {
                    cache.forget_handed();
                    cursor = missed.resume_after;
                    continue;
                }
            };
            let Some(last) = batch.last() else { break };
            cursor = last.id;
            for event in &batch {
                let Some(build_id) = event.build_id.as_deref() else {
                    continue;
                };
                match event.kind.as_str() {
                    "build.assigned" => cache.reassigned(build_id, event.worker_id.as_deref()),
                    kind if WITHIN_ATTEMPT.contains(&kind) => {}
                    _ => cache.build_changed(build_id),
                }
            }
        }
        tokio::select! {
            changed = delivered.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(id: &str) -> Build {
        Build {
            id: id.into(),
            ..Build::default()
        }
    }

    #[test]
    fn a_claim_recorded_after_a_change_of_its_build_does_not_keep_its_row() {
        let cache = WorkerCache::default();
        let asked = Instant::now();
        // The change is delivered while the claim's answer is still on its way to `claimed`.
        cache.build_changed("b1");
        cache.claimed("w1", &build("b1"), None, asked);
        assert!(cache.handed("w1", "b1").is_none(), "the row predates the change");

        let asked = Instant::now();
        cache.claimed("w1", &build("b2"), None, asked);
        assert!(cache.handed("w1", "b2").is_some(), "no change since the claim: kept");
        cache.reassigned("b2", Some("w2"));
        assert!(
            cache.handed("w1", "b2").is_none(),
            "a new attempt went to another worker"
        );
    }

    #[test]
    fn a_claim_recorded_after_the_stream_lost_track_does_not_keep_its_row() {
        let cache = WorkerCache::default();
        let asked = Instant::now();
        cache.forget_handed();
        cache.claimed("w1", &build("b1"), None, asked);
        assert!(cache.handed("w1", "b1").is_none());
    }
}
