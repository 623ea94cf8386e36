//! Limits, timeouts and hostile input: each refusal is a real SQLSTATE with
//! a message naming the setting, and touches only the offending client.

mod support;

use std::time::{Duration, Instant};

use support::raw::{self, Raw};
use support::*;

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn max_client_conn_refuses_extra_clients() {
    let proxy = TestProxy::start("max_client_conn = 2").await;
    let a = proxy.connect().await;
    let _b = proxy.connect().await;
    let err = proxy
        .connect_with("")
        .await
        .expect_err("third client refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    assert!(
        message(&err).contains("max_client_conn = 2"),
        "{}",
        message(&err)
    );
    // Those already in are untouched, and a slot frees when one leaves.
    assert_eq!(
        a.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
    drop(a);
    eventually("a client slot to free up", 5 * SECOND, || async {
        proxy.connect_with("").await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn client_login_timeout_closes_silent_clients() {
    let proxy = TestProxy::start("client_login_timeout = \"1s\"").await;
    let mut silent = Raw::connect(proxy.addr).await;
    let started = Instant::now();
    assert!(
        silent.closed_within(5 * SECOND).await,
        "silent client still open"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    // Half a startup packet is no better.
    let mut slow = Raw::connect(proxy.addr).await;
    slow.send(&raw::startup_packet(0, &[("user", "app")])[..6])
        .await;
    assert!(slow.closed_within(5 * SECOND).await);
    // Meanwhile real clients log in normally.
    proxy.connect().await;
}

#[tokio::test]
async fn oversized_startup_packet_is_refused_with_08p01() {
    let proxy = TestProxy::start("").await;
    let mut c = Raw::connect(proxy.addr).await;
    c.send(&1_000_000i32.to_be_bytes()).await;
    c.send(&[0u8; 4]).await;
    let m = c.recv(5 * SECOND).await.expect("an error response");
    assert_eq!(m.tag, b'E');
    assert_eq!(m.sqlstate().as_deref(), Some("08P01"));
    assert!(c.closed_within(5 * SECOND).await);
}

#[tokio::test]
async fn malformed_message_closes_only_that_client() {
    let proxy = TestProxy::start("pool_size = 1\nmax_pool_size = 1").await;
    let good = proxy.connect().await;
    good.batch_execute("SELECT 1").await.unwrap();

    // Length word below 4.
    let mut bad = Raw::login(proxy.addr).await;
    bad.send(&[b'Q', 0, 0, 0, 2]).await;
    let m = bad
        .recv_until(b'E', 5 * SECOND)
        .await
        .expect("error for a bad length");
    assert_eq!(m.sqlstate().as_deref(), Some("08P01"));
    assert!(bad.closed_within(5 * SECOND).await);

    // Declared length over max_packet_size: refused before anything is read.
    let proxy2 = TestProxy::start("max_packet_size = 4096").await;
    let mut big = Raw::login(proxy2.addr).await;
    big.send(&[b'Q', 0, 0x10, 0, 0]).await;
    let m = big
        .recv_until(b'E', 5 * SECOND)
        .await
        .expect("error for an oversized message");
    assert_eq!(m.sqlstate().as_deref(), Some("08P01"));
    assert!(
        m.field(b'M')
            .unwrap_or_default()
            .contains("max_packet_size"),
        "{m:?}"
    );
    assert!(big.closed_within(5 * SECOND).await);

    // A garbage message in the middle of a transaction: that server is not reused dirty.
    let mut mid = Raw::login(proxy.addr).await;
    mid.send(&raw::query("BEGIN")).await;
    mid.recv_until(b'Z', 5 * SECOND)
        .await
        .expect("BEGIN answered");
    mid.send(&[b'Q', 0xff, 0xff, 0xff, 0xff]).await;
    assert!(mid.closed_within(5 * SECOND).await);
    let row = good
        .query_one("SELECT pg_current_xact_id_if_assigned() IS NULL", &[])
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "the next client inherited an open transaction"
    );
}

#[tokio::test]
async fn encryption_requests_are_refused_and_login_continues() {
    let proxy = TestProxy::start("").await;
    for code in [80_877_103i32, 80_877_104] {
        let mut c = Raw::connect(proxy.addr).await;
        let mut pkt = 8i32.to_be_bytes().to_vec();
        pkt.extend_from_slice(&code.to_be_bytes());
        c.send(&pkt).await;
        let mut answer = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut c.stream, &mut answer)
            .await
            .unwrap();
        assert_eq!(answer[0], b'N');
        c.send(&raw::startup_packet(
            0,
            &[("user", APP_USER), ("database", APP_DB)],
        ))
        .await;
        let m = c.recv(5 * SECOND).await.expect("auth request");
        assert_eq!(m.tag, b'R');
    }
}

#[tokio::test]
async fn newer_protocol_minor_is_negotiated_down() {
    let proxy = TestProxy::start("").await;
    let mut c = Raw::connect(proxy.addr).await;
    c.send(&raw::startup_packet(
        2,
        &[
            ("user", APP_USER),
            ("database", APP_DB),
            ("_pq_.something", "1"),
        ],
    ))
    .await;
    let m = c.recv(5 * SECOND).await.expect("NegotiateProtocolVersion");
    assert_eq!(m.tag, b'v');
    assert_eq!(&m.body[..4], &196_608i32.to_be_bytes());
    assert_eq!(&m.body[4..8], &1i32.to_be_bytes());
    assert!(m.body.ends_with(b"_pq_.something\0"));
    let m = c.recv(5 * SECOND).await.expect("auth request");
    assert_eq!(m.tag, b'R');
}

#[tokio::test]
async fn authentication_errors_do_not_reveal_users() {
    let proxy = TestProxy::start("").await;
    let bad = |user: &str, pw: &str, db: &str| {
        format!(
            "host=127.0.0.1 port={} user={user} password={pw} dbname={db} connect_timeout=5",
            proxy.addr.port()
        )
    };
    let wrong_pw = tokio_postgres::connect(&bad(APP_USER, "nope", APP_DB), tokio_postgres::NoTls)
        .await
        .err()
        .expect("wrong password refused");
    let unknown = tokio_postgres::connect(&bad("ghost", "nope", APP_DB), tokio_postgres::NoTls)
        .await
        .err()
        .expect("unknown user refused");
    assert_eq!(sqlstate(&wrong_pw).as_deref(), Some("28P01"));
    assert_eq!(sqlstate(&unknown).as_deref(), Some("28P01"));
    assert_eq!(
        message(&unknown).replace("ghost", "X"),
        message(&wrong_pw).replace(APP_USER, "X")
    );
    // An unknown database is reported only to an authenticated client.
    let no_db =
        tokio_postgres::connect(&bad(APP_USER, APP_PASSWORD, "nodb"), tokio_postgres::NoTls)
            .await
            .err()
            .expect("unknown database refused");
    assert_eq!(sqlstate(&no_db).as_deref(), Some("3D000"));
    let no_db_bad_pw =
        tokio_postgres::connect(&bad(APP_USER, "nope", "nodb"), tokio_postgres::NoTls)
            .await
            .err()
            .expect("refused");
    assert_eq!(sqlstate(&no_db_bad_pw).as_deref(), Some("28P01"));
}

#[tokio::test]
async fn idle_transaction_timeout_closes_client_and_rolls_back() {
    let proxy =
        TestProxy::start("idle_transaction_timeout = \"1s\"\npool_size = 1\nmax_pool_size = 1")
            .await;
    let setup = proxy.connect().await;
    setup
        .batch_execute("DROP TABLE IF EXISTS idle_tx; CREATE TABLE idle_tx (v int)")
        .await
        .unwrap();
    let mut c = Raw::login(proxy.addr).await;
    c.send(&raw::query("BEGIN; INSERT INTO idle_tx VALUES (1)"))
        .await;
    c.recv_until(b'Z', 5 * SECOND).await.expect("answered");
    let started = Instant::now();
    let m = c.recv_until(b'E', 5 * SECOND).await.expect("timeout error");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(m.sqlstate().as_deref(), Some("25P03"));
    assert!(
        m.field(b'M')
            .unwrap_or_default()
            .contains("idle_transaction_timeout")
    );
    assert!(c.closed_within(5 * SECOND).await);
    // Rolled back, and the server serves others cleanly.
    let n: i64 = setup
        .query_one("SELECT count(*) FROM idle_tx", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    // Idle outside a transaction is fine.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    setup.query_one("SELECT 1", &[]).await.unwrap();
}

#[tokio::test]
async fn query_timeout_cancels_the_query_and_keeps_the_client() {
    let proxy = TestProxy::start("query_timeout = \"1s\"").await;
    let c = proxy.connect().await;
    let started = Instant::now();
    let err = c
        .simple_query("SELECT pg_sleep(20)")
        .await
        .expect_err("cancelled");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "{took:?}"
    );
    assert_eq!(
        c.query_one("SELECT 3", &[]).await.unwrap().get::<_, i32>(0),
        3
    );
}

#[tokio::test]
async fn sync_without_a_server_is_answered_locally() {
    let proxy = TestProxy::start("").await;
    let mut c = Raw::login(proxy.addr).await;
    c.send(&raw::message(b'S', &[])).await;
    let m = c.recv(5 * SECOND).await.expect("ReadyForQuery");
    assert_eq!((m.tag, m.body.as_slice()), (b'Z', &b"I"[..]));
    c.send(&raw::message(b'X', &[])).await;
    assert!(c.closed_within(5 * SECOND).await);
}

#[tokio::test]
async fn per_user_and_per_database_client_limits_name_the_setting() {
    let primary = tokio::task::spawn_blocking(cluster)
        .await
        .expect("cluster")
        .primary()
        .addr();
    let proxy = TestProxy::start_with(
        "",
        &format!(
            "\n[databases.capped]\nprimary = \"{primary}\"\ndbname = \"app\"\nmax_client_conn = 2\n\
             [users.auth_trust]\npassword = \"tpw\"\nmax_client_conn = 2\n"
        ),
    )
    .await;
    let base = format!(
        "host=127.0.0.1 port={} connect_timeout=10",
        proxy.addr.port()
    );
    let connect = |extra: String| {
        let conninfo = format!("{base} {extra}");
        async move {
            let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            Ok::<_, tokio_postgres::Error>(c)
        }
    };
    // Database limit: two clients, the third refused naming the setting.
    let db = || {
        connect(format!(
            "user={APP_USER} password={APP_PASSWORD} dbname=capped"
        ))
    };
    let a = db().await.expect("first");
    let b = db().await.expect("second");
    let err = db()
        .await
        .expect_err("third over databases.capped.max_client_conn");
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"));
    assert!(
        message(&err).contains("databases.capped.max_client_conn = 2"),
        "{}",
        message(&err)
    );
    // Other databases are not affected.
    proxy
        .connect()
        .await
        .simple_query("SELECT 1")
        .await
        .expect("app db");
    drop(a);
    eventually(
        "a slot frees when a client leaves",
        Duration::from_secs(5),
        || async { db().await.is_ok() },
    )
    .await;
    drop(b);

    // User limit.
    let user = || connect("user=auth_trust password=tpw dbname=app".into());
    let u1 = user().await.expect("first");
    let _u2 = user().await.expect("second");
    let err = user()
        .await
        .expect_err("third over users.auth_trust.max_client_conn");
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"));
    assert!(
        message(&err).contains("users.auth_trust.max_client_conn = 2"),
        "{}",
        message(&err)
    );
    u1.simple_query("SELECT 1")
        .await
        .expect("the admitted clients keep working");
}
