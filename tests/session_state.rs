//! Session state in transaction mode: session-level SET/RESET of any
//! parameter follows its client from server to server and never reaches
//! another client; features that need one server (LISTEN, session advisory
//! locks, WITH HOLD cursors, temporary tables) pin the client or are
//! refused, per `session_features`.

mod support;

use std::sync::atomic::Ordering;

use support::*;
use tokio_postgres::{Client, SimpleQueryMessage};

async fn one(c: &Client, sql: &str) -> Option<String> {
    let rows = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
        _ => None,
    })?
}

async fn pid(c: &Client) -> String {
    one(c, "SELECT pg_backend_pid()").await.unwrap()
}

/// Keeps the given client's server busy in a transaction, so the next
/// client's request lands on another server.
async fn occupy(c: &Client) {
    c.batch_execute("BEGIN").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreported_set_follows_its_client_and_leaks_to_nobody() {
    let proxy = TestProxy::start("pool_size = 2\nmax_pool_size = 2").await;
    let a = proxy.connect().await;
    let b = proxy.connect().await;
    let default_work_mem = one(&b, "SHOW work_mem").await.unwrap();
    a.batch_execute("SET work_mem = '7MB'").await.unwrap();
    a.batch_execute("SET search_path TO pg_catalog, public")
        .await
        .unwrap();
    a.batch_execute("SET SESSION statement_timeout = 12345")
        .await
        .unwrap();
    a.batch_execute("SET my.opt = 'mine'").await.unwrap();
    // B gets A's last server (LIFO) and sees none of it.
    assert_eq!(one(&b, "SHOW work_mem").await.unwrap(), default_work_mem);
    assert_eq!(
        one(&b, "SHOW search_path").await.unwrap(),
        "\"$user\", public"
    );
    assert_eq!(one(&b, "SHOW statement_timeout").await.unwrap(), "0");
    let opt = one(&b, "SELECT current_setting('my.opt', true)").await;
    assert!(opt.as_deref().unwrap_or("").is_empty(), "{opt:?}");
    // A has it all, on whichever server.
    for _ in 0..2 {
        assert_eq!(one(&a, "SHOW work_mem").await.unwrap(), "7MB");
        assert_eq!(
            one(&a, "SHOW search_path").await.unwrap(),
            "pg_catalog, public"
        );
        assert_eq!(one(&a, "SHOW statement_timeout").await.unwrap(), "12345ms");
        assert_eq!(one(&a, "SHOW my.opt").await.unwrap(), "mine");
        occupy(&b).await;
    }
    b.batch_execute("COMMIT").await.unwrap();
    // Through the extended protocol too.
    a.execute("SET work_mem = '3MB'", &[]).await.unwrap();
    occupy(&b).await;
    let row = a
        .query_one("SELECT current_setting('work_mem')", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "3MB");
    b.batch_execute("COMMIT").await.unwrap();
    assert_eq!(one(&b, "SHOW work_mem").await.unwrap(), default_work_mem);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_local_and_rolled_back_sets_behave_like_postgres() {
    let proxy = TestProxy::start("pool_size = 2\nmax_pool_size = 2").await;
    let a = proxy.connect().await;
    let b = proxy.connect().await;
    let default_work_mem = one(&b, "SHOW work_mem").await.unwrap();
    a.batch_execute("BEGIN; SET work_mem = '9MB'; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(one(&a, "SHOW work_mem").await.unwrap(), default_work_mem);
    a.batch_execute("BEGIN; SET LOCAL work_mem = '9MB'; COMMIT")
        .await
        .unwrap();
    assert_eq!(one(&a, "SHOW work_mem").await.unwrap(), default_work_mem);
    a.batch_execute("BEGIN; SET work_mem = '9MB'; COMMIT")
        .await
        .unwrap();
    occupy(&b).await;
    assert_eq!(one(&a, "SHOW work_mem").await.unwrap(), "9MB");
    b.batch_execute("ROLLBACK").await.unwrap();
    // Inside a transaction, across statements.
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("SET lock_timeout = '3s'").await.unwrap();
    a.batch_execute("SAVEPOINT s; SET lock_timeout = '4s'; ROLLBACK TO s")
        .await
        .unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    occupy(&b).await;
    assert_eq!(one(&a, "SHOW lock_timeout").await.unwrap(), "3s");
    b.batch_execute("ROLLBACK").await.unwrap();
    // RESET one, RESET ALL, DISCARD ALL.
    a.batch_execute("RESET work_mem").await.unwrap();
    occupy(&b).await;
    assert_eq!(one(&a, "SHOW work_mem").await.unwrap(), default_work_mem);
    assert_eq!(one(&a, "SHOW lock_timeout").await.unwrap(), "3s");
    b.batch_execute("ROLLBACK").await.unwrap();
    a.batch_execute("SET TimeZone = 'Asia/Tokyo'; RESET ALL")
        .await
        .unwrap();
    occupy(&b).await;
    assert_eq!(one(&a, "SHOW lock_timeout").await.unwrap(), "0");
    assert_eq!(
        one(&a, "SHOW TimeZone").await.unwrap(),
        one(&b, "SHOW TimeZone").await.unwrap()
    );
    b.batch_execute("ROLLBACK").await.unwrap();
    a.batch_execute("SELECT set_config('statement_timeout', '777', false)")
        .await
        .unwrap();
    occupy(&b).await;
    assert_eq!(one(&a, "SHOW statement_timeout").await.unwrap(), "777ms");
    b.batch_execute("ROLLBACK").await.unwrap();
    a.batch_execute("DISCARD ALL").await.unwrap();
    occupy(&b).await;
    assert_eq!(one(&a, "SHOW statement_timeout").await.unwrap(), "0");
    b.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_with_settings_leaves_nothing_behind() {
    let proxy = TestProxy::start("pool_size = 1\nmax_pool_size = 1").await;
    {
        let a = proxy.connect().await;
        a.batch_execute("SET work_mem = '5MB'; SET my.gone = 'x'")
            .await
            .unwrap();
    }
    let b = proxy.connect().await;
    let wm = one(&b, "SHOW work_mem").await.unwrap();
    assert_ne!(wm, "5MB");
    let gone = one(&b, "SELECT current_setting('my.gone', true)").await;
    assert!(gone.as_deref().unwrap_or("").is_empty(), "{gone:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_features_pin_until_the_state_is_gone() {
    let proxy = TestProxy::start("pool_size = 2\nmax_pool_size = 2").await;
    let a = proxy.connect().await;
    let b = proxy.connect().await;
    let pins = || proxy.shared.stats.prepared.pins.load(Ordering::Relaxed);
    let cases: &[(&str, &str, &str)] = &[
        (
            "LISTEN chan",
            "SELECT count(*) FROM pg_listening_channels()",
            "UNLISTEN *",
        ),
        (
            "SELECT pg_advisory_lock(42)",
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
            "SELECT pg_advisory_unlock_all()",
        ),
        (
            "BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1; COMMIT",
            "SELECT count(*) FROM pg_cursors",
            "CLOSE c",
        ),
        (
            "CREATE TEMP TABLE tt (a int)",
            "SELECT count(*) FROM tt",
            "DROP TABLE tt",
        ),
    ];
    for (i, (create, probe, release)) in cases.iter().enumerate() {
        let before = pins();
        a.batch_execute(create).await.unwrap();
        let pinned = pid(&a).await;
        assert_eq!(pins(), before + 1, "{create} pins");
        for _ in 0..3 {
            // B's transactions cannot take A's server.
            b.batch_execute("BEGIN").await.unwrap();
            assert_ne!(pid(&b).await, pinned, "{create}: B got A's pinned server");
            b.batch_execute("COMMIT").await.unwrap();
            assert_eq!(pid(&a).await, pinned, "{create}: A moved");
            one(&a, probe).await;
        }
        a.batch_execute(release).await.unwrap();
        // The check that unpins runs after A has its answer: wait for A's
        // server to come back to the pool (a fixed 300 ms was too short on
        // a loaded machine).
        let pool = proxy.primary_pool().expect("pool");
        eventually(
            &format!("case {i}: {release} unpins"),
            std::time::Duration::from_secs(10),
            || {
                let back = pool
                    .idle_servers()
                    .iter()
                    .any(|s| s.pid.to_string() == pinned);
                async move { back }
            },
        )
        .await;
        // Unpinned: A's server went back to the pool last and B (LIFO) gets it.
        occupy(&b).await;
        assert_eq!(pid(&b).await, pinned, "case {i}: {release} unpins");
        b.batch_execute("COMMIT").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_leaving_leaves_a_clean_server() {
    let proxy = TestProxy::start("pool_size = 1\nmax_pool_size = 1").await;
    {
        let a = proxy.connect().await;
        a.batch_execute("LISTEN x; SELECT pg_advisory_lock(7); CREATE TEMP TABLE t (a int)")
            .await
            .unwrap();
    }
    let b = proxy.connect().await;
    let n = one(
        &b,
        "SELECT (SELECT count(*) FROM pg_listening_channels()) \
         + (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())",
    )
    .await;
    assert_eq!(n.as_deref(), Some("0"));
    assert_eq!(
        one(&b, "SELECT pg_try_advisory_lock(7)").await.as_deref(),
        Some("t")
    );
    b.batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_features_can_be_refused() {
    let proxy = TestProxy::start("session_features = \"refuse\"").await;
    let a = proxy.connect().await;
    for sql in [
        "LISTEN chan",
        "SELECT pg_advisory_lock(1)",
        "BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1; COMMIT",
        "CREATE TEMP TABLE t (a int)",
    ] {
        let e = a.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{sql}: {e}");
        assert!(
            message(&e).contains("pool_mode = transaction"),
            "{}",
            message(&e)
        );
        a.batch_execute("ROLLBACK").await.ok();
        // Extended protocol: the Parse is refused.
        let e = a
            .query(sql.trim_start_matches("BEGIN; "), &[])
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{sql}: {e}");
    }
    // Still usable; transaction-scoped variants are fine.
    assert_eq!(
        one(&a, "SELECT pg_advisory_xact_lock(1)::text")
            .await
            .as_deref(),
        Some("")
    );
    a.batch_execute("BEGIN; CREATE TEMP TABLE t2 (a int) ON COMMIT DROP; COMMIT")
        .await
        .unwrap();
}

/// 50 clients over 3 servers, each with its own search_path, TimeZone,
/// application_name, statement_timeout and prepared statements, 10,000
/// random operations in all: every check sees exactly the client's own
/// state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_never_see_each_others_state() {
    use rand::{Rng, SeedableRng};
    const ZONES: &[&str] = &["UTC", "Asia/Tokyo", "Europe/Paris", "America/New_York"];
    let proxy = TestProxy::start("pool_size = 3\nmax_pool_size = 3").await;
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let conninfo = proxy.conninfo();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + i);
            let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            let check = c
                .prepare(
                    "SELECT current_setting('search_path'), current_setting('TimeZone'), \
                     current_setting('application_name'), current_setting('statement_timeout')",
                )
                .await
                .unwrap();
            let own = c.prepare(&format!("SELECT $1::int8 + {i}")).await.unwrap();
            let mut want = (
                "\"$user\", public".to_owned(),
                one(&c, "SHOW TimeZone").await.unwrap(),
                String::new(),
                "0".to_owned(),
            );
            let mut checks = 0;
            for op in 0..200 {
                let k: u32 = rng.random_range(0..1000);
                match rng.random_range(0..9) {
                    0 => {
                        c.batch_execute(&format!("SET search_path TO s{i}_{k}, public"))
                            .await
                            .unwrap();
                        want.0 = format!("s{i}_{k}, public");
                    }
                    1 => {
                        let z = ZONES[k as usize % ZONES.len()];
                        c.batch_execute(&format!("SET TimeZone = '{z}'"))
                            .await
                            .unwrap();
                        want.1 = z.to_owned();
                    }
                    2 => {
                        c.batch_execute(&format!("SET application_name = 'c{i}_{k}'"))
                            .await
                            .unwrap();
                        want.2 = format!("c{i}_{k}");
                    }
                    3 => {
                        let ms = 100_001 + 2 * k;
                        c.execute(&format!("SET statement_timeout = {ms}"), &[])
                            .await
                            .unwrap();
                        want.3 = format!("{ms}ms");
                    }
                    4 => {
                        // Local and rolled back: no trace afterwards.
                        c.batch_execute(&format!(
                            "BEGIN; SET LOCAL search_path = tmp{k}; SET TimeZone = 'UTC'; ROLLBACK"
                        ))
                        .await
                        .unwrap();
                    }
                    5 => {
                        let v: i64 = c.query_one(&own, &[&(k as i64)]).await.unwrap().get(0);
                        assert_eq!(v, k as i64 + i as i64);
                    }
                    _ => {
                        let row = c.query_one(&check, &[]).await.unwrap();
                        let got: (String, String, String, String) =
                            (row.get(0), row.get(1), row.get(2), row.get(3));
                        assert_eq!(got, want, "client {i} op {op}");
                        checks += 1;
                    }
                }
            }
            checks
        }));
    }
    let mut checks = 0;
    for t in tasks {
        checks += t.await.expect("client task");
    }
    assert!(checks > 2000, "{checks} checks");
    let status = proxy.primary_pool().expect("pool").status();
    assert!(status.open <= 3, "{status:?}");
}
