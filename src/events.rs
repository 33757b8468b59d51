//! The event stream (`GET /api/v2/events`, and any route that reuses [`sse_response`]).
//!
//! The queue writes one row per state change to the `events` outbox in the transaction of the change
//! (`src/queue/emit.rs`); a trigger NOTIFYs `expo_events` at commit. Each instance runs one [`pump`]:
//! woken by the LISTEN loop (or every second), it reads the new rows in id order — one query per
//! wake-up, whatever the number of subscribers — and appends them to an in-memory ring. Subscribers read
//! the ring from their own cursor, so a reconnect with `Last-Event-ID` replays what it missed (within the
//! ring's bounds, `CONTROLLER_EVENT_REPLAY_*`) and then continues live, and a slow subscriber falls
//! behind without holding anyone up.
//!
//! # Ids committed out of order
//!
//! Ids are allocated before commit, so the pump may see id N+1 while N is still in flight. It never
//! passes a missing id until it is sure the id will never appear: everything after the gap is held back
//! and read again shortly after (usually the missing row has committed by then and nothing more is
//! needed). A gap still open at that re-read makes the pump note which transactions hold a lock on
//! `events` (every inserting transaction holds `RowExclusiveLock` on it from before its id was drawn
//! until it ends), wait until all of them have ended, and read once more. The missing id was drawn
//! before the visible later id, hence before the first read that saw the gap, hence before the locks
//! were noted: the transaction that drew it was either still running when they were noted — then it held
//! that lock — or had already ended, and its row (if it committed) is in every later read. So if the
//! row is absent from the read after all noted transactions ended, its transaction rolled back (or the
//! id was never used) and it is skipped. Delivered ids are therefore strictly increasing and complete.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use futures_util::Stream;
use serde_json::{Value, json};
use sqlx::{ConnectOptions, PgConnection, PgPool};
use tokio::sync::{Notify, watch};

use crate::config::EventsConfig;

/// The NOTIFY channel of events (payload empty: it only says "read the outbox").
pub const EVENTS_CHANNEL: &str = "expo_events";

/// Rows read per query.
const READ_BATCH: i64 = 512;
/// Re-read interval while a gap is open (its transactions are still running); never sooner than
/// [`COALESCE`] after the previous read started.
const GAP_RECHECK: Duration = Duration::from_millis(5);
/// Read interval without notifications (covers notifications lost while the LISTEN loop reconnects).
const IDLE_RECHECK: Duration = Duration::from_secs(1);
/// After a notification, how long the pump lets further commits arrive before it reads: under load
/// every state change commits (and notifies) on its own, several per build, and one read per
/// notification would cost a round trip each; this bounds the reads to about a hundred per second
/// at the price of ten milliseconds of latency.
const COALESCE: Duration = Duration::from_millis(10);
/// Events handed to one subscriber per ring read.
const SUBSCRIBER_BATCH: usize = 256;

/// One delivered event, serialised once for every subscriber.
#[derive(Debug)]
pub struct Event {
    pub id: i64,
    pub kind: String,
    pub build_id: Option<String>,
    pub worker_id: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The JSON object of the `data:` line.
    pub json: String,
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    id: i64,
    kind: String,
    build_id: Option<String>,
    worker_id: Option<String>,
    data: sqlx::types::Json<Value>,
    created_at: DateTime<Utc>,
}

/// The JSON object of an event as `/api/v2/events` (and every webhook delivery) carries it: `id`,
/// `kind`, `at`, `build_id`/`worker_id` when set, then the event's own fields.
pub fn event_json(
    id: i64,
    kind: &str,
    build_id: Option<&str>,
    worker_id: Option<&str>,
    created_at: DateTime<Utc>,
    data: Value,
) -> Value {
    let mut object = json!({
        "id": id,
        "kind": kind,
        "at": created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    if let Some(build_id) = build_id {
        object["build_id"] = json!(build_id);
    }
    if let Some(worker_id) = worker_id {
        object["worker_id"] = json!(worker_id);
    }
    if let (Some(object), Value::Object(data)) = (object.as_object_mut(), data) {
        for (key, value) in data {
            object.entry(key).or_insert(value);
        }
    }
    object
}

impl Event {
    fn from_row(row: Row) -> Self {
        let object = event_json(
            row.id,
            &row.kind,
            row.build_id.as_deref(),
            row.worker_id.as_deref(),
            row.created_at,
            row.data.0,
        );
        Self {
            id: row.id,
            kind: row.kind,
            build_id: row.build_id,
            worker_id: row.worker_id,
            created_at: row.created_at,
            json: object.to_string(),
        }
    }
}

/// Delivered events, in id order: every event with `covered_from <= id < next` is here.
#[derive(Debug, Default)]
struct Ring {
    events: VecDeque<Arc<Event>>,
    covered_from: i64,
    next: i64,
}

/// A subscriber's cursor fell out of the ring: events after `cursor` up to `resume_after` are gone.
#[derive(Debug, Clone, Copy)]
pub struct Missed {
    pub resume_after: i64,
}

/// This instance's event hub.
#[derive(Debug)]
pub struct Events {
    ring: RwLock<Ring>,
    /// The highest id delivered (or passed); -1 until the pump has started.
    delivered: watch::Sender<i64>,
    wake: Notify,
    /// The newest id when the stream started: older events are history, replayed only on request.
    head: AtomicI64,
    capacity: usize,
    max_age: chrono::Duration,
    open: AtomicUsize,
    /// Wakes this instance's webhook delivery loop (the LISTEN loop hears the fan-out's NOTIFY).
    pub webhooks: Arc<crate::webhooks::deliver::Wake>,
}

impl Events {
    pub fn new(config: &EventsConfig) -> Arc<Self> {
        let (delivered, _) = watch::channel(-1);
        Arc::new(Self {
            ring: RwLock::new(Ring::default()),
            delivered,
            wake: Notify::new(),
            head: AtomicI64::new(0),
            capacity: config.event_replay_events.max(1),
            max_age: chrono::Duration::seconds(config.event_replay_secs as i64),
            open: AtomicUsize::new(0),
            webhooks: crate::webhooks::deliver::Wake::new(),
        })
    }

    /// Tells the pump that new events were committed (called by the LISTEN loop).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Open SSE subscriptions on this instance.
    pub fn subscribers(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Changes whenever newer events were delivered (webhook delivery workers wait on it).
    pub fn watch_delivered(&self) -> watch::Receiver<i64> {
        self.delivered.subscribe()
    }

    /// The highest delivered id (-1 before the pump started).
    pub fn delivered(&self) -> i64 {
        *self.delivered.borrow()
    }

    /// Where a subscriber without `Last-Event-ID` starts: after everything delivered so far (and after
    /// the history loaded at start). `None` before the stream started.
    pub fn live_cursor(&self) -> Option<i64> {
        let delivered = self.delivered();
        (delivered >= 0).then(|| delivered.max(self.head.load(Ordering::Acquire)))
    }

    /// Up to `limit` events with `id > cursor`, oldest first.
    pub fn after(&self, cursor: i64, limit: usize) -> Result<Vec<Arc<Event>>, Missed> {
        let Ok(ring) = self.ring.read() else {
            return Ok(Vec::new());
        };
        if cursor + 1 < ring.covered_from {
            return Err(Missed {
                resume_after: ring.covered_from - 1,
            });
        }
        let start = ring.events.partition_point(|e| e.id <= cursor);
        Ok(ring.events.range(start..).take(limit).cloned().collect())
    }

    fn start_at(&self, head: i64, next: i64) {
        self.head.store(head, Ordering::Release);
        if let Ok(mut ring) = self.ring.write() {
            ring.events.clear();
            ring.covered_from = next;
            ring.next = next;
        }
        self.delivered.send_replace(next - 1);
    }

    fn next(&self) -> i64 {
        self.ring.read().map(|r| r.next).unwrap_or(0)
    }

    /// Appends delivered events and moves `next` (past skipped ids too), then wakes subscribers.
    fn push(&self, events: Vec<Event>, next: i64) {
        if let Ok(mut ring) = self.ring.write() {
            ring.events.extend(events.into_iter().map(Arc::new));
            ring.next = next;
            let oldest_kept = Utc::now() - self.max_age;
            while let Some(front) = ring.events.front() {
                if ring.events.len() <= self.capacity && front.created_at >= oldest_kept {
                    break;
                }
                ring.covered_from = front.id + 1;
                ring.events.pop_front();
            }
        }
        self.delivered.send_if_modified(|delivered| {
            let changed = *delivered != next - 1;
            *delivered = next - 1;
            changed
        });
    }
}

/// A run of missing ids starting at `at`, seen while later ids (from `until`) were visible.
#[derive(Debug)]
struct Gap {
    at: i64,
    until: i64,
    /// Transactions that held a lock on `events` when the gap was still open at a re-read and have not
    /// ended yet; `None` until that re-read.
    waiting: Option<HashSet<String>>,
}

/// Positions the stream at the latest events (call before serving, so that a subscriber connecting
/// first misses nothing); the ring then fills with recent history, so clients can resume across a
/// restart of this instance.
pub async fn start(pool: &PgPool, events: &Events) -> Result<(), sqlx::Error> {
    let max: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM events")
        .fetch_one(pool)
        .await?;
    events.start_at(max, (max - events.capacity as i64 + 1).max(1));
    Ok(())
}

/// Reads committed events into the ring, in id order, until `shutdown` flips (see the module docs).
pub async fn pump(pool: PgPool, events: Arc<Events>, mut shutdown: watch::Receiver<bool>) {
    while events.delivered() < 0 {
        match start(&pool, &events).await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(%error, "event stream cannot start yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(IDLE_RECHECK) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
    let mut gap: Option<Gap> = None;
    // Its own connection: under load, waiting for a pooled one would delay every event.
    let mut conn: Option<PgConnection> = None;
    loop {
        let started = tokio::time::Instant::now();
        let read = match conn.as_mut() {
            Some(conn) => step(conn, &events, &mut gap).await,
            None => match pump_connect_options(&pool).connect().await {
                Ok(fresh) => {
                    conn = Some(fresh);
                    continue;
                }
                Err(error) => Err(error),
            },
        };
        let wait = match read {
            Ok(true) => continue,
            Ok(false) if gap.is_some() => GAP_RECHECK,
            Ok(false) => IDLE_RECHECK,
            Err(error) => {
                tracing::warn!(%error, "reading events failed; reconnecting");
                conn = None;
                IDLE_RECHECK
            }
        };
        // At most one read per coalescing window, whatever woke the pump: under load a notification
        // (or an open gap's re-read) is always due, and without this floor the gap's re-read came
        // between two notified reads (~140 reads a second at any build rate).
        let window = started + COALESCE;
        tokio::select! {
            _ = events.wake.notified() => tokio::time::sleep(COALESCE).await,
            _ = tokio::time::sleep_until(window.max(tokio::time::Instant::now() + wait)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The pump's connection: the pool's settings, with the generic plan forced. PostgreSQL kept choosing a
/// custom plan for the outbox read, i.e. planning it at every call (as long as executing it), though its
/// only plan is the primary key's index from `$1` on; the lock look-up of a gap has nothing to choose
/// either.
fn pump_connect_options(pool: &PgPool) -> sqlx::postgres::PgConnectOptions {
    pool.connect_options()
        .as_ref()
        .clone()
        .options([("plan_cache_mode", "force_generic_plan")])
}

/// One read: delivers the contiguous run after the last delivered id. Returns true when there may be
/// more to read at once.
async fn step(conn: &mut PgConnection, events: &Events, gap: &mut Option<Gap>) -> Result<bool, sqlx::Error> {
    let mut next = events.next();
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, kind, build_id, worker_id, data, created_at FROM events WHERE id >= $1 ORDER BY id LIMIT $2",
    )
    .bind(next)
    .bind(READ_BATCH)
    .fetch_all(&mut *conn)
    .await?;
    let full = rows.len() as i64 == READ_BATCH;
    let mut delivered = Vec::new();
    let mut rows = rows.into_iter().peekable();
    let mut blocked = false;
    while let Some(row) = rows.peek() {
        if row.id < next {
            rows.next();
            continue;
        }
        if row.id == next {
            if let Some(row) = rows.next() {
                delivered.push(Event::from_row(row));
            }
            next += 1;
            *gap = None;
            continue;
        }
        // Ids next..row.id are missing while row.id is visible.
        let visible = row.id;
        match gap.as_mut() {
            Some(open) if open.at == next && open.waiting.as_ref().is_some_and(HashSet::is_empty) => {
                // Every transaction that could have drawn them has ended since the last read, and
                // this read (a later snapshot) still lacks them: they will never appear.
                tracing::debug!(
                    from = next,
                    to = visible - 1,
                    "skipping event ids that were never committed"
                );
                next = open.until.min(visible);
                *gap = None;
            }
            Some(open) if open.at == next => {
                // Still open at a re-read: note (or re-check) the transactions that may still add it.
                let lockers = event_writers(conn).await?;
                match open.waiting.as_mut() {
                    Some(waiting) => waiting.retain(|vxid| lockers.contains(vxid)),
                    None => open.waiting = Some(lockers),
                }
                blocked = true;
                break;
            }
            _ => {
                // Newly seen: usually closed by the next read, without looking at the locks.
                *gap = Some(Gap {
                    at: next,
                    until: visible,
                    waiting: None,
                });
                blocked = true;
                break;
            }
        }
    }
    if !delivered.is_empty() || next != events.next() {
        events.push(delivered, next);
    }
    Ok(full && !blocked)
}

/// Transactions (virtual ids) holding a lock on `events` in this database right now.
async fn event_writers(conn: &mut PgConnection) -> Result<HashSet<String>, sqlx::Error> {
    let lockers: Vec<String> = sqlx::query_scalar(
        "SELECT virtualtransaction FROM pg_locks
         WHERE locktype = 'relation' AND relation = 'events'::regclass
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND mode = 'RowExclusiveLock' AND virtualtransaction IS NOT NULL",
    )
    .fetch_all(conn)
    .await?;
    Ok(lockers.into_iter().collect())
}

/// Which events a subscriber wants: by build, by worker, by kind (`build.log`, or a prefix `build.*`).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    build: Option<String>,
    worker: Option<String>,
    kinds: Vec<String>,
}

/// Most kinds one filter may list.
const MAX_KINDS: usize = 32;

impl Filter {
    /// Parses `?build=`, `?worker=` and `?kind=` (comma list); the error names the bad parameter.
    pub fn parse(build: Option<&str>, worker: Option<&str>, kind: Option<&str>) -> Result<Self, &'static str> {
        let id = |value: Option<&str>, problem| match value {
            None => Ok(None),
            Some(v) if crate::ids::valid_id(v) => Ok(Some(v.to_string())),
            Some(_) => Err(problem),
        };
        let build = id(build, "build must be a build id")?;
        let worker = id(worker, "worker must be a worker id")?;
        let mut kinds = Vec::new();
        if let Some(list) = kind {
            for pattern in list.split(',').map(str::trim) {
                let name = pattern.strip_suffix(".*").unwrap_or(pattern);
                let valid = !name.is_empty()
                    && name.len() <= 64
                    && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_');
                if !valid || kinds.len() == MAX_KINDS {
                    return Err("kind must be a comma list of event kinds, each optionally ending in .*");
                }
                kinds.push(pattern.to_string());
            }
        }
        Ok(Self { build, worker, kinds })
    }

    pub fn matches(&self, event: &Event) -> bool {
        if self.build.as_ref().is_some_and(|b| event.build_id.as_ref() != Some(b)) {
            return false;
        }
        if self
            .worker
            .as_ref()
            .is_some_and(|w| event.worker_id.as_ref() != Some(w))
        {
            return false;
        }
        self.kinds.is_empty()
            || self.kinds.iter().any(|k| match k.strip_suffix('*') {
                Some(prefix) => event.kind.starts_with(prefix),
                None => event.kind == *k,
            })
    }
}

/// The query of an event stream request (`?build=&worker=&kind=&last_event_id=`), shared by
/// `/api/v2/events` and `/dashboard/events`.
#[derive(Debug, Default, serde::Deserialize)]
pub struct StreamQuery {
    pub build: Option<String>,
    pub worker: Option<String>,
    pub kind: Option<String>,
    pub last_event_id: Option<String>,
}

impl StreamQuery {
    /// The filter and the resume point (`Last-Event-ID` header, else `?last_event_id=`).
    pub fn resolve(&self, headers: &HeaderMap) -> Result<(Filter, Option<i64>), &'static str> {
        let filter = Filter::parse(self.build.as_deref(), self.worker.as_deref(), self.kind.as_deref())?;
        Ok((filter, last_event_id(headers, self.last_event_id.as_deref())?))
    }
}

/// The resume point: the `Last-Event-ID` header, else `?last_event_id=`; a non-negative integer.
pub fn last_event_id(headers: &HeaderMap, query: Option<&str>) -> Result<Option<i64>, &'static str> {
    let header = headers.get("last-event-id").map(|v| v.to_str().unwrap_or("x"));
    match header.or(query).map(str::trim) {
        None | Some("") => Ok(None),
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|id| *id >= 0)
            .map(Some)
            .ok_or("Last-Event-ID must be a non-negative integer"),
    }
}

/// Counts an open subscription for as long as it lives.
struct Open(Arc<Events>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Subscriber {
    events: Arc<Events>,
    _open: Open,
    filter: Filter,
    /// Last id handed out (or passed); `None` until the pump has started.
    cursor: Option<i64>,
    pending: VecDeque<Arc<Event>>,
    delivered: watch::Receiver<i64>,
    shutdown: watch::Receiver<bool>,
}

impl Subscriber {
    async fn next_frame(&mut self) -> Option<SseEvent> {
        loop {
            if *self.shutdown.borrow() {
                return None;
            }
            if let Some(event) = self.pending.pop_front() {
                return Some(
                    SseEvent::default()
                        .id(event.id.to_string())
                        .event(&event.kind)
                        .data(&event.json),
                );
            }
            self.delivered.borrow_and_update();
            if self.cursor.is_none() {
                self.cursor = self.events.live_cursor();
            }
            if let Some(cursor) = self.cursor {
                match self.events.after(cursor, SUBSCRIBER_BATCH) {
                    Ok(batch) if !batch.is_empty() => {
                        self.cursor = batch.last().map(|e| e.id);
                        self.pending = batch.into_iter().filter(|e| self.filter.matches(e)).collect();
                        continue;
                    }
                    Ok(_) => {}
                    Err(missed) => {
                        self.cursor = Some(missed.resume_after);
                        let data = json!({ "kind": "stream.resync", "missed_after": cursor, "resume_after": missed.resume_after });
                        return Some(SseEvent::default().event("stream.resync").data(data.to_string()));
                    }
                }
            }
            tokio::select! {
                changed = self.delivered.changed() => if changed.is_err() { return None },
                _ = self.shutdown.changed() => {}
            }
        }
    }
}

/// The SSE response of the event stream: events after `last_event_id` (replayed from the ring; a
/// `stream.resync` frame says when some are no longer there) or, without it, from now on; then live,
/// until the client goes away or `shutdown` flips. Costs no database work per subscriber.
pub fn sse_response(
    events: &Arc<Events>,
    filter: Filter,
    last_event_id: Option<i64>,
    shutdown: watch::Receiver<bool>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>> + use<>> {
    events.open.fetch_add(1, Ordering::Relaxed);
    let subscriber = Subscriber {
        events: events.clone(),
        _open: Open(events.clone()),
        filter,
        cursor: last_event_id.or_else(|| events.live_cursor()),
        pending: VecDeque::new(),
        delivered: events.delivered.subscribe(),
        shutdown,
    };
    let stream = futures_util::stream::unfold(subscriber, |mut subscriber| async move {
        let frame = subscriber.next_frame().await?;
        Some((Ok(frame), subscriber))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: i64, kind: &str, build: Option<&str>) -> Event {
        Event {
            id,
            kind: kind.to_string(),
            build_id: build.map(str::to_string),
            worker_id: None,
            created_at: Utc::now(),
            json: String::new(),
        }
    }

    #[test]
    fn filters_match_builds_workers_kinds_and_prefixes() {
        let all = Filter::parse(None, None, None).unwrap();
        assert!(all.matches(&event(1, "build.log", Some("b1"))));
        let kinds = Filter::parse(None, None, Some("build.log,worker.*")).unwrap();
        assert!(kinds.matches(&event(1, "build.log", None)));
        assert!(kinds.matches(&event(1, "worker.online", None)));
        assert!(!kinds.matches(&event(1, "build.logs", None)));
        assert!(!kinds.matches(&event(1, "build.assigned", None)));
        let build = Filter::parse(Some("b1"), None, Some("build.*")).unwrap();
        assert!(build.matches(&event(1, "build.log", Some("b1"))));
        assert!(!build.matches(&event(1, "build.log", Some("b2"))));
        assert!(Filter::parse(Some("../x"), None, None).is_err());
        assert!(Filter::parse(None, None, Some("build.log,")).is_err());
        assert!(Filter::parse(None, None, Some("BUILD")).is_err());
    }

    #[test]
    fn the_ring_replays_after_a_cursor_and_reports_what_it_no_longer_has() {
        let events = Events::new(&EventsConfig {
            event_replay_events: 3,
            event_replay_secs: 600,
        });
        events.start_at(0, 10);
        events.push((10..15).map(|id| event(id, "build.log", None)).collect(), 15);
        assert_eq!(events.delivered(), 14);
        let ids = |v: Vec<Arc<Event>>| v.iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(ids(events.after(11, 10).unwrap()), vec![12, 13, 14]);
        assert_eq!(ids(events.after(13, 10).unwrap()), vec![14]);
        assert!(events.after(14, 10).unwrap().is_empty());
        assert_eq!(events.after(10, 10).unwrap_err().resume_after, 11);
        // Skipped ids move the cursor too.
        events.push(Vec::new(), 17);
        assert_eq!(events.delivered(), 16);
    }
}
