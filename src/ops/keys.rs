//! Key management (identity.md), shared by `/api/v2/keys` and `expo-controller keys` in database mode:
//! the same views, the same refusals. A key's secret appears only in [`CreatedKey`], once.

use chrono::Utc;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;

use super::views::iso;
use super::{OpError, OpResult};
use crate::identity::{self, ApiKey, KeyError, KeyPatch, NewKey, QuotaDefaults};
use crate::queue::QueueError;

/// A key as listed and shown (never its secret).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyView {
    pub id: String,
    pub name: String,
    /// `worker`, `submitter`, `viewer`, `operator` or `admin`.
    pub role: String,
    /// The secret's first characters (`efa_` + 8), to recognise it.
    pub prefix: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    /// Fair-share weight, 1–100.
    pub weight: i32,
    /// Builds running at once (0 = unlimited).
    pub max_running: i32,
    /// Builds queued at once (0 = unlimited).
    pub max_queued: i32,
    /// An enrollment key: registers exactly one worker.
    pub enroll: bool,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

/// A key just created, with its secret (shown this once).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedKey {
    pub id: String,
    /// The secret (`efa_…`): shown once, never again.
    pub key: String,
    pub name: String,
    pub role: String,
    pub prefix: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub weight: i32,
    pub max_running: i32,
    pub max_queued: i32,
    pub enroll: bool,
}

/// Every key, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyPage {
    pub items: Vec<KeyView>,
}

/// `POST /api/v2/keys`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// Who holds it (at most 256 bytes).
    pub name: Option<String>,
    /// `worker`, `submitter`, `viewer`, `operator` or `admin`.
    pub role: Option<String>,
    /// Lifetime in seconds (enrollment keys: 24 h unless given).
    pub expires_in_secs: Option<i64>,
    /// 1–100 (default 1).
    pub weight: Option<i64>,
    /// 0 = unlimited (default `CONTROLLER_SUBMITTER_MAX_RUNNING`).
    pub max_running: Option<i64>,
    /// 0 = unlimited (default `CONTROLLER_SUBMITTER_MAX_QUEUED`).
    pub max_queued: Option<i64>,
    /// An enrollment key (role `worker`): registers exactly one worker.
    pub enroll: Option<bool>,
}

/// `PATCH /api/v2/keys/{id}`: any of the fields.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyUpdate {
    pub name: Option<String>,
    /// A new lifetime from now, in seconds.
    pub expires_in_secs: Option<i64>,
    pub weight: Option<i64>,
    pub max_running: Option<i64>,
    pub max_queued: Option<i64>,
}

impl From<KeyError> for OpError {
    fn from(error: KeyError) -> Self {
        match error {
            KeyError::Invalid(message) => OpError::bad_request(message),
            KeyError::NotFound => OpError::refused(404, "Key not found", "key_not_found"),
            KeyError::AlreadyRevoked => OpError::refused(409, "Key already revoked", "conflict"),
            KeyError::Db(e) => OpError::Queue(QueueError::Db(e)),
        }
    }
}

pub fn view(key: &ApiKey) -> KeyView {
    KeyView {
        id: key.id.clone(),
        name: key.name.clone(),
        role: key.role.clone(),
        prefix: key.prefix.clone(),
        created_at: iso(key.created_at),
        expires_at: key.expires_at.map(iso),
        weight: key.weight,
        max_running: key.max_running,
        max_queued: key.max_queued,
        enroll: key.enroll,
        last_used_at: key.last_used_at.map(iso),
        revoked_at: key.revoked_at.map(iso),
    }
}

pub async fn create_key(pool: &PgPool, request: &KeyRequest, defaults: QuotaDefaults) -> OpResult<CreatedKey> {
    let new = NewKey {
        name: request.name.clone(),
        role: request.role.clone(),
        expires_in_secs: request.expires_in_secs,
        weight: request.weight,
        max_running: request.max_running,
        max_queued: request.max_queued,
        enroll: request.enroll.unwrap_or(false),
    };
    let (key, secret) = identity::create(pool, &new, defaults, Utc::now()).await?;
    Ok(CreatedKey {
        id: key.id,
        key: secret,
        name: key.name,
        role: key.role,
        prefix: key.prefix,
        created_at: iso(key.created_at),
        expires_at: key.expires_at.map(iso),
        weight: key.weight,
        max_running: key.max_running,
        max_queued: key.max_queued,
        enroll: key.enroll,
    })
}

pub async fn list_keys(pool: &PgPool) -> OpResult<KeyPage> {
    let keys = identity::list(pool).await?;
    Ok(KeyPage {
        items: keys.iter().map(view).collect(),
    })
}

pub async fn show_key(pool: &PgPool, id: &str) -> OpResult<KeyView> {
    Ok(view(&identity::find(pool, id).await?))
}

pub async fn update_key(pool: &PgPool, id: &str, update: &KeyUpdate) -> OpResult<KeyView> {
    let patch = KeyPatch {
        name: update.name.clone(),
        expires_in_secs: update.expires_in_secs,
        weight: update.weight,
        max_running: update.max_running,
        max_queued: update.max_queued,
    };
    Ok(view(&identity::update(pool, id, &patch, Utc::now()).await?))
}

pub async fn revoke_key(pool: &PgPool, id: &str) -> OpResult<KeyView> {
    Ok(view(&identity::revoke(pool, id, Utc::now()).await?))
}
