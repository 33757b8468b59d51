//! Schemas of the `/api/v2` answers. The JSON itself is rendered by `ops::views` (shared with the
//! operator CLI's database mode, which prints the same JSON); these types describe it field for field,
//! and `tests/api/openapi_contract.rs` checks live answers against them.

#![allow(dead_code)]

use serde::Serialize;
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

/// Native build states.
#[derive(Serialize, ToSchema)]
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

#[derive(Serialize, ToSchema)]
pub struct Timings {
    /// Milliseconds from start to completion, `null` until both are known.
    pub running_ms: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct SourceArtifact {
    pub size: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct ResultArtifact {
    pub size: Option<i64>,
    pub sha256: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Artifacts {
    pub source: Option<SourceArtifact>,
    pub result: Option<ResultArtifact>,
    /// Whether certificates are held (they are purged when the build is final).
    pub certs: bool,
}

/// A build with every job column (secrets excluded); times are RFC 3339.
#[derive(Serialize, ToSchema)]
pub struct Build {
    pub id: String,
    pub state: NativeState,
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
    pub progress: Option<i32>,
    pub stage: Option<String>,
    pub cancel_requested_at: Option<String>,
    /// Every failure of every attempt, oldest first.
    pub errors: Vec<Value>,
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
}

/// One attempt of a build.
#[derive(Serialize, ToSchema)]
pub struct Attempt {
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
#[derive(Serialize, ToSchema)]
pub struct BuildDetail {
    #[serde(flatten)]
    pub build: Build,
    pub attempts: Vec<Attempt>,
}

#[derive(Serialize, ToSchema)]
pub struct BuildPage {
    pub items: Vec<Build>,
    /// Pass as `?cursor=` for the next page; `null` on the last.
    pub next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AttemptPage {
    pub items: Vec<Attempt>,
    /// Always `null` (every attempt is listed).
    pub next_cursor: Option<String>,
}

/// A worker and its operator state.
#[derive(Serialize, ToSchema)]
pub struct Worker {
    pub id: String,
    pub name: String,
    /// `idle`, `busy` or `offline`.
    pub status: String,
    /// `active`, `draining`, `disabled` or `revoked`.
    pub admin_state: String,
    pub platforms: Vec<String>,
    /// As registered.
    pub capabilities: Value,
    pub registered_at: String,
    pub last_seen_at: String,
    pub builds_completed: i64,
    pub builds_failed: i64,
}

#[derive(Serialize, ToSchema)]
pub struct WorkerPage {
    pub items: Vec<Worker>,
    pub next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Depth {
    pub scheduled: i64,
    pub pending: i64,
    pub retryable: i64,
    pub assigned: i64,
    pub building: i64,
}

/// A platform queue.
#[derive(Serialize, ToSchema)]
pub struct Queue {
    pub name: String,
    pub paused: bool,
    pub depth: Depth,
    pub oldest_pending_age_seconds: Option<i64>,
    /// Scheduled + pending + retryable.
    pub queued: i64,
    /// The backpressure limit (`CONTROLLER_MAX_QUEUED_BUILDS`).
    pub max_queued: i64,
    /// Whether submits are refused (503 `queue_full`).
    pub full: bool,
}

#[derive(Serialize, ToSchema)]
pub struct QueuePage {
    pub items: Vec<Queue>,
    /// Always `null`.
    pub next_cursor: Option<String>,
}

/// A queue paused or resumed.
#[derive(Serialize, ToSchema)]
pub struct QueueState {
    pub name: String,
    pub paused: bool,
}

/// The build token revoked.
#[derive(Serialize, ToSchema)]
pub struct Revoked {
    /// Always `true`.
    pub revoked: bool,
}

/// `PATCH /api/v2/builds/{id}`: any of the fields, for a build that is not running.
#[derive(Serialize, serde::Deserialize, ToSchema)]
pub struct BuildPatch {
    /// −100..100.
    pub priority: Option<i64>,
    /// RFC 3339; a future time makes the build scheduled.
    pub run_at: Option<String>,
    /// 1..10.
    pub max_attempts: Option<i64>,
}

/// `GET /api/v2/events` filters.
#[derive(serde::Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only events of this build.
    pub build: Option<String>,
    /// Only events of this worker.
    pub worker: Option<String>,
    /// Comma-separated kinds, with `*` wildcards: `build.log,worker.*`.
    pub kind: Option<String>,
    /// Resume after this event id (the `Last-Event-ID` header wins).
    pub last_event_id: Option<String>,
}
