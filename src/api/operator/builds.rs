//! `/api/v2/builds`: listing with filters and cursors, detail, attempts, and the operator actions
//! (behind the admin key of the operator group; the work is in `ops`).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::schema;
use super::views::{self, etagged};
use crate::api::error::CodedError;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{IdPath, JsonBody, NoParams, QueryParams, bounded_int};
use crate::api::group::ApiRouter;
use crate::api::{AppState, operations};
use crate::audit::Actor;
use crate::queue;
use crate::queue::operator::{self, WrongState};
use utoipa::IntoParams;
use utoipa_axum::routes;

pub fn router() -> ApiRouter {
    ApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(show, patch, delete))
        .routes(routes!(attempts))
        .routes(routes!(cancel))
        .routes(routes!(retry))
        .routes(routes!(requeue))
        .routes(routes!(revoke_token))
}

fn conflict(wrong: WrongState) -> ApiError {
    ApiError::conflict(wrong.0)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    platform: Option<String>,
    queue: Option<String>,
    worker: Option<String>,
    since: Option<String>,
    cursor: Option<String>,
    limit: Option<String>,
}

/// Builds, newest first: `{"items": [...], "next_cursor": <id or null>}`.
#[utoipa::path(get, path = "/api/v2/builds", params(ListQuery), responses(
    (status = 200, description = "Builds, newest first (`ETag`; 304 with `If-None-Match`)", body = schema::BuildPage),
    (status = 400, description = "A filter that does not parse", body = CodedError)))]
async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    QueryParams(q): QueryParams<ListQuery>,
) -> ApiResult<Response> {
    let limit = bounded_int(q.limit.as_deref(), "limit", 1, 500)?.unwrap_or(50);
    let platform = q.platform.as_deref().or(q.queue.as_deref());
    let mut filter = operations::build_filter(
        q.state.as_deref(),
        platform,
        q.worker.as_deref(),
        q.cursor.as_deref(),
        limit,
    )?;
    filter.since = match q.since.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(
            DateTime::parse_from_rfc3339(raw)
                .map_err(|_| ApiError::bad_request("Invalid since: must be an RFC 3339 time"))?
                .with_timezone(&Utc),
        ),
    };
    Ok(etagged(&headers, operations::list_builds(&state.pool, filter).await?))
}

/// One build with every job column and its attempts.
#[utoipa::path(get, path = "/api/v2/builds/{id}", params(("id" = String, Path, description = "Build id")), responses(
    (status = 200, description = "The build with its attempts (`ETag`)", body = schema::BuildDetail),
    (status = 404, description = "`Build not found`", body = CodedError)))]
async fn show(State(state): State<AppState>, headers: HeaderMap, IdPath(id): IdPath) -> ApiResult<Response> {
    Ok(etagged(&headers, operations::show_build(&state.pool, &id).await?))
}

/// Every attempt of a build: who ran it, when, how it ended.
#[utoipa::path(get, path = "/api/v2/builds/{id}/attempts", params(("id" = String, Path, description = "Build id")), responses(
    (status = 200, description = "Every attempt (`ETag`)", body = schema::AttemptPage),
    (status = 404, description = "`Build not found`", body = CodedError)))]
async fn attempts(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    _: QueryParams<NoParams>,
) -> ApiResult<Response> {
    queue::find_build(&state.pool, &id)
        .await?
        .ok_or_else(ApiError::build_not_found)?;
    let attempts = operator::attempts_of(&state.pool, &id).await?;
    Ok(etagged(
        &headers,
        json!(schema::AttemptPage {
            items: attempts.iter().map(views::attempt).collect(),
            next_cursor: None,
        }),
    ))
}

/// Cancels a build; a running attempt is told at its next call.
#[utoipa::path(post, path = "/api/v2/builds/{id}/cancel", params(("id" = String, Path, description = "Build id")), responses(
    (status = 200, description = "Cancelled", body = schema::Build),
    (status = 409, description = "`Build already finished`", body = CodedError)))]
async fn cancel(State(state): State<AppState>, IdPath(id): IdPath, actor: Actor) -> ApiResult<Json<Value>> {
    let build = operations::cancel_build(&state.pool, &id, &actor).await?;
    state.attempt_changed(&id);
    Ok(Json(build))
}

/// Re-runs the same build (failed or cancelled) as a new attempt.
#[utoipa::path(post, path = "/api/v2/builds/{id}/retry", params(("id" = String, Path, description = "Build id")), responses(
    (status = 200, description = "The same build, pending again for a new attempt", body = schema::Build),
    (status = 409, description = "Not failed or cancelled", body = CodedError)))]
async fn retry(State(state): State<AppState>, IdPath(id): IdPath, actor: Actor) -> ApiResult<Json<schema::Build>> {
    let build = operations::retry(&state.pool, &id, &actor).await?;
    state.build_changed(&build, false);
    Ok(Json(operations::build_view(&state.pool, &build).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct RequeueQuery {
    drain: Option<bool>,
}

/// Gives a running attempt back to the queue, not to the same worker within the cool-off (R51);
/// `?drain=true` also drains that worker.
#[utoipa::path(post, path = "/api/v2/builds/{id}/requeue", params(("id" = String, Path, description = "Build id"), RequeueQuery), responses(
    (status = 200, description = "The running attempt given back to the queue", body = schema::Build),
    (status = 409, description = "Not running", body = CodedError)))]
async fn requeue(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    actor: Actor,
    QueryParams(q): QueryParams<RequeueQuery>,
) -> ApiResult<Json<schema::Build>> {
    let build = operations::requeue(&state.pool, &id, q.drain.unwrap_or(false), &actor).await?;
    state.build_changed(&build, true);
    Ok(Json(operations::build_view(&state.pool, &build).await?))
}

/// Changes priority, run_at or max_attempts of a build that is not running.
#[utoipa::path(patch, path = "/api/v2/builds/{id}", params(("id" = String, Path, description = "Build id")), request_body = schema::BuildPatch, responses(
    (status = 200, description = "Changed", body = schema::Build),
    (status = 409, description = "Running or final", body = CodedError)))]
async fn patch(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    actor: Actor,
    JsonBody(body): JsonBody<schema::BuildPatch>,
) -> ApiResult<Json<schema::Build>> {
    let build = operations::patch(
        &state.pool,
        &id,
        body.priority,
        body.run_at.as_deref(),
        body.max_attempts,
        &actor,
    )
    .await?;
    state.build_changed(&build, false);
    Ok(Json(operations::build_view(&state.pool, &build).await?))
}

/// Purges the files and rows of a finished build.
#[utoipa::path(delete, path = "/api/v2/builds/{id}", params(("id" = String, Path, description = "Build id")), responses(
    (status = 204, description = "Files and rows purged"),
    (status = 409, description = "Not finished", body = CodedError)))]
async fn delete(State(state): State<AppState>, IdPath(id): IdPath, actor: Actor) -> ApiResult<StatusCode> {
    operator::finished_build_keys(&state.pool, &id)
        .await?
        .map_err(conflict)?;
    let keys = operator::delete_finished(&state.pool, &id, &actor).await?;
    state.attempt_changed(&id);
    // Objects the store does not delete now stay queued for the `storage_deletions` job.
    crate::jobs::delete_objects(&state.pool, &state.storage, &keys).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Revokes the build access token (the submitter loses access).
#[utoipa::path(post, path = "/api/v2/builds/{id}/tokens/revoke", params(("id" = String, Path, description = "Build id")), responses(
    (status = 200, description = "The build access token no longer works", body = schema::Revoked),
    (status = 404, description = "`Build not found`", body = CodedError)))]
async fn revoke_token(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    actor: Actor,
) -> ApiResult<Json<schema::Revoked>> {
    operator::revoke_build_token(&state.pool, &id, &actor).await?;
    Ok(Json(schema::Revoked { revoked: true }))
}
