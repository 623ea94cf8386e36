//! Pool checkout and release under contention: 1, 16 and 256 tasks sharing
//! one pool of 20 server connections on a 2-thread tokio runtime.
//!
//! The pool is pgsluice's real `Pool` with real server connections: 20 TCP
//! connections on loopback to the *scripted PostgreSQL peer* of
//! `support/mod.rs`, which logs them in and then stays silent. A checkout
//! is what a transaction-mode client pays per transaction before its first
//! byte reaches a server: the pause gate, the pool lock, the idle stack or
//! the FIFO waiter queue with its hand-off, the idle-connection health probe
//! (one non-blocking read on the socket), and on release the readiness reset
//! and the hand-off to the longest waiter. No bytes are sent to the peer.
//!
//! Each task checks a connection out, holds it across one `yield_now` (as a
//! client holds it across its relay's awaits; with more tasks than
//! connections this makes checkouts queue) and releases it. One iteration
//! is one checkout + release; the time per iteration is wall time over all
//! tasks, so it is the pool's throughput, not one client's latency.
//!
//! `cargo bench --bench pool` (about 2 s of measurement per case).

mod support;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pgsluice::backend::{Credentials, LoginSpec};
use pgsluice::config::{PoolSettings, ServerAddr};
use pgsluice::pool::{Gate, Pool};
use pgsluice::tls::TlsContext;
use support::ScriptedServer;

const POOL_SIZE: usize = 20;
const TASKS: [u64; 3] = [1, 16, 256];

fn settings() -> PoolSettings {
    PoolSettings {
        pool_size: POOL_SIZE,
        max_pool_size: POOL_SIZE,
        min_pool_size: 0,
        reserve_pool_timeout: Duration::from_secs(5),
        checkout_timeout: Duration::from_secs(30),
        server_idle_timeout: None,
        server_lifetime: None,
        server_connect_timeout: Duration::from_secs(5),
        server_login_retry: Duration::from_secs(1),
    }
}

/// `tasks` tasks doing `iters` checkout + release cycles between them.
async fn contend(pool: &Arc<Pool>, tasks: u64, iters: u64) -> Duration {
    let started = Instant::now();
    let mut handles = Vec::with_capacity(tasks as usize);
    for t in 0..tasks {
        let share = iters / tasks + u64::from(t < iters % tasks);
        let pool = pool.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..share {
                let conn = pool
                    .checkout()
                    .await
                    .unwrap_or_else(|e| panic!("checkout: {e}"));
                tokio::task::yield_now().await;
                conn.release();
            }
        }));
    }
    for h in handles {
        h.await.unwrap_or_else(|e| panic!("bench task: {e}"));
    }
    started.elapsed()
}

fn bench_pool(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let (server, pool) = rt.block_on(async {
        let server = ScriptedServer::start()
            .await
            .unwrap_or_else(|e| panic!("scripted peer: {e}"));
        let spec = LoginSpec {
            addr: ServerAddr {
                host: "127.0.0.1".into(),
                port: server.addr.port(),
            },
            user: "bench".into(),
            credentials: Credentials::default(),
            database: "bench".into(),
            connect_timeout: Duration::from_secs(5),
            tls: TlsContext::disabled().handle(),
        };
        let pool = Pool::new(
            "bench/bench".into(),
            spec,
            settings(),
            Arc::new(AtomicU64::new(1)),
            Arc::new(Gate::default()),
        );
        // Open all 20 connections before measuring: hold them all at once.
        let mut held = Vec::new();
        for _ in 0..POOL_SIZE {
            held.push(pool.checkout());
        }
        let held = futures_util::future::join_all(held).await;
        for conn in held {
            conn.unwrap_or_else(|e| panic!("warm-up checkout: {e}"))
                .release();
        }
        (server, pool)
    });
    let status = pool.status();
    assert_eq!((status.open, status.idle), (POOL_SIZE, POOL_SIZE));

    let mut group = c.benchmark_group("pool");
    group.throughput(Throughput::Elements(1));
    for tasks in TASKS {
        group.bench_function(
            format!("checkout_release/{tasks}_tasks_{POOL_SIZE}_conns"),
            |b| b.iter_custom(|iters| rt.block_on(contend(&pool, tasks, iters))),
        );
    }
    group.finish();
    let status = pool.status();
    assert_eq!(
        (status.open, status.waiting),
        (POOL_SIZE, 0),
        "every connection back, nobody waiting"
    );
    drop(pool);
    drop(server);
}

criterion_group! {
    name = benches;
    config = support::criterion_config();
    targets = bench_pool
}
criterion_main!(benches);
