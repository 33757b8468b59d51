//! Request and answer types of the worker routes (api.md §3 B6–B17, §4), field for field as the
//! deployed workers, VMs and monitors send and parse them.

#![allow(dead_code)]

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::api::views::Job;

/// `POST /api/workers/register` (B15).
#[derive(Debug, Deserialize, ToSchema)]
pub struct RegisterRequest {
    /// Re-register this worker (admin key or its own token), or a client-chosen id.
    pub id: Option<String>,
    pub name: String,
    /// `platforms` (`ios`/`android`) is used for matching; the rest is stored as sent.
    #[schema(value_type = Object)]
    pub capabilities: Value,
}

/// A worker registered (B15).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Registered {
    pub id: String,
    /// `registered` or `re-registered`.
    pub status: String,
    /// The worker token (`X-Worker-Token`).
    pub access_token: String,
    #[serde(rename = "baseImageId")]
    pub base_image_id: String,
}

/// `GET /api/workers/poll` parameters (B16).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PollQuery {
    /// G0 mode (with the admin key): the polling worker.
    pub worker_id: Option<String>,
    /// Long poll: hold the request up to this many seconds (0..60, default 0).
    pub wait: Option<String>,
}

/// A poll answer (B16): the held or newly claimed job, or `null`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PollAnswer {
    pub job: Option<Job>,
    /// Token mode only: the worker token (unchanged; it slides).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
}

/// The multipart form of a result report (B17).
#[derive(Debug, Deserialize, ToSchema)]
pub struct UploadForm {
    pub build_id: String,
    /// Required with the admin key; tokens name the worker themselves.
    pub worker_id: Option<String>,
    /// `"true"` for success, anything else is a build failure.
    pub success: Option<String>,
    pub error_message: Option<String>,
    /// The built `.ipa`/`.apk`.
    #[schema(value_type = Option<String>, format = Binary)]
    pub result: Option<Vec<u8>>,
}

/// A failure report as JSON (`/api/workers/fail`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct FailureReport {
    pub build_id: String,
    pub worker_id: Option<String>,
    pub error_message: Option<String>,
}

/// The outcome of a report (B17).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReportStatus {
    /// `success` or `failed`.
    pub status: String,
}

/// `POST /api/workers/abandon` (§4).
#[derive(Debug, Deserialize, ToSchema)]
pub struct AbandonRequest {
    pub build_id: String,
    /// Free text; `owner_reclaimed` (the Mac's owner took it back) releases the build without spending
    /// an attempt.
    pub reason: Option<String>,
}

/// An attempt given back (§4).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Abandoned {
    /// Always `true`.
    pub success: bool,
    /// The build's G0 status afterwards.
    pub status: String,
}

/// One log line posted (B6).
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewLog {
    /// `info`, `warn`, `error` or `debug`.
    pub level: String,
    /// Truncated at 8 KiB.
    pub message: String,
}

/// A batch of log lines (B6); invalid entries are skipped.
#[derive(Debug, Deserialize, ToSchema)]
pub struct LogBatch {
    pub logs: Vec<NewLog>,
}

/// `POST /api/builds/:id/logs` (B6): one line or a batch.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum LogPost {
    One(NewLog),
    Batch(LogBatch),
}

/// Log lines accepted (B6). A batch also says what became of it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LogsPosted {
    /// Always `true`.
    pub success: bool,
    /// Batch only: entries received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    /// Batch only: lines stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored: Option<usize>,
    /// Batch only: invalid entries and lines past the build's cap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<usize>,
}

/// `POST /api/builds/:id/heartbeat` body (B11), optional.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct HeartbeatRequest {
    /// 0..100.
    pub progress: Option<f64>,
    pub stage: Option<String>,
}

/// A heartbeat answer (B11).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatAnswer {
    /// Always `ok`.
    pub status: String,
    /// Epoch milliseconds.
    pub timestamp: i64,
    /// Present (`true`) when the build was cancelled: stop (also header `X-Build-Cancelled: true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_requested: Option<bool>,
}

/// `POST /api/builds/:id/telemetry` body (B12).
#[derive(Debug, Deserialize, ToSchema)]
pub struct Telemetry {
    /// `cpu_snapshot`, `heartbeat`, `monitor_started`, …
    #[serde(rename = "type")]
    pub kind: String,
    pub timestamp: Option<Value>,
    /// `cpu_snapshot`: `cpu_percent`, `memory_mb`; `heartbeat`: `stage`, `metrics`, `heartbeat_count`.
    #[schema(value_type = Object)]
    pub data: Value,
}

/// `{"status": "ok"}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatusOk {
    /// Always `ok`.
    pub status: String,
}

/// `GET /api/builds/:id/certs-secure` (B10).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SecureCerts {
    /// Base64 of the PKCS#12 file.
    pub p12: String,
    /// `""` when the bundle has none.
    #[serde(rename = "p12Password")]
    pub p12_password: String,
    /// A fresh random password for the build's keychain.
    #[serde(rename = "keychainPassword")]
    pub keychain_password: String,
    /// Base64 of each `.mobileprovision`.
    #[serde(rename = "provisioningProfiles")]
    pub provisioning_profiles: Vec<String>,
}

/// `POST /api/builds/:id/authenticate` (§4).
#[derive(Debug, Deserialize, ToSchema)]
pub struct AuthenticateRequest {
    /// The attempt's one-time password, from the poll answer.
    pub otp: String,
}

/// A VM token (§4).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VmToken {
    /// `X-VM-Token` for this build attempt.
    pub vm_token: String,
    /// Epoch milliseconds.
    pub expires_at: i64,
}

/// `POST /api/builds/:id/vm-ready` (§4).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VmReady {
    /// Always `true`.
    pub success: bool,
    /// Epoch milliseconds.
    pub vm_ready_at: i64,
}

/// `GET /api/builds/:id/vm-status` (§4): `{"vm_ready": false}`, or ready with the VM token.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VmStatus {
    pub vm_ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_token: Option<String>,
    /// Epoch milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_ready_at: Option<i64>,
}

/// The artifact upload of a VM (§4).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ArtifactForm {
    /// The built `.ipa`/`.apk`.
    #[schema(value_type = String, format = Binary)]
    pub artifact: Vec<u8>,
}

/// `{"success": true}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Success {
    /// Always `true`.
    pub success: bool,
}
