//! Latency samples and the printed table.

use std::time::Duration;

/// Latency samples of one scenario.
#[derive(Default, Clone)]
pub struct Samples(pub Vec<Duration>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    pub fn extend(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    pub fn percentile(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[index.min(sorted.len() - 1)]
    }

    pub fn summary(&self) -> String {
        if self.0.is_empty() {
            return "-".into();
        }
        format!(
            "{} / {} / {}",
            ms(self.percentile(0.5)),
            ms(self.percentile(0.95)),
            ms(self.percentile(0.99))
        )
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Median of a few runs.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// One printed row.
pub struct Row {
    pub id: &'static str,
    pub scenario: String,
    pub figure: String,
    pub reference: String,
    pub ratio: String,
    pub latency: String,
    pub target: &'static str,
    pub met: bool,
}

pub fn print_table(rows: &[Row], peak_rss_mib: f64) {
    println!();
    println!("| Id | Scenario | Figure | Reference (same run) | Ratio | p50 / p95 / p99 | Target | Met |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.id,
            r.scenario,
            r.figure,
            r.reference,
            r.ratio,
            r.latency,
            r.target,
            if r.met { "yes" } else { "**no**" }
        );
    }
    println!();
    println!("Controller peak RSS (VmHWM): {peak_rss_mib:.1} MiB");
}
