//! The `pgsluice` binary as an operator uses it: `check`, `--version`,
//! `demo` (its endpoint lines are read by scripts) and `run` with signals.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_pgsluice");

fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("pgsluice did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn version_and_check_of_the_example_configs() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pgsluice "));
    for file in [
        "config/minimal.toml",
        "config/primary-replicas.toml",
        "config/sharded.toml",
    ] {
        let out = Command::new(BIN)
            .args(["check", "--config", file])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("pool_size = 20") && text.contains("checkout_timeout = \"30s\""),
            "{text}"
        );
        assert!(
            !text.contains("change-me") && !text.contains("secret"),
            "password printed"
        );
        assert!(!text.contains("SCRAM-SHA-256$"), "SCRAM secret printed");
    }
}

#[test]
fn check_reports_the_bad_setting_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[general]\ncheckout_timeout = \"forever\"\n[databases.a]\nprimary = \"h:1\"\n[users.u]\npassword = \"p\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("general.checkout_timeout") && err.contains("forever"),
        "{err}"
    );
    // An environment override is validated the same way.
    let out = Command::new(BIN)
        .args(["check", "--config", "config/minimal.toml"])
        .env("PGSLUICE_GENERAL__POOL_MODE", "sometimes")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("general.pool_mode"));
    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.toml"));
}

#[test]
fn demo_prints_endpoints_serves_and_cleans_up() {
    let mut child = Command::new(BIN)
        .args(["demo", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    while lines.len() < 4 {
        match rx.recv_timeout(Duration::from_secs(90)) {
            Ok(l) => lines.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("demo printed only {lines:?}");
            }
        }
    }
    let url = lines[0]
        .strip_prefix("pgsluice: ")
        .expect("pgsluice line first")
        .to_owned();
    assert!(
        url.starts_with("postgres://app:app@127.0.0.1:") && url.ends_with("/app"),
        "{url}"
    );
    let primary = lines[1]
        .strip_prefix("primary: 127.0.0.1:")
        .expect("primary line");
    let replicas: Vec<&str> = lines[2..]
        .iter()
        .map(|l| l.strip_prefix("replica: 127.0.0.1:").expect("replica line"))
        .collect();
    assert_eq!(replicas.len(), 2);
    let primary_port: u16 = primary.parse().unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect via demo");
        tokio::spawn(conn);
        let row = c
            .query_one(
                "/* pgsluice: primary */ SELECT pg_is_in_recovery(), inet_server_port()",
                &[],
            )
            .await
            .unwrap();
        assert!(!row.get::<_, bool>(0));
        assert_eq!(row.get::<_, i32>(1), i32::from(primary_port));
        // The demo routes reads: once the monitor has measured the
        // replicas, a plain read lands on one of them.
        let replica_ports: Vec<i32> = replicas.iter().map(|p| p.parse().unwrap()).collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let row = c
                .query_one("SELECT pg_is_in_recovery(), inet_server_port()", &[])
                .await
                .unwrap();
            if row.get::<_, bool>(0) {
                assert!(replica_ports.contains(&row.get::<_, i32>(1)));
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no read reached a replica"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Ready for pgbench -i: the app user can create tables.
        c.batch_execute("CREATE TABLE demo_probe (v int); DROP TABLE demo_probe")
            .await
            .unwrap();
    });

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(status.success(), "demo exited with {status}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", primary_port)).is_err(),
        "demo left PostgreSQL running"
    );
}

#[test]
fn run_serves_and_exits_on_sigterm() {
    let cluster = support::cluster();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = dir.path().join("pgsluice.toml");
    std::fs::write(
        &path,
        format!(
            "[general]\nlisten_addr = \"127.0.0.1:{port}\"\n[databases.app]\nprimary = \"{}\"\n[users.app]\npassword = \"app\"\n",
            cluster.primary().addr()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("postgres://app:app@127.0.0.1:{port}/app");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        let c = loop {
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    break c;
                }
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("pgsluice run never accepted: {e}"),
            }
        };
        assert_eq!(
            c.query_one("SELECT 5", &[]).await.unwrap().get::<_, i32>(0),
            5
        );
        // SIGHUP re-reads the TLS files (none here): it must not kill the process.
        kill(Pid::from_raw(child.id() as i32), Signal::SIGHUP).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            c.query_one("SELECT 6", &[]).await.unwrap().get::<_, i32>(0),
            6
        );
    });
    // jemalloc read the settings compiled in (`malloc_conf` in src/main.rs):
    // only `background_thread:true` gives it threads of its own, which give
    // freed memory back (docs/performance.md, memory per idle client).
    let names = thread_names(child.id());
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert!(status.success(), "{status}");
    assert!(
        names.iter().any(|n| n == "jemalloc_bg_thd"),
        "no jemalloc background thread among {names:?}"
    );
}

/// The names of process `pid`'s threads (a thread that ends while they are
/// read is left out).
fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

/// `hash-password` prints a secret PostgreSQL accepts as a role's password
/// and pgsluice accepts in its config; logging in through pgsluice with it
/// also exercises SCRAM pass-through (PostgreSQL holds the same secret).
#[test]
fn hash_password_secret_works_in_postgres_and_pgsluice() {
    use std::io::Write as _;
    let password = "hash me, 'please' \u{e9}";
    let mut child = Command::new(BIN)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(secret.starts_with("SCRAM-SHA-256$4096:"), "{secret}");
    assert!(!secret.contains(password));

    let empty = Command::new(BIN)
        .arg("hash-password")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!empty.status.success());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let su = support::superuser(0).await;
        su.batch_execute(&format!(
            "DROP ROLE IF EXISTS hashed_user; CREATE ROLE hashed_user LOGIN PASSWORD '{secret}'"
        ))
        .await
        .unwrap();
        let primary = support::cluster().primary().addr();
        let direct = format!(
            "host=127.0.0.1 port={} user=hashed_user dbname=app password='{}'",
            primary.port(),
            password.replace('\'', "\\'")
        );
        let (c, conn) = tokio_postgres::connect(&direct, tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL accepts the hashed password");
        tokio::spawn(conn);
        c.simple_query("SELECT 1").await.unwrap();

        let proxy = support::TestProxy::start_with(
            "",
            &format!("[users.hashed_user]\npassword = \"{secret}\"\n"),
        )
        .await;
        let via = format!(
            "host=127.0.0.1 port={} user=hashed_user dbname=app password='{}'",
            proxy.addr.port(),
            password.replace('\'', "\\'")
        );
        let (c, conn) = tokio_postgres::connect(&via, tokio_postgres::NoTls)
            .await
            .expect("pgsluice accepts the hashed password");
        tokio::spawn(conn);
        let row = c
            .query_one("SELECT current_user::text", &[])
            .await
            .expect("pass-through login to PostgreSQL");
        assert_eq!(row.get::<_, String>(0), "hashed_user");
    });
}

/// `pgsluice shard-of` prints the remainder of the hash partition PostgreSQL picks (values
/// read from tables `PARTITION BY HASH … MODULUS 4`), and nothing else on stdout.
#[test]
fn shard_of_prints_the_partition_remainder() {
    let shard_of = |args: &[&str]| {
        Command::new(BIN)
            .arg("shard-of")
            .args(args)
            .output()
            .unwrap()
    };
    for (args, want) in [
        (&["--key", "42", "--shards", "4"][..], "2\n"),
        (&["--key", "-1", "--shards", "4"][..], "1\n"),
        (
            &["--key", "-9223372036854775808", "--shards", "4"][..],
            "3\n",
        ),
        (
            &["--key", "2147483647", "--shards", "4", "--type", "integer"][..],
            "3\n",
        ),
        (
            &["--key", "héllo", "--shards", "4", "--type", "text"][..],
            "3\n",
        ),
        (
            &[
                "--type",
                "uuid",
                "--shards",
                "4",
                "--key",
                "{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}",
            ][..],
            "0\n",
        ),
        (&["--key", "42", "--shards", "1"][..], "0\n"),
    ] {
        let out = shard_of(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{args:?}");
    }
    for (args, words) in [
        (
            &["--key", "abc", "--shards", "4"][..],
            &["bigint", "abc"][..],
        ),
        (
            &["--key", "3000000000", "--shards", "4", "--type", "integer"][..],
            &["out of range", "integer"][..],
        ),
        (
            &["--key", "nope", "--shards", "4", "--type", "uuid"][..],
            &["uuid"][..],
        ),
        (
            &["--key", "1", "--shards", "4", "--type", "float"][..],
            &["--type", "float", "bigint, integer, text, uuid"][..],
        ),
        (&["--key", "1", "--shards", "0"][..], &["--shards"][..]),
        (&["--shards", "4"][..], &["--key"][..]),
    ] {
        let out = shard_of(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
        let err = String::from_utf8_lossy(&out.stderr);
        for w in words {
            assert!(err.contains(w), "{args:?}: {err:?} lacks {w:?}");
        }
    }
}

/// Runs `pgsluice health --url URL --timeout 1s` off the runtime thread, so
/// the in-process proxy keeps answering: (exit code, stdout, stderr).
async fn health(url: &str) -> (i32, String, String) {
    let url = url.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["health", "--url", &url, "--timeout", "1s"])
            .env_remove("PGSLUICE_HEALTH_URL")
            .output()
            .expect("run pgsluice health")
    })
    .await
    .expect("join");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `pgsluice health` (the container HEALTHCHECK): 0 while the endpoint
/// answers 200; 1 with the reason on stderr when draining (503), refused,
/// silent past the timeout, or not HTTP — never Docker's reserved 2.
#[tokio::test]
async fn health_subcommand_probes_the_http_endpoint() {
    let proxy =
        support::TestProxy::start_with("", "[admin]\nhttp_listen_addr = \"127.0.0.1:0\"\n").await;
    let http = proxy.http_addr.expect("HTTP endpoint configured");
    let ready = format!("http://{http}/ready");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, out, err) = health(&ready).await;
        if code == 0 {
            assert_eq!(out, "ready\n");
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {code} {err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(health(&format!("http://{http}/health")).await.0, 0);
    let (code, _, err) = health(&format!("http://{http}/nope")).await;
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");

    // Refused: a port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("http://{}/ready", closed.local_addr().unwrap());
    drop(closed);
    let (code, _, err) = health(&closed_url).await;
    assert_eq!(code, 1);
    assert!(
        err.contains(&closed_url) && err.contains("cannot connect"),
        "{err}"
    );

    // Silent: the kernel completes the handshake, nobody ever answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let started = Instant::now();
    let (code, _, err) = health(&format!("http://{}/ready", silent.local_addr().unwrap())).await;
    assert_eq!(code, 1);
    assert!(err.contains("no answer within 1s"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Not HTTP.
    let liar = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let liar_addr = liar.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = liar.accept() {
            use std::io::{Read as _, Write as _};
            let mut request = [0u8; 1024];
            let _ = s.read(&mut request);
            let _ = s.write_all(b"+OK redis here\r\n");
        }
    });
    let (code, _, err) = health(&format!("http://{liar_addr}/ready")).await;
    assert_eq!(code, 1);
    assert!(err.contains("not an HTTP answer"), "{err}");

    let (code, _, err) = health("https://127.0.0.1:9930/ready").await;
    assert_eq!(code, 1);
    assert!(err.contains("only http://"), "{err}");

    // Draining: /ready fails with the endpoint's reason, /health still passes.
    proxy.handle.shutdown();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, _, err) = health(&ready).await;
        if code == 1 {
            assert!(err.contains("503") && err.contains("draining"), "{err}");
            break;
        }
        assert!(Instant::now() < deadline, "still ready while draining");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(health(&format!("http://{http}/health")).await.0, 0);
}
