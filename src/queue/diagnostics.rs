//! Diagnostic reports that workers send about their host.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{QueueError, QueueResult};

/// A stored report.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DiagnosticReport {
    pub id: String,
    pub worker_id: String,
    pub status: String,
    pub run_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub auto_fixed: bool,
    pub checks: sqlx::types::Json<serde_json::Value>,
}

/// A report to store (validated by the API).
#[derive(Debug, Clone)]
pub struct NewReport {
    pub worker_id: String,
    pub status: String,
    pub duration_ms: i64,
    pub auto_fixed: bool,
    pub checks: serde_json::Value,
}

/// Stores a report of a known worker; returns its id. A `critical` report quarantines the worker in the
/// same transaction, a later `healthy`/`warning` one lifts that quarantine (fleet-health.md).
pub async fn store_report(pool: &PgPool, report: &NewReport, now: DateTime<Utc>) -> QueueResult<String> {
    let mut tx = pool.begin().await?;
    let id: Option<String> = sqlx::query_scalar(
        "INSERT INTO diagnostics (worker_id, status, run_at, duration_ms, auto_fixed, checks)
         SELECT id, $2, $3, $4, $5, $6 FROM workers WHERE id = $1
         RETURNING id::text",
    )
    .bind(&report.worker_id)
    .bind(&report.status)
    .bind(now)
    .bind(report.duration_ms)
    .bind(report.auto_fixed)
    .bind(sqlx::types::Json(&report.checks))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(id) = id else {
        tx.rollback().await?;
        return Err(QueueError::WorkerNotFound);
    };
    super::health::after_report(&mut tx, &report.worker_id, &report.status, &report.checks, now).await?;
    tx.commit().await?;
    Ok(id)
}

/// A worker's reports, newest first.
pub async fn list_reports(pool: &PgPool, worker_id: &str, limit: i64) -> QueueResult<Vec<DiagnosticReport>> {
    Ok(sqlx::query_as(
        "SELECT id::text AS id, worker_id, status, run_at, duration_ms, auto_fixed, checks
         FROM diagnostics WHERE worker_id = $1 ORDER BY run_at DESC, id DESC LIMIT $2",
    )
    .bind(worker_id)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
