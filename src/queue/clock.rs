//! The lease clock stops while the controller itself is unreachable (fleet-health.md, the defect of
//! openai/orchard #454): heartbeats that could not be delivered because PostgreSQL was down, or because
//! no controller instance ran, must not expire leases or take workers offline.
//!
//! Every instance stamps `controller_clock.last_contact` about once a second ([`pulse`]), on a
//! connection of its own: a saturated pool (whose acquire waits up to 5 s) must not look like an outage.
//! Whoever next reaches the database after a gap longer than [`outage_after_secs`] (3 s, or a quarter of
//! the lease timeout when that is longer) — an instance's pulse, or a rescue or offline sweep
//! ([`catch_up`], which runs before it looks) — stops the clock for the gap in the transaction that locks
//! and stamps the row: every lease still live when contact was lost is extended by the gap, and gets at
//! least [`outage_after_secs`] from now after a gap shorter than the lease timeout (time to deliver a
//! heartbeat), or one full lease timeout from now after a longer one; every worker seen before the gap
//! is treated as seen `gap` later. A short gap that recurs therefore never keeps a vanished worker's
//! lease alive for more than the gaps themselves. Builds whose workers really vanished are rescued
//! one lease timeout after the outage. Database time (`now()`) is used throughout, not the `now` the
//! queue functions take, so tests that move time do not look like outages.

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};

use super::{QueueResult, Settings};

/// How often each instance stamps its contact.
pub const PULSE: std::time::Duration = std::time::Duration::from_secs(1);

/// A gap in contact shorter than this is never an outage.
pub const OUTAGE_AFTER_SECS: f64 = 3.0;

/// A gap in contact longer than this is an outage whose time does not count against leases:
/// [`OUTAGE_AFTER_SECS`], or a quarter of the lease timeout when that is longer.
pub fn outage_after_secs(settings: &Settings) -> f64 {
    OUTAGE_AFTER_SECS.max(settings.lease_timeout_secs as f64 / 4.0)
}

/// How long connecting the pulse's own connection may take before the attempt counts as failed.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The clock stopped for an outage: its length and what was extended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outage {
    pub seconds: f64,
    pub leases_extended: u64,
    pub workers_kept: u64,
}

/// Stamps this instance's contact (creating the row on first use) and stops the lease clock for a
/// preceding outage, on the pulse's own connection ([`pulse_connection`]).
pub async fn pulse(conn: &mut PgConnection, settings: &Settings) -> QueueResult<Option<Outage>> {
    stamp(conn, settings, true).await
}

/// Opens the pulse's own connection with the pool's options (not from the pool: a saturated pool must
/// not delay the stamp into a false outage). Its commits are asynchronous: a stamp lost in a crash is
/// only the next one late, and the transaction that stops the clock commits synchronously.
pub async fn pulse_connection(pool: &PgPool) -> QueueResult<PgConnection> {
    let options: PgConnectOptions = pool.connect_options().as_ref().clone();
    let options = options
        .options([("synchronous_commit", "off")])
        .application_name("expo-controller clock");
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await {
        Ok(conn) => Ok(conn?),
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connecting the clock's pulse timed out",
        ))
        .into()),
    }
}

/// Stops the lease clock for an outage nobody has accounted for yet; a no-op before any instance
/// ever pulsed. The rescue and offline sweeps call it first, so a sweep that runs right after an outage
/// (before any pulse) never judges the undelivered heartbeats.
pub async fn catch_up(pool: &PgPool, settings: &Settings) -> QueueResult<Option<Outage>> {
    let mut conn = pool.acquire().await?;
    stamp(&mut conn, settings, false).await
}

async fn stamp(conn: &mut PgConnection, settings: &Settings, create: bool) -> QueueResult<Option<Outage>> {
    let outage_after = outage_after_secs(settings);
    // The common case, one statement: contact was never lost, so only the stamp moves. (It waits for a
    // concurrent catch-up's row lock and then sees that stamp.)
    let fresh = sqlx::query(
        "UPDATE controller_clock SET last_contact = clock_timestamp()
         WHERE id = 1 AND last_contact >= clock_timestamp() - make_interval(secs => $1)",
    )
    .bind(outage_after)
    .execute(&mut *conn)
    .await?;
    if fresh.rows_affected() == 1 {
        return Ok(None);
    }
    let mut tx = conn.begin().await?;
    sqlx::query("SET LOCAL synchronous_commit = on")
        .execute(&mut *tx)
        .await?;
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
    if gap > outage_after {
        // Time to deliver a heartbeat after a short gap; a full lease after one longer than a lease.
        let floor = if gap < settings.lease_timeout_secs as f64 {
            outage_after.min(settings.lease_timeout_secs as f64)
        } else {
            settings.lease_timeout_secs as f64
        };
        let leases = sqlx::query(
            "UPDATE builds b SET lease_expires_at = GREATEST(
                    b.lease_expires_at + make_interval(secs => $1),
                    clock_timestamp() + make_interval(secs => $2))
             FROM controller_clock c
             WHERE c.id = 1 AND b.state IN ('assigned', 'building') AND b.lease_expires_at > c.last_contact",
        )
        .bind(gap)
        .bind(floor)
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

/// Pulses every [`PULSE`] on its own connection (reopened after a failure) until `stop` flips.
/// Failures (the database is down) are logged once per outage.
pub async fn run_pulse(pool: PgPool, settings: Settings, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut failing = false;
    let mut conn: Option<PgConnection> = None;
    loop {
        let result = match conn.as_mut() {
            Some(open) => pulse(open, &settings).await,
            None => match pulse_connection(&pool).await {
                Ok(open) => pulse(conn.insert(open), &settings).await,
                Err(error) => Err(error),
            },
        };
        if result.is_err() {
            // A broken connection is not reused; the next round opens a new one.
            conn = None;
        }
        match result {
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
