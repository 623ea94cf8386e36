//! The relay loop on loopback TCP: pgsluice's real client session (startup,
//! pool checkout, relay, release) between a raw protocol client and a
//! *scripted PostgreSQL peer* (see `support/mod.rs`: it answers a fixed
//! script and runs no SQL, so this measures pgsluice, not PostgreSQL).
//!
//! The session is tied to `TcpStream` (it reads with `try_io` readiness
//! tricks and hands server sockets to the pool), so an in-memory duplex
//! cannot stand in for the sockets; loopback TCP is the narrowest real pair.
//!
//! Everything (client, pgsluice in transaction mode, the peer) runs on one
//! current-thread tokio runtime, as pgsluice runs by default
//! (`worker_threads = 1`): a round trip's time is the CPU of all three plus
//! the kernel's loopback. Each case runs twice, `direct` (client to the peer)
//! and `pgsluice` (client to pgsluice to the peer); the difference is what
//! pgsluice adds per request: two more socket hops, the session's scan and
//! relay, a pool checkout and release.
//!
//! `cargo bench --bench relay` (about 2 s of measurement per case).

mod support;

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pgsluice::config::Config;
use pgsluice::proxy::Proxy;
use support::{BIG_RESULT_ROWS, BIG_SELECT, POINT_SELECT, RawClient, ScriptedServer};

const USER: &str = "bench";
const DATABASE: &str = "bench";

/// Starts pgsluice in front of `server` on this runtime (transaction mode,
/// trust authentication for the bench user, pool of 20).
async fn start_pgsluice(server: SocketAddr) -> SocketAddr {
    let toml = format!(
        "[general]\nlisten_addr = \"127.0.0.1:0\"\nauth_type = \"trust\"\n\
         pool_mode = \"transaction\"\npool_size = 20\n\
         [databases.{DATABASE}]\nprimary = \"{server}\"\n\
         [users.{USER}]\n"
    );
    let config = Config::from_toml(&toml, "relay bench", std::iter::empty())
        .unwrap_or_else(|e| panic!("bench config invalid: {e}\n{toml}"));
    let proxy = Proxy::bind(config)
        .await
        .unwrap_or_else(|e| panic!("cannot bind pgsluice: {e}"));
    let addr = proxy
        .local_addr()
        .unwrap_or_else(|e| panic!("pgsluice address: {e}"));
    tokio::spawn(proxy.run());
    addr
}

fn bench_relay(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let (server, pgsluice) = rt.block_on(async {
        let server = ScriptedServer::start()
            .await
            .unwrap_or_else(|e| panic!("scripted peer: {e}"));
        let pgsluice = start_pgsluice(server.addr).await;
        (server, pgsluice)
    });
    let targets = [("direct", server.addr), ("pgsluice", pgsluice)];

    let cases = [
        ("simple_query", support::query(POINT_SELECT)),
        ("extended_query", support::extended(POINT_SELECT, "4711")),
        ("big_result", support::query(BIG_SELECT)),
    ];

    let mut group = c.benchmark_group("relay");
    for (case, request) in &cases {
        for (target, addr) in targets {
            let mut client = rt.block_on(async {
                RawClient::connect(addr, USER, DATABASE)
                    .await
                    .unwrap_or_else(|e| panic!("connect to {target}: {e}"))
            });
            // One unmeasured round trip: checks the answer and warms the pool.
            let answer = rt.block_on(client.round_trip(request)).unwrap_or_else(|e| {
                panic!("{case} through {target}: {e}");
            });
            let name = if *case == "big_result" {
                assert_eq!(answer.messages, BIG_RESULT_ROWS as u64 + 3);
                group.throughput(Throughput::Bytes(answer.bytes));
                format!(
                    "result_{BIG_RESULT_ROWS}_rows/{target}/{}_msgs",
                    answer.messages
                )
            } else {
                // RowDescription, DataRow, CommandComplete, ReadyForQuery
                // (+ ParseComplete, BindComplete for the extended protocol).
                let expected = if *case == "extended_query" { 6 } else { 4 };
                assert_eq!(answer.messages, expected, "{case} through {target}");
                group.throughput(Throughput::Elements(1));
                format!("{case}/{target}")
            };
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let started = Instant::now();
                        for _ in 0..iters {
                            let answer = client
                                .round_trip(black_box(request))
                                .await
                                .unwrap_or_else(|e| panic!("{case} through {target}: {e}"));
                            black_box(answer);
                        }
                        started.elapsed()
                    })
                });
            });
        }
    }
    group.finish();
    drop(server);
}

criterion_group! {
    name = benches;
    config = support::criterion_config();
    targets = bench_relay
}
criterion_main!(benches);
