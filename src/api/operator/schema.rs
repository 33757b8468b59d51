//! Schemas of the `/api/v2` bodies and answers. The views (`Build`, `Worker`, `Queue`, …) are the
//! types `ops::views` renders (shared with the operator CLI's database mode, which prints the same JSON).

#![allow(dead_code)]

use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

pub use crate::ops::views::{
    AttemptPage, AttemptView as Attempt, BuildDetail, BuildPage, BuildView as Build, QueueInfo as Queue, QueuePage,
    WorkerPage, WorkerView as Worker,
};

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
