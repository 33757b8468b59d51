//! A short-lived in-process cache of worker lookups, so that a poll authenticates without a database
//! round trip. Entries live [`TTL`]; this instance clears the cache whenever a worker is registered,
//! re-registered, unregistered or changed by an operator, and other instances see such changes within
//! the TTL.

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

#[derive(Debug, Default)]
pub struct WorkerCache {
    entries: Mutex<HashMap<Key, (Instant, Worker)>>,
}

impl WorkerCache {
    fn get(&self, key: &Key) -> Option<Worker> {
        let entries = self.entries.lock().ok()?;
        entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < TTL)
            .map(|(_, w)| w.clone())
    }

    fn put(&self, key: Key, worker: &Worker) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= CAPACITY {
                entries.clear();
            }
            entries.insert(key, (Instant::now(), worker.clone()));
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
        if let Ok(mut entries) = self.entries.lock() {
            entries
                .values_mut()
                .filter(|(_, w)| w.id == worker_id)
                .for_each(|(_, w)| {
                    w.last_seen_at = at;
                    if w.status == "offline" && !w.is_out() {
                        w.status = "idle".into();
                    }
                });
        }
    }

    /// Drops the cached copies of one worker (its status changed, e.g. it claimed a build).
    pub fn forget(&self, worker_id: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|_, (_, w)| w.id != worker_id);
        }
    }

    /// Drops everything (a worker's credentials or state changed).
    pub fn clear(&self) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.clear();
        }
    }
}
