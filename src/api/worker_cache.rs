//! A short-lived in-process cache of worker lookups, so that a poll authenticates without a database
//! round trip. Entries live [`TTL`] from their lookup; this instance clears the cache whenever a worker
//! is registered, re-registered, unregistered or changed by an operator, and other instances see such
//! changes within the TTL.
//!
//! A claim and the end of the claimed attempt on this instance do not drop the worker: they write what
//! they changed into its cached copies (busy with that build; idle again once that same build completed),
//! so the worker's next poll still needs no look-up. A copy only goes back to idle for the build it
//! was marked busy with, so a late completion cannot hide a newer claim.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::queue::Worker;

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

#[derive(Debug, Default)]
pub struct WorkerCache {
    entries: Mutex<HashMap<Key, Entry>>,
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

    /// Records a claim (or re-delivery) of `build_id` in the cached copies: the worker is busy with it;
    /// a new claim (`seen`: its time) also wrote the worker's `last_seen_at`.
    pub fn claimed(&self, worker_id: &str, build_id: &str, seen: Option<DateTime<Utc>>) {
        self.update(worker_id, |entry| {
            entry.worker.status = "busy".into();
            if let Some(at) = seen {
                entry.worker.last_seen_at = at;
            }
            entry.holding = Some(build_id.to_string());
        });
    }

    /// Records that the worker completed its attempt on `build_id`: the completion turned the busy
    /// worker idle. Copies marked busy for another build (or looked up
    /// meanwhile) are left as they are.
    pub fn finished(&self, worker_id: &str, build_id: &str) {
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
    }

    /// Drops everything (a worker's credentials or state changed).
    pub fn clear(&self) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.clear();
        }
    }
}
