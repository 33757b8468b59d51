//! JSON shapes of the G0 contract (epoch-millisecond times, the G0 state vocabulary).

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::queue::{Build, Claim};

/// Epoch milliseconds, `null` when unset.
pub fn ms(at: Option<DateTime<Utc>>) -> Value {
    at.map_or(Value::Null, |t| json!(t.timestamp_millis()))
}

/// `GET /api/builds/:id/status` (B4).
pub fn build_status(build: &Build) -> Value {
    let state = build.state();
    json!({
        "id": build.id,
        "status": state.g0(),
        "platform": build.queue,
        "worker_id": build.worker_id,
        "submitted_at": build.submitted_at.timestamp_millis(),
        "started_at": ms(build.started_at),
        "completed_at": ms(build.completed_at),
        "error_message": build.g0_error_message(),
        "attempt": build.attempt,
        "max_attempts": build.max_attempts,
        "priority": build.priority,
        "progress": build.progress,
    })
}

/// The `job` of a poll answer (B16).
pub fn job(claim: &Claim, base_image_id: &str) -> Value {
    let build = &claim.build;
    json!({
        "id": build.id,
        "platform": build.queue,
        "source_url": format!("/api/builds/{}/source", build.id),
        "certs_url": build.certs_key.as_ref().map(|_| format!("/api/builds/{}/certs", build.id)),
        "baseImageId": base_image_id,
        "otp": claim.otp,
        "submitted_at": build.submitted_at.timestamp_millis(),
        "attempt": build.attempt,
    })
}
