//! One typed configuration, read from flags and environment variables and validated once at start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Settings of a running controller (`expo-controller serve`).
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on. Never all interfaces unless set explicitly.
    #[arg(long, env = "CONTROLLER_LISTEN", default_value = "127.0.0.1:4000")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub db: DbConfig,

    /// Admin API key (`X-API-Key`); required, at least 32 characters.
    #[arg(long, env = "CONTROLLER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Root directory of local artifact storage.
    #[arg(long, env = "CONTROLLER_STORAGE_DIR", default_value = "./.data/storage")]
    pub storage_dir: PathBuf,

    /// fsync stored files (and their directories) before a write is acknowledged.
    #[arg(long, env = "CONTROLLER_STORAGE_FSYNC", default_value_t = true, action = clap::ArgAction::Set)]
    pub storage_fsync: bool,

    #[command(flatten)]
    pub storage: StorageConfig,

    /// Key that encrypts certificates at rest: base64 of 32 bytes (`expo-controller gen-key`).
    #[arg(long, env = "CONTROLLER_CERTS_KEY", hide_env_values = true)]
    pub certs_key: Option<String>,

    /// VM base image id handed to workers on register and poll.
    #[arg(long, env = "BASE_IMAGE_ID", default_value = "ghcr.io/expo/free-agent-base:latest")]
    pub base_image_id: String,

    /// Largest accepted source archive, in bytes.
    #[arg(long, env = "CONTROLLER_MAX_SOURCE_BYTES", default_value_t = 500 * 1024 * 1024)]
    pub max_source_bytes: u64,

    /// Largest accepted certs bundle, in bytes.
    #[arg(long, env = "CONTROLLER_MAX_CERTS_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_certs_bytes: u64,

    /// Largest accepted build result, in bytes.
    #[arg(long, env = "CONTROLLER_MAX_RESULT_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub max_result_bytes: u64,

    /// Default `max_running` of new submitter keys (0 = unlimited).
    #[arg(long, env = "CONTROLLER_SUBMITTER_MAX_RUNNING", default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..=1_000_000))]
    pub submitter_max_running: i64,

    /// Default `max_queued` of new submitter keys (0 = unlimited).
    #[arg(long, env = "CONTROLLER_SUBMITTER_MAX_QUEUED", default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..=1_000_000))]
    pub submitter_max_queued: i64,

    /// Most log lines kept per build; later lines are counted and dropped.
    #[arg(long, env = "CONTROLLER_MAX_LOG_LINES", default_value_t = 10_000)]
    pub max_log_lines: i64,

    /// Requests per second allowed from one IP address (0 disables the limit).
    #[arg(long, env = "CONTROLLER_RATE_LIMIT_PER_IP", default_value_t = 2_000)]
    pub rate_limit_per_ip: u32,

    /// Requests per second allowed for one credential (0 disables the limit).
    #[arg(long, env = "CONTROLLER_RATE_LIMIT_PER_CREDENTIAL", default_value_t = 200)]
    pub rate_limit_per_credential: u32,

    #[command(flatten)]
    pub http: HttpConfig,

    #[command(flatten)]
    pub queue: QueueConfig,

    #[command(flatten)]
    pub jobs: JobsConfig,

    #[command(flatten)]
    pub dashboard: DashboardConfig,

    #[command(flatten)]
    pub events: EventsConfig,

    #[command(flatten)]
    pub webhooks: WebhookConfig,

    /// On SIGTERM/SIGINT: how long in-flight requests and uploads may take to finish, in seconds.
    #[arg(long, env = "CONTROLLER_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Log format: `text` or `json`.
    #[arg(long, env = "CONTROLLER_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// Object storage beyond the local directory (S3-compatible stores shared by several instances).
#[derive(Debug, Clone, Args)]
pub struct StorageConfig {
    /// Artifact store: `s3://bucket[/prefix]` (endpoint, region and credentials from the standard
    /// `AWS_*` variables), `file:///absolute/dir`, or unset for CONTROLLER_STORAGE_DIR.
    #[arg(long, env = "CONTROLLER_STORAGE_URL")]
    pub storage_url: Option<String>,

    /// Answer result and source downloads of owners with a 302 to a short-lived presigned URL (S3 only).
    #[arg(long, env = "CONTROLLER_PRESIGN_DOWNLOADS", default_value_t = false, action = clap::ArgAction::Set)]
    pub presign_downloads: bool,

    /// Lifetime of a presigned download URL, in seconds (a larger value is clamped to 3600, with a
    /// warning at start). A URL already handed out stays
    /// valid for this long even if the build token that obtained it is revoked or the build deleted.
    #[arg(long, env = "CONTROLLER_PRESIGN_TTL_SECS", default_value_t = 300)]
    pub presign_ttl_secs: u64,
}

impl StorageConfig {
    /// The lifetime given to presigned URLs: `CONTROLLER_PRESIGN_TTL_SECS`, at most
    /// [`MAX_PRESIGN_TTL_SECS`] (T13).
    pub fn effective_presign_ttl_secs(&self) -> u64 {
        self.presign_ttl_secs.min(MAX_PRESIGN_TTL_SECS)
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            storage_url: None,
            presign_downloads: false,
            presign_ttl_secs: 300,
        }
    }
}

impl Config {
    /// The configured artifact store.
    pub fn storage_target(&self) -> Result<crate::storage::StorageTarget, String> {
        crate::storage::StorageTarget::parse(self.storage.storage_url.as_deref(), &self.storage_dir)
    }
}

/// Database connection settings, shared by every subcommand that talks to PostgreSQL.
#[derive(Debug, Clone, Args)]
pub struct DbConfig {
    /// PostgreSQL connection URL (its value is never shown in `--help` or logs).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Largest number of pooled database connections.
    #[arg(long, env = "CONTROLLER_DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: u32,

    /// Statement timeout for every pooled connection, in milliseconds.
    #[arg(long, env = "CONTROLLER_DB_STATEMENT_TIMEOUT_MS", default_value_t = 30_000)]
    pub db_statement_timeout_ms: u64,

    /// `synchronous_commit` of the controller's own connections. `on` (the default) makes every
    /// acknowledged change durable whatever the cluster's setting; `off` is for benchmarks only.
    #[arg(long, env = "CONTROLLER_DB_SYNCHRONOUS_COMMIT", default_value = "on", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub db_synchronous_commit: bool,
}

impl DbConfig {
    /// Settings for `database_url` with the defaults of every other field.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            db_pool_size: 8,
            db_statement_timeout_ms: 30_000,
            db_synchronous_commit: true,
        }
    }
}

/// `url` with any password replaced by `***`, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                url.to_string()
            }
        }
        None => url.to_string(),
    }
}

/// Longest lifetime of a presigned download URL (T13): it outlives a revoked token for that long.
pub const MAX_PRESIGN_TTL_SECS: u64 = 3600;

/// Transport limits of the HTTP server (R43, R56): how long a connection may take to send a request
/// head or the next piece of a body, and the admin key's own rate limit.
#[derive(Debug, Clone, Args)]
pub struct HttpConfig {
    /// A connection must send a complete request head within this many seconds of opening, or of the
    /// previous answer on a kept-alive connection (so it is also the idle keep-alive timeout).
    #[arg(long, env = "CONTROLLER_HEADER_TIMEOUT_SECS", default_value_t = 30)]
    pub header_timeout_secs: u64,

    /// A request body (an upload) that delivers no data for this many seconds is cut. A slow upload
    /// that keeps making progress is never cut, however long it takes.
    #[arg(long, env = "CONTROLLER_BODY_READ_TIMEOUT_SECS", default_value_t = 60)]
    pub body_read_timeout_secs: u64,

    /// An answer the client does not take (its connection accepts no byte) for this many seconds is cut
    /// and the connection closed. An idle connection (a long poll, an event stream between events) is not
    /// writing, so it is never cut by this.
    #[arg(long, env = "CONTROLLER_WRITE_TIMEOUT_SECS", default_value_t = 60)]
    pub write_timeout_secs: u64,

    /// Requests per second allowed for the admin key (per worker id for G0 workers sharing it);
    /// 0 (the default) means the admin key has no per-credential limit. The per-IP limit still applies.
    #[arg(long, env = "CONTROLLER_RATE_LIMIT_PER_ADMIN_KEY", default_value_t = 0)]
    pub rate_limit_per_admin_key: u32,
}

impl HttpConfig {
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_secs(self.body_read_timeout_secs)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_secs)
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.header_timeout_secs == 0 || self.body_read_timeout_secs == 0 || self.write_timeout_secs == 0 {
            problems.push(
                "CONTROLLER_HEADER_TIMEOUT_SECS, CONTROLLER_BODY_READ_TIMEOUT_SECS and CONTROLLER_WRITE_TIMEOUT_SECS \
                 must be positive"
                    .to_string(),
            );
        }
        problems
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_timeout_secs: 30,
            body_read_timeout_secs: 60,
            write_timeout_secs: 60,
            rate_limit_per_admin_key: 0,
        }
    }
}

/// Leases, deadlines and retries of the build queue.
#[derive(Debug, Clone, Args)]
pub struct QueueConfig {
    /// A held build whose lease is not extended for this long is rescued.
    #[arg(long, env = "CONTROLLER_LEASE_TIMEOUT_SECS", default_value_t = 300)]
    pub lease_timeout_secs: u64,

    /// Lease granted at assignment, before the first heartbeat (a VM takes minutes to boot).
    #[arg(long, env = "CONTROLLER_FIRST_HEARTBEAT_GRACE_SECS", default_value_t = 600)]
    pub first_heartbeat_grace_secs: u64,

    /// An attempt running longer than this is failed as timed out, heartbeats or not.
    #[arg(long, env = "CONTROLLER_BUILD_DEADLINE_SECS", default_value_t = 7200)]
    pub build_deadline_secs: u64,

    /// Default attempts per build (1..10).
    #[arg(long, env = "CONTROLLER_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: i32,

    /// Base of the exponential retry backoff, in seconds.
    #[arg(long, env = "CONTROLLER_BACKOFF_BASE_SECS", default_value_t = 15)]
    pub backoff_base_secs: u64,

    /// Cap of the retry backoff, in seconds.
    #[arg(long, env = "CONTROLLER_BACKOFF_CAP_SECS", default_value_t = 600)]
    pub backoff_cap_secs: u64,

    /// Retry builds whose worker reported a build failure (default: a failed build is final).
    #[arg(long, env = "CONTROLLER_RETRY_BUILD_FAILURES", default_value_t = false)]
    pub retry_build_failures: bool,

    /// Accept a build whose requirements no registered worker satisfies (it waits with reason
    /// `no_matching_worker_registered`); by default such a submit answers 422 `no_matching_worker`.
    #[arg(long, env = "CONTROLLER_ACCEPT_UNMATCHED", default_value_t = false)]
    pub accept_unmatched: bool,

    /// Lifetime of a worker token; every authenticated poll extends it.
    #[arg(long, env = "CONTROLLER_WORKER_TOKEN_TTL_SECS", default_value_t = 86_400)]
    pub worker_token_ttl_secs: u64,

    /// A build an operator requeued is not handed back to the worker it came from for this long
    /// (0: no cool-off).
    #[arg(long, env = "CONTROLLER_REQUEUE_COOLOFF_SECS", default_value_t = 600)]
    pub requeue_cooloff_secs: u64,

    /// Most queued builds (pending, scheduled, retryable) per platform; past it, submit and retry
    /// answer 503 `Build queue is full` with `Retry-After`.
    #[arg(long, env = "CONTROLLER_MAX_QUEUED_BUILDS", default_value_t = 10_000)]
    pub max_queued_builds: i64,

    /// Most CPU/memory samples kept per build; past it, every other one of the oldest half is dropped
    /// (the chart keeps the whole run, at a coarser step for its beginning).
    #[arg(long, env = "CONTROLLER_MAX_SAMPLES_PER_BUILD", default_value_t = 2_000)]
    pub max_samples_per_build: i64,

    /// Most retries a build token may create per original build (the admin key is not limited).
    #[arg(long, env = "CONTROLLER_MAX_RETRIES_PER_BUILD", default_value_t = 10)]
    pub max_retries_per_build: i64,

    /// A worker with this many infrastructure failures among its last `CONTROLLER_QUARANTINE_WINDOW`
    /// ended attempts is quarantined (0: never).
    #[arg(long, env = "CONTROLLER_QUARANTINE_FAILURES", default_value_t = 3)]
    pub quarantine_failures: u32,

    /// How many of a worker's last ended attempts its reputation looks at.
    #[arg(long, env = "CONTROLLER_QUARANTINE_WINDOW", default_value_t = 5)]
    pub quarantine_window: u32,

    /// Length of a first quarantine; then probation (a relapse doubles it, capped at 24 h).
    #[arg(long, env = "CONTROLLER_QUARANTINE_SECS", default_value_t = 3600)]
    pub quarantine_secs: u64,

    /// A build whose attempt ended in an infrastructure failure (or was given back) is not handed back
    /// to that worker for this long while another matching worker is online (0: off).
    #[arg(long, env = "CONTROLLER_RETRY_ELSEWHERE_SECS", default_value_t = 600)]
    pub retry_elsewhere_secs: u64,

    /// Times a build may be given back for its owner (`owner_reclaimed`) without spending an attempt;
    /// past it a release counts as an infrastructure failure.
    #[arg(long, env = "CONTROLLER_MAX_RELEASES", default_value_t = 5)]
    pub max_releases: i32,
}

impl QueueConfig {
    pub fn lease_timeout(&self) -> Duration {
        Duration::from_secs(self.lease_timeout_secs)
    }
    pub fn first_heartbeat_grace(&self) -> Duration {
        Duration::from_secs(self.first_heartbeat_grace_secs)
    }
    pub fn build_deadline(&self) -> Duration {
        Duration::from_secs(self.build_deadline_secs)
    }
    pub fn worker_token_ttl(&self) -> Duration {
        Duration::from_secs(self.worker_token_ttl_secs)
    }

    /// Checks the settings alone (the operator CLI's database mode uses them without a full `Config`).
    pub fn check(&self) -> Result<(), String> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(1..=10).contains(&self.max_attempts) {
            problems.push("CONTROLLER_MAX_ATTEMPTS must be between 1 and 10".to_string());
        }
        if self.lease_timeout_secs == 0 || self.first_heartbeat_grace_secs == 0 {
            problems.push(
                "CONTROLLER_LEASE_TIMEOUT_SECS and CONTROLLER_FIRST_HEARTBEAT_GRACE_SECS must be positive".to_string(),
            );
        }
        if self.build_deadline_secs == 0 {
            problems.push("CONTROLLER_BUILD_DEADLINE_SECS must be positive".to_string());
        }
        if self.max_samples_per_build < 2 {
            problems.push("CONTROLLER_MAX_SAMPLES_PER_BUILD must be at least 2".to_string());
        }
        if self.max_retries_per_build < 1 {
            problems.push("CONTROLLER_MAX_RETRIES_PER_BUILD must be positive".to_string());
        }
        if self.max_queued_builds < 1 {
            problems.push("CONTROLLER_MAX_QUEUED_BUILDS must be positive".to_string());
        }
        if self.quarantine_failures > 0 && !(self.quarantine_failures..=100).contains(&self.quarantine_window) {
            problems.push(
                "CONTROLLER_QUARANTINE_WINDOW must be at least CONTROLLER_QUARANTINE_FAILURES and at most 100"
                    .to_string(),
            );
        }
        if self.quarantine_secs == 0 || self.quarantine_secs > 86_400 {
            problems.push("CONTROLLER_QUARANTINE_SECS must be between 1 and 86400".to_string());
        }
        if self.max_releases < 0 {
            problems.push("CONTROLLER_MAX_RELEASES must not be negative".to_string());
        }
        if self.backoff_base_secs > self.backoff_cap_secs {
            problems.push("CONTROLLER_BACKOFF_BASE_SECS must not exceed CONTROLLER_BACKOFF_CAP_SECS".to_string());
        }
        problems
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            lease_timeout_secs: 300,
            first_heartbeat_grace_secs: 600,
            build_deadline_secs: 7200,
            max_attempts: 3,
            backoff_base_secs: 15,
            backoff_cap_secs: 600,
            retry_build_failures: false,
            accept_unmatched: false,
            worker_token_ttl_secs: 86_400,
            requeue_cooloff_secs: 600,
            max_queued_builds: 10_000,
            max_samples_per_build: 2_000,
            max_retries_per_build: 10,
            quarantine_failures: 3,
            quarantine_window: 5,
            quarantine_secs: 3600,
            retry_elsewhere_secs: 600,
            max_releases: 5,
        }
    }
}

/// Maintenance jobs: schedules and retention.
#[derive(Debug, Clone, Args)]
pub struct JobsConfig {
    /// Schedule overrides, `job=cron;job=cron` with 6-field cron expressions (seconds first), e.g.
    /// `prune=0 0 3 * * *`. Jobs: rescue_expired_leases, deadline_sweep, offline_workers,
    /// promote_scheduled, purge_certs, prune, sweep_staging, storage_deletions, sweep_unlinked, reconcile.
    #[arg(long, env = "CONTROLLER_JOB_SCHEDULES", default_value = "")]
    pub job_schedules: String,

    /// Workers unseen for this long are marked offline.
    #[arg(long, env = "CONTROLLER_OFFLINE_AFTER_SECS", default_value_t = 120)]
    pub offline_after_secs: u64,

    /// Finished builds, their logs and samples are deleted after this many days.
    #[arg(long, env = "CONTROLLER_RETENTION_DAYS", default_value_t = 30)]
    pub retention_days: u64,

    /// Sources and results of finished builds are deleted after this many days.
    #[arg(long, env = "CONTROLLER_ARTIFACT_RETENTION_DAYS", default_value_t = 7)]
    pub artifact_retention_days: u64,

    /// Staging uploads and partial files older than this are swept (every instance sweeps its own store).
    #[arg(long, env = "CONTROLLER_STAGING_MAX_AGE_SECS", default_value_t = 6 * 3600)]
    pub staging_max_age_secs: u64,
    /// Rows of the event outbox are deleted after this many hours (by the prune job).
    #[arg(long, env = "CONTROLLER_EVENT_RETENTION_HOURS", default_value_t = 24)]
    pub event_retention_hours: u64,

    /// Rows of the audit log are deleted after this many days (by the prune job; nothing else deletes them).
    #[arg(long, env = "CONTROLLER_AUDIT_RETENTION_DAYS", default_value_t = 365)]
    pub audit_retention_days: u64,

    /// Run the maintenance jobs in this instance (every instance may; each tick runs once overall).
    #[arg(long, env = "CONTROLLER_RUN_JOBS", default_value_t = true, action = clap::ArgAction::Set)]
    pub run_jobs: bool,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            job_schedules: String::new(),
            offline_after_secs: 120,
            retention_days: 30,
            artifact_retention_days: 7,
            staging_max_age_secs: 6 * 3600,
            event_retention_hours: 24,
            audit_retention_days: 365,
            run_jobs: true,
        }
    }
}

/// The web dashboard's sign-in.
#[derive(Debug, Clone, Args)]
pub struct DashboardConfig {
    /// Lifetime of a dashboard sign-in, in seconds (the session ends then, or at log-out).
    #[arg(long, env = "CONTROLLER_DASHBOARD_SESSION_TTL_SECS", default_value_t = 43_200)]
    pub dashboard_session_ttl_secs: u64,

    /// Dashboard sign-in attempts allowed per client IP per minute.
    #[arg(long, env = "CONTROLLER_DASHBOARD_SIGNINS_PER_MINUTE", default_value_t = 10)]
    pub dashboard_signins_per_minute: u32,

    /// Longest time the dashboard reuses what it read (and live sessions) for every open page, in
    /// milliseconds (a newer event ends it sooner); 0 reads afresh for every page.
    #[arg(long, env = "CONTROLLER_DASHBOARD_CACHE_MS", default_value_t = 1_000)]
    pub dashboard_cache_ms: u64,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        Self {
            dashboard_session_ttl_secs: 43_200,
            dashboard_signins_per_minute: 10,
            dashboard_cache_ms: 1_000,
        }
    }
}

/// The event stream's replay window (what a reconnecting client can still get).
#[derive(Debug, Clone, Args)]
pub struct EventsConfig {
    /// Most recent events kept in memory for `Last-Event-ID` resumes.
    #[arg(long, env = "CONTROLLER_EVENT_REPLAY_EVENTS", default_value_t = 10_000)]
    pub event_replay_events: usize,

    /// Events older than this many seconds are no longer replayed.
    #[arg(long, env = "CONTROLLER_EVENT_REPLAY_SECS", default_value_t = 3_600)]
    pub event_replay_secs: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            event_replay_events: 10_000,
            event_replay_secs: 3_600,
        }
    }
}

/// Webhook deliveries (webhooks.md).
#[derive(Debug, Clone, Args)]
pub struct WebhookConfig {
    /// Deliver to loopback, private, link-local and unique-local addresses too (checked after DNS
    /// resolution, at connect time). Off by default: a subscriber could otherwise reach the internal network.
    #[arg(long, env = "CONTROLLER_WEBHOOK_ALLOW_PRIVATE", default_value_t = false, action = clap::ArgAction::Set)]
    pub webhook_allow_private: bool,

    /// A delivery that keeps failing is retried (exponential backoff with jitter) for this many hours,
    /// then marked `failed` (still redeliverable).
    #[arg(long, env = "CONTROLLER_WEBHOOK_RETRY_HOURS", default_value_t = 24)]
    pub webhook_retry_hours: u64,

    /// Deliveries in flight at once on this instance.
    #[arg(long, env = "CONTROLLER_WEBHOOK_CONCURRENCY", default_value_t = 64)]
    pub webhook_concurrency: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            webhook_allow_private: false,
            webhook_retry_hours: 24,
            webhook_concurrency: 64,
        }
    }
}

/// Shortest admin key accepted.
pub const MIN_API_KEY_LEN: usize = 32;

/// The validated secrets a server needs; produced by [`Config::validate`].
#[derive(Clone)]
pub struct Secrets {
    pub api_key: String,
    /// SHA-256 of `api_key`, computed once: a presented key is compared with it by its own digest
    /// (`ids::secret_digest`), which also finds a stored key.
    pub api_key_digest: [u8; 32],
    pub certs_key: [u8; 32],
}

impl Config {
    /// Checks every setting and reports all problems together, naming the variables.
    pub fn validate(&self) -> Result<Secrets, String> {
        let mut problems = self.queue.problems();
        problems.extend(self.http.problems());
        let api_key = match self.api_key.as_deref() {
            None | Some("") => {
                problems.push("CONTROLLER_API_KEY is not set: refusing to start without an admin API key (make run generates a development key; production needs its own, e.g. from `expo-controller gen-key`)".to_string());
                String::new()
            }
            Some(key) if key.chars().count() < MIN_API_KEY_LEN => {
                problems.push(format!(
                    "CONTROLLER_API_KEY is too short: at least {MIN_API_KEY_LEN} characters are required"
                ));
                String::new()
            }
            Some(key) => key.to_string(),
        };
        let certs_key = match self.certs_key.as_deref() {
            None | Some("") => {
                problems.push("CONTROLLER_CERTS_KEY is not set: certificates must be encrypted at rest (base64 of 32 bytes, e.g. from `expo-controller gen-key`)".to_string());
                [0u8; 32]
            }
            Some(encoded) => match crate::ids::decode_key32(encoded) {
                Some(key) => key,
                None => {
                    problems.push("CONTROLLER_CERTS_KEY must be base64 of exactly 32 bytes".to_string());
                    [0u8; 32]
                }
            },
        };
        for (name, value) in [
            ("CONTROLLER_MAX_SOURCE_BYTES", self.max_source_bytes),
            ("CONTROLLER_MAX_CERTS_BYTES", self.max_certs_bytes),
            ("CONTROLLER_MAX_RESULT_BYTES", self.max_result_bytes),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be positive"));
            }
        }
        if let Err(problem) = crate::jobs::schedules(&self.jobs.job_schedules) {
            problems.push(problem);
        }
        if self.jobs.artifact_retention_days > self.jobs.retention_days {
            problems.push("CONTROLLER_ARTIFACT_RETENTION_DAYS must not exceed CONTROLLER_RETENTION_DAYS".to_string());
        }
        if let Err(problem) = self.storage_target() {
            problems.push(problem);
        }
        // Above MAX_PRESIGN_TTL_SECS is clamped (with a warning at start), not refused: a deployment that
        // set a longer lifetime before the bound existed must still start after the upgrade.
        if self.storage.presign_downloads && self.storage.presign_ttl_secs == 0 {
            problems.push("CONTROLLER_PRESIGN_TTL_SECS must be positive".to_string());
        }
        if self.jobs.staging_max_age_secs < 60 {
            problems.push("CONTROLLER_STAGING_MAX_AGE_SECS must be at least 60".to_string());
        }
        if self.dashboard.dashboard_session_ttl_secs == 0 || self.dashboard.dashboard_signins_per_minute == 0 {
            problems.push(
                "CONTROLLER_DASHBOARD_SESSION_TTL_SECS and CONTROLLER_DASHBOARD_SIGNINS_PER_MINUTE must be positive"
                    .to_string(),
            );
        }
        if !(1..=1_000_000).contains(&self.events.event_replay_events) {
            problems.push("CONTROLLER_EVENT_REPLAY_EVENTS must be between 1 and 1000000".to_string());
        }
        if !(1..=720).contains(&self.webhooks.webhook_retry_hours) {
            problems.push("CONTROLLER_WEBHOOK_RETRY_HOURS must be between 1 and 720".to_string());
        }
        if !(1..=1024).contains(&self.webhooks.webhook_concurrency) {
            problems.push("CONTROLLER_WEBHOOK_CONCURRENCY must be between 1 and 1024".to_string());
        }
        if self.jobs.event_retention_hours == 0 {
            problems.push("CONTROLLER_EVENT_RETENTION_HOURS must be positive".to_string());
        }
        if self.max_log_lines < 1 {
            problems.push("CONTROLLER_MAX_LOG_LINES must be positive".to_string());
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            problems.push("CONTROLLER_LOG_FORMAT must be `text` or `json`".to_string());
        }
        if problems.is_empty() {
            let api_key_digest = crate::ids::secret_digest(&api_key);
            Ok(Secrets {
                api_key,
                api_key_digest,
                certs_key,
            })
        } else {
            Err(problems.join("\n  - "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db.example:5432/expo?sslmode=require"),
            "postgres://app:***@db.example:5432/expo?sslmode=require"
        );
        assert_eq!(redact_url("postgres://app:p@ss@db/expo"), "postgres://app:***@db/expo");
        assert_eq!(redact_url("postgres://app@db/expo"), "postgres://app@db/expo");
        assert_eq!(redact_url("postgres://db/expo"), "postgres://db/expo");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
