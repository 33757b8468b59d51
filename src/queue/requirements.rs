//! Requirements (scheduling.md): what a build needs of the Mac that runs it — `xcode`, `macos` (version
//! ranges), `arch`, `min_memory_gb`, `labels` — parsed and checked here, stored on the build, and matched
//! against what workers declare by the SQL function `build_matches` (migration 0151), in the claim and
//! in [`unmatched`].

use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;

use super::{Platform, QueueResult};

/// Largest version part; parts are encoded as four decimal digits (`version_key` in SQL).
const MAX_PART: u64 = 9999;
const MAX_LABELS: usize = 20;
const MAX_LABEL_CHARS: usize = 64;

/// A build's parsed requirements.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Requirements {
    xcode: Option<VersionRange>,
    macos: Option<VersionRange>,
    arch: Option<String>,
    min_memory_gb: Option<u32>,
    labels: Vec<String>,
}

/// An inclusive range of encoded versions, with the text it was written as.
#[derive(Debug, Clone, PartialEq)]
struct VersionRange {
    text: String,
    lo: u64,
    hi: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    xcode: Option<String>,
    macos: Option<String>,
    arch: Option<String>,
    min_memory_gb: Option<u32>,
    labels: Option<Vec<String>>,
}

/// A dotted version (1 to 3 numeric parts, each ≤ 9999) as one comparable number, like SQL `version_key`.
fn version_key(text: &str) -> Option<u64> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.is_empty() || parts.len() > 3 {
        return None;
    }
    let mut key = 0;
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() || part.len() > 4 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = part.parse().ok()?;
        if n > MAX_PART {
            return None;
        }
        key += n * 10_000u64.pow(2 - i as u32);
    }
    Some(key)
}

/// `">=16.2,<17"`: comparisons (`=`, `>=`, `>`, `<=`, `<`; none means `=`) joined by commas ("and").
fn parse_range(name: &str, text: &str) -> Result<VersionRange, String> {
    let bad = || format!("Invalid requirements: {name} must be a version range like \">=16.2,<17\", got {text:?}");
    let (mut lo, mut hi) = (0u64, version_key("9999.9999.9999").unwrap_or(u64::MAX));
    let mut canonical = Vec::new();
    for term in text.split(',') {
        let term = term.trim();
        let (op, version) = ["<=", ">=", "<", ">", "="]
            .iter()
            .find_map(|op| term.strip_prefix(op).map(|rest| (*op, rest.trim())))
            .unwrap_or(("=", term));
        let key = version_key(version).ok_or_else(bad)?;
        match op {
            "=" => (lo, hi) = (lo.max(key), hi.min(key)),
            ">=" => lo = lo.max(key),
            ">" => lo = lo.max(key + 1),
            "<=" => hi = hi.min(key),
            _ => hi = hi.min(key.checked_sub(1).ok_or_else(bad)?),
        }
        canonical.push(format!("{op}{version}"));
    }
    if lo > hi {
        return Err(format!("Invalid requirements: {name} {text:?} can never be satisfied"));
    }
    Ok(VersionRange {
        text: canonical.join(","),
        lo,
        hi,
    })
}

impl Requirements {
    /// Parses a submit's `requirements` (JSON object text). Empty text or `{}`: no requirement (`None`).
    /// Unknown keys, wrong types, bad version ranges, empty or oversized labels: an error naming the
    /// problem (a 400 message).
    pub fn parse(text: &str) -> Result<Option<Requirements>, String> {
        if text.trim().is_empty() {
            return Ok(None);
        }
        let raw: Raw = serde_json::from_str(text).map_err(|e| format!("Invalid requirements: {e}"))?;
        let xcode = raw.xcode.as_deref().map(|t| parse_range("xcode", t)).transpose()?;
        let macos = raw.macos.as_deref().map(|t| parse_range("macos", t)).transpose()?;
        let arch = match raw.arch.as_deref().map(str::trim) {
            Some(a) if a.is_empty() || a.len() > 32 || !a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
                return Err(format!(
                    "Invalid requirements: arch must be a name like \"arm64\", got {a:?}"
                ));
            }
            other => other.map(str::to_ascii_lowercase),
        };
        if raw.min_memory_gb == Some(0) {
            return Err("Invalid requirements: min_memory_gb must be at least 1".into());
        }
        let labels = raw.labels.unwrap_or_default();
        if labels.len() > MAX_LABELS {
            return Err(format!("Invalid requirements: at most {MAX_LABELS} labels"));
        }
        if let Some(l) = labels
            .iter()
            .find(|l| l.trim().is_empty() || l.chars().count() > MAX_LABEL_CHARS || l.chars().any(char::is_control))
        {
            return Err(format!(
                "Invalid requirements: labels must be 1 to {MAX_LABEL_CHARS} printable characters, got {l:?}"
            ));
        }
        let parsed = Requirements {
            xcode,
            macos,
            arch,
            min_memory_gb: raw.min_memory_gb,
            labels,
        };
        Ok((parsed != Requirements::default()).then_some(parsed))
    }

    /// As shown in build views: `{"xcode": ">=16.2", "arch": "arm64", …}` (absent keys omitted).
    pub fn display(&self) -> Value {
        let mut shown = serde_json::Map::new();
        if let Some(x) = &self.xcode {
            shown.insert("xcode".into(), json!(x.text));
        }
        if let Some(m) = &self.macos {
            shown.insert("macos".into(), json!(m.text));
        }
        if let Some(a) = &self.arch {
            shown.insert("arch".into(), json!(a));
        }
        if let Some(g) = self.min_memory_gb {
            shown.insert("min_memory_gb".into(), json!(g));
        }
        if !self.labels.is_empty() {
            shown.insert("labels".into(), json!(self.labels));
        }
        Value::Object(shown)
    }

    /// What `build_matches` compares (`builds.requirement_match`).
    pub fn match_doc(&self) -> Value {
        let mut doc = serde_json::Map::new();
        if let Some(x) = &self.xcode {
            doc.insert("xcode".into(), json!([x.lo, x.hi]));
        }
        if let Some(m) = &self.macos {
            doc.insert("macos".into(), json!([m.lo, m.hi]));
        }
        if let Some(a) = &self.arch {
            doc.insert("arch".into(), json!(a));
        }
        if let Some(g) = self.min_memory_gb {
            doc.insert("memory_gb".into(), json!(g));
        }
        if !self.labels.is_empty() {
            doc.insert("labels".into(), json!(self.labels));
        }
        Value::Object(doc)
    }

    /// One requirement per entry: (name as in a sentence, its match document, the capability key workers
    /// declare it under).
    fn each(&self) -> Vec<(String, Value, &'static str)> {
        let mut out = Vec::new();
        if let Some(x) = &self.xcode {
            out.push((format!("xcode {}", x.text), json!({"xcode": [x.lo, x.hi]}), "xcode"));
        }
        if let Some(m) = &self.macos {
            out.push((format!("macos {}", m.text), json!({"macos": [m.lo, m.hi]}), "macos"));
        }
        if let Some(a) = &self.arch {
            out.push((format!("arch {a}"), json!({"arch": a}), "arch"));
        }
        if let Some(g) = self.min_memory_gb {
            out.push((format!("min_memory_gb {g}"), json!({"memory_gb": g}), "memory"));
        }
        if !self.labels.is_empty() {
            let labels = self.labels.join(", ");
            out.push((format!("labels {labels}"), json!({"labels": self.labels}), "labels"));
        }
        out
    }
}

/// What a registered worker declares for one requirement, as shown in a refusal.
const DECLARED: &str = "SELECT DISTINCT v FROM workers w, LATERAL (
        SELECT w.capabilities->>'xcode_version' AS v WHERE $2 = 'xcode' AND jsonb_typeof(w.capabilities->'xcode_version') IN ('string', 'number')
        UNION ALL SELECT e #>> '{}' FROM jsonb_array_elements(CASE WHEN $2 = 'xcode' AND jsonb_typeof(w.capabilities->'xcode_versions') = 'array'
            THEN w.capabilities->'xcode_versions' ELSE '[]' END) e
        UNION ALL SELECT w.capabilities->>'macos_version' WHERE $2 = 'macos' AND w.capabilities ? 'macos_version'
        UNION ALL SELECT w.caps->>'arch' WHERE $2 = 'arch'
        UNION ALL SELECT w.caps->>'memory_gb' WHERE $2 = 'memory'
        UNION ALL SELECT e FROM jsonb_array_elements_text(CASE WHEN $2 = 'labels' THEN COALESCE(w.caps->'labels', '[]') ELSE '[]' END) e
    ) d
    WHERE w.unregistered_at IS NULL AND w.admin_state <> 'revoked' AND $1 = ANY(w.platforms) AND v IS NOT NULL
    ORDER BY v LIMIT 20";

/// `None` when at least one registered, non-revoked worker of `platform` satisfies every requirement;
/// otherwise the sentence for the 422 `no_matching_worker`: the first requirement no such worker
/// satisfies, with what they declare (`needs xcode >=16.2 (registered: 15.0, 15.4)`), or, when each
/// is satisfied by some worker but none has all, the requirements together.
pub async fn unmatched(pool: &PgPool, platform: Platform, req: &Requirements) -> QueueResult<Option<String>> {
    const ANY: &str = "SELECT EXISTS (SELECT 1 FROM workers w WHERE w.unregistered_at IS NULL
        AND w.admin_state <> 'revoked' AND $1 = ANY(w.platforms) AND build_matches($2, w.caps))";
    let matched: bool = sqlx::query_scalar(ANY)
        .bind(platform.as_str())
        .bind(req.match_doc())
        .fetch_one(pool)
        .await?;
    if matched {
        return Ok(None);
    }
    let each = req.each();
    for (sentence, doc, declared) in &each {
        let one: bool = sqlx::query_scalar(ANY)
            .bind(platform.as_str())
            .bind(doc)
            .fetch_one(pool)
            .await?;
        if !one {
            let values: Vec<String> = sqlx::query_scalar(DECLARED)
                .bind(platform.as_str())
                .bind(declared)
                .fetch_all(pool)
                .await?;
            let registered = if values.is_empty() {
                "none".to_string()
            } else {
                values.join(", ")
            };
            return Ok(Some(format!(
                "No worker can run this build: needs {sentence} (registered: {registered})"
            )));
        }
    }
    let all: Vec<String> = each.into_iter().map(|(s, _, _)| s).collect();
    Ok(Some(format!(
        "No worker can run this build: no registered worker has {} together",
        all.join(" and ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_into_inclusive_bounds() {
        let r = Requirements::parse(r#"{"xcode": ">=16.2, <17", "macos": "15"}"#)
            .unwrap()
            .unwrap();
        let doc = r.match_doc();
        assert_eq!(doc["xcode"], json!([1_600_020_000u64, 1_699_999_999u64]));
        assert_eq!(doc["macos"], json!([1_500_000_000u64, 1_500_000_000u64]));
        assert_eq!(r.display(), json!({"xcode": ">=16.2,<17", "macos": "=15"}));
        let r = Requirements::parse(r#"{"xcode": ">15.4"}"#).unwrap().unwrap();
        assert_eq!(r.match_doc()["xcode"][0], json!(1_500_040_001u64));
    }

    #[test]
    fn bad_input_is_named() {
        for (text, names) in [
            (r#"{"gpu": "m3"}"#, "unknown field `gpu`"),
            (r#"{"xcode": ">>16"}"#, "xcode must be a version range"),
            (r#"{"xcode": "16.a"}"#, "xcode must be a version range"),
            (r#"{"macos": "1.2.3.4"}"#, "macos must be a version range"),
            (r#"{"xcode": ">=17,<16"}"#, "can never be satisfied"),
            (r#"{"arch": "arm 64"}"#, "arch must be a name"),
            (r#"{"min_memory_gb": -1}"#, "invalid value"),
            (r#"{"min_memory_gb": 0}"#, "at least 1"),
            (r#"{"labels": [""]}"#, "labels must be"),
            (r#"{"labels": ["fast\u0000disk"]}"#, "printable"),
            (r#"{"xcode": 16}"#, "invalid type"),
            ("not json", "Invalid requirements"),
        ] {
            let e = Requirements::parse(text).unwrap_err();
            assert!(e.contains(names), "{text}: {e}");
        }
        assert_eq!(Requirements::parse("").unwrap(), None);
        assert_eq!(Requirements::parse("{}").unwrap(), None);
    }
}
