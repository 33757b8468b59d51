//! `/api/v2/keys`: keys with a role (identity.md), for the admin (the role table in `api::group` says
//! so). The secret is answered once, by `POST`; the work is in `ops::keys`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use crate::api::error::{ApiResult, CodedError};
use crate::api::extract::{IdPath, JsonBody};
use crate::api::group::ApiRouter;
use crate::api::{AppState, operations};
use crate::identity::QuotaDefaults;
use crate::ops::keys::{CreatedKey, KeyPage, KeyRequest, KeyUpdate, KeyView};
use utoipa_axum::routes;

pub fn router() -> ApiRouter {
    ApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, update, revoke))
}

/// Every key, newest first (never their secrets).
#[utoipa::path(get, path = "/api/v2/keys", responses(
    (status = 200, description = "Every key, newest first", body = KeyPage)))]
async fn list(State(state): State<AppState>) -> ApiResult<Json<KeyPage>> {
    Ok(Json(operations::keys::list_keys(&state.pool).await?))
}

/// Creates a key; the answer carries its secret, shown this once.
#[utoipa::path(post, path = "/api/v2/keys", request_body = KeyRequest, responses(
    (status = 201, description = "Created, with the secret (shown once)", body = CreatedKey),
    (status = 400, description = "Unknown role, name missing or over 256 bytes, expiry in the past, weight outside 1–100, …", body = CodedError)))]
async fn create(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<KeyRequest>,
) -> ApiResult<(StatusCode, Json<CreatedKey>)> {
    let defaults = QuotaDefaults {
        max_running: state.config.submitter_max_running,
        max_queued: state.config.submitter_max_queued,
    };
    let created = operations::keys::create_key(&state.pool, &body, defaults).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// One key.
#[utoipa::path(get, path = "/api/v2/keys/{id}", params(("id" = String, Path, description = "Key id")), responses(
    (status = 200, description = "The key", body = KeyView),
    (status = 404, description = "`Key not found`", body = CodedError)))]
async fn show(State(state): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<KeyView>> {
    Ok(Json(operations::keys::show_key(&state.pool, &id).await?))
}

/// Changes a key's name, expiry (from now), weight or quotas.
#[utoipa::path(patch, path = "/api/v2/keys/{id}", params(("id" = String, Path, description = "Key id")), request_body = KeyUpdate, responses(
    (status = 200, description = "Changed", body = KeyView),
    (status = 400, description = "A field out of bounds", body = CodedError),
    (status = 404, description = "`Key not found`", body = CodedError),
    (status = 409, description = "`Key already revoked`", body = CodedError)))]
async fn update(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<KeyUpdate>,
) -> ApiResult<Json<KeyView>> {
    let key = operations::keys::update_key(&state.pool, &id, &body).await?;
    state.keys.clear();
    Ok(Json(key))
}

/// Revokes a key: refused on every instance within 2 s (at once on this one).
#[utoipa::path(delete, path = "/api/v2/keys/{id}", params(("id" = String, Path, description = "Key id")), responses(
    (status = 204, description = "Revoked"),
    (status = 404, description = "`Key not found`", body = CodedError),
    (status = 409, description = "`Key already revoked`", body = CodedError)))]
async fn revoke(State(state): State<AppState>, IdPath(id): IdPath) -> ApiResult<StatusCode> {
    operations::keys::revoke_key(&state.pool, &id).await?;
    state.keys.clear();
    Ok(StatusCode::NO_CONTENT)
}
