//! Operator operations shared by the `/api/v2` handlers and the `expo-controller` CLI's database
//! mode, so both give the same JSON and the same errors. They sit below the API layer: the CLI uses
//! them without depending on `api`, and `api` turns an [`OpError`] into its one error type.

pub mod keys;
pub mod views;

use std::borrow::Cow;

use chrono::Utc;
use serde_json::{Value, json};
use sqlx::PgPool;

pub use crate::audit::Actor;
use crate::config::QueueConfig;
use crate::ids;
use crate::queue::operator::{self, WrongState};
use crate::queue::{self, Build, BuildFilter, BuildState, Platform, QueueError};

/// Why an operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// Refused: the HTTP status the API answers with, the message and the stable code (`{"error", "code"}`).
    #[error("{message}")]
    Refused {
        status: u16,
        message: Cow<'static, str>,
        code: &'static str,
    },
    /// Anything else from the queue (the database, or a refusal the API maps itself).
    #[error(transparent)]
    Queue(QueueError),
}

pub type OpResult<T> = Result<T, OpError>;

impl OpError {
    pub(crate) fn refused(status: u16, message: impl Into<Cow<'static, str>>, code: &'static str) -> Self {
        OpError::Refused {
            status,
            message: message.into(),
            code,
        }
    }

    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::refused(400, message, "bad_request")
    }

    fn conflict(message: impl Into<Cow<'static, str>>) -> Self {
        Self::refused(409, message, "conflict")
    }

    /// The `{"error", "code"}` body the API answers with, when the error is a refusal the caller can
    /// act on; `None` for database and internal failures.
    pub fn body(&self) -> Option<Value> {
        let refusal = match self {
            OpError::Refused { status, message, code } => Refusal {
                status: *status,
                message: message.clone(),
                code,
                field: None,
            },
            OpError::Queue(error) => refusal(error)?,
        };
        let mut body = json!({ "error": refusal.message, "code": refusal.code });
        if let Some((name, value)) = refusal.field {
            body[name] = json!(value);
        }
        Some(body)
    }
}

/// How a queue refusal reads to a caller: the HTTP status, the message, the stable code, and one extra
/// field. The one table both the API's error type and the CLI's database mode answer from.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: u16,
    pub message: Cow<'static, str>,
    pub code: &'static str,
    pub field: Option<(&'static str, String)>,
}

/// The refusal a queue error stands for; `None` for database failures.
pub fn refusal(error: &QueueError) -> Option<Refusal> {
    let plain = |status: u16, message: Cow<'static, str>, code: &'static str| Refusal {
        status,
        message,
        code,
        field: None,
    };
    Some(match error {
        QueueError::BuildNotFound => plain(404, "Build not found".into(), "build_not_found"),
        QueueError::WorkerNotFound => plain(404, "Worker not found".into(), "worker_not_found"),
        QueueError::NotHolder => plain(403, "Worker not authorized for this build".into(), "forbidden"),
        QueueError::Stale => plain(409, "Build attempt is no longer active".into(), "attempt_not_active"),
        QueueError::AlreadyFinished => plain(400, "Build already finished".into(), "bad_request"),
        QueueError::Forbidden => plain(403, "Invalid or expired worker token".into(), "forbidden"),
        QueueError::Invalid(message) => plain(400, message.clone().into(), "invalid_input"),
        QueueError::Conflict(message) => plain(409, message.clone().into(), "conflict"),
        QueueError::QueueFull => plain(503, "Build queue is full".into(), "queue_full"),
        QueueError::SubmitterQueueFull => plain(429, "Submitter queue limit reached".into(), "submitter_queue_full"),
        QueueError::RetryInProgress(id) => Refusal {
            status: 409,
            message: format!("A retry of this build is still unfinished: {id}").into(),
            code: "retry_in_progress",
            field: Some(("retry_build_id", id.clone())),
        },
        QueueError::RetryLimit(max) => plain(
            409,
            format!("This build was retried {max} times, the most a build token may; submit a new build").into(),
            "retry_limit",
        ),
        QueueError::Db(_) | QueueError::DbUncommitted(_) | QueueError::ObjectsGone => return None,
    })
}

impl From<QueueError> for OpError {
    fn from(error: QueueError) -> Self {
        OpError::Queue(error)
    }
}

impl From<sqlx::Error> for OpError {
    fn from(error: sqlx::Error) -> Self {
        OpError::Queue(QueueError::Db(error))
    }
}

fn conflict(wrong: WrongState) -> OpError {
    OpError::conflict(wrong.0)
}

/// The filter of a build listing from its textual parts, checked as `GET /api/v2/builds` checks them:
/// `state` may list several states separated by commas.
pub fn build_filter(
    state: Option<&str>,
    platform: Option<&str>,
    worker: Option<&str>,
    cursor: Option<&str>,
    limit: i64,
) -> OpResult<BuildFilter> {
    let states = match state {
        None | Some("") => None,
        Some(list) => Some(
            list.split(',')
                .map(|s| BuildState::parse(s.trim()).map(|s| s.as_str().to_string()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| OpError::bad_request("Invalid state"))?,
        ),
    };
    let platform = match platform {
        None | Some("") => None,
        Some(p) => Some(Platform::parse(p).ok_or_else(|| OpError::bad_request("Invalid platform"))?),
    };
    let cursor = cursor.filter(|c| !c.is_empty());
    if cursor.is_some_and(|c| !ids::valid_id(c)) {
        return Err(OpError::bad_request("Invalid cursor"));
    }
    // A worker's id or its name (what operators know it by).
    let worker_id = match worker.map(str::trim).filter(|w| !w.is_empty()) {
        Some(w) if w.len() > 200 || w.contains(char::is_control) => {
            return Err(OpError::bad_request("Invalid worker id or name"));
        }
        other => other.map(str::to_string),
    };
    if !(1..=500).contains(&limit) {
        return Err(OpError::bad_request("Invalid limit: must be an integer from 1 to 500"));
    }
    Ok(BuildFilter {
        submitted_by: None,
        states,
        platform,
        worker_id,
        before: cursor.map(str::to_string),
        since: None,
        limit,
    })
}

/// A page of builds, newest first: `{"items", "next_cursor"}`.
pub async fn list_builds(pool: &PgPool, mut filter: BuildFilter) -> OpResult<Value> {
    let limit = filter.limit;
    filter.limit = limit + 1;
    let mut builds = queue::list_builds(pool, &filter).await?;
    let more = builds.len() as i64 > limit;
    builds.truncate(limit as usize);
    let next_cursor = if more {
        builds.last().map(|b| b.id.clone())
    } else {
        None
    };
    let mut items: Vec<views::BuildView> = builds.iter().map(views::build).collect();
    let queued: Vec<String> = builds
        .iter()
        .filter(|b| b.state().is_queued())
        .map(|b| b.id.clone())
        .collect();
    views::set_waiting(&mut items, &queue::waiting_of(pool, &queued, Utc::now()).await?);
    Ok(json!(views::BuildPage { items, next_cursor }))
}

/// The view of one build, with its waiting reason and position when it is queued (as `show` and the
/// list answer them): what the v2 mutations (retry, requeue, patch) answer.
pub async fn build_view(pool: &PgPool, build: &queue::Build) -> OpResult<views::BuildView> {
    let mut view = [views::build(build)];
    if build.state().is_queued() {
        views::set_waiting(
            &mut view,
            &queue::waiting_of(pool, std::slice::from_ref(&build.id), Utc::now()).await?,
        );
    }
    let [view] = view;
    Ok(view)
}

/// One build with its attempts.
pub async fn show_build(pool: &PgPool, id: &str) -> OpResult<Value> {
    let build = queue::find_build(pool, id).await?.ok_or(QueueError::BuildNotFound)?;
    let attempts = operator::attempts_of(pool, id).await?;
    let view = build_view(pool, &build).await?;
    Ok(json!(views::BuildDetail {
        build: view,
        attempts: attempts.iter().map(views::attempt).collect(),
    }))
}

pub async fn cancel_build(pool: &PgPool, id: &str, actor: &Actor) -> OpResult<Value> {
    let outcome = queue::cancel(pool, id, Utc::now(), actor).await.map_err(|e| match e {
        QueueError::AlreadyFinished => OpError::conflict("Build already finished"),
        other => other.into(),
    })?;
    Ok(json!(views::build(&outcome.build)))
}

/// Re-runs a failed or cancelled build as a new attempt of the same build.
pub async fn retry(pool: &PgPool, id: &str, actor: &Actor) -> OpResult<Build> {
    operator::retry_same(pool, id, Utc::now(), actor)
        .await?
        .map_err(conflict)
}

/// Gives a running attempt back to the queue (and drains its worker with `drain`).
pub async fn requeue(pool: &PgPool, id: &str, drain: bool, actor: &Actor) -> OpResult<Build> {
    operator::requeue(pool, id, drain, Utc::now(), actor)
        .await?
        .map_err(conflict)
}

/// Changes priority, run_at (RFC 3339) or max_attempts of a build that is not running, each checked
/// as `PATCH /api/v2/builds/:id` checks them (in that order: priority, max_attempts, run_at).
pub async fn patch(
    pool: &PgPool,
    id: &str,
    priority: Option<i64>,
    run_at: Option<&str>,
    max_attempts: Option<i64>,
    actor: &Actor,
) -> OpResult<Build> {
    let priority = match priority {
        Some(p) if (-100..=100).contains(&p) => Some(p as i32),
        Some(_) => return Err(OpError::bad_request("priority must be an integer from -100 to 100")),
        None => None,
    };
    let max_attempts = match max_attempts {
        Some(m) if (1..=10).contains(&m) => Some(m as i32),
        Some(_) => return Err(OpError::bad_request("max_attempts must be an integer from 1 to 10")),
        None => None,
    };
    let run_at = match run_at {
        None => None,
        Some(raw) => Some(
            chrono::DateTime::parse_from_rfc3339(raw)
                .map_err(|_| OpError::bad_request("run_at must be an RFC 3339 time"))?
                .with_timezone(&Utc),
        ),
    };
    operator::patch(pool, id, priority, run_at, max_attempts, Utc::now(), actor)
        .await?
        .map_err(conflict)
}

pub async fn retry_build(pool: &PgPool, id: &str, actor: &Actor) -> OpResult<Value> {
    Ok(json!(views::build(&retry(pool, id, actor).await?)))
}

pub async fn requeue_build(pool: &PgPool, id: &str, drain: bool, actor: &Actor) -> OpResult<Value> {
    Ok(json!(views::build(&requeue(pool, id, drain, actor).await?)))
}

/// Changes the priority of a build that is not running (as `PATCH /api/v2/builds/:id {"priority"}`).
pub async fn set_priority(pool: &PgPool, id: &str, priority: i64, actor: &Actor) -> OpResult<Value> {
    Ok(json!(views::build(
        &patch(pool, id, Some(priority), None, None, actor).await?
    )))
}

/// Log lines of a build after `after`, oldest first, as `GET /api/builds/:id/logs` answers (B5).
pub async fn read_logs(pool: &PgPool, id: &str, after: i64, limit: Option<i64>) -> OpResult<Value> {
    queue::find_build(pool, id).await?.ok_or(QueueError::BuildNotFound)?;
    let lines = queue::read_logs(pool, id, after, limit).await?;
    Ok(json!({ "build_id": id, "logs": lines.iter().map(views::log_line).collect::<Vec<_>>() }))
}

pub async fn set_paused(pool: &PgPool, name: &str, paused: bool, actor: &Actor) -> OpResult<Value> {
    let platform = Platform::parse(name).ok_or_else(|| OpError::refused(404, "Queue not found", "not_found"))?;
    operator::set_paused(pool, platform, paused, Utc::now(), actor).await?;
    Ok(json!({ "name": name, "paused": paused }))
}

/// Every platform queue: `{"items", "next_cursor": null}` as `GET /api/v2/queues`.
pub async fn list_queues(pool: &PgPool, settings: &QueueConfig) -> OpResult<Value> {
    let mut waiting = queue::waiting_counts(pool, Utc::now()).await?;
    let items = operator::queue_views(pool, Utc::now())
        .await?
        .iter()
        .map(|q| views::QueueInfo {
            waiting: waiting.remove(&q.name).unwrap_or_default(),
            ..views::queue(q, settings.max_queued_builds)
        })
        .collect();
    Ok(json!(views::QueuePage {
        items,
        next_cursor: None,
    }))
}

/// A page of workers by id: `{"items", "next_cursor"}`.
pub async fn list_workers(pool: &PgPool, cursor: Option<&str>, limit: i64) -> OpResult<Value> {
    let mut workers = operator::list_workers(pool, cursor, limit + 1).await?;
    let more = workers.len() as i64 > limit;
    workers.truncate(limit as usize);
    let next_cursor = if more {
        workers.last().map(|w| w.id.clone())
    } else {
        None
    };
    Ok(json!(views::WorkerPage {
        items: workers.iter().map(views::worker).collect(),
        next_cursor,
    }))
}

/// One worker.
pub async fn show_worker(pool: &PgPool, id: &str) -> OpResult<Value> {
    let worker = queue::find_worker(pool, id).await?.ok_or(QueueError::WorkerNotFound)?;
    Ok(json!(views::worker(&worker)))
}

/// Sets a worker's operator state (`active`, `draining`, `disabled`, `revoked`).
pub async fn set_worker_state(
    pool: &PgPool,
    settings: &QueueConfig,
    id: &str,
    state: &'static str,
    actor: &Actor,
) -> OpResult<Value> {
    let worker = operator::set_worker_state(pool, id, state, settings, Utc::now(), actor).await?;
    Ok(json!(views::worker(&worker)))
}

/// Releases a worker from quarantine or probation (fleet-health.md).
pub async fn release_worker(pool: &PgPool, id: &str, actor: &Actor) -> OpResult<Value> {
    let worker = queue::health::release(pool, id, Utc::now(), actor).await?;
    Ok(json!(views::worker(&worker)))
}

/// A page of the audit log, newest first (`GET /api/v2/audit`, `expo-controller audit list`).
pub async fn list_audit(
    pool: &PgPool,
    actor: Option<&str>,
    action: Option<&str>,
    target: Option<&str>,
    since: Option<&str>,
    cursor: Option<&str>,
    limit: i64,
) -> OpResult<crate::audit::AuditPage> {
    let filter =
        crate::audit::AuditFilter::parse(actor, action, target, since, cursor, limit).map_err(OpError::bad_request)?;
    Ok(crate::audit::list(pool, &filter).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiError;

    /// The CLI's database mode shows what the API would answer: same message, same code.
    #[test]
    fn refusals_read_as_the_api_answers_them() {
        let cases: [fn() -> QueueError; 9] = [
            || QueueError::RetryLimit(10),
            || QueueError::BuildNotFound,
            || QueueError::WorkerNotFound,
            || QueueError::Invalid("bad".into()),
            || QueueError::Conflict("no".into()),
            || QueueError::AlreadyFinished,
            || QueueError::QueueFull,
            || QueueError::SubmitterQueueFull,
            || QueueError::RetryInProgress("abc".into()),
        ];
        for case in cases {
            let body = OpError::from(case()).body().expect("a refusal");
            let api = ApiError::from(case());
            assert_eq!(body["error"], api.message(), "{:?}", case());
            assert_eq!(body["code"], api.code(), "{:?}", case());
        }
        assert!(
            OpError::from(QueueError::Db(sqlx::Error::PoolTimedOut))
                .body()
                .is_none()
        );
        let refused = OpError::bad_request("Invalid state");
        assert_eq!(
            refused.body(),
            Some(json!({ "error": "Invalid state", "code": "bad_request" }))
        );
    }
}
