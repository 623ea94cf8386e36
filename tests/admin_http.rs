//! The HTTP endpoint: /health, /ready (503 while draining), /metrics in
//! Prometheus text format (read back with a Prometheus text parser) whose
//! values follow the load: pools, clients by state, transactions and
//! queries with their histograms per node, routing decisions, errors by
//! SQLSTATE class.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{TestProxy, eventually, sqlstate};
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

/// A histogram's `_bucket` sample with `le`, read from the raw text (the
/// parser folds buckets into one value per series).
fn histogram_buckets(
    s: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Vec<(f64, f64)> {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .flat_map(|x| match &x.value {
            prometheus_parse::Value::Histogram(h) => {
                h.iter().map(|b| (b.less_than, b.count)).collect::<Vec<_>>()
            }
            _ => Vec::new(),
        })
        .collect()
}

#[tokio::test]
async fn traffic_metrics_follow_the_load() {
    let proxy = TestProxy::start_with("", CONFIG).await;
    let http_addr = proxy.http_addr.expect("HTTP endpoint configured");
    eventually("replicas in rotation", Duration::from_secs(10), || async {
        let s = scrape(&http(http_addr, "GET", "/metrics").await.1);
        value(
            &s,
            "pgsluice_replica_in_rotation",
            &[("reason", "in_rotation")],
        ) == Some(2.0)
    })
    .await;
    let s = scrape(&http(http_addr, "GET", "/metrics").await.1);
    assert_eq!(
        value(&s, "pgsluice_client_connections_max", &[]),
        Some(10_000.0)
    );
    let before = value(&s, "pgsluice_queries_total", &[("database", "app")]).unwrap_or(0.0);

    // Reads first: after its own write a client reads from the primary
    // until a replica has replayed that write.
    let c = proxy.connect().await;
    for _ in 0..10 {
        c.simple_query("SELECT 1").await.expect("read");
    }
    c.batch_execute("CREATE TABLE IF NOT EXISTS admin_metrics (v int)")
        .await
        .expect("write");
    c.simple_query("INSERT INTO admin_metrics VALUES (1)")
        .await
        .expect("insert");
    let e = c.simple_query("SELEC 1").await.expect_err("syntax error");
    assert_eq!(sqlstate(&e).as_deref(), Some("42601"));
    let e = c
        .simple_query("SELECT 1/0")
        .await
        .expect_err("division by zero");
    assert_eq!(sqlstate(&e).as_deref(), Some("22012"));

    // A query is counted when its answer is relayed; the scrape may come
    // a moment before the relay task has finished that step.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let s = loop {
        let s = scrape(&http(http_addr, "GET", "/metrics").await.1);
        let after = value(&s, "pgsluice_queries_total", &[("database", "app")]).unwrap_or(0.0);
        if after >= before + 14.0 {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "{before} → {after}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        value(
            &s,
            "pgsluice_queries_total",
            &[("database", "app"), ("node", "primary")]
        )
        .unwrap_or(0.0)
            >= 2.0
    );
    let replica_queries: f64 = ["replica1", "replica2"]
        .iter()
        .filter_map(|n| value(&s, "pgsluice_queries_total", &[("node", n)]))
        .sum();
    assert!(replica_queries >= 10.0, "reads counted on replicas");
    assert_eq!(
        value(&s, "pgsluice_errors_total", &[("class", "42")]),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "pgsluice_errors_total", &[("class", "22")]),
        Some(1.0)
    );
    // Histograms: the dashboards' buckets, cumulative, ending in +Inf.
    let buckets = histogram_buckets(
        &s,
        "pgsluice_query_duration_seconds",
        &[("database", "app"), ("node", "primary")],
    );
    let bounds: Vec<f64> = buckets.iter().map(|b| b.0).collect();
    assert_eq!(
        bounds,
        [
            0.0005,
            0.001,
            0.0025,
            0.005,
            0.01,
            0.025,
            0.05,
            0.1,
            0.25,
            0.5,
            1.0,
            2.5,
            5.0,
            10.0,
            30.0,
            f64::INFINITY
        ]
    );
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "cumulative");
    assert!(buckets.last().map_or(0.0, |b| b.1) >= 2.0);
    assert!(
        !histogram_buckets(&s, "pgsluice_client_wait_seconds", &[("database", "app")]).is_empty()
    );
    assert!(
        !histogram_buckets(
            &s,
            "pgsluice_transaction_duration_seconds",
            &[("node", "replica1")]
        )
        .is_empty()
            || !histogram_buckets(
                &s,
                "pgsluice_transaction_duration_seconds",
                &[("node", "replica2")]
            )
            .is_empty()
    );
    assert!(
        value(
            &s,
            "pgsluice_routing_decisions_total",
            &[("target", "replica"), ("reason", "read")]
        )
        .unwrap_or(0.0)
            >= 10.0
    );
    assert!(
        value(
            &s,
            "pgsluice_routing_decisions_total",
            &[("target", "primary"), ("reason", "write")]
        )
        .unwrap_or(0.0)
            >= 2.0
    );
    assert!(value(&s, "pgsluice_replica_lag_bytes", &[("node", "replica1")]).is_some());
    assert_eq!(
        value(&s, "pgsluice_node_banned", &[("node", "replica2")]),
        Some(0.0)
    );
    assert_eq!(
        value(
            &s,
            "pgsluice_clients",
            &[("database", "app"), ("state", "idle")]
        ),
        Some(1.0)
    );

    // A client inside a transaction is active; the gauge follows.
    c.simple_query("BEGIN").await.expect("begin");
    c.simple_query("SELECT 1").await.expect("in tx");
    let s = scrape(&http(http_addr, "GET", "/metrics").await.1);
    assert_eq!(
        value(
            &s,
            "pgsluice_clients",
            &[("database", "app"), ("state", "active")]
        ),
        Some(1.0)
    );
    c.simple_query("COMMIT").await.expect("commit");
}
