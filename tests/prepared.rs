//! Named prepared statements across pooled servers in transaction mode:
//! drivers prepare on one server and execute on another; pgsluice prepares
//! on demand, shares one server statement between clients, answers Parse /
//! Close in order, and keeps PostgreSQL's error semantics.

mod support;

use std::time::Duration;

use support::raw::{Raw, message};
use support::*;

async fn pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_prepared_on_one_server_runs_on_another() {
    let proxy = TestProxy::start("pool_size = 2\nmax_pool_size = 2").await;
    let a = proxy.connect().await;
    let b = proxy.connect().await;
    let stmt = a
        .prepare("SELECT $1::int4 * 2, pg_backend_pid()")
        .await
        .unwrap();
    let first: i32 = a.query_one(&stmt, &[&21i32]).await.unwrap().get(1);
    // B holds that server in a transaction: A's next execution lands on the other one.
    b.batch_execute("BEGIN").await.unwrap();
    let b_pid = pid(&b).await;
    assert_eq!(b_pid, first, "LIFO: B took the server A prepared on");
    let row = a.query_one(&stmt, &[&5i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 10);
    assert_ne!(row.get::<_, i32>(1), b_pid, "ran on the other server");
    b.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_few_servers_with_prepared_statements() {
    let proxy = TestProxy::start("pool_size = 3\nmax_pool_size = 3").await;
    let mut tasks = Vec::new();
    for i in 0..30i32 {
        let conninfo = proxy.conninfo();
        tasks.push(tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let s1 = c.prepare("SELECT $1::int4 + 1").await.unwrap();
            let s2 = c
                .prepare(&format!("SELECT $1::text || '-{i}'"))
                .await
                .unwrap();
            for j in 0..40i32 {
                let v: i32 = c.query_one(&s1, &[&j]).await.unwrap().get(0);
                assert_eq!(v, j + 1);
                let t: String = c.query_one(&s2, &[&"x"]).await.unwrap().get(0);
                assert_eq!(t, format!("x-{i}"));
                if j % 10 == 0 {
                    let tx = c.simple_query("BEGIN; SELECT 1; COMMIT").await;
                    assert!(tx.is_ok());
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    // One server statement per distinct text and server, not per client.
    let su = superuser(0).await;
    let n: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(n >= 1);
}

#[tokio::test]
async fn two_clients_same_sql_share_one_server_statement() {
    let proxy = TestProxy::start("pool_size = 1\nmax_pool_size = 1").await;
    let a = proxy.connect().await;
    let b = proxy.connect().await;
    let sa = a.prepare("SELECT 'shared'::text").await.unwrap();
    let sb = b.prepare("SELECT 'shared'::text").await.unwrap();
    a.query_one(&sa, &[]).await.unwrap();
    b.query_one(&sb, &[]).await.unwrap();
    let rows = a
        .simple_query(
            "SELECT name FROM pg_prepared_statements WHERE statement = 'SELECT ''shared''::text'",
        )
        .await
        .unwrap();
    let names: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("PGSLUICE_"), "{names:?}");
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = cstr(name);
    b.extend(cstr(sql));
    b.extend(0i16.to_be_bytes());
    message(b'P', &b)
}

fn bind(stmt: &str) -> Vec<u8> {
    let mut b = cstr("");
    b.extend(cstr(stmt));
    b.extend(0i16.to_be_bytes());
    b.extend(0i16.to_be_bytes());
    b.extend(0i16.to_be_bytes());
    message(b'B', &b)
}

fn execute() -> Vec<u8> {
    let mut b = cstr("");
    b.extend(0i32.to_be_bytes());
    message(b'E', &b)
}

fn close(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstr(name));
    message(b'C', &b)
}

fn sync() -> Vec<u8> {
    message(b'S', &[])
}

async fn replies(c: &mut Raw) -> Vec<(char, Option<String>)> {
    let mut got = Vec::new();
    while let Some(m) = c.recv(Duration::from_secs(5)).await {
        got.push((m.tag as char, m.sqlstate()));
        if m.tag == b'Z' {
            break;
        }
    }
    got
}

/// The reply tags up to ReadyForQuery, and the column count of the first
/// DataRow among them.
async fn row_width(c: &mut Raw) -> (String, Option<i16>) {
    let mut tags = String::new();
    let mut width = None;
    while let Some(m) = c.recv(Duration::from_secs(5)).await {
        tags.push(m.tag as char);
        if m.tag == b'D' && width.is_none() {
            width = Some(i16::from_be_bytes([m.body[0], m.body[1]]));
        }
        if m.tag == b'Z' {
            break;
        }
    }
    (tags, width)
}

fn tags(r: &[(char, Option<String>)]) -> String {
    r.iter().map(|(t, _)| *t).collect()
}

#[tokio::test]
async fn parse_close_and_errors_answer_in_order_like_postgres() {
    let proxy = TestProxy::start("pool_size = 1\nmax_pool_size = 1").await;
    let mut c = Raw::login(proxy.addr).await;

    // Parse + Bind + Execute + Sync on a fresh name.
    let mut batch = parse("s1", "SELECT 1");
    batch.extend(bind("s1"));
    batch.extend(execute());
    batch.extend(sync());
    c.send(&batch).await;
    assert_eq!(tags(&replies(&mut c).await), "12DCZ");

    // The same name again: 42P05, and the rest up to Sync is skipped.
    let mut batch = parse("s1", "SELECT 2");
    batch.extend(bind("s1"));
    batch.extend(execute());
    batch.extend(sync());
    c.send(&batch).await;
    let r = replies(&mut c).await;
    assert_eq!(tags(&r), "EZ");
    assert_eq!(r[0].1.as_deref(), Some("42P05"));

    // Close forgets the client's name; closing it twice is not an error.
    let mut batch = close("s1");
    batch.extend(close("s1"));
    batch.extend(bind("s1"));
    batch.extend(execute());
    batch.extend(sync());
    c.send(&batch).await;
    let r = replies(&mut c).await;
    assert_eq!(tags(&r), "33EZ", "{r:?}");
    assert_eq!(r[2].1.as_deref(), Some("26000"));

    // An error early in a pipeline: synthetic replies behind it vanish too,
    // and the name parsed after the error does not exist afterwards.
    let mut batch = parse("ok", "SELECT 1");
    batch.extend(sync());
    c.send(&batch).await;
    assert_eq!(tags(&replies(&mut c).await), "1Z");
    let mut batch = parse("bad", "SELEC nonsense");
    batch.extend(parse("later", "SELECT 3"));
    batch.extend(close("ok"));
    batch.extend(sync());
    c.send(&batch).await;
    let r = replies(&mut c).await;
    assert_eq!(tags(&r), "EZ", "{r:?}");
    assert_eq!(r[0].1.as_deref(), Some("42601"));
    let mut batch = bind("later");
    batch.extend(execute());
    batch.extend(sync());
    c.send(&batch).await;
    let r = replies(&mut c).await;
    assert_eq!(r[0].1.as_deref(), Some("26000"), "{r:?}");
    // ...and "ok" was not closed.
    let mut batch = bind("ok");
    batch.extend(execute());
    batch.extend(sync());
    c.send(&batch).await;
    assert_eq!(tags(&replies(&mut c).await), "2DCZ");

    // Re-parsing a name whose text the server already holds: synthetic ParseComplete.
    let mut batch = parse("again", "SELECT 1");
    batch.extend(bind("again"));
    batch.extend(execute());
    batch.extend(sync());
    c.send(&batch).await;
    assert_eq!(tags(&replies(&mut c).await), "12DCZ");
}

#[tokio::test]
async fn eviction_keeps_statements_working() {
    let proxy =
        TestProxy::start("pool_size = 1\nmax_pool_size = 1\nmax_prepared_statements = 5").await;
    let c = proxy.connect().await;
    let mut stmts = Vec::new();
    for i in 0..12 {
        stmts.push(c.prepare(&format!("SELECT {i}::int4")).await.unwrap());
    }
    for round in 0..3 {
        for (i, s) in stmts.iter().enumerate() {
            let v: i32 = c.query_one(s, &[]).await.unwrap().get(0);
            assert_eq!(v, i as i32, "round {round}");
        }
    }
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'PGSLUICE_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        (1..=6).contains(&n),
        "the server holds {n} pgsluice statements; the cap is 5 (+1 in use)"
    );
}

#[tokio::test]
async fn discard_all_forgets_the_clients_statements() {
    let proxy = TestProxy::start("pool_size = 1\nmax_pool_size = 1").await;
    let mut c = Raw::login(proxy.addr).await;
    let mut batch = parse("d1", "SELECT 1");
    batch.extend(sync());
    c.send(&batch).await;
    assert_eq!(tags(&replies(&mut c).await), "1Z");
    c.send(&support::raw::query("DISCARD ALL")).await;
    assert_eq!(tags(&replies(&mut c).await), "CZ");
    let mut batch = bind("d1");
    batch.extend(execute());
    batch.extend(sync());
    c.send(&batch).await;
    let r = replies(&mut c).await;
    assert_eq!(r[0].1.as_deref(), Some("26000"), "{r:?}");
    // And the name can be used again.
    let mut batch = parse("d1", "SELECT 2");
    batch.extend(bind("d1"));
    batch.extend(execute());
    batch.extend(sync());
    c.send(&batch).await;
    assert_eq!(tags(&replies(&mut c).await), "12DCZ");
}

#[tokio::test]
async fn unnamed_statement_bound_in_a_later_request_is_the_clients_own() {
    // libpq's PQprepare(""), pgx's describe-then-execute: Parse of the unnamed
    // statement in one request, Bind in the next, possibly on another server.
    let proxy = TestProxy::start("pool_size = 1\nmax_pool_size = 1").await;
    let mut a = Raw::login(proxy.addr).await;
    let mut b = Raw::login(proxy.addr).await;
    let mut batch = parse("", "SELECT 'mine'::text");
    batch.extend(sync());
    a.send(&batch).await;
    assert_eq!(tags(&replies(&mut a).await), "1Z");
    // Another client replaces the server's unnamed statement meanwhile.
    let mut batch = parse("", "SELECT 'theirs'::text");
    batch.extend(sync());
    b.send(&batch).await;
    assert_eq!(tags(&replies(&mut b).await), "1Z");
    // A's Bind runs A's statement, not B's.
    let mut batch = bind("");
    batch.extend(execute());
    batch.extend(sync());
    a.send(&batch).await;
    let mut rows = Vec::new();
    while let Some(m) = a.recv(Duration::from_secs(5)).await {
        if m.tag == b'D' {
            rows.push(String::from_utf8_lossy(&m.body[6..]).into_owned());
        }
        if m.tag == b'Z' {
            break;
        }
    }
    assert_eq!(rows, vec!["mine".to_owned()]);
    // A simple query destroys the unnamed statement, as in PostgreSQL.
    a.send(&support::raw::query("SELECT 1")).await;
    replies(&mut a).await;
    let mut batch = bind("");
    batch.extend(execute());
    batch.extend(sync());
    a.send(&batch).await;
    let r = replies(&mut a).await;
    assert_eq!(r[0].1.as_deref(), Some("26000"), "{r:?}");
}

/// Deep pipelines: 100 requests of 10 statements each (Parse on first use,
/// Bind, Execute, sometimes Close), names drawn at random from a working
/// set larger than `max_prepared_statements`, from three clients sharing
/// two servers, every request sent in one write with one Sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_pipelines_over_a_small_statement_cache() {
    use rand::{Rng, SeedableRng};
    let proxy =
        TestProxy::start("pool_size = 2\nmax_pool_size = 2\nmax_prepared_statements = 8").await;
    let mut tasks = Vec::new();
    for client in 0..3u64 {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(client);
            let mut c = Raw::login(addr).await;
            let mut known = std::collections::HashSet::new();
            for iteration in 0..100 {
                let mut batch = Vec::new();
                let mut expect_tags = String::new();
                let mut expect_rows = Vec::new();
                for _ in 0..10 {
                    let n: u32 = rng.random_range(0..30);
                    let name = format!("st{n}_{}", rng.random_range(0..2));
                    if known.insert(name.clone()) {
                        batch.extend(parse(&name, &format!("SELECT {n} + {client}000")));
                        expect_tags.push('1');
                    }
                    batch.extend(bind(&name));
                    batch.extend(execute());
                    expect_tags.push_str("2DC");
                    expect_rows.push((n + client as u32 * 1000).to_string());
                    if rng.random_bool(0.1) {
                        batch.extend(close(&name));
                        known.remove(&name);
                        expect_tags.push('3');
                    }
                }
                batch.extend(sync());
                expect_tags.push('Z');
                c.send(&batch).await;
                let mut tags = String::new();
                let mut rows = Vec::new();
                while let Some(m) = c.recv(Duration::from_secs(10)).await {
                    tags.push(m.tag as char);
                    if m.tag == b'D' {
                        rows.push(String::from_utf8_lossy(&m.body[6..]).into_owned());
                    }
                    if m.tag == b'E' {
                        panic!("client {client} iteration {iteration}: {:?}", m.field(b'M'));
                    }
                    if m.tag == b'Z' {
                        break;
                    }
                }
                assert_eq!(tags, expect_tags, "client {client} iteration {iteration}");
                assert_eq!(rows, expect_rows, "client {client} iteration {iteration}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("pipeline client");
    }
    let stats = &proxy.shared.stats.prepared;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        get(&stats.evictions) > 0,
        "the working set exceeds the cache"
    );
    assert!(get(&stats.client_parses) > 0 && get(&stats.server_parses) > 0);
}

async fn first_value(
    c: &tokio_postgres::Client,
    sql: &str,
) -> Result<String, tokio_postgres::Error> {
    let rows = c.simple_query(sql).await?;
    Ok(rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_default())
}

/// SQL-level PREPARE / EXECUTE / DEALLOCATE follow their client to any
/// server, and one client never runs another's statement of the same name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_level_prepare_runs_on_any_server() {
    let proxy = TestProxy::start("pool_size = 2\nmax_pool_size = 2").await;
    let a = proxy.connect().await;
    let b = proxy.connect().await;
    a.batch_execute("PREPARE q (int) AS SELECT $1 * 2")
        .await
        .unwrap();
    let a_pid = first_value(&a, "SELECT pg_backend_pid()").await.unwrap();
    // B takes A's server; A's EXECUTE runs on the other one.
    b.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        first_value(&b, "SELECT pg_backend_pid()").await.unwrap(),
        a_pid
    );
    assert_eq!(first_value(&a, "EXECUTE q(21)").await.unwrap(), "42");
    assert_ne!(
        first_value(&a, "SELECT pg_backend_pid()").await.unwrap(),
        a_pid
    );
    // B never prepared q, although its server holds A's.
    let e = b.batch_execute("EXECUTE q(1)").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("26000"), "{e}");
    b.batch_execute("ROLLBACK").await.unwrap();
    // B's own q, then both on whichever server.
    b.batch_execute("PREPARE q AS SELECT 'b'").await.unwrap();
    for _ in 0..3 {
        assert_eq!(first_value(&b, "EXECUTE q").await.unwrap(), "b");
        assert_eq!(first_value(&a, "EXECUTE q(5)").await.unwrap(), "10");
    }
    // PostgreSQL's errors.
    let e = a.batch_execute("PREPARE q AS SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42P05"), "{e}");
    let e = a.batch_execute("PREPARE bad AS SELEC 1").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42601"), "{e}");
    let e = a.batch_execute("EXECUTE bad").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("26000"), "{e}");
    a.batch_execute("DEALLOCATE q").await.unwrap();
    let e = a.batch_execute("EXECUTE q(1)").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("26000"), "{e}");
    assert_eq!(first_value(&b, "EXECUTE q").await.unwrap(), "b");
    // The same name again, and DEALLOCATE ALL.
    a.batch_execute("PREPARE q AS SELECT 'again'")
        .await
        .unwrap();
    assert_eq!(first_value(&a, "EXECUTE q").await.unwrap(), "again");
    a.batch_execute("DEALLOCATE ALL").await.unwrap();
    let e = a.batch_execute("EXECUTE q").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("26000"), "{e}");
    assert_eq!(first_value(&b, "EXECUTE q").await.unwrap(), "b");
    // Through the extended protocol (at the start of a request).
    a.batch_execute("PREPARE e1 AS SELECT 7").await.unwrap();
    b.batch_execute("BEGIN").await.unwrap();
    first_value(&b, "SELECT 1").await.unwrap();
    let row = a.query_one("EXECUTE e1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
    b.batch_execute("COMMIT").await.unwrap();
}

/// DDL changes the result type of a table a pooled statement reads. In an
/// implicit transaction, the request is sent again once the server
/// prepared the statement afresh, wherever the client cannot be misled:
/// the column types are unchanged (a widened varchar), or the request
/// describes what it runs (a Describe; SQL `EXECUTE` in a simple Query).
/// A client whose driver holds a now-wrong row description gets
/// PostgreSQL's own 0A000, once, as it would without a pooler; so does a
/// client inside a transaction.
#[tokio::test]
async fn stale_cached_plan_is_recovered_where_the_client_cannot_be_misled() {
    let proxy = TestProxy::start("pool_size = 1\nmax_pool_size = 1").await;
    let setup = proxy.connect().await;
    setup
        .batch_execute(
            "DROP TABLE IF EXISTS cp_t; CREATE TABLE cp_t (a int, v varchar(50)); \
             INSERT INTO cp_t VALUES (1, 'x')",
        )
        .await
        .unwrap();
    let replans = || {
        proxy
            .shared
            .stats
            .prepared
            .replans
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Prepared and described as drivers do; later runs only bind.
    let mut c = Raw::login(proxy.addr).await;
    let mut batch = parse("cp", "SELECT * FROM cp_t");
    batch.extend(describe_statement("cp"));
    batch.extend(bind("cp"));
    batch.extend(execute());
    batch.extend(sync());
    c.send(&batch).await;
    assert_eq!(tags(&replies(&mut c).await), "1tT2DCZ");
    let mut again = bind("cp");
    again.extend(execute());
    again.extend(sync());

    // Same column types: transparent.
    setup
        .batch_execute("ALTER TABLE cp_t ALTER COLUMN v TYPE varchar(75)")
        .await
        .unwrap();
    c.send(&again).await;
    assert_eq!(row_width(&mut c).await, ("2DCZ".into(), Some(2)));
    assert_eq!(replans(), 1);

    // A new column, and the client described the old shape: PostgreSQL's
    // error, on every run, as PostgreSQL keeps the statement broken until
    // it is prepared again; then it works with the new shape.
    setup
        .batch_execute("ALTER TABLE cp_t ADD COLUMN b int")
        .await
        .unwrap();
    for _ in 0..2 {
        c.send(&again).await;
        let r = replies(&mut c).await;
        assert_eq!(tags(&r), "EZ", "{r:?}");
        assert_eq!(r[0].1.as_deref(), Some("0A000"));
    }
    assert_eq!(replans(), 1);
    let mut reprepare = close("cp");
    reprepare.extend(parse("cp", "SELECT * FROM cp_t"));
    reprepare.extend(describe_statement("cp"));
    reprepare.extend(sync());
    c.send(&reprepare).await;
    assert_eq!(tags(&replies(&mut c).await), "31tTZ");
    c.send(&again).await;
    assert_eq!(row_width(&mut c).await, ("2DCZ".into(), Some(3)));

    // A second client prepares the same text after another DDL: the
    // shared server statement is stale, but this client describes it, so
    // it learns the new shape and never sees the error.
    setup
        .batch_execute("ALTER TABLE cp_t ADD COLUMN c int")
        .await
        .unwrap();
    let mut d = Raw::login(proxy.addr).await;
    let mut prep = parse("mine", "SELECT * FROM cp_t");
    prep.extend(describe_statement("mine"));
    prep.extend(sync());
    d.send(&prep).await;
    let r = replies(&mut d).await;
    assert_eq!(tags(&r), "1tTZ", "{r:?}");
    assert_eq!(replans(), 2);
    let mut run = bind("mine");
    run.extend(execute());
    run.extend(sync());
    d.send(&run).await;
    assert_eq!(row_width(&mut d).await, ("2DCZ".into(), Some(4)));

    // SQL-level PREPARE / EXECUTE through a simple Query (which always
    // carries its row description).
    let a = proxy.connect().await;
    a.batch_execute("PREPARE sq AS SELECT * FROM cp_t")
        .await
        .unwrap();
    first_value(&a, "EXECUTE sq").await.unwrap();
    setup
        .batch_execute("ALTER TABLE cp_t DROP COLUMN c")
        .await
        .unwrap();
    let rows = a.simple_query("EXECUTE sq").await.unwrap();
    let widths: Vec<usize> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.len()),
            _ => None,
        })
        .collect();
    assert_eq!(widths, [3], "{rows:?}");
    assert_eq!(replans(), 3);

    // Inside a transaction: PostgreSQL's error, once.
    c.send(&again).await;
    replies(&mut c).await;
    setup
        .batch_execute("ALTER TABLE cp_t ALTER COLUMN v TYPE varchar(99)")
        .await
        .unwrap();
    let mut begin = message(b'Q', &cstr("BEGIN"));
    begin.extend(&again);
    c.send(&begin).await;
    let r = replies(&mut c).await;
    assert_eq!(tags(&r), "CZ", "{r:?}");
    let r = replies(&mut c).await;
    assert_eq!(tags(&r), "EZ", "{r:?}");
    assert_eq!(r[0].1.as_deref(), Some("0A000"));
    c.send(&message(b'Q', &cstr("ROLLBACK"))).await;
    assert_eq!(tags(&replies(&mut c).await), "CZ");
    assert_eq!(replans(), 3, "no resend inside a transaction");
    for _ in 0..2 {
        c.send(&again).await;
        assert_eq!(tags(&replies(&mut c).await), "2DCZ");
    }
    setup.batch_execute("DROP TABLE cp_t").await.unwrap();
}

fn describe_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstr(name));
    message(b'D', &b)
}

/// The client described a statement on one server; after DDL changed its
/// columns it runs on a server that never had it. Prepared there afresh it
/// would return rows the client's description does not fit: the client
/// gets PostgreSQL's 0A000 instead, as on its own connection.
#[tokio::test]
async fn a_changed_statement_is_refused_on_a_server_that_never_had_it() {
    let proxy = TestProxy::start("pool_size = 2\nmax_pool_size = 2").await;
    let setup = proxy.connect().await;
    setup
        .batch_execute(
            "DROP TABLE IF EXISTS cp_fresh; CREATE TABLE cp_fresh (a int); \
             INSERT INTO cp_fresh VALUES (1)",
        )
        .await
        .unwrap();
    drop(setup);
    let mut a = Raw::login(proxy.addr).await;
    let mut batch = parse("s", "SELECT * FROM cp_fresh");
    batch.extend(describe_statement("s"));
    batch.extend(sync());
    a.send(&batch).await;
    assert_eq!(tags(&replies(&mut a).await), "1tTZ");
    // Both servers busy in transactions, A's server among them; the DDL
    // runs on one of them.
    let b = proxy.connect().await;
    let d = proxy.connect().await;
    b.batch_execute("BEGIN; SELECT 1").await.unwrap();
    d.batch_execute("BEGIN; ALTER TABLE cp_fresh ADD COLUMN b int")
        .await
        .unwrap();
    d.batch_execute("COMMIT").await.unwrap();
    // d's server is free again: A gets it, or (if it is A's old server)
    // the statement is stale there. Either way: 0A000, never 2 columns.
    let mut run = bind("s");
    run.extend(execute());
    run.extend(sync());
    for _ in 0..3 {
        a.send(&run).await;
        let (kinds, width) = row_width(&mut a).await;
        assert_eq!(
            (kinds.as_str(), width),
            ("EZ", None),
            "the client must not get rows of another shape"
        );
    }
    b.batch_execute("COMMIT").await.unwrap();
    // Prepared again, it runs in the new shape.
    let mut again = close("s");
    again.extend(parse("s", "SELECT * FROM cp_fresh"));
    again.extend(describe_statement("s"));
    again.extend(bind("s"));
    again.extend(execute());
    again.extend(sync());
    a.send(&again).await;
    assert_eq!(row_width(&mut a).await, ("31tT2DCZ".into(), Some(2)));
    b.batch_execute("DROP TABLE cp_fresh").await.unwrap();
}

/// asyncpg prepares with Parse, Describe and Flush (no Sync) and waits for
/// the answer before it sends anything else. The answer must come through
/// whole, and a stale plan met by the Describe is recovered there too
/// (pgsluice ends the server's failed batch itself).
#[tokio::test]
async fn a_prepare_ending_with_flush_is_answered_and_recovered() {
    let proxy = TestProxy::start("pool_size = 1\nmax_pool_size = 1").await;
    let setup = proxy.connect().await;
    setup
        .batch_execute(
            "DROP TABLE IF EXISTS cp_flush; CREATE TABLE cp_flush (a int); \
             INSERT INTO cp_flush VALUES (1)",
        )
        .await
        .unwrap();
    let flush = message(b'H', &[]);
    let mut a = Raw::login(proxy.addr).await;
    // A first statement, so that the client has statements (and windows).
    let mut first = parse("one", "SELECT 1");
    first.extend(describe_statement("one"));
    first.extend(sync());
    a.send(&first).await;
    assert_eq!(tags(&replies(&mut a).await), "1tTZ");
    let mut prep = parse("s1", "SELECT * FROM cp_flush");
    prep.extend(describe_statement("s1"));
    prep.extend(&flush);
    a.send(&prep).await;
    let mut got = String::new();
    while let Some(m) = a.recv(Duration::from_secs(5)).await {
        got.push(m.tag as char);
        if m.tag == b'T' {
            break;
        }
    }
    assert_eq!(
        got, "1tT",
        "the Flush is answered without waiting for a Sync"
    );
    let mut run = bind("s1");
    run.extend(execute());
    run.extend(sync());
    a.send(&run).await;
    assert_eq!(row_width(&mut a).await, ("2DCZ".into(), Some(1)));

    // The server's shared copy goes stale; a second name for the same text,
    // prepared with Flush, meets it at the Describe.
    setup
        .batch_execute("ALTER TABLE cp_flush ADD COLUMN b int")
        .await
        .unwrap();
    let mut prep = parse("s2", "SELECT * FROM cp_flush");
    prep.extend(describe_statement("s2"));
    prep.extend(&flush);
    a.send(&prep).await;
    let mut got = String::new();
    let mut width = None;
    while let Some(m) = a.recv(Duration::from_secs(5)).await {
        got.push(m.tag as char);
        if m.tag == b'T' {
            width = Some(i16::from_be_bytes([m.body[0], m.body[1]]));
            break;
        }
    }
    assert_eq!(
        (got.as_str(), width),
        ("1tT", Some(2)),
        "recovered, new shape"
    );
    let replans = proxy
        .shared
        .stats
        .prepared
        .replans
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(replans, 1, "the Describe met the stale plan and was resent");
    let mut run = bind("s2");
    run.extend(execute());
    run.extend(sync());
    a.send(&run).await;
    assert_eq!(row_width(&mut a).await, ("2DCZ".into(), Some(2)));
    setup.batch_execute("DROP TABLE cp_flush").await.unwrap();
}

/// While a request's output is held (it may be recovered from a stale
/// plan), a NOTICE still reaches the client at once: a long statement's
/// progress is what drivers wait for before, say, cancelling it.
#[tokio::test]
async fn notices_are_not_held_back() {
    let proxy = TestProxy::start("pool_size = 1\nmax_pool_size = 1").await;
    let setup = proxy.connect().await;
    setup
        .batch_execute(
            "CREATE OR REPLACE FUNCTION cp_notice() RETURNS int LANGUAGE plpgsql AS \
             $$ BEGIN RAISE NOTICE 'started'; PERFORM pg_sleep(3); RETURN 1; END $$",
        )
        .await
        .unwrap();
    let mut a = Raw::login(proxy.addr).await;
    let mut prep = parse("slow", "SELECT cp_notice()");
    prep.extend(describe_statement("slow"));
    prep.extend(sync());
    a.send(&prep).await;
    assert_eq!(tags(&replies(&mut a).await), "1tTZ");
    let mut run = bind("slow");
    run.extend(execute());
    run.extend(sync());
    let sent = std::time::Instant::now();
    a.send(&run).await;
    let first = a.recv(Duration::from_secs(10)).await.expect("a reply");
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "first reply after {:?}",
        sent.elapsed()
    );
    let mut got = vec![first.tag as char];
    while let Some(m) = a.recv(Duration::from_secs(10)).await {
        got.push(m.tag as char);
        if m.tag == b'Z' {
            break;
        }
    }
    assert_eq!(got.iter().collect::<String>(), "2NDCZ");
}
