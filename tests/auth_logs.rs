//! Passwords and secrets never reach the logs: logins (right and wrong,
//! SCRAM and cleartext, pass-through to PostgreSQL) with every pgsluice log
//! line captured at TRACE level; the config's `Debug` and `render` too.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use support::*;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn login(proxy: &TestProxy, user: &str, password: &str) -> Result<(), tokio_postgres::Error> {
    let c = proxy.connect_as(user, password, APP_DB).await?;
    c.simple_query("SELECT 1").await?;
    Ok(())
}

#[tokio::test]
async fn no_password_or_secret_in_trace_logs() {
    let capture = Capture::default();
    let writer = capture.clone();
    // Everything pgsluice (and the protocol crate it uses) emits; not the
    // test's own client, which logs the CREATE ROLE statements below.
    tracing_subscriber::fmt()
        .with_env_filter("pgsluice=trace,postgres_protocol=trace")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let scram_pw = "Tr0ub4dor-scram-log-test";
    let plain_pw = "Plain-Pass-log-test-Xyz";
    let secret = pgsluice::auth::hash_password(scram_pw.as_bytes());
    let su = superuser(0).await;
    su.batch_execute(&format!(
        "DROP ROLE IF EXISTS log_scram; CREATE ROLE log_scram LOGIN PASSWORD '{secret}';\
         DROP ROLE IF EXISTS log_plain; CREATE ROLE log_plain LOGIN PASSWORD '{plain_pw}'"
    ))
    .await
    .unwrap();
    let users = format!(
        "[users.log_scram]\npassword = \"{secret}\"\n[users.log_plain]\npassword = \"{plain_pw}\"\n"
    );

    let mut debug_and_render = String::new();
    for method in ["scram-sha-256", "password", "md5"] {
        let proxy = TestProxy::start_with(&format!("auth_type = \"{method}\""), &users).await;
        login(&proxy, "log_scram", scram_pw).await.unwrap();
        login(&proxy, "log_plain", plain_pw).await.unwrap();
        assert!(login(&proxy, "log_scram", "wrong-log-test").await.is_err());
        assert!(login(&proxy, "nobody", scram_pw).await.is_err());
        debug_and_render.push_str(&format!("{:?}\n", proxy.shared.config()));
        debug_and_render.push_str(&proxy.shared.config().render());
        for pool in proxy.shared.pools.all() {
            debug_and_render.push_str(&format!("{:?}\n", pool.label()));
        }
    }

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("client authenticated") && logs.contains("login refused"),
        "capture is not working:\n{logs}"
    );
    let parts: Vec<&str> = secret.split(['$', ':']).collect();
    let (stored_key, server_key) = (parts[3], parts[4]);
    for (name, needle) in [
        ("SCRAM password", scram_pw),
        ("plaintext password", plain_pw),
        ("wrong password", "wrong-log-test"),
        ("secret", secret.as_str()),
        ("StoredKey", stored_key),
        ("ServerKey", server_key),
    ] {
        if let Some(line) = logs.lines().find(|l| l.contains(needle)) {
            panic!("{name} in the logs: {line}");
        }
        assert!(
            !debug_and_render.contains(needle),
            "{name} in Debug or check output"
        );
    }
}
