//! Owner downloads (B7): the result and the source, streamed with `Range` support, or a redirect to
//! a presigned URL.

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;

use crate::api::AppState;
use crate::api::auth::OwnedBuild;
use crate::api::downloads::{presigned_redirect, stream_object, stream_source};
use crate::api::error::{ApiError, ApiResult};
use crate::queue::BuildState;
use crate::storage::Key;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/builds/{id}/download", get(download_result))
        .route("/api/builds/{id}/download/result", get(download_result))
        .route("/api/builds/{id}/download/source", get(download_source))
}

/// B7: the result, to the owner.
async fn download_result(
    State(state): State<AppState>,
    headers: HeaderMap,
    OwnedBuild { build, .. }: OwnedBuild,
) -> ApiResult<Response> {
    let id = &build.id;
    if build.state() != BuildState::Completed {
        return Err(ApiError::bad_request("Build not completed"));
    }
    let not_found = || ApiError::not_found("Build result not found");
    let key = build.result_key.as_deref().and_then(Key::parse).ok_or_else(not_found)?;
    if let Some(redirect) = presigned_redirect(&state, &key).await? {
        return Ok(redirect);
    }
    let filename = format!("{id}.{}", build.platform().result_extension());
    stream_object(&state, &key, &headers, "application/octet-stream", &filename, not_found).await
}

/// B7: the source as uploaded, to the owner.
async fn download_source(
    State(state): State<AppState>,
    headers: HeaderMap,
    OwnedBuild { build, .. }: OwnedBuild,
) -> ApiResult<Response> {
    if let Some(key) = build.source_key.as_deref().and_then(Key::parse)
        && let Some(redirect) = presigned_redirect(&state, &key).await?
    {
        return Ok(redirect);
    }
    stream_source(&state, &headers, &build).await
}
