//! P12 (issue #13): the full build cycle without heartbeats or log lines, as the TypeScript controller was
//! measured — 32 long-polling workers and 8 submitters, at most 64 builds in flight; each build is a
//! multipart submit of a 10 KiB source → claim → source download → multipart upload of a 10 KiB result
//! with `success=true` → status read. Several consecutive runs on one fresh controller (drift), the
//! controller's and PostgreSQL's CPU per build, an exactly-once check of every build, and a pgbench floor
//! of the same statements on the same PostgreSQL. Then the same with durability on (PostgreSQL
//! `fsync=on`, `synchronous_commit=on`, storage fsync on).

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::Semaphore;

use crate::scenarios::Shared;
use crate::setup::{self, API_KEY, Controller, Env};
use crate::stats::{Row, Samples};

const WORKERS: usize = 32;
const SUBMITTERS: usize = 8;
const IN_FLIGHT: usize = 64;
const FILE_BYTES: usize = 10 * 1024;
/// Clients of the pgbench floor (the controller's 32 workers + 8 submitters).
const PGBENCH_CLIENTS: usize = 40;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One timed run.
struct Run {
    builds: u64,
    seconds: f64,
    controller_cpu: f64,
    controller_sys: f64,
    rss_kib: u64,
    postgres_cpu: f64,
    /// CPU of this process (the load generator: 40 HTTP clients) during the run.
    client_cpu: f64,
    xacts: i64,
    samples: Samples,
}

impl Run {
    fn rate(&self) -> f64 {
        self.builds as f64 / self.seconds
    }
    fn per_build(&self, cpu: f64) -> f64 {
        1000.0 * cpu / (self.builds.max(1) as f64)
    }
}

/// What every build of every run did, for the exactly-once check.
#[derive(Default)]
struct Ledger {
    submitted: Vec<String>,
    /// The key that submitted each build (its status is read with it; a submitter key sees only its own
    /// builds). Builds submitted with the built-in admin key are not listed.
    owner: std::collections::HashMap<String, Arc<str>>,
    claimed: HashSet<String>,
    claimed_twice: u64,
    uploaded: HashSet<String>,
    uploaded_twice: u64,
}

/// The P12 rows: without durability (several runs, drift, pgbench floor), then with durability.
pub async fn p12(env: &Env, client: &reqwest::Client) -> anyhow::Result<Vec<Row>> {
    let runs = env_number("BENCH_P12_RUNS", 5).max(1) as usize;
    let secs = env_number("BENCH_P12_SECS", 20).max(1);
    // BENCH_P12_KEYS: the submitters' keys. 8 (default): each of the 8 submitters its own `submitter` key,
    // 8 submitters in fair-share terms (the "8 submitters"); 1: all 8 submit with the built-in
    // admin key (one submitter: every submit and claim updates the same fair-share row).
    let keys = env_number("BENCH_P12_KEYS", SUBMITTERS as u64).clamp(1, SUBMITTERS as u64) as usize;
    // BENCH_P12_WARMUP_SECS: a run of each side before the measured ones, not counted (the first run on
    // a fresh controller and database is cold: connections, plans, caches, the tables' first pages).
    let warmup = env_number("BENCH_P12_WARMUP_SECS", 3);
    let durable_runs = env_number("BENCH_P12_DURABLE_RUNS", 2) as usize;
    let mut rows = Vec::new();
    let port = setup::http_port() + 4;

    // BENCH_REFERENCE_BIN: an earlier controller build (`make bench BENCH_REFERENCE_REV=<rev>` builds
    // one), measured in the same run, run by run alternating with this one.
    let reference = std::env::var_os("BENCH_REFERENCE_BIN").map(std::path::PathBuf::from);
    if let Some(path) = &reference {
        anyhow::ensure!(path.is_file(), "BENCH_REFERENCE_BIN {} is not a file", path.display());
    }
    let series = Series {
        runs,
        secs,
        warmup,
        keys,
        label: "fast",
        reference: reference.as_deref(),
    };
    let fast = measure(env, client, port, &[], series).await?;
    rows.push(fast.row(
        "P12",
        "full cycle (submit → claim → source → result → status), fsync off",
    ));
    if durable_runs > 0 {
        setup::restart_database(env, true).await?;
        // The durable controller runs with the defaults: synchronous commit and storage fsync on.
        let extra = [
            ("CONTROLLER_DB_SYNCHRONOUS_COMMIT", "on".to_string()),
            ("CONTROLLER_STORAGE_FSYNC", "true".to_string()),
        ];
        let series = Series {
            runs: durable_runs,
            secs,
            warmup,
            keys,
            label: "durable",
            reference: None,
        };
        let outcome = measure(env, client, port, &extra, series).await;
        setup::restart_database(env, false).await?;
        rows.push(outcome?.row(
            "P12d",
            "full cycle, durable (PostgreSQL fsync + synchronous_commit on, storage fsync on)",
        ));
    }
    Ok(rows)
}

struct Measured {
    runs: Vec<Run>,
    /// The reference build's runs, each just before the run of the same index.
    reference: Vec<Run>,
    floor: Option<f64>,
    check: String,
    exact: bool,
    /// Which submitters' workload the runs measured (8 submitter keys, or the one built-in key).
    workload: String,
}

/// Medians and per-build costs of a series of runs.
struct Summary {
    rates: Vec<f64>,
    median: f64,
    drift: f64,
    cpu_ms: f64,
    pg_ms: f64,
    client_ms: f64,
    xacts: f64,
}

impl Summary {
    fn of(runs: &[Run]) -> Summary {
        let rates: Vec<f64> = runs.iter().map(Run::rate).collect();
        let median = crate::stats::median(rates.clone());
        let (min, max) = rates
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        let builds = runs.iter().map(|r| r.builds).sum::<u64>().max(1) as f64;
        let per_build = |f: fn(&Run) -> f64| 1000.0 * runs.iter().map(f).sum::<f64>() / builds;
        Summary {
            drift: max / min.max(1e-9),
            cpu_ms: per_build(|r| r.controller_cpu),
            pg_ms: per_build(|r| r.postgres_cpu),
            client_ms: per_build(|r| r.client_cpu),
            xacts: runs.iter().map(|r| r.xacts).sum::<i64>() as f64 / builds,
            rates,
            median,
        }
    }

    fn rates(&self) -> String {
        self.rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" / ")
    }
}

impl Measured {
    fn row(&self, id: &'static str, scenario: &str) -> Row {
        let ours = Summary::of(&self.runs);
        let Summary {
            median,
            drift,
            cpu_ms,
            pg_ms,
            client_ms,
            xacts,
            ..
        } = ours;
        // What this machine's cores allow when these three share them: CPU-seconds per second over the
        // CPU of one build (controller + PostgreSQL + load generator).
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let ceiling = 1000.0 * cores as f64 / (cpu_ms + pg_ms + client_ms).max(1e-9);
        let mut samples = Samples::default();
        for run in &self.runs {
            samples.extend(run.samples.clone());
        }
        let floor_ratio = self.floor.map(|f| median / f);
        let reference = (!self.reference.is_empty()).then(|| Summary::of(&self.reference));
        let ab = reference.as_ref().map(|r| median / r.median.max(1e-9));
        let met = if id == "P12" {
            ab.is_some_and(|r| r >= 1.4)
                && xacts <= 5.0
                && cpu_ms <= 1.0
                && pg_ms <= 2.0
                && drift <= 1.1 / 0.9
                && self.exact
        } else {
            self.exact
        };
        let floor = match self.floor {
            Some(f) => format!(
                "pgbench of our statements {f:.0} builds/s ({:.0} %)",
                100.0 * median / f
            ),
            None => "pgbench missing".into(),
        };
        Row {
            id,
            scenario: format!(
                "{scenario}; {}; runs {}; {xacts:.1} transactions/build; controller CPU {cpu_ms:.2} ms/build, \
                 PostgreSQL CPU {pg_ms:.2} ms/build, load generator CPU {client_ms:.2} ms/build ({cores}-core \
                 ceiling {ceiling:.0} builds/s); drift max/min {drift:.2}; {}",
                self.workload,
                ours.rates(),
                self.check
            ),
            figure: format!("{median:.0} builds/s"),
            reference: match &reference {
                Some(r) => format!(
                    "reference build (alternating runs {}): {:.0} builds/s, {:.1} transactions/build, controller \
                     CPU {:.2} ms/build, PostgreSQL CPU {:.2} ms/build; {floor}",
                    r.rates(),
                    r.median,
                    r.xacts,
                    r.cpu_ms,
                    r.pg_ms
                ),
                None => floor,
            },
            ratio: match (ab, floor_ratio) {
                (Some(ab), _) => format!("{ab:.2}× reference"),
                (None, Some(r)) => format!("{:.0} % of pgbench", 100.0 * r),
                (None, None) => "-".into(),
            },
            latency: samples.summary(),
            target: if id == "P12" {
                "≥ 1.4× the reference build (BENCH_REFERENCE_BIN), ≤ 5 transactions, ≤ 1.0 ms controller and \
                 ≤ 2.0 ms PostgreSQL CPU per build, runs within ±10 %, exactly once"
            } else {
                "report (durable figure); exactly once"
            },
            met,
        }
    }
}

/// The runs of one row: how many, how long, its label, and the reference build alternated with them.
struct Series<'a> {
    runs: usize,
    secs: u64,
    /// Seconds of the uncounted warm-up run of each side (0: none).
    warmup: u64,
    /// Submitter keys (1: the built-in admin key).
    keys: usize,
    label: &'a str,
    reference: Option<&'a Path>,
}

async fn measure(
    env: &Env,
    client: &reqwest::Client,
    port: u16,
    extra: &[(&str, String)],
    series: Series<'_>,
) -> anyhow::Result<Measured> {
    let Series {
        runs,
        secs,
        warmup,
        keys,
        label,
        reference,
    } = series;
    let pool = &env.pool;
    crate::drain(pool).await?;
    let mut statements = statement_stats_reset(pool).await;
    let (controller, _) = Controller::launch_with(env, client, port, extra).await?;
    let shared: Shared = Arc::new((client.clone(), controller));
    let tokens = register(&shared).await?;
    // The keys live in the shared database: both sides' submitters use the same ones.
    let keys = submitter_keys(&shared, keys).await?;
    let workload = match keys.len() {
        1 => format!("{SUBMITTERS} submitters on the one built-in admin key (BENCH_P12_KEYS=1)"),
        n => format!("{SUBMITTERS} submitters on {n} submitter keys"),
    };
    // The reference build runs beside it on the next port, with workers of its own; only one of the
    // two is driven at a time (the idle one runs its once-a-second clock stamp and its jobs).
    let other = match reference {
        Some(binary) => {
            let (controller, _) = Controller::launch_binary(env, client, port + 1, extra, Some(binary)).await?;
            let shared: Shared = Arc::new((client.clone(), controller));
            let tokens = register(&shared).await?;
            Some((shared, tokens))
        }
        None => None,
    };
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut done = Vec::new();
    let mut reference_runs = Vec::new();
    let mut last_builds = 0;
    if warmup > 0 {
        let warm = Duration::from_secs(warmup);
        if let Some((other_shared, tokens)) = &other {
            let _paused = Paused::stop(shared.1.pid());
            let run = cycles(other_shared, env, tokens, &keys, &ledger, warm).await?;
            report_warmup(&format!("{label} reference"), &run);
        }
        let paused = other.as_ref().map(|(other, _)| Paused::stop(other.1.pid()));
        let run = cycles(&shared, env, &tokens, &keys, &ledger, warm).await?;
        drop(paused);
        report_warmup(label, &run);
        statements = statement_stats_reset(pool).await;
    }
    for n in 0..runs {
        if let Some((other_shared, tokens)) = &other {
            // The idle controller is stopped while the other one is measured: its event pump and LISTEN
            // loop would otherwise read the outbox on the measured one's notifications, and those reads
            // would count as the measured controller's transactions, statements and PostgreSQL CPU.
            let _paused = Paused::stop(shared.1.pid());
            settle(pool).await;
            let run = cycles(other_shared, env, tokens, &keys, &ledger, Duration::from_secs(secs)).await?;
            report_run(&format!("{label} reference"), n, &run);
            reference_runs.push(run);
            // Statements per build are the last run's of this build alone.
            statements = statement_stats_reset(pool).await;
        }
        // BENCH_P12_PERF=<prefix>: `perf record` of the controller during each run, to
        // <prefix>-<label>-<n>.data (frame-pointer call graphs; BENCH_P12_PERF_DWARF=1 for DWARF ones).
        let perf = std::env::var("BENCH_P12_PERF").ok().and_then(|prefix| {
            let graph = match std::env::var("BENCH_P12_PERF_DWARF") {
                Ok(_) => ["-F", "99", "--call-graph", "dwarf,16384"],
                Err(_) => ["-F", "499", "--call-graph", "fp"],
            };
            std::process::Command::new("perf")
                .arg("record")
                .args(graph)
                .args(["-q", "-p", &shared.1.pid().to_string(), "-o"])
                .arg(format!("{prefix}-{label}-{}.data", n + 1))
                .args(["--", "sleep", &secs.to_string()])
                .stdout(std::process::Stdio::null())
                .spawn()
                .ok()
        });
        let paused = other.as_ref().map(|(other, _)| Paused::stop(other.1.pid()));
        settle(pool).await;
        let run = cycles(&shared, env, &tokens, &keys, &ledger, Duration::from_secs(secs)).await?;
        drop(paused);
        report_run(label, n, &run);
        if let Some(mut perf) = perf {
            let _ = tokio::task::spawn_blocking(move || perf.wait()).await;
        }
        last_builds = run.builds;
        done.push(run);
    }
    let builds: u64 = match other {
        Some(_) => last_builds,
        None => done.iter().map(|r| r.builds).sum(),
    };
    if statements {
        print_statements(pool, builds).await;
    }
    let (check, exact) = exactly_once(pool, &env.root, &ledger).await?;
    eprintln!("P12 {label} {check}");
    drop(shared);
    drop(other);
    crate::drain(pool).await?;
    let floor = pgbench_floor(env, secs.clamp(5, 10)).await;
    match &floor {
        Ok(f) => eprintln!("P12 {label} pgbench floor: {f:.0} builds/s with {PGBENCH_CLIENTS} clients"),
        Err(e) => eprintln!("P12 {label} pgbench floor not measured: {e:#}"),
    }
    crate::drain(pool).await?;
    Ok(Measured {
        runs: done,
        reference: reference_runs,
        floor: floor.ok(),
        check,
        exact,
        workload,
    })
}

fn report_warmup(label: &str, run: &Run) {
    eprintln!(
        "P12 {label} warm-up ({:.0} s, not counted): {:.0} builds/s (load {})",
        run.seconds,
        run.rate(),
        load_average()
    );
}

/// Before each measured run (both sides alike): the previous run's dead rows vacuumed and the statistics
/// refreshed, and a checkpoint, so that neither an autovacuum of the hot tables nor a checkpoint starts
/// in the middle of one run and not another. Its cost falls outside the measured window.
async fn settle(pool: &PgPool) {
    if std::env::var("BENCH_P12_SETTLE").is_ok_and(|v| v == "0") {
        return;
    }
    for statement in [
        "VACUUM (ANALYZE) builds, build_attempts, build_logs, events, submitter_shares, workers",
        "CHECKPOINT",
    ] {
        if let Err(e) = sqlx::query(statement).execute(pool).await {
            eprintln!("P12 settle ({statement}): {e}");
        }
    }
}

/// `count` fresh keys with role `submitter`, made through `POST /api/v2/keys` with the admin key; with
/// `count` 1, the built-in admin key alone (the single-submitter workload).
async fn submitter_keys(shared: &Shared, count: usize) -> anyhow::Result<Vec<Arc<str>>> {
    if count <= 1 {
        return Ok(vec![Arc::from(API_KEY)]);
    }
    let (client, controller) = &**shared;
    let tag = &expo_controller::ids::new_id()[..6];
    let mut keys = Vec::new();
    for n in 0..count {
        let answer = client
            .post(controller.url("/api/v2/keys"))
            .header("X-API-Key", API_KEY)
            .json(&json!({ "name": format!("p12-{tag}-submitter-{n}"), "role": "submitter" }))
            .send()
            .await?;
        let status = answer.status();
        let body: Value = answer.json().await?;
        let key = body["key"].as_str().unwrap_or_default();
        anyhow::ensure!(status == 201 && !key.is_empty(), "key creation failed: {status} {body}");
        keys.push(Arc::from(key));
    }
    Ok(keys)
}

fn report_run(label: &str, n: usize, run: &Run) {
    eprintln!(
        "P12 {label} run {}: {:.0} builds/s; controller CPU {:.2} ms/build ({:.2} system), RSS {:.1} MiB; \
         PostgreSQL CPU {:.2} ms/build; load generator CPU {:.2} ms/build; {:.1} transactions/build (load {})",
        n + 1,
        run.rate(),
        run.per_build(run.controller_cpu),
        run.per_build(run.controller_sys),
        run.rss_kib as f64 / 1024.0,
        run.per_build(run.postgres_cpu),
        run.per_build(run.client_cpu),
        run.xacts as f64 / run.builds.max(1) as f64,
        load_average(),
    );
}

/// One P12 run on `shared` for other rows (W1): its workers registered here, then `secs` of the full
/// cycle, its submits paced to `pace` builds/s when given (else as fast as the cycle goes). Builds/s,
/// controller and PostgreSQL CPU in ms per build.
pub async fn one_run(shared: &Shared, env: &Env, secs: u64, pace: Option<f64>) -> anyhow::Result<(f64, f64, f64)> {
    let tokens = register(shared).await?;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let keys = [Arc::from(API_KEY)];
    let run = cycles_paced(shared, env, &tokens, &keys, &ledger, Duration::from_secs(secs), pace).await?;
    Ok((
        run.rate(),
        run.per_build(run.controller_cpu),
        run.per_build(run.postgres_cpu),
    ))
}

async fn register(shared: &Shared) -> anyhow::Result<Vec<String>> {
    let (client, controller) = &**shared;
    let tag = &expo_controller::ids::new_id()[..6];
    let mut tokens = Vec::new();
    for n in 0..WORKERS {
        let body: Value = client
            .post(controller.url("/api/workers/register"))
            .header("X-API-Key", API_KEY)
            .json(&json!({ "name": format!("p12-{tag}-{n}"), "capabilities": { "platforms": ["ios"] } }))
            .send()
            .await?
            .json()
            .await?;
        let token = body["access_token"].as_str().unwrap_or_default().to_string();
        anyhow::ensure!(!token.is_empty(), "worker registration failed: {body}");
        tokens.push(token);
    }
    Ok(tokens)
}

/// One run: builds whose status was read within `duration`; afterwards every build still in flight is
/// finished (so none is lost), outside the measured window.
async fn cycles(
    shared: &Shared,
    env: &Env,
    tokens: &[String],
    keys: &[Arc<str>],
    ledger: &Arc<Mutex<Ledger>>,
    duration: Duration,
) -> anyhow::Result<Run> {
    cycles_paced(shared, env, tokens, keys, ledger, duration, None).await
}

/// [`cycles`], with the submits paced to `pace` builds/s in all when given (W1's fixed-rate runs): the
/// n-th submit of the run waits until n / `pace` seconds after the start (still at most `IN_FLIGHT`
/// builds in flight), so two runs at a rate both sustain offer the same load. Submitter `n` submits with
/// `keys[n % keys.len()]`.
async fn cycles_paced(
    shared: &Shared,
    env: &Env,
    tokens: &[String],
    keys: &[Arc<str>],
    ledger: &Arc<Mutex<Ledger>>,
    duration: Duration,
    pace: Option<f64>,
) -> anyhow::Result<Run> {
    let tickets = Arc::new(AtomicU64::new(0));
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let submitting = Arc::new(AtomicBool::new(true));
    let submitted = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let in_window = Arc::new(AtomicU64::new(0));
    let source = bytes::Bytes::from(vec![7u8; FILE_BYTES]);
    let result = bytes::Bytes::from(vec![1u8; FILE_BYTES]);

    let xacts_before = transactions(&env.pool).await?;
    let cpu_before = (shared.1.cpu_split(), postgres_cpu_secs(&env.root));
    let client_before = own_cpu_secs();
    let started = Instant::now();
    let stop = started + duration;

    let mut submitters = Vec::new();
    for n in 0..SUBMITTERS {
        let key = keys
            .get(n % keys.len().max(1))
            .cloned()
            .unwrap_or_else(|| Arc::from(API_KEY));
        let (shared, permits, submitting, submitted, ledger, source, tickets) = (
            shared.clone(),
            permits.clone(),
            submitting.clone(),
            submitted.clone(),
            ledger.clone(),
            source.clone(),
            tickets.clone(),
        );
        submitters.push(tokio::spawn(async move {
            let (client, controller) = &*shared;
            while submitting.load(Ordering::Relaxed) {
                let Ok(Ok(permit)) =
                    tokio::time::timeout(Duration::from_millis(100), permits.clone().acquire_owned()).await
                else {
                    continue;
                };
                if let Some(rate) = pace.filter(|r| *r > 0.0) {
                    let n = tickets.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep_until((started + Duration::from_secs_f64(n as f64 / rate)).into()).await;
                }
                let form = Form::new()
                    .text("platform", "ios")
                    .part("source", Part::stream(source.clone()).file_name("app.zip"));
                let answer = client
                    .post(controller.url("/api/builds/submit"))
                    .header("X-API-Key", &*key)
                    .multipart(form)
                    .send()
                    .await;
                let id = match answer {
                    Ok(r) if r.status().is_success() => r
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|b| b["id"].as_str().map(str::to_string)),
                    _ => None,
                };
                if let Some(id) = id {
                    // The permit comes back when a worker has read the build's final status.
                    permit.forget();
                    submitted.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut l) = ledger.lock() {
                        if &*key != API_KEY {
                            l.owner.insert(id.clone(), key.clone());
                        }
                        l.submitted.push(id);
                    }
                }
            }
        }));
    }

    let mut workers = Vec::new();
    for token in tokens {
        let token = token.clone();
        let (shared, permits, submitting, submitted, finished, in_window, ledger, result) = (
            shared.clone(),
            permits.clone(),
            submitting.clone(),
            submitted.clone(),
            finished.clone(),
            in_window.clone(),
            ledger.clone(),
            result.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            let give_up = stop + Duration::from_secs(30);
            loop {
                let idle = !submitting.load(Ordering::Relaxed)
                    && finished.load(Ordering::Relaxed) >= submitted.load(Ordering::Relaxed);
                if idle || Instant::now() > give_up {
                    break;
                }
                let t = Instant::now();
                match one_build(&shared, &token, &ledger, &result).await {
                    Ok(true) => {
                        finished.fetch_add(1, Ordering::Relaxed);
                        permits.add_permits(1);
                        if Instant::now() <= stop {
                            in_window.fetch_add(1, Ordering::Relaxed);
                            samples.push(t.elapsed());
                        }
                    }
                    Ok(false) => {}
                    Err(error) => {
                        eprintln!("P12 worker: {error:#}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            samples
        }));
    }

    tokio::time::sleep_until(stop.into()).await;
    let cpu_after = (shared.1.cpu_split(), postgres_cpu_secs(&env.root));
    let client_after = own_cpu_secs();
    let xacts_after = transactions(&env.pool).await?;
    let builds = in_window.load(Ordering::Relaxed);
    submitting.store(false, Ordering::Relaxed);
    for s in submitters {
        s.await?;
    }
    let mut samples = Samples::default();
    for w in workers {
        samples.extend(w.await?);
    }
    Ok(Run {
        builds,
        seconds: duration.as_secs_f64(),
        controller_cpu: (cpu_after.0.0 + cpu_after.0.1) - (cpu_before.0.0 + cpu_before.0.1),
        controller_sys: cpu_after.0.1 - cpu_before.0.1,
        rss_kib: shared.1.rss_kib().0,
        postgres_cpu: cpu_after.1 - cpu_before.1,
        client_cpu: client_after - client_before,
        xacts: xacts_after - xacts_before,
        samples,
    })
}

/// Claim (long poll) → source → result upload → status; true when the status read says `completed`.
async fn one_build(
    shared: &Shared,
    token: &str,
    ledger: &Mutex<Ledger>,
    result: &bytes::Bytes,
) -> anyhow::Result<bool> {
    let (client, controller) = &**shared;
    let poll: Value = client
        .get(controller.url("/api/workers/poll?wait=2"))
        .header("X-Worker-Token", token)
        .send()
        .await?
        .json()
        .await?;
    let Some(id) = poll["job"]["id"].as_str() else {
        return Ok(false);
    };
    if let Ok(mut l) = ledger.lock()
        && !l.claimed.insert(id.to_string())
    {
        l.claimed_twice += 1;
    }
    let build = |path: &str| controller.url(&format!("/api/builds/{id}/{path}"));
    let source = client
        .get(build("source"))
        .header("X-Worker-Token", token)
        .send()
        .await?;
    anyhow::ensure!(source.status() == 200, "source download: {}", source.status());
    let got = source.bytes().await?;
    anyhow::ensure!(got.len() == FILE_BYTES, "source of {} bytes", got.len());
    let form = Form::new()
        .text("build_id", id.to_string())
        .text("success", "true")
        .part("result", Part::stream(result.clone()).file_name("app.ipa"));
    let upload = client
        .post(controller.url("/api/workers/upload"))
        .header("X-Worker-Token", token)
        .multipart(form)
        .send()
        .await?;
    anyhow::ensure!(upload.status() == 200, "upload: {}", upload.status());
    upload.bytes().await?;
    // The status is read with the key that submitted the build (the built-in key when it was that one,
    // or in the rare case its submitter had not recorded the build yet).
    let mut owner: Option<Arc<str>> = None;
    if let Ok(mut l) = ledger.lock() {
        owner = l.owner.get(id).cloned();
        if !l.uploaded.insert(id.to_string()) {
            l.uploaded_twice += 1;
        }
    }
    let status: Value = client
        .get(build("status"))
        .header("X-API-Key", owner.as_deref().unwrap_or(API_KEY))
        .send()
        .await?
        .json()
        .await?;
    anyhow::ensure!(status["status"] == "completed", "status after upload: {status}");
    Ok(true)
}

/// Every submitted build completed once: one attempt, one stored result, claimed and uploaded once.
async fn exactly_once(pool: &PgPool, root: &Path, ledger: &Mutex<Ledger>) -> anyhow::Result<(String, bool)> {
    let (ids, claimed_twice, uploaded_twice) = {
        let l = ledger.lock().map_err(|_| anyhow::anyhow!("ledger poisoned"))?;
        (l.submitted.clone(), l.claimed_twice, l.uploaded_twice)
    };
    let (completed, multi_attempt): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'completed'),
                count(*) FILTER (WHERE attempt <> 1 OR result_attempt IS DISTINCT FROM 1)
         FROM builds WHERE id = ANY($1)",
    )
    .bind(&ids)
    .fetch_one(pool)
    .await?;
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM build_attempts WHERE build_id = ANY($1)")
        .bind(&ids)
        .fetch_one(pool)
        .await?;
    // Result objects per build: those under its directory, and the loose one its row names (a result
    // streamed to a spare key, results/<upload>.bin); a loose object no row names is one too many.
    let storage = root.join("storage");
    let result_keys: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT id, result_key FROM builds WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(pool)
            .await?;
    let loose_named: std::collections::HashSet<String> = result_keys
        .iter()
        .filter_map(|(_, key)| key.clone().filter(|k| k.starts_with("results/")))
        .collect();
    let mut results_twice = 0;
    for (id, key) in &result_keys {
        let mut results = std::fs::read_dir(storage.join("builds").join(id))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("result-"))
                    .count()
            })
            .unwrap_or(0);
        if key
            .as_deref()
            .is_some_and(|k| loose_named.contains(k) && storage.join(k).exists())
        {
            results += 1;
        }
        if results != 1 {
            results_twice += 1;
        }
    }
    results_twice += std::fs::read_dir(storage.join("results"))
        .map(|d| {
            d.flatten()
                .filter(|e| !loose_named.contains(&format!("results/{}", e.file_name().to_string_lossy())))
                .count()
        })
        .unwrap_or(0);
    let lost = ids.len() as i64 - completed;
    let claimed_twice = claimed_twice as i64 + multi_attempt + (attempts - ids.len() as i64).max(0);
    let uploaded_twice = uploaded_twice as i64 + results_twice as i64;
    let exact = lost == 0 && claimed_twice == 0 && uploaded_twice == 0;
    Ok((
        format!(
            "{} builds checked: {lost} lost, {claimed_twice} claimed twice, {uploaded_twice} uploaded twice",
            ids.len()
        ),
        exact,
    ))
}

/// Committed and rolled-back transactions of the bench database so far.
async fn transactions(pool: &PgPool) -> anyhow::Result<i64> {
    sqlx::query("SELECT pg_stat_clear_snapshot()").execute(pool).await?;
    Ok(sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

/// CPU seconds of the bench's PostgreSQL: the postmaster, its live children, and its reaped children.
fn postgres_cpu_secs(root: &Path) -> f64 {
    let pid_file = std::fs::read_to_string(root.join("pg").join("postmaster.pid")).unwrap_or_default();
    let Some(postmaster) = pid_file.lines().next().and_then(|l| l.trim().parse::<u32>().ok()) else {
        return 0.0;
    };
    let mut ticks = 0u64;
    if let Some(f) = stat_fields(postmaster) {
        ticks += f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        ticks += f.get(13).copied().unwrap_or(0) + f.get(14).copied().unwrap_or(0);
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(f) = stat_fields(pid)
                && f.get(1).copied() == Some(u64::from(postmaster))
            {
                ticks += f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
            }
        }
    }
    ticks as f64 / 100.0
}

/// CPU seconds (user + system) of this process so far.
fn own_cpu_secs() -> f64 {
    stat_fields(std::process::id()).map_or(0, |f| f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0))
        as f64
        / 100.0
}

/// The numeric fields of /proc/<pid>/stat after the command name (index 0 is the state, 1 the ppid).
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A controller stopped (`SIGSTOP`) until this is dropped (`SIGCONT`).
pub(crate) struct Paused(i32);

impl Paused {
    pub(crate) fn stop(pid: u32) -> Self {
        let pid = pid as i32;
        // SAFETY: kill(2) on the pid of a child this bench launched.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        Self(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: as in `stop`.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// Resets `pg_stat_statements` when the bench PostgreSQL preloads it (`PG_EXTRA_OPTS="-c
/// shared_preload_libraries=pg_stat_statements"`); false otherwise.
pub(crate) async fn statement_stats_reset(pool: &PgPool) -> bool {
    let created = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await
        .is_ok();
    created
        && sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(pool)
            .await
            .is_ok()
}

/// The statements of the runs, by calls per build (with pg_stat_statements only).
async fn print_statements(pool: &PgPool, builds: u64) {
    let rows: Result<Vec<(i64, f64, String)>, _> = sqlx::query_as(
        "SELECT calls, mean_exec_time, regexp_replace(left(query, 110), '\\s+', ' ', 'g')
         FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
         ORDER BY calls DESC LIMIT 20",
    )
    .fetch_all(pool)
    .await;
    if let Ok(rows) = rows {
        eprintln!("P12 statements (calls per build, mean ms):");
        for (calls, mean, query) in rows {
            eprintln!("  {:6.3}  {mean:6.3}  {query}", calls as f64 / builds.max(1) as f64);
        }
    }
}

/// The statements the controller runs for one build of this cycle, as one pgbench transaction (each
/// statement commits on its own, as the controller's do). Kept in step with `src/queue/`.
const PGBENCH_SCRIPT: &str = include_str!("p12_pgbench.sql");

/// Runs the pgbench floor: 40 clients, each a worker of its own, for `secs`; builds per second.
async fn pgbench_floor(env: &Env, secs: u64) -> anyhow::Result<f64> {
    let pool = &env.pool;
    sqlx::query(
        "INSERT INTO workers (id, name, platforms, status)
         SELECT 'pgbw-' || g, 'pgbench-' || g, ARRAY['ios'], 'idle' FROM generate_series(1, $1) g
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(PGBENCH_CLIENTS as i32)
    .execute(pool)
    .await?;
    sqlx::query("CREATE SEQUENCE IF NOT EXISTS pgbench_build_seq")
        .execute(pool)
        .await?;
    let script = env.root.join("p12_pgbench.sql");
    std::fs::write(&script, PGBENCH_SCRIPT)?;
    let pgbench = std::env::var("PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()) + "/pgbench";
    let mut command = std::process::Command::new(pgbench);
    command
        .args(["-n", "-M", "prepared", "-j", "2"])
        .args(["-c", &PGBENCH_CLIENTS.to_string(), "-T", &secs.to_string()])
        .args(["-h", "127.0.0.1", "-p", &setup::pg_port().to_string(), "-U", "postgres"])
        .arg("-f")
        .arg(&script)
        .arg("bench");
    let output = tokio::task::spawn_blocking(move || command.output()).await??;
    let text = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "pgbench failed: {}{}",
        text,
        String::from_utf8_lossy(&output.stderr)
    );
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no tps in pgbench output: {text}"))
}
