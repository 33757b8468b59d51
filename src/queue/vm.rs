//! Token-era VM credentials: the OTP minted at claim is traded once for a VM token scoped to the
//! attempt; the VM reports readiness with it.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::lease::{Holder, heartbeat};
use super::{QueueError, QueueResult, Settings};

/// A VM token to store: its hash (for checks) and a sealed copy (for `vm-status`).
#[derive(Debug, Clone)]
pub struct VmTokenRecord {
    pub hash: Vec<u8>,
    pub sealed: Vec<u8>,
}

/// Consumes the current attempt's unexpired OTP and records the VM token; returns its expiry (the
/// build deadline of the attempt). `None` if the OTP is wrong, expired, used, or the attempt is over.
pub async fn authenticate_vm(
    pool: &PgPool,
    build_id: &str,
    otp_hash: &[u8],
    token: &VmTokenRecord,
    settings: &Settings,
    now: DateTime<Utc>,
) -> QueueResult<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar(
        "UPDATE builds SET otp_hash = NULL, otp_expires_at = NULL, vm_token_hash = $3, vm_token_sealed = $4,
            vm_token_expires_at = coalesce(started_at, $5) + $6::bigint * interval '1 second'
         WHERE id = $1 AND state IN ('assigned', 'building') AND otp_hash = $2 AND otp_expires_at > $5
         RETURNING vm_token_expires_at",
    )
    .bind(build_id)
    .bind(otp_hash)
    .bind(&token.hash)
    .bind(&token.sealed)
    .bind(now)
    .bind(settings.build_deadline_secs as i64)
    .fetch_optional(pool)
    .await?)
}

/// Records that the VM is ready (once); counts as a heartbeat. Returns when it became ready.
pub async fn mark_vm_ready(
    pool: &PgPool,
    build_id: &str,
    holder: Holder<'_>,
    settings: &Settings,
    now: DateTime<Utc>,
) -> QueueResult<DateTime<Utc>> {
    heartbeat(pool, build_id, holder, None, None, settings, now).await?;
    let ready: Option<DateTime<Utc>> = sqlx::query_scalar(
        "UPDATE builds SET vm_ready_at = coalesce(vm_ready_at, $4)
         WHERE id = $1 AND state IN ('assigned', 'building') AND lease_owner = $2 AND ($3::bigint IS NULL OR lease_token = $3)
         RETURNING vm_ready_at",
    )
    .bind(build_id)
    .bind(holder.worker_id)
    .bind(holder.lease_token)
    .bind(now)
    .fetch_optional(pool)
    .await?;
    ready.ok_or(QueueError::Stale)
}
