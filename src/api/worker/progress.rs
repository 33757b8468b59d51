//! What running builds report: log lines (B6), heartbeats (B11) and telemetry (B12).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};

use super::files::WorkerQuery;
use crate::api::auth::{self, CallerRules};
use crate::api::error::{ApiError, ApiResult};
use crate::api::extract::{IdPath, QueryParams, parse_json};
use crate::api::{AppState, views};
use crate::queue::{self, NewLogLine, QueueError};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/builds/{id}/logs", post(post_logs))
        .route("/api/builds/{id}/heartbeat", post(heartbeat))
        .route("/api/builds/{id}/telemetry", post(telemetry))
}

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
async fn post_logs(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    QueryParams(q): QueryParams<WorkerQuery>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let rules = CallerRules {
        otp_as_api_key: true,
        ..CallerRules::default()
    };
    let caller = auth::build_caller(&state, &headers, &id, q.worker_id.as_deref(), rules).await?;
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
        Some(count) => json!({ "success": true, "count": count, "stored": stored, "skipped": count - stored }),
        None => json!({ "success": true }),
    }))
}

#[derive(Deserialize, Default)]
struct HeartbeatBody {
    progress: Option<f64>,
    stage: Option<String>,
}

/// B11: extends the lease; tells the worker when its build was cancelled.
async fn heartbeat(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    QueryParams(q): QueryParams<WorkerQuery>,
    body: Bytes,
) -> ApiResult<Response> {
    let rules = CallerRules {
        worker_id_is_a_parameter: true,
        ..CallerRules::default()
    };
    let caller = auth::build_caller(&state, &headers, &id, q.worker_id.as_deref(), rules).await?;
    let report: HeartbeatBody = if body.iter().all(u8::is_ascii_whitespace) {
        HeartbeatBody::default()
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
    let mut answer = json!({ "status": "ok", "timestamp": now.timestamp_millis() });
    if outcome.cancel_requested {
        answer["cancel_requested"] = json!(true);
    }
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
async fn telemetry(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    QueryParams(q): QueryParams<WorkerQuery>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let rules = CallerRules {
        worker_and_build_ids: true,
        ..CallerRules::default()
    };
    let caller = auth::build_caller(&state, &headers, &id, q.worker_id.as_deref(), rules).await?;
    let event: Value = parse_json(&body)?;
    let now = Utc::now();
    let settings = &state.config.queue;
    queue::heartbeat(&state.pool, &id, caller.holder(), None, None, settings, now).await?;
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
                queue::record_cpu_sample(&state.pool, &id, cpu, memory, now).await?;
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
    if let Some(line) = line {
        let max = state.config.max_log_lines;
        queue::append_worker_logs(&state.pool, &id, caller.holder(), &[line], max, settings, now).await?;
    }
    Ok(Json(json!({ "status": "ok" })))
}
