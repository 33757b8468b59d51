//! JSON of the native API (`/api/v2`) and of the operator CLI: RFC 3339 times, the native state
//! vocabulary, every job column except secrets.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::queue::operator::{AttemptRow, QueueView};
use crate::queue::{Build, LogLine, Worker};

/// An RFC 3339 time with milliseconds, in UTC.
pub fn iso(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn time(at: Option<DateTime<Utc>>) -> Value {
    at.map_or(Value::Null, |t| json!(iso(t)))
}

/// A build with every job column (secrets excluded).
pub fn build(b: &Build) -> Value {
    let running_ms = match (b.started_at, b.completed_at) {
        (Some(start), Some(end)) => Some((end - start).num_milliseconds()),
        _ => None,
    };
    json!({
        "id": b.id, "state": b.state, "queue": b.queue, "platform": b.queue, "priority": b.priority,
        "run_at": iso(b.run_at), "attempt": b.attempt, "max_attempts": b.max_attempts,
        "worker_id": b.worker_id, "lease_owner": b.lease_owner, "lease_expires_at": time(b.lease_expires_at),
        "last_heartbeat_at": time(b.last_heartbeat_at), "progress": b.progress, "stage": b.stage,
        "cancel_requested_at": time(b.cancel_requested_at), "errors": b.errors.0,
        "submitted_at": iso(b.submitted_at), "assigned_at": time(b.assigned_at), "started_at": time(b.started_at),
        "completed_at": time(b.completed_at), "finished_reason": b.finished_reason, "error_message": b.error_message,
        "vm_ready_at": time(b.vm_ready_at), "original_build_id": b.original_build_id,
        "timings": { "running_ms": running_ms },
        "artifacts": {
            "source": b.source_key.as_ref().map(|_| json!({ "size": b.source_size })),
            "result": b.result_key.as_ref().map(|_| json!({ "size": b.result_size, "sha256": b.result_sha256 })),
            "certs": b.certs_key.is_some(),
        },
        "log_lines": b.log_seq, "log_lines_dropped": b.log_dropped,
    })
}

pub fn attempt(a: &AttemptRow) -> Value {
    json!({
        "attempt": a.attempt, "worker_id": a.worker_id, "lease_token": a.lease_token,
        "assigned_at": iso(a.assigned_at), "started_at": time(a.started_at), "finished_at": time(a.finished_at),
        "outcome": a.outcome, "error_message": a.error_message,
    })
}

pub fn worker(w: &Worker) -> Value {
    json!({
        "id": w.id, "name": w.name, "status": w.status, "admin_state": w.admin_state, "platforms": w.platforms,
        "capabilities": w.capabilities.0, "registered_at": iso(w.registered_at), "last_seen_at": iso(w.last_seen_at),
        "builds_completed": w.builds_completed, "builds_failed": w.builds_failed,
    })
}

/// A platform queue; `max_queued` is the backpressure limit and `full` whether submits are refused (R58).
pub fn queue(q: &QueueView, max_queued: i64) -> Value {
    let queued = q.scheduled + q.pending + q.retryable;
    json!({
        "name": q.name, "paused": q.paused,
        "depth": { "scheduled": q.scheduled, "pending": q.pending, "retryable": q.retryable,
                   "assigned": q.assigned, "building": q.building },
        "oldest_pending_age_seconds": q.oldest_pending_age_seconds,
        "queued": queued, "max_queued": max_queued, "full": queued >= max_queued,
    })
}

/// A log line as `GET /api/builds/:id/logs` shows it (B5).
pub fn log_line(l: &LogLine) -> Value {
    json!({ "seq": l.seq, "timestamp": l.ts.timestamp_millis(), "level": l.level, "message": l.message })
}
