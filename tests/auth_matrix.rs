//! Client authentication against pgsluice in front of a real PostgreSQL:
//! every method × every kind of stored secret × right/wrong password, the
//! fake exchange of unknown users, a long password, and access rules.
//!
//! What PostgreSQL itself does, and pgsluice mirrors (client method ×
//! stored kind):
//!
//! | method \ stored | plaintext* | SCRAM secret | md5 hash |
//! |---|---|---|---|
//! | scram-sha-256 | SCRAM | SCRAM | mock SCRAM, always 28P01 |
//! | md5 | md5 | SCRAM (PostgreSQL switches to SCRAM) | md5 |
//! | password | cleartext | cleartext checked against the secret | cleartext checked against the hash |
//!
//! *PostgreSQL no longer stores plaintext; pgsluice can serve every method
//! from it.
//!
//! The pgsluice users map to roles whose PostgreSQL login pgsluice can make
//! with what it has: `auth_password` (plaintext `pw`, server asks
//! cleartext), `m_scram` (the same SCRAM secret on both sides: SCRAM
//! pass-through, or the cleartext password a `password` client gave),
//! `auth_md5` (the md5 hash: answers the server's md5 challenge).

mod support;

use std::time::Duration;

use support::*;
use tokio::sync::OnceCell;

const PW: &str = "pw";

/// The SCRAM secret of `m_scram`, installed in PostgreSQL once.
async fn scram_role() -> &'static str {
    static SECRET: OnceCell<String> = OnceCell::const_new();
    SECRET
        .get_or_init(|| async {
            let secret = pgsluice::auth::hash_password(PW.as_bytes());
            let su = superuser(0).await;
            su.batch_execute(&format!(
                "DROP ROLE IF EXISTS m_scram; CREATE ROLE m_scram LOGIN PASSWORD '{secret}';\
                 DROP ROLE IF EXISTS m_long; SET password_encryption = 'scram-sha-256';\
                 CREATE ROLE m_long LOGIN PASSWORD '{}'",
                long_password()
            ))
            .await
            .expect("create test roles");
            secret
        })
        .await
}

fn long_password() -> String {
    // 1000 bytes, multi-byte characters and all.
    let mut p = "é".repeat(400);
    p.push_str(&"x".repeat(200));
    assert_eq!(p.len(), 1000);
    p
}

/// pgsluice with `auth_type = method` and one user per stored kind.
async fn proxy(method: &str) -> TestProxy {
    let scram = scram_role().await;
    let md5 = postgres_protocol::password::md5(PW.as_bytes(), "auth_md5");
    TestProxy::start_with(
        &format!("auth_type = \"{method}\""),
        &format!(
            "[users.auth_password]\npassword = \"{PW}\"\n\
             [users.m_scram]\npassword = \"{scram}\"\n\
             [users.auth_md5]\npassword = \"{md5}\"\n\
             [users.m_long]\npassword = \"{}\"\n",
            long_password()
        ),
    )
    .await
}

async fn login(
    proxy: &TestProxy,
    user: &str,
    password: &str,
    db: &str,
) -> Result<String, tokio_postgres::Error> {
    let c = proxy.connect_as(user, password, db).await?;
    let row = c.query_one("SELECT current_user::text", &[]).await?;
    Ok(row.get(0))
}

fn assert_bad_password(r: Result<String, tokio_postgres::Error>, user: &str, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{what}: {e:?}");
    assert_eq!(
        message(&e),
        format!("password authentication failed for user \"{user}\""),
        "{what}"
    );
}

#[tokio::test]
async fn method_by_stored_secret_matrix() {
    for method in ["scram-sha-256", "md5", "password"] {
        let proxy = proxy(method).await;
        for (user, kind) in [
            ("auth_password", "plaintext"),
            ("m_scram", "scram"),
            ("auth_md5", "md5"),
        ] {
            let what = format!("{method} / {kind}");
            let servable = !(method == "scram-sha-256" && kind == "md5");
            let good = login(&proxy, user, PW, APP_DB).await;
            if servable {
                assert_eq!(good.unwrap_or_else(|e| panic!("{what}: {e:?}")), user);
            } else {
                // As PostgreSQL: an md5 hash cannot serve SCRAM; the mock
                // exchange fails like a wrong password.
                assert_bad_password(good, user, &what);
            }
            assert_bad_password(
                login(&proxy, user, "wrong", APP_DB).await,
                user,
                &format!("{what} wrong password"),
            );
        }
    }
}

#[tokio::test]
async fn unknown_user_gets_the_wrong_password_error() {
    for method in ["scram-sha-256", "md5", "password"] {
        let proxy = proxy(method).await;
        let unknown = login(&proxy, "nobody_here", PW, APP_DB).await;
        assert_bad_password(unknown, "nobody_here", method);
        // The same user with a wrong password: identical apart from the name.
        let wrong = login(&proxy, "auth_password", "nope", APP_DB).await;
        assert_bad_password(wrong, "auth_password", method);
    }
}

/// Same timing class: an unknown user's failed login takes about as long as
/// a wrong password's (the full exchange runs; nothing answers early). The
/// band is wide on purpose: an early refusal skips the client's 4096-round
/// key derivation and the round trips, and lands far outside it.
#[tokio::test]
async fn unknown_user_fails_in_the_same_time_class_as_a_wrong_password() {
    let proxy = proxy("scram-sha-256").await;
    let mut unknown = Vec::new();
    let mut wrong = Vec::new();
    for _ in 0..15 {
        for (user, list) in [("nobody_here", &mut unknown), ("m_scram", &mut wrong)] {
            let t = std::time::Instant::now();
            assert!(
                login(&proxy, user, "not-the-password", APP_DB)
                    .await
                    .is_err()
            );
            list.push(t.elapsed());
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (u, w) = (median(&mut unknown), median(&mut wrong));
    let ratio = u.as_secs_f64() / w.as_secs_f64();
    assert!(
        (0.33..3.0).contains(&ratio),
        "unknown user {u:?} vs wrong password {w:?} (ratio {ratio:.2})"
    );
}

/// The SCRAM salt an unknown user sees is stable (as a real user's is) and
/// shaped like a real one.
#[tokio::test]
async fn unknown_user_sees_a_stable_salt() {
    let proxy = proxy("scram-sha-256").await;
    let salt = |user: &'static str| {
        let addr = proxy.addr;
        async move {
            let mut c = raw::Raw::connect(addr).await;
            c.send(&raw::startup_packet(
                0,
                &[("user", user), ("database", APP_DB)],
            ))
            .await;
            let m = c.recv(Duration::from_secs(5)).await.expect("SASL");
            assert_eq!(&m.body[..4], &10i32.to_be_bytes());
            let mut body = b"SCRAM-SHA-256\0".to_vec();
            let first = b"n,,n=,r=clientnonce";
            body.extend_from_slice(&(first.len() as i32).to_be_bytes());
            body.extend_from_slice(first);
            c.send(&raw::message(b'p', &body)).await;
            let m = c.recv(Duration::from_secs(5)).await.expect("SASL continue");
            assert_eq!(&m.body[..4], &11i32.to_be_bytes());
            let text = String::from_utf8(m.body[4..].to_vec()).unwrap();
            let s = text.split(',').find_map(|a| a.strip_prefix("s=")).unwrap();
            let i = text.split(',').find_map(|a| a.strip_prefix("i=")).unwrap();
            (s.to_owned(), i.to_owned())
        }
    };
    let (ghost1, iters) = salt("ghost").await;
    let (ghost2, _) = salt("ghost").await;
    let (other, _) = salt("ghost_two").await;
    let (real, real_iters) = salt("m_scram").await;
    assert_eq!(ghost1, ghost2);
    assert_ne!(ghost1, other);
    assert_eq!(ghost1.len(), real.len());
    assert_eq!(iters, real_iters);
}

#[tokio::test]
async fn thousand_byte_password() {
    for method in ["scram-sha-256", "md5", "password"] {
        let proxy = proxy(method).await;
        let got = login(&proxy, "m_long", &long_password(), APP_DB).await;
        assert_eq!(got.unwrap_or_else(|e| panic!("{method}: {e:?}")), "m_long");
        let mut wrong = long_password();
        wrong.pop();
        wrong.push('y');
        assert_bad_password(
            login(&proxy, "m_long", &wrong, APP_DB).await,
            "m_long",
            method,
        );
    }
}

/// Access rules: reject, CIDR match and mismatch, database and user lists,
/// first match wins, no match.
#[tokio::test]
async fn access_rules() {
    let primary = tokio::task::spawn_blocking(cluster)
        .await
        .unwrap()
        .primary()
        .addr();
    let proxy = TestProxy::start_with(
        "",
        &format!(
            "[databases.app2]\nprimary = \"{primary}\"\ndbname = \"app\"\n\
             [databases.app3]\nprimary = \"{primary}\"\ndbname = \"app\"\n\
             [users.auth_trust]\n\
             [users.auth_password]\npassword = \"{PW}\"\n\
             [[hba]]\ndatabase = \"app2\"\naddress = \"127.0.0.1/32\"\nmethod = \"reject\"\n\
             [[hba]]\ndatabase = \"app\"\nuser = \"auth_trust,auth_password\"\naddress = \"10.0.0.0/8\"\nmethod = \"trust\"\n\
             [[hba]]\ndatabase = \"app\"\nuser = \"auth_trust\"\naddress = \"127.0.0.1/32\"\nmethod = \"trust\"\n\
             [[hba]]\ndatabase = \"app,app3\"\nuser = \"auth_trust\"\naddress = \"127.0.0.1/32\"\nmethod = \"reject\"\n\
             [[hba]]\ntype = \"hostssl\"\nmethod = \"trust\"\n\
             [[hba]]\ntype = \"hostnossl\"\ndatabase = \"app\"\naddress = \"127.0.0.1/32\"\nmethod = \"scram-sha-256\"\n"
        ),
    )
    .await;
    let refused = |r: Result<String, tokio_postgres::Error>, code: &str, text: &str| {
        let e = r.expect_err(text);
        assert_eq!(sqlstate(&e).as_deref(), Some(code), "{e:?}");
        assert_eq!(message(&e), text);
    };
    // A reject rule.
    refused(
        login(&proxy, APP_USER, APP_PASSWORD, "app2").await,
        "28000",
        "pgsluice access rule rejects connection for host \"127.0.0.1\", user \"app\", database \"app2\"",
    );
    // 127.0.0.1 is not in 10.0.0.0/8: auth_password falls through to SCRAM.
    assert_bad_password(
        login(&proxy, "auth_password", "not-pw", APP_DB).await,
        "auth_password",
        "CIDR mismatch falls through",
    );
    assert_eq!(
        login(&proxy, "auth_password", PW, APP_DB).await.unwrap(),
        "auth_password"
    );
    // 127.0.0.1/32 matches: trust, without a password; the reject rule
    // after it for the same user and database is never reached.
    assert_eq!(
        login(&proxy, "auth_trust", "", APP_DB).await.unwrap(),
        "auth_trust"
    );
    // ...but it is for app3 (database list).
    refused(
        login(&proxy, "auth_trust", "", "app3").await,
        "28000",
        "pgsluice access rule rejects connection for host \"127.0.0.1\", user \"auth_trust\", database \"app3\"",
    );
    // No rule for app3 and other users (hostssl never matches without TLS).
    refused(
        login(&proxy, APP_USER, APP_PASSWORD, "app3").await,
        "28000",
        "no pgsluice access rule for host \"127.0.0.1\", user \"app\", database \"app3\"",
    );
    // The last rule: SCRAM for everyone else on app.
    assert_eq!(
        login(&proxy, APP_USER, APP_PASSWORD, APP_DB).await.unwrap(),
        APP_USER
    );
}

/// Rules from a pg_hba-style file (general.hba_file).
#[tokio::test]
async fn access_rules_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgsluice_hba.conf");
    std::fs::write(
        &path,
        "# TYPE  DATABASE  USER   ADDRESS       METHOD\n\
         host    app       app    ::1/128       reject\n\
         host    app       app    127.0.0.1/32  md5\n",
    )
    .unwrap();
    let proxy = TestProxy::start(&format!("hba_file = \"{}\"", path.display())).await;
    assert_eq!(
        login(&proxy, APP_USER, APP_PASSWORD, APP_DB).await.unwrap(),
        APP_USER
    );
    let e = login(&proxy, "auth_trust", "", APP_DB)
        .await
        .expect_err("no rule");
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"));
}

/// libpq (psql with PGPASSWORD) through every method, right and wrong
/// password, and an unknown user.
#[tokio::test]
async fn psql_logs_in_with_each_method() {
    fn psql(port: u16, user: &str, password: &str) -> (bool, String, String) {
        let out = std::process::Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", user])
            .args(["-d", APP_DB, "-XAtc", "SELECT current_user"])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .env_remove("PGSSLMODE")
            .env_remove("PGSERVICE")
            .output()
            .expect("run psql");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
    for method in ["scram-sha-256", "md5", "password"] {
        let proxy = proxy(method).await;
        let port = proxy.addr.port();
        let results = tokio::task::spawn_blocking(move || {
            [
                psql(port, "m_scram", PW),
                psql(port, "auth_password", PW),
                psql(port, "m_scram", "wrong"),
                psql(port, "ghost_user", PW),
            ]
        })
        .await
        .unwrap();
        let [scram, plain, wrong, ghost] = results;
        assert!(scram.0 && scram.1 == "m_scram", "{method}: {scram:?}");
        assert!(plain.0 && plain.1 == "auth_password", "{method}: {plain:?}");
        for (r, user) in [(wrong, "m_scram"), (ghost, "ghost_user")] {
            assert!(!r.0, "{method}: {r:?}");
            assert!(
                r.2.contains(&format!(
                    "FATAL:  password authentication failed for user \"{user}\""
                )),
                "{method}: {r:?}"
            );
        }
    }
}
