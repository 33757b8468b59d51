//! Ending an attempt: completion, build failures, infrastructure failures and timeouts.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use super::backoff::random_backoff;
use super::emit;
use super::lease::{Holder, held_by, holder_view};
use super::logs::append_system_log;
use super::{Build, QueueError, QueueResult, ResultFile, Settings};

/// Why an attempt failed; decides whether the build is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The worker reported that the app failed to build: final unless build failures are retried.
    Build,
    /// Lease expired, worker unregistered/abandoned/offline, controller-side error: retried.
    Infrastructure,
    /// The build deadline passed: final.
    Timeout,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Build => "build_failure",
            FailureKind::Infrastructure => "infrastructure",
            FailureKind::Timeout => "timeout",
        }
    }
}

/// A failed attempt: its kind and a message for the submitter.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

/// Marks the holder's attempt completed with its stored result. A stale caller changes nothing.
///
/// The result must be a pending write: its key is claimed under a row lock and the completion happens
/// only if it is present and not doomed by a sweep; otherwise nothing changes
/// ([`QueueError::ObjectsGone`]).
pub async fn complete(
    pool: &PgPool,
    build_id: &str,
    holder: Holder<'_>,
    result: &ResultFile,
    now: DateTime<Utc>,
) -> QueueResult<Build> {
    complete_recording(pool, build_id, holder, result, None, now).await
}

/// [`complete`] that also records `spare` (a key for a later result, `super::SpareKeys`) as a pending
/// write when the attempt completes, in the same statement.
pub async fn complete_recording(
    pool: &PgPool,
    build_id: &str,
    holder: Holder<'_>,
    result: &ResultFile,
    spare: Option<&str>,
    now: DateTime<Utc>,
) -> QueueResult<Build> {
    const SQL: &str = concat!(
        "WITH claimed AS (
            SELECT key FROM pending_writes WHERE key = $5 AND NOT doomed FOR UPDATE
        ), done AS (
            UPDATE builds SET state = 'completed', completed_at = $4, finished_reason = 'completed',
                progress = 100, result_key = $5, result_size = $6, result_sha256 = $7, result_attempt = attempt,
                lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
                otp_hash = NULL, otp_expires_at = NULL, vm_token_hash = NULL, vm_token_sealed = NULL, vm_token_expires_at = NULL,
                log_seq = log_seq + 1
            WHERE ",
        held_by!(),
        " AND EXISTS (SELECT 1 FROM claimed)
            RETURNING *
        ), attempt_row AS (
            UPDATE build_attempts a SET finished_at = $4, outcome = 'completed',
                started_at = coalesce(a.started_at, $4)
            FROM done WHERE a.build_id = done.id AND a.attempt = done.attempt
        ), worker_row AS (
            -- a completed build on probation (quarantine over) clears the worker's record
            UPDATE workers SET builds_completed = builds_completed + 1,
                status = CASE WHEN status = 'busy' THEN 'idle' ELSE status END,
                health = CASE WHEN health = 'quarantined' AND quarantined_until <= $4 THEN 'ok' ELSE health END,
                quarantine_reason = CASE WHEN health = 'quarantined' AND quarantined_until <= $4 THEN NULL ELSE quarantine_reason END,
                quarantine_secs = CASE WHEN health = 'quarantined' AND quarantined_until <= $4 THEN NULL ELSE quarantine_secs END,
                reputation_since = CASE WHEN health = 'quarantined' AND quarantined_until <= $4 THEN $4 ELSE reputation_since END,
                quarantined_until = CASE WHEN health = 'quarantined' AND quarantined_until <= $4 THEN NULL ELSE quarantined_until END
            WHERE id = $2 AND EXISTS (SELECT 1 FROM done)
        ), log_row AS (
            INSERT INTO build_logs (build_id, seq, ts, level, message)
            SELECT id, log_seq, $4, 'info', 'Build completed' FROM done
        ), event AS (
            INSERT INTO events (kind, build_id, worker_id, data)
            SELECT 'build.completed', id, $2, jsonb_build_object('platform', queue, 'state', state,
                'attempt', attempt, 'log_seq', log_seq, 'result_size', result_size)
            FROM done
        ), linked AS (
            -- the result is named by the row from now on: no longer pending
            DELETE FROM pending_writes WHERE key = $5 AND EXISTS (SELECT 1 FROM done)
        ), spare AS (
            -- a key for a later result's object, recorded before it is written (queue::SpareKeys)
            INSERT INTO pending_writes (key) SELECT $8 FROM done WHERE $8::text IS NOT NULL
            ON CONFLICT (key) DO NOTHING
        )
        SELECT * FROM done"
    );
    let done = sqlx::query_as::<_, Build>(SQL)
        .bind(build_id)
        .bind(holder.worker_id)
        .bind(holder.lease_token)
        .bind(now)
        .bind(&result.key)
        .bind(result.size)
        .bind(&result.sha256)
        .bind(spare)
        .fetch_optional(pool)
        .await?;
    match done {
        Some(build) => {
            crate::metrics::build_ended(&build, "completed", now);
            Ok(build)
        }
        // Nothing changed: a caller that no longer holds the build is refused as such; one that
        // still holds it lost its result to a sweep (the key doomed or gone).
        None => match super::lease::holds_build(pool, build_id, holder).await {
            Ok(()) => Err(QueueError::ObjectsGone),
            Err(refused) => Err(refused.uncommitted()),
        },
    }
}

/// Begins a transaction holding the lock on the attempt `holder` holds on `build_id`, or ends it and
/// says why there is none (unknown build, never held, attempt over).
async fn begin_held_attempt<'c>(
    pool: &'c PgPool,
    build_id: &str,
    holder: Holder<'_>,
) -> QueueResult<(sqlx::Transaction<'c, sqlx::Postgres>, LockedAttempt)> {
    const LOCK_SQL: &str = concat!(
        "SELECT ",
        locked_columns!(),
        " FROM builds WHERE ",
        held_by!(),
        " FOR UPDATE"
    );
    let mut tx = pool.begin().await?;
    let locked: Option<LockedAttempt> = sqlx::query_as(LOCK_SQL)
        .bind(build_id)
        .bind(holder.worker_id)
        .bind(holder.lease_token)
        .fetch_optional(&mut *tx)
        .await?;
    match locked {
        Some(locked) => Ok((tx, locked)),
        None => {
            let refusal = holder_view(&mut tx, build_id, holder.worker_id).await?.refusal();
            tx.rollback().await?;
            Err(refusal)
        }
    }
}

/// Fails the holder's attempt: retryable with backoff or final, by kind and attempts left.
pub async fn fail(
    pool: &PgPool,
    build_id: &str,
    holder: Holder<'_>,
    failure: &Failure,
    settings: &Settings,
    now: DateTime<Utc>,
) -> QueueResult<Build> {
    let (mut tx, locked) = begin_held_attempt(pool, build_id, holder).await?;
    let build = end_attempt(&mut tx, &locked, failure, settings, now).await?;
    emit::emit_failure(&mut tx, &build, Some(holder.worker_id), failure, emit::Ended::Reported).await?;
    tx.commit().await?;
    Ok(build)
}

/// The reason a token-era worker gives when its owner takes the Mac back (fleet-health.md).
pub const OWNER_RECLAIMED: &str = "owner_reclaimed";

/// The holder gives its attempt back because the Mac's owner took it back: the attempt ends `released`,
/// the build is pending again at the front of its queue (its `run_at` is kept), the attempt does not count
/// against `max_attempts` nor the worker's reputation, and retry-elsewhere keeps it from this worker. Past
/// `CONTROLLER_MAX_RELEASES` releases of the build it is an infrastructure failure instead.
pub async fn release_for_owner(
    pool: &PgPool,
    build_id: &str,
    holder: Holder<'_>,
    settings: &Settings,
    now: DateTime<Utc>,
) -> QueueResult<Build> {
    let (mut tx, locked) = begin_held_attempt(pool, build_id, holder).await?;
    if locked.releases >= settings.max_releases {
        let failure = Failure {
            kind: FailureKind::Infrastructure,
            message: format!(
                "Worker gave the build back for its owner more than {} times",
                settings.max_releases
            ),
        };
        let build = end_attempt(&mut tx, &locked, &failure, settings, now).await?;
        emit::emit_failure(&mut tx, &build, Some(holder.worker_id), &failure, emit::Ended::Reported).await?;
        tx.commit().await?;
        return Ok(build);
    }
    sqlx::query(
        "UPDATE build_attempts SET finished_at = $3, outcome = 'released', error_message = 'The owner took the Mac back'
         WHERE build_id = $1 AND attempt = $2",
    )
    .bind(&locked.id)
    .bind(locked.attempt)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE workers SET status = 'idle' WHERE id = $1 AND status = 'busy'")
        .bind(holder.worker_id)
        .execute(&mut *tx)
        .await?;
    let build: Build = sqlx::query_as(
        "UPDATE builds SET state = 'pending', releases = releases + 1, progress = NULL, stage = NULL,
            lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
            otp_hash = NULL, otp_expires_at = NULL, vm_token_hash = NULL, vm_token_sealed = NULL,
            vm_token_expires_at = NULL, vm_ready_at = NULL
         WHERE id = $1 RETURNING *",
    )
    .bind(&locked.id)
    .fetch_one(&mut *tx)
    .await?;
    super::enqueue::notify_ready(&mut tx, &[(build.queue.as_str(), build.id.as_str())]).await?;
    let line = format!(
        "Attempt {} given back: the owner took the Mac back (release {} of {})",
        locked.attempt,
        locked.releases + 1,
        settings.max_releases
    );
    append_system_log(&mut tx, &locked.id, "warn", &line, now).await?;
    let data = serde_json::json!({ "reason": OWNER_RECLAIMED, "releases": locked.releases + 1 });
    emit::emit_build(&mut tx, "build.released", &build, Some(holder.worker_id), data).await?;
    tx.commit().await?;
    Ok(build)
}

/// Columns of a held row that ending its attempt needs (a macro, to build static SQL).
macro_rules! locked_columns {
    () => {
        "id, attempt, max_attempts, retry_build_failures, lease_owner, releases"
    };
}
pub(crate) use locked_columns;

/// A held build locked `FOR UPDATE` in the caller's transaction.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct LockedAttempt {
    pub id: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub retry_build_failures: bool,
    pub lease_owner: Option<String>,
    /// Attempts given back for their owner: counted by `attempt`, not against `max_attempts`.
    pub releases: i32,
}

/// Whether a failure of `kind` on `attempt` leads to another attempt.
pub(crate) fn retries(kind: FailureKind, attempt: i32, max_attempts: i32, retry_build_failures: bool) -> bool {
    let attempts_left = attempt < max_attempts;
    match kind {
        FailureKind::Infrastructure => attempts_left,
        FailureKind::Build => retry_build_failures && attempts_left,
        FailureKind::Timeout => false,
    }
}

/// Ends a locked attempt with a failure: records it in `errors` and the attempt row, frees the worker,
/// and makes the build `retryable` (run_at = now + backoff) or `failed`.
pub(crate) async fn end_attempt(
    conn: &mut PgConnection,
    locked: &LockedAttempt,
    failure: &Failure,
    settings: &Settings,
    now: DateTime<Utc>,
) -> QueueResult<Build> {
    let retry_flag = locked.retry_build_failures || settings.retry_build_failures;
    let spent = locked.attempt - locked.releases;
    let retry = retries(failure.kind, spent, locked.max_attempts, retry_flag);
    let run_at = retry.then(|| {
        let delay = random_backoff(
            locked.attempt,
            std::time::Duration::from_secs(settings.backoff_base_secs),
            std::time::Duration::from_secs(settings.backoff_cap_secs),
        );
        now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero())
    });
    let build: Build = sqlx::query_as(
        "UPDATE builds SET
            state = CASE WHEN $3 THEN 'retryable' ELSE 'failed' END,
            run_at = coalesce($4, run_at),
            completed_at = CASE WHEN $3 THEN NULL ELSE $2 END,
            finished_reason = CASE WHEN $3 THEN NULL ELSE $5 END,
            error_message = CASE WHEN $3 THEN NULL ELSE $6 END,
            errors = errors || jsonb_build_array(jsonb_build_object(
                'at', $2, 'attempt', attempt, 'kind', $5, 'message', $6, 'worker_id', lease_owner)),
            lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
            otp_hash = NULL, otp_expires_at = NULL, vm_token_hash = NULL, vm_token_sealed = NULL, vm_token_expires_at = NULL
         WHERE id = $1
         RETURNING *",
    )
    .bind(&locked.id)
    .bind(now)
    .bind(retry)
    .bind(run_at)
    .bind(failure.kind.as_str())
    .bind(&failure.message)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE build_attempts SET finished_at = $3, outcome = $4, error_message = $5
         WHERE build_id = $1 AND attempt = $2",
    )
    .bind(&locked.id)
    .bind(locked.attempt)
    .bind(now)
    .bind(failure.kind.as_str())
    .bind(&failure.message)
    .execute(&mut *conn)
    .await?;
    if let Some(worker_id) = &locked.lease_owner {
        let counts_as_failure = failure.kind != FailureKind::Infrastructure;
        sqlx::query(
            "UPDATE workers SET builds_failed = builds_failed + CASE WHEN $2 THEN 1 ELSE 0 END,
                status = CASE WHEN status = 'busy' THEN 'idle' ELSE status END
             WHERE id = $1",
        )
        .bind(worker_id)
        .bind(counts_as_failure)
        .execute(&mut *conn)
        .await?;
        if matches!(failure.kind, FailureKind::Infrastructure | FailureKind::Timeout) {
            super::health::after_infrastructure_failure(conn, worker_id, settings, now).await?;
        }
    }
    let line = match run_at {
        Some(at) => format!(
            "Attempt {} failed ({}): {}; retrying at {}",
            locked.attempt,
            failure.kind.as_str(),
            failure.message,
            at.to_rfc3339()
        ),
        None => format!("Build failed ({}): {}", failure.kind.as_str(), failure.message),
    };
    append_system_log(conn, &locked.id, if retry { "warn" } else { "error" }, &line, now).await?;
    if retry {
        metrics::counter!(crate::metrics::RETRIES, "kind" => failure.kind.as_str()).increment(1);
    } else {
        crate::metrics::build_ended(&build, failure.kind.as_str(), now);
        crate::metrics::build_failed(failure.kind.as_str());
    }
    Ok(build)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infrastructure_failures_retry_while_attempts_remain() {
        assert!(retries(FailureKind::Infrastructure, 1, 3, false));
        assert!(retries(FailureKind::Infrastructure, 2, 3, false));
        assert!(!retries(FailureKind::Infrastructure, 3, 3, false));
    }

    #[test]
    fn build_failures_are_final_unless_configured() {
        assert!(!retries(FailureKind::Build, 1, 3, false));
        assert!(retries(FailureKind::Build, 1, 3, true));
        assert!(!retries(FailureKind::Build, 3, 3, true));
    }

    #[test]
    fn timeouts_are_final() {
        assert!(!retries(FailureKind::Timeout, 1, 3, true));
    }
}
