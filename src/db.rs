//! The connection pool and migrations.

use std::str::FromStr;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::DbConfig;

/// Migrations embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A pool whose connections carry statement and lock timeouts, so no request waits forever (R12), and
/// `synchronous_commit=on` unless opted out, so an acknowledged change survives a crash of PostgreSQL
/// whatever the cluster's own setting (R55).
pub async fn connect(cfg: &DbConfig) -> anyhow::Result<PgPool> {
    if !cfg.db_synchronous_commit {
        tracing::warn!(
            "CONTROLLER_DB_SYNCHRONOUS_COMMIT=off: acknowledged submits and completions can be lost if \
             PostgreSQL crashes; use this for benchmarks only"
        );
    }
    Ok(pool_options(cfg.db_pool_size).connect_lazy_with(connect_options(cfg)?))
}

/// A connection idle for longer than this is pinged before it is handed out (see [`pool_options`]).
const PING_AFTER_IDLE: Duration = Duration::from_secs(2);

/// The pool's settings. sqlx's default `test_before_acquire` pings every connection it hands out: a
/// round trip (Sync → ReadyForQuery) before every statement or transaction. Only a connection that sat
/// idle for a while can have been dropped by the server (a restart, an idle timeout, a terminated
/// backend) without anyone noticing, so only such a connection is checked, by an empty query (see
/// [`round_trip`]); one in steady use last answered milliseconds ago, and a failure there is what a
/// failure during the statement would be anyway.
fn pool_options(size: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_AFTER_IDLE {
                    round_trip(conn).await?;
                }
                Ok(true)
            })
        })
}

/// One real round trip to the server: an empty simple query (EmptyQueryResponse, ReadyForQuery).
/// `Connection::ping` is no longer one: the vendored sqlx-postgres (`vendor/README.md`) answers it at
/// once for a connection with nothing pending, which is what spares the round trip sqlx-core makes on
/// every connection it takes back into the pool.
pub async fn round_trip(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("").execute(conn).await.map(|_| ())
}

/// The claim's own few connections (a quarter of the pool, at least 2), with `plan_cache_mode =
/// force_generic_plan`. The claim is one large statement whose custom plan costs more to make than to
/// run (several milliseconds against ~1 ms), and PostgreSQL's own choice between custom and generic
/// plans compares against the average cost of the custom plans it made before: after the table grew (or
/// an `ANALYZE` invalidated the cached plan), that history can keep a connection planning every claim
/// afresh. With the generic plan forced, each connection plans the claim once.
pub fn connect_claims(cfg: &DbConfig) -> anyhow::Result<PgPool> {
    let options = connect_options(cfg)?.options([("plan_cache_mode", "force_generic_plan")]);
    Ok(pool_options((cfg.db_pool_size / 4).max(2)).connect_lazy_with(options))
}

fn connect_options(cfg: &DbConfig) -> anyhow::Result<PgConnectOptions> {
    let synchronous_commit = if cfg.db_synchronous_commit { "on" } else { "off" };
    let options = PgConnectOptions::from_str(&cfg.database_url)
        .map_err(|e| {
            anyhow::anyhow!(
                "invalid DATABASE_URL {}: {e}",
                crate::config::redact_url(&cfg.database_url)
            )
        })?
        .options([
            ("statement_timeout", cfg.db_statement_timeout_ms.to_string()),
            ("lock_timeout", "5000".to_string()),
            ("idle_in_transaction_session_timeout", "60000".to_string()),
            ("synchronous_commit", synchronous_commit.to_string()),
            // Every statement here is a short OLTP one. JIT compiles a statement whose *estimated* cost
            // passes `jit_above_cost`, on every execution of a cached plan: the submit's full-queue
            // check (a sub-select per queue, with `queues` never analysed) cost ~10–40 ms of compiling
            // for ~0.2 ms of work.
            ("jit", "off".to_string()),
        ])
        .disable_statement_logging();
    Ok(options)
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
