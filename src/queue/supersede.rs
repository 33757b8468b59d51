//! Superseding submits (`supersede_key`, webhooks.md): a new push to `app/main` replaces the build still
//! waiting for the previous push instead of queueing behind it.
//!
//! After the new build is inserted, [`supersede`] marks it with its key and cancels its submitter's
//! older builds with the same key and platform that are still queued (`pending`, `scheduled`,
//! `retryable`) — and, with `supersede_running`, running ones too (the worker learns it at its next
//! heartbeat, as with any cancel). Each is an ordinary cancel ([`super::cancel_because`]): event, audit
//! row, webhooks, with `error_message` `Superseded by <new id>`. Marking runs under a lock on
//! (submitter, key), so of two concurrent submits with one key the later sees the earlier.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{CancelReason, QueueError, QueueResult, cancel_because};
use crate::audit::Actor;

/// Longest accepted key, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// A submit's `supersede_key` (trimmed; empty is none) and `supersede_running` fields, or why not.
pub fn parse(key: Option<&str>, running: Option<&str>) -> Result<Option<(String, bool)>, &'static str> {
    let running = match running.map(str::trim).filter(|v| !v.is_empty()) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(_) => return Err("supersede_running must be true or false"),
    };
    match key.map(str::trim).filter(|k| !k.is_empty()) {
        None if running => Err("supersede_running needs a supersede_key"),
        None => Ok(None),
        Some(k) if k.len() > MAX_KEY_LEN || k.chars().any(char::is_control) => {
            Err("supersede_key must be at most 255 bytes without control characters")
        }
        Some(k) => Ok(Some((k.to_string(), running))),
    }
}

/// Marks `build_id` with `key` and cancels the older builds it supersedes; returns their ids.
pub async fn supersede(
    pool: &PgPool,
    build_id: &str,
    key: &str,
    running: bool,
    now: DateTime<Utc>,
    actor: &Actor,
) -> QueueResult<Vec<String>> {
    let states: &[&str] = if running {
        &["pending", "scheduled", "retryable", "assigned", "building"]
    } else {
        &["pending", "scheduled", "retryable"]
    };
    let mut tx = pool.begin().await?;
    // The lock first, in its own statement: the next one's snapshot then sees a concurrent submit's mark.
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtext('supersede:' || coalesce(submitted_by, '') || ':' || $2))
           FROM builds WHERE id = $1",
    )
    .bind(build_id)
    .bind(key)
    .execute(&mut *tx)
    .await?;
    // The builds of the family (same submitter, key and platform) still in a state this submit may
    // cancel, with `build_id` itself: the newest of them wins. Concurrent submits mark in turn under
    // the lock, so whichever marks last sees every other one, whatever order they were submitted in.
    let family: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "WITH marked AS (
             UPDATE builds SET supersede_key = $2 WHERE id = $1 RETURNING id, submitted_by, queue, submitted_at
         )
         SELECT m.id, m.submitted_at FROM marked m
         UNION ALL
         SELECT b.id, b.submitted_at FROM builds b, marked m
          WHERE b.supersede_key = $2 AND b.queue = m.queue AND b.id <> $1
            AND b.submitted_by IS NOT DISTINCT FROM m.submitted_by
            AND b.state = ANY($3)",
    )
    .bind(build_id)
    .bind(key)
    .bind(states)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let Some(newest) = family
        .iter()
        .max_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)))
        .map(|n| n.0.clone())
    else {
        return Ok(Vec::new());
    };
    let message = format!("Superseded by {newest}");
    let why = CancelReason {
        reason: "superseded",
        message: &message,
        queued_only: !running,
    };
    let mut cancelled = Vec::new();
    for (id, _) in family.into_iter().filter(|(id, _)| *id != newest) {
        match cancel_because(pool, &id, now, actor, Some(why)).await {
            Ok(_) => cancelled.push(id),
            // Finished (or deleted) meanwhile, or started while only queued ones may be cancelled.
            Err(QueueError::AlreadyFinished | QueueError::BuildNotFound | QueueError::Conflict(_)) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(cancelled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_flags() {
        assert_eq!(parse(None, None), Ok(None));
        assert_eq!(parse(Some("  "), Some("false")), Ok(None));
        assert_eq!(parse(Some("app/main"), None), Ok(Some(("app/main".to_string(), false))));
        assert_eq!(
            parse(Some("app/main"), Some("true")),
            Ok(Some(("app/main".to_string(), true)))
        );
        assert!(parse(None, Some("true")).is_err());
        assert!(parse(Some("k"), Some("yes")).is_err());
        assert!(parse(Some(&"k".repeat(256)), None).is_err());
        assert!(parse(Some("a\nb"), None).is_err());
    }
}
