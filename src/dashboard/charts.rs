//! Charts drawn on the server as inline SVG: no chart library, no script, readable without JavaScript.

use maud::{Markup, html};

use super::queries::{Hour, Sample};

const W: f64 = 720.0;
const H: f64 = 160.0;
const PAD_L: f64 = 36.0;
const PAD_B: f64 = 20.0;

/// Finished builds per hour, stacked: completed, failed, cancelled.
pub fn throughput(hours: &[Hour]) -> Markup {
    let max = hours
        .iter()
        .map(|h| h.completed + h.failed + h.cancelled)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let plot_w = W - PAD_L;
    let plot_h = H - PAD_B;
    let slot = plot_w / hours.len().max(1) as f64;
    let bar = (slot * 0.7).max(1.0);
    let y = |v: f64| plot_h - v / max * (plot_h - 8.0);
    html! {
        svg.chart viewBox={ "0 0 " (W) " " (H) } role="img" aria-label="Finished builds per hour over the last 24 hours" preserveAspectRatio="none" {
            line.axis x1=(PAD_L) y1=(plot_h) x2=(W) y2=(plot_h) {}
            text.tick x=(PAD_L - 6.0) y=(y(max) + 4.0) text-anchor="end" { (max as i64) }
            text.tick x=(PAD_L - 6.0) y=(plot_h) text-anchor="end" { "0" }
            @for (i, h) in hours.iter().enumerate() {
                @let x = PAD_L + i as f64 * slot + (slot - bar) / 2.0;
                @let c = h.completed as f64;
                @let f = h.failed as f64;
                @let k = h.cancelled as f64;
                g {
                    title { (h.hour.format("%H:00")) ": " (h.completed) " completed, " (h.failed) " failed, " (h.cancelled) " cancelled" }
                    rect.completed x=(x) y=(y(c)) width=(bar) height=(plot_h - y(c)) {}
                    rect.failed x=(x) y=(y(c + f)) width=(bar) height=(y(c) - y(c + f)) {}
                    rect.cancelled x=(x) y=(y(c + f + k)) width=(bar) height=(y(c + f) - y(c + f + k)) {}
                }
                @if i % 6 == 0 {
                    text.tick x=(x + bar / 2.0) y=(H - 4.0) text-anchor="middle" { (h.hour.format("%H:00")) }
                }
            }
        }
    }
}

fn polyline(samples: &[Sample], value: impl Fn(&Sample) -> f64, max: f64) -> String {
    let n = samples.len().max(2) as f64 - 1.0;
    let plot_w = W - PAD_L;
    let plot_h = H - PAD_B;
    samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let x = PAD_L + i as f64 / n * plot_w;
            let y = plot_h - (value(s) / max).clamp(0.0, 1.0) * (plot_h - 8.0);
            format!("{x:.1},{y:.1}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// CPU (% of one core, scaled to the highest sample or 100) and memory (MB) over the build.
pub fn resources(samples: &[Sample]) -> Markup {
    if samples.is_empty() {
        return html! { p.empty { "No telemetry samples for this build." } };
    }
    let cpu_max = samples.iter().map(|s| s.cpu_percent).fold(100.0, f64::max);
    let mem_max = samples.iter().map(|s| s.memory_mb).fold(1.0, f64::max);
    let last = samples.last();
    html! {
        div.legend {
            span.key.cpu { "CPU " @if let Some(s) = last { (format!("{:.0}", s.cpu_percent)) "%" } }
            span.key.mem { "Memory " @if let Some(s) = last { (format!("{:.0}", s.memory_mb)) " MB" } }
            span.muted { (samples.len()) " samples" }
        }
        svg.chart viewBox={ "0 0 " (W) " " (H) } role="img" aria-label="CPU and memory during the build" preserveAspectRatio="none" {
            line.axis x1=(PAD_L) y1=(H - PAD_B) x2=(W) y2=(H - PAD_B) {}
            text.tick x=(PAD_L - 6.0) y="12" text-anchor="end" { (format!("{cpu_max:.0}%")) }
            polyline.cpu points=(polyline(samples, |s| s.cpu_percent, cpu_max)) {}
            polyline.mem points=(polyline(samples, |s| s.memory_mb, mem_max)) {}
            text.tick x=(PAD_L) y=(H - 4.0) { (samples[0].ts.format("%H:%M:%S")) }
            @if let Some(s) = last { text.tick x=(W) y=(H - 4.0) text-anchor="end" { (s.ts.format("%H:%M:%S")) } }
        }
    }
}
