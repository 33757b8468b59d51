//! Row types and the vocabularies of the queue.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// A platform, which is also the name of its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Ios,
    Android,
}

impl Platform {
    pub const ALL: [Platform; 2] = [Platform::Ios, Platform::Android];

    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Ios => "ios",
            Platform::Android => "android",
        }
    }

    pub fn parse(value: &str) -> Option<Platform> {
        match value {
            "ios" => Some(Platform::Ios),
            "android" => Some(Platform::Android),
            _ => None,
        }
    }

    /// File extension of a build result on this platform.
    pub fn result_extension(self) -> &'static str {
        match self {
            Platform::Ios => "ipa",
            Platform::Android => "apk",
        }
    }
}

/// Native build states (the database vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildState {
    Scheduled,
    Pending,
    Assigned,
    Building,
    Retryable,
    Completed,
    Failed,
    Cancelled,
}

impl BuildState {
    pub fn parse(value: &str) -> Option<BuildState> {
        Some(match value {
            "scheduled" => BuildState::Scheduled,
            "pending" => BuildState::Pending,
            "assigned" => BuildState::Assigned,
            "building" => BuildState::Building,
            "retryable" => BuildState::Retryable,
            "completed" => BuildState::Completed,
            "failed" => BuildState::Failed,
            "cancelled" => BuildState::Cancelled,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Scheduled => "scheduled",
            BuildState::Pending => "pending",
            BuildState::Assigned => "assigned",
            BuildState::Building => "building",
            BuildState::Retryable => "retryable",
            BuildState::Completed => "completed",
            BuildState::Failed => "failed",
            BuildState::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, BuildState::Completed | BuildState::Failed | BuildState::Cancelled)
    }

    pub fn is_held(self) -> bool {
        matches!(self, BuildState::Assigned | BuildState::Building)
    }

    /// Waiting to be claimed: pending, scheduled or retryable.
    pub fn is_queued(self) -> bool {
        matches!(
            self,
            BuildState::Pending | BuildState::Scheduled | BuildState::Retryable
        )
    }

    /// The first-generation vocabulary (`pending|assigned|building|completed|failed`).
    pub fn g0(self) -> &'static str {
        match self {
            BuildState::Scheduled | BuildState::Pending | BuildState::Retryable => "pending",
            BuildState::Assigned => "assigned",
            BuildState::Building => "building",
            BuildState::Completed => "completed",
            BuildState::Failed | BuildState::Cancelled => "failed",
        }
    }
}

/// A build row: the job and everything the API reads about it.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct Build {
    pub id: String,
    pub state: String,
    pub queue: String,
    pub priority: i32,
    pub run_at: DateTime<Utc>,
    pub attempt: i32,
    pub max_attempts: i32,
    pub retry_build_failures: bool,
    pub worker_id: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_token: Option<i64>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub assigned_at: Option<DateTime<Utc>>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub progress: Option<i16>,
    pub stage: Option<String>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub errors: sqlx::types::Json<serde_json::Value>,
    pub submitted_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub finished_reason: Option<String>,
    pub error_message: Option<String>,
    pub access_token_hash: Option<Vec<u8>>,
    pub otp_hash: Option<Vec<u8>>,
    pub otp_expires_at: Option<DateTime<Utc>>,
    pub vm_token_hash: Option<Vec<u8>>,
    pub vm_token_sealed: Option<Vec<u8>>,
    pub vm_token_expires_at: Option<DateTime<Utc>>,
    pub vm_ready_at: Option<DateTime<Utc>>,
    pub source_key: Option<String>,
    pub source_size: Option<i64>,
    pub certs_key: Option<String>,
    pub result_key: Option<String>,
    pub result_size: Option<i64>,
    pub result_sha256: Option<String>,
    pub result_attempt: Option<i32>,
    pub original_build_id: Option<String>,
    pub log_seq: i64,
    pub log_dropped: i64,
    pub log_marker_seq: Option<i64>,
    /// The key that submitted the build (`None`: the built-in admin key, imported builds).
    #[sqlx(default)]
    pub submitted_by: Option<String>,
    /// That key's name when it submitted.
    #[sqlx(default)]
    pub submitted_by_name: Option<String>,
    /// What it needs of its worker, as shown (`{"xcode": ">=16.2", …}`; scheduling.md).
    #[sqlx(default)]
    pub requirements: Option<sqlx::types::Json<serde_json::Value>>,
}

impl Build {
    /// The state; rows are constrained by a CHECK, so an unknown value means a newer schema.
    pub fn state(&self) -> BuildState {
        BuildState::parse(&self.state).unwrap_or(BuildState::Pending)
    }

    pub fn platform(&self) -> Platform {
        Platform::parse(&self.queue).unwrap_or(Platform::Ios)
    }

    /// The error message G0 clients see; a cancelled build reads as failed with a fixed message.
    pub fn g0_error_message(&self) -> Option<String> {
        match (self.state(), &self.error_message) {
            (_, Some(message)) => Some(message.clone()),
            (BuildState::Cancelled, None) => Some("Build cancelled by user".to_string()),
            _ => None,
        }
    }
}

/// A worker row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Worker {
    pub id: String,
    pub name: String,
    pub capabilities: sqlx::types::Json<serde_json::Value>,
    pub platforms: Vec<String>,
    pub status: String,
    pub admin_state: String,
    pub token_hash: Option<Vec<u8>>,
    pub token_expires_at: Option<DateTime<Utc>>,
    pub registered_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub builds_completed: i64,
    pub builds_failed: i64,
    /// Set by unregister, cleared by the next registration: until then the worker stays offline.
    pub unregistered_at: Option<DateTime<Utc>>,
    /// The worker key it was registered with: G0 calls with that key act only for its workers.
    #[sqlx(default)]
    pub registered_by: Option<String>,
    /// `ok` or `quarantined` as stored; see [`Worker::health`] for what it means now.
    pub health: String,
    /// End of the quarantine (then probation); `None` while quarantined: until a healthy report or release.
    pub quarantined_until: Option<DateTime<Utc>>,
    pub quarantine_reason: Option<String>,
    /// Since when a `critical` diagnostics report quarantines it (until a `healthy`/`warning` report or
    /// a release), apart from a quarantine for infrastructure failures.
    pub diag_critical_at: Option<DateTime<Utc>>,
    pub diag_reason: Option<String>,
}

impl Worker {
    pub fn platforms(&self) -> Vec<Platform> {
        self.platforms.iter().filter_map(|p| Platform::parse(p)).collect()
    }

    /// Whether the worker may be handed new builds: active, not unregistered (R50), not quarantined.
    pub fn accepts_work(&self) -> bool {
        self.admin_state == "active" && self.unregistered_at.is_none() && self.health(Utc::now()) != "quarantined"
    }

    /// `ok`, `quarantined`, or `probation` (the quarantine ended; a completed build clears it, another
    /// infrastructure failure quarantines it again for twice as long). A critical diagnostics report
    /// quarantines it whatever its record says.
    pub fn health(&self, now: DateTime<Utc>) -> &'static str {
        if self.diag_critical_at.is_some() {
            return "quarantined";
        }
        match (self.health.as_str(), self.quarantined_until) {
            ("quarantined", Some(until)) if until <= now => "probation",
            ("quarantined", _) => "quarantined",
            _ => "ok",
        }
    }

    /// When the quarantine ends (then probation): `None` when not quarantined for infrastructure
    /// failures, or while a critical diagnostics report holds it (until a healthy report or a release).
    pub fn quarantine_ends(&self) -> Option<DateTime<Utc>> {
        self.quarantined_until.filter(|_| self.diag_critical_at.is_none())
    }

    /// Why it is (or, on probation, was) quarantined: the failures, the critical report, or both.
    pub fn quarantine_reason(&self) -> Option<String> {
        match (&self.quarantine_reason, &self.diag_reason) {
            (Some(failures), Some(diag)) => Some(format!("{failures}; {diag}")),
            (failures, diag) => failures.clone().or_else(|| diag.clone()),
        }
    }

    /// Revoked (final) or unregistered: a poll does not bring it back online (R50).
    pub fn is_out(&self) -> bool {
        self.admin_state == "revoked" || self.unregistered_at.is_some()
    }
}

/// A stored build result, recorded on completion.
#[derive(Debug, Clone)]
pub struct ResultFile {
    pub key: String,
    pub size: i64,
    pub sha256: String,
}

/// Queue depth for health and stats.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueueCounts {
    pub pending: i64,
    pub active: i64,
}
