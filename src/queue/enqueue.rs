//! Enqueue: insert a build row and wake the instances that wait for work.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{Connection, FromRow, PgConnection, PgPool, Row};

use super::{Build, BuildState, Platform, QueueError, QueueResult, locked};

/// Channel on which every instance LISTENs; the payload is `<queue>:<build id>` of a claimable build.
pub const NOTIFY_CHANNEL: &str = "expo_builds_ready";

/// SQL: whether queue `$q` holds at least `$n` queued builds (reads at most `$n` index entries).
macro_rules! queued_at_least {
    ($q:literal, $n:literal) => {
        concat!(
            "(SELECT count(*) FROM (SELECT 1 FROM builds WHERE queue = ",
            $q,
            " AND state IN ('pending', 'scheduled', 'retryable') LIMIT ",
            $n,
            ") AS queued) >= ",
            $n
        )
    };
}

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
    /// The key that submitted it (`None`: the built-in admin key).
    pub submitted_by: Option<String>,
    /// What it needs of the worker that runs it (scheduling.md); `None`: any worker of its platform.
    pub requirements: Option<super::Requirements>,
}

/// Inserts the build and, when it is claimable now, notifies every instance — one statement, inside
/// the caller's transaction if it has one. PostgreSQL delivers the NOTIFY only if that transaction
/// commits, so a waiting worker never wakes for a build that does not exist.
///
/// Its objects are not claimed from `pending_writes` (see [`enqueue_bounded`]): for builds whose
/// objects were not written through the pending protocol (seeding, tests).
pub async fn enqueue(conn: &mut PgConnection, new: &NewBuild, now: DateTime<Utc>) -> QueueResult<Build> {
    Ok(insert(conn, new, None, false, None, now).await?.build)
}

/// [`enqueue`] with backpressure (R58): refused with [`QueueError::QueueFull`] (nothing inserted) when
/// the build's platform queue already holds `max_queued` queued builds (pending, scheduled, retryable).
///
/// The build's objects (source, certs) must be pending writes: the insert claims their keys under a
/// row lock and happens only if every one is present and not doomed by a sweep or cleanup; otherwise
/// nothing is inserted ([`QueueError::ObjectsGone`]).
pub async fn enqueue_bounded(
    conn: &mut PgConnection,
    new: &NewBuild,
    max_queued: i64,
    now: DateTime<Utc>,
) -> QueueResult<Build> {
    Ok(enqueue_submit(conn, new, max_queued, KeyQuota::Maybe, None, now)
        .await?
        .build)
}

/// Whether the submitting stored key may have a max queued, for [`enqueue_submit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyQuota {
    /// It may (or it is not known): its inserts take turns under the key's lock ([`insert_within_quota`]).
    Maybe,
    /// Its row had none when the caller's key cache read it (at most a second ago): the insert runs without
    /// the lock — three round trips (BEGIN, the lock, COMMIT) less per submit. The insert still checks the key's
    /// quota from its row, so a max queued set within that second is enforced, though submits racing it
    /// in that second may each see room (by at most the number of concurrent submits of the key).
    None,
}

/// A build inserted by [`enqueue_submit`].
#[derive(Debug)]
pub struct Enqueued {
    pub build: Build,
    /// Its queue holds `max_queued` queued builds now (as the insert's snapshot counted them): the
    /// next submit to it is likely refused ([`FullQueues`]).
    pub at_limit: bool,
}

/// [`enqueue_bounded`] that also records `spare` (a key, e.g. [`super::SpareKeys`]) as a pending write
/// when the build is inserted, in the same statement, and tells whether the queue is now at its limit.
pub async fn enqueue_submit(
    conn: &mut PgConnection,
    new: &NewBuild,
    max_queued: i64,
    key_quota: KeyQuota,
    spare: Option<&str>,
    now: DateTime<Utc>,
) -> QueueResult<Enqueued> {
    let inserted = match (new.submitted_by.as_deref(), key_quota) {
        (Some(key_id), KeyQuota::Maybe) => insert_within_quota(conn, new, key_id, max_queued, spare, now).await,
        _ => insert(conn, new, Some(max_queued), true, spare, now).await,
    };
    if matches!(inserted, Err(QueueError::QueueFull)) {
        count_refusal(new.platform);
    }
    inserted
}

/// Which platform queues may be at their backpressure limit (R58), as this instance knows it: `full`,
/// set by an insert that filled its queue or was refused as full and cleared by a count that found
/// room; and `near`, the queues at half their limit or more at the last look of [`watch_full_queues`]
/// (every second, whichever instance filled them). A submit reads both before its body: no queue
/// suspected, no statement (the insert checks exactly in any case); a suspected queue is counted
/// ([`full_queues`]) before the body is read, so a hint never refuses a queue that has room, and a full
/// queue is refused before its body unless it went from under half its limit to full within the last
/// second.
#[derive(Debug, Default)]
pub struct FullQueues {
    full: std::sync::Mutex<std::collections::HashSet<Platform>>,
    near: std::sync::Mutex<std::collections::HashSet<Platform>>,
}

impl FullQueues {
    /// Whether any queue may be full (then count before the body).
    pub fn suspected(&self) -> bool {
        !locked(&self.full).is_empty() || !locked(&self.near).is_empty()
    }

    /// `platform` was seen full (or not).
    pub fn set(&self, platform: Platform, full: bool) {
        let mut flags = locked(&self.full);
        if full {
            flags.insert(platform);
        } else {
            flags.remove(&platform);
        }
    }

    /// A count found exactly these queues full.
    pub fn counted(&self, full: &[Platform]) {
        let mut flags = locked(&self.full);
        flags.clear();
        flags.extend(full.iter().copied());
    }

    /// The watcher's last look: these queues hold half their limit or more.
    fn near(&self, near: &[Platform]) {
        let mut flags = locked(&self.near);
        flags.clear();
        flags.extend(near.iter().copied());
    }
}

/// Every second, marks the queues holding half of `max_queued` or more as near full in `flags`, so that
/// a queue filled through another instance is counted before a submit's body here too (R58). One
/// statement a second per instance, whatever the submit rate; when it fails, every queue is suspected.
pub async fn watch_full_queues(
    pool: PgPool,
    flags: std::sync::Arc<FullQueues>,
    max_queued: i64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let threshold = (max_queued / 2).max(1);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        let looked = match pool.acquire().await {
            Ok(mut conn) => full_queues(&mut conn, threshold).await,
            Err(e) => Err(e.into()),
        };
        match looked {
            Ok(near) => flags.near(&near),
            Err(e) => {
                tracing::warn!(error = %e, "could not look at the queues' fill");
                flags.near(&Platform::ALL);
            }
        }
    }
}

/// A stored key's submit: when the key has a max queued, its inserts take turns under a lock on the
/// key, so that each one's check (a statement after the lock, with a fresh snapshot) sees the builds the
/// others inserted — submits that passed the check before their bodies at the same time cannot all
/// get in. Keys without a quota only pay the lock statement's round trip, and
/// not even that when the caller's key cache knows they have none ([`KeyQuota::None`]).
async fn insert_within_quota(
    conn: &mut PgConnection,
    new: &NewBuild,
    key_id: &str,
    max_queued: i64,
    spare: Option<&str>,
    now: DateTime<Utc>,
) -> QueueResult<Enqueued> {
    let mut tx = conn.begin().await.map_err(QueueError::DbUncommitted)?;
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtext('submitter-quota:' || id)) FROM api_keys WHERE id = $1 AND max_queued > 0",
    )
    .bind(key_id)
    .execute(&mut *tx)
    .await
    .map_err(QueueError::DbUncommitted)?;
    let inserted = insert(&mut tx, new, Some(max_queued), true, spare, now)
        .await
        .map_err(QueueError::uncommitted)?;
    tx.commit().await?;
    Ok(inserted)
}

/// The platform queues holding `max_queued` queued builds or more, in one statement. The hint is the
/// per-queue count kept by the statements that change builds (`submitter_shares.queued`, the fair-share
/// triggers: a few rows per queue); only a queue the hint names full is counted exactly (at most
/// `max_queued` entries of the claim index), so a hint that drifted can never refuse a queue under its
/// limit, and a queue far from it costs no count. (The insert checks again, exactly: a queue at its limit
/// never accepts a build.)
pub async fn full_queues(conn: &mut PgConnection, max_queued: i64) -> QueueResult<Vec<Platform>> {
    let names: Vec<String> = sqlx::query_scalar(concat!(
        "SELECT q.name FROM queues q WHERE CASE
            WHEN (SELECT COALESCE(sum(s.queued), 0) FROM submitter_shares s WHERE s.queue = q.name) >= $1
            THEN ",
        queued_at_least!("q.name", "$1"),
        " ELSE false END"
    ))
    .bind(max_queued)
    .fetch_all(conn)
    .await?;
    Ok(names.iter().filter_map(|n| Platform::parse(n)).collect())
}

/// Counts a submit or retry refused because `platform`'s queue is full.
pub fn count_refusal(platform: Platform) {
    metrics::counter!(crate::metrics::QUEUE_FULL, "queue" => platform.as_str()).increment(1);
}

/// The submit's insert statement (see [`insert`]) with the submitter's parts filled in: `$name` the
/// `submitted_by_name` expression, `$quota` the condition on the submitter's max queued (empty for the
/// built-in admin key, which has neither). Issue #25: the admin key's statement does not initialise the
/// `api_keys` look-ups and the quota sub-plan at every call.
macro_rules! insert_sql {
    ($name:literal, $quota:literal) => {
        concat!(
            "WITH claimed AS (
            -- the objects' pending keys, locked: a sweep that doomed one first makes this insert refuse. The
            -- claim is the end of the pending period (the keys are deleted below); the submit made them young
            -- again before only if its stream was slow (queue::refresh_slow_writes)
            SELECT key FROM pending_writes WHERE $16 AND key IN ($9, $11) AND NOT doomed FOR UPDATE
         ), queued AS (
            -- the queue's queued builds, counted up to the limit (reads at most $15 index entries)
            SELECT count(*) AS n FROM (SELECT 1 FROM builds WHERE queue = $3
                AND state IN ('pending', 'scheduled', 'retryable') LIMIT COALESCE($15, 0)) AS q
         ), inserted AS (
            INSERT INTO builds (id, state, queue, priority, run_at, max_attempts, retry_build_failures,
                                submitted_at, source_key, source_size, certs_key, access_token_hash, original_build_id,
                                submitted_by, submitted_by_name, requirements, requirement_match)
            SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $17,
                   ",
            $name,
            ", $18, $19
            WHERE (NOT $16 OR (SELECT count(*) FROM claimed) = 1 + ($11::text IS NOT NULL)::int)
",
            $quota,
            "              AND ($15::bigint IS NULL OR (SELECT n FROM queued) < $15)
            RETURNING *
         ), notified AS (
            SELECT pg_notify($14, queue || ':' || id) FROM inserted WHERE state = 'pending'
         ), event AS (
            INSERT INTO events (kind, build_id, data)
            SELECT 'build.submitted', id, jsonb_build_object('platform', queue, 'state', state, 'attempt', attempt,
                'priority', priority, 'run_at', run_at, 'original_build_id', original_build_id)
            FROM inserted
         ), linked AS (
            -- the build's objects are named by its row from now on: no longer pending
            -- (the keys the row names: $9 and $11, so a plain look-up of both under a one-time filter)
            DELETE FROM pending_writes WHERE key IN ($9, $11) AND EXISTS (SELECT 1 FROM inserted)
         ), spare AS (
            -- a key for a later submit's object, recorded before it is written (queue::SpareKeys)
            INSERT INTO pending_writes (key) SELECT $20 FROM inserted WHERE $20::text IS NOT NULL
            ON CONFLICT (key) DO NOTHING
         )
         SELECT inserted.*, ($15::bigint IS NOT NULL AND (SELECT n FROM queued) + 1 >= $15) AS at_limit
         FROM inserted, (SELECT count(*) FROM notified) AS notified_count"
        )
    };
}

/// [`insert_sql`] for a stored key (its name copied, its max queued checked at the insert).
const INSERT_KEYED_SQL: &str = insert_sql!(
    "(SELECT name FROM api_keys WHERE id = $17)",
    "              -- the submitter's max queued, checked again at the insert (the check before the body
              -- cannot see submits that were uploading meanwhile)
              AND ($15::bigint IS NULL OR $17::text IS NULL OR NOT EXISTS (
                  SELECT 1 FROM api_keys k WHERE k.id = $17 AND k.max_queued > 0
                     AND k.max_queued <= COALESCE((SELECT sum(s.queued) FROM submitter_shares s
                                                   WHERE s.submitter = k.id), 0)))
"
);

/// [`insert_sql`] for the built-in admin key (`$17` is NULL): no name, no max queued.
const INSERT_ADMIN_SQL: &str = insert_sql!("NULL::text", "");

async fn insert(
    conn: &mut PgConnection,
    new: &NewBuild,
    max_queued: Option<i64>,
    claim: bool,
    spare: Option<&str>,
    now: DateTime<Utc>,
) -> QueueResult<Enqueued> {
    let run_at = new.run_at.filter(|at| *at > now);
    let state = if run_at.is_some() { "scheduled" } else { "pending" };
    let sql = if new.submitted_by.is_some() {
        INSERT_KEYED_SQL
    } else {
        INSERT_ADMIN_SQL
    };
    let row: Option<PgRow> = sqlx::query(sql)
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
        .bind(max_queued)
        .bind(claim)
        .bind(&new.submitted_by)
        .bind(new.requirements.as_ref().map(|r| r.display()))
        .bind(new.requirements.as_ref().map(|r| r.match_doc()))
        .bind(spare)
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(row) = row {
        let build = Build::from_row(&row).map_err(QueueError::Db)?;
        let at_limit: bool = row.try_get("at_limit").map_err(QueueError::Db)?;
        return Ok(Enqueued { build, at_limit });
    }
    if claim {
        // Refused: a queue at its limit, or objects doomed meanwhile (a doomed key stays doomed until
        // its object is deleted and the key forgotten, so this later read cannot miss it).
        let claimable: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pending_writes WHERE key IN ($1, $2) AND NOT doomed")
                .bind(&new.source_key)
                .bind(&new.certs_key)
                .fetch_one(&mut *conn)
                .await
                .map_err(QueueError::DbUncommitted)?;
        if claimable < 1 + i64::from(new.certs_key.is_some()) {
            return Err(QueueError::ObjectsGone);
        }
    }
    if max_queued.is_some()
        && super::quota::submitter_queue_full_on(&mut *conn, new.submitted_by.as_deref())
            .await
            .map_err(QueueError::uncommitted)?
    {
        return Err(QueueError::SubmitterQueueFull);
    }
    Err(QueueError::QueueFull)
}

/// Why a build-token retry is refused before anything is copied (R49, T8): the original must be final,
/// no earlier retry of it may be unfinished, and its family (the first build and every retry made from
/// it, or from one of its retries) may hold at most `max_retries` retries. The admin key is not limited
/// (`limit` = `None`).
pub async fn check_retry(conn: &mut PgConnection, original_id: &str, limit: Option<i64>) -> QueueResult<()> {
    let state: Option<String> = sqlx::query_scalar("SELECT state FROM builds WHERE id = $1")
        .bind(original_id)
        .fetch_optional(&mut *conn)
        .await?;
    let state = state.ok_or(QueueError::BuildNotFound)?;
    let Some(max_retries) = limit else {
        return Ok(());
    };
    if !BuildState::parse(&state).is_some_and(BuildState::is_final) {
        return Err(QueueError::Conflict(RETRY_NOT_FINISHED.to_string()));
    }
    let live: Option<String> = sqlx::query_scalar(
        "SELECT id FROM builds WHERE original_build_id = $1
           AND state NOT IN ('completed', 'failed', 'cancelled')
         ORDER BY submitted_at DESC LIMIT 1",
    )
    .bind(original_id)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = live {
        return Err(QueueError::RetryInProgress(id));
    }
    // The family is walked from its first build (a retry of a retry names its parent, so a token cannot
    // start a fresh count by retrying the retry); both walks are bounded by the limit itself.
    let retries: i64 = sqlx::query_scalar(
        "WITH RECURSIVE up AS (
            SELECT id, original_build_id, 0 AS depth FROM builds WHERE id = $1
            UNION ALL
            SELECT b.id, b.original_build_id, up.depth + 1 FROM builds b JOIN up ON b.id = up.original_build_id
            WHERE up.depth <= $2
         ), root AS (
            SELECT id FROM up ORDER BY depth DESC LIMIT 1
         ), down AS (
            SELECT id, 0 AS depth FROM root
            UNION ALL
            SELECT b.id, down.depth + 1 FROM builds b JOIN down ON b.original_build_id = down.id
            WHERE down.depth <= $2
         )
         SELECT count(*) - 1 FROM down",
    )
    .bind(original_id)
    .bind(max_retries)
    .fetch_one(&mut *conn)
    .await?;
    if retries >= max_retries {
        return Err(QueueError::RetryLimit(max_retries));
    }
    Ok(())
}

/// Why a build token may not retry an unfinished build.
pub const RETRY_NOT_FINISHED: &str =
    "Build is not finished: only a completed, failed or cancelled build can be retried";

/// Enqueues a retry of `original_id` (B14) with backpressure; for a `limited` caller (build token only:
/// `Some(CONTROLLER_MAX_RETRIES_PER_BUILD)`) the rules of [`check_retry`] hold under a lock on the
/// family's first build (and the original), so concurrent retries of any members cannot both pass.
pub async fn enqueue_retry(
    pool: &PgPool,
    new: &NewBuild,
    original_id: &str,
    limited: Option<i64>,
    max_queued: i64,
    now: DateTime<Utc>,
    actor: &crate::audit::Actor,
) -> QueueResult<Build> {
    let mut tx = pool.begin().await.map_err(QueueError::DbUncommitted)?;
    let outcome = async {
        // Retries of different members of one family count against the same limit, so the lock is on the
        // family's first build (T8): a lock on the build being retried let parallel retries of two finished
        // members each pass the count. The walk up follows `original_build_id`, which never changes; the
        // original itself is locked after its root (always in this order, so two retries cannot deadlock).
        sqlx::query(
            "WITH RECURSIVE up AS (
                SELECT id, original_build_id, 0 AS depth FROM builds WHERE id = $1
                UNION ALL
                SELECT b.id, b.original_build_id, up.depth + 1 FROM builds b JOIN up ON b.id = up.original_build_id
                WHERE up.depth < 100000
             )
             SELECT 1 FROM builds WHERE id = (SELECT id FROM up ORDER BY depth DESC LIMIT 1) FOR UPDATE",
        )
        .bind(original_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT 1 FROM builds WHERE id = $1 FOR UPDATE")
            .bind(original_id)
            .execute(&mut *tx)
            .await?;
        check_retry(&mut tx, original_id, limited).await?;
        let build = enqueue_bounded(&mut tx, new, max_queued, now).await?;
        let change = crate::audit::Change::new("build.retry", "build", original_id)
            .after(serde_json::json!({ "retry_build_id": build.id, "state": build.state }));
        crate::audit::record(&mut tx, actor, change).await?;
        Ok(build)
    }
    .await
    // Nothing before the COMMIT can have committed: only the COMMIT's own error may be unknown.
    .map_err(QueueError::uncommitted);
    match outcome {
        Ok(build) => {
            tx.commit().await?;
            Ok(build)
        }
        // Release the original's row lock now, not when the pool next uses this connection.
        Err(refused) => {
            tx.rollback().await.map_err(QueueError::DbUncommitted)?;
            Err(refused)
        }
    }
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
