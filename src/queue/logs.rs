//! Build logs: lines posted by workers and VMs (bounded per line and per build) and lines the
//! controller writes itself. Sequence numbers come from an atomic increment on the build row, so
//! concurrent posters never collide and readers can resume with `after = <seq>`.

use chrono::{DateTime, Duration, Utc};
use sqlx::{PgConnection, PgPool};

use super::lease::{Holder, holder_view};
use super::{QueueResult, Settings};

/// Longest stored message; longer ones are cut at a character boundary.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024;
/// How long after a build finished the holder of its last attempt may still post (VMs flush late).
pub const LATE_LOG_GRACE_SECS: i64 = 600;

/// A stored log line.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LogLine {
    pub seq: i64,
    pub ts: DateTime<Utc>,
    pub level: String,
    pub message: String,
}

/// A line posted by a worker or VM.
#[derive(Debug, Clone)]
pub struct NewLogLine {
    pub level: String,
    pub message: String,
}

/// Cuts a message to [`MAX_MESSAGE_BYTES`] without splitting a character.
pub fn truncate_message(message: &str) -> &str {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message;
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// Appends one controller-written line, taking the next sequence number atomically.
pub async fn append_system_log(
    conn: &mut PgConnection,
    build_id: &str,
    level: &str,
    message: &str,
    now: DateTime<Utc>,
) -> QueueResult<()> {
    sqlx::query(
        "WITH s AS (UPDATE builds SET log_seq = log_seq + 1 WHERE id = $1 RETURNING log_seq, queue, state),
         event AS (
            INSERT INTO events (kind, build_id, data)
            SELECT 'build.log', $1, jsonb_build_object('platform', queue, 'state', state,
                'from_seq', log_seq, 'to_seq', log_seq, 'count', 1)
            FROM s
         )
         INSERT INTO build_logs (build_id, seq, ts, level, message) SELECT $1, log_seq, $2, $3, $4 FROM s",
    )
    .bind(build_id)
    .bind(now)
    .bind(level)
    .bind(message)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct LogState {
    state: String,
    queue: String,
    lease_owner: Option<String>,
    lease_token: Option<i64>,
    worker_id: Option<String>,
    completed_at: Option<DateTime<Utc>>,
    log_seq: i64,
    log_dropped: i64,
    log_marker_seq: Option<i64>,
}

impl LogState {
    fn held_by(&self, holder: Holder<'_>) -> bool {
        matches!(self.state.as_str(), "assigned" | "building")
            && self.lease_owner.as_deref() == Some(holder.worker_id)
            && holder.lease_token.is_none_or(|t| self.lease_token == Some(t))
    }

    /// The last holder may still flush its tail for a while after the build finished.
    fn late_tail_allowed(&self, holder: Holder<'_>, now: DateTime<Utc>) -> bool {
        matches!(self.state.as_str(), "completed" | "failed" | "cancelled")
            && holder.lease_token.is_none()
            && self.worker_id.as_deref() == Some(holder.worker_id)
            && self
                .completed_at
                .is_some_and(|at| at > now - Duration::seconds(LATE_LOG_GRACE_SECS))
    }
}

/// Appends lines posted by the holder of the current attempt (or, within the grace period, by the
/// holder of a finished build's last attempt), keeping at most `max_lines` per build: past that,
/// lines are counted and one marker line says how many were dropped. Extends the holder's lease.
/// Returns how many lines were stored.
pub async fn append_worker_logs(
    pool: &PgPool,
    build_id: &str,
    holder: Holder<'_>,
    lines: &[NewLogLine],
    max_lines: i64,
    settings: &Settings,
    now: DateTime<Utc>,
) -> QueueResult<usize> {
    if !lines.is_empty() && append_fast(pool, build_id, holder, lines, max_lines, settings, now).await? {
        return Ok(lines.len());
    }
    let mut tx = pool.begin().await?;
    let current: Option<LogState> = sqlx::query_as(
        "SELECT state, queue, lease_owner, lease_token, worker_id, completed_at, log_seq, log_dropped, log_marker_seq
         FROM builds WHERE id = $1 FOR UPDATE",
    )
    .bind(build_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(current) = current else {
        return Err(super::QueueError::BuildNotFound);
    };
    let holds = current.held_by(holder);
    if !holds && !current.late_tail_allowed(holder, now) {
        let refusal = holder_view(&mut tx, build_id, holder.worker_id).await?.refusal();
        // Release the row lock now: the real holder's next call must not wait for the pool.
        tx.rollback().await?;
        return Err(refusal);
    }
    let room = if current.log_marker_seq.is_some() {
        0
    } else {
        (max_lines - current.log_seq).max(0) as usize
    };
    let kept = lines.len().min(room);
    let (levels, messages): (Vec<&str>, Vec<&str>) = lines[..kept]
        .iter()
        .map(|l| (l.level.as_str(), truncate_message(&l.message)))
        .unzip();
    sqlx::query(
        "INSERT INTO build_logs (build_id, seq, ts, level, message)
         SELECT $1, $2 + ord, $3, level, message FROM unnest($4::text[], $5::text[]) WITH ORDINALITY AS t(level, message, ord)",
    )
    .bind(build_id)
    .bind(current.log_seq)
    .bind(now)
    .bind(&levels)
    .bind(&messages)
    .execute(&mut *tx)
    .await?;
    let mut log_seq = current.log_seq + kept as i64;
    let dropped = (lines.len() - kept) as i64;
    let mut marker = current.log_marker_seq;
    if dropped > 0 {
        let total = current.log_dropped + dropped;
        let text = format!("Log limit of {max_lines} lines reached: {total} later lines were dropped");
        if let Some(seq) = marker {
            sqlx::query("UPDATE build_logs SET message = $3 WHERE build_id = $1 AND seq = $2")
                .bind(build_id)
                .bind(seq)
                .bind(&text)
                .execute(&mut *tx)
                .await?;
        } else {
            log_seq += 1;
            marker = Some(log_seq);
            sqlx::query("INSERT INTO build_logs (build_id, seq, ts, level, message) VALUES ($1, $2, $3, 'warn', $4)")
                .bind(build_id)
                .bind(log_seq)
                .bind(now)
                .bind(&text)
                .execute(&mut *tx)
                .await?;
        }
    }
    sqlx::query(
        "UPDATE builds SET log_seq = $2, log_dropped = log_dropped + $3, log_marker_seq = $4,
            lease_expires_at = CASE WHEN $5 THEN greatest(lease_expires_at, $6 + $7::bigint * interval '1 second')
                                    ELSE lease_expires_at END
         WHERE id = $1",
    )
    .bind(build_id)
    .bind(log_seq)
    .bind(dropped)
    .bind(marker)
    .bind(holds)
    .bind(now)
    .bind(settings.lease_timeout_secs as i64)
    .execute(&mut *tx)
    .await?;
    if log_seq > current.log_seq {
        let data = serde_json::json!({
            "platform": current.queue, "state": current.state,
            "from_seq": current.log_seq + 1, "to_seq": log_seq, "count": log_seq - current.log_seq,
        });
        super::emit::emit(&mut tx, "build.log", Some(build_id), Some(holder.worker_id), data).await?;
    }
    tx.commit().await?;
    Ok(kept)
}

/// The common case in one statement: the caller holds the current attempt and every line fits under
/// the cap. Returns false (nothing written) otherwise, for the general path to decide.
async fn append_fast(
    pool: &PgPool,
    build_id: &str,
    holder: Holder<'_>,
    lines: &[NewLogLine],
    max_lines: i64,
    settings: &Settings,
    now: DateTime<Utc>,
) -> QueueResult<bool> {
    let (levels, messages): (Vec<&str>, Vec<&str>) = lines
        .iter()
        .map(|l| (l.level.as_str(), truncate_message(&l.message)))
        .unzip();
    let inserted = sqlx::query(
        "WITH taken AS (
            UPDATE builds SET log_seq = log_seq + $5,
                lease_expires_at = greatest(lease_expires_at, $4 + $9::bigint * interval '1 second')
            WHERE id = $1 AND state IN ('assigned', 'building') AND lease_owner = $2
              AND ($3::bigint IS NULL OR lease_token = $3)
              AND log_marker_seq IS NULL AND log_seq + $5 <= $8
            RETURNING log_seq - $5 AS base, queue, state
         ), event AS (
            -- one event per posted batch, naming its sequence range
            INSERT INTO events (kind, build_id, worker_id, data)
            SELECT 'build.log', $1, $2, jsonb_build_object('platform', queue, 'state', state,
                'from_seq', base + 1, 'to_seq', base + $5, 'count', $5)
            FROM taken
         )
         INSERT INTO build_logs (build_id, seq, ts, level, message)
         SELECT $1, taken.base + t.ord, $4, t.level, t.message
         FROM taken, unnest($6::text[], $7::text[]) WITH ORDINALITY AS t(level, message, ord)",
    )
    .bind(build_id)
    .bind(holder.worker_id)
    .bind(holder.lease_token)
    .bind(now)
    .bind(lines.len() as i64)
    .bind(&levels)
    .bind(&messages)
    .bind(max_lines)
    .bind(settings.lease_timeout_secs as i64)
    .execute(pool)
    .await?;
    Ok(inserted.rows_affected() > 0)
}

/// Lines with `seq > after`, oldest first, at most `limit` (all when `None`).
pub async fn read_logs(pool: &PgPool, build_id: &str, after: i64, limit: Option<i64>) -> QueueResult<Vec<LogLine>> {
    Ok(sqlx::query_as(
        "SELECT seq, ts, level, message FROM build_logs WHERE build_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(build_id)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_character_boundaries() {
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let cut = truncate_message(&long);
        assert!(cut.len() <= MAX_MESSAGE_BYTES && cut.len() >= MAX_MESSAGE_BYTES - 1);
        assert_eq!(truncate_message("short"), "short");
    }
}
