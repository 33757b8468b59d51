//! Build log lines written by the controller itself.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::QueueResult;

/// Appends one controller-written line, taking the next sequence number atomically.
pub async fn append_system_log(
    conn: &mut PgConnection,
    build_id: &str,
    level: &str,
    message: &str,
    now: DateTime<Utc>,
) -> QueueResult<()> {
    sqlx::query(
        "WITH s AS (UPDATE builds SET log_seq = log_seq + 1 WHERE id = $1 RETURNING log_seq)
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
