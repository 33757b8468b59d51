//! JSON of the native API (`/api/v2`) and of the operator CLI: RFC 3339 times, the native state
//! vocabulary, every job column except secrets.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::queue::operator::{AttemptRow, QueueView};
use crate::queue::{Build, LogLine, Worker};

/// An RFC 3339 time with milliseconds, in UTC.
pub fn iso(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn time(at: Option<DateTime<Utc>>) -> Option<String> {
    at.map(iso)
}

/// Native build states.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NativeState {
    Scheduled,
    Pending,
    Assigned,
    Building,
    Retryable,
    Completed,
    Failed,
    Cancelled,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Timings {
    /// Milliseconds from start to completion, `null` until both are known.
    pub running_ms: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SourceArtifact {
    pub size: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ResultArtifact {
    pub size: Option<i64>,
    pub sha256: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Artifacts {
    pub source: Option<SourceArtifact>,
    pub result: Option<ResultArtifact>,
    /// Whether certificates are held (they are purged when the build is final).
    pub certs: bool,
}

/// A build with every job column (secrets excluded); times are RFC 3339.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Build)]
pub struct BuildView {
    pub id: String,
    #[schema(value_type = NativeState)]
    pub state: String,
    pub queue: String,
    pub platform: String,
    pub priority: i32,
    pub run_at: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub worker_id: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<String>,
    pub last_heartbeat_at: Option<String>,
    pub progress: Option<i16>,
    pub stage: Option<String>,
    pub cancel_requested_at: Option<String>,
    /// Every failure of every attempt, oldest first.
    #[schema(value_type = Vec<Object>)]
    pub errors: Value,
    pub submitted_at: String,
    pub assigned_at: Option<String>,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    pub finished_reason: Option<String>,
    pub error_message: Option<String>,
    pub vm_ready_at: Option<String>,
    pub original_build_id: Option<String>,
    pub timings: Timings,
    pub artifacts: Artifacts,
    pub log_lines: i64,
    pub log_lines_dropped: i64,
    /// The key that submitted the build (its name when submitted); `null` for the built-in admin key
    /// and imported builds.
    pub submitted_by: Option<SubmittedBy>,
    /// What the build needs of its worker (`{"xcode": ">=16.2", …}`); `null`: any worker of its platform.
    #[schema(value_type = Option<Object>)]
    pub requirements: Option<Value>,
    /// Why a queued build waits (`scheduled`, `retry_backoff`, `queue_paused`, `submitter_limit`,
    /// `no_matching_worker_registered`, `no_matching_worker_online`, `matching_workers_busy`, `next`);
    /// `null` for builds that are not queued. Computed when read.
    pub waiting_reason: Option<String>,
    /// The same for people.
    pub waiting_sentence: Option<String>,
    /// Builds ahead of it in claim order (for `matching_workers_busy` and `next`).
    pub position: Option<i64>,
}

/// Who submitted a build: the key's id and name.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubmittedBy {
    pub id: String,
    pub name: String,
}

/// One attempt of a build.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Attempt)]
pub struct AttemptView {
    pub attempt: i32,
    pub worker_id: String,
    pub lease_token: i64,
    pub assigned_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// `completed`, `failed`, `rescued`, `requeued`, … (`null` while running).
    pub outcome: Option<String>,
    pub error_message: Option<String>,
}

/// A build with its attempts (`GET /api/v2/builds/{id}`): the fields of `Build` plus `attempts`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BuildDetail {
    #[serde(flatten)]
    pub build: BuildView,
    pub attempts: Vec<AttemptView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BuildPage {
    pub items: Vec<BuildView>,
    /// Pass as `?cursor=` for the next page; `null` on the last.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptPage {
    pub items: Vec<AttemptView>,
    /// Always `null` (every attempt is listed).
    pub next_cursor: Option<String>,
}

/// A worker and its operator state.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Worker)]
pub struct WorkerView {
    pub id: String,
    pub name: String,
    /// `idle`, `busy` or `offline`.
    pub status: String,
    /// `active`, `draining`, `disabled` or `revoked`.
    pub admin_state: String,
    pub platforms: Vec<String>,
    /// As registered.
    #[schema(value_type = Object)]
    pub capabilities: Value,
    pub registered_at: String,
    pub last_seen_at: String,
    pub builds_completed: i64,
    pub builds_failed: i64,
    /// `ok`, `quarantined` or `probation` (fleet-health.md).
    pub health: String,
    /// When the quarantine ends (then probation); `null` when not quarantined, or quarantined until a
    /// healthy diagnostics report or an operator's release.
    pub quarantined_until: Option<String>,
    /// Why it was quarantined (kept during probation).
    pub quarantine_reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerPage {
    pub items: Vec<WorkerView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Depth {
    pub scheduled: i64,
    pub pending: i64,
    pub retryable: i64,
    pub assigned: i64,
    pub building: i64,
}

/// A platform queue.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Queue)]
pub struct QueueInfo {
    pub name: String,
    pub paused: bool,
    pub depth: Depth,
    pub oldest_pending_age_seconds: Option<f64>,
    /// Scheduled + pending + retryable.
    pub queued: i64,
    /// The backpressure limit (`CONTROLLER_MAX_QUEUED_BUILDS`).
    pub max_queued: i64,
    /// Whether submits are refused (503 `queue_full`).
    pub full: bool,
    /// Queued builds per waiting reason (every reason, zeros included).
    pub waiting: std::collections::BTreeMap<String, i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueuePage {
    pub items: Vec<QueueInfo>,
    /// Always `null`.
    pub next_cursor: Option<String>,
}

/// A build with every job column (secrets excluded).
pub fn build(b: &Build) -> BuildView {
    let running_ms = match (b.started_at, b.completed_at) {
        (Some(start), Some(end)) => Some((end - start).num_milliseconds()),
        _ => None,
    };
    BuildView {
        id: b.id.clone(),
        state: b.state.clone(),
        queue: b.queue.clone(),
        platform: b.queue.clone(),
        priority: b.priority,
        run_at: iso(b.run_at),
        attempt: b.attempt,
        max_attempts: b.max_attempts,
        worker_id: b.worker_id.clone(),
        lease_owner: b.lease_owner.clone(),
        lease_expires_at: time(b.lease_expires_at),
        last_heartbeat_at: time(b.last_heartbeat_at),
        progress: b.progress,
        stage: b.stage.clone(),
        cancel_requested_at: time(b.cancel_requested_at),
        errors: b.errors.0.clone(),
        submitted_at: iso(b.submitted_at),
        assigned_at: time(b.assigned_at),
        started_at: time(b.started_at),
        completed_at: time(b.completed_at),
        finished_reason: b.finished_reason.clone(),
        error_message: b.error_message.clone(),
        vm_ready_at: time(b.vm_ready_at),
        original_build_id: b.original_build_id.clone(),
        timings: Timings { running_ms },
        artifacts: Artifacts {
            source: b.source_key.as_ref().map(|_| SourceArtifact { size: b.source_size }),
            result: b.result_key.as_ref().map(|_| ResultArtifact {
                size: b.result_size,
                sha256: b.result_sha256.clone(),
            }),
            certs: b.certs_key.is_some(),
        },
        log_lines: b.log_seq,
        log_lines_dropped: b.log_dropped,
        submitted_by: b.submitted_by.as_ref().map(|id| SubmittedBy {
            id: id.clone(),
            name: b.submitted_by_name.clone().unwrap_or_default(),
        }),
        requirements: b.requirements.as_ref().map(|r| r.0.clone()),
        waiting_reason: None,
        waiting_sentence: None,
        position: None,
    }
}

/// Fills `waiting_reason`, `waiting_sentence` and `position` of the queued builds among `views`.
pub fn set_waiting(views: &mut [BuildView], waiting: &[crate::queue::Waiting]) {
    for view in views.iter_mut() {
        if let Some(w) = waiting.iter().find(|w| w.id == view.id) {
            view.waiting_reason = Some(w.reason.clone());
            view.waiting_sentence = Some(crate::queue::waiting_sentence(&w.reason).to_string());
            view.position = w.position;
        }
    }
}

pub fn attempt(a: &AttemptRow) -> AttemptView {
    AttemptView {
        attempt: a.attempt,
        worker_id: a.worker_id.clone(),
        lease_token: a.lease_token,
        assigned_at: iso(a.assigned_at),
        started_at: time(a.started_at),
        finished_at: time(a.finished_at),
        outcome: a.outcome.clone(),
        error_message: a.error_message.clone(),
    }
}

pub fn worker(w: &Worker) -> WorkerView {
    WorkerView {
        id: w.id.clone(),
        name: w.name.clone(),
        status: w.status.clone(),
        admin_state: w.admin_state.clone(),
        platforms: w.platforms.clone(),
        capabilities: w.capabilities.0.clone(),
        registered_at: iso(w.registered_at),
        last_seen_at: iso(w.last_seen_at),
        builds_completed: w.builds_completed,
        builds_failed: w.builds_failed,
        health: w.health(chrono::Utc::now()).to_string(),
        quarantined_until: w.quarantine_ends().map(iso),
        quarantine_reason: w.quarantine_reason(),
    }
}

/// A platform queue; `max_queued` is the backpressure limit and `full` whether submits are refused (R58).
pub fn queue(q: &QueueView, max_queued: i64) -> QueueInfo {
    let queued = q.scheduled + q.pending + q.retryable;
    QueueInfo {
        name: q.name.clone(),
        paused: q.paused,
        depth: Depth {
            scheduled: q.scheduled,
            pending: q.pending,
            retryable: q.retryable,
            assigned: q.assigned,
            building: q.building,
        },
        oldest_pending_age_seconds: q.oldest_pending_age_seconds,
        queued,
        max_queued,
        full: queued >= max_queued,
        waiting: Default::default(),
    }
}

/// A log line as `GET /api/builds/:id/logs` shows it (B5).
pub fn log_line(l: &LogLine) -> Value {
    json!({ "seq": l.seq, "timestamp": l.ts.timestamp_millis(), "level": l.level, "message": l.message })
}
