//! Enqueue: insert a build row and wake the instances that wait for work.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::{Build, Platform, QueueResult};

/// Channel on which every instance LISTENs; the payload is `<queue>:<build id>` of a claimable build.
pub const NOTIFY_CHANNEL: &str = "expo_builds_ready";

/// What a submitter (or a retry) puts in the queue.
#[derive(Debug, Clone)]
pub struct NewBuild {
    pub id: String,
    pub platform: Platform,
    pub priority: i32,
    pub max_attempts: i32,
    /// Eligible from; `None` or a past time means now.
    pub run_at: Option<DateTime<Utc>>,
    pub retry_build_failures: bool,
    pub source_key: String,
    pub source_size: i64,
    pub certs_key: Option<String>,
    pub access_token_hash: Vec<u8>,
    pub original_build_id: Option<String>,
}

/// Inserts the build and, when it is claimable now, notifies every instance — one statement, inside
/// the caller's transaction if it has one. PostgreSQL delivers the NOTIFY only if that transaction
/// commits, so a waiting worker never wakes for a build that does not exist.
pub async fn enqueue(conn: &mut PgConnection, new: &NewBuild, now: DateTime<Utc>) -> QueueResult<Build> {
    let run_at = new.run_at.filter(|at| *at > now);
    let state = if run_at.is_some() { "scheduled" } else { "pending" };
    let build: Build = sqlx::query_as(
        "WITH inserted AS (
            INSERT INTO builds (id, state, queue, priority, run_at, max_attempts, retry_build_failures,
                                submitted_at, source_key, source_size, certs_key, access_token_hash, original_build_id)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
            RETURNING *
         ), notified AS (
            SELECT pg_notify($14, queue || ':' || id) FROM inserted WHERE state = 'pending'
         ), event AS (
            INSERT INTO events (kind, build_id, data)
            SELECT 'build.submitted', id, jsonb_build_object('platform', queue, 'state', state, 'attempt', attempt,
                'priority', priority, 'run_at', run_at, 'original_build_id', original_build_id)
            FROM inserted
         )
         SELECT inserted.* FROM inserted, (SELECT count(*) FROM notified) AS n",
    )
    .bind(&new.id)
    .bind(state)
    .bind(new.platform.as_str())
    .bind(new.priority)
    .bind(run_at.unwrap_or(now))
    .bind(new.max_attempts)
    .bind(new.retry_build_failures)
    .bind(now)
    .bind(&new.source_key)
    .bind(new.source_size)
    .bind(&new.certs_key)
    .bind(&new.access_token_hash)
    .bind(&new.original_build_id)
    .bind(NOTIFY_CHANNEL)
    .fetch_one(&mut *conn)
    .await?;
    Ok(build)
}

/// Tells every instance that these `(queue, build id)` became claimable (delivered at commit). One
/// notification per build, so each wakes one waiting worker.
pub(crate) async fn notify_ready(conn: &mut PgConnection, builds: &[(&str, &str)]) -> QueueResult<()> {
    let (queues, ids): (Vec<&str>, Vec<&str>) = builds.iter().copied().unzip();
    sqlx::query("SELECT pg_notify($1, q || ':' || id) FROM unnest($2::text[], $3::text[]) AS t(q, id)")
        .bind(NOTIFY_CHANNEL)
        .bind(&queues)
        .bind(&ids)
        .execute(conn)
        .await?;
    Ok(())
}
