//! JSON shapes of the G0 contract (epoch-millisecond times, the G0 state vocabulary).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::queue::{Build, Claim};

/// Epoch milliseconds, `None` when unset.
pub fn ms_opt(at: Option<DateTime<Utc>>) -> Option<i64> {
    at.map(|t| t.timestamp_millis())
}

/// G0 build states (api.md §6): scheduled and retryable read as pending, cancelled as failed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum G0Status {
    Pending,
    Assigned,
    Building,
    Completed,
    Failed,
}

/// `GET /api/builds/:id/status` (B4).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BuildStatus {
    pub id: String,
    #[schema(value_type = G0Status)]
    pub status: String,
    /// `ios` or `android`.
    pub platform: String,
    pub worker_id: Option<String>,
    /// Epoch milliseconds.
    pub submitted_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub error_message: Option<String>,
    pub attempt: i32,
    pub max_attempts: i32,
    pub priority: i32,
    /// 0..100, as last reported.
    pub progress: Option<i16>,
}

pub fn build_status(build: &Build) -> BuildStatus {
    BuildStatus {
        id: build.id.clone(),
        status: build.state().g0().to_string(),
        platform: build.queue.clone(),
        worker_id: build.worker_id.clone(),
        submitted_at: build.submitted_at.timestamp_millis(),
        started_at: ms_opt(build.started_at),
        completed_at: ms_opt(build.completed_at),
        error_message: build.g0_error_message(),
        attempt: build.attempt,
        max_attempts: build.max_attempts,
        priority: build.priority,
        progress: build.progress,
    }
}

/// The `job` of a poll answer (B16).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: String,
    pub platform: String,
    /// `/api/builds/<id>/source`.
    pub source_url: String,
    /// `/api/builds/<id>/certs`, `null` without certificates.
    pub certs_url: Option<String>,
    #[serde(rename = "baseImageId")]
    pub base_image_id: String,
    /// The attempt's one-time password, for the VM's `/authenticate`.
    pub otp: String,
    /// Epoch milliseconds.
    pub submitted_at: i64,
    pub attempt: i32,
}

pub fn job(claim: &Claim, base_image_id: &str) -> Job {
    let build = &claim.build;
    Job {
        id: build.id.clone(),
        platform: build.queue.clone(),
        source_url: format!("/api/builds/{}/source", build.id),
        certs_url: build
            .certs_key
            .as_ref()
            .map(|_| format!("/api/builds/{}/certs", build.id)),
        base_image_id: base_image_id.to_string(),
        otp: claim.otp.clone(),
        submitted_at: build.submitted_at.timestamp_millis(),
        attempt: build.attempt,
    }
}

/// A worker taken out (B19).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Unregistered {
    /// Always `true`.
    pub success: bool,
    /// Attempts put back in the queue.
    pub builds_reassigned: u64,
}

/// ISO-8601 (RFC 3339 with milliseconds, `Z`): the one format of every API time.
pub use crate::ops::views::iso;

/// An entry of `GET /api/builds` (B2): ISO times, `completedAt` omitted when unset.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BuildListEntry {
    pub id: String,
    #[schema(value_type = G0Status)]
    pub status: String,
    /// ISO-8601.
    #[serde(rename = "createdAt")]
    pub created_at: String,
    /// ISO-8601; absent until the build is finished.
    #[serde(rename = "completedAt", skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    pub platform: String,
    pub worker_id: Option<String>,
    pub priority: i32,
    pub attempt: i32,
}

pub fn build_list_entry(build: &Build) -> BuildListEntry {
    BuildListEntry {
        id: build.id.clone(),
        status: build.state().g0().to_string(),
        created_at: iso(build.submitted_at),
        completed_at: build.completed_at.map(iso),
        platform: build.queue.clone(),
        worker_id: build.worker_id.clone(),
        priority: build.priority,
        attempt: build.attempt,
    }
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
