//! TLS end to end, with certificates generated here: psql and raw TLS
//! clients through pgsluice on one side, a PostgreSQL with `ssl = on` on the
//! other.
//!
//! One PKI per test binary: `ca` signs pgsluice's certificate, PostgreSQL's
//! (both valid for `localhost` only) and the client certificate (CN
//! `alice-cert`); `wrong_ca` signs nothing that is used.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use pgsluice::config::Config;
use pgsluice::localpg::{ClusterOptions, LocalCluster};
use pgsluice::proxy::{Proxy, Shared, ShutdownHandle};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

struct Pki {
    _dir: tempfile::TempDir,
    dir: PathBuf,
}

impl Pki {
    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

fn write(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write PEM");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().expect("key");
    let pem = params.self_signed(&key).expect("CA").pem();
    (params, key, pem)
}

fn leaf(issuer: &Issuer<'_, KeyPair>, cn: &str, names: &[&str]) -> (String, String) {
    let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    let mut params = CertificateParams::new(names).expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        let (ca_params, ca_key, ca_pem) = ca("pgsluice test CA");
        let (_, _, wrong_pem) = ca("some other CA");
        let issuer = Issuer::new(ca_params, ca_key);
        write(&dir.join("ca.pem"), &ca_pem, 0o644);
        write(&dir.join("wrong-ca.pem"), &wrong_pem, 0o644);
        for (name, cn) in [("pgsluice", "localhost"), ("pg", "localhost")] {
            let (cert, key) = leaf(&issuer, cn, &["localhost"]);
            write(&dir.join(format!("{name}.crt")), &cert, 0o644);
            write(&dir.join(format!("{name}.key")), &key, 0o600);
        }
        let (cert, key) = leaf(&issuer, "alice-cert", &[]);
        write(&dir.join("alice.crt"), &cert, 0o644);
        write(&dir.join("alice.key"), &key, 0o600);
        // PostgreSQL runs as `postgres` when we are root: it must reach and
        // own its key (0600).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        if nix::unistd::geteuid().is_root() {
            if let Ok(Some(u)) = nix::unistd::User::from_name("postgres") {
                for f in ["pg.crt", "pg.key"] {
                    std::os::unix::fs::chown(
                        dir.join(f),
                        Some(u.uid.as_raw()),
                        Some(u.gid.as_raw()),
                    )
                    .expect("chown");
                }
            }
        }
        Pki { _dir: tmp, dir }
    })
}

/// A primary and one replica with `ssl = on` and the PKI's server certificate.
fn cluster() -> &'static LocalCluster {
    static CLUSTER: OnceLock<LocalCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let p = pki();
        LocalCluster::start(ClusterOptions {
            replicas: 1,
            extra_conf: vec![
                "ssl = on".into(),
                format!("ssl_cert_file = '{}'", p.file("pg.crt")),
                format!("ssl_key_file = '{}'", p.file("pg.key")),
            ],
            ..ClusterOptions::default()
        })
        .unwrap_or_else(|e| panic!("cannot start the test PostgreSQL cluster: {e}"))
    })
}

struct TestProxy {
    port: u16,
    shared: Arc<Shared>,
    handle: ShutdownHandle,
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.handle.stop_now();
        self.shared.pools.close_all();
    }
}

/// pgsluice with `tls` as the body of its `[tls]` table, `extra` TOML after
/// it, and the servers addressed by `host` (the PostgreSQL certificate is
/// valid for `localhost` only). Without a `[routing]` table in `extra`,
/// everything goes to the primary.
async fn start(tls: &str, extra: &str, host: &str) -> Result<TestProxy, String> {
    let cluster = tokio::task::spawn_blocking(cluster).await.expect("cluster");
    let toml = cluster
        .pgsluice_config("")
        .replace("\"127.0.0.1:", &format!("\"{host}:"))
        .replace("[general]\n", "[general]\nlisten_addr = \"127.0.0.1:0\"\n");
    let routing = if extra.contains("[routing]") {
        ""
    } else {
        "\n[routing]\ndefault_route = \"primary\"\nmonitor_user = \"app\"\n"
    };
    let toml = format!("{toml}\n[tls]\n{tls}\n{routing}{extra}");
    let config = Config::from_toml(&toml, "test", std::iter::empty()).map_err(|e| e.to_string())?;
    let proxy = Proxy::bind(config).await.map_err(|e| e.to_string())?;
    let port = proxy.local_addr().expect("addr").port();
    let shared = proxy.shared().clone();
    let handle = proxy.shutdown_handle();
    tokio::spawn(proxy.run());
    Ok(TestProxy {
        port,
        shared,
        handle,
    })
}

fn client_side(mode: &str) -> String {
    let p = pki();
    format!(
        "client_mode = \"{mode}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\nclient_ca_file = \"{}\"\n",
        p.file("pgsluice.crt"),
        p.file("pgsluice.key"),
        p.file("ca.pem"),
    )
}

/// psql through pgsluice: stdout on success, stderr on failure.
async fn psql(conninfo: String, sql: &'static str) -> Result<String, String> {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("psql")
            .arg(&conninfo)
            .args(["-X", "-At", "-c", sql])
            .env("PGPASSWORD", "app")
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("run psql");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    })
    .await
    .expect("psql task")
}

fn conninfo(port: u16, host: &str, extra: &str) -> String {
    format!("host={host} hostaddr=127.0.0.1 port={port} user=app dbname=app {extra}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_refuses_plaintext_with_28000() {
    let proxy = start(&client_side("require"), "", "127.0.0.1")
        .await
        .unwrap();
    let plain = format!(
        "{} password=app sslmode=disable",
        conninfo(proxy.port, "localhost", "")
    );
    let err = match tokio_postgres::connect(&plain, tokio_postgres::NoTls).await {
        Ok(_) => panic!("a plaintext login was accepted under client_mode = require"),
        Err(e) => e,
    };
    let db = err.as_db_error().expect("an error from pgsluice");
    assert_eq!(db.code().code(), "28000");
    assert!(
        db.message().contains("only TLS connections"),
        "{}",
        db.message()
    );
    let stderr = psql(
        conninfo(proxy.port, "localhost", "sslmode=disable"),
        "SELECT 1",
    )
    .await
    .unwrap_err();
    assert!(stderr.contains("only TLS connections"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_require_and_verify_full_work_through_pgsluice() {
    let p = pki();
    let server = format!(
        "server_mode = \"verify-full\"\nserver_ca_file = \"{}\"\n",
        p.file("ca.pem")
    );
    let proxy = start(
        &format!("{}{server}", client_side("require")),
        "",
        "localhost",
    )
    .await
    .unwrap();
    let info = psql(
        conninfo(proxy.port, "localhost", "sslmode=require"),
        "\\conninfo",
    )
    .await
    .unwrap();
    assert!(info.contains("SSL connection"), "{info}");
    let verified = format!("sslmode=verify-full sslrootcert={}", p.file("ca.pem"));
    let out = psql(
        conninfo(proxy.port, "localhost", &verified),
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .await
    .unwrap();
    assert_eq!(out, "t", "pgsluice -> PostgreSQL is not TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_verify_full_rejects_wrong_ca_and_wrong_host_name() {
    let p = pki();
    let proxy = start(&client_side("require"), "", "127.0.0.1")
        .await
        .unwrap();
    let wrong_ca = format!("sslmode=verify-full sslrootcert={}", p.file("wrong-ca.pem"));
    let stderr = psql(conninfo(proxy.port, "localhost", &wrong_ca), "SELECT 1")
        .await
        .unwrap_err();
    assert!(stderr.contains("certificate verify failed"), "{stderr}");
    let right_ca = format!("sslmode=verify-full sslrootcert={}", p.file("ca.pem"));
    let stderr = psql(conninfo(proxy.port, "127.0.0.1", &right_ca), "SELECT 1")
        .await
        .unwrap_err();
    assert!(stderr.contains("does not match host name"), "{stderr}");
    // verify-ca does not look at the name.
    let ca_only = format!("sslmode=verify-ca sslrootcert={}", p.file("ca.pem"));
    assert_eq!(
        psql(conninfo(proxy.port, "127.0.0.1", &ca_only), "SELECT 1")
            .await
            .unwrap(),
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_auth_maps_the_common_name_and_hostssl_rules_match() {
    let p = pki();
    let tls = format!(
        "{}\n[tls.cert_map]\n\"alice-cert\" = \"app\"\n",
        client_side("allow")
    );
    let hba = "[[hba]]\ntype = \"hostssl\"\nmethod = \"cert\"\n\n\
               [[hba]]\ntype = \"hostnossl\"\nmethod = \"reject\"\n";
    let proxy = start(&tls, hba, "127.0.0.1").await.unwrap();
    let with_cert = format!(
        "sslmode=require sslcert={} sslkey={} password=wrong",
        p.file("alice.crt"),
        p.file("alice.key")
    );
    let out = psql(
        conninfo(proxy.port, "localhost", &with_cert),
        "SELECT current_user",
    )
    .await
    .unwrap();
    assert_eq!(out, "app");
    // TLS without a certificate: the hostssl rule's cert method fails.
    let stderr = psql(
        conninfo(
            proxy.port,
            "localhost",
            "sslmode=require sslcert=/nonexistent",
        ),
        "SELECT 1",
    )
    .await
    .unwrap_err();
    assert!(
        stderr.contains("certificate authentication failed for user \"app\""),
        "{stderr}"
    );
    // The certificate names app, not another user.
    let stderr = psql(
        format!(
            "{} user=postgres",
            conninfo(proxy.port, "localhost", &with_cert)
        ),
        "SELECT 1",
    )
    .await
    .unwrap_err();
    assert!(
        stderr.contains("certificate authentication failed"),
        "{stderr}"
    );
    // Plaintext matches the hostnossl rule.
    let stderr = psql(
        conninfo(proxy.port, "localhost", "sslmode=disable"),
        "SELECT 1",
    )
    .await
    .unwrap_err();
    assert!(stderr.contains("access rule rejects"), "{stderr}");
}

async fn server_login(server_tls: &str, host: &str) -> Result<String, String> {
    let proxy = start(&format!("{}{server_tls}", client_side("allow")), "", host).await?;
    psql(
        conninfo(proxy.port, "localhost", "sslmode=disable"),
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_verify_full_checks_ca_and_host_name() {
    let p = pki();
    let full = |ca: &str| {
        format!(
            "server_mode = \"verify-full\"\nserver_ca_file = \"{}\"\n",
            p.file(ca)
        )
    };
    assert_eq!(
        server_login(&full("ca.pem"), "localhost").await.unwrap(),
        "t"
    );
    let e = server_login(&full("wrong-ca.pem"), "localhost")
        .await
        .unwrap_err();
    assert!(e.contains("TLS") && e.contains("UnknownIssuer"), "{e}");
    let e = server_login(&full("ca.pem"), "127.0.0.1")
        .await
        .unwrap_err();
    assert!(e.contains("TLS") && e.contains("not valid for name"), "{e}");
    let ca = format!(
        "server_mode = \"verify-ca\"\nserver_ca_file = \"{}\"\n",
        p.file("ca.pem")
    );
    assert_eq!(server_login(&ca, "127.0.0.1").await.unwrap(), "t");
    assert_eq!(
        server_login("server_mode = \"require\"\n", "127.0.0.1")
            .await
            .unwrap(),
        "t"
    );
    assert_eq!(
        server_login("server_mode = \"disable\"\n", "127.0.0.1")
            .await
            .unwrap(),
        "f"
    );
}

/// PostgreSQL 17's direct TLS: the ClientHello first, ALPN `postgresql`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_needs_alpn_postgresql() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = pki();
    let proxy = start(&client_side("require"), "", "127.0.0.1")
        .await
        .unwrap();
    let connect = |alpn: Vec<Vec<u8>>| {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(p.dir.join("ca.pem")).unwrap();
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots.add(c.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn;
        let port = proxy.port;
        async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .unwrap();
            let mut startup = bytes::BytesMut::new();
            postgres_protocol::message::frontend::startup_message(
                [("user", "app"), ("database", "app")],
                &mut startup,
            )
            .unwrap();
            let _ = tls.write_all(&startup).await;
            let _ = tls.flush().await;
            let mut first = [0u8; 1];
            match tls.read(&mut first).await {
                Ok(1) => Some(first[0]),
                _ => None,
            }
        }
    };
    // An authentication request ('R') comes back.
    assert_eq!(connect(vec![b"postgresql".to_vec()]).await, Some(b'R'));
    // Without ALPN: an error ('E'), and nothing else.
    assert_eq!(connect(Vec::new()).await, Some(b'E'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_old_files_when_new_ones_are_broken() {
    let p = pki();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("c.crt");
    let key = dir.path().join("c.key");
    std::fs::copy(p.dir.join("pgsluice.crt"), &cert).unwrap();
    std::fs::copy(p.dir.join("pgsluice.key"), &key).unwrap();
    let tls = format!(
        "client_mode = \"require\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let proxy = start(&tls, "", "127.0.0.1").await.unwrap();
    let verified = format!("sslmode=verify-full sslrootcert={}", p.file("ca.pem"));
    std::fs::write(&key, "not a key").unwrap();
    let e = proxy.shared.reload_tls().unwrap_err();
    assert_eq!(e.key, "tls.client_key_file");
    assert!(e.to_string().contains("c.key"), "{e}");
    // The old certificate and key still serve.
    assert_eq!(
        psql(conninfo(proxy.port, "localhost", &verified), "SELECT 1")
            .await
            .unwrap(),
        "1"
    );
    std::fs::copy(p.dir.join("pgsluice.key"), &key).unwrap();
    proxy.shared.reload_tls().unwrap();
    assert_eq!(
        psql(conninfo(proxy.port, "localhost", &verified), "SELECT 1")
            .await
            .unwrap(),
        "1"
    );
}

/// The replica monitor's tokio-postgres connections use the same TLS
/// settings: with verify-full they are TLS, and the replica serves reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_connects_with_tls() {
    let p = pki();
    let server = format!(
        "server_mode = \"verify-full\"\nserver_ca_file = \"{}\"\n",
        p.file("ca.pem")
    );
    let routing = "[routing]\nmonitor_user = \"app\"\nmonitor_interval = \"100ms\"\n";
    let proxy = start(
        &format!("{}{server}", client_side("allow")),
        routing,
        "localhost",
    )
    .await
    .unwrap();
    let cluster = cluster();
    let replica_port = cluster.replicas()[0].port;
    let sql =
        "SELECT inet_server_port() || ' ' || ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        // A read reaches the replica only once the monitor has seen it.
        let out = psql(conninfo(proxy.port, "localhost", "sslmode=disable"), sql)
            .await
            .unwrap();
        if out == format!("{replica_port} true") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no TLS read on the replica: {out}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Other tests' proxies may have monitors here too: at least one is TLS.
    let check = "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
         WHERE application_name = 'pgsluice monitor' AND ssl";
    let out = cluster.psql(1, "app", &[check]).expect("superuser psql");
    let n: u32 = out.trim().parse().unwrap_or(0);
    assert!(n >= 1, "no monitor connection over TLS: {out}");
}
