//! Webhooks (webhooks.md): subscriptions, their durable deliveries and the delivery workers.
//!
//! * A subscription names a URL and event patterns. An admin's sees every build; a `submitter` key's
//!   only its own builds' events (`builds.submitted_by`). The secret (`whsec_` + base64) is answered
//!   once, at creation, and kept sealed under the certs key.
//! * Deliveries are written by a trigger on the `events` outbox (migration 0160), so in the
//!   transaction of the change itself: a committed change is never missed, a rolled-back one never sent.
//! * [`deliver::run`] (on every instance) claims due deliveries with `FOR UPDATE SKIP LOCKED` and POSTs
//!   them signed the Standard Webhooks way; see that module.
//!
//! The functions here are shared by `/api/v2/webhooks` and the dashboard: the same views, the same
//! refusals. Each takes the caller ([`Actor`]): a submitter key acts only on its own subscriptions
//! (another's is 404, as with builds).

pub mod deliver;
pub mod target;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use utoipa::ToSchema;

use crate::audit::{self, Actor, Change};
use crate::ops::views::iso;
use crate::ops::{OpError, OpResult};

/// Subscriptions one owner may have.
pub const MAX_SUBSCRIPTIONS: i64 = 100;
/// Patterns one subscription may list.
const MAX_PATTERNS: usize = 32;
/// Deliveries a listing shows at most.
const MAX_LISTED: i64 = 500;

/// A subscription as listed and shown (never its secret).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookView {
    pub id: String,
    pub url: String,
    /// Event kinds (`build.completed`), families (`build.*`) or `*`.
    pub events: Vec<String>,
    pub description: String,
    /// Paused subscriptions keep their deliveries waiting.
    pub active: bool,
    /// The submitter key whose builds it carries (`null`: an admin's, every build).
    pub owner: Option<String>,
    pub owner_name: String,
    pub created_at: String,
}

/// A subscription just created, with its signing secret (shown this once).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedWebhook {
    pub id: String,
    /// `whsec_` + base64 of 32 bytes: verify `webhook-signature` with it (Standard Webhooks).
    pub secret: String,
    pub url: String,
    pub events: Vec<String>,
    pub description: String,
    pub active: bool,
    pub owner: Option<String>,
    pub owner_name: String,
    pub created_at: String,
}

/// The caller's subscriptions, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookPage {
    pub items: Vec<WebhookView>,
}

/// `POST /api/v2/webhooks`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    /// `http(s)://…`, at most 2048 bytes, no user info.
    pub url: Option<String>,
    /// Event kinds, `family.*` or `*` (1–32).
    pub events: Option<Vec<String>>,
    /// At most 256 bytes.
    pub description: Option<String>,
}

/// `PATCH /api/v2/webhooks/{id}`: any of the fields.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookUpdate {
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    pub description: Option<String>,
    pub active: Option<bool>,
}

/// One attempt of a delivery.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AttemptView {
    pub at: String,
    /// The receiver's HTTP status (`null`: no answer).
    pub status_code: Option<i32>,
    pub latency_ms: i32,
    pub error: Option<String>,
    /// When the next attempt runs (`null`: delivered, or retries are over).
    pub next_retry_at: Option<String>,
}

/// One delivery of one event to one subscription, with every attempt.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeliveryView {
    pub id: i64,
    /// `webhook-id`: the same on every attempt and redelivery.
    pub message_id: String,
    pub webhook_id: String,
    pub event_id: i64,
    pub kind: String,
    pub build_id: Option<String>,
    /// `pending`, `delivering`, `delivered` or `failed`.
    pub state: String,
    pub created_at: String,
    pub delivered_at: Option<String>,
    /// When a pending delivery runs next.
    pub next_attempt_at: Option<String>,
    pub attempts: Vec<AttemptView>,
}

/// A subscription's deliveries, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeliveryPage {
    pub items: Vec<DeliveryView>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct Row {
    id: String,
    url: String,
    events: Vec<String>,
    description: String,
    active: bool,
    owner_key_id: Option<String>,
    owner_name: String,
    created_at: DateTime<Utc>,
}

impl Row {
    fn view(self) -> WebhookView {
        WebhookView {
            id: self.id,
            url: self.url,
            events: self.events,
            description: self.description,
            active: self.active,
            owner: self.owner_key_id,
            owner_name: self.owner_name,
            created_at: iso(self.created_at),
        }
    }
}

const COLUMNS: &str = "id, url, events, description, active, owner_key_id, owner_name, created_at";

/// The submitter key a caller is limited to (`None`: an admin, who sees every subscription).
fn scope(actor: &Actor) -> OpResult<Option<&str>> {
    match actor.role.as_str() {
        "admin" => Ok(None),
        "submitter" => actor
            .key_id
            .as_deref()
            .map(Some)
            .ok_or_else(|| OpError::refused(403, "Insufficient role", "insufficient_role")),
        _ => Err(OpError::refused(403, "Insufficient role", "insufficient_role")),
    }
}

fn not_found() -> OpError {
    OpError::refused(404, "Webhook not found", "webhook_not_found")
}

/// Event patterns: 1–32 of a kind (`build.completed`), a family (`build.*`) or `*`.
pub fn parse_patterns(patterns: &[String]) -> OpResult<Vec<String>> {
    let invalid =
        || OpError::bad_request("events must list 1–32 event kinds (build.completed), families (build.*) or *");
    if patterns.is_empty() || patterns.len() > MAX_PATTERNS {
        return Err(invalid());
    }
    let mut out = Vec::new();
    for pattern in patterns.iter().map(|p| p.trim()) {
        let name = pattern.strip_suffix(".*").unwrap_or(pattern);
        let valid = pattern == "*"
            || (!name.is_empty()
                && name.len() <= 64
                && !name.starts_with('.')
                && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_'));
        if !valid {
            return Err(invalid());
        }
        if !out.iter().any(|p| p == pattern) {
            out.push(pattern.to_string());
        }
    }
    Ok(out)
}

fn description(value: Option<&str>) -> OpResult<String> {
    let value = value.unwrap_or("").trim();
    if value.len() > 256 {
        return Err(OpError::bad_request("description must be at most 256 bytes"));
    }
    Ok(value.to_string())
}

fn checked_url(url: &str, allow_private: bool) -> OpResult<String> {
    target::check_at_creation(url, allow_private)
        .map(|u| u.to_string())
        .map_err(|problem| OpError::refused(400, problem, "webhook_target_refused"))
}

/// A fresh signing secret: `whsec_` + base64 of 32 random bytes.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    format!("whsec_{}", STANDARD.encode(bytes))
}

/// Creates a subscription for the caller (a submitter key's carries only its own builds).
pub async fn create(
    pool: &PgPool,
    certs_key: &[u8; 32],
    allow_private: bool,
    request: &WebhookRequest,
    actor: &Actor,
) -> OpResult<CreatedWebhook> {
    let owner = scope(actor)?;
    let url = checked_url(
        request
            .url
            .as_deref()
            .ok_or_else(|| OpError::bad_request("url is required"))?,
        allow_private,
    )?;
    let events = parse_patterns(request.events.as_deref().unwrap_or(&[]))?;
    let description = description(request.description.as_deref())?;
    let secret = new_secret();
    let sealed = crate::storage::certs::encrypt(certs_key, secret.as_bytes());
    let id = crate::ids::new_id();
    let mut tx = pool.begin().await.map_err(db)?;
    // Serialises one owner's creations, so the bound below holds under concurrent requests.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('webhooks:' || coalesce($1, '')))")
        .bind(owner)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    let existing: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_subscriptions WHERE owner_key_id IS NOT DISTINCT FROM $1")
            .bind(owner)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
    if existing >= MAX_SUBSCRIPTIONS {
        return Err(OpError::refused(
            409,
            format!("At most {MAX_SUBSCRIPTIONS} webhooks per owner"),
            "conflict",
        ));
    }
    let row: Row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO webhook_subscriptions (id, url, events, description, secret_sealed, owner_key_id, owner_name,
                                            creator_key_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {COLUMNS}"
    )))
    .bind(&id)
    .bind(&url)
    .bind(&events)
    .bind(&description)
    .bind(&sealed)
    .bind(owner)
    .bind(&actor.name)
    .bind(&actor.key_id)
    .fetch_one(&mut *tx)
    .await
    .map_err(db)?;
    let mut change = Change::new("webhook.create", "webhook", &id);
    change.after = Some(json!({ "url": url, "events": events, "owner": owner }));
    audit::record(&mut tx, actor, change).await.map_err(db)?;
    tx.commit().await.map_err(db)?;
    let view = row.view();
    Ok(CreatedWebhook {
        id: view.id,
        secret,
        url: view.url,
        events: view.events,
        description: view.description,
        active: view.active,
        owner: view.owner,
        owner_name: view.owner_name,
        created_at: view.created_at,
    })
}

/// The caller's subscriptions (an admin: every one), newest first.
pub async fn list(pool: &PgPool, actor: &Actor) -> OpResult<WebhookPage> {
    let owner = scope(actor)?;
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM webhook_subscriptions WHERE ($1::text IS NULL OR owner_key_id = $1)
         ORDER BY created_at DESC, id DESC"
    )))
    .bind(owner)
    .fetch_all(pool)
    .await
    .map_err(db)?;
    Ok(WebhookPage {
        items: rows.into_iter().map(Row::view).collect(),
    })
}

async fn find(conn: &mut sqlx::PgConnection, id: &str, owner: Option<&str>, lock: bool) -> OpResult<Row> {
    let lock = if lock { " FOR UPDATE" } else { "" };
    let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM webhook_subscriptions WHERE id = $1 AND ($2::text IS NULL OR owner_key_id = $2){lock}"
    )))
    .bind(id)
    .bind(owner)
    .fetch_optional(conn)
    .await
    .map_err(db)?;
    row.ok_or_else(not_found)
}

/// One subscription of the caller.
pub async fn show(pool: &PgPool, id: &str, actor: &Actor) -> OpResult<WebhookView> {
    let owner = scope(actor)?;
    let mut conn = pool.acquire().await.map_err(db)?;
    Ok(find(&mut conn, id, owner, false).await?.view())
}

/// Changes a subscription's URL, patterns, description or whether it is active.
pub async fn update(
    pool: &PgPool,
    allow_private: bool,
    id: &str,
    patch: &WebhookUpdate,
    actor: &Actor,
) -> OpResult<WebhookView> {
    let owner = scope(actor)?;
    let url = patch
        .url
        .as_deref()
        .map(|u| checked_url(u, allow_private))
        .transpose()?;
    let events = patch.events.as_deref().map(parse_patterns).transpose()?;
    let description = patch.description.as_deref().map(|d| description(Some(d))).transpose()?;
    let mut tx = pool.begin().await.map_err(db)?;
    let before = find(&mut tx, id, owner, true).await?;
    let row: Row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE webhook_subscriptions SET url = coalesce($2, url), events = coalesce($3, events),
                description = coalesce($4, description), active = coalesce($5, active)
          WHERE id = $1 RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(&url)
    .bind(&events)
    .bind(&description)
    .bind(patch.active)
    .fetch_one(&mut *tx)
    .await
    .map_err(db)?;
    let mut change = Change::new("webhook.update", "webhook", id);
    change.before = Some(json!({ "url": before.url, "events": before.events, "active": before.active }));
    change.after = Some(json!({ "url": row.url, "events": row.events, "active": row.active }));
    audit::record(&mut tx, actor, change).await.map_err(db)?;
    tx.commit().await.map_err(db)?;
    Ok(row.view())
}

/// Deletes a subscription and its deliveries (pending ones are never sent): the deliveries go with it
/// through a trigger (migration 0210), not a foreign key checked at every delivery insert.
pub async fn delete(pool: &PgPool, id: &str, actor: &Actor) -> OpResult<()> {
    let owner = scope(actor)?;
    let mut tx = pool.begin().await.map_err(db)?;
    let before = find(&mut tx, id, owner, true).await?;
    sqlx::query("DELETE FROM webhook_subscriptions WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    let mut change = Change::new("webhook.delete", "webhook", id);
    change.before = Some(json!({ "url": before.url, "events": before.events }));
    audit::record(&mut tx, actor, change).await.map_err(db)?;
    tx.commit().await.map_err(db)?;
    Ok(())
}

/// Queues a `webhook.test` delivery to this subscription alone.
pub async fn test(pool: &PgPool, id: &str, actor: &Actor) -> OpResult<DeliveryView> {
    let owner = scope(actor)?;
    let mut tx = pool.begin().await.map_err(db)?;
    find(&mut tx, id, owner, false).await?;
    let delivery_id: i64 = sqlx::query_scalar(
        "INSERT INTO webhook_deliveries (subscription_id, event_id, kind, data, event_at)
         VALUES ($1, 0, 'webhook.test', jsonb_build_object('webhook_id', $1::text), now()) RETURNING id",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await
    .map_err(db)?;
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(deliver::CHANNEL)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    tx.commit().await.map_err(db)?;
    delivery(pool, delivery_id, owner).await
}

#[derive(sqlx::FromRow)]
struct DeliveryRow {
    id: i64,
    subscription_id: String,
    event_id: i64,
    kind: String,
    build_id: Option<String>,
    state: String,
    created_at: DateTime<Utc>,
    delivered_at: Option<DateTime<Utc>>,
    run_at: DateTime<Utc>,
    last_attempt_at: Option<DateTime<Utc>>,
    last_status: Option<i32>,
    last_latency_ms: Option<i32>,
}

#[derive(sqlx::FromRow)]
struct AttemptRow {
    delivery_id: i64,
    at: DateTime<Utc>,
    status_code: Option<i32>,
    latency_ms: i32,
    error: Option<String>,
    next_retry_at: Option<DateTime<Utc>>,
}

/// The Standard Webhooks message id of a delivery (the same on every attempt).
pub fn message_id(delivery_id: i64) -> String {
    format!("msg_{delivery_id}")
}

async fn views(pool: &PgPool, rows: Vec<DeliveryRow>) -> OpResult<Vec<DeliveryView>> {
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let attempts: Vec<AttemptRow> = sqlx::query_as(
        "SELECT delivery_id, at, status_code, latency_ms, error, next_retry_at FROM webhook_attempts
          WHERE delivery_id = ANY($1) ORDER BY id",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await
    .map_err(db)?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let delivered = row.state == "delivered";
            DeliveryView {
                id: row.id,
                message_id: message_id(row.id),
                webhook_id: row.subscription_id,
                event_id: row.event_id,
                kind: row.kind,
                build_id: row.build_id,
                next_attempt_at: (row.state == "pending").then(|| iso(row.run_at)),
                state: row.state,
                created_at: iso(row.created_at),
                delivered_at: row.delivered_at.map(iso),
                // Failed attempts are rows of webhook_attempts; the successful one is on the delivery.
                attempts: attempts
                    .iter()
                    .filter(|a| a.delivery_id == row.id)
                    .map(|a| AttemptView {
                        at: iso(a.at),
                        status_code: a.status_code,
                        latency_ms: a.latency_ms,
                        error: a.error.clone(),
                        next_retry_at: a.next_retry_at.map(iso),
                    })
                    .chain(row.last_attempt_at.filter(|_| delivered).map(|at| AttemptView {
                        at: iso(at),
                        status_code: row.last_status,
                        latency_ms: row.last_latency_ms.unwrap_or(0),
                        error: None,
                        next_retry_at: None,
                    }))
                    .collect(),
            }
        })
        .collect())
}

/// A `pending` row under a lease is in flight: `delivering` (migration 0240). A macro, so that
/// [`SHOWN_STATE`] and [`DELIVERY_COLUMNS`] are one text.
macro_rules! shown_state {
    () => {
        "CASE WHEN d.state = 'pending' AND d.leased_until > now() THEN 'delivering' ELSE d.state END"
    };
}

/// The state a delivery is shown in (see [`shown_state`]).
const SHOWN_STATE: &str = shown_state!();

/// The columns of a listed delivery; the query joins the event's payload as `p` ([`PAYLOAD_JOIN`]).
const DELIVERY_COLUMNS: &str = concat!(
    "d.id, d.subscription_id, d.event_id, coalesce(p.kind, d.kind, '') AS kind, ",
    "CASE WHEN p.event_id IS NULL THEN d.build_id ELSE p.build_id END AS build_id, ",
    shown_state!(),
    " AS state, d.created_at, d.delivered_at, d.run_at, d.last_attempt_at, d.last_status, d.last_latency_ms"
);

/// A delivery's event, from its one payload row (migration 0300); a test delivery or a row written before
/// the payloads carries its own copy.
const PAYLOAD_JOIN: &str = "LEFT JOIN webhook_payloads p ON p.event_id = d.event_id AND d.event_id > 0";

async fn delivery(pool: &PgPool, id: i64, owner: Option<&str>) -> OpResult<DeliveryView> {
    let row: Option<DeliveryRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN webhook_subscriptions s ON s.id = d.subscription_id
                {PAYLOAD_JOIN}
          WHERE d.id = $1 AND ($2::text IS NULL OR s.owner_key_id = $2)"
    )))
    .bind(id)
    .bind(owner)
    .fetch_optional(pool)
    .await
    .map_err(db)?;
    let row = row.ok_or_else(|| OpError::refused(404, "Delivery not found", "delivery_not_found"))?;
    views(pool, vec![row])
        .await?
        .pop()
        .ok_or_else(|| OpError::refused(404, "Delivery not found", "delivery_not_found"))
}

/// A subscription's deliveries with every attempt, newest first (at most `limit`, ≤ 500).
pub async fn deliveries(pool: &PgPool, id: &str, limit: i64, actor: &Actor) -> OpResult<DeliveryPage> {
    let owner = scope(actor)?;
    {
        let mut conn = pool.acquire().await.map_err(db)?;
        find(&mut conn, id, owner, false).await?;
    }
    let rows: Vec<DeliveryRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d {PAYLOAD_JOIN}
          WHERE d.subscription_id = $1 ORDER BY d.id DESC LIMIT $2"
    )))
    .bind(id)
    .bind(limit.clamp(1, MAX_LISTED))
    .fetch_all(pool)
    .await
    .map_err(db)?;
    Ok(DeliveryPage {
        items: views(pool, rows).await?,
    })
}

/// Sends a delivery again, with the same message id (a delivered or failed one, or a pending one at
/// once); its retry period starts anew. One in flight is refused (409).
pub async fn redeliver(pool: &PgPool, delivery_id: &str, actor: &Actor) -> OpResult<DeliveryView> {
    let owner = scope(actor)?;
    let id: i64 = delivery_id
        .parse()
        .map_err(|_| OpError::refused(404, "Delivery not found", "delivery_not_found"))?;
    let mut tx = pool.begin().await.map_err(db)?;
    let state: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT {SHOWN_STATE} FROM webhook_deliveries d JOIN webhook_subscriptions s ON s.id = d.subscription_id
          WHERE d.id = $1 AND ($2::text IS NULL OR s.owner_key_id = $2) FOR UPDATE OF d"
    )))
    .bind(id)
    .bind(owner)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    match state.as_deref() {
        None => return Err(OpError::refused(404, "Delivery not found", "delivery_not_found")),
        Some("delivering") => {
            tx.rollback().await.map_err(db)?;
            return Err(OpError::refused(409, "Delivery in flight", "conflict"));
        }
        Some(_) => {}
    }
    // A delivered row's successful attempt lives on the row: keep it in the history before it is reset.
    sqlx::query(
        "WITH kept AS (
            INSERT INTO webhook_attempts (delivery_id, at, status_code, latency_ms)
            SELECT id, last_attempt_at, last_status, coalesce(last_latency_ms, 0) FROM webhook_deliveries
             WHERE id = $1 AND state = 'delivered' AND last_attempt_at IS NOT NULL)
         UPDATE webhook_deliveries SET state = 'pending', run_at = now(), retry_from = now(), delivered_at = NULL,
                leased_until = NULL
          WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(deliver::CHANNEL)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    let target = id.to_string();
    audit::record(
        &mut tx,
        actor,
        Change::new("webhook.redeliver", "webhook_delivery", &target),
    )
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    delivery(pool, id, owner).await
}

/// Deletes up to `batch` delivered or failed deliveries created before `cutoff` (attempts with them),
/// then up to `batch` orphans: deliveries whose subscription is gone. Deleting a subscription deletes
/// its deliveries (a trigger, migration 0210), but a delivery whose fan-out raced with the deletion was
/// not yet visible to it; such a row is never claimed (the claim joins the subscription) and goes here.
/// The orphans are found by one probe of the subscription index per distinct subscription.
pub async fn prune(pool: &PgPool, cutoff: DateTime<Utc>, batch: i64) -> sqlx::Result<u64> {
    let finished = sqlx::query(
        "DELETE FROM webhook_deliveries WHERE id IN (
             SELECT id FROM webhook_deliveries WHERE state IN ('delivered', 'failed') AND created_at < $1
              ORDER BY id LIMIT $2)",
    )
    .bind(cutoff)
    .bind(batch)
    .execute(pool)
    .await?;
    let orphans = sqlx::query(
        "WITH RECURSIVE subs(id) AS (
            (SELECT subscription_id FROM webhook_deliveries ORDER BY subscription_id LIMIT 1)
            UNION ALL
            SELECT (SELECT d.subscription_id FROM webhook_deliveries d WHERE d.subscription_id > subs.id
                     ORDER BY d.subscription_id LIMIT 1)
              FROM subs WHERE subs.id IS NOT NULL
         )
         DELETE FROM webhook_deliveries WHERE id IN (
             SELECT d.id FROM subs JOIN webhook_deliveries d ON d.subscription_id = subs.id
              WHERE NOT EXISTS (SELECT 1 FROM webhook_subscriptions s WHERE s.id = subs.id)
              LIMIT $1)",
    )
    .bind(batch)
    .execute(pool)
    .await?;
    Ok(finished.rows_affected() + orphans.rows_affected())
}

fn db(error: sqlx::Error) -> OpError {
    OpError::Queue(crate::queue::QueueError::Db(error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_kinds_families_or_everything() {
        let ok = |p: &[&str]| parse_patterns(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            ok(&["build.completed", "build.*", "*", "build.*"]).ok(),
            Some(vec![
                "build.completed".to_string(),
                "build.*".to_string(),
                "*".to_string()
            ])
        );
        assert!(ok(&[]).is_err());
        assert!(ok(&["Build.completed"]).is_err());
        assert!(ok(&[".*"]).is_err());
        assert!(ok(&["build.%"]).is_err());
    }

    #[test]
    fn secrets_are_whsec_and_32_bytes() {
        let secret = new_secret();
        let encoded = secret.strip_prefix("whsec_").expect("prefix");
        assert_eq!(STANDARD.decode(encoded).map(|b| b.len()).ok(), Some(32));
        assert_ne!(secret, new_secret());
    }
}
