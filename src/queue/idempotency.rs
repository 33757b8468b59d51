//! Idempotent submits (`Idempotency-Key`, webhooks.md): one build per key and submitter within
//! [`WINDOW_HOURS`], whatever the number of concurrent identical submits.
//!
//! After its form is read and before its build is inserted, a submit **claims** the key: one
//! `INSERT … ON CONFLICT` either writes the row naming its own new build (it goes on and inserts the
//! build), or finds the row of an earlier submit. Then the same request answers with that build and
//! its token once the build exists (a concurrent first submit is waited for), and a different request
//! (platform, source size) is refused. A row whose build never appeared (its submit failed or died
//! before the insert) is taken over after [`ABANDONED_SECS`]; a submit refused after its claim releases it.

use std::time::Duration;

use sqlx::PgPool;

use super::{Build, QueueResult, find_build};

/// How long a key names its build.
pub const WINDOW_HOURS: i64 = 24;
/// Longest accepted key, in bytes.
pub const MAX_KEY_LEN: usize = 255;
/// A claim whose build does not exist after this long is abandoned.
const ABANDONED_SECS: i64 = 60;
/// How long a submit waits for a concurrent first submit with the same key to insert its build.
const WAIT_FOR_FIRST: Duration = Duration::from_secs(30);

/// A valid `Idempotency-Key` value (1–255 bytes of visible ASCII), or why not.
pub fn parse_key(value: Option<&str>) -> Result<Option<String>, &'static str> {
    let Some(value) = value else { return Ok(None) };
    let value = value.trim();
    if value.is_empty() || value.len() > MAX_KEY_LEN || !value.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err("Idempotency-Key must be 1–255 bytes of visible ASCII");
    }
    Ok(Some(value.to_string()))
}

/// The submit that claims a key.
#[derive(Debug, Clone)]
pub struct KeyClaim<'a> {
    /// The submitting key's id (`None`: the built-in admin key).
    pub submitter: Option<&'a str>,
    pub key: &'a str,
    /// What makes two submits "the same request": platform, requirements, source size.
    pub fingerprint: &'a str,
    /// The build this submit is about to insert, and its access token.
    pub build_id: &'a str,
    pub access_token: &'a str,
}

/// What a claim found.
#[derive(Debug)]
pub enum Claimed {
    /// The key is this submit's: insert the build.
    Fresh,
    /// An earlier submit with the same key and request: answer with its build and token.
    Replay { build: Box<Build>, access_token: String },
    /// The key was used for another request within the window.
    Reused,
    /// The first submit with this key has not inserted its build within the wait.
    InFlight,
}

#[derive(sqlx::FromRow)]
struct Existing {
    fingerprint: String,
    build_id: String,
    token_sealed: Vec<u8>,
}

/// Claims the key for this submit (see the module docs). `certs_key` seals the access token.
pub async fn claim(pool: &PgPool, certs_key: &[u8; 32], claim: &KeyClaim<'_>) -> QueueResult<Claimed> {
    let submitter = claim.submitter.unwrap_or("");
    let sealed = crate::storage::certs::encrypt(certs_key, claim.access_token.as_bytes());
    let deadline = tokio::time::Instant::now() + WAIT_FOR_FIRST;
    loop {
        let won: Option<String> = sqlx::query_scalar(
            "INSERT INTO submit_idempotency AS i (submitter, key, fingerprint, build_id, token_sealed)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (submitter, key) DO UPDATE
                SET fingerprint = EXCLUDED.fingerprint, build_id = EXCLUDED.build_id,
                    token_sealed = EXCLUDED.token_sealed, created_at = now()
              WHERE i.created_at < now() - make_interval(hours => $6)
                 OR (i.created_at < now() - make_interval(secs => $7)
                     AND NOT EXISTS (SELECT 1 FROM builds b WHERE b.id = i.build_id))
             RETURNING build_id",
        )
        .bind(submitter)
        .bind(claim.key)
        .bind(claim.fingerprint)
        .bind(claim.build_id)
        .bind(&sealed)
        .bind(WINDOW_HOURS as i32)
        .bind(ABANDONED_SECS as f64)
        .fetch_optional(pool)
        .await?;
        if won.is_some() {
            return Ok(Claimed::Fresh);
        }
        let existing: Option<Existing> = sqlx::query_as(
            "SELECT fingerprint, build_id, token_sealed FROM submit_idempotency WHERE submitter = $1 AND key = $2",
        )
        .bind(submitter)
        .bind(claim.key)
        .fetch_optional(pool)
        .await?;
        // Released meanwhile: claim again.
        let Some(existing) = existing else { continue };
        if existing.fingerprint != claim.fingerprint {
            return Ok(Claimed::Reused);
        }
        if let Some(build) = find_build(pool, &existing.build_id).await? {
            let token = crate::storage::certs::decrypt(certs_key, &existing.token_sealed)
                .and_then(|t| String::from_utf8(t).ok());
            return Ok(match token {
                Some(access_token) => Claimed::Replay {
                    build: Box::new(build),
                    access_token,
                },
                // Sealed under another certs key: the request cannot be answered as before.
                None => Claimed::Reused,
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(Claimed::InFlight);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Whether `key` of `submitter` already names a build made within the window: a retried submit whose
/// first answer was lost then gets that build even when the submitter's quota or the queue is full now
/// (the fingerprint is still compared before it is answered).
pub async fn names_a_build(pool: &PgPool, submitter: Option<&str>, key: &str) -> QueueResult<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM submit_idempotency i JOIN builds b ON b.id = i.build_id
                         WHERE i.submitter = $1 AND i.key = $2
                           AND i.created_at >= now() - make_interval(hours => $3))",
    )
    .bind(submitter.unwrap_or(""))
    .bind(key)
    .bind(WINDOW_HOURS as i32)
    .fetch_one(pool)
    .await?)
}

/// Gives a claimed key back after the submit was refused before its build was inserted.
pub async fn release(pool: &PgPool, submitter: Option<&str>, key: &str, build_id: &str) -> QueueResult<()> {
    sqlx::query("DELETE FROM submit_idempotency WHERE submitter = $1 AND key = $2 AND build_id = $3")
        .bind(submitter.unwrap_or(""))
        .bind(key)
        .bind(build_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Deletes up to `batch` keys past the window (by the prune job).
pub async fn prune(pool: &PgPool, batch: i64) -> QueueResult<u64> {
    let deleted = sqlx::query(
        "DELETE FROM submit_idempotency WHERE (submitter, key) IN (
             SELECT submitter, key FROM submit_idempotency
              WHERE created_at < now() - make_interval(hours => $1) ORDER BY created_at LIMIT $2)",
    )
    .bind(WINDOW_HOURS as i32)
    .bind(batch)
    .execute(pool)
    .await?;
    Ok(deleted.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_bounded_visible_ascii() {
        assert_eq!(parse_key(None), Ok(None));
        assert_eq!(parse_key(Some(" ci-run-42 ")), Ok(Some("ci-run-42".to_string())));
        assert!(parse_key(Some("")).is_err());
        assert!(parse_key(Some(&"k".repeat(256))).is_err());
        assert!(parse_key(Some(&"k".repeat(255))).is_ok());
        assert!(parse_key(Some("tab\there")).is_err());
        assert!(parse_key(Some("é")).is_err());
    }
}
