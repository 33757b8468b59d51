//! Reading the TypeScript controller's SQLite database (import.md).
//!
//! The file is opened with `SQLITE_OPEN_READ_ONLY` and `PRAGMA query_only`, so nothing in the old folder
//! is ever written (no journal, no WAL, no `-shm`). It is deliberately **not** opened `immutable`: during a
//! trial import the old controller may still be writing, and `immutable` would make SQLite ignore its
//! locks and journal and read torn pages. Instead every read is one short statement (keyset pages by
//! rowid), so the shared lock a statement takes never blocks the old controller's writes for long, and a
//! busy timeout waits out its commits. A *hot* journal (left by a crash of the old controller) cannot be
//! rolled back by a read-only connection: the open then fails with a message saying so.
//!
//! Values are read as loosely typed [`Cell`]s (SQLite columns have no enforced types) and judged by the
//! mapping, which reports and skips a bad row instead of failing.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, OpenFlags, params};

/// The old controller's schema, exactly as import.md describes it (tests and the benchmark build their
/// fixtures from it).
pub const OLD_SCHEMA: &str = "
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    registered_at INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL,
    builds_completed INTEGER DEFAULT 0,
    builds_failed INTEGER DEFAULT 0
);
CREATE TABLE builds (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    platform TEXT NOT NULL,
    source_path TEXT NOT NULL,
    certs_path TEXT,
    result_path TEXT,
    worker_id TEXT,
    submitted_at INTEGER NOT NULL,
    started_at INTEGER,
    completed_at INTEGER,
    error_message TEXT,
    access_token TEXT NOT NULL,
    FOREIGN KEY (worker_id) REFERENCES workers(id)
);
CREATE TABLE build_logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE diagnostics (
    id TEXT PRIMARY KEY,
    worker_id TEXT NOT NULL,
    status TEXT NOT NULL,
    run_at INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    auto_fixed INTEGER,
    checks TEXT NOT NULL
);
CREATE TABLE cpu_snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    cpu_percent REAL NOT NULL,
    memory_mb REAL NOT NULL
);
";

/// The columns the import reads, per table. Other columns (e.g. `last_heartbeat_at`) are ignored.
const TABLES: [(&str, &str); 5] = [
    (
        "workers",
        "id, name, status, capabilities, registered_at, last_seen_at, builds_completed, builds_failed",
    ),
    (
        "builds",
        "id, status, platform, source_path, certs_path, result_path, worker_id, submitted_at, started_at, \
         completed_at, error_message, access_token",
    ),
    ("build_logs", "id, build_id, timestamp, level, message"),
    (
        "diagnostics",
        "id, worker_id, status, run_at, duration_ms, auto_fixed, checks",
    ),
    ("cpu_snapshots", "id, build_id, timestamp, cpu_percent, memory_mb"),
];

/// One SQLite value, whatever the declared column type.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob,
}

impl Cell {
    fn from_ref(value: ValueRef<'_>) -> Cell {
        match value {
            ValueRef::Null => Cell::Null,
            ValueRef::Integer(i) => Cell::Int(i),
            ValueRef::Real(f) => Cell::Real(f),
            ValueRef::Text(bytes) => Cell::Text(String::from_utf8_lossy(bytes).into_owned()),
            ValueRef::Blob(_) => Cell::Blob,
        }
    }

    /// Text values only.
    pub fn text(&self) -> Option<&str> {
        match self {
            Cell::Text(s) => Some(s),
            _ => None,
        }
    }

    /// An integer, also from an integral real or a numeric text.
    pub fn int(&self) -> Option<i64> {
        match self {
            Cell::Int(i) => Some(*i),
            Cell::Real(f) if f.fract() == 0.0 && f.is_finite() => Some(*f as i64),
            Cell::Text(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// A finite number.
    pub fn real(&self) -> Option<f64> {
        match self {
            Cell::Int(i) => Some(*i as f64),
            Cell::Real(f) => Some(*f),
            Cell::Text(s) => s.trim().parse().ok(),
            _ => None,
        }
        .filter(|f: &f64| f.is_finite())
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Cell::Null)
    }
}

/// A row: its rowid (for reports and paging) and the cells of the columns in [`TABLES`] order.
#[derive(Debug, Clone)]
pub struct Row {
    pub rowid: i64,
    pub cells: Vec<Cell>,
}

impl Row {
    pub fn cell(&self, index: usize) -> &Cell {
        self.cells.get(index).unwrap_or(&Cell::Null)
    }
}

/// Where each build's log lines and CPU samples are (rowids in `id` order), gathered in one pass.
#[derive(Debug, Default)]
pub struct ChildIndex {
    pub by_build: HashMap<String, Vec<i64>>,
    /// Rows whose `build_id` is not text: (rowid, reason).
    pub bad: Vec<(i64, String)>,
    pub rows: u64,
}

/// The old database, open read-only.
pub struct OldDb {
    conn: Connection,
}

impl OldDb {
    /// Opens `path` read-only and checks that it is a TypeScript controller's database.
    pub fn open(path: &Path) -> anyhow::Result<OldDb> {
        let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if !meta.is_file() {
            bail!("{} is not a file", path.display());
        }
        let mut header = [0u8; 16];
        let read = std::fs::File::open(path)
            .and_then(|mut f| f.read(&mut header))
            .with_context(|| format!("cannot read {}", path.display()))?;
        if meta.len() > 0 && (read < 16 || &header != b"SQLite format 3\0") {
            bail!("{} is not a SQLite database", path.display());
        }
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(|e| explain(path, e))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "query_only", true)?;
        rusqlite::vtab::array::load_module(&conn)?;
        let db = OldDb { conn };
        db.check_schema().map_err(|e| match e.downcast::<rusqlite::Error>() {
            Ok(sqlite) => explain(path, sqlite),
            Err(other) => other,
        })?;
        Ok(db)
    }

    /// Every table of import.md with every column the import reads; extra columns are fine.
    fn check_schema(&self) -> anyhow::Result<()> {
        for (table, columns) in TABLES {
            let mut stmt = self.conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
            let present: HashSet<String> = stmt
                .query_map([table], |row| row.get::<_, String>(0))?
                .collect::<Result<_, _>>()?;
            if present.is_empty() {
                bail!(
                    "the SQLite database has no `{table}` table: this is not a TypeScript controller's database \
                     (expected tables: workers, builds, build_logs, diagnostics, cpu_snapshots)"
                );
            }
            let missing: Vec<&str> = columns
                .split(", ")
                .map(str::trim)
                .filter(|c| !present.contains(*c))
                .collect();
            if !missing.is_empty() {
                bail!("the `{table}` table lacks the column(s) {}", missing.join(", "));
            }
        }
        Ok(())
    }

    /// Number of rows of a table.
    pub fn count(&self, table: &str) -> anyhow::Result<u64> {
        let (name, _) = table_columns(table)?;
        let n: i64 = self
            .conn
            .query_row(&format!("SELECT count(*) FROM {name}"), [], |r| r.get(0))?;
        Ok(n.max(0) as u64)
    }

    /// Up to `limit` rows of `table` after `after` (by rowid).
    pub fn page(&self, table: &str, after: i64, limit: usize) -> anyhow::Result<Vec<Row>> {
        let (name, columns) = table_columns(table)?;
        let sql = format!("SELECT rowid, {columns} FROM {name} WHERE rowid > ?1 ORDER BY rowid LIMIT ?2");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let width = columns.split(", ").count();
        let rows = stmt.query_map(params![after, limit as i64], |row| read_row(row, width))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The rows of a child table (`build_logs`, `cpu_snapshots`) with these rowids, in `id` order.
    pub fn rows_by_id(&self, table: &str, ids: &[i64]) -> anyhow::Result<Vec<Row>> {
        let (name, columns) = table_columns(table)?;
        let sql = format!("SELECT rowid, {columns} FROM {name} WHERE rowid IN rarray(?1) ORDER BY rowid");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let width = columns.split(", ").count();
        let array: rusqlite::vtab::array::Array = Rc::new(ids.iter().map(|id| Value::Integer(*id)).collect());
        let rows = stmt.query_map([array], |row| read_row(row, width))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One pass over a child table: which rowids belong to which build.
    pub fn child_index(&self, table: &str) -> anyhow::Result<ChildIndex> {
        let (name, _) = table_columns(table)?;
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT rowid, build_id FROM {name} ORDER BY rowid"))?;
        let mut rows = stmt.query([])?;
        let mut index = ChildIndex::default();
        while let Some(row) = rows.next()? {
            index.rows += 1;
            let rowid: i64 = row.get(0)?;
            match Cell::from_ref(row.get_ref(1)?) {
                Cell::Text(build_id) => index.by_build.entry(build_id).or_default().push(rowid),
                _ => index.bad.push((rowid, "build_id is not text".to_string())),
            }
        }
        Ok(index)
    }

    /// Retries: the old controller logged `Retried as build <new id>` on the original build.
    /// Returns new id → original id.
    pub fn retries(&self) -> anyhow::Result<HashMap<String, String>> {
        let mut stmt = self.conn.prepare(
            "SELECT build_id, substr(message, 18) FROM build_logs
             WHERE message LIKE 'Retried as build %' ORDER BY rowid",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok((Cell::from_ref(row.get_ref(0)?), Cell::from_ref(row.get_ref(1)?)))
        })?;
        let mut map = HashMap::new();
        for row in rows {
            if let (Cell::Text(original), Cell::Text(new)) = row? {
                map.insert(new.trim().to_string(), original);
            }
        }
        Ok(map)
    }

    /// Every build id (to tell files without a row from files of skipped rows).
    pub fn build_ids(&self) -> anyhow::Result<HashSet<String>> {
        let mut stmt = self.conn.prepare("SELECT id FROM builds")?;
        let rows = stmt.query_map([], |row| Ok(Cell::from_ref(row.get_ref(0)?)))?;
        let mut ids = HashSet::new();
        for cell in rows {
            if let Cell::Text(id) = cell? {
                ids.insert(id);
            }
        }
        Ok(ids)
    }
}

fn table_columns(table: &str) -> anyhow::Result<(&'static str, &'static str)> {
    TABLES
        .iter()
        .find(|(name, _)| *name == table)
        .copied()
        .ok_or_else(|| anyhow!("unknown table {table}"))
}

fn read_row(row: &rusqlite::Row<'_>, width: usize) -> rusqlite::Result<Row> {
    let rowid: i64 = row.get(0)?;
    let mut cells = Vec::with_capacity(width);
    for i in 1..=width {
        cells.push(Cell::from_ref(row.get_ref(i)?));
    }
    Ok(Row { rowid, cells })
}

/// A clear message for the ways opening an old database fails.
fn explain(path: &Path, error: rusqlite::Error) -> anyhow::Error {
    let shown = path.display();
    match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => anyhow!("{shown} is not a SQLite database"),
        Some(rusqlite::ErrorCode::ReadOnly) | Some(rusqlite::ErrorCode::CannotOpen) => anyhow!(
            "cannot open {shown} read-only ({error}); if the old controller crashed and left a hot journal \
             (`-journal` file) next to it, start and stop the old controller once (or open it with sqlite3) so \
             the journal is rolled back, or import from a copy"
        ),
        Some(rusqlite::ErrorCode::DatabaseBusy) | Some(rusqlite::ErrorCode::DatabaseLocked) => {
            anyhow!("{shown} stayed locked by another process: {error}")
        }
        _ => anyhow!("cannot read {shown}: {error}"),
    }
}
