//! Zero-downtime restart with the real binary: a second instance starts on
//! the same port (`so_reuseport`), the first is drained by SIGTERM
//! (`shutdown_mode = "clients"`) while clients connect and run transactions
//! in a loop — no connect and no transaction fails. And cancel requests
//! reach the instance their client is on, wherever they arrive.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::cluster;
use support::raw::{self, Raw};
use tokio_postgres::NoTls;

const BIN: &str = env!("CARGO_BIN_EXE_pgsluice");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A pgsluice process and its stderr lines.
struct Instance {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Instance {
    fn start(general: &str) -> Instance {
        let c = cluster();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgsluice.toml");
        std::fs::write(
            &path,
            format!(
                "[general]\n{general}\nshutdown_timeout = \"20s\"\nauth_type = \"password\"\n\
                 [databases.app]\nprimary = \"{}\"\n[users.app]\npassword = \"app\"\n",
                c.primary().addr()
            ),
        )
        .unwrap();
        let mut child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&path)
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Instance {
            child,
            lines,
            _dir: dir,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    async fn wait_line(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
        {
            assert!(
                Instant::now() < deadline,
                "no line with {needle:?}: {:#?}",
                self.lines.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "pgsluice did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct Tally {
    stop: AtomicBool,
    transactions: AtomicU64,
    failures: Mutex<Vec<String>>,
}

/// Connect, run a transaction, disconnect; again and again.
async fn reconnecting_client(port: u16, n: usize, tally: Arc<Tally>) {
    let url =
        format!("host=127.0.0.1 port={port} user=app password=app dbname=app connect_timeout=10");
    while !tally.stop.load(Ordering::Relaxed) {
        let (client, conn) = match tokio_postgres::connect(&url, NoTls).await {
            Ok(c) => c,
            Err(e) => {
                tally.failures.lock().unwrap().push(format!("connect: {e}"));
                continue;
            }
        };
        let conn = tokio::spawn(conn);
        for _ in 0..3 {
            match client
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO restart_t VALUES ({n}); SELECT count(*) FROM restart_t; COMMIT"
                ))
                .await
            {
                Ok(()) => {
                    tally.transactions.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tally.failures.lock().unwrap().push(format!("transaction: {e}")),
            }
        }
        drop(client);
        let _ = conn.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_instance_drains_beside_the_new_one_without_failures() {
    support::superuser(0)
        .await
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS restart_t (v int); GRANT ALL ON restart_t TO PUBLIC",
        )
        .await
        .unwrap();
    let port = free_port();
    let general = |id: u8| {
        format!(
            "listen_addr = \"127.0.0.1:{port}\"\nso_reuseport = true\n\
             shutdown_mode = \"clients\"\ninstance_id = {id}\npool_size = 5"
        )
    };
    let mut old = Instance::start(&general(0));
    old.wait_line("pgsluice listening", Duration::from_secs(30))
        .await;

    let tally = Arc::new(Tally::default());
    let clients: Vec<_> = (0..16)
        .map(|n| tokio::spawn(reconnecting_client(port, n, tally.clone())))
        .collect();
    // Progress is measured in transactions, not seconds: the box is shared.
    let more = |n: u64| {
        let tally = tally.clone();
        async move {
            let target = tally.transactions.load(Ordering::Relaxed) + n;
            support::eventually("transactions", Duration::from_secs(60), || async {
                tally.transactions.load(Ordering::Relaxed) >= target
            })
            .await;
        }
    };
    more(100).await;

    let new = Instance::start(&general(1));
    new.wait_line("pgsluice listening", Duration::from_secs(30))
        .await;
    more(100).await;
    let before_drain = tally.transactions.load(Ordering::Relaxed);

    kill(old.pid(), Signal::SIGTERM).unwrap();
    let status = old.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    old.wait_line("listener handed over", Duration::from_secs(1))
        .await;
    let at_exit = tally.transactions.load(Ordering::Relaxed);
    // The new instance alone serves them now.
    more(200).await;

    tally.stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let after = tally.transactions.load(Ordering::Relaxed);
    let failures = tally.failures.lock().unwrap().clone();
    eprintln!(
        "transactions: {before_drain} before the drain, {at_exit} when the old instance exited, {after} in all"
    );
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    drop(new);
}

/// A client on instance A; its CancelRequest sent to instance B is
/// forwarded to A (general.peers), and the running query is cancelled.
#[tokio::test]
async fn cancel_sent_to_another_instance_is_forwarded() {
    let (port_a, port_b) = (free_port(), free_port());
    let peers = format!("peers = [\"127.0.0.1:{port_a}\", \"127.0.0.1:{port_b}\"]");
    let a = Instance::start(&format!(
        "listen_addr = \"127.0.0.1:{port_a}\"\ninstance_id = 0\n{peers}"
    ));
    let b = Instance::start(&format!(
        "listen_addr = \"127.0.0.1:{port_b}\"\ninstance_id = 1\n{peers}\nlog_level = \"pgsluice=debug,info\""
    ));
    a.wait_line("pgsluice listening", Duration::from_secs(30))
        .await;
    b.wait_line("pgsluice listening", Duration::from_secs(30))
        .await;

    let mut client = Raw::login(format!("127.0.0.1:{port_a}").parse().unwrap()).await;
    let (pid, key) = client.backend_key.expect("BackendKeyData");
    assert_eq!(
        (pid >> 24) & 0x7f,
        0,
        "instance 0 in the process id {pid:#x}"
    );
    client.send(&raw::query("SELECT pg_sleep(30)")).await;
    // A cancel that arrives before the query runs finds nothing to stop.
    let su = support::superuser(0).await;
    support::eventually("pg_sleep running", Duration::from_secs(10), || async {
        su.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 1
    })
    .await;
    let started = Instant::now();
    let mut cancel = Raw::connect(format!("127.0.0.1:{port_b}").parse().unwrap()).await;
    let mut packet = 16i32.to_be_bytes().to_vec();
    packet.extend_from_slice(&80_877_102i32.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&key.to_be_bytes());
    cancel.send(&packet).await;
    let err = client
        .recv_until(b'E', Duration::from_secs(10))
        .await
        .expect("the query was cancelled");
    assert_eq!(err.sqlstate().as_deref(), Some("57014"));
    assert!(started.elapsed() < Duration::from_secs(5));
    b.wait_line("cancel request forwarded", Duration::from_secs(5))
        .await;
    // Still usable.
    client.send(&raw::query("SELECT 1")).await;
    client
        .recv_until(b'Z', Duration::from_secs(5))
        .await
        .expect("answered");
}

/// A cancel sent while the client waits for a server (the pool is busy)
/// ends the wait with 57014, as PostgreSQL answers a cancelled query; the
/// client leaves the pool's queue and keeps its connection.
#[tokio::test]
async fn cancel_ends_a_wait_for_a_server() {
    let proxy = support::TestProxy::start("pool_size = 1\nmax_pool_size = 1").await;
    let holder = proxy.connect().await;
    holder.batch_execute("BEGIN").await.unwrap();
    let waiter = Arc::new(proxy.connect().await);
    let w = waiter.clone();
    let query = tokio::spawn(async move { w.query_one("SELECT 1", &[]).await });
    let pool = proxy.primary_pool().expect("pool");
    support::eventually("the client waits", Duration::from_secs(5), || async {
        pool.status().waiting == 1
    })
    .await;
    waiter.cancel_token().cancel_query(NoTls).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), query)
        .await
        .expect("the wait ended")
        .unwrap()
        .expect_err("cancelled");
    assert_eq!(support::sqlstate(&err).as_deref(), Some("57014"), "{err}");
    assert_eq!(
        support::message(&err),
        "canceling statement due to user request"
    );
    assert_eq!(pool.status().waiting, 0);
    holder.batch_execute("COMMIT").await.unwrap();
    let row = waiter.query_one("SELECT 2", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
}
