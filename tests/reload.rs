//! Hot reload against real PostgreSQL: 100 clients run queries the whole
//! time while the config file is rewritten and reloaded — a replica added, a
//! user removed, pool sizes changed, an invalid file — and none of them sees
//! an error. Then the same through the real binary and SIGHUP.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgsluice::config::Config;
use pgsluice::proxy::Proxy;
use support::{TestProxy, cluster, eventually, http_get, metric_sum, sqlstate, superuser};
use tokio_postgres::{Client, NoTls};

const BOB: &str = "reload_bob";
const BOB_PASSWORD: &str = "bob";

/// The config file: the primary, the first `replicas` replicas, the app
/// user, optionally bob, pools of `pool` connections.
fn config_text(listen: &str, replicas: usize, bob: bool, pool: usize, extra: &str) -> String {
    let c = cluster();
    let reps: Vec<String> = c.replicas()[..replicas]
        .iter()
        .map(|r| format!("\"{}\"", r.addr()))
        .collect();
    let bob = if bob {
        format!("[users.{BOB}]\npassword = \"{BOB_PASSWORD}\"\n")
    } else {
        String::new()
    };
    format!(
        "[general]\nlisten_addr = \"{listen}\"\npool_size = {pool}\nmax_pool_size = {pool}\n{extra}\n\
         [databases.app]\nprimary = \"{}\"\nreplicas = [{}]\n\
         [users.app]\npassword = \"app\"\n{bob}\
         [routing]\nmonitor_user = \"app\"\n\
         [admin]\nhttp_listen_addr = \"127.0.0.1:0\"\n",
        c.primary().addr(),
        reps.join(", ")
    )
}

/// bob exists on the servers (and, replicated, on the replicas). Tests of
/// this binary run at once against one cluster: one creates at a time
/// (concurrent CREATE ROLE / GRANT can fail with 23505 or "tuple
/// concurrently updated").
async fn create_bob() {
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = ONE_AT_A_TIME.lock().await;
    superuser(0)
        .await
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {BOB} LOGIN PASSWORD '{BOB_PASSWORD}'; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$; \
             CREATE TABLE IF NOT EXISTS reload_t (v int); GRANT ALL ON reload_t TO PUBLIC"
        ))
        .await
        .expect("create bob");
    for i in 1..=2 {
        let replica = superuser(i).await;
        eventually("bob replicated", Duration::from_secs(10), || async {
            replica
                .query_one("SELECT count(*) FROM pg_roles WHERE rolname = $1", &[&BOB])
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == 1)
        })
        .await;
    }
}

async fn start_from_file(path: &Path) -> TestProxy {
    let config = Config::load(path).expect("valid config");
    let proxy = Proxy::bind(config).await.expect("bind");
    proxy.shared().reloads.set_config_file(path.to_owned());
    TestProxy {
        addr: proxy.local_addr().expect("addr"),
        http_addr: proxy.http_addr(),
        shared: proxy.shared().clone(),
        handle: proxy.shutdown_handle(),
        task: tokio::spawn(proxy.run()),
    }
}

async fn connect(port: u16, user: &str, password: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname("app")
        .connect_timeout(Duration::from_secs(10))
        .connect(NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// What the clients saw.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    queries: AtomicU64,
    errors: Mutex<Vec<String>>,
    /// Reads per server port (which node answered).
    ports: Mutex<HashMap<i32, u64>>,
}

impl Load {
    fn reads_on(&self, port: u16) -> u64 {
        self.ports
            .lock()
            .unwrap()
            .get(&i32::from(port))
            .copied()
            .unwrap_or(0)
    }
}

/// One client: reads (routed to replicas) and write transactions, in a
/// loop, until told to stop.
async fn client_loop(client: Client, n: usize, load: Arc<Load>) {
    let mut i = 0u64;
    while !load.stop.load(Ordering::Relaxed) {
        i += 1;
        let result = if i % 5 == 0 {
            client
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO reload_t VALUES ({n}); SELECT count(*) FROM reload_t WHERE v = {n}; COMMIT"
                ))
                .await
        } else {
            match client.query_one("SELECT inet_server_port()", &[]).await {
                Ok(row) => {
                    *load
                        .ports
                        .lock()
                        .unwrap()
                        .entry(row.get::<_, i32>(0))
                        .or_default() += 1;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        };
        match result {
            Ok(()) => {
                load.queries.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => load
                .errors
                .lock()
                .unwrap()
                .push(format!("client {n}: {e} ({:?})", sqlstate(&e))),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn port_of(c: &Client) -> i32 {
    c.query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get::<_, i32>(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_drop_no_client() {
    create_bob().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgsluice.toml");
    let write = |replicas, bob, pool, extra: &str| {
        std::fs::write(
            &path,
            config_text("127.0.0.1:0", replicas, bob, pool, extra),
        )
        .unwrap()
    };
    write(1, true, 10, "");
    let proxy = start_from_file(&path).await;
    let port = proxy.addr.port();
    let http = proxy.http_addr.expect("http endpoint");
    let replica2 = cluster().replicas()[1].addr().port();
    eventually("replica1 in rotation", Duration::from_secs(15), || async {
        metric_sum(
            &http_get(http, "/metrics").await,
            "pgsluice_replica_in_rotation",
            &[("reason", "in_rotation")],
        ) == Some(1.0)
    })
    .await;

    // 100 clients: 90 as app, 10 as bob.
    let load = Arc::new(Load::default());
    let mut tasks = Vec::new();
    for n in 0..100 {
        let client = if n < 90 {
            connect(port, "app", "app").await
        } else {
            connect(port, BOB, BOB_PASSWORD).await
        }
        .expect("client login");
        tasks.push(tokio::spawn(client_loop(client, n, load.clone())));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(load.reads_on(replica2), 0, "replica2 is not configured yet");

    // 1. Add a replica: it gets reads.
    write(2, true, 10, "");
    let report = proxy.shared.reload().expect("reload 1");
    assert!(
        report
            .changes
            .iter()
            .any(|c| c.starts_with("databases.app.replicas")),
        "{report}"
    );
    eventually(
        "reads on the new replica",
        Duration::from_secs(15),
        || async { load.reads_on(replica2) > 0 },
    )
    .await;

    // 2. Remove bob: new logins refused like an unknown user; bob's
    // clients already logged in carry on (checked with the others below).
    write(2, false, 10, "");
    let report = proxy.shared.reload().expect("reload 2");
    assert!(
        report
            .changes
            .iter()
            .any(|c| c == &format!("users.{BOB} removed")),
        "{report}"
    );
    let refused = connect(port, BOB, BOB_PASSWORD)
        .await
        .expect_err("removed user logs in");
    assert_eq!(sqlstate(&refused).as_deref(), Some("28P01"), "{refused}");
    connect(port, "app", "app")
        .await
        .expect("app still logs in");

    // 3. Smaller pools: connections beyond the new size close as they are
    // released.
    let before = metric_sum(
        &http_get(http, "/metrics").await,
        "pgsluice_server_connections",
        &[("user", "app"), ("node", "primary")],
    )
    .unwrap_or(0.0);
    write(2, false, 3, "");
    let report = proxy.shared.reload().expect("reload 3");
    assert!(
        report
            .changes
            .iter()
            .any(|c| c == "general.pool_size = 3 (was 10)"),
        "{report}"
    );
    for node in ["primary", "replica1", "replica2"] {
        eventually(
            &format!("{node} pool down to 3"),
            Duration::from_secs(15),
            || async {
                metric_sum(
                    &http_get(http, "/metrics").await,
                    "pgsluice_server_connections",
                    &[("user", "app"), ("node", node)],
                )
                .is_some_and(|n| n <= 3.0)
            },
        )
        .await;
    }
    let settings = proxy
        .shared
        .pools
        .all()
        .into_iter()
        .find(|p| p.label() == "app/app@primary")
        .expect("pool")
        .settings()
        .pool_size;
    assert_eq!(settings, 3);
    assert!(before > 3.0, "the primary pool had {before} connections");

    // 4. An invalid file: refused, naming the setting; nothing changes.
    std::fs::write(
        &path,
        config_text("127.0.0.1:0", 2, false, 3, "").replace("pool_size = 3\n", "pool_size = 0\n"),
    )
    .unwrap();
    let err = proxy.shared.reload().expect_err("invalid config applied");
    assert_eq!(err.setting(), Some("general.pool_size"), "{err}");
    assert!(err.to_string().contains("pgsluice.toml"), "{err}");
    assert_eq!(proxy.shared.config().general.pool.pool_size, 3);
    let metrics = http_get(http, "/metrics").await;
    assert_eq!(
        metric_sum(
            &metrics,
            "pgsluice_config_reloads_total",
            &[("outcome", "success")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "pgsluice_config_reloads_total",
            &[("outcome", "failure")]
        ),
        Some(1.0)
    );
    let last = metric_sum(
        &metrics,
        "pgsluice_config_last_reload_success_timestamp_seconds",
        &[],
    )
    .expect("timestamp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - last).abs() < 60.0, "{last} vs {now}");

    // A restart-only setting is reported and keeps its running value.
    write(2, false, 3, "worker_threads = 3");
    let report = proxy.shared.reload().expect("reload 4");
    assert_eq!(report.needs_restart, ["general.worker_threads"]);
    assert_eq!(proxy.shared.config().general.worker_threads, Some(1));

    tokio::time::sleep(Duration::from_secs(1)).await;
    load.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let errors = load.errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} client errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
    assert!(load.queries.load(Ordering::Relaxed) > 1000);
}

/// Pool settings change in place; connections to a changed address are
/// replaced as they become idle, never handed out again.
#[tokio::test]
async fn changed_server_address_replaces_idle_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgsluice.toml");
    std::fs::write(&path, config_text("127.0.0.1:0", 0, false, 2, "")).unwrap();
    let proxy = start_from_file(&path).await;
    let client = connect(proxy.addr.port(), "app", "app").await.unwrap();
    let primary = cluster().primary().addr().port();
    assert_eq!(port_of(&client).await, i32::from(primary));
    // Point the "primary" at a replica (a read-only server, for the test).
    let replica = cluster().replicas()[0].addr();
    let text = config_text("127.0.0.1:0", 0, false, 2, "").replace(
        &cluster().primary().addr().to_string(),
        &replica.to_string(),
    );
    std::fs::write(&path, text).unwrap();
    let report = proxy.shared.reload().expect("reload");
    assert!(
        report
            .changes
            .iter()
            .any(|c| c.contains("replaced as they become idle")),
        "{report}"
    );
    // The same client, at its next transaction, is on the new server.
    assert_eq!(port_of(&client).await, i32::from(replica.port()));
    let status = proxy
        .shared
        .pools
        .all()
        .into_iter()
        .find(|p| p.label() == "app/app@primary")
        .unwrap()
        .status();
    assert!(status.open <= 2, "{status:?}");
}

const BIN: &str = env!("CARGO_BIN_EXE_pgsluice");

/// stderr lines of a child, collected by a thread.
fn collect_lines(child: &mut std::process::Child) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().expect("piped stderr");
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

async fn wait_for_line(lines: &Mutex<Vec<String>>, needle: &[&str], timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| needle.iter().all(|n| l.contains(n)))
        {
            return l.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?}: {:#?}",
            lines.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The real binary: SIGHUP reloads the file under load; a broken file is
/// refused with an error naming the setting and the old one keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary_under_load() {
    create_bob().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgsluice.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    std::fs::write(&path, config_text(&listen, 1, true, 5, "")).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    let lines = collect_lines(&mut child);
    wait_for_line(&lines, &["pgsluice listening"], Duration::from_secs(30)).await;

    let load = Arc::new(Load::default());
    let mut tasks = Vec::new();
    for n in 0..20 {
        let client = connect(port, "app", "app").await.expect("login");
        tasks.push(tokio::spawn(client_loop(client, 1000 + n, load.clone())));
    }
    let replica2 = cluster().replicas()[1].addr().port();
    tokio::time::sleep(Duration::from_millis(500)).await;

    std::fs::write(&path, config_text(&listen, 2, false, 5, "")).unwrap();
    kill(pid, Signal::SIGHUP).unwrap();
    wait_for_line(
        &lines,
        &["configuration reloaded", "databases.app.replicas"],
        Duration::from_secs(10),
    )
    .await;
    eventually(
        "reads on the added replica",
        Duration::from_secs(15),
        || async { load.reads_on(replica2) > 0 },
    )
    .await;
    let refused = connect(port, BOB, BOB_PASSWORD)
        .await
        .expect_err("bob removed");
    assert_eq!(sqlstate(&refused).as_deref(), Some("28P01"));

    // A broken file: the error names the setting; the old config serves on.
    std::fs::write(
        &path,
        config_text(&listen, 2, false, 5, "")
            .replace(&cluster().primary().addr().to_string(), "no-port"),
    )
    .unwrap();
    kill(pid, Signal::SIGHUP).unwrap();
    let line = wait_for_line(
        &lines,
        &["configuration reload failed", "databases.app.primary"],
        Duration::from_secs(10),
    )
    .await;
    assert!(line.contains("pgsluice.toml"), "{line}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    connect(port, "app", "app").await.expect("still serving");

    load.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let errors = load.errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "client errors: {:?}",
        &errors[..errors.len().min(10)]
    );
    kill(pid, Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "pgsluice did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A database added by a reload takes logins; once removed, new logins get
/// the usual 3D000 while its connected client carries on.
#[tokio::test]
async fn databases_come_and_go() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgsluice.toml");
    let base = config_text("127.0.0.1:0", 0, false, 2, "");
    std::fs::write(&path, &base).unwrap();
    let proxy = start_from_file(&path).await;
    let login = |db: &'static str| {
        let port = proxy.addr.port();
        async move {
            let (client, conn) = tokio_postgres::Config::new()
                .host("127.0.0.1")
                .port(port)
                .user("app")
                .password("app")
                .dbname(db)
                .connect(NoTls)
                .await?;
            tokio::spawn(conn);
            Ok::<_, tokio_postgres::Error>(client)
        }
    };
    let err = login("other").await.expect_err("unknown database");
    assert_eq!(sqlstate(&err).as_deref(), Some("3D000"));

    let with_other = format!(
        "{base}[databases.other]\nprimary = \"{}\"\ndbname = \"app\"\n",
        cluster().primary().addr()
    );
    std::fs::write(&path, &with_other).unwrap();
    let report = proxy.shared.reload().expect("add");
    assert!(
        report.changes.iter().any(|c| c == "databases.other added"),
        "{report}"
    );
    let other = login("other").await.expect("added database");
    assert_eq!(
        other
            .query_one("SELECT current_database()::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        "app"
    );

    std::fs::write(&path, &base).unwrap();
    let report = proxy.shared.reload().expect("remove");
    assert!(
        report
            .changes
            .iter()
            .any(|c| c == "databases.other removed"),
        "{report}"
    );
    let err = login("other").await.expect_err("removed database");
    assert_eq!(sqlstate(&err).as_deref(), Some("3D000"), "{err}");
    // The client already on it finishes its work.
    for i in 0..3 {
        other
            .batch_execute(&format!("BEGIN; SELECT {i}; COMMIT"))
            .await
            .expect("connected client of a removed database");
    }
}

/// A timeout changed by a reload applies to clients already connected, from
/// their next request.
#[tokio::test]
async fn timeouts_apply_to_connected_clients() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgsluice.toml");
    std::fs::write(&path, config_text("127.0.0.1:0", 0, false, 2, "")).unwrap();
    let proxy = start_from_file(&path).await;
    let client = connect(proxy.addr.port(), "app", "app").await.unwrap();
    client
        .batch_execute("SELECT pg_sleep(1.5)")
        .await
        .expect("no timeout yet");
    std::fs::write(
        &path,
        config_text("127.0.0.1:0", 0, false, 2, "query_timeout = \"500ms\""),
    )
    .unwrap();
    proxy.shared.reload().expect("reload");
    let err = client
        .batch_execute("SELECT pg_sleep(5)")
        .await
        .expect_err("query_timeout applies");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    client
        .batch_execute("SELECT 1")
        .await
        .expect("still connected");
}

/// The admin console's RELOAD applies the file as SIGHUP does and reports
/// what changed in a NOTICE; an invalid file is refused with F0000 naming
/// the setting, and the running configuration stays.
#[tokio::test]
async fn the_admin_console_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgsluice.toml");
    let base = config_text("127.0.0.1:0", 0, false, 2, "admin_users = [\"app\"]");
    std::fs::write(&path, &base).unwrap();
    let proxy = start_from_file(&path).await;
    let (admin, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(proxy.addr.port())
        .user("app")
        .password("app")
        .dbname("pgsluice")
        .connect(NoTls)
        .await
        .expect("console login");
    let notices = Arc::new(Mutex::new(Vec::new()));
    let seen = notices.clone();
    tokio::spawn(async move {
        let mut conn = conn;
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = futures_util::StreamExt::next(&mut stream).await {
            if let tokio_postgres::AsyncMessage::Notice(n) = m {
                seen.lock().unwrap().push(n.message().to_owned());
            }
        }
    });
    std::fs::write(
        &path,
        config_text("127.0.0.1:0", 0, false, 3, "admin_users = [\"app\"]"),
    )
    .unwrap();
    admin.simple_query("RELOAD").await.expect("RELOAD");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !notices
        .lock()
        .unwrap()
        .iter()
        .any(|m| m.contains("pool_size"))
    {
        assert!(
            Instant::now() < deadline,
            "no NOTICE naming pool_size: {:?}",
            notices.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(proxy.shared.config().general.pool.pool_size, 3);

    std::fs::write(&path, base.replace("pool_size = 2", "pool_size = -1")).unwrap();
    let err = admin
        .simple_query("RELOAD")
        .await
        .expect_err("invalid file");
    assert_eq!(sqlstate(&err).as_deref(), Some("F0000"), "{err}");
    assert!(support::message(&err).contains("pool_size"), "{err}");
    assert_eq!(proxy.shared.config().general.pool.pool_size, 3, "kept");

    // Only log_level can be SET; this in-process proxy has no log filter.
    let err = admin
        .simple_query("SET pool_size = 5")
        .await
        .expect_err("not settable");
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{err}");
}
