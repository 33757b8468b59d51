//! The durable build queue. The `builds` row **is** the job: there is no in-memory queue, so every
//! controller instance sees the same queue and a crash loses nothing.
//!
//! # States
//!
//! ```text
//! scheduled ──(run_at passes)──▶ pending ──claim──▶ assigned ──first heartbeat──▶ building
//!     ▲                                                 │                            │
//!     └──────── retryable ◀── infrastructure failure ───┴────────────────────────────┤
//!                                                        completed | failed | cancelled (final)
//! ```
//!
//! # Leases and fencing
//!
//! A claim mints a new attempt: `attempt + 1`, a fresh `lease_token` from a database sequence, an OTP and a
//! lease expiry (the first-heartbeat grace). Every later operation on a held build names the holder
//! ([`Holder`]: worker id and, where the caller can present it, the lease token) and is a conditional
//! update on `state IN (assigned, building) AND lease_owner = … AND lease_token = …`. A caller whose
//! attempt is no longer current matches no row and changes nothing: it gets [`QueueError::Stale`].
//!
//! Final states never change except by an explicit operator retry. Each operation is one short
//! transaction; no lock is held while a build runs. Time is always passed in (`now`), never read inside.

mod attempts;
mod backoff;
mod builds;
mod cancel;
mod claim;
pub mod clock;
mod diagnostics;
mod emit;
mod enqueue;
pub mod health;
pub mod idempotency;
mod lease;
mod logs;
mod maintenance;
mod model;
pub mod operator;
mod pending;
mod quota;
mod requirements;
mod retention;
pub mod supersede;
mod vm;
mod waiting;
mod wakeups;
mod workers;

pub use attempts::{Failure, FailureKind, OWNER_RECLAIMED, complete, complete_recording, fail, release_for_owner};
pub use backoff::backoff;
pub use builds::{
    BuildFilter, FleetStats, active_builds, certs_to_purge, clear_certs, find_build, fleet_stats, list_builds,
    queue_counts, record_cpu_sample,
};
pub use cancel::{CancelOutcome, CancelReason, cancel, cancel_because};
pub use claim::{Claim, claim, claim_sql, held_back_by_requeue};
pub use diagnostics::{DiagnosticReport, NewReport, list_reports, store_report};
pub(crate) use enqueue::notify_ready;
/// Locks `mutex`, taking it over from a holder that panicked (the in-memory hints and spares it guards
/// stay usable: each update leaves them consistent).
pub(crate) fn locked<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub use enqueue::{
    Enqueued, FullQueues, KeyQuota, NOTIFY_CHANNEL, NewBuild, RETRY_NOT_FINISHED, check_retry, count_refusal, enqueue,
    enqueue_bounded, enqueue_retry, enqueue_submit, full_queues, watch_full_queues,
};
pub use lease::{HeartbeatOutcome, Holder, heartbeat, holds_build, record_held_write, refusal};
pub use logs::{LogLine, NewLogLine, append_system_log, append_worker_logs, read_logs, truncate_message};
pub use maintenance::{RECONCILE_KINDS, fail_past_deadline, promote_due, reconcile, rescue_expired};
pub use model::{Build, BuildState, Platform, QueueCounts, ResultFile, Worker};
pub use pending::{
    SpareKeys, doom_forgotten_write, doom_stale_writes, doom_writes, forget_writes, postpone_writes, record_writes,
    refresh_slow_writes, refresh_writes,
};
pub use quota::submitter_queue_full;
pub use requirements::{Requirements, unmatched};
pub use retention::{
    claim_tick, delete_history, forget_artifacts, mark_offline, prunable_builds, prune_events, stale_artifacts,
};
pub use vm::{VmTokenRecord, authenticate_vm, mark_vm_ready};
pub use waiting::{REASONS as WAITING_REASONS, Waiting, sentence as waiting_sentence, waiting_counts, waiting_of};
pub use wakeups::{Generations, Subscription, Wakeups, listen};
pub use workers::{
    MAX_CAPABILITIES_BYTES, MAX_NAME_BYTES, RegisterRequest, Registration, find_worker, platforms_of, register,
    touch_worker, unregister,
};

use crate::config::QueueConfig;

/// Errors of queue operations. Client-facing variants map to exact API answers in `api::error`.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("build not found")]
    BuildNotFound,
    #[error("worker not found")]
    WorkerNotFound,
    /// The caller never held an attempt of this build.
    #[error("build not assigned to this worker")]
    NotHolder,
    /// The caller's attempt is no longer current (rescued, reassigned, finished, cancelled).
    #[error("build attempt is no longer active")]
    Stale,
    #[error("build already finished")]
    AlreadyFinished,
    /// A registration for an existing worker by a caller who is not that worker.
    #[error("not allowed to re-register this worker")]
    Forbidden,
    /// Input the queue refuses (400 with this message).
    #[error("{0}")]
    Invalid(String),
    /// The action conflicts with the current state (409 with this message).
    #[error("{0}")]
    Conflict(String),
    /// The platform queue holds as many queued builds as allowed (backpressure).
    #[error("build queue is full")]
    QueueFull,
    /// The submitting key has its max queued builds queued (scheduling.md quotas).
    #[error("submitter queue limit reached")]
    SubmitterQueueFull,
    /// A build-token retry while an earlier retry of the same build is unfinished (its id).
    #[error("a retry of this build is still unfinished: {0}")]
    RetryInProgress(String),
    /// A build token reached `CONTROLLER_MAX_RETRIES_PER_BUILD` retries of this build's family (T8).
    #[error("retry limit of {0} reached")]
    RetryLimit(i64),
    /// An object this request wrote was chosen for deletion (its key doomed) before the statement
    /// linking it could claim it: nothing was linked; the request may be sent again (503).
    #[error("the stored objects of this request were removed before they could be linked")]
    ObjectsGone,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// A database error before a transaction's COMMIT: nothing was committed.
    #[error(transparent)]
    DbUncommitted(sqlx::Error),
}

impl QueueError {
    /// Whether the statement that failed may still have committed. Only a connection-class error
    /// (the connection cut, the server terminating the backend, a failover) of a COMMIT, or of a
    /// single autocommit statement in flight, leaves the outcome unknown until the row is read again.
    /// A refusal, an error before a transaction's COMMIT ([`QueueError::DbUncommitted`]), an error the
    /// server answered for the statement itself, or a pool that gave no connection is definite.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            QueueError::Db(e) => connection_lost(e),
            _ => false,
        }
    }

    /// The same error, known to have happened before its transaction committed.
    pub fn uncommitted(self) -> Self {
        match self {
            QueueError::Db(e) => QueueError::DbUncommitted(e),
            other => other,
        }
    }
}

/// Whether the connection was lost while a statement was in flight: its outcome is unknown. The
/// pool's own errors (no connection given) and errors the server answered are not.
fn connection_lost(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        // 08: connection exception; 57P: the server terminating the backend (shutdown, crash, admin).
        sqlx::Error::Database(e) => e.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

pub type QueueResult<T> = Result<T, QueueError>;

/// Queue settings in the form the engine uses.
pub type Settings = QueueConfig;
