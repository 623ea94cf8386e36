//! Pool behaviour against real PostgreSQL: sharing, waiting, growth, timeouts,
//! isolation between clients, and what happens when clients or servers die.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use support::*;

async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_share_five_servers() {
    // A server login on a loaded 2-core machine (CI, the whole suite at
    // once) can take longer than the default 5 s; what is tested here is
    // the sharing, not login speed.
    let proxy =
        TestProxy::start("pool_size = 5\nmax_pool_size = 5\nserver_connect_timeout = \"30s\"")
            .await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let conninfo = proxy.conninfo();
        tasks.push(tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            let mut pids = HashSet::new();
            for j in 0..5 {
                let rows = c
                    .simple_query(&format!(
                        "BEGIN; SELECT pg_backend_pid(), {i} * 10 + {j}; COMMIT"
                    ))
                    .await
                    .expect("transaction");
                for m in rows {
                    if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                        pids.insert(r.get(0).expect("pid").to_owned());
                        assert_eq!(r.get(1), Some((i * 10 + j).to_string().as_str()));
                    }
                }
            }
            pids
        }));
    }
    let mut all = HashSet::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    assert!(
        all.len() <= 5,
        "200 clients used {} server connections",
        all.len()
    );
    let status = proxy.primary_pool().expect("pool").status();
    assert!(status.open <= 5, "{status:?}");
}

#[tokio::test]
async fn transaction_mode_hands_one_server_to_many_clients() {
    let proxy = TestProxy::start("pool_size = 1\nmax_pool_size = 1").await;
    let a = proxy.connect().await;
    let b = proxy.connect().await;
    let pa = backend_pid(&a).await;
    let pb = backend_pid(&b).await;
    assert_eq!(pa, pb, "both clients should be served by the only server");
}

#[tokio::test]
async fn checkout_timeout_names_pool_and_setting() {
    let proxy =
        TestProxy::start("pool_size = 1\nmax_pool_size = 1\ncheckout_timeout = \"1s\"").await;
    let a = proxy.connect().await;
    let b = proxy.connect().await;
    a.batch_execute("BEGIN").await.unwrap();
    let started = Instant::now();
    let err = b
        .query_one("SELECT 1", &[])
        .await
        .expect_err("must time out");
    let waited = started.elapsed();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    let msg = message(&err);
    assert!(
        msg.contains("checkout_timeout") && msg.contains("app/app@primary"),
        "{msg}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "waited {waited:?}"
    );
    // Both connections live on.
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        b.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0),
        7
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_grows_to_max_pool_size_under_pressure() {
    let proxy = TestProxy::start(
        "pool_size = 2\nmax_pool_size = 4\nreserve_pool_timeout = \"50ms\"\ncheckout_timeout = \"2s\"",
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(proxy.connect().await);
    }
    // Four transactions held open at once: the pool must grow past 2.
    let mut pids = HashSet::new();
    for c in &clients[..4] {
        c.batch_execute("BEGIN").await.unwrap();
        pids.insert(backend_pid(c).await);
    }
    assert_eq!(pids.len(), 4);
    let status = proxy.primary_pool().expect("pool").status();
    assert_eq!(status.open, 4, "{status:?}");
    // The fifth finds the pool at max_pool_size and times out.
    let err = clients[4]
        .query_one("SELECT 1", &[])
        .await
        .expect_err("pool is full");
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"));
    for c in &clients[..4] {
        c.batch_execute("COMMIT").await.unwrap();
    }
}

/// What a client sees of the parameters pgsluice keeps per client.
const SETTINGS_QUERY: &str = "SELECT current_setting('application_name'), current_setting('TimeZone'), \
     current_setting('search_path'), current_setting('extra_float_digits'), pg_backend_pid()";

#[tokio::test]
async fn session_parameters_do_not_leak_between_clients() {
    let proxy = TestProxy::start("pool_size = 1\nmax_pool_size = 1").await;
    let a = proxy
        .connect_with("application_name=alpha options='-c search_path=pg_catalog,public -c extra_float_digits=2'")
        .await
        .unwrap();
    let b = proxy.connect().await;
    a.batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    let default_tz: String = superuser(0)
        .await
        .query_one("SELECT current_setting('TimeZone')", &[])
        .await
        .unwrap()
        .get(0);
    for _ in 0..3 {
        let row = a.query_one(SETTINGS_QUERY, &[]).await.unwrap();
        assert_eq!(row.get::<_, &str>(0), "alpha");
        assert_eq!(row.get::<_, &str>(1), "Asia/Tokyo");
        // As PostgreSQL keeps a startup value: verbatim.
        assert_eq!(row.get::<_, &str>(2), "pg_catalog,public");
        assert_eq!(row.get::<_, &str>(3), "2");
        let a_pid: i32 = row.get(4);
        let row = b.query_one(SETTINGS_QUERY, &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(4), a_pid, "same server for both clients");
        assert_eq!(row.get::<_, &str>(0), "");
        assert_eq!(row.get::<_, &str>(1), default_tz);
        assert_eq!(row.get::<_, &str>(2), "\"$user\", public");
        assert_eq!(row.get::<_, &str>(3), "1", "PostgreSQL's default");
    }
}

#[tokio::test]
async fn client_killed_mid_transaction_leaves_server_clean() {
    let proxy = TestProxy::start("pool_size = 1\nmax_pool_size = 1").await;
    let setup = proxy.connect().await;
    setup
        .batch_execute("DROP TABLE IF EXISTS killed_mid_tx; CREATE TABLE killed_mid_tx (v int)")
        .await
        .unwrap();
    let pid = backend_pid(&setup).await;
    drop(setup);

    // A client that vanishes without Terminate in the middle of a transaction.
    let (a, conn) = tokio_postgres::connect(&proxy.conninfo(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn_task = tokio::spawn(conn);
    a.batch_execute("BEGIN; INSERT INTO killed_mid_tx VALUES (1)")
        .await
        .unwrap();
    conn_task.abort();
    let _ = conn_task.await;
    drop(a);

    let b = proxy.connect().await;
    let row = b
        .query_one(
            "SELECT pg_backend_pid(), (SELECT count(*) FROM killed_mid_tx), \
             pg_current_xact_id_if_assigned() IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), pid, "the same server was reused");
    assert_eq!(
        row.get::<_, i64>(1),
        0,
        "the dead client's insert was rolled back"
    );
    assert!(row.get::<_, bool>(2));
    // A fresh transaction starts cleanly (no 'already in progress').
    b.batch_execute("BEGIN; INSERT INTO killed_mid_tx VALUES (2); COMMIT")
        .await
        .unwrap();
}

#[tokio::test]
async fn client_gone_mid_query_never_hands_its_server_on() {
    let proxy = TestProxy::start("pool_size = 1\nmax_pool_size = 1").await;
    let (a, conn) = tokio_postgres::connect(&proxy.conninfo(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn_task = tokio::spawn(conn);
    let a_pid = backend_pid(&a).await;
    let su = superuser(0).await;
    let sleeper = tokio::spawn(async move { a.simple_query("SELECT pg_sleep(30)").await });
    // Whether A's pg_sleep is running on A's server.
    let a_sleeping = || async {
        su.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND query LIKE '%pg_sleep(30)%' AND state = 'active'",
            &[&a_pid],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 1
    };
    // A's query must be running on its server before A goes away.
    eventually(
        "pg_sleep running on A's server",
        Duration::from_secs(10),
        a_sleeping,
    )
    .await;
    conn_task.abort();
    sleeper.abort();

    let b = proxy.connect().await;
    let started = Instant::now();
    let b_pid = backend_pid(&b).await;
    assert_ne!(
        b_pid, a_pid,
        "a server still running a dead client's query was handed out"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // The abandoned query is cancelled, not left running for 30 s.
    eventually(
        "abandoned pg_sleep to stop",
        Duration::from_secs(10),
        || async { !a_sleeping().await },
    )
    .await;
}

#[tokio::test]
async fn terminated_backend_gives_client_an_error_and_is_replaced() {
    let proxy = TestProxy::start("pool_size = 2").await;
    let a = proxy.connect().await;
    a.batch_execute("BEGIN").await.unwrap();
    let pid = backend_pid(&a).await;
    let su = superuser(0).await;
    su.query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let err = a
        .query_one("SELECT 1", &[])
        .await
        .expect_err("server is gone");
    let code = sqlstate(&err);
    assert!(
        matches!(code.as_deref(), Some("57P01") | Some("08006") | None),
        "unexpected error {err:?}"
    );
    // Others carry on, on a replacement server.
    let b = proxy.connect().await;
    assert_ne!(backend_pid(&b).await, pid);
}

#[tokio::test]
async fn idle_pooled_server_killed_is_not_handed_out() {
    let proxy = TestProxy::start("pool_size = 1\nmax_pool_size = 1").await;
    let a = proxy.connect().await;
    let pid = backend_pid(&a).await;
    let su = superuser(0).await;
    su.query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    // The backend sends its FATAL and closes as it exits (a fixed 200 ms
    // was not always enough on a loaded machine).
    eventually(
        "the killed backend to exit",
        Duration::from_secs(10),
        || async {
            su.query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
                == 0
        },
    )
    .await;
    // The same client, idle between transactions, simply gets a new server.
    let again = backend_pid(&a).await;
    assert_ne!(again, pid);
}

#[tokio::test]
async fn statement_mode_refuses_transaction_blocks() {
    let proxy =
        TestProxy::start("pool_mode = \"statement\"\npool_size = 1\nmax_pool_size = 1").await;
    let a = proxy.connect().await;
    let err = a
        .batch_execute("BEGIN")
        .await
        .expect_err("transactions refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"));
    assert!(
        message(&err).contains("pool_mode = statement"),
        "{}",
        message(&err)
    );
    // The server was rolled back: nothing is left open for the next statement.
    // Simple protocol: a fresh implicit transaction starts with this statement.
    let rows = a
        .simple_query("SELECT now() = statement_timestamp()")
        .await
        .unwrap();
    let Some(row) = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    }) else {
        panic!("no row: {rows:?}")
    };
    assert_eq!(
        row.get(0),
        Some("t"),
        "still inside the refused transaction"
    );
    // Autocommit statements and implicit multi-statement transactions work.
    a.batch_execute("SELECT 1; SELECT 2").await.unwrap();
}

#[tokio::test]
async fn session_mode_keeps_one_server_per_client() {
    let proxy = TestProxy::start("pool_mode = \"session\"\npool_size = 3").await;
    let a = proxy.connect().await;
    let b = proxy.connect().await;
    let (pa, pb) = (backend_pid(&a).await, backend_pid(&b).await);
    assert_ne!(pa, pb);
    a.batch_execute("CREATE TEMP TABLE mine (v int); INSERT INTO mine VALUES (1)")
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(backend_pid(&a).await, pa);
        assert_eq!(backend_pid(&b).await, pb);
    }
    let n: i64 = a
        .query_one("SELECT count(*) FROM mine", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn failed_server_login_fails_fast_with_the_servers_error() {
    let proxy = TestProxy::start_with(
        "auth_type = \"trust\"\nserver_login_retry = \"10s\"",
        "[users.nobody]\npassword = \"wrong\"\n",
    )
    .await;
    let conninfo = format!(
        "host=127.0.0.1 port={} user=nobody dbname={APP_DB} connect_timeout=10",
        proxy.addr.port()
    );
    let err = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .err()
        .expect("server refuses the login");
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{err}");
    let started = Instant::now();
    let err = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .err()
        .expect("still refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "did not fail fast: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_waiter_left_with_nothing_to_serve_it_fails_with_the_login_error_at_once() {
    // A new server login fails while the pool still has one server open,
    // so the waiting client stays queued for that server. When the server
    // then dies instead of coming back, nothing is open or opening: the
    // waiter must get the login's error now, not wait out
    // checkout_timeout (on a replica this sends its read to the primary).
    let su = superuser(0).await;
    su.batch_execute(
        "DROP ROLE IF EXISTS stranded; \
         SET password_encryption = 'scram-sha-256'; \
         CREATE ROLE stranded LOGIN PASSWORD 'stranded' CONNECTION LIMIT 1",
    )
    .await
    .expect("create role");
    let proxy = TestProxy::start_with(
        "pool_size = 2\nmax_pool_size = 2\ncheckout_timeout = \"20s\"\nserver_login_retry = \"20s\"",
        "[users.stranded]\npassword = \"stranded\"\n",
    )
    .await;
    let a = proxy
        .connect_as("stranded", "stranded", APP_DB)
        .await
        .expect("connect a");
    a.batch_execute("BEGIN").await.expect("begin");
    let pid = backend_pid(&a).await;
    let pool = proxy
        .shared
        .pools
        .all()
        .into_iter()
        .find(|p| p.label() == "app/stranded@primary")
        .expect("pool");
    let b = proxy
        .connect_as("stranded", "stranded", APP_DB)
        .await
        .expect("connect b");
    let started = Instant::now();
    let waiting = tokio::spawn(async move { b.query_one("SELECT 1", &[]).await.map(|_| ()) });
    // The role's connection limit refuses the second server login; the
    // client stays queued behind a's server.
    eventually(
        "the second server login to fail",
        Duration::from_secs(15),
        || {
            let s = pool.status();
            async move { s.waiting == 1 && s.opening == 0 && s.open == 1 }
        },
    )
    .await;
    su.query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
    a.query_one("SELECT 1", &[])
        .await
        .expect_err("a's server is gone");
    let err = waiting
        .await
        .expect("join")
        .expect_err("no server could serve b");
    assert!(
        message(&err).contains("too many connections for role"),
        "b got {err:?} after {:?}, not the server login's error",
        started.elapsed()
    );
    drop(a);
    drop(proxy);
    su.batch_execute("DROP ROLE IF EXISTS stranded")
        .await
        .expect("drop role");
}
