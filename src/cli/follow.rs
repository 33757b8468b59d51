//! `builds logs [-f]` and `builds watch`: read a build until it is final, by polling (log lines by
//! sequence number, the build by id) at a fixed interval, in either mode.

use std::time::Duration;

use serde_json::Value;

use super::output;
use super::{Backend, Call, CliResult, Exit};

/// Lines asked for per request.
const LOG_PAGE: i64 = 1000;

fn is_final(build: &Value) -> bool {
    matches!(build["state"].as_str(), Some("completed" | "failed" | "cancelled"))
}

/// How a followed build ended.
fn ending(build: &Value) -> Exit {
    if build["state"] == "completed" {
        Exit::Ok
    } else {
        Exit::BuildFailed
    }
}

/// Every line after `after`, page by page; returns the last sequence number seen.
async fn drain_lines(
    backend: &Backend,
    id: &str,
    mut after: i64,
    mut each: impl FnMut(&Value),
) -> CliResult<(i64, usize)> {
    let mut count = 0;
    loop {
        let page = backend
            .call(&Call::Logs {
                id: id.to_string(),
                after,
                limit: LOG_PAGE,
            })
            .await?;
        let lines = page["logs"].as_array().cloned().unwrap_or_default();
        for line in &lines {
            each(line);
            after = after.max(line["seq"].as_i64().unwrap_or(after));
        }
        count += lines.len();
        if (lines.len() as i64) < LOG_PAGE {
            return Ok((after, count));
        }
    }
}

/// Prints the log as it is read, page by page (JSON: one object per log line, so `| head` or `| jq -c`
/// see lines at once; with `follow`, until the build is final).
pub async fn logs(
    backend: &Backend,
    id: &str,
    after: i64,
    follow: bool,
    every: Duration,
    json: bool,
) -> CliResult<Exit> {
    let print = |line: &Value| {
        if json {
            output::print_ndjson(line);
        } else {
            output::print_log_line(line);
        }
    };
    if !follow {
        drain_lines(backend, id, after, print).await?;
        return Ok(Exit::Ok);
    }
    let mut after = after;
    loop {
        // The state is read before the lines: a build seen final has posted every line the next read returns.
        let build = backend.call(&Call::ShowBuild(id.to_string())).await?;
        let (last, count) = drain_lines(backend, id, after, print).await?;
        after = last;
        if is_final(&build) && count == 0 {
            if !json {
                eprintln!("build {id} {}", build["state"].as_str().unwrap_or("finished"));
            }
            return Ok(ending(&build));
        }
        if !is_final(&build) {
            tokio::time::sleep(every).await;
        }
    }
}

/// Prints the build's state, progress and stage whenever they change, until it is final.
pub async fn watch(backend: &Backend, id: &str, every: Duration, json: bool) -> CliResult<Exit> {
    let mut last: Option<(Value, Value, Value)> = None;
    loop {
        let build = backend.call(&Call::ShowBuild(id.to_string())).await?;
        let now = (
            build["state"].clone(),
            build["progress"].clone(),
            build["stage"].clone(),
        );
        if last.as_ref() != Some(&now) {
            if json {
                output::print_ndjson(&build);
            } else {
                output::print_watch_line(&build);
            }
            last = Some(now);
        }
        if is_final(&build) {
            return Ok(ending(&build));
        }
        tokio::time::sleep(every).await;
    }
}
