//! End to end, checked by PostgreSQL itself: every write of the routing
//! corpus (`tests/routing_corpus.txt`), sent through pgsluice with routing
//! on, appears in the primary's statement log and in no replica's
//! (`log_statement = 'all'` on every node).
//!
//! Each statement carries a unique marker comment and runs on a fresh
//! connection (some end their session: COPY FROM STDIN, terminate, errors).
//! Statements naming pgsluice (hints, `SET pgsluice.route`) are skipped:
//! they choose their node on purpose.

use std::time::Duration;

use pgsluice::config::Config;
use pgsluice::localpg::{ClusterOptions, LocalCluster};
use pgsluice::proxy::Proxy;

fn corpus_writes() -> Vec<String> {
    include_str!("routing_corpus.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split_once('\t'))
        .filter(|(expect, _)| expect.starts_with("write"))
        .map(|(_, sql)| {
            sql.replace("\\n", "\n")
                .replace("\\t", "\t")
                .replace("\\\\", "\\")
        })
        .filter(|sql| !sql.to_ascii_lowercase().contains("pgsluice"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_corpus_write_reaches_only_the_primary() {
    let cluster = tokio::task::spawn_blocking(|| {
        LocalCluster::start(ClusterOptions {
            extra_conf: vec!["log_statement = 'all'".into()],
            ..ClusterOptions::default()
        })
    })
    .await
    .expect("join")
    .expect("cluster");
    let toml = format!(
        "{}\n[routing]\ndefault_route = \"auto\"\n",
        cluster.pgsluice_config("listen_addr = \"127.0.0.1:0\"")
    );
    let config = Config::from_toml(&toml, "test", std::iter::empty()).expect("config");
    let proxy = Proxy::bind(config).await.expect("bind");
    let addr = proxy.local_addr().expect("addr");
    let shared = proxy.shared().clone();
    let handle = proxy.shutdown_handle();
    tokio::spawn(proxy.run());
    // Replicas in rotation first, so that a misrouted write could land there.
    let group = shared.clusters()["app"].clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while (1..=2).any(|i| {
        !matches!(
            group.availability(i, std::time::Instant::now()),
            pgsluice::cluster::Availability::InRotation { .. }
        )
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "replicas never in rotation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let conninfo = format!(
        "host=127.0.0.1 port={} user=app password=app dbname=app connect_timeout=10",
        addr.port()
    );
    // Reads reach the replicas in this setup (else the check below proves
    // nothing).
    let (probe, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let mut replica_read = false;
    for _ in 0..20 {
        let row = probe
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .expect("read");
        replica_read |= row.get::<_, bool>(0);
    }
    assert!(replica_read, "no read reached a replica");

    let writes = corpus_writes();
    assert!(writes.len() >= 200, "corpus has {} writes", writes.len());
    for (i, sql) in writes.iter().enumerate() {
        let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .expect("connect");
        let task = tokio::spawn(conn);
        let marked = format!("{sql}\n-- corpus-write-{i:04}");
        // Most fail (no such table, not allowed): what matters is where
        // they were sent.
        let _ = tokio::time::timeout(Duration::from_secs(10), c.simple_query(&marked)).await;
        drop(c);
        task.abort();
    }
    handle.stop_now();

    let log = |i: usize| std::fs::read_to_string(&cluster.nodes()[i].log_file).unwrap_or_default();
    let primary = log(0);
    let mut missing = Vec::new();
    for (i, sql) in writes.iter().enumerate() {
        if !primary.contains(&format!("corpus-write-{i:04}")) {
            missing.push(sql.clone());
        }
    }
    let mut misrouted = Vec::new();
    for r in 1..=2 {
        let replica = log(r);
        for (i, sql) in writes.iter().enumerate() {
            if replica.contains(&format!("corpus-write-{i:04}")) {
                misrouted.push(format!("replica{r}: {sql}"));
            }
        }
    }
    eprintln!(
        "{} corpus writes sent; {} in the primary's log, {} on a replica",
        writes.len(),
        writes.len() - missing.len(),
        misrouted.len()
    );
    assert!(
        misrouted.is_empty(),
        "writes reached a replica:\n{}",
        misrouted.join("\n")
    );
    assert!(
        missing.is_empty(),
        "{} writes never reached the primary's log:\n{}",
        missing.len(),
        missing.join("\n")
    );
    tokio::task::spawn_blocking(move || cluster.shutdown())
        .await
        .expect("join")
        .expect("shutdown");
}
