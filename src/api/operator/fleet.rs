//! `/api/v2` for the fleet: workers and their operator states, platform queues, and the event stream.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

use super::schema;
use super::views::etagged;
use crate::api::error::CodedError;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{IdPath, NoParams, QueryParams, bounded_int};
use crate::api::group::ApiRouter;
use crate::api::{AppState, auth, operations};
use crate::events;
use crate::queue;
use utoipa::IntoParams;
use utoipa_axum::routes;

pub fn router() -> ApiRouter {
    ApiRouter::new()
        .routes(routes!(list_workers))
        .routes(routes!(show_worker, revoke_worker))
        .routes(routes!(drain))
        .routes(routes!(disable))
        .routes(routes!(enable))
        .routes(routes!(release))
        .routes(routes!(queues))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(events))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct Page {
    cursor: Option<String>,
    limit: Option<String>,
}

/// Workers by id, with cursor pagination.
#[utoipa::path(get, path = "/api/v2/workers", params(Page), responses(
    (status = 200, description = "Workers by id (`ETag`)", body = schema::WorkerPage),
    (status = 400, description = "A parameter that does not parse", body = CodedError)))]
async fn list_workers(
    State(state): State<AppState>,
    headers: HeaderMap,
    QueryParams(q): QueryParams<Page>,
) -> ApiResult<Response> {
    let limit = bounded_int(q.limit.as_deref(), "limit", 1, 500)?.unwrap_or(50);
    let cursor = auth::worker_id(q.cursor.as_deref())?;
    let page = operations::list_workers(&state.pool, cursor.as_deref(), limit).await?;
    Ok(etagged(&headers, page))
}

/// One worker with its operator state and counters.
#[utoipa::path(get, path = "/api/v2/workers/{id}", params(("id" = String, Path, description = "Worker id")), responses(
    (status = 200, description = "The worker (`ETag`)", body = schema::Worker),
    (status = 404, description = "`Worker not found`", body = CodedError)))]
async fn show_worker(State(state): State<AppState>, headers: HeaderMap, IdPath(id): IdPath) -> ApiResult<Response> {
    Ok(etagged(&headers, operations::show_worker(&state.pool, &id).await?))
}

async fn set_state(state: &AppState, id: &str, admin_state: &'static str) -> ApiResult<Json<Value>> {
    let worker = operations::set_worker_state(&state.pool, &state.config.queue, id, admin_state).await?;
    state.worker_changed();
    Ok(Json(worker))
}

/// Finish the current build, take no new one.
#[utoipa::path(post, path = "/api/v2/workers/{id}/drain", params(("id" = String, Path, description = "Worker id")), responses(
    (status = 200, description = "Draining", body = schema::Worker),
    (status = 404, description = "`Worker not found`", body = CodedError)))]
async fn drain(State(state): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    set_state(&state, &id, "draining").await
}

/// Disables a worker: it takes no builds.
#[utoipa::path(post, path = "/api/v2/workers/{id}/disable", params(("id" = String, Path, description = "Worker id")), responses(
    (status = 200, description = "Disabled", body = schema::Worker),
    (status = 404, description = "`Worker not found`", body = CodedError)))]
async fn disable(State(state): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    set_state(&state, &id, "disabled").await
}

/// Enables a worker again.
#[utoipa::path(post, path = "/api/v2/workers/{id}/enable", params(("id" = String, Path, description = "Worker id")), responses(
    (status = 200, description = "Active again", body = schema::Worker),
    (status = 404, description = "`Worker not found`", body = CodedError)))]
async fn enable(State(state): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    set_state(&state, &id, "active").await
}

/// Releases a worker from quarantine or probation: healthy again, its record cleared.
#[utoipa::path(post, path = "/api/v2/workers/{id}/release", params(("id" = String, Path, description = "Worker id")), responses(
    (status = 200, description = "Healthy again", body = schema::Worker),
    (status = 404, description = "`Worker not found`", body = CodedError)))]
async fn release(State(state): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    let worker = operations::release_worker(&state.pool, &id).await?;
    state.worker_changed();
    Ok(Json(worker))
}

/// Revokes a worker: token dropped, offline, its attempt back in the queue.
#[utoipa::path(delete, path = "/api/v2/workers/{id}", params(("id" = String, Path, description = "Worker id")), responses(
    (status = 200, description = "Revoked: token dropped, offline, its attempt back in the queue", body = schema::Worker),
    (status = 404, description = "`Worker not found`", body = CodedError)))]
async fn revoke_worker(State(state): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    set_state(&state, &id, "revoked").await
}

/// Depth per platform queue, oldest pending age, paused, backpressure limit and full flag.
#[utoipa::path(get, path = "/api/v2/queues", responses(
    (status = 200, description = "Every platform queue (`ETag`)", body = schema::QueuePage)))]
async fn queues(State(state): State<AppState>, headers: HeaderMap, _: QueryParams<NoParams>) -> ApiResult<Response> {
    Ok(etagged(
        &headers,
        operations::list_queues(&state.pool, &state.config.queue).await?,
    ))
}

/// Pauses a platform queue: nothing is handed out until it resumes.
#[utoipa::path(post, path = "/api/v2/queues/{platform}/pause", params(("platform" = String, Path, description = "`ios` or `android`")), responses(
    (status = 200, description = "Paused", body = schema::QueueState),
    (status = 404, description = "`Queue not found`", body = CodedError)))]
async fn pause(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(operations::set_paused(&state.pool, &name, true).await?))
}

/// Resumes a platform queue; waiting long polls look at once.
#[utoipa::path(post, path = "/api/v2/queues/{platform}/resume", params(("platform" = String, Path, description = "`ios` or `android`")), responses(
    (status = 200, description = "Running", body = schema::QueueState),
    (status = 404, description = "`Queue not found`", body = CodedError)))]
async fn resume(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let resumed = operations::set_paused(&state.pool, &name, false).await?;
    // Pollers of this instance look again at once; other instances follow the notification.
    if let Some(platform) = queue::Platform::parse(&name) {
        state.queue_resumed(platform);
    }
    Ok(Json(resumed))
}

/// Server-Sent Events of state changes on every instance (`crate::events::sse_response`): filters
/// `?build=`, `?worker=`, `?kind=`; resume with `Last-Event-ID`. The subscription ends with the
/// connection or at shutdown.
#[utoipa::path(get, path = "/api/v2/events", params(schema::EventsQuery,
    ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")), responses(
    (status = 200, description = "Server-Sent Events: one JSON event per `data:`, with `id:`", content_type = "text/event-stream", body = String),
    (status = 400, description = "A filter that does not parse", body = CodedError)))]
async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    QueryParams(q): QueryParams<events::StreamQuery>,
) -> ApiResult<Response> {
    let (filter, last_event_id) = q.resolve(&headers).map_err(ApiError::bad_request)?;
    Ok(events::sse_response(&state.events, filter, last_event_id, state.shutdown.clone()).into_response())
}
