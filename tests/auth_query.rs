//! auth_query against a real PostgreSQL: a user who is not in pgsluice's
//! config logs in with the SCRAM secret the server keeps, pgsluice logs in
//! to PostgreSQL as that user by SCRAM pass-through, and wrong passwords,
//! roles without a password, unknown and hostile names all get the same
//! 28P01 as a wrong password.

mod support;

use std::time::Duration;

use support::{TestProxy, eventually, message, sqlstate, superuser};

const AUTH_QUERY: &str = "\n[auth_query]\nuser = \"app\"\n\
     query = \"SELECT usename, passwd FROM public.pgsluice_lookup($1)\"\ncache_ttl = \"1s\"\n";

async fn setup() {
    let su = superuser(0).await;
    su.batch_execute(
        "DROP ROLE IF EXISTS aq_user; DROP ROLE IF EXISTS aq_nopass;
         CREATE ROLE aq_user LOGIN PASSWORD 'aq-secret';
         CREATE ROLE aq_nopass LOGIN;
         CREATE OR REPLACE FUNCTION public.pgsluice_lookup(u text)
           RETURNS TABLE (usename name, passwd text) LANGUAGE sql SECURITY DEFINER
           AS $$ SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = u $$;
         REVOKE ALL ON FUNCTION public.pgsluice_lookup(text) FROM PUBLIC;
         GRANT EXECUTE ON FUNCTION public.pgsluice_lookup(text) TO app;",
    )
    .await
    .expect("roles and lookup function");
}

async fn login(
    proxy: &TestProxy,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    proxy.connect_as(user, password, "app").await
}

#[tokio::test]
async fn users_found_by_auth_query_log_in_with_the_servers_scram_secret() {
    setup().await;
    let proxy = TestProxy::start_with("", AUTH_QUERY).await;

    let c = login(&proxy, "aq_user", "aq-secret")
        .await
        .expect("aq_user logs in");
    let row = c
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query");
    assert_eq!(
        row.get::<_, String>(0),
        "aq_user",
        "pgsluice logged in to PostgreSQL as the user"
    );
    // A second client reuses the pool (and the cached lookup).
    let c2 = login(&proxy, "aq_user", "aq-secret")
        .await
        .expect("second login");
    c2.simple_query("SELECT 1").await.expect("query");

    let wrong = login(&proxy, "aq_user", "nope")
        .await
        .expect_err("wrong password");
    assert_eq!(sqlstate(&wrong).as_deref(), Some("28P01"));
    let expected = |u: &str| format!("password authentication failed for user \"{u}\"");
    assert_eq!(message(&wrong), expected("aq_user"));
    for user in [
        "aq_nopass",
        "nobody_at_all",
        "x' OR '1'='1",
        "app2\"; DROP TABLE t; --",
    ] {
        let e = login(&proxy, user, "whatever").await.expect_err(user);
        assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{user}");
        assert_eq!(
            message(&e),
            expected(user),
            "{user}: same error as a wrong password"
        );
    }

    // The password changes on the server: the established client keeps
    // working; after cache_ttl only the new password logs in.
    superuser(0)
        .await
        .batch_execute("ALTER ROLE aq_user PASSWORD 'aq-new'")
        .await
        .expect("alter role");
    c.simple_query("SELECT 1")
        .await
        .expect("established client unaffected");
    eventually(
        "the new password is accepted",
        Duration::from_secs(5),
        || async { login(&proxy, "aq_user", "aq-new").await.is_ok() },
    )
    .await;
    let old = login(&proxy, "aq_user", "aq-secret")
        .await
        .expect_err("old password");
    assert_eq!(sqlstate(&old).as_deref(), Some("28P01"));
}
