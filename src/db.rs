//! The connection pool and migrations.

use std::str::FromStr;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::DbConfig;

/// Migrations embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A pool whose connections carry statement and lock timeouts, so no request waits forever (R12).
pub async fn connect(cfg: &DbConfig) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(&cfg.database_url)?
        .options([
            ("statement_timeout", cfg.db_statement_timeout_ms.to_string()),
            ("lock_timeout", "5000".to_string()),
            ("idle_in_transaction_session_timeout", "60000".to_string()),
        ])
        .disable_statement_logging();
    let pool = PgPoolOptions::new()
        .max_connections(cfg.db_pool_size)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options);
    Ok(pool)
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
