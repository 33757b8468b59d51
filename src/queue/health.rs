//! Worker reputation and quarantine (fleet-health.md). Decided in the transaction that ends an attempt,
//! stores a diagnostics report, or releases a worker, so a worker is never handed a build after the
//! attempt that tipped it.

use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

use super::{QueueError, QueueResult, Settings, Worker};

/// The longest quarantine a relapse on probation can earn.
pub const MAX_QUARANTINE_SECS: i64 = 86_400;

/// Attempt outcomes that are infrastructure failures for a worker's reputation (lease expired, worker
/// gone or reported an infrastructure error, deadline passed). Released and requeued attempts do not count.
const COUNTED: &str = "('completed', 'build_failure', 'infrastructure', 'timeout')";

/// A worker's stored health: `health`, `quarantined_until`, `quarantine_secs`, `reputation_since`.
type HealthRow = (String, Option<DateTime<Utc>>, Option<i64>, Option<DateTime<Utc>>);

/// An attempt of `worker_id` just ended in an infrastructure failure (in the caller's transaction, after
/// its attempt row was closed): quarantines the worker when it tips its record over, or again for twice
/// as long when it was on probation. Returns whether it was quarantined now.
pub(crate) async fn after_infrastructure_failure(
    conn: &mut PgConnection,
    worker_id: &str,
    settings: &Settings,
    now: DateTime<Utc>,
) -> QueueResult<bool> {
    if settings.quarantine_failures == 0 {
        return Ok(false);
    }
    let row: Option<HealthRow> = sqlx::query_as(
        "SELECT health, quarantined_until, quarantine_secs, reputation_since FROM workers WHERE id = $1 FOR UPDATE",
    )
    .bind(worker_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((health, until, last_secs, since)) = row else {
        return Ok(false);
    };
    let on_probation = health == "quarantined" && until.is_some_and(|u| u <= now);
    if health == "quarantined" && !on_probation {
        return Ok(false);
    }
    let recent: Vec<(String, String, Option<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT build_id, outcome, error_message FROM build_attempts
         WHERE worker_id = $1 AND outcome IN {COUNTED} AND ($2::timestamptz IS NULL OR assigned_at >= $2)
         ORDER BY assigned_at DESC LIMIT $3"
    )))
    .bind(worker_id)
    .bind(since)
    .bind(i64::from(settings.quarantine_window))
    .fetch_all(&mut *conn)
    .await?;
    let failures: Vec<Value> = recent
        .iter()
        .filter(|(_, outcome, _)| outcome == "infrastructure" || outcome == "timeout")
        .map(|(build, outcome, message)| json!({ "build_id": build, "outcome": outcome, "message": message }))
        .collect();
    let (secs, reason) = if on_probation {
        let secs = (last_secs.unwrap_or(settings.quarantine_secs as i64) * 2).min(MAX_QUARANTINE_SECS);
        (secs, "an infrastructure failure on probation".to_string())
    } else if failures.len() >= settings.quarantine_failures as usize {
        (
            settings.quarantine_secs as i64,
            format!(
                "{} infrastructure failures in its last {} attempts",
                failures.len(),
                recent.len()
            ),
        )
    } else {
        return Ok(false);
    };
    quarantine(
        conn,
        worker_id,
        Some(now + Duration::seconds(secs)),
        Some(secs),
        &reason,
        json!(failures),
        now,
    )
    .await?;
    Ok(true)
}

/// Quarantines a worker until `until` (`None`: until a healthy report or release) and emits
/// `worker.quarantined` with the reason and the evidence.
async fn quarantine(
    conn: &mut PgConnection,
    worker_id: &str,
    until: Option<DateTime<Utc>>,
    secs: Option<i64>,
    reason: &str,
    evidence: Value,
    now: DateTime<Utc>,
) -> QueueResult<()> {
    sqlx::query(
        "UPDATE workers SET health = 'quarantined', quarantined_until = $2,
            quarantine_secs = coalesce($3, quarantine_secs), quarantine_reason = $4, reputation_since = $5
         WHERE id = $1",
    )
    .bind(worker_id)
    .bind(until)
    .bind(secs)
    .bind(reason)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    let data = json!({
        "health": "quarantined",
        "quarantined_until": until.map(|u| u.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        "reason": reason,
        "failures": evidence,
    });
    super::emit::emit(conn, "worker.quarantined", None, Some(worker_id), data).await?;
    tracing::warn!(worker_id = %worker_id, reason = %reason, until = ?until, "worker quarantined");
    Ok(())
}

/// A diagnostics report arrived (in the caller's transaction): `critical` quarantines the worker until a
/// later `healthy`/`warning` report (which lifts such a quarantine) or an operator's release.
pub(crate) async fn after_report(
    conn: &mut PgConnection,
    worker_id: &str,
    status: &str,
    checks: &Value,
    now: DateTime<Utc>,
) -> QueueResult<()> {
    if status == "critical" {
        let failed = failed_checks(checks);
        let reason = if failed.is_empty() {
            "critical diagnostics report".to_string()
        } else {
            format!("critical diagnostics report: {}", failed.join(", "))
        };
        return quarantine(conn, worker_id, None, None, &reason, json!(failed), now).await;
    }
    let lifted = sqlx::query(
        "UPDATE workers SET health = 'ok', quarantine_reason = NULL, reputation_since = $2
         WHERE id = $1 AND health = 'quarantined' AND quarantined_until IS NULL",
    )
    .bind(worker_id)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    if lifted.rows_affected() == 1 {
        let data = json!({ "health": "ok", "reason": format!("{status} diagnostics report") });
        super::emit::emit(conn, "worker.released", None, Some(worker_id), data).await?;
    }
    Ok(())
}

/// Names of the checks of a report that did not pass (`checks: [{"name", "status"}]`; other shapes give none).
fn failed_checks(checks: &Value) -> Vec<String> {
    checks
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| {
            let status = c["status"].as_str().unwrap_or_default();
            c["ok"] == false || !matches!(status, "" | "ok" | "pass" | "passed" | "healthy" | "warning")
        })
        .filter_map(|c| {
            c["name"]
                .as_str()
                .map(|n| crate::text::scrub(n).chars().take(100).collect())
        })
        .take(20)
        .collect()
}

/// An operator releases a worker from quarantine or probation: healthy again, its record cleared.
/// Goes through `ops::release_worker` like drain and disable.
pub async fn release(pool: &PgPool, worker_id: &str, now: DateTime<Utc>) -> QueueResult<Worker> {
    let mut tx = pool.begin().await?;
    let was: Option<String> = sqlx::query_scalar("SELECT health FROM workers WHERE id = $1 FOR UPDATE")
        .bind(worker_id)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(was) = was else {
        tx.rollback().await?;
        return Err(QueueError::WorkerNotFound);
    };
    let worker: Worker = sqlx::query_as(
        "UPDATE workers SET health = 'ok', quarantined_until = NULL, quarantine_reason = NULL,
            quarantine_secs = NULL, reputation_since = $2
         WHERE id = $1 RETURNING *",
    )
    .bind(worker_id)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    if was == "quarantined" {
        let data = json!({ "health": "ok", "reason": "released by an operator" });
        super::emit::emit(&mut tx, "worker.released", None, Some(worker_id), data).await?;
    }
    tx.commit().await?;
    Ok(worker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_checks_are_named() {
        let checks = json!([
            { "name": "disk", "status": "critical" },
            { "name": "vm", "status": "ok" },
            { "name": "net", "status": "fail" },
            { "name": "wifi", "ok": false },
            { "name": "cpu", "ok": true },
            { "status": "fail" }
        ]);
        assert_eq!(failed_checks(&checks), vec!["disk", "net", "wifi"]);
        assert!(failed_checks(&json!({ "disk": "bad" })).is_empty());
    }
}
