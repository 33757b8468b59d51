//! Leases and fencing: who holds a build's current attempt, and heartbeats that keep it.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use super::{QueueError, QueueResult, Settings};

/// The identity a caller presents for a held build: its worker id and, where it has one, the
/// attempt's lease token. Every operation on a held build matches both against the current row.
#[derive(Debug, Clone, Copy)]
pub struct Holder<'a> {
    pub worker_id: &'a str,
    pub lease_token: Option<i64>,
}

impl<'a> Holder<'a> {
    pub fn worker(worker_id: &'a str) -> Self {
        Self {
            worker_id,
            lease_token: None,
        }
    }

    pub fn attempt(worker_id: &'a str, lease_token: i64) -> Self {
        Self {
            worker_id,
            lease_token: Some(lease_token),
        }
    }
}

/// SQL condition selecting the row only while `$1` is held by `$2` (with lease token `$3` when given).
/// A macro so that statements using it stay `&'static str`.
macro_rules! held_by {
    () => {
        "id = $1 AND state IN ('assigned', 'building') AND lease_owner = $2 AND ($3::bigint IS NULL OR lease_token = $3)"
    };
}
pub(crate) use held_by;

/// What a heartbeat tells the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatOutcome {
    /// The build was cancelled while this worker held it: stop building.
    pub cancel_requested: bool,
}

/// Extends the lease and moves `assigned → building`, recording progress and stage.
///
/// A heartbeat from the last holder of a cancelled build is answered with `cancel_requested` and
/// changes nothing; any other caller that does not hold the current attempt gets an error.
pub async fn heartbeat(
    pool: &PgPool,
    build_id: &str,
    holder: Holder<'_>,
    progress: Option<i16>,
    stage: Option<&str>,
    settings: &Settings,
    now: DateTime<Utc>,
) -> QueueResult<HeartbeatOutcome> {
    const SQL: &str = concat!(
        "WITH prev AS (
            SELECT id, state, progress, stage FROM builds WHERE ",
        held_by!(),
        " FOR UPDATE
        ), hb AS (
            UPDATE builds b SET state = 'building', last_heartbeat_at = $4,
                lease_expires_at = $4 + $5::bigint * interval '1 second',
                progress = coalesce($6, b.progress), stage = coalesce($7, b.stage)
            FROM prev WHERE b.id = prev.id
            RETURNING b.id, b.attempt, b.queue, b.state, b.progress, b.stage, b.lease_owner,
                prev.state AS was, prev.progress AS was_progress, prev.stage AS was_stage
        ), started AS (
            UPDATE build_attempts a SET started_at = $4 FROM hb
            WHERE a.build_id = hb.id AND a.attempt = hb.attempt AND a.started_at IS NULL
        ), event AS (
            -- the first heartbeat starts building; later ones are events only when progress or stage moved
            INSERT INTO events (kind, build_id, worker_id, data)
            SELECT CASE WHEN was = 'assigned' THEN 'build.building' ELSE 'build.progress' END, id, lease_owner,
                jsonb_build_object('platform', queue, 'state', state, 'attempt', attempt, 'progress', progress, 'stage', stage)
            FROM hb
            WHERE was = 'assigned' OR progress IS DISTINCT FROM was_progress OR stage IS DISTINCT FROM was_stage
        )
        SELECT attempt FROM hb"
    );
    let updated: Option<i32> = sqlx::query_scalar(SQL)
        .bind(build_id)
        .bind(holder.worker_id)
        .bind(holder.lease_token)
        .bind(now)
        .bind(settings.lease_timeout_secs as i64)
        .bind(progress)
        .bind(stage)
        .fetch_optional(pool)
        .await?;
    if updated.is_some() {
        return Ok(HeartbeatOutcome {
            cancel_requested: false,
        });
    }
    let mut conn = pool.acquire().await?;
    let view = holder_view(&mut conn, build_id, holder.worker_id).await?;
    if view.state == "cancelled" && view.last_holder.as_deref() == Some(holder.worker_id) {
        return Ok(HeartbeatOutcome { cancel_requested: true });
    }
    Err(view.refusal())
}

/// Ok when `holder` holds the build's current attempt, else why not ([`refusal`]); changes nothing.
pub async fn holds_build(pool: &PgPool, build_id: &str, holder: Holder<'_>) -> QueueResult<()> {
    const SQL: &str = concat!("SELECT 1 FROM builds WHERE ", held_by!());
    let held: Option<i32> = sqlx::query_scalar(SQL)
        .bind(build_id)
        .bind(holder.worker_id)
        .bind(holder.lease_token)
        .fetch_optional(pool)
        .await?;
    match held {
        Some(_) => Ok(()),
        None => Err(refusal(pool, build_id, holder.worker_id).await?),
    }
}

/// [`holds_build`] and, when the holder holds it, `key` recorded as a pending write
/// ([`super::record_writes`]), in one statement: a result about to stream straight under its build. A
/// caller that does not hold the build records nothing and learns why.
pub async fn record_held_write(pool: &PgPool, build_id: &str, holder: Holder<'_>, key: &str) -> QueueResult<()> {
    const SQL: &str = concat!(
        "INSERT INTO pending_writes (key) SELECT $4 FROM builds WHERE ",
        held_by!(),
        " ON CONFLICT (key) DO UPDATE SET queued_at = now() RETURNING 1"
    );
    let held: Option<i32> = sqlx::query_scalar(SQL)
        .bind(build_id)
        .bind(holder.worker_id)
        .bind(holder.lease_token)
        .bind(key)
        .fetch_optional(pool)
        .await?;
    match held {
        Some(_) => Ok(()),
        None => Err(refusal(pool, build_id, holder.worker_id).await?),
    }
}

/// How a build relates to a caller whose fenced operation matched nothing.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct HolderView {
    pub state: String,
    pub last_holder: Option<String>,
    pub held_before: bool,
}

impl HolderView {
    /// The error for a caller who does not hold the current attempt.
    pub fn refusal(&self) -> QueueError {
        if self.held_before {
            QueueError::Stale
        } else {
            QueueError::NotHolder
        }
    }
}

/// The error for a caller who does not hold the build's current attempt: [`QueueError::Stale`] when it
/// held an earlier attempt (409, api.md B17), else [`QueueError::NotHolder`]; unknown build first.
pub async fn refusal(pool: &PgPool, build_id: &str, worker_id: &str) -> QueueResult<QueueError> {
    let mut conn = pool.acquire().await?;
    Ok(holder_view(&mut conn, build_id, worker_id).await?.refusal())
}

/// Reads why a fenced operation did not match: unknown build, never held, or a stale attempt.
pub(crate) async fn holder_view(conn: &mut PgConnection, build_id: &str, worker_id: &str) -> QueueResult<HolderView> {
    sqlx::query_as::<_, HolderView>(
        "SELECT b.state,
                (SELECT worker_id FROM build_attempts WHERE build_id = b.id ORDER BY attempt DESC LIMIT 1) AS last_holder,
                EXISTS (SELECT 1 FROM build_attempts WHERE build_id = b.id AND worker_id = $2) AS held_before
         FROM builds b WHERE b.id = $1",
    )
    .bind(build_id)
    .bind(worker_id)
    .fetch_optional(conn)
    .await?
    .ok_or(QueueError::BuildNotFound)
}
