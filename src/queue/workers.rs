//! Workers: registration (idempotent for the rightful caller only) and liveness.

use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;

use super::{Platform, QueueError, QueueResult, Settings, Worker, emit};
use crate::ids;

/// A registration request, already validated by the API layer.
#[derive(Debug, Clone)]
pub struct RegisterRequest {
    /// Client-chosen or known id; `None` lets the server pick one.
    pub id: Option<String>,
    pub name: String,
    pub capabilities: serde_json::Value,
    pub platforms: Vec<Platform>,
    /// Who asks: `None` for the admin key, `Some(id)` for the holder of worker `id`'s token.
    pub caller_worker: Option<String>,
    /// The worker key registering it (`None`: an admin key or the worker's own token).
    pub registered_by: Option<String>,
}

/// The registered worker and its fresh token (shown once).
#[derive(Debug, Clone)]
pub struct Registration {
    pub worker: Worker,
    pub token: String,
    pub reregistered: bool,
}

/// Longest worker name accepted, in bytes (R48: the name is copied into every assignment log line).
pub const MAX_NAME_BYTES: usize = 256;
/// Largest capabilities document accepted, in bytes of compact JSON (R48).
pub const MAX_CAPABILITIES_BYTES: usize = 16 * 1024;

/// Refuses names and capability documents past their bounds (R48).
fn check_bounds(req: &RegisterRequest) -> QueueResult<()> {
    if req.name.len() > MAX_NAME_BYTES {
        return Err(QueueError::Invalid(format!(
            "Worker name too long (at most {MAX_NAME_BYTES} bytes)"
        )));
    }
    if serde_json::to_vec(&req.capabilities).map_or(usize::MAX, |v| v.len()) > MAX_CAPABILITIES_BYTES {
        return Err(QueueError::Invalid(format!(
            "Capabilities too large (at most {MAX_CAPABILITIES_BYTES} bytes of JSON)"
        )));
    }
    Ok(())
}

/// Registers a worker, or re-registers a known one for the admin key or that worker's own token.
/// Re-registering issues a fresh token and revokes the previous one; a worker that still holds an
/// attempt stays busy. A revoked worker is never re-registered: naming its id registers a new worker
/// with a fresh id (R50).
pub async fn register(
    pool: &PgPool,
    req: &RegisterRequest,
    settings: &Settings,
    now: DateTime<Utc>,
) -> QueueResult<Registration> {
    check_bounds(req)?;
    let mut id = match (&req.id, &req.caller_worker) {
        (Some(id), _) => id.clone(),
        (None, Some(own)) => own.clone(),
        (None, None) => ids::new_id(),
    };
    if req.caller_worker.as_ref().is_some_and(|own| *own != id) {
        return Err(QueueError::Forbidden);
    }
    let revoked: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM workers WHERE id = $1 AND admin_state = 'revoked')")
            .bind(&id)
            .fetch_one(pool)
            .await?;
    if revoked {
        id = ids::new_id();
    }
    let token = ids::new_secret();
    let token_hash = ids::hash_secret(&token);
    let expires = now + Duration::seconds(settings.worker_token_ttl_secs as i64);
    let platforms: Vec<&str> = req.platforms.iter().map(|p| p.as_str()).collect();
    let inserted: Option<Worker> = sqlx::query_as(
        "WITH inserted AS (
            INSERT INTO workers (id, name, capabilities, platforms, token_hash, token_expires_at, registered_at, last_seen_at,
                                 registered_by)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8)
            ON CONFLICT (id) DO NOTHING RETURNING *
         ), event AS (
            INSERT INTO events (kind, worker_id, data)
            SELECT 'worker.registered', id, jsonb_build_object('state', status, 'admin_state', admin_state,
                'name', name, 'platforms', platforms, 'reregistered', false)
            FROM inserted
         )
         SELECT * FROM inserted",
    )
    .bind(&id)
    .bind(&req.name)
    .bind(sqlx::types::Json(&req.capabilities))
    .bind(&platforms)
    .bind(&token_hash)
    .bind(expires)
    .bind(now)
    .bind(&req.registered_by)
    .fetch_optional(pool)
    .await?;
    if let Some(worker) = inserted {
        return Ok(Registration {
            worker,
            token,
            reregistered: false,
        });
    }
    let worker: Worker = sqlx::query_as(
        "WITH updated AS (
            UPDATE workers SET name = $2, capabilities = $3, platforms = $4, token_hash = $5, token_expires_at = $6,
                last_seen_at = $7, unregistered_at = NULL,
                status = CASE WHEN EXISTS (SELECT 1 FROM builds WHERE lease_owner = $1 AND state IN ('assigned', 'building'))
                              THEN 'busy' ELSE 'idle' END
            WHERE id = $1 AND admin_state <> 'revoked' AND ($8::text IS NULL OR registered_by = $8) RETURNING *
         ), event AS (
            INSERT INTO events (kind, worker_id, data)
            SELECT 'worker.registered', id, jsonb_build_object('state', status, 'admin_state', admin_state,
                'name', name, 'platforms', platforms, 'reregistered', true)
            FROM updated
         )
         SELECT * FROM updated",
    )
    .bind(&id)
    .bind(&req.name)
    .bind(sqlx::types::Json(&req.capabilities))
    .bind(&platforms)
    .bind(&token_hash)
    .bind(expires)
    .bind(now)
    .bind(&req.registered_by)
    .fetch_optional(pool)
    .await?
    .ok_or(QueueError::WorkerNotFound)?;
    Ok(Registration {
        worker,
        token,
        reregistered: true,
    })
}

/// `capabilities.platforms`; absent or without a known platform means both.
pub fn platforms_of(capabilities: &serde_json::Value) -> Vec<Platform> {
    let listed: Vec<Platform> = capabilities
        .get("platforms")
        .and_then(serde_json::Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|p| p.as_str().and_then(Platform::parse))
                .collect()
        })
        .unwrap_or_default();
    if listed.is_empty() {
        Platform::ALL.to_vec()
    } else {
        listed
    }
}

/// The worker with this id, if any.
pub async fn find_worker(pool: &PgPool, id: &str) -> QueueResult<Option<Worker>> {
    Ok(sqlx::query_as("SELECT * FROM workers WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?)
}

/// How stale `last_seen_at` may get before a poll writes it again (empty polls stay read-only).
pub const SEEN_DEBOUNCE_SECS: i64 = 10;

/// Records that the worker is alive and slides its token's expiry, at most once per debounce window.
/// A revoked or unregistered worker stays offline (R50). Returns whether it wrote.
pub async fn touch_worker(
    pool: &PgPool,
    worker: &Worker,
    settings: &Settings,
    now: DateTime<Utc>,
) -> QueueResult<bool> {
    if worker.is_out() {
        return Ok(false);
    }
    let offline = worker.status == "offline";
    if !offline && worker.last_seen_at > now - Duration::seconds(SEEN_DEBOUNCE_SECS) {
        return Ok(false);
    }
    sqlx::query(
        "WITH prev AS (SELECT id, status FROM workers WHERE id = $1 FOR UPDATE),
         touched AS (
            UPDATE workers w SET last_seen_at = $2,
                token_expires_at = CASE WHEN w.token_hash IS NULL THEN NULL ELSE $3 END,
                status = CASE WHEN w.status = 'offline' AND w.admin_state <> 'revoked' AND w.unregistered_at IS NULL THEN
                    (CASE WHEN EXISTS (SELECT 1 FROM builds WHERE lease_owner = $1 AND state IN ('assigned', 'building'))
                          THEN 'busy' ELSE 'idle' END)
                    ELSE w.status END
            FROM prev WHERE w.id = prev.id
            RETURNING w.id, w.status, w.admin_state, prev.status AS was
         )
         INSERT INTO events (kind, worker_id, data)
         SELECT 'worker.online', id, jsonb_build_object('state', status, 'admin_state', admin_state)
         FROM touched WHERE was = 'offline'",
    )
    .bind(&worker.id)
    .bind(now)
    .bind(now + Duration::seconds(settings.worker_token_ttl_secs as i64))
    .execute(pool)
    .await?;
    Ok(true)
}

/// Marks a worker offline, revokes its token and gives its held attempt back to the queue as an
/// infrastructure failure. Returns how many builds went back.
pub async fn unregister(pool: &PgPool, worker_id: &str, settings: &Settings, now: DateTime<Utc>) -> QueueResult<u64> {
    let mut tx = pool.begin().await?;
    let found = sqlx::query(
        "UPDATE workers SET status = 'offline', token_hash = NULL, token_expires_at = NULL,
                unregistered_at = coalesce(unregistered_at, $2)
             WHERE id = $1",
    )
    .bind(worker_id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    if found.rows_affected() == 0 {
        return Err(QueueError::WorkerNotFound);
    }
    const HELD: &str = concat!(
        "SELECT ",
        super::attempts::locked_columns!(),
        " FROM builds WHERE lease_owner = $1 AND state IN ('assigned', 'building') FOR UPDATE"
    );
    let held: Vec<super::attempts::LockedAttempt> = sqlx::query_as(HELD).bind(worker_id).fetch_all(&mut *tx).await?;
    let failure = super::Failure {
        kind: super::FailureKind::Infrastructure,
        message: format!("Worker {worker_id} unregistered"),
    };
    for locked in &held {
        let build = super::attempts::end_attempt(&mut tx, locked, &failure, settings, now).await?;
        emit::emit_failure(&mut tx, &build, Some(worker_id), &failure, emit::Ended::Unregistered).await?;
    }
    // end_attempt frees a busy worker to idle; an unregistered one stays offline.
    let admin_state: String =
        sqlx::query_scalar("UPDATE workers SET status = 'offline' WHERE id = $1 RETURNING admin_state")
            .bind(worker_id)
            .fetch_one(&mut *tx)
            .await?;
    let data = serde_json::json!({ "state": "offline", "admin_state": admin_state, "reason": "unregistered" });
    emit::emit(&mut tx, "worker.offline", None, Some(worker_id), data).await?;
    tx.commit().await?;
    Ok(held.len() as u64)
}
