//! Read/write routing against a real primary with two streaming replicas:
//! where reads and writes land, lag taken out of rotation, read-your-writes,
//! a replica and the primary going away, and retries of failed reads.
//!
//! The tests share one cluster and pause, kill and restart its nodes, so they
//! run one at a time (`SERIAL`).

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pgsluice::cluster::{Availability, OutReason};
use support::{TestProxy, cluster, eventually, superuser};
use tokio_postgres::{Client, SimpleQueryMessage};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Routing on (the harness defaults to everything on the primary).
const ROUTING: &str =
    "\n[routing]\ndefault_route = \"auto\"\nmonitor_interval = \"25ms\"\nmonitor_user = \"app\"\n";

fn port(i: usize) -> u16 {
    cluster().nodes()[i].port
}

async fn server_port(c: &Client, sql: &str) -> Result<u16, tokio_postgres::Error> {
    let rows = c.simple_query(sql).await?;
    Ok(rows
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .expect("a port"))
}

async fn start(extra_routing: &str) -> TestProxy {
    let proxy = TestProxy::start_with("", &format!("{ROUTING}{extra_routing}")).await;
    wait_in_rotation(&proxy, &[1, 2]).await;
    let c = proxy.connect().await;
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS routing_t (id bigserial PRIMARY KEY, v bigint);
         CREATE OR REPLACE FUNCTION routing_bump(x bigint) RETURNS bigint
           LANGUAGE sql VOLATILE AS
           'INSERT INTO routing_t (v) VALUES (x) RETURNING id';",
    )
    .await
    .expect("schema");
    proxy
}

async fn wait_in_rotation(proxy: &TestProxy, replicas: &[usize]) {
    let cl = proxy.shared.clusters()["app"].clone();
    eventually("replicas in rotation", Duration::from_secs(20), || {
        let cl = cl.clone();
        async move {
            replicas.iter().all(|&i| {
                matches!(
                    cl.availability(i, Instant::now()),
                    Availability::InRotation { .. }
                )
            })
        }
    })
    .await;
}

#[tokio::test]
async fn reads_spread_over_replicas_and_writes_and_transactions_stay_on_the_primary() {
    let _serial = SERIAL.lock().await;
    let proxy = start("").await;
    // A read-only transaction held open on one replica...
    let other = proxy.connect().await;
    other.batch_execute("BEGIN READ ONLY").await.expect("begin");
    let busy = server_port(&other, "SELECT inet_server_port()")
        .await
        .expect("read in a transaction");
    assert!([port(1), port(2)].contains(&busy), "on port {busy}");
    let idle = if busy == port(1) { port(2) } else { port(1) };

    // ...sends a new client's reads to the other one (fewest clients
    // attached), and the client stays there after the transaction ends.
    let c = proxy.connect().await;
    let mut seen = BTreeSet::new();
    for i in 0..60 {
        if i == 30 {
            other.batch_execute("COMMIT").await.expect("commit");
        }
        seen.insert(
            server_port(&c, "SELECT inet_server_port()")
                .await
                .expect("read"),
        );
    }
    assert_eq!(
        seen,
        BTreeSet::from([idle]),
        "reads should go to the replica without clients, stay there, and never reach the primary"
    );

    // Extended protocol: the same.
    let row = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .expect("extended read");
    assert_ne!(row.get::<_, i32>(0) as u16, port(0));

    // Writes, and functions that write, run on the primary.
    let p = server_port(
        &c,
        "INSERT INTO routing_t (v) VALUES (1) RETURNING inet_server_port()",
    )
    .await
    .expect("insert");
    assert_eq!(p, port(0));
    // Classified as writes, not rescued by the 25006 retry.
    let retries_before = proxy.shared.clusters()["app"].retries();
    for sql in [
        "SELECT nextval('routing_t_id_seq'), inet_server_port()",
        "SELECT routing_bump(7), inet_server_port()",
        "WITH w AS (INSERT INTO routing_t (v) VALUES (2) RETURNING id) SELECT inet_server_port() FROM w",
        "SELECT inet_server_port() FROM routing_t LIMIT 1 FOR UPDATE",
    ] {
        let rows = c
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let ports: Vec<u16> = rows
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(r.len() - 1).and_then(|v| v.parse().ok()),
                _ => None,
            })
            .collect();
        assert!(
            ports.iter().all(|&p| p == port(0)),
            "{sql} ran on {ports:?}"
        );
    }
    assert_eq!(proxy.shared.clusters()["app"].retries(), retries_before);

    // A read-only transaction runs on one replica from start to end (a
    // client that has not written: this one's reads now wait for
    // replicas to replay its writes).
    let c = proxy.connect().await;
    c.batch_execute("BEGIN READ ONLY").await.expect("begin");
    let first = server_port(&c, "SELECT inet_server_port()")
        .await
        .expect("read");
    assert_ne!(first, port(0));
    for _ in 0..5 {
        assert_eq!(
            server_port(&c, "SELECT inet_server_port()")
                .await
                .expect("read"),
            first
        );
    }
    c.batch_execute("COMMIT").await.expect("commit");

    // A transaction that reads and then writes stays on the primary.
    c.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(
        server_port(&c, "SELECT inet_server_port()")
            .await
            .expect("read"),
        port(0)
    );
    c.batch_execute("INSERT INTO routing_t (v) VALUES (3)")
        .await
        .expect("write in tx");
    assert_eq!(
        server_port(&c, "SELECT inet_server_port()")
            .await
            .expect("read"),
        port(0)
    );
    c.batch_execute("COMMIT").await.expect("commit");

    // pgsluice answers its own setting.
    c.batch_execute("SET pgsluice.route = primary")
        .await
        .expect("set route");
    let rows = c.simple_query("SHOW pgsluice.route").await.expect("show");
    assert!(
        rows.iter()
            .any(|m| matches!(m, SimpleQueryMessage::Row(r) if r.get(0) == Some("primary"))),
        "SHOW pgsluice.route"
    );
    assert_eq!(
        server_port(&c, "SELECT inet_server_port()")
            .await
            .expect("read"),
        port(0)
    );
    c.batch_execute("SET pgsluice.route = replica")
        .await
        .expect("set route");
    assert_ne!(
        server_port(&c, "SELECT inet_server_port()")
            .await
            .expect("read"),
        port(0)
    );
    let err = c
        .batch_execute("SET pgsluice.route = sideways")
        .await
        .expect_err("bad value");
    assert_eq!(support::sqlstate(&err).as_deref(), Some("22023"));
    c.batch_execute("RESET pgsluice.route")
        .await
        .expect("reset");
    // Hints in a leading comment.
    assert_eq!(
        server_port(&c, "/* pgsluice: primary */ SELECT inet_server_port()")
            .await
            .expect("hint"),
        port(0)
    );
}

#[tokio::test]
async fn a_paused_replica_leaves_rotation_and_returns_after_resume() {
    let _serial = SERIAL.lock().await;
    let proxy = start("").await;
    let writer = proxy.connect().await;
    let reader = proxy.connect().await;
    let r1 = superuser(1).await;
    r1.batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause");

    // Writes continue; once the monitor has seen the paused replica lag
    // more than max_replica_lag (100ms), no read may reach it (lagging, it
    // stays out until it replays again).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                writer
                    .batch_execute("INSERT INTO routing_t (v) VALUES (10)")
                    .await
                    .expect("write while paused");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // (A fixed max_replica_lag + two monitor intervals was too short on a
    // loaded machine.)
    let cl = proxy.shared.clusters()["app"].clone();
    eventually(
        "the paused replica out of rotation",
        Duration::from_secs(10),
        || {
            let cl = cl.clone();
            async move {
                cl.availability(1, Instant::now()) == Availability::Out(OutReason::Lagging)
            }
        },
    )
    .await;
    let mut seen = BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        seen.insert(
            server_port(&reader, "SELECT inet_server_port()")
                .await
                .expect("read"),
        );
    }
    assert!(
        !seen.contains(&port(1)),
        "a read reached the paused replica: {seen:?}"
    );
    assert!(
        seen.contains(&port(2)),
        "reads should use the other replica: {seen:?}"
    );

    r1.batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume");
    eventually(
        "the resumed replica serves reads",
        Duration::from_secs(10),
        || {
            let proxy = &proxy;
            async move {
                // New clients: `reader` stays on replica 2, which is no
                // busier than replica 1 (one client alone).
                let mut hit = false;
                for _ in 0..10 {
                    let reader = proxy.connect().await;
                    hit |= server_port(&reader, "SELECT inet_server_port()").await.ok()
                        == Some(port(1));
                }
                hit
            }
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    w.await.expect("writer");
}

#[tokio::test]
async fn a_client_reads_its_own_writes_even_from_lagging_replicas() {
    let _serial = SERIAL.lock().await;
    // Lagging replicas stay in rotation: only read-your-writes protects.
    let proxy = start("max_replica_lag = \"1h\"\n").await;
    let r1 = superuser(1).await;
    let r2 = superuser(2).await;
    for r in [&r1, &r2] {
        r.batch_execute("SELECT pg_wal_replay_pause()")
            .await
            .expect("pause");
    }
    let writer = proxy.connect().await;
    let bystander = proxy.connect().await;
    let insert = writer
        .prepare("INSERT INTO routing_t (v) VALUES ($1) RETURNING id")
        .await
        .expect("prepare insert");
    let select = writer
        .prepare("SELECT v FROM routing_t WHERE id = $1")
        .await
        .expect("prepare select");
    let mut stale = 0;
    for i in 0..1000i64 {
        let id: i64 = writer
            .query_one(&insert, &[&i])
            .await
            .expect("insert")
            .get(0);
        let rows = writer.query(&select, &[&id]).await.expect("select");
        if rows.len() != 1 || rows[0].get::<_, i64>(0) != i {
            stale += 1;
        }
        // Simple protocol too, every tenth round.
        if i % 10 == 0 {
            let rows = writer
                .simple_query(&format!("SELECT v FROM routing_t WHERE id = {id}"))
                .await
                .expect("simple select");
            if !rows.iter().any(|m| matches!(m, SimpleQueryMessage::Row(_))) {
                stale += 1;
            }
        }
    }
    // A client that never wrote still reads from the (paused) replicas.
    let p = server_port(&bystander, "SELECT inet_server_port()")
        .await
        .expect("read");
    for r in [&r1, &r2] {
        r.batch_execute("SELECT pg_wal_replay_resume()")
            .await
            .expect("resume");
    }
    assert_eq!(stale, 0, "reads missed the client's own writes");
    assert_ne!(
        p,
        port(0),
        "a client that never wrote should read from a replica"
    );
}

#[tokio::test]
async fn a_killed_replica_fails_no_read_and_returns_after_restart() {
    let _serial = SERIAL.lock().await;
    let proxy = start("").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let errors = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut readers = Vec::new();
    for _ in 0..32 {
        let c = proxy.connect().await;
        let (stop, errors) = (stop.clone(), errors.clone());
        readers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.query_one("SELECT count(*) FROM pg_class", &[]).await {
                    Ok(_) => n += 1,
                    Err(e) => {
                        eprintln!("read failed: {e:?}");
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if c.is_closed() {
                            break;
                        }
                    }
                }
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = Instant::now();
    tokio::task::spawn_blocking(|| cluster().kill_node(2))
        .await
        .expect("join")
        .expect("kill replica2");
    let cl = proxy.shared.clusters()["app"].clone();
    while matches!(
        cl.availability(2, Instant::now()),
        Availability::InRotation { .. }
    ) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let out_after = killed_at.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::spawn_blocking(|| cluster().start_node(2))
        .await
        .expect("join")
        .expect("restart replica2");
    wait_in_rotation(&proxy, &[2]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for r in readers {
        total += r.await.expect("reader");
    }
    assert_eq!(
        errors.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "reads failed"
    );
    assert!(total > 0);
    assert!(
        out_after < Duration::from_secs(1),
        "replica2 left rotation only after {out_after:?}"
    );
}

#[tokio::test]
async fn a_write_misrouted_to_a_replica_is_retried_on_the_primary() {
    let _serial = SERIAL.lock().await;
    let proxy = start("").await;
    let c = proxy.connect().await;
    let before = proxy.shared.clusters()["app"].retries();
    // Simple protocol.
    let p = server_port(
        &c,
        "/* pgsluice: replica */ INSERT INTO routing_t (v) VALUES (42) RETURNING inet_server_port()",
    )
    .await
    .expect("misrouted insert succeeds via retry");
    assert_eq!(p, port(0));
    // Extended protocol.
    let row = c
        .query_one(
            "/* pgsluice: replica */ SELECT routing_bump(43), inet_server_port()",
            &[],
        )
        .await
        .expect("misrouted function call succeeds via retry");
    assert_eq!(row.get::<_, i32>(1) as u16, port(0));
    assert!(proxy.shared.clusters()["app"].retries() >= before + 2);
}

#[tokio::test]
async fn with_the_primary_down_writes_fail_fast_and_reads_go_on() {
    let _serial = SERIAL.lock().await;
    let proxy = start("").await;
    let writer = proxy.connect().await;
    let reader = proxy.connect().await;
    writer
        .batch_execute("INSERT INTO routing_t (v) VALUES (1)")
        .await
        .expect("write before");
    tokio::task::spawn_blocking(|| cluster().stop_node(0))
        .await
        .expect("join")
        .expect("stop primary");
    let t = Instant::now();
    let err = writer
        .batch_execute("INSERT INTO routing_t (v) VALUES (2)")
        .await
        .expect_err("write with the primary down");
    let failed_after = t.elapsed();
    let code = support::sqlstate(&err).unwrap_or_default();
    assert!(code.starts_with("08"), "SQLSTATE {code}: {err:?}");
    assert!(
        support::message(&err).contains("primary"),
        "message should name the primary: {}",
        support::message(&err)
    );
    // Reads keep working, from existing and new clients.
    for _ in 0..20 {
        let p = server_port(&reader, "SELECT inet_server_port()")
            .await
            .expect("read");
        assert_ne!(p, port(0));
    }
    let newcomer = proxy.connect().await;
    server_port(&newcomer, "SELECT inet_server_port()")
        .await
        .expect("a new client reads");

    tokio::task::spawn_blocking(|| cluster().start_node(0))
        .await
        .expect("join")
        .expect("restart primary");
    let up = Instant::now();
    loop {
        match writer
            .batch_execute("INSERT INTO routing_t (v) VALUES (3)")
            .await
        {
            Ok(()) => break,
            Err(e) => {
                assert!(
                    up.elapsed() < Duration::from_secs(2),
                    "writes still failing 2s after the primary came back: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(
        failed_after < Duration::from_secs(2),
        "write failed only after {failed_after:?}"
    );
    wait_in_rotation(&proxy, &[1, 2]).await;
}

#[tokio::test]
async fn a_pinned_client_stays_on_its_node() {
    let _serial = SERIAL.lock().await;
    // Round robin: once unpinned, a lone client's reads alternate.
    let proxy = start("read_balance = \"round_robin\"\n").await;
    let c = proxy.connect().await;
    // A session-level lock pins the client wherever the lock was taken; the
    // hint asks for a replica (advisory locks work on a hot standby).
    let pinned = server_port(
        &c,
        "/* pgsluice: replica */ SELECT inet_server_port() FROM pg_advisory_lock(5)",
    )
    .await
    .expect("lock");
    eprintln!("pinned on port {pinned}; primary {}", port(0));
    for _ in 0..10 {
        let p = server_port(&c, "SELECT inet_server_port()")
            .await
            .expect("read");
        assert_eq!(p, pinned, "a pinned client moved");
    }
    if pinned != port(0) {
        // A write while pinned to a replica fails there rather than moving.
        let e = c
            .batch_execute("INSERT INTO routing_t (v) VALUES (1)")
            .await
            .unwrap_err();
        assert_eq!(support::sqlstate(&e).as_deref(), Some("25006"), "{e}");
    }
    c.batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        seen.insert(
            server_port(&c, "SELECT inet_server_port()")
                .await
                .expect("read"),
        );
    }
    assert!(
        seen.len() > 1 || !seen.contains(&pinned),
        "unpinned reads spread: {seen:?}"
    );
}

/// A prepared read served by replicas whose cached plan DDL made stale
/// without changing its column types (a widened varchar): the replica
/// prepares it again and the read is resent there, so the client never
/// sees 0A000.
#[tokio::test]
async fn stale_plans_on_replicas_are_prepared_again() {
    let _serial = SERIAL.lock().await;
    // Round robin, so that one client's reads reach both replicas.
    let proxy = start("read_balance = \"round_robin\"\n").await;
    let c = proxy.connect().await;
    c.batch_execute(
        "DROP TABLE IF EXISTS routing_cp; CREATE TABLE routing_cp (v varchar(50)); \
         INSERT INTO routing_cp VALUES ('x')",
    )
    .await
    .expect("schema");
    let stmt = c
        .prepare("SELECT inet_server_port(), v FROM routing_cp")
        .await
        .expect("prepare");
    let replicas = [port(1), port(2)];
    // Reads reach replicas once they replayed the table (read-your-writes).
    let mut served = BTreeSet::new();
    for _ in 0..200 {
        let row = c.query_one(&stmt, &[]).await.expect("read");
        let p = row.get::<_, i32>(0) as u16;
        if replicas.contains(&p) {
            served.insert(p);
        }
        if served.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(served.len(), 2, "both replicas ran the statement");
    let replans = || {
        proxy
            .shared
            .stats
            .prepared
            .replans
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = replans();
    c.batch_execute("ALTER TABLE routing_cp ALTER COLUMN v TYPE varchar(75)")
        .await
        .expect("ddl");
    // Read-your-writes: the primary until a replica replayed the DDL.
    let mut on_replicas = BTreeSet::new();
    for _ in 0..200 {
        let row = c.query_one(&stmt, &[]).await.expect("read after DDL");
        assert_eq!(row.get::<_, String>(1), "x");
        let p = row.get::<_, i32>(0) as u16;
        if replicas.contains(&p) {
            on_replicas.insert(p);
        }
        if on_replicas.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(on_replicas.len(), 2, "both replicas served after the DDL");
    assert!(replans() > before, "the stale plan was met and recovered");
    c.batch_execute("DROP TABLE routing_cp")
        .await
        .expect("drop");
}

/// asyncpg prepares with Parse, Describe and Flush (a read: it lands on a
/// replica), then may send a write as a simple Query before any Sync (its
/// COPY ... FROM STDIN after preparing the table's introspection query).
/// Nothing ran in that batch, so pgsluice ends it and the write moves to
/// the primary instead of failing with 25006 on the replica.
#[tokio::test]
async fn a_write_after_a_prepare_only_batch_on_a_replica_goes_to_the_primary() {
    use support::raw::{Raw, message};
    let _serial = SERIAL.lock().await;
    let proxy = start("").await;
    let c = proxy.connect().await;
    c.batch_execute("DROP TABLE IF EXISTS routing_pf; CREATE TABLE routing_pf (v int)")
        .await
        .expect("schema");
    wait_in_rotation(&proxy, &[1, 2]).await;
    let cstr = |s: &str| {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    };
    for round in 0..5 {
        let mut raw = Raw::login(proxy.addr).await;
        let mut prep = cstr(&format!("intro{round}"));
        prep.extend(cstr("SELECT inet_server_port()"));
        prep.extend(0i16.to_be_bytes());
        let mut batch = message(b'P', &prep);
        let mut d = vec![b'S'];
        d.extend(cstr(&format!("intro{round}")));
        batch.extend(message(b'D', &d));
        batch.extend(message(b'H', &[]));
        raw.send(&batch).await;
        let mut tags = String::new();
        while let Some(m) = raw.recv(Duration::from_secs(5)).await {
            tags.push(m.tag as char);
            if m.tag == b'T' {
                break;
            }
        }
        assert_eq!(tags, "1tT");
        raw.send(&message(
            b'Q',
            &cstr(&format!("INSERT INTO routing_pf VALUES ({round})")),
        ))
        .await;
        let mut reply = Vec::new();
        while let Some(m) = raw.recv(Duration::from_secs(10)).await {
            reply.push((m.tag as char, m.sqlstate()));
            if m.tag == b'Z' {
                break;
            }
        }
        assert_eq!(
            reply,
            [('C', None), ('Z', None)],
            "round {round}: {reply:?}"
        );
        // The statement prepared before the move is still the client's.
        let mut run = Vec::new();
        let mut b = cstr("");
        b.extend(cstr(&format!("intro{round}")));
        b.extend([0u8; 6]);
        run.extend(message(b'B', &b));
        let mut e = cstr("");
        e.extend(0i32.to_be_bytes());
        run.extend(message(b'E', &e));
        run.extend(message(b'S', &[]));
        raw.send(&run).await;
        let mut tags = String::new();
        while let Some(m) = raw.recv(Duration::from_secs(5)).await {
            tags.push(m.tag as char);
            if m.tag == b'Z' {
                break;
            }
        }
        assert_eq!(tags, "2DCZ");
    }
    // Counted on the primary: the inserts came from other clients, so a
    // replica may not have replayed the last one yet.
    c.batch_execute("SET pgsluice.route = primary")
        .await
        .expect("route to the primary");
    let rows = c
        .simple_query("SELECT count(*) FROM routing_pf")
        .await
        .expect("count");
    let n = rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(n.as_deref(), Some("5"));
    c.batch_execute("DROP TABLE routing_pf")
        .await
        .expect("drop");
}

/// A client waiting for a replica's server counts on that replica, so that
/// the next client's read is balanced by queues, not only by busy servers.
#[tokio::test]
async fn clients_waiting_for_a_replica_count_on_it() {
    let _serial = SERIAL.lock().await;
    let proxy = TestProxy::start_with("pool_size = 1\nmax_pool_size = 1\n", ROUTING).await;
    wait_in_rotation(&proxy, &[1, 2]).await;
    let cl = proxy.shared.clusters()["app"].clone();
    let counted = || cl.nodes()[1].outstanding() + cl.nodes()[2].outstanding();
    // Two read-only transactions hold the one server of each replica.
    let mut holders = Vec::new();
    let mut held = BTreeSet::new();
    for _ in 0..2 {
        let h = proxy.connect().await;
        h.batch_execute("BEGIN READ ONLY").await.expect("begin");
        held.insert(
            server_port(&h, "SELECT inet_server_port()")
                .await
                .expect("read in a transaction"),
        );
        holders.push(h);
    }
    assert_eq!(
        held,
        BTreeSet::from([port(1), port(2)]),
        "one on each replica"
    );
    assert_eq!(counted(), 2);
    // A third client's read waits for one of them, and counts there.
    let waiter = proxy.connect().await;
    let read = tokio::spawn(async move { server_port(&waiter, "SELECT inet_server_port()").await });
    eventually(
        "the waiting client counts",
        Duration::from_secs(5),
        || async { counted() == 3 },
    )
    .await;
    assert!(!read.is_finished(), "the read had a server to run on");
    for h in &holders {
        h.batch_execute("COMMIT").await.expect("commit");
    }
    let p = read.await.expect("join").expect("read after waiting");
    assert!(held.contains(&p), "served by a replica, not {p}");
    eventually(
        "nothing counted once idle",
        Duration::from_secs(5),
        || async { counted() == 0 },
    )
    .await;
}
