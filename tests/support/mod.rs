//! Integration-test harness: one real PostgreSQL primary with two streaming
//! replicas per test binary (started on first use, cleaned up by `localpg`'s
//! reaper when the binary exits), and pgsluice started in-process on an
//! ephemeral port with a config built by the test.
//!
//! Reads like the protocol: a test builds a proxy, connects clients through
//! it, and checks what PostgreSQL itself says (`pg_backend_pid()`,
//! `current_setting()`, `pg_stat_activity`).

#![allow(dead_code)]

pub mod raw;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pgsluice::config::Config;
use pgsluice::localpg::{ClusterOptions, LocalCluster};
use pgsluice::proxy::{Proxy, Shared, ShutdownHandle};
use tokio_postgres::{Client, NoTls};

pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app";
pub const APP_DB: &str = "app";

/// The cluster shared by every test of this binary.
pub fn cluster() -> &'static LocalCluster {
    static CLUSTER: OnceLock<LocalCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        LocalCluster::start(ClusterOptions {
            max_connections: 300,
            test_auth_roles: true,
            ..ClusterOptions::default()
        })
        .unwrap_or_else(|e| panic!("cannot start the test PostgreSQL cluster: {e}"))
    })
}

/// A pgsluice running in this test's runtime.
pub struct TestProxy {
    pub addr: SocketAddr,
    /// The HTTP endpoint, when the config has `[admin] http_listen_addr`.
    pub http_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    pub handle: ShutdownHandle,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestProxy {
    /// Starts pgsluice in front of the test cluster. `general` is extra TOML
    /// for the `[general]` table (e.g. `"pool_size = 2"`).
    pub async fn start(general: &str) -> TestProxy {
        Self::start_with(general, "").await
    }

    /// As [`TestProxy::start`], with extra TOML appended after the tables.
    pub async fn start_with(general: &str, extra: &str) -> TestProxy {
        // RUST_LOG=debug cargo test ... shows pgsluice's own logs.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let cluster = tokio::task::spawn_blocking(cluster)
            .await
            .expect("cluster start");
        // Tests written for one node see one node: routing is opted into
        // with a [routing] table in `extra`.
        let routing = if extra.contains("[routing]") {
            ""
        } else {
            "\n[routing]\ndefault_route = \"primary\"\nmonitor_user = \"app\"\n"
        };
        let toml = format!(
            "{}{routing}{extra}",
            cluster.pgsluice_config(&format!("listen_addr = \"127.0.0.1:0\"\n{general}"))
        );
        let config = Config::from_toml(&toml, "test", std::iter::empty())
            .unwrap_or_else(|e| panic!("test config invalid: {e}\n{toml}"));
        let proxy = Proxy::bind(config).await.expect("bind proxy");
        let addr = proxy.local_addr().expect("local addr");
        let http_addr = proxy.http_addr();
        let shared = proxy.shared().clone();
        let handle = proxy.shutdown_handle();
        let task = tokio::spawn(proxy.run());
        TestProxy {
            addr,
            http_addr,
            shared,
            handle,
            task,
        }
    }

    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} dbname={APP_DB} connect_timeout=10",
            self.addr.port()
        )
    }

    /// A tokio-postgres client through pgsluice.
    pub async fn connect(&self) -> Client {
        self.connect_with("")
            .await
            .expect("connect through pgsluice")
    }

    /// Connects with extra conninfo (e.g. `"application_name=x"`).
    pub async fn connect_with(&self, extra: &str) -> Result<Client, tokio_postgres::Error> {
        let (client, conn) =
            tokio_postgres::connect(&format!("{} {extra}", self.conninfo()), NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// A tokio-postgres client through pgsluice as `user`/`password` on
    /// database `db` (user names and passwords need no quoting).
    pub async fn connect_as(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.addr.port())
            .user(user)
            .password(password)
            .dbname(db)
            .connect_timeout(Duration::from_secs(10));
        let (client, conn) = config.connect(NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// The primary's pool for the app user, if created.
    pub fn primary_pool(&self) -> Option<Arc<pgsluice::pool::Pool>> {
        self.shared
            .pools
            .all()
            .into_iter()
            .find(|p| p.label() == "app/app@primary")
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.handle.stop_now();
        self.shared.pools.close_all();
    }
}

/// A direct superuser connection to node `index` (0 = primary).
pub async fn superuser(index: usize) -> Client {
    let c = tokio::task::spawn_blocking(cluster)
        .await
        .expect("cluster start");
    let node = &c.nodes()[index];
    let conninfo = format!(
        "host=127.0.0.1 port={} user={} password={} dbname={APP_DB}",
        node.port,
        c.superuser(),
        c.superuser_password()
    );
    let (client, conn) = tokio_postgres::connect(&conninfo, NoTls)
        .await
        .expect("superuser connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// SQLSTATE of a tokio-postgres error, if the server (or pgsluice) sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_owned())
}

pub fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_owned())
}

/// Polls `check` until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GET `path` from pgsluice's HTTP endpoint; the body of a 200 answer
/// (anything else fails the test).
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    assert!(
        raw.starts_with("HTTP/1.1 200") || raw.starts_with("HTTP/1.0 200"),
        "{raw}"
    );
    raw.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// Sum of the samples of `name` in a Prometheus exposition whose labels
/// include `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("valid exposition");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .reduce(|a, b| a + b)
}

/// Raises this process's open-files limit (to 65,536 where allowed, e.g. as
/// root; else the soft limit to the hard one); returns the soft limit.
pub fn raise_fd_limit() -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if setrlimit(Resource::RLIMIT_NOFILE, 65_536, 65_536.max(hard)).is_err() && soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(s, _)| s) as usize
}
