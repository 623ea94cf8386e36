//! Micro-benchmarks of the codec on the data path: what the relay pays per
//! message, per read and per login, before any network cost.
//!
//! Kept short on purpose (about 2 s of measurement per benchmark):
//! `cargo bench --bench codec`. Stream benchmarks report elements (messages)
//! or bytes per second, so per-message cost is the time divided by the
//! element count printed in the name.

use std::hint::black_box;
use std::time::Instant;

mod support;

use bytes::{BufMut, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use pgsluice::backend::ServerParams;
use pgsluice::frontend::{ClientParams, RelayState, scan_effects, server_tag_inspected};
use pgsluice::protocol::{
    self, PG_MAX_MESSAGE_LEN, PROTOCOL_3_0, Scanner, Segment, Severity, StartupParams, TxStatus,
    read_startup, sqlstate,
};
use support::{data_row, row_description};

/// What `pgbench -S` gets back for `SELECT abalance FROM pgbench_accounts
/// WHERE aid = …`: RowDescription, one DataRow, CommandComplete, ReadyForQuery.
fn pgbench_select_response() -> BytesMut {
    let mut b = BytesMut::new();
    row_description(&mut b, &[("abalance", 23, 4)]);
    data_row(&mut b, &[b"-2817"]);
    protocol::command_complete(&mut b, "SELECT 1");
    protocol::ready_for_query(&mut b, TxStatus::Idle);
    b
}

/// A 1,000-row result of four typical columns (int, text, timestamptz, numeric).
fn thousand_row_response() -> BytesMut {
    let mut b = BytesMut::new();
    row_description(
        &mut b,
        &[
            ("id", 23, 4),
            ("name", 25, -1),
            ("created_at", 1184, 8),
            ("balance", 1700, -1),
        ],
    );
    for i in 0..1_000 {
        let id = i.to_string();
        data_row(
            &mut b,
            &[
                id.as_bytes(),
                b"customer name of middling length",
                b"2026-11-26 23:28:04.123456+00",
                b"12345.67",
            ],
        );
    }
    protocol::command_complete(&mut b, "SELECT 1000");
    protocol::ready_for_query(&mut b, TxStatus::Idle);
    b
}

/// The session's server-side loop without the socket: scan `buf`, act on
/// inspected messages, forward the rest. Returns bytes forwarded.
fn relay_server_output(
    scanner: &mut Scanner,
    relay: &mut RelayState,
    buf: &[u8],
    now: Instant,
) -> usize {
    let mut pos = 0;
    loop {
        match scanner.next(&buf[pos..], PG_MAX_MESSAGE_LEN) {
            Ok(Segment::Pass { len }) => pos += len,
            Ok(Segment::NeedMore) | Err(_) => break,
            Ok(Segment::Start { header, whole }) if server_tag_inspected(header.tag) => {
                if !whole {
                    break;
                }
                let end = pos + header.total_len;
                black_box(relay.on_server_message(header.tag, &buf[pos..end], now));
                pos = end;
            }
            Ok(Segment::Start { header, .. }) => {
                pos += scanner.pass_partial(header, buf.len() - pos);
            }
        }
    }
    pos
}

fn count_messages(buf: &[u8]) -> u64 {
    let mut at = 0;
    let mut n = 0;
    while let Ok(Some(h)) = protocol::peek_header(&buf[at..], PG_MAX_MESSAGE_LEN) {
        at += h.total_len;
        n += 1;
    }
    n
}

fn bench_framing(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    for (name, response) in [
        ("pgbench_select", pgbench_select_response()),
        ("result_1000_rows", thousand_row_response()),
    ] {
        let messages = count_messages(&response);
        group.throughput(Throughput::Elements(messages));
        group.bench_function(format!("{name}/{messages}_msgs"), |b| {
            let mut relay = RelayState::new();
            let now = Instant::now();
            b.iter(|| {
                let mut scanner = Scanner::new();
                relay.on_client_tag(b'Q', now);
                let n = relay_server_output(&mut scanner, &mut relay, black_box(&response), now);
                assert_eq!(n, response.len());
            });
        });
    }

    // 1 MiB of DataRows arriving in 16 KiB reads into a persistent buffer:
    // messages straddle reads, so partial bodies are passed through.
    let mut stream = BytesMut::new();
    let row: [&[u8]; 4] = [b"42", b"a text column", b"2026-11-26 23:28:04+00", b"3.14"];
    while stream.len() < (1 << 20) - 64 {
        data_row(&mut stream, &row);
    }
    let messages = count_messages(&stream);
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function(format!("stream_1MiB_16KiB_reads/{messages}_msgs"), |b| {
        let mut relay = RelayState::new();
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let now = Instant::now();
        b.iter(|| {
            let mut scanner = Scanner::new();
            let mut forwarded = 0;
            for read in stream.chunks(16 * 1024) {
                buf.extend_from_slice(read);
                let n = relay_server_output(&mut scanner, &mut relay, &buf, now);
                forwarded += n;
                let _ = buf.split_to(n);
            }
            assert_eq!(forwarded, stream.len());
        });
    });
    group.finish();
}

/// What libpq (psql 15) sends: user, database, application_name, client_encoding.
fn libpq_startup() -> BytesMut {
    let mut body = BytesMut::new();
    body.put_i32(0);
    body.put_i32(PROTOCOL_3_0);
    for (k, v) in [
        ("user", "app"),
        ("database", "appdb"),
        ("application_name", "psql"),
        ("client_encoding", "UTF8"),
    ] {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let len = body.len() as i32;
    body[..4].copy_from_slice(&len.to_be_bytes());
    body
}

fn bench_startup(c: &mut Criterion) {
    let packet = libpq_startup();
    c.bench_function("read_startup/libpq", |b| {
        b.iter_batched_ref(
            || packet.clone(),
            |buf| black_box(read_startup(buf).unwrap().unwrap()),
            BatchSize::SmallInput,
        );
    });
}

fn bench_builders(c: &mut Criterion) {
    let mut out = BytesMut::with_capacity(512);
    c.bench_function("build/error_response", |b| {
        b.iter(|| {
            out.clear();
            protocol::error_response(
                &mut out,
                Severity::Fatal,
                black_box(sqlstate::TOO_MANY_CONNECTIONS),
                black_box("sorry, too many clients already (pool appdb/app is full)"),
            );
            black_box(&out);
        });
    });
}

/// ParameterStatus set a PostgreSQL 15 server reports at login.
fn server_params() -> ServerParams {
    let mut s = ServerParams::default();
    for (k, v) in support::PG15_PARAMS {
        s.set(k, v);
    }
    s
}

fn bench_params(c: &mut Criterion) {
    let mut server = server_params();
    let startup = StartupParams(vec![
        ("user".into(), "app".into()),
        ("database".into(), "appdb".into()),
        ("application_name".into(), "psql".into()),
        ("client_encoding".into(), "UTF8".into()),
    ]);
    let client = ClientParams::from_startup(&startup, &server).unwrap();
    // The server last served a client with the same settings.
    server.set("application_name", "psql");
    assert_eq!(client.sync_sql(&server, &[]), None);
    c.bench_function("sync_sql/no_change", |b| {
        b.iter(|| black_box(client.sync_sql(black_box(&server), &[])));
    });
}

/// What every transaction-mode Query and unnamed Parse pays for session
/// state tracking: the lexical prefilter (and the lexer, when it hits).
fn bench_effects(c: &mut Criterion) {
    let pgbench_select = b"SELECT abalance FROM pgbench_accounts WHERE aid = 4711;";
    let pgbench_update =
        b"UPDATE pgbench_accounts SET abalance = abalance + -1234 WHERE aid = 4711;";
    let set = b"SET search_path = app, public";
    c.bench_function("effects/select (prefilter only)", |b| {
        b.iter(|| black_box(scan_effects(black_box(pgbench_select))));
    });
    c.bench_function("effects/update ... set (prefilter only)", |b| {
        b.iter(|| black_box(scan_effects(black_box(pgbench_update))));
    });
    c.bench_function("effects/set", |b| {
        b.iter(|| black_box(scan_effects(black_box(set))));
    });
}

criterion_group! {
    name = benches;
    config = support::criterion_config();
    targets = bench_framing, bench_startup, bench_builders, bench_params, bench_effects
}
criterion_main!(benches);
