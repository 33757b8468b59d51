//! P10 (issue #13): a 300 MiB local artifact downloaded over loopback, whole and as a `Range`, against
//! nginx (Debian's, `sendfile on`) serving the very same file in the same run. Reports MiB/s, the
//! controller's CPU seconds per download (from /proc) and its RSS growth. Never fails on a time.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sqlx::PgPool;

use crate::scenarios::{Shared, claim_and_upload};
use crate::setup::{API_KEY, Env, http_port, insert_pending, insert_workers};
use crate::stats::Row;

const SIZE: u64 = 300 * 1024 * 1024;
const ROUNDS: usize = 3;
const MIB: f64 = 1024.0 * 1024.0;

/// Downloads `url` (with optional headers) `ROUNDS` times; returns the best MiB/s.
async fn best_rate(client: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> anyhow::Result<f64> {
    let mut best: f64 = 0.0;
    for _ in 0..ROUNDS {
        let mut request = client.get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let started = Instant::now();
        let response = request.send().await?;
        anyhow::ensure!(response.status().is_success(), "{url}: {}", response.status());
        let mut stream = response.bytes_stream();
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await {
            total += chunk?.len() as u64;
        }
        anyhow::ensure!(total == SIZE, "{url}: {total} bytes");
        best = best.max(SIZE as f64 / MIB / started.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// nginx on `port` serving `root`, in the foreground of a child process (no daemon, no master).
struct Nginx {
    child: Child,
}

impl Nginx {
    fn start(root: &Path, scratch: &Path, port: u16) -> anyhow::Result<Nginx> {
        std::fs::create_dir_all(scratch)?;
        let s = scratch.display();
        let config = format!(
            "daemon off; master_process off; worker_processes 1; pid {s}/nginx.pid; error_log {s}/error.log;
             events {{ worker_connections 64; }}
             http {{ access_log off; sendfile on; tcp_nopush on;
               client_body_temp_path {s}/body; proxy_temp_path {s}/proxy; fastcgi_temp_path {s}/fastcgi;
               uwsgi_temp_path {s}/uwsgi; scgi_temp_path {s}/scgi;
               server {{ listen 127.0.0.1:{port}; root {}; }} }}",
            root.display()
        );
        let path = scratch.join("nginx.conf");
        std::fs::write(&path, config)?;
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(scratch)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "nginx did not start on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Nginx { child })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn p10(shared: &Shared, pool: &PgPool, env: &Env) -> anyhow::Result<Vec<Row>> {
    let (client, controller) = &**shared;
    let workers = insert_workers(pool, "p10-", 1, "android").await?;
    insert_pending(pool, "p10b-", 1, "android").await?;
    let id = claim_and_upload(shared, &workers[0].1, SIZE).await?;
    let key: String = sqlx::query_scalar("SELECT result_key FROM builds WHERE id = $1")
        .bind(&id)
        .fetch_one(pool)
        .await?;
    let url = controller.url(&format!("/api/builds/{id}/download"));
    // Warm the page cache for both servers alike.
    best_rate(client, &url, &[("X-API-Key", API_KEY)]).await?;

    let (rss_before, _) = controller.rss_kib();
    let cpu_before = controller.cpu_secs();
    let whole = best_rate(client, &url, &[("X-API-Key", API_KEY)]).await?;
    let cpu_per_download = (controller.cpu_secs() - cpu_before) / ROUNDS as f64;
    let ranged = best_rate(client, &url, &[("X-API-Key", API_KEY), ("Range", "bytes=0-")]).await?;
    let (rss_after, _) = controller.rss_kib();
    let growth = rss_after.saturating_sub(rss_before) as f64 / 1024.0;

    let storage = env.root.join("storage");
    let reference = match Nginx::start(&storage, &env.root.join("nginx"), http_port() + 4) {
        Ok(_nginx) => Some(best_rate(client, &format!("http://127.0.0.1:{}/{key}", http_port() + 4), &[]).await?),
        Err(error) => {
            eprintln!("P10 reference not measured (nginx: {error}; apt-get install nginx-light)");
            None
        }
    };
    eprintln!(
        "P10 whole {whole:.0} MiB/s, range {ranged:.0} MiB/s, {cpu_per_download:.3} s CPU, +{growth:.1} MiB; nginx {reference:?}"
    );
    let (reference_text, ratio_text, ratio) = match reference {
        Some(r) => (
            format!("nginx sendfile {r:.0} MiB/s"),
            format!("{:.0} %", whole / r * 100.0),
            whole / r,
        ),
        None => ("nginx missing".to_string(), "-".to_string(), 1.0),
    };
    Ok(vec![
        Row {
            id: "P10",
            scenario: "300 MiB local artifact download over loopback (best of 3)".into(),
            figure: format!("{whole:.0} MiB/s, {cpu_per_download:.2} s CPU"),
            reference: reference_text,
            ratio: ratio_text,
            latency: "-".into(),
            target: "≥ 1 GiB/s, ≤ 0.25 s CPU, ≥ 70 % of nginx",
            met: whole >= 1024.0 && cpu_per_download <= 0.25 && ratio >= 0.7,
        },
        Row {
            id: "P10r",
            scenario: "the same as a Range request (bytes=0-, 206); RSS growth over all downloads".into(),
            figure: format!("{ranged:.0} MiB/s; +{growth:.1} MiB"),
            reference: format!("{whole:.0} MiB/s whole"),
            ratio: format!("{:.0} %", ranged / whole * 100.0),
            latency: "-".into(),
            target: "as fast as whole; RSS flat",
            met: ranged >= whole * 0.9 && growth <= 32.0,
        },
    ])
}
