//! `/api/v2` for the fleet: workers and their operator states, platform queues, and the event stream.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::auth;
use super::error::{ApiError, ApiResult};
use super::extract::{IdPath, NoParams, QueryParams, bounded_int};
use super::v2_views::{self as views, etagged};
use super::{AppState, operations};
use crate::events::Event;
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
    if admin_state == "revoked" {
        state.events.publish(Event::worker("worker.offline", id));
    }
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

/// Server-Sent Events of state changes on every instance. The subscription ends with the connection.
async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    auth::require_admin(&state, &headers)?;
    let receiver = state.events.subscribe();
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(payload) => {
                    let kind = serde_json::from_str::<Value>(&payload)
                        .ok()
                        .and_then(|v| v["kind"].as_str().map(str::to_string))
                        .unwrap_or_else(|| "event".into());
                    return Some((Ok(SseEvent::default().event(kind).data(payload.as_ref())), receiver));
                }
                Err(RecvError::Lagged(missed)) => tracing::warn!(missed, "SSE subscriber lagged"),
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
