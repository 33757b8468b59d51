//! What the worker holding a build downloads: the source (B8) and the certificates (B9, B10).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use super::schema::SecureCerts;
use crate::api::AppState;
use crate::api::auth::{self, BuildCaller, CallerRules};
use crate::api::downloads::{set_attachment, stream_source};
use crate::api::error::ErrorBody;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{IdPath, QueryParams};
use crate::api::group::ApiRouter;
use crate::ids;
use crate::queue::{self, Build};
use crate::storage::{Key, bundle, certs};
use utoipa_axum::routes;

pub fn router() -> ApiRouter {
    ApiRouter::new()
        .routes(routes!(source))
        .routes(routes!(certs_zip))
        .routes(routes!(certs_secure))
}

/// `?worker_id=` on build-scoped worker endpoints.
#[derive(Deserialize)]
pub(crate) struct WorkerQuery {
    pub worker_id: Option<String>,
}

/// The build, if `caller` holds its current attempt; 404 / 403 otherwise.
pub(crate) async fn held_build(state: &AppState, id: &str, caller: &BuildCaller) -> ApiResult<Build> {
    let build = queue::find_build(&state.pool, id)
        .await?
        .ok_or_else(ApiError::build_not_found)?;
    if caller.holds(&build) {
        Ok(build)
    } else {
        Err(ApiError::not_authorized_for_build())
    }
}

/// [`held_build`] for what does not change while the attempt runs (its source and certs keys): a build
/// this instance handed the caller's worker moments ago is checked against the claimed row it keeps
/// ([`crate::api::worker_cache::WorkerCache::handed`]), without a read; anyone else against the database.
async fn handed_build(state: &AppState, id: &str, caller: &BuildCaller) -> ApiResult<Arc<Build>> {
    if let Some(build) = state.workers.handed(&caller.worker_id, id).filter(|b| caller.holds(b)) {
        return Ok(build);
    }
    held_build(state, id, caller).await.map(Arc::new)
}

/// B8: the source archive, only for the holder of the current attempt.
#[utoipa::path(get, path = "/api/builds/{id}/source", params(("id" = String, Path, description = "Build id"), ("worker_id" = Option<String>, Query, description = "With the admin key: the worker holding the build (or header `X-Worker-Id`)")), responses(
    (status = 200, description = "The source as uploaded (`<id>.zip`)", content_type = "application/zip", body = Vec<u8>),
    (status = 403, description = "`Worker not authorized for this build`, `Invalid API key`", body = ErrorBody),
    (status = 404, description = "`Build not found`", body = ErrorBody),
    (status = 409, description = "`Build attempt is no longer active`", body = ErrorBody)))]
async fn source(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    QueryParams(q): QueryParams<WorkerQuery>,
) -> ApiResult<Response> {
    let caller = auth::build_caller(&state, &headers, &id, q.worker_id.as_deref(), CallerRules::default()).await?;
    let build = handed_build(&state, &id, &caller).await?;
    stream_source(&state, &headers, &build).await
}

/// The decrypted certs bundle of a held build.
async fn held_certs(state: &AppState, headers: &HeaderMap, id: &str, worker_hint: Option<&str>) -> ApiResult<Vec<u8>> {
    let caller = auth::build_caller(state, headers, id, worker_hint, CallerRules::default()).await?;
    let build = handed_build(state, id, &caller).await?;
    let not_found = || ApiError::not_found("Certs not found");
    let key = build.certs_key.as_deref().and_then(Key::parse).ok_or_else(not_found)?;
    let sealed = match state.storage.read_all(&key).await {
        Ok(bytes) => bytes,
        Err(object_store::Error::NotFound { .. }) => return Err(not_found()),
        Err(e) => return Err(e.into()),
    };
    certs::decrypt(&state.secrets.certs_key, &sealed).ok_or_else(|| {
        ApiError::internal(anyhow::anyhow!(
            "certs bundle of {id} does not decrypt with the configured key"
        ))
    })
}

/// B9: the decrypted bundle as a zip.
#[utoipa::path(get, path = "/api/builds/{id}/certs", params(("id" = String, Path, description = "Build id"), ("worker_id" = Option<String>, Query, description = "With the admin key: the worker holding the build (or header `X-Worker-Id`)")), responses(
    (status = 200, description = "The decrypted bundle (`<id>-certs.zip`)", content_type = "application/zip", body = Vec<u8>),
    (status = 404, description = "`Build not found` or `Certs not found`", body = ErrorBody),
    (status = 403, description = "`Worker not authorized for this build`", body = ErrorBody)))]
async fn certs_zip(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    QueryParams(q): QueryParams<WorkerQuery>,
) -> ApiResult<Response> {
    let bundle = held_certs(&state, &headers, &id, q.worker_id.as_deref()).await?;
    let mut response = bundle.into_response();
    set_attachment(response.headers_mut(), "application/zip", &format!("{id}-certs.zip"));
    Ok(response)
}

/// B10: the certificate, its password, a fresh keychain password and the provisioning profiles.
#[utoipa::path(get, path = "/api/builds/{id}/certs-secure", params(("id" = String, Path, description = "Build id"), ("worker_id" = Option<String>, Query, description = "With the admin key: the worker holding the build (or header `X-Worker-Id`)"),
    ("X-Build-Id" = Option<String>, Header, description = "G0: must equal the path's id")), responses(
    (status = 200, description = "Certificate, password, a fresh keychain password, profiles", body = SecureCerts),
    (status = 404, description = "`Build not found` or `Certs not found`", body = ErrorBody),
    (status = 403, description = "`Worker not authorized for this build`", body = ErrorBody),
    (status = 422, description = "`Invalid certs bundle`", body = ErrorBody)))]
async fn certs_secure(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    QueryParams(q): QueryParams<WorkerQuery>,
) -> ApiResult<Json<SecureCerts>> {
    if auth::header(&headers, "x-build-id").is_some_and(|named| named != id) {
        return Err(ApiError::not_authorized_for_build());
    }
    let bundle = held_certs(&state, &headers, &id, q.worker_id.as_deref()).await?;
    let certs = bundle::read_certs(&bundle)
        .map_err(|_| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid certs bundle"))?;
    Ok(Json(SecureCerts {
        p12: STANDARD.encode(&certs.p12),
        p12_password: certs.password,
        keychain_password: ids::new_secret(),
        provisioning_profiles: certs.profiles.iter().map(|p| STANDARD.encode(p)).collect(),
    }))
}
