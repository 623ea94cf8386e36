//! pgsluice logging in to PostgreSQL with each method a server may ask for:
//! SCRAM-SHA-256 (the app role everywhere else), md5, cleartext password,
//! and trust; and a wrong server password reported with the server's own
//! SQLSTATE.

mod support;

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
