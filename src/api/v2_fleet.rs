//! `/api/v2` for the fleet: workers and their operator states, platform queues, and the event stream.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth;
use super::error::{ApiError, ApiResult};
use super::extract::{IdPath, NoParams, QueryParams, bounded_int};
use super::v2_views::{self as views, etagged};
use super::{AppState, operations};
use crate::events;
use crate::queue;
use crate::queue::operator;

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
    auth::require_admin(&state, &headers)?;
    let limit = bounded_int(q.limit.as_deref(), "limit", 1, 500)?.unwrap_or(50);
    let cursor = auth::worker_id(q.cursor.as_deref())?;
    let mut workers = operator::list_workers(&state.pool, cursor.as_deref(), limit + 1).await?;
    let next_cursor = (workers.len() as i64 > limit)
        .then(|| workers.truncate(limit as usize))
        .and(workers.last().map(|w| w.id.clone()));
    Ok(etagged(
        &headers,
        json!({ "items": workers.iter().map(views::worker).collect::<Vec<_>>(), "next_cursor": next_cursor }),
    ))
}

async fn show_worker(State(state): State<AppState>, headers: HeaderMap, IdPath(id): IdPath) -> ApiResult<Response> {
    auth::require_admin(&state, &headers)?;
    let worker = queue::find_worker(&state.pool, &id)
        .await?
        .ok_or_else(ApiError::worker_not_found)?;
    Ok(etagged(&headers, views::worker(&worker)))
}

async fn set_state(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
    admin_state: &'static str,
) -> ApiResult<Json<Value>> {
    auth::require_admin(state, headers)?;
    let worker = operations::set_worker_state(&state.pool, &state.config.queue, id, admin_state).await?;
    state.workers.clear();
    Ok(Json(worker))
}

/// Finish the current build, take no new one.
async fn drain(State(state): State<AppState>, headers: HeaderMap, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    set_state(&state, &headers, &id, "draining").await
}

async fn disable(State(state): State<AppState>, headers: HeaderMap, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    set_state(&state, &headers, &id, "disabled").await
}

async fn enable(State(state): State<AppState>, headers: HeaderMap, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    set_state(&state, &headers, &id, "active").await
}

/// Revokes a worker: token dropped, offline, its attempt back in the queue.
async fn revoke_worker(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
) -> ApiResult<Json<Value>> {
    set_state(&state, &headers, &id, "revoked").await
}

async fn queues(State(state): State<AppState>, headers: HeaderMap, _: QueryParams<NoParams>) -> ApiResult<Response> {
    auth::require_admin(&state, &headers)?;
    let max_queued = state.config.queue.max_queued_builds;
    let views_: Vec<Value> = operator::queue_views(&state.pool, Utc::now())
        .await?
        .iter()
        .map(|q| views::queue(q, max_queued))
        .collect();
    Ok(etagged(&headers, json!({ "items": views_, "next_cursor": null })))
}

async fn pause(State(state): State<AppState>, headers: HeaderMap, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    auth::require_admin(&state, &headers)?;
    Ok(Json(operations::set_paused(&state.pool, &name, true).await?))
}

async fn resume(State(state): State<AppState>, headers: HeaderMap, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    auth::require_admin(&state, &headers)?;
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
    auth::require_admin(&state, &headers)?;
    let (filter, last_event_id) = q.resolve(&headers).map_err(ApiError::bad_request)?;
    Ok(events::sse_response(&state.events, filter, last_event_id, state.shutdown.clone()).into_response())
}
