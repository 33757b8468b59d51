//! Owner downloads (B7): the result and the source, streamed with `Range` support, or a redirect to
//! a presigned URL.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

use crate::api::AppState;
use crate::api::auth::OwnedBuild;
use crate::api::downloads::{presigned_redirect, stream_object, stream_source};
use crate::api::error::ErrorBody;
use crate::api::error::{ApiError, ApiResult};
use crate::api::group::ApiRouter;
use crate::queue::BuildState;
use crate::storage::Key;
use utoipa_axum::routes;

pub fn router() -> ApiRouter {
    ApiRouter::new()
        .routes(routes!(download_result))
        .routes(routes!(download_result_alias))
        .routes(routes!(download_source))
}

/// B7: the result, to the owner.
#[utoipa::path(get, path = "/api/builds/{id}/download", params(("id" = String, Path, description = "Build id"), ("Range" = Option<String>, Header, description = "`bytes=…`: one range (206)")), responses(
    (status = 200, description = "The result (`<id>.ipa` or `<id>.apk`)", content_type = "application/octet-stream", body = Vec<u8>),
    (status = 206, description = "The requested range", content_type = "application/octet-stream", body = Vec<u8>),
    (status = 302, description = "A presigned URL (`CONTROLLER_PRESIGN_DOWNLOADS` on S3)"),
    (status = 400, description = "`Build not completed`", body = ErrorBody),
    (status = 404, description = "`Build not found` or `Build result not found`", body = ErrorBody)))]
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

/// B7 alias of `/download`.
#[utoipa::path(get, path = "/api/builds/{id}/download/result", params(("id" = String, Path, description = "Build id"), ("Range" = Option<String>, Header, description = "`bytes=…`: one range (206)")), responses(
    (status = 200, description = "The result (`<id>.ipa` or `<id>.apk`)", content_type = "application/octet-stream", body = Vec<u8>),
    (status = 206, description = "The requested range", content_type = "application/octet-stream", body = Vec<u8>),
    (status = 302, description = "A presigned URL (`CONTROLLER_PRESIGN_DOWNLOADS` on S3)"),
    (status = 400, description = "`Build not completed`", body = ErrorBody),
    (status = 404, description = "`Build not found` or `Build result not found`", body = ErrorBody)))]
async fn download_result_alias(state: State<AppState>, headers: HeaderMap, owned: OwnedBuild) -> ApiResult<Response> {
    download_result(state, headers, owned).await
}

/// B7: the source as uploaded, to the owner.
#[utoipa::path(get, path = "/api/builds/{id}/download/source", params(("id" = String, Path, description = "Build id"), ("Range" = Option<String>, Header, description = "`bytes=…`: one range (206)")), responses(
    (status = 200, description = "The source as uploaded (`<id>.zip`)", content_type = "application/zip", body = Vec<u8>),
    (status = 206, description = "The requested range", content_type = "application/zip", body = Vec<u8>),
    (status = 302, description = "A presigned URL (`CONTROLLER_PRESIGN_DOWNLOADS` on S3)"),
    (status = 404, description = "`Build not found` or `Build source not found`", body = ErrorBody)))]
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
