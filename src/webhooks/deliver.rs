//! The delivery workers: one loop per instance, deliveries claimed as durable jobs.
//!
//! * **Claim**: one statement (at most one per [`COALESCE`], however many wake-ups came meanwhile)
//!   takes up to the room in the instance's hand (a few per slot, [`HAND_PER_SLOT`]) of due rows
//!   (`pending` whose `run_at` has passed and which hold no lease, or whose lease is over because its
//!   instance died) `FOR UPDATE SKIP LOCKED`, so each is
//!   claimed once across instances, and sets `attempts + 1` and a lease (`leased_until`) of
//!   `LEASE_SECS`. Neither column is indexed, so the claim is a HOT update (migration 0240); a
//!   `pending` row under a lease is shown as `delivering`.
//! * **Send**: POST of the event's JSON (the `/api/v2/events` object), signed the Standard Webhooks way
//!   (`webhook-id` = `msg_<delivery id>`, the same on every attempt; `webhook-timestamp`;
//!   `webhook-signature: v1,<base64 HMAC-SHA256>`), 10 s timeout, no redirects, no proxy, at most
//!   64 KiB of the answer read; the resolver drops private addresses ([`super::target`]).
//! * **Finish**: one recorder task writes the outcomes waiting for it in one statement per batch, at
//!   most one per [`COALESCE`] (`UPDATE … FROM unnest(…)` with the attempt inserts in the same
//!   statement), fenced on `attempts` and the lease
//!   (a redelivery, which clears the lease, or a second claim meanwhile wins): `delivered` (2xx), `pending` again after an
//!   exponential backoff with jitter, or `failed` once the next try would be past
//!   `CONTROLLER_WEBHOOK_RETRY_HOURS`. The last attempt is kept on the delivery row; only failed
//!   attempts get a `webhook_attempts` row, so a first-try success inserts nothing. A record statement
//!   that fails keeps its outcomes for the next one ([`record_loop`]).
//! * **Payloads**: the claim reads each delivery's event from its one `webhook_payloads` row (migration
//!   0300; the fan-out no longer copies the event into every delivery row).
//! * **Wake-ups**: the fan-out trigger NOTIFYs [`CHANNEL`] when it wrote deliveries (the LISTEN loop
//!   of `queue::wakeups` wakes this loop), and the loop looks every second for retries that came due.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rand::Rng;
use serde_json::Value;
use sha2::Sha256;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore, mpsc, watch};

use super::target::{self, GuardedResolver};
use crate::config::WebhookConfig;

/// The NOTIFY channel of new deliveries.
pub const CHANNEL: &str = "expo_webhooks";
/// Longest time one POST may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of an answer read.
pub const MAX_ANSWER: usize = 64 * 1024;
/// How long a claimed delivery is held before another instance may take it over.
const LEASE_SECS: i64 = 30;
/// Deliveries claimed and not yet finished on one instance, per slot of
/// `CONTROLLER_WEBHOOK_CONCURRENCY`: a claim takes up to this many per slot, so the instance's rate is not
/// capped at one claim of `concurrency` rows per [`COALESCE`] (64 per 50 ms: 1,280 deliveries/s), and
/// under a backlog one statement claims more rows.
const HAND_PER_SLOT: usize = 4;
/// How long a shutdown waits for the deliveries that wait for a slot to give their leases back.
const RELEASE_AT_SHUTDOWN: Duration = Duration::from_millis(500);
/// A claimed delivery that waited this long for a slot (counted from before its claim statement) is not
/// sent: its lease (of [`LEASE_SECS`]) could run out during the POST (at most [`TIMEOUT`]) or before its
/// outcome is recorded ([`SEND_MARGIN`]), and another instance send it at the same time. Its lease is
/// given back instead (an `Outcome::released`), so it is claimable again at once, by any instance.
const SEND_BY: Duration = Duration::from_secs(LEASE_SECS as u64 - TIMEOUT.as_secs() - SEND_MARGIN.as_secs());
/// What a lease keeps free after the latest POST could end: the record statement (a pool acquire may
/// wait 5 s, a failed record is retried) and the claim statement's own time.
const SEND_MARGIN: Duration = Duration::from_secs(10);
const _: () = assert!(SEND_BY.as_secs() >= 5, "the lease leaves no time to wait for a slot");
/// Look for due retries this often without a wake-up.
const RECHECK: Duration = Duration::from_secs(1);
/// At most one claim statement and one record statement per this long, whatever the number of
/// deliveries: under load many wake-ups and outcomes share one statement.
pub const COALESCE: Duration = Duration::from_millis(50);
/// First retry delay and the longest one.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(3600);

/// Wakes the delivery loop of this instance (called by the LISTEN loop on [`CHANNEL`]).
#[derive(Debug, Default)]
pub struct Wake(Notify);

impl Wake {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn wake(&self) {
        self.0.notify_one();
    }
}

/// `v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`; `secret` is the decoded `whsec_` key.
pub fn sign(secret: &[u8], message_id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).ok()?;
    mac.update(message_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes())))
}

/// The bytes of a `whsec_…` secret.
pub fn secret_bytes(secret: &str) -> Option<Vec<u8>> {
    STANDARD.decode(secret.strip_prefix("whsec_")?).ok()
}

#[derive(Debug, sqlx::FromRow)]
struct Claimed {
    id: i64,
    attempts: i32,
    event_id: i64,
    kind: String,
    build_id: Option<String>,
    worker_id: Option<String>,
    data: sqlx::types::Json<Value>,
    event_at: DateTime<Utc>,
    retry_from: DateTime<Utc>,
    url: String,
    secret_sealed: Vec<u8>,
}

/// A claimed delivery with what its POST needs, prepared once per claim statement: the body once per
/// event and the signing secret opened once per subscription secret, shared by the batch's deliveries
/// (ten subscriptions to one event are ten deliveries of one body).
struct Prepared {
    delivery: Claimed,
    body: Bytes,
    /// `None`: the sealed secret does not open (the key changed).
    secret: Option<Arc<[u8]>>,
}

/// Prepares a claimed batch (see [`Prepared`]).
fn prepare(certs_key: &[u8; 32], claimed: Vec<Claimed>) -> Vec<Prepared> {
    let mut bodies: HashMap<i64, Bytes> = HashMap::new();
    let mut secrets: HashMap<Vec<u8>, Option<Arc<[u8]>>> = HashMap::new();
    claimed
        .into_iter()
        .map(|mut delivery| {
            // Every delivery of an event carries the event's kind, ids, time and data (the fan-out's copy).
            // A test delivery (`webhook.test`) belongs to no event (id 0) and carries its own
            // subscription's data, so its body is never shared.
            let shared = (delivery.event_id > 0)
                .then(|| bodies.get(&delivery.event_id))
                .flatten();
            let body = match shared {
                Some(body) => body.clone(),
                None => {
                    let body = Bytes::from(
                        crate::events::event_json(
                            delivery.event_id,
                            &delivery.kind,
                            delivery.build_id.as_deref(),
                            delivery.worker_id.as_deref(),
                            delivery.event_at,
                            std::mem::take(&mut delivery.data.0),
                        )
                        .to_string(),
                    );
                    if delivery.event_id > 0 {
                        bodies.insert(delivery.event_id, body.clone());
                    }
                    body
                }
            };
            let secret = secrets
                .entry(std::mem::take(&mut delivery.secret_sealed))
                .or_insert_with_key(|sealed| {
                    crate::storage::certs::decrypt(certs_key, sealed)
                        .and_then(|s| String::from_utf8(s).ok())
                        .and_then(|s| secret_bytes(&s))
                        .map(Arc::from)
                })
                .clone();
            Prepared { delivery, body, secret }
        })
        .collect()
}

/// What the delivery loop needs.
#[derive(Clone)]
pub struct Deliverer {
    pool: PgPool,
    client: reqwest::Client,
    certs_key: [u8; 32],
    config: WebhookConfig,
}

impl Deliverer {
    pub fn new(pool: PgPool, config: WebhookConfig, certs_key: [u8; 32]) -> reqwest::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("expo-controller-webhooks/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(GuardedResolver {
                allow_private: config.webhook_allow_private,
            })
            .build()?;
        Ok(Self {
            pool,
            client,
            certs_key,
            config,
        })
    }

    /// Claims and sends due deliveries until `shutdown` flips. Deliveries in flight then are abandoned:
    /// their lease runs out and another instance (or this one, restarted) sends them again.
    ///
    /// Claims are coalesced: at most one claim statement per [`COALESCE`] whatever the number of
    /// wake-ups meanwhile (each committing fan-out NOTIFYs), and a claim runs only when something may
    /// be due (a wake-up, the periodic look for retries, or a backlog left by the last claim). A claim
    /// takes up to the room in the instance's hand ([`HAND_PER_SLOT`] × the concurrency, less the
    /// deliveries claimed and not finished): the claimed deliveries wait for one of the `concurrency`
    /// slots (POSTs in flight). With a backlog a claim also waits until a quarter of the hand is free, so
    /// one statement takes many rows. Results go to one recorder task that writes them in one statement
    /// per [`COALESCE`].
    pub async fn run(self, wake: Arc<Wake>, mut shutdown: watch::Receiver<bool>) {
        let concurrency = self.config.webhook_concurrency.max(1);
        let hand = concurrency * HAND_PER_SLOT;
        let batch_min = (hand / 4).max(1);
        let slots = Arc::new(Semaphore::new(concurrency));
        let (results, inbox) = mpsc::unbounded_channel::<Outcome>();
        let recorder = tokio::spawn(record_loop(self.pool.clone(), inbox));
        let mut tasks = tokio::task::JoinSet::new();
        let mut backlog = false;
        // Whether a claim may find something: set by wake-ups and the periodic look, kept by a backlog.
        let mut due = true;
        let mut last_claim: Option<Instant> = None;
        // The next look for retries that came due (a deadline: deliveries finishing do not postpone it).
        let mut look_at = Instant::now() + RECHECK;
        loop {
            let room = hand.saturating_sub(tasks.len());
            if due && room > 0 && (!backlog || room >= batch_min || room == hand) {
                // The wake-ups of the next few milliseconds are served by this one claim.
                if let Some(wait) = last_claim.map(|at| COALESCE.saturating_sub(at.elapsed()))
                    && !wait.is_zero()
                {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => break,
                    }
                }
                // A wake-up that came meanwhile is for a commit this claim's snapshot sees: consumed here,
                // it does not cause a second, empty claim.
                let _ = futures_util::FutureExt::now_or_never(wake.0.notified());
                while tasks.try_join_next().is_some() {}
                let room = hand.saturating_sub(tasks.len());
                // The lease starts with the claim statement: the wait for a slot is counted from here.
                let claimed_at = Instant::now();
                last_claim = Some(claimed_at);
                look_at = claimed_at + RECHECK;
                match self.claim(room as i64).await {
                    Ok(claimed) => {
                        backlog = claimed.len() >= room;
                        due = backlog;
                        if claimed.len() > room {
                            tracing::warn!(
                                claimed = claimed.len(),
                                limit = room,
                                "a webhook claim returned more deliveries than its limit"
                            );
                        }
                        // Every claimed delivery is spawned and waits for a slot; one that waited past
                        // SEND_BY, or still waits at shutdown (the slots are closed then), gives its
                        // lease back unsent.
                        for delivery in prepare(&self.certs_key, claimed) {
                            let (this, results, slots) = (self.clone(), results.clone(), slots.clone());
                            tasks.spawn(async move {
                                let permit = slots.acquire_owned().await.ok();
                                if permit.is_none() || claimed_at.elapsed() > SEND_BY {
                                    if permit.is_some() {
                                        tracing::warn!(
                                            delivery = delivery.delivery.id,
                                            "a claimed webhook delivery waited too long for a slot; its lease is given back"
                                        );
                                    }
                                    let _ = results.send(Outcome::released(&delivery));
                                    return;
                                }
                                let outcome = this.attempt(delivery).await;
                                let _ = results.send(outcome);
                                drop(permit);
                            });
                        }
                    }
                    Err(error) => {
                        // Looked at again at `look_at` (RECHECK from now), not only at the next wake-up.
                        backlog = false;
                        due = false;
                        tracing::warn!(%error, "claiming webhook deliveries failed");
                    }
                }
            }
            while tasks.try_join_next().is_some() {}
            if backlog && hand.saturating_sub(tasks.len()) >= batch_min {
                continue;
            }
            tokio::select! {
                _ = wake.0.notified() => due = true,
                _ = tokio::time::sleep_until(look_at.into()), if !due => due = true,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = shutdown.changed() => break,
            }
        }
        // Deliveries still waiting for a slot give their leases back (recorded below), so that another
        // instance, or this one after a restart, sends them at once rather than after the lease.
        slots.close();
        let _ = tokio::time::timeout(RELEASE_AT_SHUTDOWN, async {
            // The tasks beyond the POSTs in flight (the permits held) are the waiting ones.
            while tasks.len() > concurrency.saturating_sub(slots.available_permits()) {
                if tasks.join_next().await.is_none() {
                    break;
                }
            }
        })
        .await;
        tasks.shutdown().await;
        // The recorder writes what finished before the shutdown, then ends with the last sender.
        drop(results);
        let _ = recorder.await;
    }

    async fn claim(&self, limit: i64) -> sqlx::Result<Vec<Claimed>> {
        sqlx::query_as(
            // The subscriptions that may carry deliveries (active, creator valid: webhook_creator_valid
            // inline) are read once per claim, not probed once per candidate row.
            "WITH subs AS MATERIALIZED (
                SELECT s.id, s.url, s.secret_sealed FROM webhook_subscriptions s
                 WHERE s.active
                   AND (s.creator_key_id IS NULL OR EXISTS (
                        SELECT 1 FROM api_keys k WHERE k.id = s.creator_key_id
                           AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())))),
             claimed AS (
                UPDATE webhook_deliveries d
                   SET attempts = d.attempts + 1, leased_until = now() + make_interval(secs => $2)
                  FROM (SELECT w.id FROM webhook_deliveries w
                         WHERE w.state = 'pending' AND w.run_at <= now()
                           AND (w.leased_until IS NULL OR w.leased_until <= now())
                           AND w.subscription_id IN (SELECT id FROM subs)
                         ORDER BY w.run_at LIMIT $1 FOR UPDATE OF w SKIP LOCKED) due,
                       subs s
                 WHERE d.id = due.id AND s.id = d.subscription_id
             RETURNING d.id, d.attempts, d.event_id, d.kind, d.build_id, d.worker_id, d.data, d.event_at,
                       d.retry_from, s.url, s.secret_sealed)
             -- The event from its one payload row (migration 0300); a test delivery, or a row written
             -- before the payloads, carries its own copy.
             SELECT c.id, c.attempts, c.event_id,
                    coalesce(p.kind, c.kind, '') AS kind,
                    CASE WHEN p.event_id IS NULL THEN c.build_id ELSE p.build_id END AS build_id,
                    CASE WHEN p.event_id IS NULL THEN c.worker_id ELSE p.worker_id END AS worker_id,
                    coalesce(p.data, c.data, '{}') AS data,
                    coalesce(p.event_at, c.event_at, now()) AS event_at,
                    c.retry_from, c.url, c.secret_sealed
               FROM claimed c LEFT JOIN webhook_payloads p ON p.event_id = c.event_id AND c.event_id > 0",
        )
        .bind(limit)
        .bind(LEASE_SECS as f64)
        .fetch_all(&self.pool)
        .await
    }

    /// One attempt of one claimed delivery and what to record of it.
    async fn attempt(&self, prepared: Prepared) -> Outcome {
        let at = Utc::now();
        let started = Instant::now();
        let result = self.send(&prepared, at).await;
        let delivery = prepared.delivery;
        let (status, error) = match result {
            Ok(status) if (200..300).contains(&status) => (Some(status), None),
            Ok(status) => (Some(status), Some(format!("answered HTTP {status}"))),
            Err(error) => (None, Some(error)),
        };
        let latency_ms = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
        let delivered = error.is_none();
        let next = if delivered {
            None
        } else {
            let jitter = rand::rng().random_range(-1.0..=1.0);
            let delay = crate::queue::backoff(delivery.attempts, BACKOFF_BASE, BACKOFF_CAP, jitter);
            let next = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
            let until = delivery.retry_from + chrono::Duration::hours(self.config.webhook_retry_hours as i64);
            (next <= until).then_some(next)
        };
        let state = match (delivered, next) {
            (true, _) => "delivered",
            (false, Some(_)) => "pending",
            (false, None) => "failed",
        };
        metrics::counter!("expo_webhook_attempts_total", "outcome" => state).increment(1);
        Outcome {
            id: delivery.id,
            attempts: delivery.attempts,
            state,
            next,
            at,
            status: status.map(i32::from),
            latency_ms,
            error,
        }
    }

    /// POSTs the delivery; the receiver's status, or why there was none.
    async fn send(&self, prepared: &Prepared, at: DateTime<Utc>) -> Result<u16, String> {
        let delivery = &prepared.delivery;
        let url = reqwest::Url::parse(&delivery.url).map_err(|_| "target URL no longer parses".to_string())?;
        if let Some(why) = target::literal_refused(&url, self.config.webhook_allow_private) {
            return Err(format!("refused: {why}"));
        }
        let secret = prepared
            .secret
            .as_deref()
            .ok_or_else(|| "the signing secret cannot be opened (CONTROLLER_CERTS_KEY changed?)".to_string())?;
        let body = prepared.body.clone();
        let message_id = super::message_id(delivery.id);
        let timestamp = at.timestamp();
        let signature = sign(secret, &message_id, timestamp, &body).ok_or_else(|| "signing failed".to_string())?;
        let response = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &message_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(describe)?;
        let status = response.status().as_u16();
        // Read (and drop) at most 64 KiB of the answer, so the connection can be reused.
        let mut response = response;
        let mut read = 0usize;
        while read < MAX_ANSWER {
            match response.chunk().await {
                Ok(Some(chunk)) => read += chunk.len(),
                _ => break,
            }
        }
        Ok(status)
    }
}

/// What one attempt ended with, waiting to be recorded.
#[derive(Debug)]
struct Outcome {
    id: i64,
    attempts: i32,
    state: &'static str,
    next: Option<DateTime<Utc>>,
    at: DateTime<Utc>,
    status: Option<i32>,
    latency_ms: i32,
    error: Option<String>,
}

/// The state of an outcome that gives a claimed delivery's lease back unsent (see [`SEND_BY`]).
const RELEASED: &str = "released";

impl Outcome {
    /// A claimed delivery given back unsent: the record statement clears its lease and takes back the
    /// claim's attempt, and keeps its last attempt as it was (no attempt row).
    fn released(prepared: &Prepared) -> Self {
        Outcome {
            id: prepared.delivery.id,
            attempts: prepared.delivery.attempts,
            state: RELEASED,
            next: None,
            at: Utc::now(),
            status: None,
            latency_ms: 0,
            error: None,
        }
    }
}

/// Most outcomes recorded by one statement.
const RECORD_BATCH: usize = 512;

/// First wait before a failed record statement is tried again, and the longest.
const RECORD_RETRY: Duration = Duration::from_millis(200);
const RECORD_RETRY_CAP: Duration = Duration::from_secs(2);

/// Records outcomes until every sender is gone: what waits in the channel, in one statement at most
/// every [`COALESCE`] (outcomes that arrive within that time of the last statement wait for the next).
///
/// A statement that fails (a pool acquire timeout on a starved machine, a lost connection) keeps its
/// outcomes: they are written with the next statement, after [`RECORD_RETRY`] doubling up to
/// [`RECORD_RETRY_CAP`]. Dropped, they were sent a second time once their lease ran out, one lease
/// late. An outcome whose lease is over
/// is dropped then: its delivery is claimable again (its record, fenced on `attempts`, may still land if
/// no other claim came). After the last sender is gone a failing batch is tried a few more times only.
async fn record_loop(pool: PgPool, mut inbox: mpsc::UnboundedReceiver<Outcome>) {
    let mut batch: Vec<Outcome> = Vec::with_capacity(RECORD_BATCH);
    let mut last: Option<Instant> = None;
    let mut failures = 0u32;
    let mut closed = false;
    loop {
        if batch.is_empty() && (closed || inbox.recv_many(&mut batch, RECORD_BATCH).await == 0) {
            break;
        }
        let pause = if failures > 0 {
            RECORD_RETRY
                .saturating_mul(1 << (failures - 1).min(8))
                .min(RECORD_RETRY_CAP)
        } else {
            COALESCE
        };
        if let Some(wait) = last.map(|at| pause.saturating_sub(at.elapsed()))
            && !wait.is_zero()
        {
            tokio::time::sleep(wait).await;
        }
        while batch.len() < RECORD_BATCH {
            match inbox.try_recv() {
                Ok(outcome) => batch.push(outcome),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        last = Some(Instant::now());
        match record(&pool, &batch).await {
            Ok(()) => {
                batch.clear();
                failures = 0;
            }
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, deliveries = batch.len(), failures, "recording webhook attempts failed; tried again");
                let lease = chrono::Duration::seconds(LEASE_SECS);
                let now = Utc::now();
                batch.retain(|outcome| now - outcome.at < lease);
                if closed && failures >= 3 {
                    // Shutting down: the leases run out and the deliveries are sent again (at least once).
                    break;
                }
            }
        }
    }
}

/// One statement for a batch of outcomes: each delivery, fenced on `attempts` (a redelivery or a
/// second claim meanwhile wins), becomes `delivered`, `pending` (at its retry time) or `failed`,
/// with its last attempt on the row; an attempt that failed is also kept in `webhook_attempts`. A
/// [`RELEASED`] outcome (never sent) only clears the lease and takes the claim's attempt back.
async fn record(pool: &PgPool, batch: &[Outcome]) -> sqlx::Result<()> {
    let ids: Vec<i64> = batch.iter().map(|o| o.id).collect();
    let attempts: Vec<i32> = batch.iter().map(|o| o.attempts).collect();
    let states: Vec<&str> = batch.iter().map(|o| o.state).collect();
    let next: Vec<Option<DateTime<Utc>>> = batch.iter().map(|o| o.next).collect();
    let at: Vec<DateTime<Utc>> = batch.iter().map(|o| o.at).collect();
    let status: Vec<Option<i32>> = batch.iter().map(|o| o.status).collect();
    let latency: Vec<i32> = batch.iter().map(|o| o.latency_ms).collect();
    let errors: Vec<Option<String>> = batch.iter().map(|o| o.error.clone()).collect();
    sqlx::query(
        "WITH r AS (
            SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::timestamptz[], $5::timestamptz[],
                                 $6::int[], $7::int[], $8::text[])
                       AS r(id, attempts, state, next_at, at, status, latency_ms, error)),
         d AS (
            UPDATE webhook_deliveries w
               SET state = CASE WHEN r.state = 'released' THEN w.state ELSE r.state END,
                   attempts = CASE WHEN r.state = 'released' THEN w.attempts - 1 ELSE w.attempts END,
                   run_at = coalesce(r.next_at, w.run_at), leased_until = NULL,
                   delivered_at = CASE WHEN r.state = 'delivered' THEN now() END,
                   last_attempt_at = CASE WHEN r.state = 'released' THEN w.last_attempt_at ELSE r.at END,
                   last_status = CASE WHEN r.state = 'released' THEN w.last_status ELSE r.status END,
                   last_latency_ms = CASE WHEN r.state = 'released' THEN w.last_latency_ms ELSE r.latency_ms END
              FROM r
             WHERE w.id = r.id AND w.attempts = r.attempts AND w.state = 'pending' AND w.leased_until IS NOT NULL
         RETURNING w.id, w.attempts)
         INSERT INTO webhook_attempts (delivery_id, at, status_code, latency_ms, error, next_retry_at)
         SELECT r.id, r.at, r.status, r.latency_ms, r.error, r.next_at
           FROM r JOIN d ON d.id = r.id AND d.attempts = r.attempts
          WHERE r.state NOT IN ('delivered', 'released')
          ORDER BY r.id",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&states)
    .bind(&next)
    .bind(&at)
    .bind(&status)
    .bind(&latency)
    .bind(&errors)
    .execute(pool)
    .await?;
    Ok(())
}

/// A transport error without its URL (which is the subscriber's), with its causes.
fn describe(error: reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut text = kind.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text.chars().take(1000).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification.
    #[test]
    fn signs_like_the_specification() {
        let secret = secret_bytes("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
    }

    fn claimed(id: i64, event_id: i64, data: Value) -> Claimed {
        Claimed {
            id,
            attempts: 0,
            event_id,
            kind: if event_id == 0 {
                "webhook.test"
            } else {
                "build.completed"
            }
            .into(),
            build_id: None,
            worker_id: None,
            data: sqlx::types::Json(data),
            event_at: Utc::now(),
            retry_from: Utc::now(),
            url: "https://example.com/hook".into(),
            secret_sealed: Vec::new(),
        }
    }

    /// Deliveries of one event share its body; two subscriptions' test deliveries (no event, id 0) in
    /// one batch each carry their own subscription's id.
    #[test]
    fn test_deliveries_in_one_batch_keep_their_own_bodies() {
        let batch = vec![
            claimed(1, 0, serde_json::json!({ "webhook_id": "wh_a" })),
            claimed(2, 0, serde_json::json!({ "webhook_id": "wh_b" })),
            claimed(3, 7, serde_json::json!({ "n": 1 })),
            claimed(4, 7, serde_json::json!({})),
        ];
        let prepared = prepare(&[0; 32], batch);
        let text = |i: usize| String::from_utf8(prepared[i].body.to_vec()).expect("utf-8");
        assert!(text(0).contains("wh_a") && !text(0).contains("wh_b"), "{}", text(0));
        assert!(text(1).contains("wh_b") && !text(1).contains("wh_a"), "{}", text(1));
        assert_eq!(text(2), text(3), "one body per event");
    }
}
