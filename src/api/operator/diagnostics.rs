//! Diagnostic reports from workers (B20), behind the admin key of the operator group.

use axum::Json;
use axum::extract::{Path, State};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::routes;

use crate::api::error::ErrorBody;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{JsonBody, QueryParams, bounded_int};
use crate::api::group::ApiRouter;
use crate::api::{AppState, auth};

/// A report to store (B20).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReportRequest {
    pub worker_id: String,
    /// `healthy`, `warning` or `critical`.
    pub status: String,
    pub duration_ms: f64,
    pub auto_fixed: Option<bool>,
    /// The checks as the worker ran them (stored as sent).
    pub checks: Vec<Value>,
}

/// A report stored.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Stored {
    /// A UUID.
    pub id: String,
    /// Always `stored`.
    pub status: String,
}

/// A stored report.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Report {
    pub id: String,
    pub worker_id: String,
    pub status: String,
    /// Epoch milliseconds.
    pub run_at: i64,
    pub duration_ms: i64,
    pub auto_fixed: bool,
    pub checks: Value,
}

/// A worker's reports, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReportList {
    pub worker_id: String,
    pub reports: Vec<Report>,
}
use crate::queue::{self, DiagnosticReport, NewReport};

pub fn router() -> ApiRouter {
    ApiRouter::new()
        .routes(routes!(report))
        .routes(routes!(list))
        .routes(routes!(latest))
}

/// Stores a report.
#[utoipa::path(post, path = "/api/diagnostics/report", request_body = ReportRequest, responses(
    (status = 200, description = "Stored", body = Stored),
    (status = 400, description = "`Missing required fields: worker_id, status, duration_ms, checks`, `Invalid status. Must be: healthy, warning, or critical`, `checks must be an array`", body = ErrorBody),
    (status = 404, description = "`Worker not found`", body = ErrorBody)))]
async fn report(
    State(state): State<AppState>,
    caller: Option<axum::Extension<auth::KeyCaller>>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Stored>> {
    let (Some(worker_id), Some(status), Some(duration), Some(checks)) = (
        body.get("worker_id"),
        body.get("status"),
        body.get("duration_ms"),
        body.get("checks"),
    ) else {
        return Err(ApiError::bad_request(
            "Missing required fields: worker_id, status, duration_ms, checks",
        ));
    };
    let status = status
        .as_str()
        .filter(|s| ["healthy", "warning", "critical"].contains(s));
    let status =
        status.ok_or_else(|| ApiError::bad_request("Invalid status. Must be: healthy, warning, or critical"))?;
    if !checks.is_array() {
        return Err(ApiError::bad_request("checks must be an array"));
    }
    let duration_ms = duration
        .as_f64()
        .filter(|d| *d >= 0.0 && *d < 1e15)
        .ok_or_else(|| ApiError::bad_request("duration_ms must be a non-negative number"))?
        as i64;
    let worker_id = auth::worker_id(worker_id.as_str())?.ok_or_else(|| ApiError::bad_request("Invalid worker id"))?;
    if let Some(axum::Extension(auth::KeyCaller(who))) = &caller {
        auth::may_act_for(&state, who, &worker_id).await?;
    }
    let report = NewReport {
        worker_id,
        status: status.to_string(),
        duration_ms,
        auto_fixed: body.get("auto_fixed").and_then(Value::as_bool).unwrap_or(false),
        checks: checks.clone(),
    };
    let id = queue::store_report(&state.pool, &report, Utc::now()).await?;
    Ok(Json(Stored {
        id,
        status: "stored".into(),
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    limit: Option<String>,
}

fn render(report: &DiagnosticReport) -> Report {
    Report {
        id: report.id.clone(),
        worker_id: report.worker_id.clone(),
        status: report.status.clone(),
        run_at: report.run_at.timestamp_millis(),
        duration_ms: report.duration_ms,
        auto_fixed: report.auto_fixed,
        checks: report.checks.0.clone(),
    }
}

fn valid_worker(worker_id: &str) -> ApiResult<String> {
    auth::worker_id(Some(worker_id))?.ok_or_else(|| ApiError::bad_request("Invalid worker id"))
}

/// A worker's reports, newest first.
#[utoipa::path(get, path = "/api/diagnostics/{worker_id}", params(("worker_id" = String, Path, description = "Worker id"), ListQuery), responses(
    (status = 200, description = "The worker's reports, newest first", body = ReportList),
    (status = 404, description = "`Worker not found`", body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    Path(worker_id): Path<String>,
    QueryParams(q): QueryParams<ListQuery>,
) -> ApiResult<Json<ReportList>> {
    let worker_id = valid_worker(&worker_id)?;
    let limit = bounded_int(q.limit.as_deref(), "limit", 1, 100)?.unwrap_or(10);
    // The deployed CLI's `doctor` expects 404 for an unknown worker (R54).
    queue::find_worker(&state.pool, &worker_id)
        .await?
        .ok_or_else(ApiError::worker_not_found)?;
    let reports = queue::list_reports(&state.pool, &worker_id, limit).await?;
    Ok(Json(ReportList {
        reports: reports.iter().map(render).collect(),
        worker_id,
    }))
}

/// A worker's newest report.
#[utoipa::path(get, path = "/api/diagnostics/{worker_id}/latest", params(("worker_id" = String, Path, description = "Worker id")), responses(
    (status = 200, description = "The newest report", body = Report),
    (status = 404, description = "`Worker not found` or `No diagnostic reports found`", body = ErrorBody)))]
async fn latest(State(state): State<AppState>, Path(worker_id): Path<String>) -> ApiResult<Json<Report>> {
    let worker_id = valid_worker(&worker_id)?;
    queue::find_worker(&state.pool, &worker_id)
        .await?
        .ok_or_else(ApiError::worker_not_found)?;
    let reports = queue::list_reports(&state.pool, &worker_id, 1).await?;
    reports
        .first()
        .map(|r| Json(render(r)))
        .ok_or_else(|| ApiError::not_found("No diagnostic reports found"))
}
