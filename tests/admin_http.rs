//! The HTTP endpoint: /health, /ready (503 while draining), /metrics in
//! Prometheus text format (read back with a Prometheus text parser) whose
//! values follow the load.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{TestProxy, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONFIG: &str = "\n[routing]\ndefault_route = \"auto\"\nmonitor_user = \"app\"\n\
                      [admin]\nhttp_listen_addr = \"127.0.0.1:0\"\n";

/// (status, body) of a request over a fresh connection.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: pgsluice\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn scrape(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("a valid Prometheus text exposition")
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .reduce(|a, b| a + b)
}

#[tokio::test]
async fn health_ready_and_metrics_follow_the_proxy() {
    let proxy = TestProxy::start_with("", CONFIG).await;
    let http_addr = proxy.http_addr.expect("HTTP endpoint configured");

    assert_eq!(
        http(http_addr, "GET", "/health").await,
        (200, "ok\n".into())
    );
    assert_eq!(http(http_addr, "GET", "/nope").await.0, 404);
    assert_eq!(http(http_addr, "POST", "/health").await.0, 405);
    eventually("ready", Duration::from_secs(10), || async {
        http(http_addr, "GET", "/ready").await.0 == 200
    })
    .await;
    eventually("replicas in rotation", Duration::from_secs(10), || async {
        let s = scrape(&http(http_addr, "GET", "/metrics").await.1);
        value(
            &s,
            "pgsluice_replica_in_rotation",
            &[("reason", "in_rotation")],
        ) == Some(2.0)
    })
    .await;

    // Load: 5 clients, reads and writes.
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(proxy.connect().await);
    }
    for c in &clients {
        c.batch_execute("SELECT 1").await.expect("read");
        c.batch_execute("CREATE TEMP TABLE IF NOT EXISTS m (v int)")
            .await
            .expect("write");
    }
    let (status, body) = http(http_addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    let s = scrape(&body);
    assert_eq!(value(&s, "pgsluice_clients_connected", &[]), Some(5.0));
    assert_eq!(value(&s, "pgsluice_build_info", &[]), Some(1.0));
    assert_eq!(
        value(&s, "pgsluice_primary_reachable", &[("database", "app")]),
        Some(1.0)
    );
    // Servers were opened on the primary (writes) and on replicas (reads).
    let primary_servers = value(
        &s,
        "pgsluice_server_connections",
        &[("database", "app"), ("node", "primary")],
    )
    .unwrap_or(0.0);
    assert!(primary_servers >= 1.0, "{body}");
    let replica_servers: f64 = ["replica1", "replica2"]
        .iter()
        .filter_map(|n| value(&s, "pgsluice_server_connections", &[("node", n)]))
        .sum();
    assert!(replica_servers >= 1.0, "{body}");
    assert!(value(&s, "pgsluice_replica_lag_seconds", &[("node", "replica1")]).is_some());

    drop(clients);
    eventually(
        "clients gone from the gauge",
        Duration::from_secs(5),
        || async {
            let s = scrape(&http(http_addr, "GET", "/metrics").await.1);
            value(&s, "pgsluice_clients_connected", &[]) == Some(0.0)
        },
    )
    .await;

    // Draining: not ready, still healthy.
    let _holder = proxy.connect().await;
    proxy.handle.shutdown();
    eventually(
        "not ready while draining",
        Duration::from_secs(5),
        || async { http(http_addr, "GET", "/ready").await.0 == 503 },
    )
    .await;
    assert_eq!(http(http_addr, "GET", "/health").await.0, 200);
}
