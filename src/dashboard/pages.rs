//! Server-rendered pages (maud). Each page is a layout around one or more live regions: a region names
//! the fragment URL that re-renders it and the events that concern it (`data-topics`), and the page
//! script refreshes it when such an event arrives.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::ansi;
use super::charts;
use super::queries::{BuildPage, Filter, Names, Overview, WorkerPage, WorkerRow};
use crate::api::ApiError;
use crate::queue::{Build, LogLine};

/// What the layout needs besides the content.
pub struct Chrome<'a> {
    pub title: &'a str,
    pub nav: &'a str,
    pub csrf: &'a str,
    /// The key signed in and its role, named in the top bar.
    pub who: &'a str,
    pub role: &'a str,
    pub notice: Option<&'a str>,
    pub error: Option<&'a str>,
    /// Where the page's live stream resumes (the newest event delivered before the page was read).
    pub events_at: i64,
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            meta name="htmx-config" content=r#"{"includeIndicatorStyles":false,"allowEval":false,"historyCacheSize":0}"#;
            title { (title) " · Expo Free Agent" }
            link rel="icon" href="/dashboard/assets/icon.svg" type="image/svg+xml";
            link rel="stylesheet" href="/dashboard/assets/app.css";
            script src="/dashboard/assets/htmx.min.js" defer {}
            script src="/dashboard/assets/app.js" defer {}
        }
    }
}

/// A full page.
/// The page's event stream, resuming after `events_at` (every change the page may lack is replayed).
fn events_url(events_at: i64) -> String {
    if events_at >= 0 {
        format!("/dashboard/events?last_event_id={events_at}")
    } else {
        "/dashboard/events".to_string()
    }
}

pub fn layout(chrome: &Chrome<'_>, content: Markup) -> Markup {
    let nav = [
        ("overview", "/dashboard", "Overview"),
        ("builds", "/dashboard/builds", "Builds"),
        ("workers", "/dashboard/workers", "Workers"),
        ("queues", "/dashboard/queues", "Queues"),
        ("keys", "/dashboard/keys", "Keys"),
        ("webhooks", "/dashboard/webhooks", "Webhooks"),
        ("audit", "/dashboard/audit", "Audit"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(chrome.title))
            body data-events=(events_url(chrome.events_at)) {
                header.top {
                    a.brand href="/dashboard" { span.logo aria-hidden="true" { "◆" } " Free Agent" }
                    nav aria-label="Main" {
                        @for (key, href, label) in nav.into_iter().filter(|n| !matches!(n.0, "keys" | "webhooks" | "audit") || chrome.role == "admin") {
                            a href=(href) aria-current=[(key == chrome.nav).then_some("page")] { (label) }
                        }
                    }
                    span #live .live.connecting role="status" aria-live="polite" { "Connecting…" }
                    span.who #signed-in data-role=(chrome.role) { (chrome.who) " · " (chrome.role) }
                    form.logout method="post" action="/dashboard/logout" {
                        input type="hidden" name="csrf" value=(chrome.csrf);
                        button.btn.ghost type="submit" { "Log out" }
                    }
                }
                main {
                    @if let Some(notice) = chrome.notice { p.flash.ok role="status" { (notice) } }
                    @if let Some(error) = chrome.error { p.flash.bad role="alert" { (error) } }
                    (content)
                }
            }
        }
    }
}

/// A region refreshed from `url` when an event matching `topics` arrives.
pub fn region(id: &str, url: &str, topics: &str, content: Markup) -> Markup {
    html! {
        div.region id=(id) data-topics=(topics) hx-get=(url) hx-trigger="refresh" hx-swap="innerHTML" {
            (content)
        }
    }
}

/// The sign-in form.
pub fn login(error: Option<&str>, next: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Sign in"))
            body.login {
                main.login-card {
                    h1 { span.logo aria-hidden="true" { "◆" } " Expo Free Agent" }
                    p.muted { "Controller dashboard. Sign in with the admin API key." }
                    @if let Some(error) = error { p.flash.bad role="alert" { (error) } }
                    form method="post" action="/dashboard/login" {
                        @if let Some(next) = next { input type="hidden" name="next" value=(next); }
                        label for="key" { "API key (viewer, operator or admin)" }
                        input #key type="password" name="key" autocomplete="current-password" required autofocus;
                        button.btn.primary type="submit" { "Sign in" }
                    }
                }
            }
        }
    }
}

/// An error as a small HTML page.
pub fn error_page(error: ApiError) -> Response {
    let status = error.status();
    if status.is_server_error() {
        tracing::warn!(status = status.as_u16(), "dashboard request failed");
    }
    let body = html! {
        (DOCTYPE)
        html lang="en" {
            (head("Error"))
            body.login {
                main.login-card {
                    h1 { (status.as_u16()) }
                    p { (error.message()) }
                    p { a href="/dashboard" { "Back to the dashboard" } }
                }
            }
        }
    };
    (status, body).into_response()
}

/// A 404 page.
pub fn not_found(what: &'static str) -> Response {
    error_page(ApiError::new(StatusCode::NOT_FOUND, what))
}

// ---------- formatting ----------

pub fn pill(state: &str) -> Markup {
    html! { span class={ "pill " (state) } { (state) } }
}

fn short(id: &str) -> &str {
    id.get(..10).unwrap_or(id)
}

pub fn build_link(id: &str) -> Markup {
    html! { a.mono href={ "/dashboard/builds/" (id) } title=(id) { (short(id)) } }
}

/// A worker by its name (the id on hover), linking to its page.
pub fn worker_link(id: Option<&str>, names: &Names) -> Markup {
    html! {
        @match id {
            Some(id) => @match names.get(id) {
                Some(name) => a.worker href={ "/dashboard/workers/" (id) } title={ "Worker id " (id) } { (name) },
                None => a.mono href={ "/dashboard/workers/" (id) } title=(id) { (short(id)) },
            },
            None => span.muted { "—" },
        }
    }
}

/// An error message in a list: its first line (capped), the whole message on expand.
pub fn error_cell(message: Option<&str>) -> Markup {
    const CAP: usize = 120;
    html! {
        @match message.map(str::trim).filter(|m| !m.is_empty()) {
            None => span.muted { "—" },
            Some(m) => {
                @let first = m.lines().next().unwrap_or("");
                @if first.len() == m.len() && first.chars().count() <= CAP {
                    span.error-text { (m) }
                } @else {
                    details.error-text {
                        summary { (first.chars().take(CAP).collect::<String>()) @if first.chars().count() > CAP { "…" } @else { " …" } }
                        pre.error-full { (m) }
                    }
                }
            }
        }
    }
}

/// `3m 12s`, `2h 05m`, `4d 3h`.
pub fn span_of(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn ago(at: DateTime<Utc>, now: DateTime<Utc>) -> Markup {
    let secs = (now - at).num_seconds();
    let text = if secs < 0 {
        format!("in {}", span_of(-secs))
    } else {
        format!("{} ago", span_of(secs))
    };
    html! { time datetime=(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)) title=(at.format("%Y-%m-%d %H:%M:%S UTC")) { (text) } }
}

fn maybe_ago(at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Markup {
    html! { @match at { Some(at) => (ago(at, now)), None => span.muted { "—" } } }
}

pub fn bytes(n: i64) -> String {
    let n = n.max(0) as f64;
    if n < 1024.0 {
        format!("{n} B")
    } else if n < 1024.0 * 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else if n < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / 1024.0 / 1024.0)
    } else {
        format!("{:.2} GiB", n / 1024.0 / 1024.0 / 1024.0)
    }
}

fn thousands(n: i64) -> String {
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// How long the build ran: the running attempt's time while held, the last run's once final, nothing
/// while it waits (a requeued or retrying build's earlier attempt is not "running").
fn elapsed(b: &Build, now: DateTime<Utc>) -> String {
    let state = b.state();
    match (b.started_at.or(b.assigned_at), b.completed_at) {
        (Some(start), Some(end)) if state.is_final() => span_of((end - start).num_seconds()),
        (Some(start), _) if state.is_held() => span_of((now - start).num_seconds()),
        _ => "—".to_string(),
    }
}

fn platform(p: &str) -> Markup {
    html! { span class={ "platform " (p) } { @if p == "ios" { "iOS" } @else { "Android" } } }
}

/// A POST form with the CSRF token, a confirmation question and one labelled button.
/// An action button; none when `csrf` is empty (the role may not act).
fn action(url: &str, csrf: &str, label: &str, confirm: &str, class: &str) -> Markup {
    if csrf.is_empty() {
        return html! {};
    }
    html! {
        form.inline method="post" action=(url) data-confirm=(confirm) {
            input type="hidden" name="csrf" value=(csrf);
            button type="submit" class={ "btn " (class) } { (label) }
        }
    }
}

// ---------- overview ----------

pub fn overview(o: &Overview, names: &Names, now: DateTime<Utc>) -> Markup {
    let last_hour = o.hours.last();
    let day = o.hours.iter().fold((0, 0, 0), |acc, h| {
        (acc.0 + h.completed, acc.1 + h.failed, acc.2 + h.cancelled)
    });
    let rate = |done: i64, failed: i64| {
        if done + failed == 0 {
            "—".to_string()
        } else {
            format!("{:.0} %", failed as f64 * 100.0 / (done + failed) as f64)
        }
    };
    // Idle counts only Macs that can take work (active); busy and offline count every Mac not revoked.
    let count = |status: &str| {
        o.workers
            .iter()
            .filter(|w| w.0 == status && w.1 != "revoked" && (status != "idle" || w.1 == "active"))
            .map(|w| w.2)
            .sum::<i64>()
    };
    let admin = |state: &str| o.workers.iter().filter(|w| w.1 == state).map(|w| w.2).sum::<i64>();
    // A drain is finished once the Mac holds no build.
    let draining = o
        .workers
        .iter()
        .filter(|w| w.1 == "draining" && w.0 == "busy")
        .map(|w| w.2)
        .sum::<i64>();
    let drained = admin("draining") - draining;
    html! {
        div.page-head {
            h1 { "Overview" }
            p.muted { "≈ " (thousands(o.total_estimate)) " builds on record" }
        }
        section.cards {
            @for q in &o.queues {
                article.card {
                    h2 { span { (platform(&q.name)) " queue" } @if q.paused { span.pill.paused { "paused" } } }
                    dl.stats {
                        div { dt { "Pending" } dd { (q.pending) } }
                        div { dt { "Scheduled" } dd { (q.scheduled) } }
                        div { dt { "Retrying" } dd { (q.retryable) } }
                        div { dt { "Running" } dd { (q.assigned + q.building) } }
                    }
                    p.muted { "Oldest pending: "
                        @match q.oldest_pending_age_seconds { Some(age) => strong { (span_of(age as i64)) }, None => "none" } }
                    @if let Some(reasons) = o.waiting.get(&q.name).filter(|r| r.values().any(|n| *n > 0)) {
                        ul.waiting aria-label="Why builds wait" {
                            @for (reason, n) in reasons.iter().filter(|(_, n)| **n > 0) {
                                li title=(crate::queue::waiting_sentence(reason)) { span.mono { (reason) } " " strong { (n) } }
                            }
                        }
                    }
                }
            }
            article.card {
                h2 { "Workers" }
                dl.stats {
                    div { dt { "Idle" } dd { (count("idle")) } }
                    div { dt { "Busy" } dd { (count("busy")) } }
                    div { dt { "Offline" } dd { (count("offline")) } }
                    div { dt { "Draining" } dd { (draining) } }
                }
                p.muted { (drained) " drained · " (admin("disabled")) " disabled · " (admin("quarantined")) " quarantined · " (admin("revoked")) " revoked" }
            }
        }
        section.cards.wide {
            article.card.grow {
                h2 { "Throughput, last 24 hours" }
                div.legend {
                    span.key.completed { "completed" } span.key.failed { "failed" } span.key.cancelled { "cancelled" }
                }
                (charts::throughput(&o.hours))
                dl.stats {
                    div { dt { "Last hour" } dd { (last_hour.map_or(0, |h| h.completed)) " done" } }
                    div { dt { "Failure rate (1 h)" } dd { (last_hour.map_or("—".into(), |h| rate(h.completed, h.failed))) } }
                    div { dt { "Last 24 h" } dd { (day.0) " done" } }
                    div { dt { "Failure rate (24 h)" } dd { (rate(day.0, day.1)) } }
                }
            }
            article.card.grow {
                h2 { "Needs attention" }
                @if o.silent.is_empty() && o.past_deadline.is_empty() && o.retries_waiting.is_empty() {
                    p.empty { "Nothing stuck. Every running build is reporting in." }
                }
                @if !o.silent.is_empty() {
                    h3 { "No heartbeat for " (span_of(o.stale_after.num_seconds())) "+" }
                    ul.attention { @for b in &o.silent { li { (build_link(&b.id)) " on " (worker_link(b.lease_owner.as_deref(), names)) " · last heard " (maybe_ago(b.last_heartbeat_at.or(b.assigned_at), now)) } } }
                }
                @if !o.past_deadline.is_empty() {
                    h3 { "Past the build deadline" }
                    ul.attention { @for b in &o.past_deadline { li { (build_link(&b.id)) " running for " (elapsed(b, now)) } } }
                }
                @if !o.retries_waiting.is_empty() {
                    h3 { "Retries waiting" }
                    ul.attention { @for b in &o.retries_waiting { li { (build_link(&b.id)) " attempt " (b.attempt + 1) "/" (b.max_attempts) " · next run " (ago(b.run_at, now)) } } }
                }
            }
        }
        section.card {
            h2 { "Running now" }
            @if o.running.is_empty() { p.empty { "No build is running." } } @else {
                div.table-wrap { table {
                    thead { tr { th { "Build" } th { "Platform" } th { "State" } th { "Worker" } th { "Progress" } th { "Elapsed" } } }
                    tbody { @for b in &o.running { tr {
                        td { (build_link(&b.id)) } td { (platform(&b.queue)) } td { (pill(&b.state)) }
                        td { (worker_link(b.lease_owner.as_deref(), names)) } td { (progress(b.progress)) } td { (elapsed(b, now)) }
                    } } }
                } }
            }
        }
        section.card {
            h2 { "Recent failures" }
            @if o.recent_failures.is_empty() { p.empty { "No failed builds." } } @else {
                div.table-wrap { table {
                    thead { tr { th { "Build" } th { "Platform" } th { "Worker" } th { "Failed" } th { "Reason" } th { "Error" } } }
                    tbody { @for b in &o.recent_failures { tr {
                        td { (build_link(&b.id)) } td { (platform(&b.queue)) } td { (worker_link(b.worker_id.as_deref(), names)) }
                        td { (maybe_ago(b.completed_at, now)) }
                        td { (b.finished_reason.as_deref().unwrap_or("")) }
                        td.reason { (error_cell(b.error_message.as_deref())) }
                    } } }
                } }
            }
        }
    }
}

fn progress(p: Option<i16>) -> Markup {
    html! {
        @match p {
            Some(p) => span.progress { progress max="100" value=(p) { (p) "%" } " " (p) "%" },
            None => span.muted { "—" },
        }
    }
}

// ---------- builds ----------

pub const STATES: [&str; 8] = [
    "pending",
    "scheduled",
    "retryable",
    "assigned",
    "building",
    "completed",
    "failed",
    "cancelled",
];

pub fn builds_page(filter: &Filter, query: &str, table: Markup, csrf: &str) -> Markup {
    let sel = |v: Option<&String>, want: &str| v.is_some_and(|v| v == want);
    let hours = filter.within_hours;
    html! {
        div.page-head { h1 { "Builds" } }
        form.filters method="get" action="/dashboard/builds" role="search" {
            label { "Build id" input type="search" name="id" value=[filter.id.as_deref()] placeholder="Id or its first characters"; }
            label { "State" select name="state" {
                option value="" { "Any state" }
                @for s in STATES { option value=(s) selected[sel(filter.state.as_ref(), s)] { (s) } }
            } }
            label { "Platform" select name="platform" {
                option value="" { "Any platform" }
                option value="ios" selected[sel(filter.platform.as_ref(), "ios")] { "iOS" }
                option value="android" selected[sel(filter.platform.as_ref(), "android")] { "Android" }
            } }
            label { "Worker" input type="text" name="worker" value=[filter.worker.as_deref()] placeholder="Name or id"; }
            label { "Submitted" select name="within" {
                option value="" { "Any time" }
                @for (h, text) in [(1, "Last hour"), (24, "Last 24 hours"), (168, "Last 7 days"), (720, "Last 30 days")] {
                    option value=(h) selected[hours == Some(h)] { (text) }
                }
            } }
            button.btn type="submit" { "Apply" }
            a.btn.ghost href="/dashboard/builds" { "Reset" }
        }
        // The page script names the action and the count in the confirmation, enables the buttons only
        // with something selected and offers only the actions that apply to the selection.
        @if !csrf.is_empty() {
        form #bulk method="post" action="/dashboard/builds/bulk" data-confirm="Apply this action to the selected builds?" {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="return" value={ "/dashboard/builds" @if !query.is_empty() { "?" (query) } };
            div.bulk-bar {
                label.compact { input #select-page type="checkbox"; " Select this page" }
                label.compact { input #select-matching type="checkbox" name="scope" value="matching"; " All matching the filter (up to 100)" }
                span.muted #bulk-count aria-live="polite" { "With selected:" }
                button.btn type="submit" name="action" value="cancel" { "Cancel" }
                button.btn type="submit" name="action" value="retry" { "Retry" }
            }
        }
        }
        (region("builds-table", &format!("/dashboard/builds?{}{}fragment=1", query, if query.is_empty() { "" } else { "&" }), "build.*", table))
    }
}

pub fn builds_table(
    rows: &[Build],
    more: bool,
    query_without_cursor: &str,
    first_page: bool,
    names: &Names,
    waiting: &[crate::queue::Waiting],
    now: DateTime<Utc>,
) -> Markup {
    let sep = if query_without_cursor.is_empty() { "" } else { "&" };
    let waiting_of = |id: &str| waiting.iter().find(|w| w.id == id);
    html! {
        div.table-wrap { table.builds {
            thead { tr {
                th scope="col" { span.sr-only { "Select" } }
                th scope="col" { "Build" } th scope="col" { "Platform" } th scope="col" { "State" }
                th scope="col" { "Priority" } th scope="col" { "Attempt" } th scope="col" { "Worker" }
                th scope="col" { "Submitted" } th scope="col" { "Duration" } th scope="col" { "Waiting" }
                th scope="col" { "Error" }
            } }
            tbody {
                @if rows.is_empty() { tr { td colspan="11" { p.empty { "No builds match." } } } }
                @for b in rows { tr data-build=(b.id) {
                    td { input type="checkbox" name="id" value=(b.id) form="bulk" data-state=(b.state) aria-label={ "Select build " (b.id) }; }
                    td { (build_link(&b.id)) } td { (platform(&b.queue)) } td { (pill(&b.state)) }
                    td { (b.priority) } td { (b.attempt) "/" (b.max_attempts) }
                    td { (worker_link(b.worker_id.as_deref(), names)) } td { (ago(b.submitted_at, now)) } td { (elapsed(b, now)) }
                    td.waiting {
                        @if let Some(w) = waiting_of(&b.id) {
                            span.mono title=(crate::queue::waiting_sentence(&w.reason)) { (w.reason) }
                            @if let Some(p) = w.position { " " span.muted { "#" (p + 1) } }
                        }
                    }
                    td.reason { @if b.state == "failed" || b.error_message.is_some() { (error_cell(b.error_message.as_deref())) } }
                } }
            }
        } }
        nav.pager aria-label="Pages" {
            @if !first_page { a.btn.ghost href={ "/dashboard/builds" @if !query_without_cursor.is_empty() { "?" (query_without_cursor) } } { "← Newest" } }
            @if more { @if let Some(last) = rows.last() {
                a.btn.ghost href={ "/dashboard/builds?" (query_without_cursor) (sep) "before=" (last.id) } { "Older →" }
            } }
        }
    }
}

// ---------- one build ----------

/// A search within the whole log: what was asked and the lines found.
pub struct LogSearch<'a> {
    pub needle: &'a str,
    pub found: &'a [LogLine],
}

pub fn build_page(
    page: &BuildPage,
    logs: &[LogLine],
    search: Option<LogSearch<'_>>,
    names: &Names,
    csrf: &str,
    now: DateTime<Utc>,
) -> Markup {
    let id = &page.build.id;
    let after = logs.last().map_or(0, |l| l.seq);
    let first = logs.first().map_or(0, |l| l.seq);
    html! {
        (region("build-summary", &format!("/dashboard/builds/{id}?fragment=1"), &format!("build:{id}"), build_summary(page, names, csrf, now)))
        section.card #log-card {
            div.log-head {
                h2 { "Log" }
                form.log-search method="get" action={ "/dashboard/builds/" (id) } role="search" {
                    label.sr-only for="log-q" { "Search the log" }
                    input #log-q type="search" name="q" value=[search.as_ref().map(|s| s.needle)] placeholder="Search the whole log";
                    button.btn type="submit" { "Search" }
                }
                a.btn.ghost href={ "/dashboard/builds/" (id) "/log.txt" } download { "Download log" }
            }
            @if let Some(search) = &search {
                div.log-results #log-results {
                    p.muted { (search.found.len()) @if search.found.len() >= 500 { "+" } " line(s) of the whole log contain “" (search.needle) "” · "
                        a href={ "/dashboard/builds/" (id) } { "Clear search" } }
                    div.log { (log_lines(search.found)) }
                }
            }
            @if first > 1 {
                button.btn.ghost #log-earlier type="button" data-before=(first) { "Load earlier lines" }
            }
            div #log.log role="log" aria-live="off" data-log={ "/dashboard/builds/" (id) "/logs" } data-after=(after) data-topics={ "build:" (id) } tabindex="0" {
                @if logs.is_empty() { p.empty.log-empty { "No log lines yet." } }
                (log_lines(logs))
            }
        }
    }
}

pub fn log_lines(lines: &[LogLine]) -> Markup {
    html! {
        @for l in lines {
            div class={ "line " (l.level) } data-seq=(l.seq) {
                span.seq { (l.seq) } span.ts { (l.ts.format("%H:%M:%S")) } span.lvl { (l.level) } span.msg { (ansi::render(&l.message)) }
            }
        }
    }
}

pub fn build_summary(page: &BuildPage, names: &Names, csrf: &str, now: DateTime<Utc>) -> Markup {
    let b = &page.build;
    let base = format!("/dashboard/builds/{}", b.id);
    let state = b.state();
    html! {
        div.page-head {
            h1 { "Build " span.mono { (b.id) } " " (pill(&b.state)) }
            div.actions {
                @if !state.is_final() { (action(&format!("{base}/cancel"), csrf, "Cancel", "Cancel this build?", "danger")) }
                @if matches!(b.state.as_str(), "failed" | "cancelled") { (action(&format!("{base}/retry"), csrf, "Retry", "Retry this build as a new attempt?", "")) }
                @if state.is_held() {
                    (action(&format!("{base}/requeue"), csrf, "Requeue", "Give this attempt back to the queue?", ""))
                    (action(&format!("{base}/requeue-drain"), csrf, "Requeue and drain worker", "Give this attempt back to the queue and drain its worker (it takes no new build)?", ""))
                }
                @if !state.is_held() && !state.is_final() && !csrf.is_empty() {
                    form.inline method="post" action={ (base) "/priority" } data-confirm="Change this build's priority?" {
                        input type="hidden" name="csrf" value=(csrf);
                        label.compact { "Priority " input type="number" name="priority" min="-100" max="100" value=(b.priority) required; }
                        button.btn type="submit" { "Set priority" }
                    }
                }
            }
        }
        section.cards {
            article.card {
                h2 { "Details" }
                dl.details {
                    dt { "Platform" } dd { (platform(&b.queue)) }
                    dt { "Priority" } dd { (b.priority) }
                    dt { "Attempt" } dd { (b.attempt) " of " (b.max_attempts) }
                    dt { "Worker" } dd { (worker_link(b.worker_id.as_deref(), names)) }
                    @if let Some(w) = &page.waiting {
                        dt { "Waiting" } dd #waiting-reason {
                            span.mono { (w.reason) } @if let Some(p) = w.position { " (#" (p + 1) " in line)" }
                            " — " (crate::queue::waiting_sentence(&w.reason))
                        }
                    }
                    // Progress and heartbeat belong to a running attempt: a waiting or failed build has none.
                    dt { "Progress" } dd { @if state.is_held() || b.state == "completed" {
                        (progress(b.progress)) @if let Some(stage) = &b.stage { " " span.muted { (stage) } }
                    } @else { span.muted { "—" } } }
                    dt { "Last heartbeat" } dd { @if state.is_held() { (maybe_ago(b.last_heartbeat_at, now)) } @else { span.muted { "—" } } }
                    dt { "Duration" } dd { (elapsed(b, now)) }
                    @if let Some(reason) = &b.finished_reason { dt { "Outcome" } dd { (reason) } }
                    @if let Some(message) = &b.error_message { dt { "Error" } dd.error { (message) } }
                }
            }
            article.card {
                h2 { "Timeline" }
                ol.timeline {
                    li { span.dot {} "Submitted " (ago(b.submitted_at, now)) }
                    @if b.run_at > b.submitted_at + chrono::Duration::seconds(1) && !state.is_final() { li { span.dot {} "Runs " (ago(b.run_at, now)) } }
                    @for a in &page.attempts {
                        li { span.dot {} "Attempt " (a.attempt) " assigned to " (worker_link(Some(&a.worker_id), names)) " " (ago(a.assigned_at, now)) }
                        @if let Some(at) = a.started_at { li { span.dot {} "Attempt " (a.attempt) " building " (ago(at, now)) } }
                        @if let Some(at) = a.finished_at { li { span class={ "dot " (a.outcome.as_deref().unwrap_or("")) } {} "Attempt " (a.attempt) " " (a.outcome.as_deref().unwrap_or("ended")) " " (ago(at, now)) } }
                    }
                    @if let Some(at) = b.completed_at { li { span class={ "dot " (b.state) } {} "Build " (b.state) " " (ago(at, now)) } }
                }
            }
            article.card {
                h2 { "Artifacts" }
                dl.details {
                    dt { "Source" }
                    dd { @if b.source_key.is_some() {
                        (bytes(b.source_size.unwrap_or(0))) " · " a href={ (base) "/download/source" } download { "Download source" }
                    } @else { span.muted { "removed" } } }
                    dt { "Result" }
                    dd { @if b.result_key.is_some() {
                        (bytes(b.result_size.unwrap_or(0))) " · " a href={ (base) "/download/result" } download { "Download result" }
                    } @else { span.muted { "none yet" } } }
                    @if let Some(sha) = &b.result_sha256 { dt { "SHA-256" } dd.mono.wrap { (sha) } }
                    dt { "Log lines" } dd { (b.log_seq) @if b.log_dropped > 0 { " (" (b.log_dropped) " dropped)" } }
                }
            }
        }
        section.card {
            h2 { "Attempts" }
            @if page.attempts.is_empty() { p.empty { "Not assigned yet." } } @else {
                div.table-wrap { table {
                    thead { tr { th { "#" } th { "Worker" } th { "Assigned" } th { "Started" } th { "Finished" } th { "Outcome" } th { "Error" } } }
                    tbody { @for a in &page.attempts { tr {
                        td { (a.attempt) } td { (worker_link(Some(&a.worker_id), names)) } td { (ago(a.assigned_at, now)) }
                        td { (maybe_ago(a.started_at, now)) } td { (maybe_ago(a.finished_at, now)) }
                        td { @match &a.outcome { Some(o) => (pill(o)), None => (pill("running")) } }
                        td.reason { (error_cell(a.error_message.as_deref())) }
                    } } }
                } }
            }
        }
        section.card {
            h2 { "CPU and memory" }
            (charts::resources(&page.samples))
        }
    }
}

// ---------- workers ----------

pub fn workers(rows: &[WorkerRow], csrf: &str, admin: bool, now: DateTime<Utc>) -> Markup {
    html! {
        div.table-wrap { table.workers {
            thead { tr {
                th scope="col" { "Worker" } th scope="col" { "Status" } th scope="col" { "Platforms" }
                th scope="col" { "Current build" } th scope="col" { "Last seen" } th scope="col" { "Done / failed" }
                th scope="col" { "Diagnostics" } th scope="col" { "Actions" }
            } }
            tbody {
                @if rows.is_empty() { tr { td colspan="8" { p.empty { "No worker has registered yet." } } } }
                @for r in rows {
                    @let w = &r.worker;
                    @let base = format!("/dashboard/workers/{}", w.id);
                    tr #{ "w-" (w.id) } data-worker=(w.id) {
                        td { a.worker href=(base) title={ "Worker id " (w.id) } { strong { (w.name) } } br; span.mono.muted { (short(&w.id)) } }
                        td { (status_cell(w, now)) }
                        td { @for p in &w.platforms { (platform(p)) " " } }
                        td { @match &r.current { Some((id, state)) => { (build_link(id)) " " (pill(state)) }, None => span.muted { "—" } } }
                        td { (ago(w.last_seen_at, now)) }
                        td { (w.builds_completed) " / " (w.builds_failed) }
                        td { @match &r.diagnostics {
                            Some(d) => details {
                                summary { (pill(&d.status)) " " (ago(d.run_at, now)) }
                                ul.checks { @for c in d.checks.0.as_array().into_iter().flatten() {
                                    li { (pill(c.get("status").and_then(|s| s.as_str()).unwrap_or("unknown"))) " "
                                         (c.get("name").and_then(|s| s.as_str()).unwrap_or("check"))
                                         @if let Some(m) = c.get("message").and_then(|s| s.as_str()) { " — " span.muted { (m) } } }
                                } }
                            },
                            None => span.muted { "none" },
                        } }
                        td.actions { (worker_actions(w, csrf, admin, now)) }
                    }
                }
            }
        } }
    }
}

// ---------- keys ----------

/// Every key (never a secret), the form to create one, and a new key's secret shown this once.
pub fn keys(list: &[crate::ops::keys::KeyView], csrf: &str, created: Option<&crate::ops::keys::CreatedKey>) -> Markup {
    html! {
        div.page-head { h1 { "Keys" } p.muted { "Give each volunteer, submitter and screen its own key with the least role that fits." } }
        @if let Some(created) = created {
            section.card #new-key role="status" {
                h2 { "Key " (created.name) " (" (created.role) ") created" }
                p { "Copy it now: it is shown this once and never again." }
                p { code #new-key-secret { (created.key) } }
            }
        }
        form.filters method="post" action="/dashboard/keys" data-confirm="Create this key?" {
            input type="hidden" name="csrf" value=(csrf);
            label { "Name" input type="text" name="name" maxlength="256" required; }
            label { "Role" select name="role" {
                @for role in ["worker", "submitter", "viewer", "operator", "admin"] { option value=(role) { (role) } }
            } }
            label { "Expires in (days)" input type="number" name="expires_in_days" min="1"; }
            label { input type="checkbox" name="enroll" value="1"; " Enrollment (one worker)" }
            button.btn.primary type="submit" { "Create key" }
        }
        div.table-wrap { table.keys {
            thead { tr {
                th scope="col" { "Name" } th scope="col" { "Role" } th scope="col" { "Prefix" } th scope="col" { "Expires" }
                th scope="col" { "Last used" } th scope="col" { "State" } th scope="col" { "Action" }
            } }
            tbody {
                @if list.is_empty() { tr { td colspan="7" { p.empty { "No keys yet: only the built-in admin key works." } } } }
                @for k in list { tr data-key=(k.id) {
                    td { (k.name) } td { (k.role) @if k.enroll { " (enrollment)" } } td.mono { (k.prefix) "…" }
                    td { (k.expires_at.as_deref().unwrap_or("never")) } td { (k.last_used_at.as_deref().unwrap_or("never")) }
                    td { @if k.revoked_at.is_some() { (pill("revoked")) } @else { (pill("active")) } }
                    td.actions { @if k.revoked_at.is_none() {
                        (action(&format!("/dashboard/keys/{}/revoke", k.id), csrf, "Revoke", &format!("Revoke {}? It stops working everywhere within 2 s.", k.name), "danger"))
                    } }
                } }
            }
        } }
    }
}

// ---------- webhooks ----------

/// The admin's Webhooks page: every subscription with its latest deliveries, a form to create one (its
/// secret shown on the answer, once), Test, Pause/Resume, Delete, Redeliver.
pub fn webhooks(
    list: &[(crate::webhooks::WebhookView, Vec<crate::webhooks::DeliveryView>)],
    csrf: &str,
    created: Option<&crate::webhooks::CreatedWebhook>,
) -> Markup {
    html! {
        div.page-head { h1 { "Webhooks" } p.muted { "Signed POSTs (Standard Webhooks) of build events to your URLs, retried for a day until answered 2xx." } }
        @if let Some(created) = created {
            section.card #new-webhook role="status" {
                h2 { "Webhook to " (created.url) " created" }
                p { "Copy its signing secret now: it is shown this once and never again." }
                p { code #new-webhook-secret { (created.secret) } }
            }
        }
        form.filters method="post" action="/dashboard/webhooks" data-confirm="Create this webhook?" {
            input type="hidden" name="csrf" value=(csrf);
            label { "URL" input type="url" name="url" maxlength="2048" placeholder="https://ci.example.com/hooks/expo" required; }
            label { "Events" input type="text" name="events" maxlength="512" value="build.completed,build.failed" required; }
            label { "Description" input type="text" name="description" maxlength="256"; }
            button.btn.primary type="submit" { "Create webhook" }
        }
        @if list.is_empty() { p.empty { "No webhooks yet." } }
        @for (w, deliveries) in list {
            section.card.webhook data-webhook=(w.id) {
                h2 { span.mono { (w.url) } " " @if w.active { (pill("active")) } @else { (pill("paused")) } }
                p.muted { (w.events.join(", ")) " · " (w.owner_name) " · created " (w.created_at)
                    @if !w.description.is_empty() { " · " (w.description) } }
                div.actions {
                    (action(&format!("/dashboard/webhooks/{}/test", w.id), csrf, "Send test", &format!("Send a webhook.test event to {}?", w.url), "primary"))
                    @if w.active {
                        (action(&format!("/dashboard/webhooks/{}/pause", w.id), csrf, "Pause", "Pause this webhook? Its deliveries wait until it is resumed.", "danger"))
                    } @else {
                        (action(&format!("/dashboard/webhooks/{}/resume", w.id), csrf, "Resume", "Resume this webhook?", "primary"))
                    }
                    (action(&format!("/dashboard/webhooks/{}/delete", w.id), csrf, "Delete", &format!("Delete the webhook to {} with its deliveries?", w.url), "danger"))
                }
                div.table-wrap { table.deliveries {
                    thead { tr {
                        th scope="col" { "Delivery" } th scope="col" { "Event" } th scope="col" { "Build" } th scope="col" { "State" }
                        th scope="col" { "Attempts" } th scope="col" { "Last answer" } th scope="col" { "Next try" } th scope="col" { "Action" }
                    } }
                    tbody {
                        @if deliveries.is_empty() { tr { td colspan="8" { p.empty { "No deliveries yet." } } } }
                        @for d in deliveries {
                            @let last = d.attempts.last();
                            tr data-delivery=(d.id) {
                                td.mono title=(d.message_id) { (d.id) }
                                td { (d.kind) }
                                td { @if let Some(b) = &d.build_id { (build_link(b)) } @else { span.muted { "—" } } }
                                td { (pill(&d.state)) }
                                td { (d.attempts.len()) }
                                td { @match last {
                                    Some(a) => {
                                        @if let Some(code) = a.status_code { "HTTP " (code) } @else { span.muted { "no answer" } }
                                        " · " (a.latency_ms) " ms"
                                        @if let Some(e) = &a.error { br; span.muted { (e) } }
                                    }
                                    None => span.muted { "—" },
                                } }
                                td { (d.next_attempt_at.as_deref().unwrap_or("—")) }
                                td.actions { @if d.state != "delivering" {
                                    (action(&format!("/dashboard/webhooks/deliveries/{}/redeliver", d.id), csrf, "Redeliver", "Send this delivery again (same message id)?", "primary"))
                                } }
                            }
                        }
                    }
                } }
            }
        }
    }
}

// ---------- queues ----------

pub fn queues(o: &[crate::queue::operator::QueueView], csrf: &str) -> Markup {
    html! {
        div.table-wrap { table.queues {
            thead { tr {
                th scope="col" { "Queue" } th scope="col" { "Status" } th scope="col" { "Pending" } th scope="col" { "Scheduled" }
                th scope="col" { "Retrying" } th scope="col" { "Running" } th scope="col" { "Oldest pending" } th scope="col" { "Action" }
            } }
            tbody { @for q in o {
                tr data-queue=(q.name) {
                    td { (platform(&q.name)) }
                    td { @if q.paused { (pill("paused")) } @else { (pill("active")) } }
                    td { (q.pending) } td { (q.scheduled) } td { (q.retryable) } td { (q.assigned + q.building) }
                    td { @match q.oldest_pending_age_seconds { Some(a) => (span_of(a as i64)), None => span.muted { "—" } } }
                    td.actions {
                        @if q.paused {
                            (action(&format!("/dashboard/queues/{}/resume", q.name), csrf, "Resume", &format!("Resume the {} queue?", q.name), "primary"))
                        } @else {
                            (action(&format!("/dashboard/queues/{}/pause", q.name), csrf, "Pause", &format!("Pause the {} queue? Workers take no new {} builds until it is resumed.", q.name, q.name), "danger"))
                        }
                    }
                }
            } }
        } }
    }
}

// ---------- one worker ----------

/// The administrative state as the operator reads it: a drain is finished ("drained") once the Mac holds
/// no build.
fn admin_label(w: &crate::queue::Worker) -> &str {
    if w.admin_state == "draining" && w.status != "busy" {
        "drained"
    } else {
        &w.admin_state
    }
}

/// A worker's status, administrative state and health (quarantine, probation).
fn status_cell(w: &crate::queue::Worker, now: DateTime<Utc>) -> Markup {
    html! {
        (pill(&w.status)) @if w.admin_state != "active" { " " (pill(admin_label(w))) }
        @let health = w.health(now);
        @if health != "ok" {
            " " (pill(health))
            p.muted.health {
                @match w.quarantine_ends() {
                    Some(until) if health == "quarantined" => { "until " (until.format("%Y-%m-%d %H:%M UTC")) },
                    Some(_) => { "probation: one build to prove itself" },
                    None => { "until a healthy diagnostics report or a release" },
                }
                @if let Some(reason) = w.quarantine_reason() { br; (reason) }
            }
        }
    }
}

/// A worker's actions, as the workers list offers them.
/// Actions appear only for roles that may use them: an empty `csrf` (a viewer) shows none, and Revoke
/// needs `admin`.
fn worker_actions(w: &crate::queue::Worker, csrf: &str, admin: bool, now: DateTime<Utc>) -> Markup {
    let base = format!("/dashboard/workers/{}", w.id);
    html! {
        @if w.admin_state == "revoked" { span.muted { "revoked" } } @else {
            @if w.admin_state == "active" {
                (action(&format!("{base}/drain"), csrf, "Drain", &format!("Drain {}? It finishes its current build and takes no new one.", w.name), ""))
                (action(&format!("{base}/disable"), csrf, "Disable", &format!("Disable {}?", w.name), ""))
            } @else {
                (action(&format!("{base}/enable"), csrf, "Enable", &format!("Enable {}?", w.name), ""))
            }
            @if w.health(now) != "ok" {
                (action(&format!("{base}/release"), csrf, "Release", &format!("Release {} from quarantine? It takes builds again and its record is cleared.", w.name), ""))
            }
            (action(&format!("{base}/revoke"), if admin { csrf } else { "" }, "Revoke", &format!("Revoke {}? Its token stops working and its build goes back to the queue.", w.name), "danger"))
        }
    }
}

/// What the capabilities say, with readable labels for the keys workers send.
fn capabilities(caps: &serde_json::Value) -> Vec<(String, String)> {
    let label = |key: &str| -> String {
        match key {
            "xcode_version" | "xcode_versions" | "xcode" => "Xcode".into(),
            "macos_version" | "macos" | "os_version" => "macOS".into(),
            "arch" => "Architecture".into(),
            "maxMemoryGB" | "memory_gb" => "Memory (GB)".into(),
            "maxCPUPercent" => "CPU limit (%)".into(),
            "maxConcurrentBuilds" => "Concurrent builds".into(),
            other => other.to_string(),
        }
    };
    let Some(map) = caps.as_object() else {
        return Vec::new();
    };
    map.iter()
        .filter(|(k, _)| k.as_str() != "platforms")
        .map(|(k, v)| {
            let value = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
                    .collect::<Vec<_>>()
                    .join(", "),
                other => other.to_string(),
            };
            (label(k), value)
        })
        .collect()
}

fn checks(report: &serde_json::Value) -> Markup {
    html! {
        ul.checks { @for c in report.as_array().into_iter().flatten() {
            li { (pill(c.get("status").and_then(|s| s.as_str()).unwrap_or("unknown"))) " "
                 (c.get("name").and_then(|s| s.as_str()).unwrap_or("check"))
                 @if let Some(m) = c.get("message").and_then(|s| s.as_str()) { " — " span.muted { (m) } } }
        } }
    }
}

pub fn worker_page(page: &WorkerPage, csrf: &str, admin: bool, now: DateTime<Utc>) -> Markup {
    let w = &page.worker;
    let count = |outcomes: &[&str]| {
        page.attempts
            .iter()
            .filter(|a| a.outcome.as_deref().is_some_and(|o| outcomes.contains(&o)))
            .count()
    };
    html! {
        div.page-head {
            h1 { (w.name) " " (pill(&w.status)) @if w.admin_state != "active" { " " (pill(admin_label(w))) } }
            div.actions { (worker_actions(w, csrf, admin, now)) }
        }
        p.muted { "Worker id " span.mono.copy title="Worker id" { (w.id) } }
        section.cards {
            article.card {
                h2 { "Details" }
                dl.details {
                    dt { "Status" } dd { (status_cell(w, now)) }
                    dt { "Platforms" } dd { @for p in &w.platforms { (platform(p)) " " } }
                    @for (label, value) in capabilities(&w.capabilities.0) { dt { (label) } dd { (value) } }
                    dt { "Registered" } dd { (ago(w.registered_at, now)) }
                    dt { "Last seen" } dd { (ago(w.last_seen_at, now)) }
                    dt { "Builds done / failed" } dd { (w.builds_completed) " / " (w.builds_failed) }
                }
            }
            article.card {
                h2 { "Current build" }
                @match &page.current {
                    Some((id, state, p, stage)) => p { (build_link(id)) " " (pill(state)) " " (progress(*p))
                        @if let Some(stage) = stage { " " span.muted { (stage) } } },
                    None => p.empty { "No build right now." },
                }
                h2 { "Last " (page.attempts.len()) " attempts" }
                dl.stats {
                    div { dt { "Completed" } dd { (count(&["completed"])) } }
                    div { dt { "Build failures" } dd { (count(&["build_failure"])) } }
                    div { dt { "Infrastructure" } dd { (count(&["infrastructure", "timeout"])) } }
                    div { dt { "Requeued / cancelled" } dd { (count(&["requeued", "cancelled"])) } }
                }
            }
        }
        section.card {
            h2 { "Recent attempts" }
            @if page.attempts.is_empty() { p.empty { "No build assigned yet." } } @else {
                div.table-wrap { table.attempts {
                    thead { tr { th { "Build" } th { "#" } th { "Platform" } th { "Assigned" } th { "Finished" } th { "Outcome" } th { "Kind" } th { "Error" } } }
                    tbody { @for a in &page.attempts { tr data-outcome=[a.outcome.as_deref()] {
                        td { (build_link(&a.build_id)) } td { (a.attempt) } td { (platform(&a.queue)) }
                        td { (ago(a.assigned_at, now)) } td { (maybe_ago(a.finished_at, now)) }
                        td { @match &a.outcome { Some(o) => (pill(o)), None => (pill("running")) } }
                        td { @match a.outcome.as_deref() {
                            Some("infrastructure" | "timeout") => span.kind.infra { "infrastructure" },
                            Some("build_failure") => span.kind.build { "build" },
                            _ => span.muted { "—" },
                        } }
                        td.reason { (error_cell(a.error_message.as_deref())) }
                    } } }
                } }
            }
        }
        section.card {
            h2 { "Diagnostics" }
            @if page.reports.is_empty() { p.empty { "No diagnostics report yet." } }
            @for (i, r) in page.reports.iter().enumerate() {
                details.report open[i == 0] {
                    summary { (pill(&r.status)) " " (ago(r.run_at, now)) " · " (r.duration_ms) " ms" @if r.auto_fixed { " · auto-fixed" } }
                    (checks(&r.checks.0))
                }
            }
        }
    }
}
