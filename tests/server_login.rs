//! pgsluice logging in to PostgreSQL with each method a server may ask for:
//! SCRAM-SHA-256 (the app role everywhere else), md5, cleartext password,
//! and trust; and a wrong server password reported with the server's own
//! SQLSTATE.

mod support;

use std::time::Duration;

use support::*;

async fn current_user_via(proxy: &TestProxy, user: &str) -> Result<String, tokio_postgres::Error> {
    let conninfo = format!(
        "host=127.0.0.1 port={} user={user} dbname={APP_DB} connect_timeout=10",
        proxy.addr.port()
    );
    let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let row = c.query_one("SELECT current_user::text", &[]).await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn logs_in_with_md5_cleartext_and_trust() {
    let proxy = TestProxy::start_with(
        "auth_type = \"trust\"",
        "[users.auth_md5]\npassword = \"pw\"\n[users.auth_password]\npassword = \"pw\"\n[users.auth_trust]\n",
    )
    .await;
    for user in ["auth_md5", "auth_password", "auth_trust", APP_USER] {
        let got = current_user_via(&proxy, user)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e:?}"));
        assert_eq!(got, user);
    }
}

#[tokio::test]
async fn wrong_server_password_is_the_servers_28p01() {
    let proxy = TestProxy::start_with(
        "auth_type = \"trust\"",
        "[users.auth_md5]\npassword = \"not-pw\"\n",
    )
    .await;
    let err = current_user_via(&proxy, "auth_md5")
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{err:?}");
    assert!(message(&err).contains("auth_md5"), "{}", message(&err));
}

#[tokio::test]
async fn password_needed_but_not_configured_is_explained() {
    let proxy = TestProxy::start_with("auth_type = \"trust\"", "[users.auth_md5]\n").await;
    let err = current_user_via(&proxy, "auth_md5")
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"), "{err:?}");
    assert!(
        message(&err).contains("none is configured"),
        "{}",
        message(&err)
    );
}

/// The password changes on the server while a pool is live: clients holding
/// pooled connections keep working; new server logins fail, and the failure
/// is remembered (`server_login_retry`), so ten waiting clients cost one or
/// two failed logins on the server, not ten.
#[tokio::test]
async fn password_changed_on_the_server_fails_new_logins_once_not_per_client() {
    let su = superuser(0).await;
    su.batch_execute(
        "DROP ROLE IF EXISTS pw_change; CREATE ROLE pw_change LOGIN PASSWORD 'before'",
    )
    .await
    .expect("role");
    let proxy = TestProxy::start_with(
        "pool_size = 2\nmax_pool_size = 2\nserver_login_retry = \"30s\"",
        "\n[users.pw_change]\npassword = \"before\"\n",
    )
    .await;
    let conninfo = format!(
        "host=127.0.0.1 port={} user=pw_change password=before dbname=app connect_timeout=10",
        proxy.addr.port()
    );
    let connect = || async {
        let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok::<_, tokio_postgres::Error>(c)
    };
    let holder = connect().await.expect("first client");
    holder
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("holds a server");

    su.batch_execute("ALTER ROLE pw_change PASSWORD 'after'")
        .await
        .expect("alter role");
    let log = || {
        std::fs::read_to_string(&cluster().primary().log_file)
            .unwrap_or_default()
            .matches("password authentication failed for user \"pw_change\"")
            .count()
    };
    let failures_before = log();

    // The established client keeps working on its server.
    holder
        .batch_execute("SELECT 2; COMMIT")
        .await
        .expect("established client works");

    // Drop the idle pooled connection so every newcomer needs a login.
    su.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE usename = 'pw_change' AND state = 'idle'",
    )
    .await
    .expect("terminate idle");
    holder.batch_execute("BEGIN; SELECT 3").await.ok();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let c = connect()
            .await
            .expect("client login (pgsluice checks the client itself)");
        tasks.push(tokio::spawn(
            async move { c.simple_query("SELECT 1").await },
        ));
    }
    let mut failed = 0;
    for t in tasks {
        if let Err(e) = t.await.expect("join") {
            assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e:?}");
            failed += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server_failures = log() - failures_before;
    assert!(
        failed >= 1,
        "new server logins should fail with the server's 28P01"
    );
    assert!(
        (1..=2).contains(&server_failures),
        "{server_failures} failed logins on the server for {failed} clients"
    );
}
