//! What running builds report: log lines (B6), heartbeats (B11) and telemetry (B12).

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::Value;

use super::files::WorkerQuery;
use super::schema::{HeartbeatAnswer, HeartbeatRequest, LogPost, LogsPosted, StatusOk, Telemetry};
use crate::api::auth::{self, CallerRules};
use crate::api::error::ErrorBody;
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{IdPath, QueryParams, parse_json, read_body};
use crate::api::group::ApiRouter;
use crate::api::{AppState, views};
use crate::queue::{self, NewLogLine, QueueError};
use utoipa_axum::routes;

pub fn router() -> ApiRouter {
    ApiRouter::new()
        .routes(routes!(post_logs))
        .routes(routes!(heartbeat))
        .routes(routes!(telemetry))
}

/// Bodies read once the caller is known: a log batch, and a heartbeat or telemetry report.
const LOG_BODY_LIMIT: usize = 2 * 1024 * 1024;
const REPORT_BODY_LIMIT: usize = 64 * 1024;

const LEVELS: [&str; 4] = ["info", "warn", "error", "debug"];

fn log_line(entry: &Value) -> Option<NewLogLine> {
    let level = entry.get("level")?.as_str()?;
    let message = entry.get("message")?.as_str()?;
    LEVELS.contains(&level).then(|| NewLogLine {
        level: level.to_string(),
        message: message.to_string(),
    })
}

/// B6: one line or a batch, from the holder of the current attempt.
#[utoipa::path(post, path = "/api/builds/{id}/logs", params(("id" = String, Path, description = "Build id"), ("worker_id" = Option<String>, Query, description = "With the admin key: the worker holding the build (or header `X-Worker-Id`)")), request_body = LogPost, responses(
    (status = 200, description = "Stored (a batch says how many)", body = LogsPosted),
    (status = 400, description = "`Invalid log level. Must be: info, warn, or error` or `Invalid body. Expected { level, message } or { logs: [...] }`", body = ErrorBody),
    (status = 403, description = "`Worker not authorized for this build`, `Invalid API key`", body = ErrorBody),
    (status = 404, description = "`Build not found`", body = ErrorBody),
    (status = 409, description = "`Build attempt is no longer active`", body = ErrorBody)))]
async fn post_logs(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    QueryParams(q): QueryParams<WorkerQuery>,
    body: Body,
) -> ApiResult<Json<LogsPosted>> {
    let rules = CallerRules {
        otp_as_api_key: true,
        ..CallerRules::default()
    };
    let caller = auth::build_caller(&state, &headers, &id, q.worker_id.as_deref(), rules).await?;
    let body = read_body(body, LOG_BODY_LIMIT).await?;
    let invalid = || ApiError::bad_request("Invalid body. Expected { level, message } or { logs: [...] }");
    let value: Value = parse_json(&body).map_err(|_| invalid())?;
    let (lines, batch_size) = match (value.get("logs"), value.get("level"), value.get("message")) {
        (Some(Value::Array(entries)), _, _) => (entries.iter().filter_map(log_line).collect(), Some(entries.len())),
        (None, Some(_), Some(Value::String(_))) => {
            let line = log_line(&value)
                .ok_or_else(|| ApiError::bad_request("Invalid log level. Must be: info, warn, or error"))?;
            (vec![line], None)
        }
        _ => return Err(invalid()),
    };
    let max = state.config.max_log_lines;
    let stored = queue::append_worker_logs(
        &state.pool,
        &id,
        caller.holder(),
        &lines,
        max,
        &state.config.queue,
        Utc::now(),
    )
    .await?;
    // A batch says what became of it (R46): `count` received (G0), `stored`, and `skipped` (invalid
    // entries, or lines past the build's cap).
    Ok(Json(match batch_size {
        Some(count) => LogsPosted {
            success: true,
            count: Some(count),
            stored: Some(stored),
            skipped: Some(count - stored),
        },
        None => LogsPosted {
            success: true,
            count: None,
            stored: None,
            skipped: None,
        },
    }))
}

/// B11: extends the lease; tells the worker when its build was cancelled.
#[utoipa::path(post, path = "/api/builds/{id}/heartbeat", params(("id" = String, Path, description = "Build id"), ("worker_id" = Option<String>, Query, description = "With the admin key: the worker holding the build (or header `X-Worker-Id`)")), request_body(content = HeartbeatRequest, description = "Optional"), responses(
    (status = 200, description = "Lease extended", body = HeartbeatAnswer),
    (status = 400, description = "`worker_id required`", body = ErrorBody),
    (status = 403, description = "`Build not assigned to this worker`", body = ErrorBody),
    (status = 404, description = "`Build not found`", body = ErrorBody),
    (status = 409, description = "`Build attempt is no longer active`", body = ErrorBody)))]
async fn heartbeat(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    QueryParams(q): QueryParams<WorkerQuery>,
    body: Body,
) -> ApiResult<Response> {
    let rules = CallerRules {
        worker_id_is_a_parameter: true,
        ..CallerRules::default()
    };
    let caller = auth::build_caller(&state, &headers, &id, q.worker_id.as_deref(), rules).await?;
    let body = read_body(body, REPORT_BODY_LIMIT).await?;
    let report: HeartbeatRequest = if body.iter().all(u8::is_ascii_whitespace) {
        HeartbeatRequest::default()
    } else {
        parse_json(&body)?
    };
    let progress = match report.progress {
        Some(p) if (0.0..=100.0).contains(&p) => Some(p.round() as i16),
        Some(_) => return Err(ApiError::bad_request("progress must be a number from 0 to 100")),
        None => None,
    };
    let stage = report
        .stage
        .as_deref()
        .map(|s| queue::truncate_message(s).chars().take(200).collect::<String>());
    let now = Utc::now();
    let outcome = queue::heartbeat(
        &state.pool,
        &id,
        caller.holder(),
        progress,
        stage.as_deref(),
        &state.config.queue,
        now,
    )
    .await
    .map_err(|e| match e {
        QueueError::NotHolder => ApiError::forbidden("Build not assigned to this worker"),
        other => other.into(),
    })?;
    let answer = HeartbeatAnswer {
        status: "ok".into(),
        timestamp: now.timestamp_millis(),
        cancel_requested: outcome.cancel_requested.then_some(true),
    };
    let mut response = Json(answer).into_response();
    if outcome.cancel_requested {
        response
            .headers_mut()
            .insert("x-build-cancelled", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// B12: counts as a heartbeat; CPU samples are stored, VM heartbeats summarised as a debug line.
/// Values out of range are not stored but still answered 200 (the monitors never retry).
#[utoipa::path(post, path = "/api/builds/{id}/telemetry", params(("id" = String, Path, description = "Build id"), ("worker_id" = Option<String>, Query, description = "With the admin key: the worker holding the build (or header `X-Worker-Id`)"),
    ("X-Worker-Id" = Option<String>, Header, description = "With `X-Build-Id` and no key: the G0 host monitor"),
    ("X-Build-Id" = Option<String>, Header, description = "Must equal the path's id")), request_body = Telemetry, responses(
    (status = 200, description = "Counted as a heartbeat", body = StatusOk),
    (status = 403, description = "`Worker not authorized for this build`, `Invalid API key`", body = ErrorBody),
    (status = 404, description = "`Build not found`", body = ErrorBody),
    (status = 409, description = "`Build attempt is no longer active`", body = ErrorBody)))]
async fn telemetry(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    QueryParams(q): QueryParams<WorkerQuery>,
    body: Body,
) -> ApiResult<Json<StatusOk>> {
    let rules = CallerRules {
        worker_and_build_ids: true,
        ..CallerRules::default()
    };
    let caller = auth::build_caller(&state, &headers, &id, q.worker_id.as_deref(), rules).await?;
    let settings = &state.config.queue;
    if caller.keyless {
        // Rule 4 carries no secret: the hold is checked before a byte of the body is read (T1), and
        // such a report may only add CPU samples (T4).
        queue::holds_build(&state.pool, &id, caller.holder()).await?;
    }
    let body = read_body(body, REPORT_BODY_LIMIT).await?;
    let event: Value = parse_json(&body)?;
    let now = Utc::now();
    if !caller.keyless {
        queue::heartbeat(&state.pool, &id, caller.holder(), None, None, settings, now).await?;
    }
    let data = event.get("data").cloned().unwrap_or(Value::Null);
    let line = match event.get("type").and_then(Value::as_str) {
        Some("cpu_snapshot") => {
            let cpu = data
                .get("cpu_percent")
                .and_then(Value::as_f64)
                .filter(|v| (0.0..=1000.0).contains(v));
            let memory = data
                .get("memory_mb")
                .and_then(Value::as_f64)
                .filter(|v| (0.0..=1_000_000.0).contains(v));
            if let (Some(cpu), Some(memory)) = (cpu, memory) {
                let recorded = queue::record_cpu_sample(&state.pool, &id, caller.holder(), cpu, memory, settings, now);
                match recorded.await {
                    // The heartbeat above accepted the last holder of a build cancelled meanwhile: its
                    // report is answered as before, the sample is not kept.
                    Err(queue::QueueError::NotHolder | queue::QueueError::Stale) if !caller.keyless => {}
                    other => other?,
                }
            }
            None
        }
        Some("heartbeat") => Some(NewLogLine {
            level: "debug".into(),
            message: views::vm_heartbeat_summary(&data),
        }),
        Some("monitor_started") => Some(NewLogLine {
            level: "info".into(),
            message: "[VM] Monitor started".into(),
        }),
        _ => None,
    };
    if let Some(line) = line.filter(|_| !caller.keyless) {
        let max = state.config.max_log_lines;
        queue::append_worker_logs(&state.pool, &id, caller.holder(), &[line], max, settings, now).await?;
    }
    Ok(Json(StatusOk { status: "ok".into() }))
}
