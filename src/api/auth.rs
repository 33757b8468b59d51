//! Credentials (api.md §2): the admin key, build access tokens, worker tokens and VM tokens.
//! Secrets are compared as fixed-length digests in constant time (R6) and stored only as hashes.

use axum::http::HeaderMap;
use chrono::Utc;

use super::AppState;
use super::error::{ApiError, ApiResult};
use crate::ids::{hash_secret, secret_matches, valid_id};
use crate::queue::{Build, Worker};

pub const API_KEY: &str = "x-api-key";
pub const BUILD_TOKEN: &str = "x-build-token";
pub const WORKER_TOKEN: &str = "x-worker-token";
pub const WORKER_ID: &str = "x-worker-id";
pub const VM_TOKEN: &str = "x-vm-token";

pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Requires the admin key: 401 when missing, 403 when wrong.
pub fn require_admin(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    match header(headers, API_KEY) {
        None => Err(ApiError::unauthorized("Missing X-API-Key header")),
        Some(key) if secret_matches(key, &state.secrets.api_key) => Ok(()),
        Some(_) => Err(ApiError::forbidden("Invalid API key")),
    }
}

/// Whether a (correct) admin key was presented; a wrong one is 403.
pub fn admin_if_present(state: &AppState, headers: &HeaderMap) -> ApiResult<bool> {
    match header(headers, API_KEY) {
        None => Ok(false),
        Some(_) => require_admin(state, headers).map(|()| true),
    }
}

/// A validated worker id from a header, query or form field; malformed ids are 400.
pub fn worker_id(value: Option<&str>) -> ApiResult<Option<String>> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(id) if valid_id(id) => Ok(Some(id.to_string())),
        Some(_) => Err(ApiError::bad_request("Invalid worker id")),
    }
}

/// The worker owning an unexpired, unrevoked token.
pub async fn worker_by_token(state: &AppState, token: &str) -> ApiResult<Worker> {
    let worker: Option<Worker> = sqlx::query_as(
        "SELECT * FROM workers WHERE token_hash = $1 AND token_expires_at > $2 AND admin_state <> 'revoked'",
    )
    .bind(hash_secret(token))
    .bind(Utc::now())
    .fetch_optional(&state.pool)
    .await?;
    worker.ok_or_else(|| ApiError::unauthorized("Invalid or expired worker token"))
}

/// Owner endpoints: the admin key, or this build's access token alone (R34).
pub fn require_owner(state: &AppState, headers: &HeaderMap, build: &Build) -> ApiResult<()> {
    if admin_if_present(state, headers)? {
        return Ok(());
    }
    let Some(token) = header(headers, BUILD_TOKEN) else {
        return Err(ApiError::unauthorized("Missing X-API-Key or X-Build-Token header"));
    };
    let presented = hash_secret(token);
    match &build.access_token_hash {
        Some(expected) if subtle::ConstantTimeEq::ct_eq(presented.as_slice(), expected.as_slice()).into() => Ok(()),
        _ => Err(ApiError::forbidden("Invalid or expired build token")),
    }
}

/// Rejects owner requests that carry no credential at all before the build is looked up.
pub fn require_owner_credential(headers: &HeaderMap) -> ApiResult<()> {
    if header(headers, API_KEY).is_none() && header(headers, BUILD_TOKEN).is_none() {
        return Err(ApiError::unauthorized("Missing X-API-Key or X-Build-Token header"));
    }
    Ok(())
}

/// Who is calling a build-scoped worker endpoint, resolved from one of the accepted credentials.
#[derive(Debug, Clone)]
pub struct BuildCaller {
    pub worker_id: String,
    /// Present when the credential is scoped to one attempt (VM token).
    pub lease_token: Option<i64>,
}

impl BuildCaller {
    pub fn holder(&self) -> crate::queue::Holder<'_> {
        crate::queue::Holder {
            worker_id: &self.worker_id,
            lease_token: self.lease_token,
        }
    }

    /// Whether this caller holds the build's current attempt.
    pub fn holds(&self, build: &Build) -> bool {
        build.state().is_held()
            && build.lease_owner.as_deref() == Some(self.worker_id.as_str())
            && self.lease_token.is_none_or(|t| build.lease_token == Some(t))
    }
}

/// Resolves a build-scoped worker credential (api.md §2, forms 1–3): a VM token of this build's
/// current attempt, a worker token, or the admin key with a worker id (header, or `fallback_worker_id`
/// from the query or form).
pub async fn build_caller(
    state: &AppState,
    headers: &HeaderMap,
    build_id: &str,
    fallback_worker_id: Option<&str>,
) -> ApiResult<BuildCaller> {
    if let Some(vm_token) = header(headers, VM_TOKEN) {
        let held: Option<(String, i64)> = sqlx::query_as(
            "SELECT lease_owner, lease_token FROM builds
             WHERE id = $1 AND vm_token_hash = $2 AND vm_token_expires_at > $3 AND state IN ('assigned', 'building')",
        )
        .bind(build_id)
        .bind(hash_secret(vm_token))
        .bind(Utc::now())
        .fetch_optional(&state.pool)
        .await?;
        let (worker_id, lease_token) = held.ok_or_else(|| ApiError::unauthorized("Invalid or expired VM token"))?;
        return Ok(BuildCaller {
            worker_id,
            lease_token: Some(lease_token),
        });
    }
    if let Some(token) = header(headers, WORKER_TOKEN) {
        let worker = worker_by_token(state, token).await?;
        return Ok(BuildCaller {
            worker_id: worker.id,
            lease_token: None,
        });
    }
    require_admin(state, headers)?;
    let id = worker_id(header(headers, WORKER_ID))?.or(worker_id(fallback_worker_id)?);
    let worker_id = id.ok_or_else(|| ApiError::unauthorized("Missing X-Worker-Id header"))?;
    Ok(BuildCaller {
        worker_id,
        lease_token: None,
    })
}
