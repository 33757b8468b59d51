//! The bench environment: a throwaway PostgreSQL (as `make run` starts one, on its own directory and
//! port) and the release controller as a child process, whose memory is read from /proc.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

pub const API_KEY: &str = "bench-admin-key-0123456789abcdef0123456789";
/// Default ports; `BENCH_PG_PORT` and `BENCH_PORT_BASE` (controller; P8 uses the next two) move them.
const PG_PORT: u16 = 54331;
const HTTP_PORT: u16 = 4100;

fn port_from_env(name: &str, default: u16) -> u16 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn pg_port() -> u16 {
    port_from_env("BENCH_PG_PORT", PG_PORT)
}

/// The controller's port; P8 uses the next two (a controller on S3 and the S3 server).
pub fn http_port() -> u16 {
    port_from_env("BENCH_HTTP_PORT", port_from_env("BENCH_PORT_BASE", HTTP_PORT))
}

pub struct Env {
    pub root: PathBuf,
    pub database_url: String,
    pub pool: PgPool,
    pub certs_key: String,
}

/// Starts PostgreSQL under `root/pg` and creates a fresh `bench` database.
pub async fn database(root: &Path) -> anyhow::Result<Env> {
    std::fs::create_dir_all(root)?;
    let pg = root.join("pg");
    let status = Command::new("scripts/pg.sh")
        .arg("start")
        .arg(&pg)
        .arg(pg_port().to_string())
        .arg("fast")
        .status()?;
    anyhow::ensure!(status.success(), "could not start PostgreSQL");
    let pg_port = pg_port();
    let admin_url = format!("postgres://postgres@127.0.0.1:{pg_port}/postgres");
    let admin = PgPoolOptions::new().max_connections(1).connect(&admin_url).await?;
    sqlx::query("DROP DATABASE IF EXISTS bench WITH (FORCE)")
        .execute(&admin)
        .await?;
    sqlx::query("CREATE DATABASE bench").execute(&admin).await?;
    admin.close().await;
    let database_url = format!("postgres://postgres@127.0.0.1:{pg_port}/bench");
    let pool = PgPoolOptions::new().max_connections(8).connect(&database_url).await?;
    expo_controller::db::migrate(&pool).await?;
    let storage = root.join("storage");
    let _ = std::fs::remove_dir_all(&storage);
    Ok(Env {
        root: root.to_path_buf(),
        database_url,
        pool,
        certs_key: expo_controller::ids::new_key32(),
    })
}

/// Restarts the bench PostgreSQL in durable mode (`fsync`, `synchronous_commit` and
/// `full_page_writes` on, as a real deployment runs) or back in the fast mode of the other scenarios.
pub async fn restart_database(env: &Env, durable: bool) -> anyhow::Result<()> {
    let pg = env.root.join("pg");
    stop_database(&env.root);
    let mut command = Command::new("scripts/pg.sh");
    command.arg("start").arg(&pg).arg(pg_port().to_string());
    if !durable {
        command.arg("fast");
    }
    anyhow::ensure!(command.status()?.success(), "could not restart PostgreSQL");
    // The pool's connections died with the server: make sure the next query gets a live one.
    for _ in 0..50 {
        if sqlx::query("SELECT 1").execute(&env.pool).await.is_ok() {
            let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(&env.pool).await?;
            eprintln!("bench PostgreSQL restarted with fsync={fsync}");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("PostgreSQL did not come back")
}

pub fn stop_database(root: &Path) {
    let _ = Command::new("scripts/pg.sh").arg("stop").arg(root.join("pg")).status();
}

/// The controller under test.
pub struct Controller {
    child: Child,
    pub base: String,
}

impl Controller {
    /// Launches the release binary and waits for `/ready`; returns it and the time to ready.
    pub async fn launch(env: &Env, client: &reqwest::Client) -> anyhow::Result<(Controller, Duration)> {
        Self::launch_with(env, client, http_port(), &[]).await
    }

    /// [`Controller::launch`] on `port` with extra environment (e.g. S3 storage).
    pub async fn launch_with(
        env: &Env,
        client: &reqwest::Client,
        port: u16,
        extra: &[(&str, String)],
    ) -> anyhow::Result<(Controller, Duration)> {
        Self::launch_binary(env, client, port, extra, None).await
    }

    /// [`Controller::launch_with`] of `binary` (default: `BENCH_CONTROLLER`, else the release
    /// controller beside this bench).
    pub async fn launch_binary(
        env: &Env,
        client: &reqwest::Client,
        port: u16,
        extra: &[(&str, String)],
        binary: Option<&std::path::Path>,
    ) -> anyhow::Result<(Controller, Duration)> {
        // A reference build of an older commit must not migrate the shared database (its migrator would
        // refuse the newer migrations it does not know); its schema must be compatible with ours.
        let reference = binary.is_some();
        // BENCH_CONTROLLER: another controller binary (an A/B against an earlier build).
        let binary = match (binary, std::env::var_os("BENCH_CONTROLLER")) {
            (Some(path), _) => path.to_path_buf(),
            (None, Some(path)) => PathBuf::from(path),
            (None, None) => std::env::current_exe()?.with_file_name("expo-controller"),
        };
        anyhow::ensure!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} is busy: is another controller still running?"
        );
        let started = Instant::now();
        let mut command = Command::new(binary);
        // D1–D3 measure the dashboard's queries: no read cache (D4 launches its own controller with it).
        command.env("CONTROLLER_DASHBOARD_CACHE_MS", "0");
        command.arg("serve");
        if reference {
            command.arg("--no-migrate");
        }
        let child = command
            .env("DATABASE_URL", &env.database_url)
            .env("CONTROLLER_API_KEY", API_KEY)
            .env("CONTROLLER_CERTS_KEY", &env.certs_key)
            .env("CONTROLLER_LISTEN", format!("127.0.0.1:{port}"))
            .env("CONTROLLER_STORAGE_DIR", env.root.join("storage"))
            // As the reference PostgreSQL: no fsync (the default is on).
            .env("CONTROLLER_STORAGE_FSYNC", "false")
            // As the reference PostgreSQL (fast mode): asynchronous commit, an explicit opt-out.
            .env("CONTROLLER_DB_SYNCHRONOUS_COMMIT", "off")
            .env("CONTROLLER_RATE_LIMIT_PER_IP", "0")
            .env("CONTROLLER_RATE_LIMIT_PER_CREDENTIAL", "0")
            .env(
                "CONTROLLER_DB_POOL_SIZE",
                std::env::var("BENCH_POOL").unwrap_or_else(|_| "8".into()),
            )
            .env("CONTROLLER_MAX_RESULT_BYTES", (2u64 << 30).to_string())
            .env("RUST_LOG", "warn")
            // Scenario settings (S3 storage, durability for P12d) override the defaults above.
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut controller = Controller {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = started + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = controller.child.try_wait() {
                anyhow::bail!("controller exited: {status}");
            }
            if let Ok(r) = client.get(format!("{}/ready", controller.base)).send().await
                && r.status() == 200
            {
                return Ok((controller, started.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        anyhow::bail!("controller did not become ready")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// CPU time (user + system) the controller has used so far, in seconds.
    pub fn cpu_secs(&self) -> f64 {
        let (user, system) = self.cpu_split();
        user + system
    }

    /// The controller's process id (for `perf record -p`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time (user, system) the controller has used so far, in seconds.
    pub fn cpu_split(&self) -> (f64, f64) {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may contain spaces): utime and stime are 14 and 15.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<u64> = after.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
        let ticks = |n: usize| fields.get(n).copied().unwrap_or(0) as f64 / 100.0;
        (ticks(11), ticks(12))
    }

    /// (current RSS, peak RSS) in KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Controller {
    /// SIGTERM (graceful), then SIGKILL after 10 s: no controller outlives the bench.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Inserts `count` workers `<prefix><n>` for `platform`, with tokens `<prefix>token-<n>`.
pub async fn insert_workers(
    pool: &PgPool,
    prefix: &str,
    count: usize,
    platform: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let prefix = unique(prefix);
    let workers: Vec<(String, String)> = (0..count)
        .map(|n| (format!("{prefix}{n}"), format!("{prefix}token-{n}-{}", "x".repeat(32))))
        .collect();
    let ids: Vec<&str> = workers.iter().map(|w| w.0.as_str()).collect();
    let hashes: Vec<Vec<u8>> = workers
        .iter()
        .map(|w| expo_controller::ids::hash_secret(&w.1))
        .collect();
    sqlx::query(
        "INSERT INTO workers (id, name, platforms, token_hash, token_expires_at)
         SELECT id, 'bench', ARRAY[$3], hash, now() + interval '1 day' FROM unnest($1::text[], $2::bytea[]) AS t(id, hash)",
    )
    .bind(&ids)
    .bind(&hashes)
    .bind(platform)
    .execute(pool)
    .await?;
    Ok(workers)
}

/// Inserts `count` claimable builds for `platform` (rows only, no files).
pub async fn insert_pending(pool: &PgPool, prefix: &str, count: i64, platform: &str) -> anyhow::Result<()> {
    let prefix = unique(prefix);
    sqlx::query(
        "INSERT INTO builds (id, state, queue, run_at, submitted_at, source_key, source_size)
         SELECT $1 || g, 'pending', $3, now() - interval '1 minute', now(), 'builds/' || $1 || g || '/source.zip', 1
         FROM generate_series(1, $2) g",
    )
    .bind(&prefix)
    .bind(count)
    .bind(platform)
    .execute(pool)
    .await?;
    Ok(())
}

/// `prefix` plus a fresh tag, so that repeated runs never collide.
fn unique(prefix: &str) -> String {
    format!("{prefix}{}-", &expo_controller::ids::new_id()[..6])
}

/// Inserts `count` finished builds (history that the claim must not slow down on).
pub async fn insert_finished(pool: &PgPool, prefix: &str, count: i64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO builds (id, state, queue, run_at, submitted_at, started_at, completed_at, attempt, worker_id,
                             finished_reason, source_key, source_size)
         SELECT $1 || g, CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'completed' END,
                CASE WHEN g % 2 = 0 THEN 'ios' ELSE 'android' END,
                now() - interval '3 days', now() - interval '3 days', now() - interval '3 days',
                now() - interval '2 days', 1, 'old-worker', 'completed', 'builds/' || $1 || g || '/source.zip', 1
         FROM generate_series(1, $2) g",
    )
    .bind(prefix)
    .bind(count)
    .execute(pool)
    .await?;
    // Let the bulk insert settle (visibility map, statistics, dirty buffers) before measuring.
    sqlx::query("VACUUM ANALYZE builds").execute(pool).await?;
    sqlx::query("CHECKPOINT").execute(pool).await?;
    Ok(())
}
