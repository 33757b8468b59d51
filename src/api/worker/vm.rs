//! Token-era VM endpoints (api.md §4): trade the OTP for a VM token, report readiness, upload the
//! artifact; and `vm-status` for the worker holding the build.

use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};

use super::files::{WorkerQuery, held_build};
use crate::api::auth::{self, BuildCaller, CallerRules, VM_TOKEN};
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{IdPath, JsonBody, QueryParams};
use crate::api::multipart::{MultipartBody, Parts, require_multipart};
use crate::api::results::{self, StagedResult};
use crate::api::{AppState, views};
use crate::ids;
use crate::queue::{self, VmTokenRecord};
use crate::storage::certs;

/// Trading the OTP (in the body) for a VM token.
pub fn otp_router() -> Router<AppState> {
    Router::new().route("/api/builds/{id}/authenticate", post(authenticate))
}

/// The VM's own calls (its `X-VM-Token`).
pub fn vm_router() -> Router<AppState> {
    Router::new().route("/api/builds/{id}/vm-ready", post(vm_ready)).route(
        "/api/builds/{id}/artifact",
        post(artifact).layer(DefaultBodyLimit::disable()),
    )
}

/// The worker asking about its VM (build-scoped worker credential).
pub fn status_router() -> Router<AppState> {
    Router::new().route("/api/builds/{id}/vm-status", get(vm_status))
}

#[derive(Deserialize)]
struct AuthenticateBody {
    otp: Option<String>,
}

/// Trades the attempt's one-time password for a VM token (single use).
async fn authenticate(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<AuthenticateBody>,
) -> ApiResult<Json<Value>> {
    let otp = body
        .otp
        .filter(|o| !o.is_empty())
        .ok_or_else(|| ApiError::bad_request("otp required"))?;
    let token = ids::new_secret();
    let record = VmTokenRecord {
        hash: ids::hash_secret(&token),
        sealed: certs::encrypt(&state.secrets.certs_key, token.as_bytes()),
    };
    let now = Utc::now();
    let expires = queue::authenticate_vm(
        &state.pool,
        &id,
        &ids::hash_secret(&otp),
        &record,
        &state.config.queue,
        now,
    )
    .await?
    .ok_or_else(|| ApiError::unauthorized("Invalid or expired OTP"))?;
    Ok(Json(
        json!({ "vm_token": token, "expires_at": expires.timestamp_millis() }),
    ))
}

/// The caller of a VM-only endpoint (the group's layer required an `X-VM-Token`).
async fn vm_caller(state: &AppState, headers: &HeaderMap, id: &str) -> ApiResult<BuildCaller> {
    auth::build_caller(state, headers, id, None, CallerRules::default()).await
}

/// Records that the VM booted; counts as a heartbeat.
async fn vm_ready(State(state): State<AppState>, headers: HeaderMap, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    let caller = vm_caller(&state, &headers, &id).await?;
    let ready = queue::mark_vm_ready(&state.pool, &id, caller.holder(), &state.config.queue, Utc::now()).await?;
    Ok(Json(
        json!({ "success": true, "vm_ready_at": ready.timestamp_millis() }),
    ))
}

/// For the worker holding the build: whether its VM is ready, and the VM token when it is.
async fn vm_status(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    QueryParams(q): QueryParams<WorkerQuery>,
) -> ApiResult<Json<Value>> {
    if auth::header(&headers, VM_TOKEN).is_some() {
        return Err(ApiError::forbidden("Worker not authorized for this build"));
    }
    let caller = auth::build_caller(&state, &headers, &id, q.worker_id.as_deref(), CallerRules::default()).await?;
    let build = held_build(&state, &id, &caller).await?;
    let token = build
        .vm_token_sealed
        .as_deref()
        .and_then(|sealed| certs::decrypt(&state.secrets.certs_key, sealed));
    match (build.vm_ready_at, token) {
        (Some(ready), Some(token)) => Ok(Json(json!({
            "vm_ready": true,
            "vm_token": String::from_utf8_lossy(&token),
            "vm_ready_at": views::ms(Some(ready)),
        }))),
        _ => Ok(Json(json!({ "vm_ready": false }))),
    }
}

/// The VM uploads the result (`artifact` part) and completes its attempt.
async fn artifact(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    body: MultipartBody,
) -> ApiResult<Json<Value>> {
    let caller = vm_caller(&state, &headers, &id).await?;
    let multipart = require_multipart(body)?;
    let mut parts = Parts::new(multipart);
    let mut staged: Option<StagedResult> = None;
    let read = async {
        while let Some(field) = parts.next().await? {
            if field.name() == Some("artifact") && staged.is_none() {
                staged = Some(results::stage(&state, field).await?);
            }
        }
        Ok::<(), ApiError>(())
    }
    .await;
    if let Err(e) = read {
        results::discard(&state, staged).await;
        return Err(e);
    }
    let staged = staged.ok_or_else(|| ApiError::bad_request("No artifact file provided"))?;
    results::complete_with(&state, &id, &caller, staged)
        .await
        .map_err(ApiError::from)?;
    Ok(Json(json!({ "success": true })))
}
