//! The G0 admin endpoints (admin key, enforced by the operator group): build listing (B2), builds
//! held now (B3), worker counters (B18) and unregistering a worker (B19).

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{IdPath, QueryParams, bounded_int};
use crate::api::{AppState, auth, views};
use crate::ids;
use crate::queue::{self, BuildFilter, Platform};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/builds", get(list))
        .route("/api/builds/active", get(active))
        .route("/api/workers/{id}/unregister", post(unregister))
        .route("/api/workers/{id}/stats", get(stats))
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<String>,
    before: Option<String>,
    status: Option<String>,
    platform: Option<String>,
    worker_id: Option<String>,
}

/// B2: a bare JSON array, newest first, paginated with `?limit=` and `?before=<id>`.
async fn list(State(state): State<AppState>, QueryParams(q): QueryParams<ListQuery>) -> ApiResult<Json<Value>> {
    let limit = bounded_int(q.limit.as_deref(), "limit", 1, 500)?.unwrap_or(50);
    let states = match q.status.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(status) => Some(states_for(status).ok_or_else(|| ApiError::bad_request("Invalid status"))?),
    };
    let platform = match q.platform.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(p) => Some(Platform::parse(p).ok_or_else(|| ApiError::bad_request("Invalid platform"))?),
    };
    let before = q.before.as_deref().map(str::trim).filter(|s| !s.is_empty());
    if before.is_some_and(|b| !ids::valid_id(b)) {
        return Err(ApiError::bad_request("Invalid before cursor"));
    }
    let filter = BuildFilter {
        states,
        platform,
        worker_id: auth::worker_id(q.worker_id.as_deref())?,
        before: before.map(str::to_string),
        since: None,
        limit,
    };
    let builds = queue::list_builds(&state.pool, &filter).await?;
    Ok(Json(Value::Array(builds.iter().map(views::build_list_entry).collect())))
}

/// The native states a `?status=` filter selects: G0 names cover their mapped states.
fn states_for(status: &str) -> Option<Vec<String>> {
    let names: &[&str] = match status {
        "pending" => &["pending", "scheduled", "retryable"],
        "failed" => &["failed", "cancelled"],
        other => return queue::BuildState::parse(other).map(|s| vec![s.as_str().to_string()]),
    };
    Some(names.iter().map(|s| s.to_string()).collect())
}

/// B3: builds held by workers now.
async fn active(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let builds = queue::active_builds(&state.pool).await?;
    let entries: Vec<Value> = builds
        .iter()
        .map(|b| {
            json!({
                "id": b.id, "status": b.state().g0(), "platform": b.queue,
                "worker_id": b.lease_owner, "started_at": views::ms(b.started_at),
            })
        })
        .collect();
    Ok(Json(json!({ "builds": entries })))
}

/// B18: counters and uptime of a worker.
async fn stats(State(state): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    let worker = queue::find_worker(&state.pool, &id)
        .await?
        .ok_or_else(ApiError::worker_not_found)?;
    let uptime = (Utc::now() - worker.registered_at).num_seconds().max(0);
    Ok(Json(json!({
        "totalBuilds": worker.builds_completed + worker.builds_failed,
        "successfulBuilds": worker.builds_completed,
        "failedBuilds": worker.builds_failed,
        "workerName": worker.name,
        "status": worker.status,
        "uptime": views::uptime(uptime),
    })))
}

/// B19 (admin): take a worker out; its attempt goes back to the queue.
async fn unregister(State(state): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<Value>> {
    let moved = queue::unregister(&state.pool, &id, &state.config.queue, Utc::now()).await?;
    state.workers.clear();
    Ok(Json(json!({ "success": true, "builds_reassigned": moved })))
}
