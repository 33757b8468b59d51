//! The mapping rules of import.md, as pure functions from old rows to new rows (or a reason to skip).
//!
//! * ids are kept (they must pass [`crate::ids::valid_id`], the only shape that may reach a path or key);
//! * times are epoch milliseconds;
//! * `pending` stays queued (`run_at` = submission, so workers get them oldest first); `assigned` and
//!   `building` are queued again as an interrupted first attempt; `completed` and `failed` keep their
//!   final state, `failed` + `Build cancelled by user` becomes `cancelled`;
//! * build tokens are stored only as their hash, exactly as new tokens are;
//! * worker capabilities give the platforms (unknown or broken JSON: both).

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::reader::{Cell, Row};
use crate::ids;
use crate::queue::{BuildState, MAX_CAPABILITIES_BYTES, MAX_NAME_BYTES, Platform, platforms_of, truncate_message};

/// The error text of a build the old controller cancelled.
pub const CANCELLED_MESSAGE: &str = "Build cancelled by user";

/// Why a row was skipped: a short reason (summed in the summary) and the row it was.
#[derive(Debug, Clone, PartialEq)]
pub struct Skip {
    pub reason: &'static str,
    pub detail: String,
}

pub(super) fn skip(reason: &'static str, detail: impl Into<String>) -> Skip {
    Skip {
        reason,
        detail: detail.into(),
    }
}

/// PostgreSQL text cannot hold NUL (the text rule every input door applies).
fn clean(text: &str) -> String {
    crate::text::scrub(text).into_owned()
}

/// The most of an imported build's error message that is kept: the API's bound on a text field (64 KiB,
/// `MAX_TEXT_BYTES`), so an old row cannot put more on a page than a worker could report (T10).
pub const MAX_ERROR_MESSAGE_BYTES: usize = 64 * 1024;

/// `text` cut to at most `max` bytes at a character boundary (the API's bounds apply to imported text).
fn bounded(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn id_of(cell: &Cell, what: &str) -> Result<String, Skip> {
    match cell.text() {
        Some(id) if ids::valid_id(id) => Ok(id.to_string()),
        Some(id) => Err(skip("bad id", format!("{what} {id:?}"))),
        None => Err(skip("bad id", format!("{what} {cell:?}"))),
    }
}

/// An epoch-milliseconds time.
pub fn millis(cell: &Cell, column: &str) -> Result<DateTime<Utc>, Skip> {
    cell.int()
        .and_then(DateTime::from_timestamp_millis)
        .ok_or_else(|| skip("bad time", format!("{column} = {cell:?}")))
}

fn optional_millis(cell: &Cell, column: &str) -> Result<Option<DateTime<Utc>>, Skip> {
    if cell.is_null() {
        Ok(None)
    } else {
        millis(cell, column).map(Some)
    }
}

fn optional_text(cell: &Cell) -> Option<String> {
    cell.text().filter(|s| !s.is_empty()).map(clean)
}

/// A worker row of the new schema.
#[derive(Debug, Clone, PartialEq)]
pub struct NewWorker {
    pub id: String,
    pub name: String,
    pub status: &'static str,
    pub capabilities: Value,
    pub platforms: Vec<Platform>,
    /// The capabilities were not a JSON object (both platforms assumed).
    pub broken_capabilities: bool,
    pub registered_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub builds_completed: i64,
    pub builds_failed: i64,
}

pub fn worker(row: &Row) -> Result<NewWorker, Skip> {
    let id = id_of(row.cell(0), "worker id")?;
    let status = match row.cell(2).text() {
        Some("idle") => "idle",
        // The interrupted attempt is queued again, so the worker holds nothing here.
        Some("building") => "idle",
        Some("offline") => "offline",
        _ => return Err(skip("unknown status", format!("worker {id}: status {:?}", row.cell(2)))),
    };
    let parsed = row
        .cell(3)
        .text()
        .filter(|text| text.len() <= MAX_CAPABILITIES_BYTES)
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .filter(Value::is_object);
    let broken_capabilities = parsed.is_none();
    let capabilities = parsed.unwrap_or_else(|| Value::Object(Default::default()));
    let name = optional_text(row.cell(1)).map_or_else(|| id.clone(), |name| bounded(name, MAX_NAME_BYTES));
    let with_id = |e: Skip| skip(e.reason, format!("worker {id}: {}", e.detail));
    Ok(NewWorker {
        platforms: platforms_of(&capabilities),
        registered_at: millis(row.cell(4), "registered_at").map_err(with_id)?,
        last_seen_at: millis(row.cell(5), "last_seen_at").map_err(with_id)?,
        builds_completed: row.cell(6).int().unwrap_or(0).max(0),
        builds_failed: row.cell(7).int().unwrap_or(0).max(0),
        id,
        name,
        status,
        capabilities,
        broken_capabilities,
    })
}

/// Which old file a build row points at, by the last two components of the stored absolute path.
#[derive(Debug, Clone, PartialEq)]
pub enum FileRef {
    /// The column is NULL.
    None,
    /// `<folder>/<file name>` under the storage folder the operator names.
    At(String),
    /// The stored path cannot be resolved safely.
    Unusable(String),
}

/// Resolves an absolute path the old server wrote by its last two components, which must be the
/// expected folder and a plain file name (nothing else can reach the filesystem).
pub fn file_ref(cell: &Cell, folder: &str) -> FileRef {
    let Some(path) = cell.text().filter(|p| !p.is_empty()) else {
        return FileRef::None;
    };
    let mut parts = path.rsplit(['/', '\\']);
    let (Some(name), Some(parent)) = (parts.next(), parts.next()) else {
        return FileRef::Unusable(path.to_string());
    };
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if parent == folder && plain {
        FileRef::At(format!("{folder}/{name}"))
    } else {
        FileRef::Unusable(path.to_string())
    }
}

/// A build as read and judged, before its files are copied.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedBuild {
    pub id: String,
    pub platform: Platform,
    /// The state it gets when its files are there (`Pending`, `Completed`, `Failed`, `Cancelled`).
    pub state: BuildState,
    /// It was `assigned`/`building`: the old attempt is gone, it is queued again.
    pub interrupted: bool,
    pub worker_id: Option<String>,
    pub submitted_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub error_message: Option<String>,
    pub access_token_hash: Vec<u8>,
    pub original_build_id: Option<String>,
    /// Digest of the old row and its children's row ids (set by the importer), to notice later changes.
    pub fingerprint: Vec<u8>,
    pub source: FileRef,
    pub certs: FileRef,
    pub result: FileRef,
}

pub fn build(row: &Row) -> Result<PlannedBuild, Skip> {
    let id = id_of(row.cell(0), "build id")?;
    let with_id = |e: Skip| skip(e.reason, format!("build {id}: {}", e.detail));
    let error_message = optional_text(row.cell(10)).map(|message| bounded(message, MAX_ERROR_MESSAGE_BYTES));
    let (state, interrupted) = match row.cell(1).text() {
        Some("pending") => (BuildState::Pending, false),
        Some("assigned" | "building") => (BuildState::Pending, true),
        Some("completed") => (BuildState::Completed, false),
        Some("failed") if error_message.as_deref() == Some(CANCELLED_MESSAGE) => (BuildState::Cancelled, false),
        Some("failed") => (BuildState::Failed, false),
        _ => return Err(skip("unknown status", format!("build {id}: status {:?}", row.cell(1)))),
    };
    let platform = row
        .cell(2)
        .text()
        .and_then(Platform::parse)
        .ok_or_else(|| skip("unknown platform", format!("build {id}: platform {:?}", row.cell(2))))?;
    let token = row
        .cell(11)
        .text()
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| skip("no access token", format!("build {id}")))?;
    let worker_id = match row.cell(6) {
        Cell::Null => None,
        cell => Some(id_of(cell, "worker id").map_err(with_id)?),
    };
    let submitted_at = millis(row.cell(7), "submitted_at").map_err(with_id)?;
    let started_at = optional_millis(row.cell(8), "started_at").map_err(with_id)?;
    let completed_at = optional_millis(row.cell(9), "completed_at").map_err(with_id)?;
    Ok(PlannedBuild {
        platform,
        state,
        interrupted,
        worker_id,
        submitted_at,
        started_at,
        completed_at,
        error_message,
        access_token_hash: ids::hash_secret(token),
        original_build_id: None,
        fingerprint: Vec::new(),
        source: file_ref(row.cell(3), "builds"),
        certs: file_ref(row.cell(4), "certs"),
        result: file_ref(row.cell(5), "results"),
        id,
    })
}

/// What a build looked like in the old database: its cells and the row ids of its log lines and samples
/// (the old controller only ever appended those).
pub fn fingerprint(row: &Row, lines: &[i64], samples: &[i64]) -> Vec<u8> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(format!("{:?}|{lines:?}|{samples:?}", row.cells).as_bytes());
    hasher.finalize().to_vec()
}

/// A log line of the new schema (its sequence number is its position among the build's lines).
#[derive(Debug, Clone, PartialEq)]
pub struct NewLogLine {
    pub ts: DateTime<Utc>,
    pub level: String,
    pub message: String,
}

pub fn log_line(row: &Row) -> Result<NewLogLine, Skip> {
    let detail = |what: String| format!("log line {}: {what}", row.rowid);
    let level = match row.cell(3).text() {
        Some(level @ ("info" | "warn" | "error" | "debug")) => level.to_string(),
        _ => return Err(skip("unknown level", detail(format!("level {:?}", row.cell(3))))),
    };
    let message = row
        .cell(4)
        .text()
        .map(|message| truncate_message(&clean(message)).to_string())
        .ok_or_else(|| skip("bad message", detail(format!("message {:?}", row.cell(4)))))?;
    let ts = millis(row.cell(2), "timestamp").map_err(|e| skip(e.reason, detail(e.detail)))?;
    Ok(NewLogLine { ts, level, message })
}

/// A CPU sample of the new schema.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSample {
    pub ts: DateTime<Utc>,
    pub cpu_percent: f64,
    pub memory_mb: f64,
}

pub fn sample(row: &Row) -> Result<NewSample, Skip> {
    let detail = |what: String| format!("cpu sample {}: {what}", row.rowid);
    let ts = millis(row.cell(2), "timestamp").map_err(|e| skip(e.reason, detail(e.detail)))?;
    let (Some(cpu_percent), Some(memory_mb)) = (row.cell(3).real(), row.cell(4).real()) else {
        return Err(skip(
            "bad number",
            detail(format!("{:?} / {:?}", row.cell(3), row.cell(4))),
        ));
    };
    Ok(NewSample {
        ts,
        cpu_percent,
        memory_mb,
    })
}

/// A build's samples, at most `max` of them (T3, as live samples are bounded by
/// `CONTROLLER_MAX_SAMPLES_PER_BUILD`): when there are more, evenly spaced ones are kept in time order,
/// the first and the last among them, so the whole curve stays at a coarser step. Returns how many went.
pub fn thin_samples(samples: &mut Vec<NewSample>, max: usize) -> usize {
    let total = samples.len();
    if total <= max {
        return 0;
    }
    samples.sort_by_key(|s| s.ts);
    let max = max.max(2);
    let kept: Vec<NewSample> = (0..max).map(|i| samples[i * (total - 1) / (max - 1)].clone()).collect();
    *samples = kept;
    total - samples.len()
}

/// A diagnostics report of the new schema. Its id is a UUID there: an old id that is one is kept,
/// any other is turned into a UUID derived from it (so a second run finds it again).
#[derive(Debug, Clone, PartialEq)]
pub struct NewReport {
    pub id: String,
    /// The id in the old database (for reports).
    pub old_id: String,
    pub worker_id: String,
    pub status: String,
    pub run_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub auto_fixed: bool,
    pub checks: Value,
}

pub fn report(row: &Row) -> Result<NewReport, Skip> {
    let old_id = match row.cell(0).text() {
        Some(id) if !id.is_empty() && id.len() <= 128 => id.to_string(),
        _ => return Err(skip("bad id", format!("diagnostics row {}", row.rowid))),
    };
    let with_id = |e: Skip| skip(e.reason, format!("diagnostics {old_id}: {}", e.detail));
    let worker_id = id_of(row.cell(1), "worker id").map_err(with_id)?;
    let status = match row.cell(2).text() {
        Some(s @ ("healthy" | "warning" | "critical")) => s.to_string(),
        _ => return Err(with_id(skip("unknown status", format!("status {:?}", row.cell(2))))),
    };
    let checks = row
        .cell(6)
        .text()
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .ok_or_else(|| with_id(skip("bad checks", "checks is not JSON")))?;
    Ok(NewReport {
        id: uuid_for(&old_id),
        old_id: old_id.clone(),
        worker_id,
        status,
        run_at: millis(row.cell(3), "run_at").map_err(with_id)?,
        duration_ms: row.cell(4).int().unwrap_or(0).max(0),
        auto_fixed: row.cell(5).int().unwrap_or(0) != 0,
        checks,
    })
}

/// `id` if it is a UUID, else a name-based UUID (SHA-256, version 8) of it.
pub fn uuid_for(id: &str) -> String {
    let is_uuid = id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if is_uuid {
        return id.to_ascii_lowercase();
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("expo-controller/import-ts/diagnostics/{id}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = ids::hex(&bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cells: Vec<Cell>) -> Row {
        Row { rowid: 1, cells }
    }

    fn t(s: &str) -> Cell {
        Cell::Text(s.to_string())
    }

    fn old_build(status: &str, error: Cell) -> Row {
        row(vec![
            t("b1"),
            t(status),
            t("ios"),
            t("/srv/old/storage/builds/b1.zip"),
            Cell::Null,
            Cell::Null,
            t("w1"),
            Cell::Int(1_700_000_000_000),
            Cell::Int(1_700_000_001_000),
            Cell::Null,
            error,
            t("token"),
        ])
    }

    #[test]
    fn states_map_as_import_md_says() {
        let cases = [
            ("pending", Cell::Null, BuildState::Pending, false),
            ("assigned", Cell::Null, BuildState::Pending, true),
            ("building", Cell::Null, BuildState::Pending, true),
            ("completed", Cell::Null, BuildState::Completed, false),
            ("failed", t("boom"), BuildState::Failed, false),
            ("failed", t(CANCELLED_MESSAGE), BuildState::Cancelled, false),
        ];
        for (status, error, state, interrupted) in cases {
            let planned = build(&old_build(status, error)).unwrap();
            assert_eq!((planned.state, planned.interrupted), (state, interrupted), "{status}");
            assert_eq!(planned.access_token_hash, ids::hash_secret("token"));
            assert_eq!(planned.submitted_at.timestamp_millis(), 1_700_000_000_000);
        }
        assert_eq!(
            build(&old_build("running", Cell::Null)).unwrap_err().reason,
            "unknown status"
        );
    }

    #[test]
    fn bad_ids_and_times_are_skipped() {
        let mut bad = old_build("pending", Cell::Null);
        bad.cells[0] = t("../etc");
        assert_eq!(build(&bad).unwrap_err().reason, "bad id");
        let mut bad = old_build("pending", Cell::Null);
        bad.cells[7] = t("yesterday");
        assert_eq!(build(&bad).unwrap_err().reason, "bad time");
    }

    #[test]
    fn files_resolve_by_their_last_two_components_only() {
        assert_eq!(
            file_ref(&t("/old/place/storage/builds/b1.zip"), "builds"),
            FileRef::At("builds/b1.zip".into())
        );
        assert_eq!(file_ref(&Cell::Null, "certs"), FileRef::None);
        for bad in ["/x/certs/b1.zip", "/x/builds/..", "b1.zip", "/x/builds/a b.zip"] {
            assert!(matches!(file_ref(&t(bad), "builds"), FileRef::Unusable(_)), "{bad}");
        }
    }

    #[test]
    fn capabilities_give_platforms_and_broken_json_gives_both() {
        let worker_row = |caps: &str| {
            row(vec![
                t("w1"),
                t("mac"),
                t("building"),
                t(caps),
                Cell::Int(1),
                Cell::Int(2),
                Cell::Int(5),
                Cell::Null,
            ])
        };
        let ios = worker(&worker_row(r#"{"platforms":["ios"],"xcode_version":"16.0"}"#)).unwrap();
        assert_eq!(
            (ios.platforms.clone(), ios.status, ios.builds_completed),
            (vec![Platform::Ios], "idle", 5)
        );
        let broken = worker(&worker_row("{not json")).unwrap();
        assert!(broken.broken_capabilities);
        assert_eq!(broken.platforms, Platform::ALL.to_vec());
        assert_eq!(worker(&worker_row("{}")).unwrap().platforms, Platform::ALL.to_vec());
    }

    #[test]
    fn diagnostics_ids_become_stable_uuids() {
        let a = uuid_for("V1StGXR8_Z5jdHi6B-myT");
        assert_eq!(a, uuid_for("V1StGXR8_Z5jdHi6B-myT"));
        assert_eq!(a.len(), 36);
        assert_ne!(a, uuid_for("other"));
        let kept = "0f8fad5b-d9cb-469f-a165-70867728950e";
        assert_eq!(uuid_for(kept), kept);
    }
}
