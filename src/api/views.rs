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

/// ISO-8601 (RFC 3339 with milliseconds, `Z`).
pub fn iso(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// An entry of `GET /api/builds` (B2): ISO times, `completedAt` omitted when unset.
pub fn build_list_entry(build: &Build) -> Value {
    let mut entry = json!({
        "id": build.id,
        "status": build.state().g0(),
        "createdAt": iso(build.submitted_at),
        "platform": build.queue,
        "worker_id": build.worker_id,
        "priority": build.priority,
        "attempt": build.attempt,
    });
    if let Some(done) = build.completed_at {
        entry["completedAt"] = json!(iso(done));
    }
    entry
}

/// The debug line a VM monitor heartbeat becomes (B12).
pub fn vm_heartbeat_summary(data: &Value) -> String {
    let number = |v: Option<&Value>| v.and_then(Value::as_f64).map_or("?".to_string(), |n| format!("{n:.1}"));
    let metrics = data.get("metrics");
    format!(
        "[VM] heartbeat #{} stage={} cpu={}% mem={}MB disk={}%",
        data.get("heartbeat_count").and_then(Value::as_i64).unwrap_or(0),
        data.get("stage").and_then(Value::as_str).unwrap_or("unknown"),
        number(metrics.and_then(|m| m.get("cpu_percent"))),
        number(metrics.and_then(|m| m.get("memory_mb"))),
        number(metrics.and_then(|m| m.get("disk_percent"))),
    )
}

/// `"<d>d <h>h"`, `"<h>h <m>m"`, `"<m>m <s>s"` or `"<s>s"` (B18).
pub fn uptime(seconds: i64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds % 86_400 / 3_600,
        seconds % 3_600 / 60,
        seconds % 60,
    );
    match (d, h, m) {
        (d, h, _) if d > 0 => format!("{d}d {h}h"),
        (_, h, m) if h > 0 => format!("{h}h {m}m"),
        (_, _, m) if m > 0 => format!("{m}m {s}s"),
        _ => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_formats() {
        assert_eq!(uptime(5), "5s");
        assert_eq!(uptime(65), "1m 5s");
        assert_eq!(uptime(3_700), "1h 1m");
        assert_eq!(uptime(90_000), "1d 1h");
    }
}
