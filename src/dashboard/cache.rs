//! A short-lived, per-instance cache of what the dashboard reads, shared by every open page.
//!
//! Every event makes each open page re-fetch the regions it concerns, so without this cache each event
//! would cost one set of queries per open dashboard. Here the results of the read queries (never HTML:
//! pages carry the session's CSRF token) are kept, keyed by section and normalised parameters, until
//! this instance's event hub delivers a newer event or a short TTL passes, whichever comes first; and
//! concurrent misses for one key share a single query (one `OnceCell` per entry). So the first page
//! re-fetching after an event reads afresh (the event's change is committed before it is delivered) and
//! every other page gets that result: one set of queries per event, however many pages are open. The
//! TTL bounds staleness for what changes without an event (e.g. "silent" builds as time passes).
//! Live sessions are cached for the TTL (only found ones, never misses). A dashboard action on this
//! instance also empties the whole cache once it has run, so the page it redirects back to shows the
//! change (and a log-out here takes effect at once).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::events::Events;

use super::queries::{BuildPage, BuildsPage, Filter, Names, Overview, WorkerRow};
use crate::queue::operator::QueueView;

/// Most entries one section keeps (builds filters and build ids are many); past it, expired entries go,
/// and if that is not enough the section starts over.
const MAX_ENTRIES: usize = 1024;

/// An entry: when it was created, the newest event delivered then, and its value once loaded.
type Entry<T> = (Instant, i64, Arc<OnceCell<Arc<T>>>);

/// Entries of one section.
struct Section<K, T> {
    entries: Mutex<HashMap<K, Entry<T>>>,
}

impl<K: Hash + Eq, T> Default for Section<K, T> {
    fn default() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone, T> Section<K, T> {
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Entry<T>>> {
        // Nothing panics while holding the lock; a poisoned map is still a valid map.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The live entry for `key` (younger than `ttl`, and no event delivered since it was created), or
    /// a new empty one.
    fn cell(&self, key: &K, ttl: Duration, event: i64) -> Arc<OnceCell<Arc<T>>> {
        let mut entries = self.lock();
        if let Some((created, at_event, cell)) = entries.get(key)
            && created.elapsed() < ttl
            && *at_event == event
        {
            return cell.clone();
        }
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (created, at_event, _)| created.elapsed() < ttl && *at_event == event);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        let cell = Arc::new(OnceCell::new());
        entries.insert(key.clone(), (Instant::now(), event, cell.clone()));
        cell
    }

    /// The cached value for `key`, or what `load` returns (once for all concurrent callers). A failed
    /// load is not kept: the next caller tries again.
    async fn get<E, F>(&self, key: K, ttl: Duration, event: i64, load: impl FnOnce() -> F) -> Result<Arc<T>, E>
    where
        F: Future<Output = Result<T, E>>,
    {
        if ttl.is_zero() {
            return load().await.map(Arc::new);
        }
        let cell = self.cell(&key, ttl, event);
        cell.get_or_try_init(|| async { load().await.map(Arc::new) })
            .await
            .cloned()
    }

    fn clear(&self) {
        self.lock().clear();
    }
}

/// The dashboard's read cache (see the module documentation).
pub struct ReadCache {
    ttl: Duration,
    events: Arc<Events>,
    overview: Section<(), Overview>,
    builds: Section<String, BuildsPage>,
    build: Section<String, Option<BuildPage>>,
    workers: Section<(), Vec<WorkerRow>>,
    queues: Section<(), Vec<QueueView>>,
    names: Section<(), Names>,
    sessions: Section<Vec<u8>, super::session::SessionRow>,
}

impl ReadCache {
    /// A cache keeping values for at most `ttl` (zero: no caching at all), and only until `events`
    /// delivers a newer event.
    pub fn new(ttl: Duration, events: Arc<Events>) -> Self {
        Self {
            ttl,
            events,
            overview: Section::default(),
            builds: Section::default(),
            build: Section::default(),
            workers: Section::default(),
            queues: Section::default(),
            names: Section::default(),
            sessions: Section::default(),
        }
    }

    pub async fn overview<E, F>(&self, load: impl FnOnce() -> F) -> Result<Arc<Overview>, E>
    where
        F: Future<Output = Result<Overview, E>>,
    {
        self.overview.get((), self.ttl, self.events.delivered(), load).await
    }

    pub async fn builds<E, F>(&self, filter: &Filter, load: impl FnOnce() -> F) -> Result<Arc<BuildsPage>, E>
    where
        F: Future<Output = Result<BuildsPage, E>>,
    {
        let key = format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
            filter.id, filter.state, filter.platform, filter.worker, filter.within_hours, filter.before
        );
        self.builds.get(key, self.ttl, self.events.delivered(), load).await
    }

    pub async fn build<E, F>(&self, id: &str, load: impl FnOnce() -> F) -> Result<Arc<Option<BuildPage>>, E>
    where
        F: Future<Output = Result<Option<BuildPage>, E>>,
    {
        self.build
            .get(id.to_string(), self.ttl, self.events.delivered(), load)
            .await
    }

    pub async fn workers<E, F>(&self, load: impl FnOnce() -> F) -> Result<Arc<Vec<WorkerRow>>, E>
    where
        F: Future<Output = Result<Vec<WorkerRow>, E>>,
    {
        self.workers.get((), self.ttl, self.events.delivered(), load).await
    }

    pub async fn queues<E, F>(&self, load: impl FnOnce() -> F) -> Result<Arc<Vec<QueueView>>, E>
    where
        F: Future<Output = Result<Vec<QueueView>, E>>,
    {
        self.queues.get((), self.ttl, self.events.delivered(), load).await
    }

    /// Worker names by id.
    pub async fn names<E, F>(&self, load: impl FnOnce() -> F) -> Result<Arc<Names>, E>
    where
        F: Future<Output = Result<Names, E>>,
    {
        self.names.get((), self.ttl, self.events.delivered(), load).await
    }

    /// The CSRF token of a live session, by the hash of its id, for the TTL (events do not end
    /// sessions). `load` fails for unknown sessions, so only live ones are kept.
    pub async fn session<E, F>(
        &self,
        id_hash: &[u8],
        load: impl FnOnce() -> F,
    ) -> Result<Arc<super::session::SessionRow>, E>
    where
        F: Future<Output = Result<super::session::SessionRow, E>>,
    {
        self.sessions.get(id_hash.to_vec(), self.ttl, 0, load).await
    }

    /// Forgets everything (after a dashboard action on this instance).
    pub fn invalidate(&self) {
        self.overview.clear();
        self.builds.clear();
        self.build.clear();
        self.workers.clear();
        self.queues.clear();
        self.names.clear();
        self.sessions.clear();
    }
}
