//! W1 (issue #24): webhook deliveries under the P12 load. One P12 run with 1 subscription, then
//! `BENCH_W1_PAIRS` pairs of runs with none and with 10 subscriptions (each to `build.completed` and
//! `build.failed`, what a submitter's CI listens to) to a healthy receiver on loopback in this process,
//! free-running and at one paced build rate: the delivery latency from the event's commit (its `at`) to
//! the receiver, p50/p99 (W1a: 1 subscription, W1: 10), and what the subscriptions cost per build
//! (controller and PostgreSQL CPU; W1c: at the same build rate, as a share of P12's CPU per build in the
//! same pair; W1c-free: the former measure, free-running), the median over the pairs (issue #25's
//! budget: ≤ 10 %). See [`w1`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::scenarios::Shared;
use crate::setup::{self, API_KEY, Controller, Env};
use crate::stats::{Row, Samples, median};

const SUBSCRIPTIONS: usize = 10;

type Received = Arc<Mutex<Samples>>;

async fn receive(State(received): State<Received>, body: Bytes) -> StatusCode {
    let at = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["at"].as_str().and_then(|a| DateTime::parse_from_rfc3339(a).ok()));
    if let (Some(at), Ok(mut samples)) = (at, received.lock()) {
        let latency = (Utc::now() - at.with_timezone(&Utc)).to_std().unwrap_or_default();
        samples.push(latency);
    }
    StatusCode::NO_CONTENT
}

/// What one P12 run with `n` subscriptions measured.
struct Measured {
    rate: f64,
    controller_ms: f64,
    postgres_ms: f64,
    samples: Samples,
}

impl Measured {
    fn cpu(&self) -> f64 {
        self.controller_ms + self.postgres_ms
    }
}

/// The loopback receiver and what every run shares.
struct Bench<'a> {
    env: &'a Env,
    /// `expo-bench`'s main controller: it runs a delivery loop too and claims some of the deliveries, so
    /// its CPU during a run is counted with the run's controller.
    main: &'a Controller,
    client: &'a reqwest::Client,
    port: u16,
    hook: String,
    received: Received,
    secs: u64,
}

impl Bench<'_> {
    /// One P12 run on a fresh controller with `subscriptions` subscriptions to the receiver; the
    /// deliveries of the run all arrive (or fail, named) before it returns.
    async fn run(&self, subscriptions: usize, pace: Option<f64>) -> anyhow::Result<Measured> {
        let (env, client) = (self.env, self.client);
        crate::drain(&env.pool).await?;
        sqlx::query("DELETE FROM webhook_subscriptions")
            .execute(&env.pool)
            .await?;
        let extra = [("CONTROLLER_WEBHOOK_ALLOW_PRIVATE", "true".to_string())];
        let (controller, _) = Controller::launch_with(env, client, self.port, &extra).await?;
        for _ in 0..subscriptions {
            let r = client
                .post(controller.url("/api/v2/webhooks"))
                .header("X-API-Key", API_KEY)
                .json(&json!({ "url": self.hook, "events": ["build.completed", "build.failed"] }))
                .send()
                .await?;
            anyhow::ensure!(r.status() == 201, "subscription refused: {}", r.text().await?);
        }
        if let Ok(mut samples) = self.received.lock() {
            *samples = Samples::default();
        }
        let shared: Shared = Arc::new((client.clone(), controller));
        // With pg_stat_statements preloaded: the statements and row writes of this run (printed below).
        let statements = subscriptions > 0 && crate::cycle::statement_stats_reset(&env.pool).await;
        let writes_before = delivery_writes(&env.pool).await;
        let main_before = self.main.cpu_secs();
        let (rate, controller_ms, postgres_ms) = crate::cycle::one_run(&shared, env, self.secs, pace).await?;
        // Over the window and the finishing of the builds still in flight: a slight overstatement.
        let main_ms = 1000.0 * (self.main.cpu_secs() - main_before) / (rate * self.secs as f64).max(1.0);
        let controller_ms = controller_ms + main_ms;
        // Every delivery of the run reaches the receiver before the latencies are read.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while std::time::Instant::now() < deadline {
            let open: i64 =
                sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE state IN ('pending', 'delivering')")
                    .fetch_one(&env.pool)
                    .await?;
            if open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if subscriptions > 0 {
            print_delivery_costs(&env.pool, statements, writes_before).await;
        }
        // Failed attempts (retries are the latency tail) are named before the database is drained.
        let failures: Vec<(String, i64)> = sqlx::query_as(
            "SELECT left(coalesce(error, 'no error'), 160), count(*) FROM webhook_attempts GROUP BY 1 ORDER BY 2 DESC LIMIT 5",
        )
        .fetch_all(&env.pool)
        .await?;
        for (error, count) in failures {
            eprintln!("W1 {subscriptions} subscriptions: {count} failed attempts: {error}");
        }
        let samples = self.received.lock().map(|s| s.clone()).unwrap_or_default();
        let offered = match pace {
            Some(pace) if rate < 0.95 * pace => format!("paced to {pace:.0} builds/s, NOT sustained"),
            Some(pace) => format!("paced to {pace:.0} builds/s"),
            None => "free-running".to_string(),
        };
        eprintln!(
            "W1 {subscriptions} subscriptions ({offered}): {rate:.0} builds/s, controllers {controller_ms:.2} ms/build \
             (main instance {main_ms:.2}), PostgreSQL {postgres_ms:.2} ms/build, {} deliveries, p50/p95/p99 {}",
            samples.0.len(),
            samples.summary()
        );
        drop(shared);
        sqlx::query("DELETE FROM webhook_subscriptions")
            .execute(&env.pool)
            .await?;
        Ok(Measured {
            rate,
            controller_ms,
            postgres_ms,
            samples,
        })
    }
}

/// Rows inserted, updated and HOT-updated in `webhook_deliveries` so far (the statistics collector's).
async fn delivery_writes(pool: &sqlx::PgPool) -> (i64, i64, i64) {
    let _ = sqlx::query("SELECT pg_stat_clear_snapshot()").execute(pool).await;
    sqlx::query_as(
        "SELECT n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'webhook_deliveries'",
    )
    .fetch_one(pool)
    .await
    .unwrap_or_default()
}

/// Per delivery of a run: its row writes (inserted, updated, of which HOT) and, with
/// pg_stat_statements, the statements by total time (calls and ms per delivery).
async fn print_delivery_costs(pool: &sqlx::PgPool, statements: bool, before: (i64, i64, i64)) {
    // The statistics collector reports a backend's counts when its transaction ends, at most every 500 ms.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let after = delivery_writes(pool).await;
    let inserted = (after.0 - before.0).max(1) as f64;
    eprintln!(
        "W1 row writes of webhook_deliveries: {} inserted, {:.2} updates per delivery, {:.2} of them HOT",
        after.0 - before.0,
        (after.1 - before.1) as f64 / inserted,
        (after.2 - before.2) as f64 / inserted,
    );
    if !statements {
        return;
    }
    let rows: Result<Vec<(i64, f64, f64, String)>, _> = sqlx::query_as(
        "SELECT calls, total_exec_time, mean_exec_time, regexp_replace(left(query, 120), '\\s+', ' ', 'g')
           FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
          ORDER BY total_exec_time DESC LIMIT 25",
    )
    .fetch_all(pool)
    .await;
    if let Ok(rows) = rows {
        eprintln!("W1 statements by total time (calls per delivery, ms per delivery, mean ms):");
        for (calls, total, mean, query) in rows {
            eprintln!(
                "  {:7.3}  {:7.4}  {mean:7.3}  {query}",
                calls as f64 / inserted,
                total / inserted
            );
        }
    }
}

/// One pair: the runs without and with subscriptions, free-running and at the paced rate.
struct Pair {
    free: (Measured, Measured),
    paced: (Measured, Measured),
}

impl Pair {
    /// The old measure: the extra CPU per build of the free-running runs as a share of the one without
    /// subscriptions (the 10-subscription run also runs fewer builds, so the per-second costs weigh more).
    fn free_share(&self) -> f64 {
        let (without, with) = &self.free;
        (with.cpu() - without.cpu()) / without.cpu().max(1e-9)
    }

    /// The extra CPU per build of the deliveries at one build rate (the paced runs).
    fn paced_extra(&self) -> f64 {
        self.paced.1.cpu() - self.paced.0.cpu()
    }

    /// W1c: [`Pair::paced_extra`] as a share of P12's CPU per build (the free-running run without
    /// subscriptions of the same pair).
    fn share(&self) -> f64 {
        self.paced_extra() / self.free.0.cpu().max(1e-9)
    }
}

/// The median over the pairs of one figure.
fn side(pairs: &[Pair], figure: impl Fn(&Pair) -> f64) -> f64 {
    median(pairs.iter().map(figure).collect())
}

/// The medians of `figure` over the pairs' runs without and with subscriptions, of the runs `of` picks
/// (free-running or paced).
fn sides(pairs: &[Pair], of: impl Fn(&Pair) -> &(Measured, Measured), figure: impl Fn(&Measured) -> f64) -> (f64, f64) {
    (side(pairs, |p| figure(&of(p).0)), side(pairs, |p| figure(&of(p).1)))
}

/// W1a (1 subscription, once), then `BENCH_W1_PAIRS` (default 3) pairs, each of four P12 runs: with 0 and
/// 10 subscriptions free-running (as fast as the cycle goes), then both again with the submits paced to
/// one rate. The order alternates (0 → 10 → 10 paced → 0 paced, then 10 → 0 → 0 paced → 10 paced, …), so
/// that a drift of the shared machine's load weighs on both sides alike. The paced rate is
/// `BENCH_W1_RATE` builds/s, or `BENCH_W1_PACE` (default 0.7) of the slower free-running run of the first
/// pair, the same for every pair: a rate both sides sustain, so both run the same builds per second and
/// the per-second costs (the event pump's reads, idle polls, PostgreSQL's background work) are spread
/// over the same builds.
///
/// **W1c** is the median over the pairs of the paced runs' extra CPU per build (10 subscriptions minus
/// none) as a share of P12's CPU per build (the free-running run without subscriptions of the same
/// pair). **W1c-free** is the former measure (the free-running runs' extra CPU per build as a share of
/// the run without subscriptions), printed beside it. W1's latencies are those of every 10-subscription
/// run. The controller CPU is that of both instances that deliver (the run's and `main`).
pub async fn w1(env: &Env, client: &reqwest::Client, main: &Controller) -> anyhow::Result<Vec<Row>> {
    let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<f64>().ok());
    let secs = number("BENCH_W1_SECS").map(|s| s as u64).unwrap_or(10).max(1);
    let pairs = number("BENCH_W1_PAIRS").map(|p| p as usize).unwrap_or(3).max(1);
    let fixed_rate = number("BENCH_W1_RATE").filter(|r| *r > 0.0);
    let pace_share = number("BENCH_W1_PACE").filter(|p| *p > 0.0).unwrap_or(0.7);
    let received: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = format!("http://{}/hook", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(received.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let bench = Bench {
        env,
        main,
        client,
        port: setup::http_port() + 5,
        hook,
        received,
        secs,
    };
    let measured = async {
        let one = bench.run(1, None).await?;
        let mut runs: Vec<Pair> = Vec::new();
        let mut rate = fixed_rate;
        for pair in 0..pairs {
            let order = if pair % 2 == 0 {
                [0, SUBSCRIPTIONS]
            } else {
                [SUBSCRIPTIONS, 0]
            };
            let mut free: [Option<Measured>; 2] = [None, None];
            for n in order {
                free[usize::from(n > 0)] = Some(bench.run(n, None).await?);
            }
            let [Some(without), Some(with)] = free else {
                anyhow::bail!("W1: a free-running run is missing");
            };
            let pace = *rate.get_or_insert(pace_share * without.rate.min(with.rate));
            let mut paced: [Option<Measured>; 2] = [None, None];
            for n in order.into_iter().rev() {
                paced[usize::from(n > 0)] = Some(bench.run(n, Some(pace)).await?);
            }
            let [Some(paced_without), Some(paced_with)] = paced else {
                anyhow::bail!("W1: a paced run is missing");
            };
            let pair_runs = Pair {
                free: (without, with),
                paced: (paced_without, paced_with),
            };
            eprintln!(
                "W1c pair {}: paced to {pace:.0} builds/s {:.2} → {:.2} ms CPU/build ({:+.2} ms = {:.1} % of P12's {:.2} \
                 ms/build at {:.0} builds/s); free-running {:.2} → {:.2} ms CPU/build ({:+.1} %, the old measure), \
                 load average {}",
                pair + 1,
                pair_runs.paced.0.cpu(),
                pair_runs.paced.1.cpu(),
                pair_runs.paced_extra(),
                100.0 * pair_runs.share(),
                pair_runs.free.0.cpu(),
                pair_runs.free.0.rate,
                pair_runs.free.0.cpu(),
                pair_runs.free.1.cpu(),
                100.0 * pair_runs.free_share(),
                std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
            );
            runs.push(pair_runs);
        }
        anyhow::Ok((one, runs, rate.unwrap_or_default()))
    }
    .await;
    server.abort();
    crate::drain(&env.pool).await?;
    let (one, runs, pace) = measured?;
    let latency_row = |id: &'static str, n: usize, samples: &Samples| {
        let p99 = samples.percentile(0.99);
        Row {
            id,
            scenario: format!(
                "webhook delivery, commit → healthy loopback receiver, under the P12 load ({n} subscription(s) to build.completed/failed; {} deliveries)",
                samples.0.len()
            ),
            figure: format!("p99 {}", crate::stats::ms(p99)),
            reference: "-".into(),
            ratio: "-".into(),
            latency: samples.summary(),
            target: "p99 ≤ 1 s",
            met: !samples.0.is_empty() && p99 <= Duration::from_secs(1),
        }
    };
    let mut all = Samples::default();
    for pair in &runs {
        all.extend(pair.free.1.samples.clone());
        all.extend(pair.paced.1.samples.clone());
    }
    let percent = |f: &dyn Fn(&Pair) -> f64| -> String {
        runs.iter()
            .map(|p| format!("{:+.1} %", 100.0 * f(p)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let share = side(&runs, Pair::share);
    let free_share = side(&runs, Pair::free_share);
    let extra = side(&runs, Pair::paced_extra);
    let free_extra = side(&runs, |p| p.free.1.cpu() - p.free.0.cpu());
    let p12 = side(&runs, |p| p.free.0.cpu());
    let (cpu0, cpu10) = sides(&runs, |p| &p.paced, |m| m.controller_ms);
    let (pg0, pg10) = sides(&runs, |p| &p.paced, |m| m.postgres_ms);
    let (rate0, rate10) = sides(&runs, |p| &p.paced, |m| m.rate);
    let (free_cpu0, free_cpu10) = sides(&runs, |p| &p.free, |m| m.controller_ms);
    let (free_pg0, free_pg10) = sides(&runs, |p| &p.free, |m| m.postgres_ms);
    let (free_rate0, free_rate10) = sides(&runs, |p| &p.free, |m| m.rate);
    // Both paced runs of every pair ran (about) the paced rate; else the two sides are not comparable.
    let sustained = runs
        .iter()
        .all(|p| p.paced.0.rate >= 0.9 * pace && p.paced.1.rate >= 0.9 * pace);
    Ok(vec![
        latency_row("W1a", 1, &one.samples),
        latency_row("W1", SUBSCRIPTIONS, &all),
        Row {
            id: "W1c",
            scenario: format!(
                "extra CPU per build of {SUBSCRIPTIONS} subscriptions at one build rate (0 and {SUBSCRIPTIONS} \
                 subscriptions, submits paced to {pace:.0} builds/s), {} pair(s) of {secs} s runs (per pair: {}); \
                 medians: controller CPU {cpu0:.2} → {cpu10:.2} ms/build, PostgreSQL CPU {pg0:.2} → {pg10:.2} \
                 ms/build, {rate0:.0} → {rate10:.0} builds/s{}; P12 (free-running, 0 subscriptions) {p12:.2} ms CPU/build",
                runs.len(),
                percent(&Pair::share),
                if sustained {
                    ""
                } else {
                    " (NOT sustained: the sides are not comparable)"
                }
            ),
            figure: format!("{extra:+.2} ms CPU/build (median)"),
            reference: "P12 CPU/build (free-running, 0 subscriptions, same pair)".into(),
            ratio: format!("{:.1} % of P12 (median of pairs)", 100.0 * share),
            latency: "-".into(),
            target: "≤ 10 % of P12 (#25)",
            met: !runs.is_empty() && sustained && share <= 0.1,
        },
        Row {
            id: "W1c-free",
            scenario: format!(
                "the former W1c: free-running runs, 0 → {SUBSCRIPTIONS} subscriptions (per pair: {}); medians: \
                 controller CPU {free_cpu0:.2} → {free_cpu10:.2} ms/build, PostgreSQL CPU {free_pg0:.2} → \
                 {free_pg10:.2} ms/build, {free_rate0:.0} → {free_rate10:.0} builds/s (fewer builds share the \
                 per-second costs)",
                percent(&Pair::free_share)
            ),
            figure: format!("{free_extra:+.2} ms CPU/build (median)"),
            reference: "P12 CPU/build (0 subscriptions, same pair)".into(),
            ratio: format!("{:.1} % of P12 (median of pairs)", 100.0 * free_share),
            latency: "-".into(),
            target: "report (the former measure)",
            met: true,
        },
    ])
}
