//! A planned build plus what became of its files and children → the rows that go into PostgreSQL.
//!
//! * A queued build (also one queued again after an interrupted attempt) whose source did not come along
//!   is `failed` with a clear error, never handed to a worker.
//! * An interrupted build keeps its old attempt as attempt 1, ended as an infrastructure failure (the
//!   same bookkeeping as a rescued lease; the attempt's outcome is `interrupted`, since the move, not the
//!   worker, ended it: it counts neither against the worker's reputation nor for retry elsewhere), and
//!   gets a log line saying what happened.
//! * Final builds keep their times, worker and error text; their one attempt is recorded.

use chrono::{DateTime, Utc};
use serde_json::json;

use super::files::Copied;
use super::mapping::{NewLogLine, NewSample, PlannedBuild};
use super::writer::{AttemptRow, BuildRow, LogRow, SampleRow};
use crate::queue::BuildState;

/// The error of the attempt the move interrupted.
pub const INTERRUPTED: &str = "Interrupted by the move from the TypeScript controller";

/// The files of one build after copying.
#[derive(Debug, Clone)]
pub struct BuildFiles {
    pub source: Copied,
    pub certs: Copied,
    pub result: Copied,
}

/// Everything one build contributes to a batch, and what is worth noting about it.
#[derive(Debug, Clone)]
pub struct Composed {
    pub build: BuildRow,
    pub attempt: Option<AttemptRow>,
    pub logs: Vec<LogRow>,
    pub samples: Vec<SampleRow>,
    pub requeued: bool,
    pub failed_without_source: bool,
}

fn stored(copied: &Copied) -> Option<(String, i64, String)> {
    match copied {
        Copied::Stored { key, stored, .. } => {
            Some((key.as_str().to_string(), stored.size as i64, stored.sha256.clone()))
        }
        _ => None,
    }
}

fn missing_reason(copied: &Copied) -> String {
    match copied {
        Copied::NoFile => "no source path".to_string(),
        Copied::Missing(what) => format!("{what} not found"),
        Copied::Refused(file) => format!("{file}: {}", super::files::NOT_REGULAR),
        Copied::Failed { file, reason } => format!("{file}: {reason}"),
        Copied::Stored { file, .. } => file.clone(),
    }
}

pub fn compose(
    planned: &PlannedBuild,
    files: &BuildFiles,
    lines: Vec<NewLogLine>,
    samples: Vec<NewSample>,
    now: DateTime<Utc>,
) -> Composed {
    let mut state = planned.state;
    let mut errors = Vec::new();
    let mut system_lines: Vec<(&str, String)> = Vec::new();
    let mut attempt = None;
    let worker = planned.worker_id.clone();
    let mut error_message = match state {
        BuildState::Failed | BuildState::Cancelled => planned.error_message.clone(),
        _ => None,
    };
    let mut finished_reason = match state {
        BuildState::Completed => Some("completed"),
        BuildState::Failed => Some("build_failure"),
        BuildState::Cancelled => Some("cancelled"),
        _ => None,
    };
    let mut completed_at = state.is_final().then(|| {
        planned
            .completed_at
            .or(planned.started_at)
            .unwrap_or(planned.submitted_at)
    });
    if planned.interrupted {
        errors.push(json!({
            "at": now, "attempt": 1, "kind": "infrastructure", "message": INTERRUPTED, "worker_id": worker,
        }));
        let on = worker.as_deref().map(|w| format!(" on worker {w}")).unwrap_or_default();
        system_lines.push((
            "warn",
            format!("Attempt 1{on} was interrupted by the move from the TypeScript controller; queued again"),
        ));
        attempt = worker.clone().map(|worker_id| AttemptRow {
            build_id: planned.id.clone(),
            worker_id,
            assigned_at: planned.started_at.unwrap_or(planned.submitted_at),
            started_at: planned.started_at,
            finished_at: Some(now),
            outcome: "interrupted",
            error_message: Some(INTERRUPTED.to_string()),
        });
    } else if state.is_final()
        && let Some(worker_id) = worker.clone()
    {
        let outcome = finished_reason.unwrap_or("completed");
        if state == BuildState::Failed {
            errors.push(json!({
                "at": completed_at, "attempt": 1, "kind": "build_failure",
                "message": planned.error_message, "worker_id": worker_id,
            }));
        }
        attempt = Some(AttemptRow {
            build_id: planned.id.clone(),
            worker_id,
            assigned_at: planned.started_at.unwrap_or(planned.submitted_at),
            started_at: planned.started_at,
            finished_at: completed_at,
            outcome,
            error_message: planned.error_message.clone().filter(|_| state != BuildState::Completed),
        });
    }
    let source = stored(&files.source);
    let failed_without_source = state == BuildState::Pending && source.is_none();
    if failed_without_source {
        let message = format!(
            "Source archive missing when imported from the TypeScript controller ({})",
            missing_reason(&files.source)
        );
        system_lines.push(("error", format!("Build failed: {message}")));
        state = BuildState::Failed;
        finished_reason = Some("infrastructure");
        error_message = Some(message);
        completed_at = Some(now);
    }
    let result = stored(&files.result);
    let attempt_number = i32::from(attempt.is_some());
    let old_lines = lines.len();
    let mut logs: Vec<LogRow> = lines
        .into_iter()
        .enumerate()
        .map(|(i, line)| LogRow {
            build_id: planned.id.clone(),
            seq: i as i64 + 1,
            ts: line.ts,
            level: line.level,
            message: line.message,
        })
        .collect();
    for (i, (level, message)) in system_lines.into_iter().enumerate() {
        logs.push(LogRow {
            build_id: planned.id.clone(),
            seq: (old_lines + i) as i64 + 1,
            ts: now,
            level: level.to_string(),
            message,
        });
    }
    let build = BuildRow {
        id: planned.id.clone(),
        state: state.as_str(),
        queue: planned.platform.as_str(),
        run_at: planned.submitted_at,
        attempt: attempt_number,
        worker_id: worker,
        submitted_at: planned.submitted_at,
        started_at: if planned.interrupted { None } else { planned.started_at },
        completed_at,
        finished_reason,
        error_message,
        errors: serde_json::Value::Array(errors).to_string(),
        access_token_hash: planned.access_token_hash.clone(),
        source_key: source.as_ref().map(|s| s.0.clone()),
        source_size: source.as_ref().map(|s| s.1),
        certs_key: stored(&files.certs).map(|c| c.0),
        result_attempt: result.as_ref().map(|_| attempt_number),
        result_key: result.as_ref().map(|r| r.0.clone()),
        result_size: result.as_ref().map(|r| r.1),
        result_sha256: result.map(|r| r.2),
        original_build_id: planned.original_build_id.clone(),
        log_seq: logs.len() as i64,
        import_fingerprint: planned.fingerprint.clone(),
    };
    let samples = samples
        .into_iter()
        .map(|s| SampleRow {
            build_id: planned.id.clone(),
            ts: s.ts,
            cpu_percent: s.cpu_percent,
            memory_mb: s.memory_mb,
        })
        .collect();
    Composed {
        requeued: planned.interrupted && !failed_without_source,
        failed_without_source,
        build,
        attempt,
        logs,
        samples,
    }
}
