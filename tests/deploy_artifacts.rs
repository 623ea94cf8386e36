//! The deployment artifacts in docker/ against the real pgsluice: every
//! `pgsluice_*` metric the Grafana dashboard, the alert rules (and their
//! unit tests) and the runbook use is one a running pgsluice exports, read
//! from a live `/metrics`; every pgsluice configuration shipped in docker/
//! is valid and listens where the probes, HEALTHCHECK and Service expect.
//! The linters (hadolint, kubernetes-validate, promtool, …) run in
//! scripts/check-deploy.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use pgsluice::config::Config;
use support::TestProxy;

const HTTP: &str = "\n[routing]\ndefault_route = \"auto\"\nmonitor_user = \"app\"\n\
                    [admin]\nhttp_listen_addr = \"127.0.0.1:0\"\n";

/// Where each shipped artifact names metrics.
const USERS_OF_METRICS: &[&str] = &[
    "docker/grafana/pgsluice-dashboard.json",
    "docker/prometheus/alerts.yml",
    "docker/prometheus/alerts_test.yml",
    "docs/operations.md",
];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Series names a Prometheus server would store from this exposition:
/// every sample's name, and for each `# TYPE` (also families with no
/// series yet) the names its type produces.
fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// Every `pgsluice_…` identifier in `text` (lower case: environment
/// variables like PGSLUICE_USERS__APP__PASSWORD are not metrics).
fn referenced_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    let mut from = 0;
    while let Some(i) = text[from..].find("pgsluice_").map(|i| i + from) {
        let mut end = i + "pgsluice_".len();
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        let standalone = i == 0 || !(ident(bytes[i - 1]) || bytes[i - 1].is_ascii_uppercase());
        if standalone && end > i + "pgsluice_".len() {
            names.insert(text[i..end].to_owned());
        }
        from = end;
    }
    names
}

/// The dashboard's PromQL: panel targets and template variable queries.
fn dashboard_queries() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let text = read("docker/grafana/pgsluice-dashboard.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut out = Vec::new();
    walk(&json, &mut out);
    out
}

/// Metric names used by the dashboard, the alert rules, their unit tests
/// and the runbook must all exist in a live scrape. The runbook may also
/// name a histogram or counter by its family name.
#[tokio::test]
async fn dashboard_alerts_and_runbook_use_only_exported_metrics() {
    let proxy = TestProxy::start_with("", HTTP).await;
    let http = proxy.http_addr.expect("HTTP endpoint configured");
    // A read and a write, so per-pool and per-node families have series.
    let c = proxy.connect().await;
    c.batch_execute("SELECT 1").await.expect("read");
    c.batch_execute("CREATE TEMP TABLE deploy_probe (v int)")
        .await
        .expect("write");
    // An error, so the per-class error counter has a series.
    c.batch_execute("SELECT 1/0")
        .await
        .expect_err("division by zero");
    // Replica lag series exist once the monitor has measured a replica:
    // on a loaded machine that can come after the first scrape.
    let mut exposition = support::http_get(http, "/metrics").await;
    let waited = std::time::Instant::now();
    while !exposition.contains("pgsluice_replica_lag_seconds{")
        && waited.elapsed() < std::time::Duration::from_secs(15)
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        exposition = support::http_get(http, "/metrics").await;
    }
    let exported = exported_names(&exposition);
    assert!(
        exported.contains("pgsluice_build_info")
            && exported.contains("pgsluice_read_retries_total"),
        "the scrape parser found no pgsluice metrics in:\n{exposition}"
    );
    let families: BTreeSet<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();

    let dashboard = dashboard_queries();
    assert!(
        dashboard.len() > 30,
        "dashboard queries not found: {dashboard:?}"
    );
    let mut missing: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let mut used = 0;
    for file in USERS_OF_METRICS {
        let text = if file.ends_with(".json") {
            dashboard.join("\n")
        } else {
            read(file)
        };
        let names = referenced_names(&text);
        assert!(!names.is_empty(), "{file} names no pgsluice_ metric");
        used += names.len();
        for name in names {
            let known =
                exported.contains(&name) || (file.ends_with(".md") && families.contains(&name));
            if !known {
                missing.entry(name).or_default().push(file);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} metric names used in docker/ or docs/ are not exported by pgsluice's /metrics:\n{}\n\
         exported: {exported:?}",
        missing.len(),
        missing
            .iter()
            .map(|(n, f)| format!("  {n} (in {})", f.join(", ")))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    assert!(used > 20);
}

/// The TOML under `pgsluice.toml: |` in a ConfigMap manifest.
fn configmap_toml(path: &str) -> String {
    let text = read(path);
    let mut lines = text.lines();
    let key_indent = lines
        .by_ref()
        .find_map(|l| (l.trim() == "pgsluice.toml: |").then(|| l.len() - l.trim_start().len()))
        .unwrap_or_else(|| panic!("{path}: no `pgsluice.toml: |` key"));
    let mut body = String::new();
    let mut indent = None;
    for line in lines {
        let this = line.len() - line.trim_start().len();
        if !line.trim().is_empty() && this <= key_indent {
            break;
        }
        let strip = *indent.get_or_insert(this);
        body.push_str(line.get(strip..).unwrap_or(""));
        body.push('\n');
    }
    body
}

/// The configs in docker/ pass pgsluice's own validation (with the password
/// the environment supplies there) and listen where the Dockerfile's
/// HEALTHCHECK, the probes, the Service and the app expect.
#[test]
fn shipped_configs_are_valid_and_listen_where_expected() {
    let env = || {
        [(
            "PGSLUICE_USERS__APP__PASSWORD".to_owned(),
            "from-the-secret".to_owned(),
        )]
    };
    let configs = [
        (
            "docker/compose/pgsluice.toml",
            read("docker/compose/pgsluice.toml"),
            "0.0.0.0:6432",
        ),
        (
            "docker/k8s/tier/configmap.yaml",
            configmap_toml("docker/k8s/tier/configmap.yaml"),
            "0.0.0.0:6432",
        ),
        (
            "docker/k8s/sidecar/configmap.yaml",
            configmap_toml("docker/k8s/sidecar/configmap.yaml"),
            "127.0.0.1:6432",
        ),
    ];
    for (origin, toml, listen) in configs {
        let config = Config::from_toml(&toml, origin, env())
            .unwrap_or_else(|e| panic!("{origin}: {e}\n{toml}"));
        assert_eq!(config.general.listen_addr.to_string(), listen, "{origin}");
        assert_eq!(
            config
                .admin
                .http_listen_addr
                .map(|a| a.to_string())
                .as_deref(),
            Some("0.0.0.0:9930"),
            "{origin}: probes, the HEALTHCHECK and Prometheus use port 9930 on the pod/container IP"
        );
        assert!(
            config.users["app"].password.is_some(),
            "{origin}: the password comes from the environment"
        );
        // Without the environment the password is missing: the file holds no secret.
        let err = Config::from_toml(&toml, origin, std::iter::empty())
            .expect_err("a config without its secret must not validate");
        assert!(
            err.to_string().contains("users.app.password"),
            "{origin}: {err}"
        );
    }
}
