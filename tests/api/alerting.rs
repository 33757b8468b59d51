//! The alerting rules and the Grafana dashboard that ship with the project (fleet-health.md, "Telling
//! operators"): every metric they name is one the controller exports, and promtool accepts the rules,
//! their unit tests and every dashboard query. promtool comes from the Debian package `prometheus`
//! (`.ci/run` installs it); outside CI (`CI` not `true`) a machine without it skips that check loudly.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::support::{API_KEY, TestApp};

fn docs(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join(path)
}

/// Every `expo_…` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("expo_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Every PromQL expression of the dashboard's panels.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(docs("grafana/expo-controller.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(queries.len() >= 10, "the dashboard has its panels");
    queries
}

/// The series the controller exports, from its `# TYPE` lines (histograms with their three series).
async fn exported(app: &TestApp) -> BTreeSet<String> {
    app.client.get(app.url("/health")).send().await.unwrap();
    let text = app
        .client
        .get(app.url("/metrics"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            names.insert(name.to_string());
            if kind == "histogram" || kind == "summary" {
                for suffix in ["_bucket", "_count", "_sum"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

#[tokio::test]
async fn alerts_and_dashboard_name_only_metrics_the_controller_exports() {
    let app = TestApp::spawn().await;
    let exported = exported(&app).await;
    let rules = std::fs::read_to_string(docs("prometheus/alerts.yml")).unwrap();
    let in_rules = metric_names(&rules);
    let in_dashboard = metric_names(&dashboard_queries().join("\n"));
    assert!(in_rules.len() >= 7 && in_dashboard.len() >= 10);
    let unknown: Vec<&String> = in_rules
        .union(&in_dashboard)
        .filter(|n| !exported.contains(*n))
        .collect();
    assert!(
        unknown.is_empty(),
        "named in the rules or the dashboard but not exported: {unknown:?} (exported: {exported:?})"
    );
}

/// promtool, or `None` (with a loud message) outside CI on a machine without it.
fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("promtool");
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "promtool is required in CI: install the Debian package `prometheus` (.ci/run does)"
    );
    eprintln!(
        "\n!!! SKIPPED: promtool is not installed, so docs/prometheus/alerts.yml and the dashboard's queries \
         were NOT checked. Install the Debian package `prometheus` (apt-get install prometheus). !!!\n"
    );
    None
}

fn run(command: &mut Command) {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn promtool_checks_the_rules_their_tests_and_every_dashboard_query() {
    let Some(promtool) = promtool() else { return };
    run(Command::new(promtool)
        .args(["check", "rules"])
        .arg(docs("prometheus/alerts.yml")));
    run(Command::new(promtool)
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(docs("prometheus")));
    // Each dashboard query as a recording rule, so promtool parses it as it parses the alerts.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, query) in dashboard_queries().iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query_{n}\n        expr: {}\n",
            serde_json::to_string(query).unwrap()
        ));
    }
    let file = std::env::temp_dir().join(format!("expo-dashboard-rules-{}.yml", expo_controller::ids::new_id()));
    std::fs::write(&file, rules).unwrap();
    run(Command::new(promtool).args(["check", "rules"]).arg(&file));
    let _ = std::fs::remove_file(&file);
}
