//! The G0 admin endpoints (admin key, enforced by the operator group): build listing (B2), builds
//! held now (B3), worker counters (B18) and unregistering a worker (B19).

use axum::extract::State;
use axum::{Extension, Json};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::routes;

use crate::api::auth::KeyCaller;
use crate::api::error::ErrorBody;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{IdPath, QueryParams, bounded_int};
use crate::api::group::ApiRouter;
use crate::api::views::{BuildListEntry, Unregistered};
use crate::api::{AppState, auth, views};
use crate::identity::Role;

/// A build held now (B3).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ActiveBuild {
    pub id: String,
    #[schema(value_type = views::G0Status)]
    pub status: String,
    pub platform: String,
    pub worker_id: Option<String>,
    /// Epoch milliseconds.
    pub started_at: Option<i64>,
}

/// `GET /api/builds/active` (B3).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ActiveBuilds {
    pub builds: Vec<ActiveBuild>,
}

/// `GET /api/workers/:id/stats` (B18).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStats {
    pub total_builds: i64,
    pub successful_builds: i64,
    pub failed_builds: i64,
    pub worker_name: String,
    /// `idle`, `busy` or `offline`.
    pub status: String,
    /// `"<d>d <h>h"`, `"<h>h <m>m"`, `"<m>m <s>s"` or `"<s>s"`.
    pub uptime: String,
}

use crate::ids;
use crate::queue::{self, BuildFilter, Platform};

pub fn router() -> ApiRouter {
    ApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(active))
        .routes(routes!(unregister))
        .routes(routes!(stats))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    limit: Option<String>,
    before: Option<String>,
    status: Option<String>,
    platform: Option<String>,
    worker_id: Option<String>,
}

/// B2: a bare JSON array, newest first, paginated with `?limit=` and `?before=<id>`.
#[utoipa::path(get, path = "/api/builds", params(ListQuery), responses(
    (status = 200, description = "A bare JSON array, newest first", body = Vec<BuildListEntry>),
    (status = 400, description = "`Invalid limit: …`, `Invalid status`, `Invalid platform`, `Invalid before cursor`", body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    caller: Option<Extension<KeyCaller>>,
    QueryParams(q): QueryParams<ListQuery>,
) -> ApiResult<Json<Vec<BuildListEntry>>> {
    // A submitter key sees only the builds it submitted (the seed CLI's `list`).
    let submitted_by = caller.and_then(|Extension(KeyCaller(who))| {
        (who.role() == Role::Submitter).then(|| who.key_id().unwrap_or_default().to_string())
    });
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
        submitted_by,
        states,
        platform,
        worker_id: auth::worker_id(q.worker_id.as_deref())?,
        before: before.map(str::to_string),
        since: None,
        limit,
    };
    let builds = queue::list_builds(&state.pool, &filter).await?;
    Ok(Json(builds.iter().map(views::build_list_entry).collect()))
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
#[utoipa::path(get, path = "/api/builds/active", responses(
    (status = 200, description = "Builds in `assigned` or `building`", body = ActiveBuilds)))]
async fn active(State(state): State<AppState>) -> ApiResult<Json<ActiveBuilds>> {
    let builds = queue::active_builds(&state.pool).await?;
    let builds = builds
        .iter()
        .map(|b| ActiveBuild {
            id: b.id.clone(),
            status: b.state().g0().to_string(),
            platform: b.queue.clone(),
            worker_id: b.lease_owner.clone(),
            started_at: views::ms_opt(b.started_at),
        })
        .collect();
    Ok(Json(ActiveBuilds { builds }))
}

/// B18: counters and uptime of a worker.
#[utoipa::path(get, path = "/api/workers/{id}/stats", params(("id" = String, Path, description = "Worker id")), responses(
    (status = 200, description = "Counters and uptime", body = WorkerStats),
    (status = 404, description = "`Worker not found`", body = ErrorBody)))]
async fn stats(State(state): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<WorkerStats>> {
    let worker = queue::find_worker(&state.pool, &id)
        .await?
        .ok_or_else(ApiError::worker_not_found)?;
    let uptime = (Utc::now() - worker.registered_at).num_seconds().max(0);
    Ok(Json(WorkerStats {
        total_builds: worker.builds_completed + worker.builds_failed,
        successful_builds: worker.builds_completed,
        failed_builds: worker.builds_failed,
        worker_name: worker.name,
        status: worker.status,
        uptime: views::uptime(uptime),
    }))
}

/// B19 (admin): take a worker out; its attempt goes back to the queue.
#[utoipa::path(post, path = "/api/workers/{id}/unregister", params(("id" = String, Path, description = "Worker id")), responses(
    (status = 200, description = "Offline, token revoked, its attempt back in the queue", body = Unregistered),
    (status = 404, description = "`Worker not found`", body = ErrorBody)))]
async fn unregister(State(state): State<AppState>, IdPath(id): IdPath) -> ApiResult<Json<Unregistered>> {
    let moved = queue::unregister(&state.pool, &id, &state.config.queue, Utc::now()).await?;
    state.workers.clear();
    Ok(Json(Unregistered {
        success: true,
        builds_reassigned: moved,
    }))
}
