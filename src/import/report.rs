//! What an import did: counts per table (read, imported, already present, skipped with reasons), notes,
//! the skipped rows, and the progress shown while it runs (a bar on a terminal, plain lines otherwise).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::mapping::Skip;

/// The tables of the summary, in order.
pub const TABLES: [&str; 6] = [
    "workers",
    "builds",
    "build_logs",
    "diagnostics",
    "cpu_snapshots",
    "files",
];

/// Most skipped rows listed one by one (the counts are always complete).
const LISTED_SKIPS: usize = 50;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub read: u64,
    pub imported: u64,
    pub present: u64,
    pub skipped: BTreeMap<String, u64>,
}

impl Counts {
    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }
}

/// The outcome of a run.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub dry_run: bool,
    pub tables: BTreeMap<&'static str, Counts>,
    /// Facts worth knowing that are not skips (e.g. builds queued again), by description.
    pub notes: BTreeMap<&'static str, u64>,
    pub skipped_rows: Vec<String>,
    pub elapsed: Duration,
}

impl Summary {
    pub fn new(dry_run: bool) -> Self {
        let mut summary = Summary {
            dry_run,
            ..Default::default()
        };
        for table in TABLES {
            summary.tables.insert(table, Counts::default());
        }
        summary
    }

    pub fn table(&mut self, table: &'static str) -> &mut Counts {
        self.tables.entry(table).or_default()
    }

    pub fn skip(&mut self, table: &'static str, skip: Skip) {
        *self.table(table).skipped.entry(skip.reason.to_string()).or_default() += 1;
        if self.skipped_rows.len() < LISTED_SKIPS {
            self.skipped_rows
                .push(format!("{table}: {} ({})", skip.detail, skip.reason));
        }
    }

    pub fn note(&mut self, note: &'static str, n: u64) {
        if n > 0 {
            *self.notes.entry(note).or_default() += n;
        }
    }

    /// Anything skipped makes the exit code non-zero.
    pub fn skipped_total(&self) -> u64 {
        self.tables.values().map(Counts::skipped_total).sum()
    }

    /// The summary table and what follows it, as printed at the end.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let imported = if self.dry_run { "would import" } else { "imported" };
        let _ = writeln!(
            out,
            "{:<14} {:>9} {:>12} {:>15} {:>9}  reasons",
            "table", "read", imported, "already present", "skipped"
        );
        for table in TABLES {
            let c = self.tables.get(table).cloned().unwrap_or_default();
            let reasons: Vec<String> = c.skipped.iter().map(|(r, n)| format!("{r}: {n}")).collect();
            let _ = writeln!(
                out,
                "{table:<14} {:>9} {:>12} {:>15} {:>9}  {}",
                c.read,
                c.imported,
                c.present,
                c.skipped_total(),
                reasons.join(", ")
            );
        }
        for (note, n) in &self.notes {
            let _ = writeln!(out, "{note}: {n}");
        }
        let total = self.skipped_total();
        if total > 0 {
            let _ = writeln!(out, "skipped ({total}):");
            for row in &self.skipped_rows {
                let _ = writeln!(out, "  {row}");
            }
            if total as usize > self.skipped_rows.len() {
                let _ = writeln!(out, "  … and {} more", total as usize - self.skipped_rows.len());
            }
        }
        let _ = writeln!(
            out,
            "{} in {:.1} s{}",
            if self.dry_run {
                "dry run: nothing written"
            } else {
                "import finished"
            },
            self.elapsed.as_secs_f64(),
            if total > 0 {
                "; some rows were skipped (exit code 2)"
            } else {
                ""
            }
        );
        out
    }
}

/// Progress over builds: an indicatif bar on a terminal, a plain line every few seconds otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    pub fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) =
                ProgressStyle::with_template("{spinner} builds {pos}/{len} [{bar:40}] {per_sec} eta {eta} {msg}")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            total,
            done: 0,
            started: now,
            last_line: now,
        }
    }

    pub fn advance(&mut self, n: u64) {
        self.done += n;
        match &self.bar {
            Some(bar) => bar.inc(n),
            None if self.last_line.elapsed() >= Duration::from_secs(2) || self.done == self.total => {
                self.last_line = Instant::now();
                let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
                eprintln!("import-ts: builds {}/{} ({rate:.0}/s)", self.done, self.total);
            }
            None => {}
        }
    }

    pub fn message(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("import-ts: {text}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
