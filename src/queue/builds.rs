//! Reads of build rows.

use sqlx::PgPool;

use super::{Build, QueueCounts, QueueResult};

/// The build with this id, if any.
pub async fn find_build(pool: &PgPool, id: &str) -> QueueResult<Option<Build>> {
    Ok(sqlx::query_as("SELECT * FROM builds WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?)
}

/// Builds waiting (any queued state) and builds held by a worker.
pub async fn queue_counts(pool: &PgPool) -> QueueResult<QueueCounts> {
    let (pending, active): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state IN ('pending', 'scheduled', 'retryable')),
                count(*) FILTER (WHERE state IN ('assigned', 'building'))
         FROM builds WHERE state IN ('pending', 'scheduled', 'retryable', 'assigned', 'building')",
    )
    .fetch_one(pool)
    .await?;
    Ok(QueueCounts { pending, active })
}
