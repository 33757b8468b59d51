//! What the operator commands print: the API's JSON (pretty, or one object per line when following),
//! or aligned tables and `key  value` lines for people.

use chrono::{DateTime, Utc};
use serde_json::Value;

/// Writes `text` to standard output. When the reader went away (`builds logs ID | head`), the command
/// ends quietly with success instead of panicking on the broken pipe as `print!` does.
pub fn emit(text: &str) {
    emit_or_exit(text, 0);
}

/// [`emit`], ending the process with `closed_code` when the reader has gone (a closed pipe is not an
/// error of the command: `| head` took what it wanted). Any other write error exits 1.
pub fn emit_or_exit(text: &str, closed_code: i32) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(closed_code);
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

/// A result to show.
pub(crate) enum Shown {
    Builds(Value),
    Build(Value),
    Workers(Value),
    Worker(Value),
    Queues(Value),
    Queue(Value),
    Keys(Value),
    Key(Value),
    Audit(Value),
    /// Webhook subscriptions, one, its deliveries, or a deletion.
    Webhooks(Value),
}

pub fn print(shown: &Shown, json: bool) {
    if json {
        let value = match shown {
            Shown::Builds(v)
            | Shown::Build(v)
            | Shown::Workers(v)
            | Shown::Worker(v)
            | Shown::Queues(v)
            | Shown::Queue(v)
            | Shown::Keys(v)
            | Shown::Key(v)
            | Shown::Audit(v)
            | Shown::Webhooks(v) => v,
        };
        print_json(value);
        return;
    }
    let text = match shown {
        Shown::Builds(list) => builds_table(list, Utc::now()),
        Shown::Build(build) => build_details(build, Utc::now()),
        Shown::Workers(list) => workers_table(list, Utc::now()),
        Shown::Worker(worker) => worker_details(worker, Utc::now()),
        Shown::Queues(list) => queues_table(list),
        Shown::Keys(list) => keys_table(list),
        Shown::Key(key) => key_details(key),
        Shown::Audit(list) => audit_table(list),
        Shown::Webhooks(value) => webhooks_text(value),
        Shown::Queue(queue) => format!(
            "queue {}: {}\n",
            text(&queue["name"]),
            if queue["paused"] == true { "paused" } else { "running" }
        ),
    };
    emit(&text);
}

/// Webhook answers: a list of subscriptions or deliveries as a table, one subscription or delivery as
/// `field  value` lines (a new subscription's secret first, with the warning that it is shown once).
fn webhooks_text(value: &Value) -> String {
    let mut out = String::new();
    if let Some(id) = value["deleted"].as_str() {
        return format!("webhook {id} deleted\n");
    }
    let Some(items) = value["items"].as_array() else {
        if let Some(secret) = value["secret"].as_str() {
            out.push_str(&format!("secret       {secret}\n(shown once: store it now)\n"));
        }
        let fields: &[&str] = if value.get("message_id").is_some() {
            &[
                "id",
                "message_id",
                "webhook_id",
                "kind",
                "state",
                "created_at",
                "delivered_at",
                "next_attempt_at",
            ]
        } else {
            &[
                "id",
                "url",
                "events",
                "description",
                "active",
                "owner_name",
                "created_at",
            ]
        };
        for field in fields {
            let shown = match &value[*field] {
                Value::Array(list) => list.iter().map(text).collect::<Vec<_>>().join(","),
                other => text(other),
            };
            out.push_str(&format!("{field:<12} {shown}\n"));
        }
        return out;
    };
    if items.first().is_some_and(|d| d.get("message_id").is_some()) {
        out.push_str(&format!(
            "{:<10} {:<22} {:<11} {:<9} {:<6} {}\n",
            "ID", "KIND", "STATE", "ATTEMPTS", "LAST", "LAST ERROR"
        ));
        for d in items {
            let attempts = d["attempts"].as_array().map_or(0, Vec::len);
            let last = d["attempts"]
                .as_array()
                .and_then(|a| a.last())
                .cloned()
                .unwrap_or(Value::Null);
            out.push_str(&format!(
                "{:<10} {:<22} {:<11} {:<9} {:<6} {}\n",
                text(&d["id"]),
                text(&d["kind"]),
                text(&d["state"]),
                attempts,
                text(&last["status_code"]),
                text(&last["error"]),
            ));
        }
    } else {
        out.push_str(&format!(
            "{:<22} {:<7} {:<30} {:<16} {}\n",
            "ID", "ACTIVE", "EVENTS", "OWNER", "URL"
        ));
        for w in items {
            let events = w["events"]
                .as_array()
                .map(|l| l.iter().map(text).collect::<Vec<_>>().join(","))
                .unwrap_or_default();
            out.push_str(&format!(
                "{:<22} {:<7} {:<30} {:<16} {}\n",
                text(&w["id"]),
                text(&w["active"]),
                events,
                text(&w["owner_name"]),
                text(&w["url"]),
            ));
        }
    }
    out
}

/// The audit log: time, actor, role, action, target, client address; the next page's cursor.
fn audit_table(list: &Value) -> String {
    let empty = Vec::new();
    let items = list["items"].as_array().unwrap_or(&empty);
    let mut out = format!(
        "{:<25} {:<24} {:<9} {:<20} {:<32} {}\n",
        "AT", "ACTOR", "ROLE", "ACTION", "TARGET", "FROM"
    );
    for row in items {
        let target = format!("{} {}", text(&row["target_kind"]), text(&row["target_id"]));
        out.push_str(&format!(
            "{:<25} {:<24} {:<9} {:<20} {:<32} {}\n",
            text(&row["at"]),
            text(&row["actor_name"]),
            text(&row["role"]),
            text(&row["action"]),
            target,
            text(&row["client_ip"]),
        ));
    }
    if let Some(cursor) = list["next_cursor"].as_str() {
        out.push_str(&format!("more: --cursor {cursor}\n"));
    }
    out
}

/// Keys: id, name, role, prefix, expiry, last use, state.
fn keys_table(list: &Value) -> String {
    let empty = Vec::new();
    let items = list["items"].as_array().unwrap_or(&empty);
    let mut out = format!(
        "{:<22} {:<24} {:<9} {:<13} {:<25} {:<25} {}\n",
        "ID", "NAME", "ROLE", "PREFIX", "EXPIRES", "LAST USED", "STATE"
    );
    for key in items {
        let state = if !key["revoked_at"].is_null() {
            "revoked"
        } else {
            "active"
        };
        out.push_str(&format!(
            "{:<22} {:<24} {:<9} {:<13} {:<25} {:<25} {}\n",
            text(&key["id"]),
            text(&key["name"]),
            text(&key["role"]),
            text(&key["prefix"]),
            text(&key["expires_at"]),
            text(&key["last_used_at"]),
            state
        ));
    }
    out
}

/// `key  value` lines; a new key's secret first, with the warning that it is shown once.
fn key_details(key: &Value) -> String {
    let mut out = String::new();
    if let Some(secret) = key["key"].as_str() {
        out.push_str(&format!("key          {secret}\n(shown once: store it now)\n"));
    }
    for field in [
        "id",
        "name",
        "role",
        "prefix",
        "created_at",
        "expires_at",
        "weight",
        "max_running",
        "max_queued",
        "enroll",
        "last_used_at",
        "revoked_at",
    ] {
        if let Some(value) = key.get(field) {
            out.push_str(&format!("{field:<12} {}\n", text(value)));
        }
    }
    out
}

pub fn print_json(value: &Value) {
    emit(&format!(
        "{}\n",
        serde_json::to_string_pretty(value).unwrap_or_default()
    ));
}

/// One JSON object per line (follow modes).
pub fn print_ndjson(value: &Value) {
    emit(&format!("{value}\n"));
}

/// `12:00:01.250 info  message`.
pub fn print_log_line(line: &Value) {
    let at = line["timestamp"]
        .as_i64()
        .and_then(DateTime::<Utc>::from_timestamp_millis)
        .map(|t| t.format("%H:%M:%S%.3f").to_string())
        .unwrap_or_default();
    emit(&format!(
        "{at} {:<5} {}\n",
        text(&line["level"]),
        text(&line["message"])
    ));
}

/// `12:00:01  <id>  building  45%  compiling`.
pub fn print_watch_line(build: &Value) {
    let mut line = format!(
        "{}  {}  {}",
        Utc::now().format("%H:%M:%S"),
        text(&build["id"]),
        text(&build["state"])
    );
    if let Some(progress) = build["progress"].as_f64() {
        line.push_str(&format!("  {progress:.0}%"));
    }
    if let Some(stage) = build["stage"].as_str() {
        line.push_str(&format!("  {stage}"));
    }
    if let Some(error) = build["error_message"].as_str() {
        line.push_str(&format!("  {error}"));
    }
    line.push('\n');
    emit(&line);
}

/// A JSON value as a cell: strings bare, null as `-`.
fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// How long ago an RFC 3339 time was: `42s`, `5m`, `3h`, `2d`.
fn age(value: &Value, now: DateTime<Utc>) -> String {
    let Some(at) = value.as_str().and_then(|s| DateTime::parse_from_rfc3339(s).ok()) else {
        return "-".to_string();
    };
    let secs = (now - at.with_timezone(&Utc)).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Columns padded to their widest cell, two spaces apart; the header row first.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (n, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if n + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(width - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn items(list: &Value) -> &[Value] {
    list["items"].as_array().map_or(&[], Vec::as_slice)
}

fn more(list: &Value, what: &str) -> String {
    match list["next_cursor"].as_str() {
        Some(cursor) => format!("more {what}: --cursor {cursor} (or --all)\n"),
        None => String::new(),
    }
}

fn progress(build: &Value) -> String {
    build["progress"]
        .as_f64()
        .map_or_else(|| "-".to_string(), |p| format!("{p:.0}%"))
}

fn builds_table(list: &Value, now: DateTime<Utc>) -> String {
    let rows: Vec<Vec<String>> = items(list)
        .iter()
        .map(|b| {
            vec![
                text(&b["id"]),
                text(&b["state"]),
                text(&b["platform"]),
                text(&b["priority"]),
                format!("{}/{}", text(&b["attempt"]), text(&b["max_attempts"])),
                progress(b),
                text(&b["worker_id"]),
                age(&b["submitted_at"], now),
                waiting(b),
            ]
        })
        .collect();
    let header = [
        "ID", "STATE", "PLATFORM", "PRIORITY", "ATTEMPT", "PROGRESS", "WORKER", "AGE", "WAITING",
    ];
    if rows.is_empty() {
        return "no builds\n".to_string();
    }
    table(&header, &rows) + &more(list, "builds")
}

/// Why a queued build waits: its reason, with its position where one applies (`-` when not queued).
fn waiting(b: &Value) -> String {
    match (b["waiting_reason"].as_str(), b["position"].as_i64()) {
        (Some(reason), Some(position)) => format!("{reason} (#{})", position + 1),
        (Some(reason), None) => reason.to_string(),
        _ => "-".to_string(),
    }
}

fn details(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs.iter().map(|(k, v)| format!("{k:<width$}  {v}\n")).collect()
}

fn build_details(b: &Value, now: DateTime<Utc>) -> String {
    let mut out = details(&[
        ("id", text(&b["id"])),
        ("state", text(&b["state"])),
        ("platform", text(&b["platform"])),
        ("priority", text(&b["priority"])),
        (
            "attempt",
            format!("{}/{}", text(&b["attempt"]), text(&b["max_attempts"])),
        ),
        ("progress", progress(b)),
        ("stage", text(&b["stage"])),
        ("worker", text(&b["worker_id"])),
        (
            "waiting",
            match b["waiting_sentence"].as_str() {
                Some(sentence) => format!("{} — {sentence}", waiting(b)),
                None => "-".to_string(),
            },
        ),
        (
            "submitted",
            format!("{} ({} ago)", text(&b["submitted_at"]), age(&b["submitted_at"], now)),
        ),
        ("started", text(&b["started_at"])),
        ("completed", text(&b["completed_at"])),
        ("finished reason", text(&b["finished_reason"])),
        ("error", text(&b["error_message"])),
        ("log lines", text(&b["log_lines"])),
    ]);
    if let Some(attempts) = b["attempts"].as_array().filter(|a| !a.is_empty()) {
        let rows: Vec<Vec<String>> = attempts
            .iter()
            .map(|a| {
                vec![
                    text(&a["attempt"]),
                    text(&a["worker_id"]),
                    text(&a["assigned_at"]),
                    text(&a["finished_at"]),
                    text(&a["outcome"]),
                    text(&a["error_message"]),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &["ATTEMPT", "WORKER", "ASSIGNED", "FINISHED", "OUTCOME", "ERROR"],
            &rows,
        ));
    }
    out
}

fn workers_table(list: &Value, now: DateTime<Utc>) -> String {
    let rows: Vec<Vec<String>> = items(list)
        .iter()
        .map(|w| {
            vec![
                text(&w["id"]),
                text(&w["name"]),
                text(&w["status"]),
                text(&w["admin_state"]),
                text(&w["platforms"]),
                text(&w["builds_completed"]),
                text(&w["builds_failed"]),
                age(&w["last_seen_at"], now),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no workers\n".to_string();
    }
    let header = ["ID", "NAME", "STATUS", "ADMIN", "PLATFORMS", "DONE", "FAILED", "SEEN"];
    table(&header, &rows) + &more(list, "workers")
}

fn worker_details(w: &Value, now: DateTime<Utc>) -> String {
    details(&[
        ("id", text(&w["id"])),
        ("name", text(&w["name"])),
        ("status", text(&w["status"])),
        ("admin state", text(&w["admin_state"])),
        ("platforms", text(&w["platforms"])),
        ("builds completed", text(&w["builds_completed"])),
        ("builds failed", text(&w["builds_failed"])),
        ("health", health(w)),
        ("registered", text(&w["registered_at"])),
        (
            "last seen",
            format!("{} ({} ago)", text(&w["last_seen_at"]), age(&w["last_seen_at"], now)),
        ),
    ])
}

fn queues_table(list: &Value) -> String {
    let rows: Vec<Vec<String>> = items(list)
        .iter()
        .map(|q| {
            let depth = &q["depth"];
            vec![
                text(&q["name"]),
                if q["paused"] == true { "paused" } else { "running" }.to_string(),
                text(&depth["pending"]),
                text(&depth["scheduled"]),
                text(&depth["retryable"]),
                text(&depth["assigned"]),
                text(&depth["building"]),
                q["oldest_pending_age_seconds"]
                    .as_f64()
                    .map_or_else(|| "-".to_string(), |s| format!("{s:.0}s")),
                format!("{}/{}", text(&q["queued"]), text(&q["max_queued"])),
            ]
        })
        .collect();
    let header = [
        "QUEUE",
        "STATE",
        "PENDING",
        "SCHEDULED",
        "RETRYABLE",
        "ASSIGNED",
        "BUILDING",
        "OLDEST",
        "QUEUED",
    ];
    table(&header, &rows)
}

/// `ok`, or `quarantined`/`probation` with until when and why.
fn health(w: &Value) -> String {
    let mut shown = text(&w["health"]);
    if shown != "ok" {
        match w["quarantined_until"].as_str() {
            Some(until) => shown.push_str(&format!(" (quarantine until {until})")),
            None => shown.push_str(" (until a healthy diagnostics report or a release)"),
        }
        if let Some(reason) = w["quarantine_reason"].as_str() {
            shown.push_str(&format!(": {reason}"));
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn columns_line_up_under_their_headers() {
        let out = table(
            &["ID", "STATE"],
            &[vec!["a-long-id".into(), "pending".into()], vec!["b".into(), "é".into()]],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines, ["ID         STATE", "a-long-id  pending", "b          é"]);
    }

    #[test]
    fn queued_builds_say_why_they_wait() {
        let list = json!({ "items": [{ "id": "x", "state": "pending", "waiting_reason": "matching_workers_busy",
            "position": 1 }, { "id": "y", "state": "building" }], "next_cursor": null });
        let out = builds_table(&list, Utc::now());
        assert!(out.lines().next().unwrap_or_default().ends_with("WAITING"), "{out}");
        assert!(out.contains("matching_workers_busy (#2)"), "{out}");
    }

    #[test]
    fn a_page_with_more_says_how_to_get_it() {
        let now = Utc::now();
        let list = json!({ "items": [{ "id": "x", "state": "pending", "platform": "ios", "priority": 0,
            "attempt": 0, "max_attempts": 3, "progress": null, "worker_id": null,
            "submitted_at": crate::ops::views::iso(now - chrono::Duration::minutes(5)) }], "next_cursor": "x" });
        let out = builds_table(&list, now);
        assert!(out.starts_with("ID  STATE"), "{out}");
        assert!(
            out.contains("x   pending  ios       0         0/3      -         -       5m"),
            "{out}"
        );
        assert!(out.ends_with("more builds: --cursor x (or --all)\n"), "{out}");
    }
}
