//! P8: 1 GiB up and down through the controller on S3 storage (the `s3s-fs` server of the tests, on
//! loopback), compared with a plain S3 client moving the same bytes straight to that server in the same
//! run; and the controller's RSS growth meanwhile. Skipped (reported) when s3s-fs is not installed.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};

use crate::scenarios::{PeakRss, Shared, claim_and_upload, download_owned};
use crate::setup::{Controller, Env, http_port, insert_pending, insert_workers};
use crate::stats::Row;

const GIB: u64 = 1 << 30;
const BUCKET: &str = "bench";
const ACCESS_KEY: &str = "bench-access";
const SECRET_KEY: &str = "bench-secret-0123456789";

/// The s3s-fs binary, as the tests find it.
fn s3s_fs() -> Option<PathBuf> {
    let path = std::env::var_os("S3S_FS_BIN").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/expo-controller-tools/bin/s3s-fs")
    });
    path.is_file().then_some(path)
}

struct S3Server(Child);

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn skipped(why: String) -> Row {
    Row {
        id: "P8",
        scenario: "1 GiB up + down through the controller on S3 vs a plain S3 client".into(),
        figure: format!("skipped: {why}"),
        reference: "-".into(),
        ratio: "-".into(),
        latency: "-".into(),
        target: "≥ 70 %; RSS ≤ 32 MiB",
        met: false,
    }
}

fn s3_port() -> u16 {
    http_port() + 2
}

/// Whether both sides sign request bodies (`BENCH_P8_SIGNED=1`). By default neither does: the
/// controller's own default over HTTPS, where a deployment's S3 lives (over plain HTTP, as to this
/// loopback server, it signs unless told otherwise); the plain client is configured the same way, so
/// the two sides stay comparable.
fn signed() -> bool {
    std::env::var("BENCH_P8_SIGNED").is_ok_and(|v| v == "1")
}

/// The S3 settings of both sides: the plain client's and the controller's.
fn s3_env() -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", s3_port())),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_UNSIGNED_PAYLOAD", (!signed()).to_string()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
    ]
}

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64().max(1e-9)
}

/// The reference: a plain S3 client (object_store, 8 MiB parts, 4 in flight) uploads and downloads 1 GiB.
async fn direct(store: &dyn ObjectStore) -> anyhow::Result<(Duration, Duration)> {
    let path = ObjectPath::from("direct/one-gib.bin");
    let chunk = Bytes::from(vec![0x5au8; 256 * 1024]);
    let started = Instant::now();
    let mut writer = WriteMultipart::new_with_chunk_size(store.put_multipart(&path).await?, 8 << 20);
    for _ in 0..(GIB / chunk.len() as u64) {
        writer.wait_for_capacity(4).await?;
        writer.put(chunk.clone());
    }
    writer.finish().await?;
    let up = started.elapsed();
    let started = Instant::now();
    let mut stream = store.get(&path).await?.into_stream();
    let mut total = 0u64;
    while let Some(part) = stream.next().await {
        total += part?.len() as u64;
    }
    anyhow::ensure!(total == GIB, "direct download got {total} bytes");
    let down = started.elapsed();
    store.delete(&path).await?;
    Ok((up, down))
}

/// One round: the plain client's and the controller's times for the same bytes, back to back.
struct Round {
    up: Duration,
    /// The controller's CPU time (user + system) during its upload.
    up_cpu: f64,
    down: Duration,
    direct_up: Duration,
    direct_down: Duration,
}

/// `BENCH_P8_ROUNDS` (default 3): rounds of plain client, then controller.
fn rounds() -> usize {
    std::env::var("BENCH_P8_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3)
}

/// The median round by `ratio`, with its ratio.
fn median_by(rounds: &[Round], ratio: impl Fn(&Round) -> f64) -> (f64, &Round) {
    let mut ranked: Vec<(f64, &Round)> = rounds.iter().map(|r| (ratio(r), r)).collect();
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
    ranked[ranked.len() / 2]
}

pub async fn p8(env: &Env, client: &reqwest::Client) -> anyhow::Result<Row> {
    let Some(binary) = s3s_fs() else {
        return Ok(skipped("s3s-fs not installed (scripts/s3s-fs.sh)".into()));
    };
    let root = env.root.join("s3");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join(BUCKET))?;
    let _server = S3Server(
        Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", &s3_port().to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", s3_port())).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "s3s-fs did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut builder = AmazonS3Builder::new().with_bucket_name(BUCKET);
    for (key, value) in s3_env() {
        builder = builder.with_config(key.to_ascii_lowercase().parse()?, value);
    }
    let store = builder.build()?;

    let mut extra = s3_env();
    extra.push(("CONTROLLER_STORAGE_URL", format!("s3://{BUCKET}/controller")));
    let (controller, _) = Controller::launch_with(env, client, http_port() + 1, &extra).await?;
    let shared: Shared = Arc::new((client.clone(), controller));
    let rounds = rounds();
    let workers = insert_workers(&env.pool, "p8-", 1, "android").await?;
    insert_pending(&env.pool, "p8b-", rounds as i64, "android").await?;
    let peak = PeakRss::start(&shared);
    // Rounds of the plain client and then the controller moving the same bytes back to back, so that
    // a change in the machine's load between the two halves of one measurement shows as a spread
    // between rounds rather than as the figure; the row reports the median round.
    let mut measured = Vec::new();
    for round in 0..rounds {
        let (direct_up, direct_down) = direct(&store).await?;
        let (started, cpu) = (Instant::now(), shared.1.cpu_secs());
        let id = claim_and_upload(&shared, &workers[0].1, GIB).await?;
        let (up, up_cpu) = (started.elapsed(), shared.1.cpu_secs() - cpu);
        let started = Instant::now();
        download_owned(&shared, &id, GIB).await?;
        let down = started.elapsed();
        eprintln!(
            "P8 round {}: up {up:?} (direct {direct_up:?}, controller CPU {up_cpu:.2} s), down {down:?} (direct {direct_down:?})",
            round + 1
        );
        measured.push(Round {
            up,
            up_cpu,
            down,
            direct_up,
            direct_down,
        });
        // The result stays under its build; the next round's upload claims the next build.
    }
    let growth = peak.growth_kib().await? as f64 / 1024.0;
    let up_rounds = median_by(&measured, |r| r.direct_up.as_secs_f64() / r.up.as_secs_f64());
    let down_rounds = median_by(&measured, |r| r.direct_down.as_secs_f64() / r.down.as_secs_f64());
    let (up_ratio, up, direct_up) = (up_rounds.0, up_rounds.1.up, up_rounds.1.direct_up);
    let mut cpus: Vec<f64> = measured.iter().map(|r| r.up_cpu).collect();
    cpus.sort_by(f64::total_cmp);
    let up_cpu = cpus[cpus.len() / 2];
    let bodies = if signed() { ", bodies signed" } else { "" };
    let (down_ratio, down, direct_down) = (down_rounds.0, down_rounds.1.down, down_rounds.1.direct_down);
    let spread = |f: fn(&Round) -> f64| {
        let all: Vec<String> = measured.iter().map(|r| format!("{:.0}", 100.0 * f(r))).collect();
        all.join("/")
    };
    let up_all = spread(|r| r.direct_up.as_secs_f64() / r.up.as_secs_f64());
    let down_all = spread(|r| r.direct_down.as_secs_f64() / r.down.as_secs_f64());
    eprintln!("P8 up {up:?} (direct {direct_up:?}), down {down:?} (direct {direct_down:?}), RSS +{growth:.1} MiB");
    Ok(Row {
        id: "P8",
        scenario: format!("1 GiB up, then down, through the controller on S3 (s3s-fs), {rounds} rounds"),
        figure: format!(
            "up {:.0} MiB/s ({up_cpu:.2} s controller CPU per GiB), down {:.0} MiB/s; RSS +{growth:.1} MiB{}",
            mib_per_s(GIB, up),
            mib_per_s(GIB, down),
            bodies
        ),
        reference: format!(
            "plain S3 client: up {:.0} MiB/s, down {:.0} MiB/s",
            mib_per_s(GIB, direct_up),
            mib_per_s(GIB, direct_down)
        ),
        ratio: format!(
            "{:.0} % / {:.0} % (median of {rounds}: up {up_all} %, down {down_all} %)",
            100.0 * up_ratio,
            100.0 * down_ratio
        ),
        latency: "-".into(),
        target: "up ≥ 90 %, down ≥ 70 %; RSS ≤ 32 MiB",
        met: up_ratio >= 0.9 && down_ratio >= 0.7 && growth <= 32.0,
    })
}
