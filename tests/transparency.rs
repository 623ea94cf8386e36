//! Real drivers cannot tell pgsluice from PostgreSQL.
//!
//! tokio-postgres talks to PostgreSQL through pgsluice (transaction mode
//! unless a test says otherwise) and every check is on what PostgreSQL
//! itself answered: exact values of every common type and NULL, very large
//! values and long results, multi-statement queries, errors inside and
//! outside transactions, pipelined requests, COPY both ways, cancel,
//! session state in session mode, notifications and server parameters.
//! Where the driver cannot see a difference on its own (EmptyQueryResponse)
//! a bare protocol client compares pgsluice's bytes with PostgreSQL's.

mod support;

use std::future::Future;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

use support::*;

// ----- helpers ---------------------------------------------------------------

/// Fails the test instead of hanging CI when an exchange never completes.
async fn bounded<T>(what: &str, secs: u64, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {secs}s"))
}

/// Every row of a simple-query answer, as PostgreSQL's text output.
fn text_rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

/// The single value of a one-row, one-column simple query.
async fn text_value(c: &tokio_postgres::Client, sql: &str) -> Option<String> {
    let msgs = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let rows = text_rows(&msgs);
    assert_eq!(rows.len(), 1, "{sql}: expected one row, got {rows:?}");
    rows[0][0].clone()
}

fn expect_sqlstate<T: std::fmt::Debug>(
    r: Result<T, tokio_postgres::Error>,
    code: &str,
    what: &str,
) {
    match r {
        Ok(v) => panic!("{what}: expected SQLSTATE {code}, got success {v:?}"),
        Err(e) => assert_eq!(
            sqlstate(&e).as_deref(),
            Some(code),
            "{what}: expected SQLSTATE {code}, got {e:?}"
        ),
    }
}

/// In transaction mode, once the client is idle its server must be back in
/// the pool (idle), or other clients starve.
async fn assert_servers_back_in_pool(proxy: &TestProxy, after: &str) {
    let pool = proxy
        .primary_pool()
        .expect("the primary pool exists once a client logged in");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = pool.status();
        if s.open > 0 && s.idle == s.open {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after {after}, with the client idle, the server was not returned to the pool: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deterministic pseudo-random bytes (xorshift), so large values are not
/// trivially compressible patterns.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Any value, as its raw bytes: to check NULLs of types with no Rust
/// mapping in tokio-postgres' default features (date, uuid, json, numeric).
struct AnyValue;

impl<'a> tokio_postgres::types::FromSql<'a> for AnyValue {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        _: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(AnyValue)
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

// ----- 1. types and NULLs ----------------------------------------------------

const UNICODE_TEXT: &str = "héllo wörld — ñandú, 日本語テキスト, Ελληνικά, 🦀🎉👩‍👩‍👧, e\u{301}";
const NUMERIC_TEXT: &str = "-12345678901234567890.000000000000000000001";
const JSON_TEXT: &str = r#"{"a": [1, 2.50, null, true], "ü": "🦀", "nested": {"k": "v"}}"#;
const UUID_IN: &str = "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11";
const UUID_OUT: &str = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
/// 2024-02-29 12:34:56.789123 UTC in microseconds since the Unix epoch.
const TS_MICROS: u64 = 1_709_210_096_789_123;

#[tokio::test]
async fn types_and_nulls_round_trip_in_extended_protocol() {
    let proxy = TestProxy::start("").await;
    let c = proxy.connect().await;
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let ts = UNIX_EPOCH + Duration::from_micros(TS_MICROS);
    let ints: Vec<Option<i32>> = vec![Some(i32::MIN), None, Some(0), Some(i32::MAX)];
    let texts: Vec<Option<String>> = vec![
        Some("a b".into()),
        Some("\"q\"".into()),
        None,
        Some(UNICODE_TEXT.into()),
        Some(String::new()),
    ];
    let row = bounded(
        "typed echo",
        30,
        c.query_one(
            "SELECT $1::int2, $2::int4, $3::int8, \
                    $4::float8, $5::float8, $6::float8, $7::float8, $8::float8, \
                    $9::text, $10::bytea, $11::bool, $12::bool, $13::timestamptz, \
                    $14::int4[], $15::text[], \
                    $16::text::numeric::text, $17::text::date::text, \
                    $18::text::uuid::text, $19::text::json::text, \
                    $10::bytea = decode($20::text, 'hex'), \
                    $9::text = $21::text COLLATE \"C\" AND length($9::text) = $22::int4, \
                    $4::float8 = 'NaN' AND $5::float8 = 'Infinity' AND $6::float8 = '-Infinity', \
                    $13::timestamptz = '2024-02-29 12:34:56.789123+00', \
                    $14::int4[] IS NOT DISTINCT FROM '{-2147483648,NULL,0,2147483647}'::int4[]",
            &[
                &i16::MIN,
                &i32::MAX,
                &i64::MIN,
                &f64::NAN,
                &f64::INFINITY,
                &f64::NEG_INFINITY,
                &(0.1f64 + 0.2f64),
                &-0.0f64,
                &UNICODE_TEXT,
                &all_bytes,
                &true,
                &false,
                &ts,
                &ints,
                &texts,
                &NUMERIC_TEXT,
                &"2024-02-29",
                &UUID_IN,
                &JSON_TEXT,
                &hex(&all_bytes),
                &UNICODE_TEXT.to_owned(),
                &(UNICODE_TEXT.chars().count() as i32),
            ],
        ),
    )
    .await
    .expect("typed echo through pgsluice");

    assert_eq!(row.get::<_, i16>(0), i16::MIN);
    assert_eq!(row.get::<_, i32>(1), i32::MAX);
    assert_eq!(row.get::<_, i64>(2), i64::MIN);
    assert!(row.get::<_, f64>(3).is_nan());
    assert_eq!(row.get::<_, f64>(4), f64::INFINITY);
    assert_eq!(row.get::<_, f64>(5), f64::NEG_INFINITY);
    assert_eq!(row.get::<_, f64>(6).to_bits(), (0.1f64 + 0.2f64).to_bits());
    assert_eq!(
        row.get::<_, f64>(7).to_bits(),
        (-0.0f64).to_bits(),
        "sign of -0.0"
    );
    assert_eq!(row.get::<_, &str>(8), UNICODE_TEXT);
    assert_eq!(row.get::<_, Vec<u8>>(9), all_bytes);
    assert!(row.get::<_, bool>(10));
    assert!(!row.get::<_, bool>(11));
    assert_eq!(row.get::<_, std::time::SystemTime>(12), ts);
    assert_eq!(row.get::<_, Vec<Option<i32>>>(13), ints);
    assert_eq!(row.get::<_, Vec<Option<String>>>(14), texts);
    assert_eq!(row.get::<_, &str>(15), NUMERIC_TEXT);
    assert_eq!(row.get::<_, &str>(16), "2024-02-29");
    assert_eq!(row.get::<_, &str>(17), UUID_OUT);
    assert_eq!(
        row.get::<_, &str>(18),
        JSON_TEXT,
        "json keeps its input text"
    );
    // What the server saw, not just what came back.
    assert!(
        row.get::<_, bool>(19),
        "server saw all 256 byte values in order"
    );
    assert!(row.get::<_, bool>(20), "server saw the exact unicode text");
    assert!(row.get::<_, bool>(21), "server saw NaN and infinities");
    assert!(row.get::<_, bool>(22), "server saw the exact timestamp");
    assert!(row.get::<_, bool>(23), "server saw the array with its NULL");

    // NULL of each type, both directions.
    let row = bounded(
        "NULL echo",
        30,
        c.query_one(
            "SELECT $1::int2, $2::int4, $3::int8, $4::float8, $5::text, $6::bytea, \
                    $7::bool, $8::timestamptz, $9::int4[], $10::text::numeric, \
                    NULL::date, NULL::uuid, NULL::json, \
                    num_nulls($1::int2, $2::int4, $3::int8, $4::float8, $5::text, \
                              $6::bytea, $7::bool, $8::timestamptz, $9::int4[], $10::text)",
            &[
                &None::<i16>,
                &None::<i32>,
                &None::<i64>,
                &None::<f64>,
                &None::<&str>,
                &None::<Vec<u8>>,
                &None::<bool>,
                &None::<std::time::SystemTime>,
                &None::<Vec<i32>>,
                &None::<&str>,
            ],
        ),
    )
    .await
    .expect("NULL echo through pgsluice");
    assert_eq!(row.get::<_, Option<i16>>(0), None);
    assert_eq!(row.get::<_, Option<i32>>(1), None);
    assert_eq!(row.get::<_, Option<i64>>(2), None);
    assert_eq!(row.get::<_, Option<f64>>(3), None);
    assert_eq!(row.get::<_, Option<&str>>(4), None);
    assert_eq!(row.get::<_, Option<Vec<u8>>>(5), None);
    assert_eq!(row.get::<_, Option<bool>>(6), None);
    assert_eq!(row.get::<_, Option<std::time::SystemTime>>(7), None);
    assert_eq!(row.get::<_, Option<Vec<i32>>>(8), None);
    for i in 9..13 {
        assert!(
            row.get::<_, Option<AnyValue>>(i).is_none(),
            "column {i} is NULL"
        );
    }
    assert_eq!(row.get::<_, i32>(13), 10, "server saw ten NULL parameters");
    assert_servers_back_in_pool(&proxy, "typed queries").await;
}

#[tokio::test]
async fn types_and_nulls_round_trip_in_simple_protocol() {
    let proxy = TestProxy::start("").await;
    let c = proxy.connect().await;
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let sql = format!(
        "SELECT (-32768)::int2, 2147483647::int4, (-9223372036854775808)::int8, \
                'NaN'::float8, 'Infinity'::float8, '-Infinity'::float8, 0.1::float8, \
                '{NUMERIC_TEXT}'::numeric, '{UNICODE_TEXT}'::text, decode('{}', 'hex'), \
                true, false, \
                '2024-02-29 12:34:56.789123+00'::timestamptz AT TIME ZONE 'UTC', \
                '2024-02-29'::date, '{UUID_IN}'::uuid, '{JSON_TEXT}'::json, \
                ARRAY[1, NULL, 3]::int4[], ARRAY['a b', '\"q\"', NULL, 'ü']::text[], \
                NULL::int2, NULL::int4, NULL::int8, NULL::float8, NULL::numeric, \
                NULL::text, NULL::bytea, NULL::bool, NULL::timestamptz, NULL::date, \
                NULL::uuid, NULL::json, NULL::int4[], ''::text",
        hex(&all_bytes)
    );
    let msgs = bounded("simple typed query", 30, c.simple_query(&sql))
        .await
        .expect("simple typed query through pgsluice");
    let rows = text_rows(&msgs);
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    let expected: Vec<Option<String>> = [
        "-32768",
        "2147483647",
        "-9223372036854775808",
        "NaN",
        "Infinity",
        "-Infinity",
        "0.1",
        NUMERIC_TEXT,
        UNICODE_TEXT,
        &format!("\\x{}", hex(&all_bytes)),
        "t",
        "f",
        "2024-02-29 12:34:56.789123",
        "2024-02-29",
        UUID_OUT,
        JSON_TEXT,
        "{1,NULL,3}",
        r#"{"a b","\"q\"",NULL,ü}"#,
    ]
    .iter()
    .map(|s| Some((*s).to_owned()))
    .chain(std::iter::repeat_n(None, 13))
    .chain(std::iter::once(Some(String::new())))
    .collect();
    assert_eq!(row.len(), expected.len());
    for (i, (got, want)) in row.iter().zip(&expected).enumerate() {
        assert_eq!(got, want, "column {i}");
    }
    assert!(
        matches!(msgs.last(), Some(SimpleQueryMessage::CommandComplete(1))),
        "the answer ends with CommandComplete SELECT 1"
    );

    // Byte for byte what PostgreSQL answers directly.
    let direct = superuser(0).await;
    let direct_rows = text_rows(&direct.simple_query(&sql).await.expect("direct query"));
    assert_eq!(
        rows, direct_rows,
        "pgsluice and PostgreSQL answer the same text"
    );
}

// ----- 2. large values and long results --------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_cross_both_directions() {
    let proxy = TestProxy::start("").await;
    let c = proxy.connect().await;

    // ~10 MB of text (ASCII letters plus a multibyte char now and then).
    let big_text: String = noise(10 * 1024 * 1024, 0x9e37_79b9_7f4a_7c15)
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if i % 4099 == 0 {
                'ü'
            } else {
                (b'a' + b % 26) as char
            }
        })
        .collect();
    let probe_at = 5_000_001usize; // 1-based char position for substr
    let probe: String = big_text.chars().skip(probe_at - 1).take(32).collect();
    let row = bounded(
        "10 MB text echo",
        60,
        c.query_one(
            "SELECT $1::text, length($1::text), substr($1::text, $2::int4, 32)",
            &[&big_text, &(probe_at as i32)],
        ),
    )
    .await
    .expect("10 MB text parameter");
    assert_eq!(row.get::<_, i32>(1) as usize, big_text.chars().count());
    assert_eq!(row.get::<_, &str>(2), probe, "server saw the text content");
    assert!(
        row.get::<_, &str>(0) == big_text,
        "10 MB text came back changed"
    );

    // The same text inside a simple Query message.
    let len = bounded(
        "10 MB simple query",
        60,
        text_value(&c, &format!("SELECT length('{big_text}')")),
    )
    .await;
    assert_eq!(
        len.as_deref(),
        Some(big_text.chars().count().to_string().as_str())
    );

    // 20 MB of bytea, every byte value present.
    let big_bytes = noise(20 * 1024 * 1024, 0x2545_f491_4f6c_dd1d);
    let at = 12_345_678usize;
    let row = bounded(
        "20 MB bytea echo",
        60,
        c.query_one(
            "SELECT $1::bytea, length($1::bytea), get_byte($1::bytea, $2::int4)",
            &[&big_bytes, &(at as i32)],
        ),
    )
    .await
    .expect("20 MB bytea parameter");
    assert_eq!(row.get::<_, i32>(1) as usize, big_bytes.len());
    assert_eq!(row.get::<_, i32>(2), i32::from(big_bytes[at]));
    assert!(
        row.get::<_, &[u8]>(0) == big_bytes.as_slice(),
        "20 MB bytea came back changed"
    );

    // Server-generated large values.
    let row = bounded(
        "server-made large values",
        60,
        c.query_one(
            "SELECT repeat('0123456789', 1048576), decode(repeat('00ff7f80', 5242880), 'hex')",
            &[],
        ),
    )
    .await
    .expect("server-generated large values");
    let t = row.get::<_, &str>(0);
    assert_eq!(t.len(), 10 * 1024 * 1024);
    assert!(t.as_bytes().chunks(10).all(|c| c == b"0123456789"));
    let b = row.get::<_, &[u8]>(1);
    assert_eq!(b.len(), 20 * 1024 * 1024);
    assert!(b.chunks(4).all(|c| c == [0x00, 0xff, 0x7f, 0x80]));
    assert_servers_back_in_pool(&proxy, "large values").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_results_stream_completely() {
    const N: i64 = 200_000;
    let proxy = TestProxy::start("").await;
    let c = proxy.connect().await;

    // Extended protocol, binary rows, consumed as a stream.
    let (count, sum) = bounded("200k rows (extended)", 120, async {
        let params: [i32; 0] = [];
        let stream = c
            .query_raw(
                "SELECT g::int8, 'row-' || g FROM generate_series(1, 200000) g",
                params,
            )
            .await
            .expect("query_raw");
        let mut stream = std::pin::pin!(stream);
        let (mut count, mut sum) = (0i64, 0i64);
        while let Some(row) = stream.try_next().await.expect("row") {
            count += 1;
            let g: i64 = row.get(0);
            assert_eq!(g, count, "rows in order, none lost");
            assert_eq!(row.get::<_, &str>(1), format!("row-{g}"));
            sum += g;
        }
        assert_eq!(stream.rows_affected(), Some(N as u64));
        (count, sum)
    })
    .await;
    assert_eq!(count, N);
    assert_eq!(sum, N * (N + 1) / 2);

    // Simple protocol, text rows.
    let (count, sum) = bounded("200k rows (simple)", 120, async {
        let stream = c
            .simple_query_raw("SELECT g, 'row-' || g FROM generate_series(1, 200000) g")
            .await
            .expect("simple_query_raw");
        let mut stream = std::pin::pin!(stream);
        let (mut count, mut sum, mut completed) = (0i64, 0i64, None);
        while let Some(msg) = stream.try_next().await.expect("message") {
            match msg {
                SimpleQueryMessage::Row(r) => {
                    count += 1;
                    let g: i64 = r.get(0).expect("g").parse().expect("int");
                    assert_eq!(g, count);
                    assert_eq!(r.get(1), Some(format!("row-{g}").as_str()));
                    sum += g;
                }
                SimpleQueryMessage::CommandComplete(n) => completed = Some(n),
                _ => {}
            }
        }
        assert_eq!(completed, Some(N as u64));
        (count, sum)
    })
    .await;
    assert_eq!(count, N);
    assert_eq!(sum, N * (N + 1) / 2);

    let row = c
        .query_one("SELECT 1 + 1", &[])
        .await
        .expect("usable after");
    assert_eq!(row.get::<_, i32>(0), 2);
    assert_servers_back_in_pool(&proxy, "long results").await;
}

// ----- 3. multi-statement simple queries ---------------------------------------

#[tokio::test]
async fn multi_statement_simple_query_returns_every_result() {
    let proxy = TestProxy::start("").await;
    let c = proxy.connect().await;
    let msgs = bounded(
        "three statements",
        30,
        c.simple_query("SELECT 1; SELECT 2; SELECT 'x'"),
    )
    .await
    .expect("multi-statement query");
    let values: Vec<Option<String>> = text_rows(&msgs).into_iter().map(|r| r[0].clone()).collect();
    assert_eq!(
        values,
        [Some("1".into()), Some("2".into()), Some("x".into())]
    );
    let completes = msgs
        .iter()
        .filter(|m| matches!(m, SimpleQueryMessage::CommandComplete(1)))
        .count();
    assert_eq!(completes, 3, "one CommandComplete per statement");
    assert_servers_back_in_pool(&proxy, "a multi-statement query").await;
}

#[tokio::test]
async fn error_in_the_middle_of_a_multi_statement_query() {
    let proxy = TestProxy::start("").await;
    let c = proxy.connect().await;
    c.batch_execute("DROP TABLE IF EXISTS transp_multi; CREATE TABLE transp_multi (v int)")
        .await
        .expect("setup");

    let r = bounded(
        "SELECT 1; SELECT 1/0; SELECT 3",
        30,
        c.simple_query("SELECT 1; SELECT 1/0; SELECT 3"),
    )
    .await;
    expect_sqlstate(r, "22012", "division by zero in the middle");

    // PostgreSQL runs a multi-statement Query as one implicit transaction:
    // the statement before the error is rolled back, the one after never runs.
    let r = c
        .simple_query(
            "INSERT INTO transp_multi VALUES (1); SELECT 1/0; INSERT INTO transp_multi VALUES (3)",
        )
        .await;
    expect_sqlstate(r, "22012", "division by zero between inserts");

    let msgs = c
        .simple_query("SELECT 4")
        .await
        .expect("connection usable after the error");
    assert_eq!(text_rows(&msgs), [[Some("4".to_owned())]]);
    let row = c
        .query_one("SELECT count(*) FROM transp_multi", &[])
        .await
        .expect("count");
    assert_eq!(
        row.get::<_, i64>(0),
        0,
        "the implicit transaction was rolled back"
    );
    assert_servers_back_in_pool(&proxy, "a failed multi-statement query").await;
}

// ----- 4. errors inside transactions --------------------------------------------

#[tokio::test]
async fn error_inside_transaction_aborts_it_until_rollback() {
    let proxy = TestProxy::start("").await;
    let c = proxy.connect().await;
    c.batch_execute("DROP TABLE IF EXISTS transp_tx_error; CREATE TABLE transp_tx_error (v int)")
        .await
        .expect("setup");
    c.batch_execute("BEGIN").await.expect("BEGIN");
    c.execute("INSERT INTO transp_tx_error VALUES (1)", &[])
        .await
        .expect("insert in transaction");
    expect_sqlstate(
        c.simple_query("SELECT 1/0").await,
        "22012",
        "error in transaction",
    );
    // 25P02 also proves every statement went to the same server.
    expect_sqlstate(
        c.query("SELECT 1", &[]).await,
        "25P02",
        "extended query in an aborted transaction",
    );
    expect_sqlstate(
        c.simple_query("SELECT 1").await,
        "25P02",
        "simple query in an aborted transaction",
    );
    c.batch_execute("ROLLBACK").await.expect("ROLLBACK");
    let row = c
        .query_one("SELECT 7 * 6", &[])
        .await
        .expect("usable after ROLLBACK");
    assert_eq!(row.get::<_, i32>(0), 42);
    let row = c
        .query_one("SELECT count(*) FROM transp_tx_error", &[])
        .await
        .expect("count");
    assert_eq!(row.get::<_, i64>(0), 0, "the insert was rolled back");
    assert_servers_back_in_pool(&proxy, "a rolled back transaction").await;
}

#[tokio::test]
async fn savepoint_rollback_keeps_the_transaction() {
    let proxy = TestProxy::start("").await;
    let mut c = proxy.connect().await;
    c.batch_execute("DROP TABLE IF EXISTS transp_savepoint; CREATE TABLE transp_savepoint (v int)")
        .await
        .expect("setup");
    let tx = c.transaction().await.expect("BEGIN");
    tx.execute("INSERT INTO transp_savepoint VALUES (1)", &[])
        .await
        .expect("insert 1");
    tx.batch_execute("SAVEPOINT s1").await.expect("SAVEPOINT");
    tx.execute("INSERT INTO transp_savepoint VALUES (2)", &[])
        .await
        .expect("insert 2");
    expect_sqlstate(
        tx.batch_execute("SELECT 1/0").await,
        "22012",
        "error after savepoint",
    );
    expect_sqlstate(
        tx.batch_execute("INSERT INTO transp_savepoint VALUES (99)")
            .await,
        "25P02",
        "statement after the error",
    );
    tx.batch_execute("ROLLBACK TO SAVEPOINT s1")
        .await
        .expect("ROLLBACK TO SAVEPOINT");
    tx.execute("INSERT INTO transp_savepoint VALUES (3)", &[])
        .await
        .expect("insert 3");
    // A nested transaction object is a savepoint too.
    {
        let mut tx = tx;
        let sp = tx.savepoint("s2").await.expect("savepoint s2");
        sp.execute("INSERT INTO transp_savepoint VALUES (4)", &[])
            .await
            .expect("insert 4");
        sp.rollback().await.expect("rollback to s2");
        tx.commit().await.expect("COMMIT");
    }
    let rows = c
        .query("SELECT v FROM transp_savepoint ORDER BY v", &[])
        .await
        .expect("read back");
    let values: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(values, [1, 3]);
    assert_servers_back_in_pool(&proxy, "a transaction with savepoints").await;
}

// ----- 5. pipelining ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_pipelined_queries_answer_in_order() {
    let proxy = TestProxy::start("").await;
    let c = proxy.connect().await;
    let stmt = c
        .prepare("SELECT $1::int4 * 2, $1::int4::text || '-' || pg_backend_pid()")
        .await
        .expect("prepare");
    let results = bounded(
        "50 pipelined queries",
        30,
        join_all((0..50i32).map(|i| {
            let c = &c;
            let stmt = &stmt;
            async move { c.query_one(stmt, &[&i]).await }
        })),
    )
    .await;
    for (i, r) in results.into_iter().enumerate() {
        let row = r.unwrap_or_else(|e| panic!("pipelined query {i}: {e:?}"));
        assert_eq!(row.get::<_, i32>(0), 2 * i as i32, "answer {i}");
        assert!(row.get::<_, &str>(1).starts_with(&format!("{i}-")));
    }

    // The same with unprepared (string) queries, each its own Parse.
    let results = bounded(
        "50 pipelined string queries",
        30,
        join_all((0..50i32).map(|i| {
            let c = &c;
            async move { c.query_one("SELECT $1::int4 + 1000", &[&i]).await }
        })),
    )
    .await;
    for (i, r) in results.into_iter().enumerate() {
        let row = r.unwrap_or_else(|e| panic!("pipelined string query {i}: {e:?}"));
        assert_eq!(row.get::<_, i32>(0), 1000 + i as i32);
    }
    assert_servers_back_in_pool(&proxy, "pipelined queries").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_batch_with_a_failing_query_fails_only_that_query() {
    let proxy = TestProxy::start("").await;
    let c = proxy.connect().await;
    let stmt = c.prepare("SELECT 1000 / $1::int4").await.expect("prepare");
    let divisors = [1i32, 2, 4, 0, 5, 8, 10];
    let results = bounded(
        "pipelined batch",
        30,
        join_all(divisors.iter().map(|d| {
            let c = &c;
            let stmt = &stmt;
            async move { c.query_one(stmt, &[d]).await }
        })),
    )
    .await;
    for (d, r) in divisors.iter().zip(results) {
        if *d == 0 {
            expect_sqlstate(r, "22012", "the failing query");
        } else {
            let row = r.unwrap_or_else(|e| panic!("1000 / {d}: {e:?}"));
            assert_eq!(row.get::<_, i32>(0), 1000 / d);
        }
    }
    let row = c.query_one(&stmt, &[&3i32]).await.expect("usable after");
    assert_eq!(row.get::<_, i32>(0), 333);
    assert_servers_back_in_pool(&proxy, "a pipelined batch with an error").await;
}

// ----- 6. COPY -----------------------------------------------------------------------

/// COPY text rows `0..n` for `(id int, name text, payload bytea)`, with an
/// escaped newline and tab in the text and a bytea in hex, all in the form
/// COPY TO writes, so COPY OUT must return the same bytes.
fn copy_rows(range: std::ops::Range<i32>) -> Vec<u8> {
    let mut out = Vec::new();
    for i in range {
        out.extend_from_slice(
            format!(
                "{i}\tname {i} ü\\nline\\ttab\t\\\\x{:02x}{:02x}00ff\n",
                i % 256,
                (i / 256) % 256
            )
            .as_bytes(),
        );
    }
    out
}

async fn copy_table(c: &tokio_postgres::Client, table: &str) {
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; \
         CREATE TABLE {table} (id int PRIMARY KEY, name text NOT NULL, payload bytea)"
    ))
    .await
    .expect("create COPY table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_copy_out_round_trip() {
    const N: i32 = 100_000;
    let proxy = TestProxy::start("").await;
    let c = proxy.connect().await;
    copy_table(&c, "transp_copy").await;
    let data = copy_rows(0..N);

    let copied = bounded("COPY IN of 100k rows", 60, async {
        let sink = c
            .copy_in::<_, Bytes>("COPY transp_copy FROM STDIN")
            .await
            .expect("COPY FROM STDIN");
        let mut sink = std::pin::pin!(sink);
        // Chunks that do not align with rows, as drivers do.
        for chunk in data.chunks(64 * 1024 + 7) {
            sink.as_mut()
                .send(Bytes::copy_from_slice(chunk))
                .await
                .expect("CopyData");
        }
        sink.as_mut().finish().await.expect("COPY IN finish")
    })
    .await;
    assert_eq!(copied, N as u64);

    let row = c
        .query_one(
            "SELECT count(*), sum(id)::int8, sum(length(payload))::int8 FROM transp_copy",
            &[],
        )
        .await
        .expect("count after COPY");
    assert_eq!(row.get::<_, i64>(0), i64::from(N));
    assert_eq!(row.get::<_, i64>(1), i64::from(N) * i64::from(N - 1) / 2);
    assert_eq!(row.get::<_, i64>(2), i64::from(N) * 4);
    let row = c
        .query_one(
            "SELECT name, encode(payload, 'hex') FROM transp_copy WHERE id = 258",
            &[],
        )
        .await
        .expect("one row");
    assert_eq!(row.get::<_, &str>(0), "name 258 ü\nline\ttab");
    assert_eq!(row.get::<_, &str>(1), "020100ff");

    let out = bounded("COPY OUT of 100k rows", 60, async {
        let stream = c
            .copy_out("COPY (SELECT * FROM transp_copy ORDER BY id) TO STDOUT")
            .await
            .expect("COPY TO STDOUT");
        let mut stream = std::pin::pin!(stream);
        let mut out = Vec::with_capacity(data.len());
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.expect("CopyData"));
        }
        out
    })
    .await;
    assert_eq!(out.len(), data.len(), "COPY OUT size");
    assert!(out == data, "COPY OUT bytes differ from what COPY IN sent");

    let row = c
        .query_one("SELECT 5", &[])
        .await
        .expect("usable after COPY");
    assert_eq!(row.get::<_, i32>(0), 5);
}

#[tokio::test]
async fn copy_in_abandoned_mid_way_fails_and_changes_nothing() {
    let proxy = TestProxy::start("").await;
    let c = proxy.connect().await;
    copy_table(&c, "transp_copy_abort").await;
    c.batch_execute("INSERT INTO transp_copy_abort SELECT g, 'before', NULL FROM generate_series(1000000, 1000009) g")
        .await
        .expect("seed rows");

    // Dropping the sink unfinished makes tokio-postgres send CopyFail.
    bounded("abandoned COPY", 30, async {
        let sink = c
            .copy_in::<_, Bytes>("COPY transp_copy_abort FROM STDIN")
            .await
            .expect("COPY FROM STDIN");
        let mut sink = Box::pin(sink);
        sink.as_mut()
            .send(Bytes::from(copy_rows(0..5000)))
            .await
            .expect("CopyData");
        drop(sink);
    })
    .await;
    let row = bounded(
        "query after CopyFail",
        30,
        c.query_one("SELECT count(*) FROM transp_copy_abort", &[]),
    )
    .await
    .expect("connection usable after CopyFail");
    assert_eq!(
        row.get::<_, i64>(0),
        10,
        "the aborted COPY inserted nothing"
    );
}

#[tokio::test]
async fn copy_in_with_malformed_data_fails_and_changes_nothing() {
    let proxy = TestProxy::start("").await;
    let c = proxy.connect().await;
    copy_table(&c, "transp_copy_bad").await;
    c.batch_execute("INSERT INTO transp_copy_bad SELECT g, 'before', NULL FROM generate_series(1000000, 1000009) g")
        .await
        .expect("seed rows");

    let result = bounded("malformed COPY", 30, async {
        let sink = c
            .copy_in::<_, Bytes>("COPY transp_copy_bad FROM STDIN")
            .await
            .expect("COPY FROM STDIN");
        let mut sink = std::pin::pin!(sink);
        let mut data = copy_rows(0..2000);
        data.extend_from_slice(b"not-a-number\tbad row\t\\N\n");
        data.extend_from_slice(&copy_rows(2000..4000));
        // Errors surface either on a send (the server already answered) or
        // on finish.
        for chunk in data.chunks(8 * 1024) {
            sink.as_mut().send(Bytes::copy_from_slice(chunk)).await?;
        }
        sink.as_mut().finish().await
    })
    .await;
    expect_sqlstate(result, "22P02", "COPY with a non-integer id");

    let row = bounded(
        "query after failed COPY",
        30,
        c.query_one("SELECT count(*) FROM transp_copy_bad", &[]),
    )
    .await
    .expect("connection usable after a failed COPY");
    assert_eq!(row.get::<_, i64>(0), 10, "the failed COPY inserted nothing");
}

/// With one server in the pool, a second client can only run once the first
/// client's COPY has finished and its server went back to the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_returns_the_server_to_the_pool() {
    let proxy =
        TestProxy::start("pool_size = 1\nmax_pool_size = 1\ncheckout_timeout = \"3s\"").await;
    let a = proxy.connect().await;
    copy_table(&a, "transp_copy_release").await;
    bounded("COPY IN", 30, async {
        let sink = a
            .copy_in::<_, Bytes>("COPY transp_copy_release FROM STDIN")
            .await
            .expect("COPY FROM STDIN");
        let mut sink = std::pin::pin!(sink);
        sink.as_mut()
            .send(Bytes::from(copy_rows(0..100)))
            .await
            .expect("CopyData");
        assert_eq!(sink.as_mut().finish().await.expect("finish"), 100);
    })
    .await;

    let b = proxy.connect().await;
    let r = bounded(
        "second client after COPY",
        30,
        b.query_one("SELECT count(*) FROM transp_copy_release", &[]),
    )
    .await;
    match r {
        Ok(row) => assert_eq!(row.get::<_, i64>(0), 100),
        Err(e) => panic!(
            "client A is idle after its COPY but client B cannot get the pool's only server: {e:?}"
        ),
    }
    let row = a.query_one("SELECT 1", &[]).await.expect("A still usable");
    assert_eq!(row.get::<_, i32>(0), 1);
}

/// Waits until PostgreSQL runs `sql` (a cancel sent earlier would find no
/// query to stop).
async fn wait_until_running(direct: &tokio_postgres::Client, sql: &str) {
    eventually(
        "the query running on the server",
        Duration::from_secs(5),
        || async {
            direct
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'",
                    &[&sql],
                )
                .await
                .map(|r| r.get::<_, i64>(0) == 1)
                .unwrap_or(false)
        },
    )
    .await;
}

// ----- 7. cancel -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_query() {
    let proxy = TestProxy::start("").await;
    let c = proxy.connect().await;
    let direct = superuser(0).await;
    let token = c.cancel_token();
    let sql = "SELECT pg_sleep(30) /* transp_cancel_running */";

    let started = Instant::now();
    let (result, cancelled) = bounded("cancelled pg_sleep(30)", 20, async {
        tokio::join!(c.simple_query(sql), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            wait_until_running(&direct, sql).await;
            token.cancel_query(NoTls).await
        })
    })
    .await;
    cancelled.expect("cancel request through pgsluice");
    expect_sqlstate(result, "57014", "cancelled query");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        started.elapsed()
    );

    let row = c
        .query_one("SELECT 8", &[])
        .await
        .expect("usable after cancel");
    assert_eq!(row.get::<_, i32>(0), 8);
    assert_servers_back_in_pool(&proxy, "a cancelled query").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_idle_is_harmless() {
    let proxy = TestProxy::start("").await;
    let c = proxy.connect().await;
    let row = c.query_one("SELECT 1", &[]).await.expect("first query");
    assert_eq!(row.get::<_, i32>(0), 1);

    bounded("idle cancel", 10, c.cancel_token().cancel_query(NoTls))
        .await
        .expect("cancel request while idle");
    // A late or misdirected cancel would hit this short sleep.
    let row = bounded(
        "query after idle cancel",
        10,
        c.query_one("SELECT pg_sleep(0.3), 42", &[]),
    )
    .await
    .expect("a query after an idle cancel is not cancelled");
    assert_eq!(row.get::<_, i32>(1), 42);

    // And the client can still cancel for real afterwards.
    let direct = superuser(0).await;
    let sql = "SELECT pg_sleep(30) /* transp_cancel_after_idle */";
    let token = c.cancel_token();
    let started = Instant::now();
    let (result, cancelled) = bounded("cancel after idle cancel", 20, async {
        tokio::join!(c.simple_query(sql), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            wait_until_running(&direct, sql).await;
            token.cancel_query(NoTls).await
        })
    })
    .await;
    cancelled.expect("cancel request");
    expect_sqlstate(result, "57014", "cancelled query");
    assert!(started.elapsed() < Duration::from_secs(5));
}

// ----- 8. session mode state ----------------------------------------------------------

const SESSION_STMT: &str = "SELECT $1::int4 + 1, pg_backend_pid()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_state_until_disconnect_then_discards_it() {
    let proxy = TestProxy::start(
        "pool_mode = \"session\"\npool_size = 1\nmax_pool_size = 1\ncheckout_timeout = \"10s\"",
    )
    .await;
    let mut a = proxy.connect().await;
    let pid: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let stmt = a.prepare(SESSION_STMT).await.expect("prepare");
    a.batch_execute("CREATE TEMP TABLE transp_session_tmp (x int)")
        .await
        .expect("temp table");
    for i in 0..5i32 {
        let tx = a.transaction().await.expect("BEGIN");
        tx.execute("INSERT INTO transp_session_tmp VALUES ($1)", &[&i])
            .await
            .expect("insert into temp table");
        let row = tx
            .query_one(&stmt, &[&i])
            .await
            .expect("prepared statement in a transaction");
        assert_eq!(row.get::<_, i32>(0), i + 1);
        assert_eq!(
            row.get::<_, i32>(1),
            pid,
            "one server for the whole session"
        );
        tx.commit().await.expect("COMMIT");
        let row = a
            .query_one(&stmt, &[&(i * 10)])
            .await
            .expect("prepared statement between transactions");
        assert_eq!(row.get::<_, i32>(0), i * 10 + 1);
    }
    let row = a
        .query_one(
            "SELECT count(*), (SELECT count(*) FROM pg_prepared_statements WHERE statement = $1) \
             FROM transp_session_tmp",
            &[&SESSION_STMT],
        )
        .await
        .expect("session state");
    assert_eq!(row.get::<_, i64>(0), 5);
    assert_eq!(
        row.get::<_, i64>(1),
        1,
        "the prepared statement lives on the server"
    );
    drop(stmt);
    drop(a);

    // The pool's only server goes to the next client, cleaned.
    let b = proxy.connect().await;
    let pid_b: i32 = bounded(
        "second client checkout",
        20,
        b.query_one("SELECT pg_backend_pid()", &[]),
    )
    .await
    .expect("pid")
    .get(0);
    assert_eq!(
        pid_b, pid,
        "pool_size = 1: the same server serves the next client"
    );
    expect_sqlstate(
        b.simple_query("SELECT * FROM transp_session_tmp").await,
        "42P01",
        "temp table of the previous client",
    );
    let prepared = text_value(&b, "SELECT count(*) FROM pg_prepared_statements").await;
    assert_eq!(
        prepared.as_deref(),
        Some("0"),
        "previous client's statements were discarded"
    );
}

// ----- 9. NOTIFY ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_a_listener_in_session_mode() {
    let proxy = TestProxy::start("pool_mode = \"session\"").await;
    let (a, mut conn) = tokio_postgres::connect(&proxy.conninfo(), NoTls)
        .await
        .expect("listener connects");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    a.batch_execute("LISTEN transp_ch").await.expect("LISTEN");

    let b = proxy.connect().await;
    let b_pid: i32 = b
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    b.batch_execute("NOTIFY transp_ch, 'hi'")
        .await
        .expect("NOTIFY");
    let n = bounded("notification", 5, rx.recv())
        .await
        .expect("listener alive");
    assert_eq!(n.channel(), "transp_ch");
    assert_eq!(n.payload(), "hi");
    assert_eq!(n.process_id(), b_pid, "the notifying server's pid");

    // Sent inside a transaction: delivered at commit, payload intact.
    b.batch_execute("BEGIN; SELECT pg_notify('transp_ch', 'second ü 🦀'); COMMIT")
        .await
        .expect("pg_notify in a transaction");
    let n = bounded("second notification", 5, rx.recv())
        .await
        .expect("listener alive");
    assert_eq!(n.payload(), "second ü 🦀");

    let row = a.query_one("SELECT 1", &[]).await.expect("listener usable");
    assert_eq!(row.get::<_, i32>(0), 1);
    assert!(rx.try_recv().is_err(), "no spurious notifications");
}

// ----- 10. server parameters -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_parameters_match_postgresql() {
    const APP: &str = "transp_params_app";
    let proxy = TestProxy::start("pool_size = 1\nmax_pool_size = 1").await;
    let direct = superuser(0).await;
    let server_version: String = direct
        .query_one("SHOW server_version", &[])
        .await
        .expect("direct SHOW")
        .get(0);
    assert!(
        server_version.starts_with("15"),
        "server_version {server_version}"
    );

    let (c, conn) = tokio_postgres::connect(
        &format!("{} application_name={APP}", proxy.conninfo()),
        NoTls,
    )
    .await
    .expect("connect with application_name");
    // ParameterStatus in the welcome, as PostgreSQL sends them.
    assert_eq!(
        conn.parameter("server_version"),
        Some(server_version.as_str())
    );
    assert_eq!(conn.parameter("client_encoding"), Some("UTF8"));
    assert_eq!(conn.parameter("application_name"), Some(APP));
    let direct_integer_datetimes = text_value(&direct, "SHOW integer_datetimes").await;
    assert_eq!(
        conn.parameter("integer_datetimes"),
        direct_integer_datetimes.as_deref()
    );
    tokio::spawn(async move {
        let _ = conn.await;
    });

    assert_eq!(
        text_value(&c, "SHOW server_version").await.as_deref(),
        Some(server_version.as_str())
    );
    let row = c
        .query_one(
            "SELECT current_setting('client_encoding'), current_setting('application_name'), \
                    (SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid())",
            &[],
        )
        .await
        .expect("settings");
    assert_eq!(row.get::<_, &str>(0), "UTF8");
    assert_eq!(row.get::<_, &str>(1), APP);
    assert_eq!(row.get::<_, &str>(2), APP);

    // Seen from outside while the query runs.
    let sql = "SELECT pg_sleep(1.5) /* transp_params */";
    let (slept, seen) = bounded("observed query", 20, async {
        tokio::join!(c.simple_query(sql), async {
            let deadline = Instant::now() + Duration::from_millis(1400);
            loop {
                let row = direct
                    .query_opt(
                        "SELECT application_name FROM pg_stat_activity \
                         WHERE query = $1 AND state = 'active'",
                        &[&sql],
                    )
                    .await
                    .expect("pg_stat_activity");
                if let Some(row) = row {
                    return Some(row.get::<_, String>(0));
                }
                if Instant::now() > deadline {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    })
    .await;
    slept.expect("pg_sleep");
    assert_eq!(
        seen.as_deref(),
        Some(APP),
        "pg_stat_activity while the query runs"
    );

    // The next client on the same (only) server does not inherit the name.
    let other = proxy.connect().await;
    let default_app = text_value(
        &direct,
        "SELECT reset_val FROM pg_settings WHERE name = 'application_name'",
    )
    .await;
    assert_eq!(
        text_value(&other, "SELECT current_setting('application_name')").await,
        default_app,
        "a client without application_name gets PostgreSQL's default"
    );
}

// ----- 11. empty query --------------------------------------------------------------

/// A bare protocol client: logs in (cleartext or SCRAM) and returns the
/// exact message tags of each answer.
struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
}

impl RawClient {
    async fn connect(addr: std::net::SocketAddr, user: &str, password: &str) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("raw connect");
        let mut c = RawClient {
            stream,
            buf: BytesMut::new(),
        };
        let mut out = BytesMut::new();
        frontend::startup_message([("user", user), ("database", APP_DB)], &mut out).unwrap();
        c.send(&out).await;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = c.read_message().await;
            match tag {
                b'R' => {
                    let code = i32::from_be_bytes(body[..4].try_into().unwrap());
                    let data = &body[4..];
                    out.clear();
                    match code {
                        0 => continue,
                        3 => frontend::password_message(password.as_bytes(), &mut out).unwrap(),
                        10 => {
                            let s = ScramSha256::new(
                                password.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                                .unwrap();
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().expect("SASL started");
                            s.update(data).expect("SCRAM server-first");
                            frontend::sasl_response(s.message(), &mut out).unwrap();
                        }
                        12 => {
                            scram
                                .as_mut()
                                .expect("SASL started")
                                .finish(data)
                                .expect("SCRAM server-final");
                            continue;
                        }
                        other => panic!("unexpected authentication request {other}"),
                    }
                    c.send(&out).await;
                }
                b'E' => panic!("login refused: {}", String::from_utf8_lossy(&body)),
                b'Z' => return c,
                _ => {}
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("raw write");
    }

    async fn read_message(&mut self) -> (u8, Bytes) {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() > len {
                    let tag = self.buf[0];
                    let mut msg = self.buf.split_to(len + 1);
                    msg.advance(5);
                    return (tag, msg.freeze());
                }
            }
            let n = bounded("raw read", 10, self.stream.read_buf(&mut self.buf))
                .await
                .expect("raw read");
            assert!(n > 0, "server closed the connection");
        }
    }

    /// Sends `request` and returns the tags of every message up to and
    /// including ReadyForQuery (`expected_ready` of them).
    async fn exchange(&mut self, request: &[u8], expected_ready: usize) -> Vec<char> {
        self.send(request).await;
        let mut tags = Vec::new();
        let mut ready = 0;
        while ready < expected_ready {
            let (tag, _) = self.read_message().await;
            tags.push(tag as char);
            if tag == b'Z' {
                ready += 1;
            }
        }
        tags
    }
}

/// Bind of the unnamed statement to the unnamed portal, no parameters.
fn bind_unnamed(out: &mut BytesMut) {
    out.put_u8(b'B');
    out.put_u32(4 + 1 + 1 + 2 + 2 + 2);
    out.put_u8(0);
    out.put_u8(0);
    out.put_i16(0);
    out.put_i16(0);
    out.put_i16(0);
}

async fn empty_query_exchanges(c: &mut RawClient) -> Vec<Vec<char>> {
    let mut answers = Vec::new();
    for sql in ["", "   ", ";"] {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).unwrap();
        answers.push(c.exchange(&out, 1).await);
    }
    let mut out = BytesMut::new();
    frontend::parse("", "", [], &mut out).unwrap();
    bind_unnamed(&mut out);
    frontend::describe(b'P', "", &mut out).unwrap();
    frontend::execute("", 0, &mut out).unwrap();
    frontend::sync(&mut out);
    answers.push(c.exchange(&out, 1).await);
    let mut out = BytesMut::new();
    frontend::query("SELECT 1", &mut out).unwrap();
    answers.push(c.exchange(&out, 1).await);
    answers
}

#[tokio::test]
async fn empty_query_answers_empty_query_response() {
    let proxy = TestProxy::start("").await;

    // tokio-postgres maps EmptyQueryResponse to CommandComplete(0).
    let c = proxy.connect().await;
    let msgs = c.simple_query("").await.expect("empty query");
    assert_eq!(msgs.len(), 1);
    assert!(matches!(msgs[0], SimpleQueryMessage::CommandComplete(0)));
    assert_eq!(
        text_value(&c, "SELECT 'after'").await.as_deref(),
        Some("after")
    );

    // The exact messages, compared with PostgreSQL's own.
    let mut through = RawClient::connect(proxy.addr, APP_USER, APP_PASSWORD).await;
    let got = empty_query_exchanges(&mut through).await;
    let primary = tokio::task::spawn_blocking(cluster)
        .await
        .unwrap()
        .primary()
        .addr();
    let mut direct = RawClient::connect(primary, APP_USER, APP_PASSWORD).await;
    let want = empty_query_exchanges(&mut direct).await;
    assert_eq!(want[0], ['I', 'Z'], "PostgreSQL's answer to an empty Query");
    assert_eq!(
        got, want,
        "pgsluice answers empty queries exactly as PostgreSQL"
    );
}
