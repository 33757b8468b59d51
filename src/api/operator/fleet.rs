//! `/api/v2` for the fleet: workers and their operator states, platform queues, and the event stream.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::Value;

use super::views::etagged;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{IdPath, NoParams, QueryParams, bounded_int};
use crate::api::{AppState, auth, operations};
use crate::events;
use crate::queue;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v2/workers", get(list_workers))
        .route("/api/v2/workers/{id}", get(show_worker).delete(revoke_worker))
        .route("/api/v2/workers/{id}/drain", post(drain))
        .route("/api/v2/workers/{id}/disable", post(disable))
        .route("/api/v2/workers/{id}/enable", post(enable))
        .route("/api/v2/queues", get(queues))
        .route("/api/v2/queues/{platform}/pause", post(pause))
        .route("/api/v2/queues/{platform}/resume", post(resume))
        .route("/api/v2/events", get(events))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    cursor: Option<String>,
    limit: Option<String>,
}

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

async fn show_worker(State(state): State<AppState>, headers: HeaderMap, IdPath(id): IdPath) -> ApiResult<Response> {
    Ok(etagged(&headers, operations::show_worker(&state.pool, &id).await?))
}

async fn set_state(state: &AppState, id: &str, admin_state: &'static str) -> ApiResult<Json<Value>> {
    let worker = operations::set_worker_state(&state.pool, &state.config.queue, id, admin_state).await?;
    state.workers.clear();
    Ok(Json(worker))
}

/// Finish the current build, take no new one.
async fn drain(State(state): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    set_state(&state, &id, "draining").await
}

async fn disable(State(state): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    set_state(&state, &id, "disabled").await
}

async fn enable(State(state): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    set_state(&state, &id, "active").await
}

/// Revokes a worker: token dropped, offline, its attempt back in the queue.
async fn revoke_worker(State(state): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    set_state(&state, &id, "revoked").await
}

async fn queues(State(state): State<AppState>, headers: HeaderMap, _: QueryParams<NoParams>) -> ApiResult<Response> {
    Ok(etagged(
        &headers,
        operations::list_queues(&state.pool, &state.config.queue).await?,
    ))
}

async fn pause(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(operations::set_paused(&state.pool, &name, true).await?))
}

async fn resume(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let resumed = operations::set_paused(&state.pool, &name, false).await?;
    // Pollers of this instance look again at once; other instances follow the notification.
    if let Some(platform) = queue::Platform::parse(&name) {
        state.wakeups.wake_all(platform);
    }
    Ok(Json(resumed))
}

/// Server-Sent Events of state changes on every instance (`crate::events::sse_response`): filters
/// `?build=`, `?worker=`, `?kind=`; resume with `Last-Event-ID`. The subscription ends with the
/// connection or at shutdown.
async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    QueryParams(q): QueryParams<events::StreamQuery>,
) -> ApiResult<Response> {
    let (filter, last_event_id) = q.resolve(&headers).map_err(ApiError::bad_request)?;
    Ok(events::sse_response(&state.events, filter, last_event_id, state.shutdown.clone()).into_response())
}
