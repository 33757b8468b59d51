//! Diagnostic reports from workers (B20), behind the admin key of the operator group.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{JsonBody, QueryParams, bounded_int};
use crate::api::{AppState, auth, views};
use crate::queue::{self, DiagnosticReport, NewReport};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/diagnostics/report", post(report))
        .route("/api/diagnostics/{worker_id}", get(list))
        .route("/api/diagnostics/{worker_id}/latest", get(latest))
}

/// Stores a report.
async fn report(State(state): State<AppState>, JsonBody(body): JsonBody<Value>) -> ApiResult<Json<Value>> {
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
    let report = NewReport {
        worker_id,
        status: status.to_string(),
        duration_ms,
        auto_fixed: body.get("auto_fixed").and_then(Value::as_bool).unwrap_or(false),
        checks: checks.clone(),
    };
    let id = queue::store_report(&state.pool, &report, Utc::now()).await?;
    Ok(Json(json!({ "id": id, "status": "stored" })))
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<String>,
}

fn render(report: &DiagnosticReport) -> Value {
    json!({
        "id": report.id, "worker_id": report.worker_id, "status": report.status,
        "run_at": views::ms(Some(report.run_at)), "duration_ms": report.duration_ms,
        "auto_fixed": report.auto_fixed, "checks": report.checks.0,
    })
}

fn valid_worker(worker_id: &str) -> ApiResult<String> {
    auth::worker_id(Some(worker_id))?.ok_or_else(|| ApiError::bad_request("Invalid worker id"))
}

/// A worker's reports, newest first.
async fn list(
    State(state): State<AppState>,
    Path(worker_id): Path<String>,
    QueryParams(q): QueryParams<ListQuery>,
) -> ApiResult<Json<Value>> {
    let worker_id = valid_worker(&worker_id)?;
    let limit = bounded_int(q.limit.as_deref(), "limit", 1, 100)?.unwrap_or(10);
    // The deployed CLI's `doctor` expects 404 for an unknown worker (R54).
    queue::find_worker(&state.pool, &worker_id)
        .await?
        .ok_or_else(ApiError::worker_not_found)?;
    let reports = queue::list_reports(&state.pool, &worker_id, limit).await?;
    Ok(Json(
        json!({ "worker_id": worker_id, "reports": reports.iter().map(render).collect::<Vec<_>>() }),
    ))
}

/// A worker's newest report.
async fn latest(State(state): State<AppState>, Path(worker_id): Path<String>) -> ApiResult<Json<Value>> {
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
