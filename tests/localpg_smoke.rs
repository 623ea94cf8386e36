//! Starts a real primary + 2 replicas with `localpg` and exercises it:
//! roles, replication, replay pause, stop/start/kill, and cleanup.

use std::time::{Duration, Instant};

use pgsluice::localpg::{ClusterOptions, LocalCluster, NodeRole};

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A real SCRAM login as the application role, through tokio-postgres.
fn app_query(
    cluster: &LocalCluster,
    index: usize,
    sql: &str,
) -> Result<String, tokio_postgres::Error> {
    let o = cluster.options();
    let node = &cluster.nodes()[index];
    let conninfo = format!(
        "host=127.0.0.1 port={} user={} password={} dbname={} connect_timeout=5",
        node.port, o.app_user, o.app_password, o.database
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(conn);
        let rows = client.simple_query(sql).await?;
        drop(client);
        let _ = conn.await;
        let mut out = Vec::new();
        for msg in rows {
            if let tokio_postgres::SimpleQueryMessage::Row(row) = msg {
                out.push(row.get(0).unwrap_or("NULL").to_string());
            }
        }
        Ok(out.join("\n"))
    })
}

#[test]
fn local_cluster_lifecycle() {
    let started = Instant::now();
    let cluster = LocalCluster::start(ClusterOptions {
        extra_conf: vec!["log_min_messages = warning".into()],
        ..ClusterOptions::default()
    })
    .unwrap_or_else(|e| panic!("start failed: {e}"));
    let startup = started.elapsed();
    eprintln!("LocalCluster::start took {startup:?}: {cluster:?}");

    let root = cluster.root_dir().to_path_buf();
    assert!(root.starts_with("/tmp"));
    assert_eq!(cluster.nodes().len(), 3);
    assert_eq!(cluster.primary().role, NodeRole::Primary);
    assert!(
        cluster
            .replicas()
            .iter()
            .all(|n| n.role == NodeRole::Replica)
    );
    assert_eq!(cluster.superuser(), "postgres");
    assert!(cluster.superuser_password().len() >= 16);

    // Roles: the primary is read-write, the replicas are in recovery.
    for node in cluster.nodes() {
        let in_recovery = cluster
            .psql(node.index, "postgres", &["SELECT pg_is_in_recovery()"])
            .expect("psql");
        let expected = if node.role == NodeRole::Primary {
            "f"
        } else {
            "t"
        };
        assert_eq!(in_recovery, expected, "{}", node.name());
        let port = cluster
            .psql(node.index, "postgres", &["SELECT inet_server_port()"])
            .expect("psql");
        assert_eq!(port, node.port.to_string());
    }
    assert_eq!(
        cluster
            .psql(
                0,
                "postgres",
                &["SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"]
            )
            .expect("psql"),
        "2"
    );

    // The application role logs in with SCRAM, owns its database, writes on
    // the primary; the row reaches a replica.
    app_query(
        &cluster,
        0,
        "CREATE TABLE smoke (id int primary key, note text); INSERT INTO smoke VALUES (1, 'hello')",
    )
    .expect("write as app");
    assert_eq!(
        cluster
            .psql(
                0,
                "postgres",
                &["SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'app'"]
            )
            .expect("psql"),
        "t"
    );
    wait_for("the row on replica1", Duration::from_secs(10), || {
        app_query(&cluster, 1, "SELECT note FROM smoke WHERE id = 1").is_ok_and(|v| v == "hello")
    });
    let err = app_query(&cluster, 2, "INSERT INTO smoke VALUES (2, 'no')")
        .expect_err("replica must be read-only");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("read-only"), "{err:?}");

    // Replay pause on a replica: new rows stop appearing until resumed.
    cluster
        .psql(2, "postgres", &["SELECT pg_wal_replay_pause()"])
        .expect("pause");
    wait_for("replay paused", Duration::from_secs(10), || {
        cluster
            .psql(2, "postgres", &["SELECT pg_get_wal_replay_pause_state()"])
            .is_ok_and(|s| s == "paused")
    });
    app_query(&cluster, 0, "INSERT INTO smoke VALUES (3, 'lagging')").expect("insert");
    wait_for("row 3 on replica1", Duration::from_secs(10), || {
        app_query(&cluster, 1, "SELECT count(*) FROM smoke WHERE id = 3").is_ok_and(|v| v == "1")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        app_query(&cluster, 2, "SELECT count(*) FROM smoke WHERE id = 3").expect("read"),
        "0"
    );
    cluster
        .psql(2, "postgres", &["SELECT pg_wal_replay_resume()"])
        .expect("resume");
    wait_for("row 3 on replica2", Duration::from_secs(10), || {
        app_query(&cluster, 2, "SELECT count(*) FROM smoke WHERE id = 3").is_ok_and(|v| v == "1")
    });

    // stop_node / start_node on a replica, same port.
    let t = Instant::now();
    cluster.stop_node(1).expect("stop replica1");
    eprintln!("stop_node(1) took {:?}", t.elapsed());
    assert!(!cluster.is_running(1).expect("is_running"));
    assert!(
        app_query(&cluster, 1, "SELECT 1").is_err(),
        "stopped node still answers"
    );
    cluster
        .stop_node(1)
        .expect("stopping a stopped node is a no-op");
    let t = Instant::now();
    cluster.start_node(1).expect("start replica1");
    eprintln!("start_node(1) took {:?}", t.elapsed());
    assert_eq!(
        app_query(&cluster, 1, "SELECT pg_is_in_recovery()::text").expect("read"),
        "true"
    );

    // A restart waits (retrying) while another process holds the node's port.
    cluster.stop_node(2).expect("stop replica2");
    let squatter = std::net::TcpListener::bind(cluster.nodes()[2].addr())
        .expect("bind the stopped node's port");
    // Timed from before the releaser starts: a late `t` must not shorten
    // the wait it sees.
    let t = Instant::now();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        drop(squatter);
    });
    cluster
        .start_node(2)
        .expect("start replica2 once its port is free");
    assert!(
        t.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        t.elapsed()
    );
    releaser.join().expect("releaser thread");
    assert_eq!(
        cluster
            .psql(2, "postgres", &["SELECT inet_server_port()"])
            .expect("psql"),
        cluster.nodes()[2].port.to_string()
    );

    // kill_node / start_node on the primary: crash recovery keeps the data.
    let t = Instant::now();
    cluster.kill_node(0).expect("kill primary");
    eprintln!("kill_node(0) took {:?}", t.elapsed());
    assert!(
        app_query(&cluster, 0, "SELECT 1").is_err(),
        "killed node still answers"
    );
    let t = Instant::now();
    cluster.start_node(0).expect("restart primary");
    eprintln!("start_node(0) after kill took {:?}", t.elapsed());
    assert_eq!(
        app_query(&cluster, 0, "SELECT count(*) FROM smoke").expect("read"),
        "2"
    );
    app_query(&cluster, 0, "INSERT INTO smoke VALUES (4, 'after crash')")
        .expect("write after crash");
    wait_for(
        "replicas to catch up after the crash",
        Duration::from_secs(20),
        || {
            (1..=2).all(|i| {
                app_query(&cluster, i, "SELECT count(*) FROM smoke WHERE id = 4")
                    .is_ok_and(|v| v == "1")
            })
        },
    );

    // Errors are typed.
    assert!(cluster.stop_node(7).is_err());

    let t = Instant::now();
    cluster.shutdown().expect("shutdown");
    eprintln!("shutdown took {:?}", t.elapsed());
    assert!(!root.exists(), "{} still exists", root.display());
}

/// Set in the child process of `reaper_cleans_up_after_sigkill`.
const CHILD_ENV: &str = "PGSLUICE_LOCALPG_SMOKE_CHILD";

/// Not a test on its own: the body of the child process that
/// `reaper_cleans_up_after_sigkill` starts and then SIGKILLs.
#[test]
fn crash_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let cluster = LocalCluster::start(ClusterOptions {
        replicas: 1,
        ..ClusterOptions::default()
    })
    .expect("start");
    // A restarted node has a new pid: the reaper must read it at exit time.
    cluster.stop_node(1).expect("stop");
    cluster.start_node(1).expect("start");
    println!("ROOT {}", cluster.root_dir().display());
    for node in cluster.nodes() {
        let pid_file =
            std::fs::read_to_string(node.data_dir.join("postmaster.pid")).expect("pid file");
        println!("PID {}", pid_file.lines().next().unwrap_or_default());
    }
    println!("READY");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[test]
fn reaper_cleans_up_after_sigkill() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};

    /// Kills the child if the test fails before it does.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    let exe = std::env::current_exe().expect("current_exe");
    // The child also gets copies of its stdout as descriptors 7 and 12, not
    // close-on-exec, like a test runner's pipes: nothing localpg starts may
    // keep them.
    let child = Command::new("/bin/bash")
        .arg("-c")
        .arg("exec 7>&1 12>&1; exec \"$0\" \"$@\"")
        .arg(exe)
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let mut child = KillOnDrop(child);
    let mut stdout = BufReader::new(child.0.stdout.take().expect("stdout"));
    let (mut root, mut pids) = (None, Vec::new());
    let mut line = String::new();
    loop {
        line.clear();
        let n = stdout.read_line(&mut line).expect("read child stdout");
        assert!(n > 0, "child exited before READY");
        // libtest may print "test crash_child ... " on the same line.
        if let Some((_, r)) = line.trim().split_once("ROOT ") {
            root = Some(std::path::PathBuf::from(r));
        } else if let Some((_, p)) = line.trim().split_once("PID ") {
            pids.push(p.parse::<u32>().expect("pid"));
        } else if line.contains("READY") {
            break;
        }
    }
    let root = root.expect("root dir");
    assert_eq!(pids.len(), 2);
    assert!(root.exists());

    child.0.kill().expect("SIGKILL child");
    child.0.wait().expect("wait child");
    // Nothing else may hold the child's stdout: EOF must come promptly.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = stdout.read_to_end(&mut rest);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("a process left behind still holds the test's stdout");

    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            let state = s.rsplit(')').next().unwrap_or("").split_whitespace().next();
            !matches!(state, Some("Z" | "X"))
        })
    };
    wait_for(
        "the reaper to stop the postmasters",
        Duration::from_secs(15),
        || pids.iter().all(|&p| !alive(p)),
    );
    wait_for(
        "the reaper to remove the directory",
        Duration::from_secs(15),
        || !root.exists(),
    );
}
