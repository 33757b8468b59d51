//! The lease clock stops while the controller itself is unreachable (fleet-health.md, the defect of
//! openai/orchard #454): heartbeats that could not be delivered because PostgreSQL was down, or because
//! no controller instance ran, must not expire leases or take workers offline.
//!
//! Every instance stamps `controller_clock.last_contact` about once a second ([`pulse`]). Whoever next
//! reaches the database after a gap longer than [`OUTAGE_AFTER_SECS`] — an instance's pulse, or a rescue
//! or offline sweep ([`catch_up`], which runs before it looks) — stops the clock for the gap in the
//! transaction that locks and stamps the row: every lease still live when contact was lost gets at least
//! one full lease timeout from now (and never less than it had left before the gap), and every worker
//! seen before the gap is treated as seen `gap` later. Builds whose workers really vanished are rescued
//! one lease timeout after the outage. Database time (`now()`) is used throughout, not the `now` the
//! queue functions take, so tests that move time do not look like outages.

use sqlx::PgPool;

use super::{QueueResult, Settings};

/// How often each instance stamps its contact.
pub const PULSE: std::time::Duration = std::time::Duration::from_secs(1);

/// A gap in contact longer than this is an outage whose time does not count against leases.
pub const OUTAGE_AFTER_SECS: f64 = 3.0;

/// The clock stopped for an outage: its length and what was extended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outage {
    pub seconds: f64,
    pub leases_extended: u64,
    pub workers_kept: u64,
}

/// Stamps this instance's contact (creating the row on first use) and stops the lease clock for a
/// preceding outage.
pub async fn pulse(pool: &PgPool, settings: &Settings) -> QueueResult<Option<Outage>> {
    stamp(pool, settings, true).await
}

/// Stops the lease clock for an outage nobody has accounted for yet; a no-op before any instance
/// ever pulsed. The rescue and offline sweeps call it first, so a sweep that runs right after an outage
/// (before any pulse) never judges the undelivered heartbeats.
pub async fn catch_up(pool: &PgPool, settings: &Settings) -> QueueResult<Option<Outage>> {
    stamp(pool, settings, false).await
}

async fn stamp(pool: &PgPool, settings: &Settings, create: bool) -> QueueResult<Option<Outage>> {
    // The common case, one statement: contact was never lost, so only the stamp moves. (It waits for a
    // concurrent catch-up's row lock and then sees that stamp.)
    let fresh = sqlx::query(
        "UPDATE controller_clock SET last_contact = clock_timestamp()
         WHERE id = 1 AND last_contact >= clock_timestamp() - make_interval(secs => $1)",
    )
    .bind(OUTAGE_AFTER_SECS)
    .execute(pool)
    .await?;
    if fresh.rows_affected() == 1 {
        return Ok(None);
    }
    let mut tx = pool.begin().await?;
    // The row lock serialises instances: the second one to look after an outage sees the first's stamp.
    let last: Option<(f64,)> = sqlx::query_as(
        "SELECT extract(epoch FROM clock_timestamp() - last_contact)::float8 FROM controller_clock
         WHERE id = 1 FOR UPDATE",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some((gap,)) = last else {
        if create {
            sqlx::query(
                "INSERT INTO controller_clock (id, last_contact) VALUES (1, clock_timestamp()) ON CONFLICT (id) DO NOTHING",
            )
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        return Ok(None);
    };
    let mut outage = None;
    if gap > OUTAGE_AFTER_SECS {
        let leases = sqlx::query(
            "UPDATE builds b SET lease_expires_at = GREATEST(
                    b.lease_expires_at + make_interval(secs => $1),
                    clock_timestamp() + make_interval(secs => $2))
             FROM controller_clock c
             WHERE c.id = 1 AND b.state IN ('assigned', 'building') AND b.lease_expires_at > c.last_contact",
        )
        .bind(gap)
        .bind(settings.lease_timeout_secs as f64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let workers = sqlx::query(
            "UPDATE workers w SET last_seen_at = LEAST(w.last_seen_at + make_interval(secs => $1), clock_timestamp())
             FROM controller_clock c
             WHERE c.id = 1 AND w.status <> 'offline' AND w.last_seen_at <= c.last_contact",
        )
        .bind(gap)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        outage = Some(Outage {
            seconds: gap,
            leases_extended: leases,
            workers_kept: workers,
        });
    }
    sqlx::query("UPDATE controller_clock SET last_contact = clock_timestamp() WHERE id = 1")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    if let Some(outage) = &outage {
        metrics::counter!(crate::metrics::CONTROLLER_OUTAGES).increment(1);
        tracing::warn!(
            seconds = outage.seconds,
            leases_extended = outage.leases_extended,
            workers_kept = outage.workers_kept,
            "no controller instance reached the database for a while; the lease clock stopped for that time"
        );
    }
    Ok(outage)
}

/// Pulses every [`PULSE`] until `stop` flips. Failures (the database is down) are logged once per outage.
pub async fn run_pulse(pool: PgPool, settings: Settings, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut failing = false;
    loop {
        match pulse(&pool, &settings).await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("database contact restored");
            }
            Ok(_) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%error, "database contact lost; leases stop aging until it is back");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(PULSE) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}
