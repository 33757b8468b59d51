//! The audit log (identity.md, "Audit"): who changed what, written by the layer that makes the change
//! **in the same transaction** ([`record`]), so a change that rolls back leaves no row and a row never
//! names a change that did not happen. Append-only: nothing here updates a row, and rows are deleted
//! only by retention ([`prune`], `CONTROLLER_AUDIT_RETENTION_DAYS`). Workers' own reports (logs,
//! heartbeats, results) are not audit events.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use utoipa::ToSchema;

use crate::identity::Principal;

/// A user agent is kept to this many characters.
const USER_AGENT_MAX: usize = 256;

/// Who makes a change: a key (or the built-in admin key), a database-mode CLI user, or a build token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The key's id; `None` for the built-in key, the CLI and build tokens.
    pub key_id: Option<String>,
    /// `admin`, the key's name, `cli:<os user>` or `build-token`.
    pub name: String,
    pub role: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

impl Actor {
    /// A caller with a key (the built-in one is named `admin`).
    pub fn key(who: &Principal, ip: Option<IpAddr>, user_agent: Option<&str>) -> Self {
        Actor {
            key_id: who.key_id().map(str::to_string),
            name: who.name().to_string(),
            role: who.role().as_str().to_string(),
            ip: ip.map(|ip| ip.to_string()),
            user_agent: user_agent.map(clip),
        }
    }

    /// A submitter following its build with the build's token (no key).
    pub fn build_token(ip: Option<IpAddr>, user_agent: Option<&str>) -> Self {
        Actor {
            key_id: None,
            name: "build-token".into(),
            role: "submitter".into(),
            ip: ip.map(|ip| ip.to_string()),
            user_agent: user_agent.map(clip),
        }
    }

    /// Someone not (yet) identified: a refused dashboard sign-in.
    pub fn anonymous(ip: Option<IpAddr>, user_agent: Option<&str>) -> Self {
        Actor {
            key_id: None,
            name: "anonymous".into(),
            role: "none".into(),
            ip: ip.map(|ip| ip.to_string()),
            user_agent: user_agent.map(clip),
        }
    }

    /// The database-mode CLI: `cli:<$USER, else the name of the process's uid>`, role `admin` (it
    /// holds the database itself).
    pub fn cli() -> Self {
        Actor {
            key_id: None,
            name: format!("cli:{}", os_user()),
            role: "admin".into(),
            ip: None,
            user_agent: Some(format!("expo-controller/{}", env!("CARGO_PKG_VERSION"))),
        }
    }
}

/// Keeps the first characters of a header, printable ones only.
pub fn clip(value: &str) -> String {
    crate::text::scrub(&value.chars().take(USER_AGENT_MAX).collect::<String>()).into_owned()
}

/// `$USER`, else the name of the process's uid in the password database, else `uid <n>`.
pub fn os_user() -> String {
    if let Some(user) = std::env::var("USER").ok().filter(|u| !u.trim().is_empty()) {
        return clip(user.trim());
    }
    // SAFETY: getpwuid_r writes into the buffers given, sized by their lengths; the result pointer is
    // either null or points into `entry`, whose `pw_name` points into `buffer`, both alive here.
    unsafe {
        let uid = libc::getuid();
        let mut entry: libc::passwd = std::mem::zeroed();
        let mut buffer = vec![0 as libc::c_char; 4096];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut entry, buffer.as_mut_ptr(), buffer.len(), &mut result);
        if rc == 0 && !result.is_null() && !entry.pw_name.is_null() {
            let name = std::ffi::CStr::from_ptr(entry.pw_name).to_string_lossy().into_owned();
            if !name.is_empty() {
                return clip(&name);
            }
        }
        format!("uid {uid}")
    }
}

/// What changed: the action, its target, and the relevant values before and after.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    pub action: &'static str,
    pub target_kind: &'static str,
    pub target_id: &'a str,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

impl<'a> Change<'a> {
    pub fn new(action: &'static str, target_kind: &'static str, target_id: &'a str) -> Self {
        Change {
            action,
            target_kind,
            target_id,
            before: None,
            after: None,
        }
    }

    pub fn before(mut self, value: Value) -> Self {
        self.before = Some(value);
        self
    }

    pub fn after(mut self, value: Value) -> Self {
        self.after = Some(value);
        self
    }
}

/// Writes one audit row on `conn`: call it inside the transaction of the change.
pub async fn record(conn: &mut PgConnection, actor: &Actor, change: Change<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO audit_events (actor, actor_name, role, client_ip, user_agent, action, target_kind, target_id,
                                   before, after)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&actor.key_id)
    .bind(&actor.name)
    .bind(&actor.role)
    .bind(&actor.ip)
    .bind(&actor.user_agent)
    .bind(change.action)
    .bind(change.target_kind)
    .bind(change.target_id)
    .bind(change.before)
    .bind(change.after)
    .execute(conn)
    .await?;
    Ok(())
}

/// A change with no other row to share a transaction with (a sign-in, an import's summary).
pub async fn record_alone(pool: &PgPool, actor: &Actor, change: Change<'_>) -> sqlx::Result<()> {
    let mut conn = pool.acquire().await?;
    record(&mut conn, actor, change).await
}

/// One row of the audit log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct AuditEvent {
    pub id: i64,
    #[schema(value_type = String)]
    pub at: DateTime<Utc>,
    /// The key's id (`null`: the built-in key, the CLI, a build token).
    pub actor: Option<String>,
    /// `admin`, the key's name, `cli:<os user>`, `build-token` or `anonymous`.
    pub actor_name: String,
    pub role: String,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    /// `build.cancel`, `worker.drain`, `queue.pause`, `key.create`, `dashboard.sign_in`, `import.run`, …
    pub action: String,
    pub target_kind: Option<String>,
    pub target_id: Option<String>,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

/// A page of the audit log, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditEvent>,
    /// Pass as `cursor` for the next (older) page; `null` at the end.
    pub next_cursor: Option<String>,
}

/// The filters of a listing.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// A key id or an actor name (`admin`, a key's name, `cli:alice`).
    pub actor: Option<String>,
    /// An action, or a prefix ending in `.` or `.*` (`build.`).
    pub action: Option<String>,
    /// A target id.
    pub target: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// Rows older than this id.
    pub before_id: Option<i64>,
    pub limit: i64,
}

impl AuditFilter {
    /// The filter from its textual parts (the API's query and the CLI's flags), each checked.
    pub fn parse(
        actor: Option<&str>,
        action: Option<&str>,
        target: Option<&str>,
        since: Option<&str>,
        cursor: Option<&str>,
        limit: i64,
    ) -> Result<Self, String> {
        let text = |name: &str, value: Option<&str>| -> Result<Option<String>, String> {
            match value.map(str::trim).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) if v.len() > 256 => Err(format!("Invalid {name}: at most 256 bytes")),
                Some(v) => Ok(Some(v.to_string())),
            }
        };
        let since = match since.map(str::trim).filter(|v| !v.is_empty()) {
            None => None,
            Some(raw) => Some(
                DateTime::parse_from_rfc3339(raw)
                    .map_err(|_| "Invalid since: must be an RFC 3339 time".to_string())?
                    .with_timezone(&Utc),
            ),
        };
        let before_id = match cursor.map(str::trim).filter(|v| !v.is_empty()) {
            None => None,
            Some(raw) => Some(
                raw.parse::<i64>()
                    .ok()
                    .filter(|id| *id > 0)
                    .ok_or_else(|| "Invalid cursor".to_string())?,
            ),
        };
        if !(1..=500).contains(&limit) {
            return Err("Invalid limit: must be an integer from 1 to 500".into());
        }
        Ok(AuditFilter {
            actor: text("actor", actor)?,
            action: text("action", action)?,
            target: text("target", target)?,
            since,
            before_id,
            limit,
        })
    }
}

/// A page of rows, newest first.
pub async fn list(pool: &PgPool, filter: &AuditFilter) -> sqlx::Result<AuditPage> {
    let (action, prefix) = match filter.action.as_deref() {
        Some(a) if a.ends_with(".*") => (None, Some(format!("{}.", &a[..a.len() - 2]))),
        Some(a) if a.ends_with('.') => (None, Some(a.to_string())),
        other => (other.map(str::to_string), None),
    };
    let mut rows: Vec<AuditEvent> = sqlx::query_as(
        "SELECT id, at, actor, actor_name, role, client_ip, user_agent, action, target_kind, target_id, before, after
         FROM audit_events
         WHERE ($1::text IS NULL OR actor = $1 OR actor_name = $1)
           AND ($2::text IS NULL OR action = $2)
           AND ($3::text IS NULL OR left(action, length($3)) = $3)
           AND ($4::text IS NULL OR target_id = $4)
           AND ($5::timestamptz IS NULL OR at >= $5)
           AND ($6::bigint IS NULL OR id < $6)
         ORDER BY id DESC LIMIT $7",
    )
    .bind(&filter.actor)
    .bind(action)
    .bind(prefix)
    .bind(&filter.target)
    .bind(filter.since)
    .bind(filter.before_id)
    .bind(filter.limit + 1)
    .fetch_all(pool)
    .await?;
    let more = rows.len() as i64 > filter.limit;
    rows.truncate(filter.limit as usize);
    let next_cursor = if more {
        rows.last().map(|r| r.id.to_string())
    } else {
        None
    };
    Ok(AuditPage {
        items: rows,
        next_cursor,
    })
}

/// Retention: deletes rows older than `cutoff`, at most `limit`; answers how many went.
pub async fn prune(pool: &PgPool, cutoff: DateTime<Utc>, limit: i64) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events WHERE at < $1 ORDER BY id LIMIT $2)",
    )
    .bind(cutoff)
    .bind(limit)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
