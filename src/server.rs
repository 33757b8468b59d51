//! Running the controller: the HTTP server and the maintenance jobs share one shutdown signal;
//! `run` waits for both and says which ended and why.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::storage::Storage;
use crate::{db, jobs};

/// A started controller.
pub struct Running {
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<&'static str>,
    grace: std::time::Duration,
}

impl Running {
    /// Stops accepting connections, releases long polls, lets in-flight requests and uploads finish
    /// within the grace period, then ends whatever is left.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + self.grace;
        loop {
            match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(Ok(name))) => tracing::info!(task = name, "stopped"),
                Ok(Some(Err(e))) => tracing::error!(error = %e, "task ended abnormally"),
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        grace_secs = self.grace.as_secs(),
                        "grace period over; ending remaining requests"
                    );
                    self.tasks.abort_all();
                    while self.tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
    }

    /// Waits until a task ends on its own or a shutdown signal arrives, then stops the rest.
    pub async fn wait(mut self) {
        tokio::select! {
            _ = shutdown_signal() => tracing::info!("shutdown signal received"),
            Some(done) = self.tasks.join_next() => match done {
                Ok(name) => tracing::warn!(task = name, "task ended; shutting down"),
                Err(e) => tracing::error!(error = %e, "task failed; shutting down"),
            },
        }
        self.stop().await;
    }
}

/// Validates the configuration, connects, migrates (unless `migrate` is false), binds and starts
/// serving on `listener` (or the configured address).
pub async fn start(config: Config, listener: Option<TcpListener>, migrate: bool) -> anyhow::Result<Running> {
    let secrets = config
        .validate()
        .map_err(|problems| anyhow::anyhow!("invalid configuration:\n  - {problems}"))?;
    crate::metrics::init();
    let presign = &config.storage;
    if presign.presign_downloads && presign.presign_ttl_secs > crate::config::MAX_PRESIGN_TTL_SECS {
        tracing::warn!(
            configured = presign.presign_ttl_secs,
            used = presign.effective_presign_ttl_secs(),
            "CONTROLLER_PRESIGN_TTL_SECS is above the maximum: presigned URLs live {} seconds; \
             lower the setting to silence this warning",
            presign.effective_presign_ttl_secs()
        );
    }
    tracing::info!(
        database = %crate::config::redact_url(&config.db.database_url),
        header_timeout_secs = config.http.header_timeout_secs,
        body_read_timeout_secs = config.http.body_read_timeout_secs,
        "starting"
    );
    let pool = db::connect(&config.db).await?;
    if migrate {
        db::migrate(&pool).await?;
    }
    let storage = open_storage(&config).await?;
    tracing::info!(store = %storage.describe(), "artifact store ready");
    let listener = match listener {
        Some(listener) => listener,
        None => TcpListener::bind(config.listen).await?,
    };
    let addr = listener.local_addr()?;
    let jobs_ctx = jobs::JobContext {
        pool: pool.clone(),
        storage: storage.clone(),
        settings: config.queue.clone(),
        jobs: config.jobs.clone(),
    };
    let run_jobs = config.jobs.run_jobs;
    let (shutdown, stop) = watch::channel(false);
    let events = crate::events::Events::new(&config.events);
    if let Err(error) = crate::events::start(&pool, &events).await {
        tracing::warn!(%error, "event stream not positioned yet; it starts once the database answers");
    }
    let mut state = AppState::new(
        pool.clone(),
        storage,
        config.clone(),
        secrets,
        stop.clone(),
        events.clone(),
    );
    state.claim_pool = db::connect_claims(&config.db)?;
    let (listen_pool, wakeups, listen_stop) = (pool.clone(), state.wakeups.clone(), stop.clone());
    let (pump_pool, pump_events, pump_stop) = (pool.clone(), events.clone(), stop.clone());
    let (pulse_pool, pulse_settings, pulse_stop) = (pool.clone(), config.queue.clone(), stop.clone());
    let mut tasks = tokio::task::JoinSet::new();
    let deliverer =
        crate::webhooks::deliver::Deliverer::new(pool.clone(), config.webhooks.clone(), state.secrets.certs_key)?;
    let (webhook_wake, webhook_stop) = (events.webhooks.clone(), stop.clone());
    let (handed_cache, handed_events, handed_stop) = (state.workers.clone(), events.clone(), stop.clone());
    let (fill_pool, fill_flags, fill_stop) = (pool.clone(), state.full_queues.clone(), stop.clone());
    let max_queued = config.queue.max_queued_builds;
    let app = api::router(state);
    let (http_stop, http) = (stop.clone(), config.http.clone());
    tasks.spawn(async move {
        crate::transport::serve(listener, app, &http, http_stop).await;
        "http"
    });
    tasks.spawn(async move {
        crate::queue::listen(listen_pool, wakeups, events, listen_stop).await;
        "listener"
    });
    tasks.spawn(async move {
        crate::events::pump(pump_pool, pump_events, pump_stop).await;
        "events"
    });
    tasks.spawn(async move {
        crate::api::worker_cache::follow_events(handed_cache, handed_events, handed_stop).await;
        "worker cache"
    });
    tasks.spawn(async move {
        deliverer.run(webhook_wake, webhook_stop).await;
        "webhooks"
    });
    tasks.spawn(async move {
        crate::queue::watch_full_queues(fill_pool, fill_flags, max_queued, fill_stop).await;
        "queue fill"
    });
    tasks.spawn(async move {
        crate::queue::clock::run_pulse(pulse_pool, pulse_settings, pulse_stop).await;
        "clock"
    });
    tasks.spawn(async move {
        if run_jobs {
            jobs::run(jobs_ctx, stop).await;
        } else {
            let mut stop = stop;
            let _ = stop.wait_for(|stopped| *stopped).await;
        }
        "jobs"
    });
    tracing::info!(%addr, "expo-controller listening on http://{addr}");
    let grace = std::time::Duration::from_secs(config.shutdown_grace_secs);
    Ok(Running {
        addr,
        shutdown,
        tasks,
        grace,
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Installs the tracing subscriber (`text` or `json`), filtered by `RUST_LOG` (default `info`).
pub fn init_tracing(format: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    // apalis announces each scheduler at INFO ("Worker prune started"), which reads like build workers.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,apalis_core=warn,apalis_cron=warn,sqlx::postgres::notice=warn"));
    // Colour only for a person at a terminal; never in files, pipes or journald.
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The artifact store the configuration names (`CONTROLLER_STORAGE_URL`, else `CONTROLLER_STORAGE_DIR`),
/// checked to answer (bucket reachable, credentials accepted) — for `serve` and `import-ts` alike.
pub async fn open_storage(config: &Config) -> anyhow::Result<Storage> {
    let target = config.storage_target().map_err(anyhow::Error::msg)?;
    let storage = Storage::open(&target, config.storage_fsync)?;
    storage.check().await.map_err(|e| {
        anyhow::anyhow!(
            "artifact store {} is not usable (bucket missing, credentials refused or endpoint unreachable?): {e}",
            storage.describe()
        )
    })?;
    Ok(storage)
}
