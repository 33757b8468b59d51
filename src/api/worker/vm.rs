//! Token-era VM endpoints (api.md §4): trade the OTP for a VM token, report readiness, upload the
//! artifact; and `vm-status` for the worker holding the build.

use axum::Json;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use chrono::Utc;
use serde::Deserialize;

use super::files::{WorkerQuery, held_build};
use super::schema::{ArtifactForm, AuthenticateRequest, Success, VmReady, VmStatus, VmToken};
use crate::api::AppState;
use crate::api::auth::{self, BuildCaller, CallerRules, VM_TOKEN};
use crate::api::error::ErrorBody;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{IdPath, JsonBody, QueryParams};
use crate::api::group::ApiRouter;
use crate::api::multipart::{MultipartBody, Parts, require_multipart};
use crate::api::results::{self, StagedResult};
use crate::ids;
use crate::queue::{self, VmTokenRecord};
use crate::storage::certs;
use utoipa_axum::routes;

/// Trading the OTP (in the body) for a VM token. Anyone may call it, so its body is read only up to
/// 4 KiB (`{"otp": …}` is some 60 bytes).
pub fn otp_router() -> ApiRouter {
    ApiRouter::new()
        .routes(routes!(authenticate))
        .layer(DefaultBodyLimit::max(OTP_BODY_LIMIT))
}

const OTP_BODY_LIMIT: usize = 4 * 1024;

/// The VM's own calls (its `X-VM-Token`); the artifact is bounded by the result limit.
pub fn vm_router() -> ApiRouter {
    ApiRouter::new()
        .routes(routes!(artifact))
        .layer(DefaultBodyLimit::disable())
        .routes(routes!(vm_ready))
}

/// The worker asking about its VM (build-scoped worker credential).
pub fn status_router() -> ApiRouter {
    ApiRouter::new().routes(routes!(vm_status))
}

#[derive(Deserialize)]
struct AuthenticateBody {
    otp: Option<String>,
}

/// Trades the attempt's one-time password for a VM token (single use).
#[utoipa::path(post, path = "/api/builds/{id}/authenticate", params(("id" = String, Path, description = "Build id")), request_body = AuthenticateRequest, responses(
    (status = 200, description = "The OTP is consumed; a VM token for this attempt", body = VmToken),
    (status = 400, description = "`otp required`", body = ErrorBody),
    (status = 401, description = "`Invalid or expired OTP`", body = ErrorBody)))]
async fn authenticate(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<AuthenticateBody>,
) -> ApiResult<Json<VmToken>> {
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
    Ok(Json(VmToken {
        vm_token: token,
        expires_at: expires.timestamp_millis(),
    }))
}

/// The caller of a VM-only endpoint (the group's layer required an `X-VM-Token`).
async fn vm_caller(state: &AppState, headers: &HeaderMap, id: &str) -> ApiResult<BuildCaller> {
    auth::build_caller(state, headers, id, None, CallerRules::default()).await
}

/// Records that the VM booted; counts as a heartbeat.
#[utoipa::path(post, path = "/api/builds/{id}/vm-ready", params(("id" = String, Path, description = "Build id")), responses(
    (status = 200, description = "Recorded; counts as a heartbeat", body = VmReady),
    (status = 403, description = "`Worker not authorized for this build`, `Invalid API key`", body = ErrorBody),
    (status = 404, description = "`Build not found`", body = ErrorBody),
    (status = 409, description = "`Build attempt is no longer active`", body = ErrorBody)))]
async fn vm_ready(State(state): State<AppState>, headers: HeaderMap, IdPath(id): IdPath) -> ApiResult<Json<VmReady>> {
    let caller = vm_caller(&state, &headers, &id).await?;
    let ready = queue::mark_vm_ready(&state.pool, &id, caller.holder(), &state.config.queue, Utc::now()).await?;
    Ok(Json(VmReady {
        success: true,
        vm_ready_at: ready.timestamp_millis(),
    }))
}

/// For the worker holding the build: whether its VM is ready, and the VM token when it is.
#[utoipa::path(get, path = "/api/builds/{id}/vm-status", params(("id" = String, Path, description = "Build id"), ("worker_id" = Option<String>, Query, description = "With the admin key: the worker holding the build (or header `X-Worker-Id`)")), responses(
    (status = 200, description = "Whether the VM is ready (with its token when it is)", body = VmStatus),
    (status = 403, description = "`Worker not authorized for this build`, `Invalid API key`", body = ErrorBody),
    (status = 404, description = "`Build not found`", body = ErrorBody),
    (status = 409, description = "`Build attempt is no longer active`", body = ErrorBody)))]
async fn vm_status(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    QueryParams(q): QueryParams<WorkerQuery>,
) -> ApiResult<Json<VmStatus>> {
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
        (Some(ready), Some(token)) => Ok(Json(VmStatus {
            vm_ready: true,
            vm_token: Some(String::from_utf8_lossy(&token).into_owned()),
            vm_ready_at: Some(ready.timestamp_millis()),
        })),
        _ => Ok(Json(VmStatus {
            vm_ready: false,
            vm_token: None,
            vm_ready_at: None,
        })),
    }
}

/// The VM uploads the result (`artifact` part) and completes its attempt.
#[utoipa::path(post, path = "/api/builds/{id}/artifact", params(("id" = String, Path, description = "Build id")), request_body(content = ArtifactForm, content_type = "multipart/form-data"), responses(
    (status = 200, description = "Stored; the attempt is completed", body = Success),
    (status = 400, description = "`No artifact file provided`", body = ErrorBody),
    (status = 413, description = "`Result file too large`", body = ErrorBody),
    (status = 403, description = "`Worker not authorized for this build`, `Invalid API key`", body = ErrorBody),
    (status = 404, description = "`Build not found`", body = ErrorBody),
    (status = 409, description = "`Build attempt is no longer active`", body = ErrorBody)))]
async fn artifact(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    body: MultipartBody,
) -> ApiResult<Json<Success>> {
    let caller = vm_caller(&state, &headers, &id).await?;
    let multipart = require_multipart(body)?;
    let mut parts = Parts::new(multipart);
    let mut staged: Option<StagedResult> = None;
    let read = async {
        while let Some(field) = parts.next().await? {
            if field.name() == Some("artifact") && staged.is_none() {
                // The build is the path's: straight to its final key once the caller is found to hold it.
                staged = Some(results::stream_held(&state, &id, &caller, field).await?);
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
    Ok(Json(Success { success: true }))
}
