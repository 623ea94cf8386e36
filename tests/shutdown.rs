//! Graceful shutdown: stop accepting, let transactions finish within
//! shutdown_timeout, then close.

mod support;

use std::time::{Duration, Instant};

use support::raw::{self, Raw};
use support::*;

#[tokio::test]
async fn shutdown_lets_open_transactions_finish() {
    let mut proxy = TestProxy::start("shutdown_timeout = \"10s\"").await;
    let setup = proxy.connect().await;
    setup
        .batch_execute("DROP TABLE IF EXISTS drain_t; CREATE TABLE drain_t (v int)")
        .await
        .unwrap();
    let idle = proxy.connect().await;
    let mut busy = Raw::login(proxy.addr).await;
    busy.send(&raw::query("BEGIN; INSERT INTO drain_t VALUES (1)"))
        .await;
    busy.recv_until(b'Z', Duration::from_secs(5))
        .await
        .expect("answered");

    proxy.handle.shutdown();
    // No new clients.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        proxy.connect_with("").await.is_err(),
        "new client accepted while draining"
    );
    // An idle client is closed at once.
    let err = idle
        .query_one("SELECT 1", &[])
        .await
        .expect_err("idle client closed");
    assert!(
        matches!(sqlstate(&err).as_deref(), Some("57P01") | None),
        "{err}"
    );

    // The open transaction finishes and commits.
    busy.send(&raw::query("INSERT INTO drain_t VALUES (2); COMMIT"))
        .await;
    let z = busy
        .recv_until(b'Z', Duration::from_secs(5))
        .await
        .expect("commit answered");
    assert_eq!(z.body, b"I");
    // ...and then that client is closed too, and the proxy stops.
    let m = busy
        .recv_until(b'E', Duration::from_secs(5))
        .await
        .expect("shutdown notice");
    assert_eq!(m.sqlstate().as_deref(), Some("57P01"));
    tokio::time::timeout(Duration::from_secs(5), &mut proxy.task)
        .await
        .expect("proxy stopped after the last client")
        .unwrap();
    let n: i64 = superuser(0)
        .await
        .query_one("SELECT count(*) FROM drain_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

#[tokio::test]
async fn shutdown_timeout_cuts_lingering_transactions() {
    let mut proxy = TestProxy::start("shutdown_timeout = \"1s\"").await;
    let mut c = Raw::login(proxy.addr).await;
    c.send(&raw::query("BEGIN")).await;
    c.recv_until(b'Z', Duration::from_secs(5))
        .await
        .expect("answered");
    let started = Instant::now();
    proxy.handle.shutdown();
    assert!(c.closed_within(Duration::from_secs(5)).await);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), &mut proxy.task)
        .await
        .expect("proxy stopped")
        .unwrap();
}
