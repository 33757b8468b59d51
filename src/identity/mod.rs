//! Keys with a role (identity.md): who may call what, and who did it.
//!
//! A key's secret is `efa_` + 32 CSPRNG bytes in base64url (256 bits), shown once at creation; the
//! database keeps its SHA-256 and a short display prefix only. The built-in `CONTROLLER_API_KEY` is the
//! admin key named `admin` and is not stored. Look-ups go through a per-instance [`KeyCache`] whose
//! entries live [`CACHE_TTL`] (1 s), so a revocation or expiry is honoured by every instance within 2 s.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use rand::Rng;
use sqlx::PgPool;

use crate::audit::{self, Actor, Change};
use crate::ids;

/// Every key's secret starts with this, so secret scanners can recognise it.
pub const SECRET_PREFIX: &str = "efa_";
/// Longest secret looked up (anything longer cannot be a key).
const MAX_SECRET_LEN: usize = 128;
/// Characters of the secret kept for display (`efa_` + 8).
const DISPLAY_PREFIX_LEN: usize = 12;
/// Longest key name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// How long a cached look-up is trusted.
pub const CACHE_TTL: Duration = Duration::from_secs(1);
/// `last_used_at` is written at most this often per key.
const LAST_USED_DEBOUNCE_SECS: i64 = 60;
/// Default lifetime of an enrollment key.
pub const ENROLL_DEFAULT_SECS: i64 = 24 * 3600;
/// Largest quota accepted.
const MAX_QUOTA: i64 = 1_000_000;
/// Longest lifetime accepted (ten years).
const MAX_EXPIRY_SECS: i64 = 10 * 366 * 24 * 3600;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Worker,
    Submitter,
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Worker, Role::Submitter, Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Submitter => "submitter",
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

/// The least role a route needs (decided per route in `api::group`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No key (health, the API document) or a credential that is not a key (worker token, VM token, OTP).
    NoKey,
    /// A `worker` key (for the workers it registered) or the admin.
    Worker,
    /// A `submitter` key (for its own builds) or the admin.
    Submitter,
    /// A `submitter` key (its own builds only) or a viewer and up: the G0 build list.
    SubmitterOrViewer,
    /// `viewer`, `operator` or `admin`.
    Viewer,
    /// `operator` or `admin`.
    Operator,
    /// `admin` only.
    Admin,
}

impl Access {
    pub const ALL: [Access; 7] = [
        Access::NoKey,
        Access::Worker,
        Access::Submitter,
        Access::SubmitterOrViewer,
        Access::Viewer,
        Access::Operator,
        Access::Admin,
    ];

    /// Whether a key of `role` may call a route needing this.
    pub fn allows(self, role: Role) -> bool {
        use Role::*;
        match self {
            Access::NoKey => true,
            Access::Worker => matches!(role, Worker | Admin),
            Access::Submitter => matches!(role, Submitter | Admin),
            Access::SubmitterOrViewer => matches!(role, Submitter | Viewer | Operator | Admin),
            Access::Viewer => matches!(role, Viewer | Operator | Admin),
            Access::Operator => matches!(role, Operator | Admin),
            Access::Admin => matches!(role, Admin),
        }
    }

    /// The name in the API document (`x-role`).
    pub fn name(self) -> &'static str {
        match self {
            Access::NoKey => "none",
            Access::Worker => "worker",
            Access::Submitter => "submitter",
            Access::SubmitterOrViewer => "submitter_or_viewer",
            Access::Viewer => "viewer",
            Access::Operator => "operator",
            Access::Admin => "admin",
        }
    }
}

/// A stored key (never its secret).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub role: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub weight: i32,
    pub max_running: i32,
    pub max_queued: i32,
    pub enroll: bool,
    pub spent_at: Option<DateTime<Utc>>,
}

impl ApiKey {
    pub fn role(&self) -> Role {
        // The table's CHECK admits only the five names; anything else would be the least role.
        Role::parse(&self.role).unwrap_or(Role::Worker)
    }

    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// Who is calling with an `X-API-Key`.
#[derive(Debug, Clone)]
pub enum Principal {
    /// `CONTROLLER_API_KEY`: the built-in admin key, named `admin`.
    BuiltIn,
    Key(ApiKey),
}

impl Principal {
    pub fn role(&self) -> Role {
        match self {
            Principal::BuiltIn => Role::Admin,
            Principal::Key(key) => key.role(),
        }
    }

    /// The stored key's id; `None` for the built-in key.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Principal::BuiltIn => None,
            Principal::Key(key) => Some(&key.id),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Principal::BuiltIn => "admin",
            Principal::Key(key) => &key.name,
        }
    }

    /// An enrollment key: it may register one worker and nothing else.
    pub fn enrolling(&self) -> bool {
        matches!(self, Principal::Key(key) if key.enroll)
    }
}

/// A fresh secret: `efa_` + 32 random bytes in base64url.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    format!("{SECRET_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Whether a presented value can be a key's secret at all (no database look-up otherwise).
pub fn looks_like_key(presented: &str) -> bool {
    presented.starts_with(SECRET_PREFIX) && presented.len() <= MAX_SECRET_LEN
}

/// Why a key operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Bad input: the message names the problem (400).
    #[error("{0}")]
    Invalid(String),
    #[error("Key not found")]
    NotFound,
    #[error("Key already revoked")]
    AlreadyRevoked,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// What a new key is to be.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: Option<String>,
    pub role: Option<String>,
    pub expires_in_secs: Option<i64>,
    pub weight: Option<i64>,
    pub max_running: Option<i64>,
    pub max_queued: Option<i64>,
    pub enroll: bool,
}

/// A change to a key's name, expiry or quotas.
#[derive(Debug, Clone, Default)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub expires_in_secs: Option<i64>,
    pub weight: Option<i64>,
    pub max_running: Option<i64>,
    pub max_queued: Option<i64>,
}

/// Quota defaults of submitter keys (`CONTROLLER_SUBMITTER_MAX_RUNNING`, `…_MAX_QUEUED`; 0 = unlimited).
#[derive(Debug, Clone, Copy, Default)]
pub struct QuotaDefaults {
    pub max_running: i64,
    pub max_queued: i64,
}

impl QuotaDefaults {
    /// From the environment, for the CLI's database mode (the server reads them through its config).
    pub fn from_env() -> Self {
        let read = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .filter(|v| (0..=MAX_QUOTA).contains(v))
                .unwrap_or(0)
        };
        QuotaDefaults {
            max_running: read("CONTROLLER_SUBMITTER_MAX_RUNNING"),
            max_queued: read("CONTROLLER_SUBMITTER_MAX_QUEUED"),
        }
    }
}

fn check_name(name: &str) -> Result<String, KeyError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(KeyError::Invalid("name required".into()));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(KeyError::Invalid(format!("name longer than {MAX_NAME_BYTES} bytes")));
    }
    if name.chars().any(char::is_control) {
        return Err(KeyError::Invalid("name contains control characters".into()));
    }
    Ok(name.to_string())
}

fn check_expiry(secs: i64, now: DateTime<Utc>) -> Result<DateTime<Utc>, KeyError> {
    if secs <= 0 {
        return Err(KeyError::Invalid(
            "expires_in_secs must be positive (an expiry in the past)".into(),
        ));
    }
    if secs > MAX_EXPIRY_SECS {
        return Err(KeyError::Invalid(format!("expires_in_secs at most {MAX_EXPIRY_SECS}")));
    }
    Ok(now + chrono::Duration::seconds(secs))
}

fn check_weight(weight: i64) -> Result<i32, KeyError> {
    if !(1..=100).contains(&weight) {
        return Err(KeyError::Invalid("weight must be 1–100".into()));
    }
    Ok(weight as i32)
}

fn check_quota(field: &str, value: i64) -> Result<i32, KeyError> {
    if !(0..=MAX_QUOTA).contains(&value) {
        return Err(KeyError::Invalid(format!(
            "{field} must be 0–{MAX_QUOTA} (0 = unlimited)"
        )));
    }
    Ok(value as i32)
}

/// Creates a key; answers it with its secret (shown once).
pub async fn create(
    pool: &PgPool,
    new: &NewKey,
    defaults: QuotaDefaults,
    now: DateTime<Utc>,
    actor: &Actor,
) -> Result<(ApiKey, String), KeyError> {
    let name = check_name(new.name.as_deref().unwrap_or(""))?;
    let role_name = new.role.as_deref().map(str::trim).unwrap_or("");
    let role = Role::parse(role_name).ok_or_else(|| {
        KeyError::Invalid(if role_name.is_empty() {
            "role required (worker, submitter, viewer, operator or admin)".into()
        } else {
            format!(
                "Unknown role '{}' (worker, submitter, viewer, operator or admin)",
                crate::text::scrub(&role_name.chars().take(40).collect::<String>())
            )
        })
    })?;
    if new.enroll && role != Role::Worker {
        return Err(KeyError::Invalid("an enrollment key has the worker role".into()));
    }
    let expires_in = new.expires_in_secs.or(new.enroll.then_some(ENROLL_DEFAULT_SECS));
    let expires_at = expires_in.map(|s| check_expiry(s, now)).transpose()?;
    let weight = check_weight(new.weight.unwrap_or(1))?;
    let max_running = check_quota("max_running", new.max_running.unwrap_or(defaults.max_running))?;
    let max_queued = check_quota("max_queued", new.max_queued.unwrap_or(defaults.max_queued))?;
    let secret = new_secret();
    let prefix: String = secret.chars().take(DISPLAY_PREFIX_LEN).collect();
    let mut tx = pool.begin().await?;
    let key: ApiKey = sqlx::query_as(
        "INSERT INTO api_keys (id, name, role, prefix, secret_hash, created_at, expires_at, weight, max_running,
                               max_queued, enroll)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING *",
    )
    .bind(ids::new_id())
    .bind(&name)
    .bind(role.as_str())
    .bind(&prefix)
    .bind(ids::hash_secret(&secret))
    .bind(now)
    .bind(expires_at)
    .bind(weight)
    .bind(max_running)
    .bind(max_queued)
    .bind(new.enroll)
    .fetch_one(&mut *tx)
    .await?;
    let change = Change::new("key.create", "key", &key.id).after(audit_view(&key));
    audit::record(&mut tx, actor, change).await?;
    tx.commit().await?;
    Ok((key, secret))
}

/// Every key, newest first.
pub async fn list(pool: &PgPool) -> Result<Vec<ApiKey>, KeyError> {
    Ok(
        sqlx::query_as("SELECT * FROM api_keys ORDER BY created_at DESC, id DESC")
            .fetch_all(pool)
            .await?,
    )
}

pub async fn find(pool: &PgPool, id: &str) -> Result<ApiKey, KeyError> {
    if !ids::valid_id(id) {
        return Err(KeyError::NotFound);
    }
    sqlx::query_as("SELECT * FROM api_keys WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?
        .ok_or(KeyError::NotFound)
}

/// Changes a key's name, expiry or quotas (a revoked key cannot be changed: 409).
pub async fn update(
    pool: &PgPool,
    id: &str,
    patch: &KeyPatch,
    now: DateTime<Utc>,
    actor: &Actor,
) -> Result<ApiKey, KeyError> {
    let name = patch.name.as_deref().map(check_name).transpose()?;
    let expires_at = patch.expires_in_secs.map(|s| check_expiry(s, now)).transpose()?;
    let weight = patch.weight.map(check_weight).transpose()?;
    let max_running = patch.max_running.map(|v| check_quota("max_running", v)).transpose()?;
    let max_queued = patch.max_queued.map(|v| check_quota("max_queued", v)).transpose()?;
    let current = find(pool, id).await?;
    if current.revoked_at.is_some() {
        return Err(KeyError::AlreadyRevoked);
    }
    let mut tx = pool.begin().await?;
    let key: Option<ApiKey> = sqlx::query_as(
        "UPDATE api_keys SET name = COALESCE($2, name), expires_at = COALESCE($3, expires_at),
             weight = COALESCE($4, weight), max_running = COALESCE($5, max_running),
             max_queued = COALESCE($6, max_queued)
         WHERE id = $1 AND revoked_at IS NULL RETURNING *",
    )
    .bind(id)
    .bind(name)
    .bind(expires_at)
    .bind(weight)
    .bind(max_running)
    .bind(max_queued)
    .fetch_optional(&mut *tx)
    .await?;
    let key = key.ok_or(KeyError::AlreadyRevoked)?;
    let change = Change::new("key.update", "key", id)
        .before(audit_view(&current))
        .after(audit_view(&key));
    audit::record(&mut tx, actor, change).await?;
    tx.commit().await?;
    Ok(key)
}

/// Revokes a key (409 when it already is).
pub async fn revoke(pool: &PgPool, id: &str, now: DateTime<Utc>, actor: &Actor) -> Result<ApiKey, KeyError> {
    find(pool, id).await?;
    let mut tx = pool.begin().await?;
    let key: Option<ApiKey> =
        sqlx::query_as("UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL RETURNING *")
            .bind(id)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
    let key = key.ok_or(KeyError::AlreadyRevoked)?;
    // Its webhook subscriptions stop with it (what they had queued is no longer delivered either).
    sqlx::query("UPDATE webhook_subscriptions SET active = false WHERE creator_key_id = $1 AND active")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let change = Change::new("key.revoke", "key", id)
        .before(serde_json::json!({ "revoked_at": null }))
        .after(audit_view(&key));
    audit::record(&mut tx, actor, change).await?;
    tx.commit().await?;
    Ok(key)
}

/// What an audit row keeps of a key: never its secret nor the secret's hash.
fn audit_view(key: &ApiKey) -> serde_json::Value {
    serde_json::json!({
        "name": key.name,
        "role": key.role,
        "prefix": key.prefix,
        "expires_at": key.expires_at,
        "weight": key.weight,
        "max_running": key.max_running,
        "max_queued": key.max_queued,
        "enroll": key.enroll,
        "revoked_at": key.revoked_at,
    })
}

/// Marks an enrollment key spent; `false` when it already was (another registration won).
pub async fn spend(pool: &PgPool, id: &str, now: DateTime<Utc>) -> Result<bool, sqlx::Error> {
    let spent = sqlx::query("UPDATE api_keys SET spent_at = $2 WHERE id = $1 AND spent_at IS NULL")
        .bind(id)
        .bind(now)
        .execute(pool)
        .await?;
    Ok(spent.rows_affected() == 1)
}

/// Gives a spent enrollment key back (its registration failed).
pub async fn unspend(pool: &PgPool, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE api_keys SET spent_at = NULL WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// The key's names by id (for views that name who submitted a build).
pub async fn names(pool: &PgPool, key_ids: &[String]) -> Result<HashMap<String, String>, sqlx::Error> {
    if key_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT id, name FROM api_keys WHERE id = ANY($1)")
        .bind(key_ids)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().collect())
}

/// Entries kept at most; past it the cache starts over.
const CACHE_CAPACITY: usize = 10_000;

/// Recent look-ups of keys by the hash of their secret, each trusted for [`CACHE_TTL`].
#[derive(Debug, Default)]
pub struct KeyCache {
    entries: Mutex<HashMap<Vec<u8>, (Instant, ApiKey)>>,
}

impl KeyCache {
    fn get(&self, hash: &[u8]) -> Option<ApiKey> {
        let entries = self.entries.lock().ok()?;
        entries
            .get(hash)
            .filter(|(at, _)| at.elapsed() < CACHE_TTL)
            .map(|(_, key)| key.clone())
    }

    fn put(&self, hash: Vec<u8>, key: &ApiKey) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= CACHE_CAPACITY {
                entries.clear();
            }
            entries.insert(hash, (Instant::now(), key.clone()));
        }
    }

    /// Forgets every entry (after a key changed on this instance).
    pub fn clear(&self) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.clear();
        }
    }
}

/// The stored key whose secret this is (revoked and expired keys included: the caller says why they
/// are refused). Values that cannot be keys are not looked up.
pub async fn lookup(pool: &PgPool, cache: &KeyCache, presented: &str) -> Result<Option<ApiKey>, sqlx::Error> {
    lookup_digest(pool, cache, presented, &ids::secret_digest(presented)).await
}

/// [`lookup`] with the presented value's digest (`ids::secret_digest`) already computed.
pub async fn lookup_digest(
    pool: &PgPool,
    cache: &KeyCache,
    presented: &str,
    digest: &[u8; 32],
) -> Result<Option<ApiKey>, sqlx::Error> {
    if !looks_like_key(presented) {
        return Ok(None);
    }
    if let Some(key) = cache.get(digest) {
        return Ok(Some(key));
    }
    let hash = digest.to_vec();
    let key: Option<ApiKey> = sqlx::query_as("SELECT * FROM api_keys WHERE secret_hash = $1")
        .bind(&hash)
        .fetch_optional(pool)
        .await?;
    let Some(mut key) = key else {
        return Ok(None);
    };
    let now = Utc::now();
    if key
        .last_used_at
        .is_none_or(|at| (now - at).num_seconds() >= LAST_USED_DEBOUNCE_SECS)
    {
        key.last_used_at = Some(now);
        let pool = pool.clone();
        let id = key.id.clone();
        tokio::spawn(async move {
            let _ = sqlx::query("UPDATE api_keys SET last_used_at = $2 WHERE id = $1")
                .bind(id)
                .bind(now)
                .execute(&pool)
                .await;
        });
    }
    cache.put(hash, &key);
    Ok(Some(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_prefixed_and_long() {
        let a = new_secret();
        assert!(a.starts_with("efa_"));
        // 32 bytes in base64url: 43 characters, 256 bits.
        assert_eq!(a.len(), 4 + 43);
        assert_ne!(a, new_secret());
        assert!(looks_like_key(&a));
        assert!(!looks_like_key("not-a-key"));
    }

    #[test]
    fn roles_and_access() {
        assert!(Access::Viewer.allows(Role::Operator));
        assert!(!Access::Viewer.allows(Role::Submitter));
        assert!(!Access::Operator.allows(Role::Viewer));
        assert!(Access::Worker.allows(Role::Admin));
        assert!(!Access::Worker.allows(Role::Operator));
        assert!(Access::SubmitterOrViewer.allows(Role::Submitter));
        assert!(!Access::Admin.allows(Role::Operator));
        assert_eq!(Role::parse("viewer"), Some(Role::Viewer));
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn bad_input_is_named() {
        assert!(check_name(&"x".repeat(257)).is_err());
        assert!(check_name(&"x".repeat(256)).is_ok());
        assert!(check_expiry(0, Utc::now()).is_err());
        assert!(check_weight(0).is_err());
        assert!(check_weight(101).is_err());
        assert!(check_quota("max_queued", -1).is_err());
    }
}
