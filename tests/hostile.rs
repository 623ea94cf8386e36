//! Hostile input: a raw TCP client sends malformed or abusive input of
//! many kinds, before and after login, while an ordinary client runs
//! queries alongside. Each case must get a clear error (a real SQLSTATE) or
//! a clean close, and the ordinary client must see no error and no stall.
//! Then 10,000 half-open connections and a one-byte-per-second login are
//! thrown at a separate pgsluice process.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::raw::{Raw, message, query, startup_packet};
use support::{APP_DB, APP_USER, TestProxy, raise_fd_limit};
use tokio::io::AsyncWriteExt;

/// The two tests run one after the other: each holds pgsluice to login
/// deadlines (client_login_timeout), and the other's load (thousands of
/// half-open connections, or the garbage cases) made those deadlines miss
/// on a loaded 2-core machine, failing a test for a reason it does not test.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What a case must end with.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// An ErrorResponse with this SQLSTATE, then the connection closes.
    Fatal(&'static str),
    /// An ErrorResponse with this SQLSTATE, and the session goes on
    /// (ReadyForQuery follows; a query afterwards works).
    Error(&'static str),
    /// Closed without an answer (the peer cannot be spoken to).
    Closed,
    /// Nothing wrong: the session answers a query afterwards.
    Fine,
}

struct Case {
    name: &'static str,
    /// Log in first (as app) before sending `bytes`.
    logged_in: bool,
    bytes: Vec<u8>,
    expect: Expect,
}

fn i32be(v: i32) -> [u8; 4] {
    v.to_be_bytes()
}

fn startup_raw(code: i32, body: &[u8]) -> Vec<u8> {
    let mut p = i32be((8 + body.len()) as i32).to_vec();
    p.extend_from_slice(&i32be(code));
    p.extend_from_slice(body);
    p
}

fn user_db() -> Vec<u8> {
    format!("user\0{APP_USER}\0database\0{APP_DB}\0\0").into_bytes()
}

fn cases() -> Vec<Case> {
    let v3 = 3 << 16;
    let pre = |name, bytes, expect| Case {
        name,
        logged_in: false,
        bytes,
        expect,
    };
    let post = |name, bytes, expect| Case {
        name,
        logged_in: true,
        bytes,
        expect,
    };
    let mut huge_params = Vec::new();
    for i in 0..900 {
        huge_params.extend_from_slice(format!("p{i}\0v\0").as_bytes());
    }
    huge_params.extend_from_slice(&user_db());
    let parse_one = message(b'P', b"s1\0SELECT $1::int\0\0\0");
    let mut bind_too_many = message(b'B', &{
        let mut b = b"\0s1\0".to_vec();
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&3i16.to_be_bytes());
        for _ in 0..3 {
            b.extend_from_slice(&1i32.to_be_bytes());
            b.push(b'1');
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        b
    });
    let mut too_many = parse_one.clone();
    too_many.append(&mut bind_too_many);
    too_many.extend(message(b'S', b""));
    let mut pipeline_errors = Vec::new();
    for _ in 0..100 {
        pipeline_errors.extend(message(b'B', b"\0nope\0\0\0\0\0\0\0"));
        pipeline_errors.extend(message(b'E', b"\0\0\0\0\0"));
        pipeline_errors.extend(message(b'S', b""));
    }
    let mut syncs = Vec::new();
    for _ in 0..10_000 {
        syncs.extend(message(b'S', b""));
    }
    vec![
        // ---- before login: the startup packet
        pre(
            "negative startup length",
            i32be(-1).to_vec(),
            Expect::Fatal("08P01"),
        ),
        pre(
            "zero startup length",
            i32be(0).to_vec(),
            Expect::Fatal("08P01"),
        ),
        pre(
            "startup length 3",
            [0, 0, 0, 3, 0, 0, 0, 0].to_vec(),
            Expect::Fatal("08P01"),
        ),
        pre(
            "startup length 2^31-1",
            i32be(i32::MAX).to_vec(),
            Expect::Fatal("08P01"),
        ),
        pre(
            "startup over 10000 bytes",
            {
                let mut p = i32be(10_001).to_vec();
                p.extend(vec![b'a'; 64]);
                p
            },
            Expect::Fatal("08P01"),
        ),
        pre(
            "protocol 2.0",
            startup_raw(2 << 16, &user_db()),
            Expect::Fatal("0A000"),
        ),
        pre(
            "protocol 4.0",
            startup_raw(4 << 16, &user_db()),
            Expect::Fatal("0A000"),
        ),
        pre(
            "unknown request code",
            startup_raw(7777 << 16 | 1, b""),
            Expect::Fatal("0A000"),
        ),
        pre(
            "cancel request code with 8 bytes",
            startup_raw(1234 << 16 | 5678, b""),
            Expect::Fatal("08P01"),
        ),
        pre(
            "missing user",
            startup_raw(v3, b"database\0app\0\0"),
            Expect::Fatal("28000"),
        ),
        pre(
            "empty user",
            startup_raw(v3, b"user\0\0\0"),
            Expect::Fatal("28000"),
        ),
        pre(
            "parameter without value",
            startup_raw(v3, b"user\0app\0lonely\0"),
            Expect::Fatal("08P01"),
        ),
        pre(
            "parameter list not terminated",
            startup_raw(v3, b"user\0app"),
            Expect::Fatal("08P01"),
        ),
        pre(
            "non-UTF-8 user name",
            startup_raw(v3, b"user\0\xff\xfe\0\0"),
            Expect::Fatal("08P01"),
        ),
        pre(
            "non-UTF-8 parameter value",
            startup_raw(v3, b"user\0app\0application_name\0\xc3\x28\0\0"),
            Expect::Fatal("08P01"),
        ),
        pre(
            "900 startup parameters",
            startup_raw(v3, &huge_params),
            Expect::Fatal("08P01"),
        ),
        pre(
            "cancel request too short",
            startup_raw(80877102, b"\0\0"),
            Expect::Fatal("08P01"),
        ),
        pre(
            "cancel request with a random key",
            startup_raw(80877102, &[1, 2, 3, 4, 5, 6, 7, 8]),
            Expect::Closed,
        ),
        pre(
            "HTTP request instead of PostgreSQL",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            Expect::Fatal("08P01"),
        ),
        pre(
            "TLS ClientHello without SSLRequest",
            {
                let mut p = vec![
                    0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
                ];
                p.extend(vec![0u8; 64]);
                p
            },
            // Direct TLS (PostgreSQL 17) with TLS off: nothing can be said
            // in plaintext to a client speaking TLS; closed, as PostgreSQL.
            Expect::Closed,
        ),
        pre(
            "query before authentication",
            {
                let mut p = startup_packet(0, &[("user", APP_USER), ("database", APP_DB)]);
                p.extend(query("SELECT 1"));
                p
            },
            Expect::Fatal("08P01"),
        ),
        pre(
            "terminate during authentication",
            {
                let mut p = startup_packet(0, &[("user", APP_USER), ("database", APP_DB)]);
                p.extend(message(b'X', b""));
                p
            },
            Expect::Fatal("08P01"),
        ),
        pre(
            "password message with length 2",
            {
                let mut p = startup_packet(0, &[("user", APP_USER), ("database", APP_DB)]);
                p.extend([b'p', 0, 0, 0, 2]);
                p
            },
            Expect::Fatal("08P01"),
        ),
        pre(
            "password message of 1 GB",
            {
                let mut p = startup_packet(0, &[("user", APP_USER), ("database", APP_DB)]);
                p.push(b'p');
                p.extend(i32be(1 << 30));
                p
            },
            Expect::Fatal("08P01"),
        ),
        pre(
            "SASL response that is not SCRAM",
            {
                let mut p = startup_packet(0, &[("user", APP_USER), ("database", APP_DB)]);
                p.extend(message(b'p', b"SCRAM-SHA-256\0\0\0\0\x05hello"));
                p
            },
            Expect::Fatal("08P01"),
        ),
        pre(
            "SASL with an unknown mechanism",
            {
                let mut p = startup_packet(0, &[("user", APP_USER), ("database", APP_DB)]);
                p.extend(message(b'p', b"MD4-HAHA\0\xff\xff\xff\xff"));
                p
            },
            Expect::Fatal("08P01"),
        ),
        // ---- after login: messages
        post(
            "unknown message type",
            message(b'z', b"whatever"),
            Expect::Fatal("08P01"),
        ),
        post(
            "negative message length",
            [b'Q', 0xff, 0xff, 0xff, 0xfb].to_vec(),
            Expect::Fatal("08P01"),
        ),
        post(
            "message length 2",
            [b'Q', 0, 0, 0, 2].to_vec(),
            Expect::Fatal("08P01"),
        ),
        post(
            "message over max_packet_size",
            {
                let mut p = vec![b'Q'];
                p.extend(i32be(1 << 30));
                p
            },
            Expect::Fatal("08P01"),
        ),
        post(
            "startup packet after login",
            startup_packet(0, &[("user", APP_USER)]),
            Expect::Fatal("08P01"),
        ),
        post(
            "Bind with more parameters than the Parse",
            too_many,
            Expect::Error("08P01"),
        ),
        post(
            "Bind of an unknown statement",
            {
                let mut p = message(b'B', b"\0nope\0\0\0\0\0\0\0");
                p.extend(message(b'S', b""));
                p
            },
            Expect::Error("26000"),
        ),
        post(
            "Execute of an unknown portal",
            {
                let mut p = message(b'E', b"nope\0\0\0\0\0");
                p.extend(message(b'S', b""));
                p
            },
            Expect::Error("34000"),
        ),
        post(
            "Describe with a bad kind",
            {
                let mut p = message(b'D', b"Xname\0");
                p.extend(message(b'S', b""));
                p
            },
            Expect::Error("08P01"),
        ),
        // PostgreSQL reports a malformed message body as an ERROR and goes on.
        post(
            "Parse without terminators",
            {
                let mut p = message(b'P', b"s\0SELECT 1");
                p.extend(message(b'S', b""));
                p
            },
            Expect::Error("08P01"),
        ),
        post(
            "Query without its terminator",
            message(b'Q', b"SELECT 1"),
            Expect::Error("08P01"),
        ),
        post(
            "a Bind that lies about its parameter count",
            {
                let mut p = message(b'P', b"s9\0SELECT $1::int\0\0\0");
                p.extend(message(b'B', b"\0s9\0\0\0\x7f\xff\0\0\0\x01"));
                p.extend(message(b'S', b""));
                p
            },
            Expect::Error("08P01"),
        ),
        post(
            "CopyData outside COPY is ignored",
            message(b'd', b"stray"),
            Expect::Fine,
        ),
        post(
            "CopyDone outside COPY is ignored",
            message(b'c', b""),
            Expect::Fine,
        ),
        post(
            "100 failing pipelined batches",
            pipeline_errors,
            Expect::Error("26000"),
        ),
        post("10,000 Syncs in one write", syncs, Expect::Fine),
        post("a syntax error", query("SELEKT 1"), Expect::Error("42601")),
        post(
            "SQL with a NUL inside the string",
            message(b'Q', b"SELECT 1\0; DROP TABLE x\0"),
            Expect::Error("08P01"),
        ),
    ]
}

/// Reads until the case's outcome is clear.
async fn outcome(raw: &mut Raw) -> (Option<String>, bool, bool) {
    // (first error SQLSTATE, saw ReadyForQuery after it, closed)
    let mut code = None;
    let mut ready = false;
    loop {
        match raw.recv(Duration::from_secs(5)).await {
            None => return (code, ready, true),
            Some(m) if m.tag == b'E' => {
                if code.is_none() {
                    code = m.sqlstate();
                }
            }
            Some(m) if m.tag == b'Z' => {
                ready = true;
                // Pipelined input may owe more answers: keep reading briefly.
                if let Some(m) = raw.recv(Duration::from_millis(300)).await {
                    if m.tag == b'E' && code.is_none() {
                        code = m.sqlstate();
                    }
                    continue;
                }
                return (code, ready, false);
            }
            Some(m) if m.tag == b'R' && code.is_none() => {
                // An authentication request: the case stops here; say so.
                continue;
            }
            Some(_) => continue,
        }
    }
}

async fn run_case(addr: SocketAddr, case: &Case) -> Result<(), String> {
    let mut raw = if case.logged_in {
        Raw::login(addr).await
    } else {
        Raw::connect(addr).await
    };
    if raw.stream.write_all(&case.bytes).await.is_err() {
        return match case.expect {
            Expect::Closed | Expect::Fatal(_) => Ok(()),
            _ => Err("write failed".into()),
        };
    }
    let (code, _ready, closed) = match case.expect {
        Expect::Fine => {
            raw.send(&query("SELECT 1")).await;
            outcome(&mut raw).await
        }
        _ => outcome(&mut raw).await,
    };
    let ok = match case.expect {
        Expect::Fatal(c) => code.as_deref() == Some(c) && closed,
        Expect::Error(c) => {
            if code.as_deref() != Some(c) || closed {
                false
            } else {
                // The session goes on.
                raw.send(&query("SELECT 1")).await;
                let (c2, r2, closed2) = outcome(&mut raw).await;
                c2.is_none() && r2 && !closed2
            }
        }
        Expect::Closed => code.is_none() && closed,
        Expect::Fine => code.is_none() && !closed,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("got error {code:?}, closed {closed}"))
    }
}

/// An ordinary client querying in a loop; returns (queries, errors, worst latency).
fn bystander(
    conninfo: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64, Duration)> {
    tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .expect("bystander connects");
        tokio::spawn(conn);
        let (mut n, mut errors, mut worst) = (0, 0, Duration::ZERO);
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            match c.query_one("SELECT 1 + 1", &[]).await {
                Ok(_) => n += 1,
                Err(e) => {
                    eprintln!("bystander error: {e}");
                    errors += 1;
                }
            }
            worst = worst.max(t.elapsed());
        }
        (n, errors, worst)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_garbage_gets_an_error_or_a_close_and_harms_no_one() {
    let _serial = SERIAL.lock().await;
    let proxy = TestProxy::start("client_login_timeout = \"3s\"\nmax_packet_size = 1048576").await;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = bystander(proxy.conninfo(), stop.clone());

    let cases = cases();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let mut failures = Vec::new();
    // All at once, as an attacker would.
    let mut tasks = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let addr = proxy.addr;
        let case = Case {
            name: case.name,
            logged_in: case.logged_in,
            bytes: case.bytes.clone(),
            expect: case.expect,
        };
        tasks.push((i, tokio::spawn(async move { run_case(addr, &case).await })));
    }
    for (i, t) in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!(
                "{} (expected {:?}): {e}",
                cases[i].name, cases[i].expect
            )),
            Err(e) => failures.push(format!("{}: panicked: {e}", cases[i].name)),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (n, errors, worst) = watcher.await.expect("bystander");
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert_eq!(errors, 0, "the ordinary client saw errors");
    assert!(n > 0);
    assert!(
        worst < Duration::from_secs(2),
        "the ordinary client stalled for {worst:?}"
    );
}

/// pgsluice as its own process (its own open-files limit, as deployed),
/// killed when dropped.
struct Child {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn spawn_pgsluice(general: &str) -> Child {
    let cluster = tokio::task::spawn_blocking(support::cluster)
        .await
        .expect("cluster start");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pgsluice.toml");
    let toml = format!(
        "{}\n[routing]\ndefault_route = \"primary\"\nmonitor_user = \"app\"\n",
        cluster.pgsluice_config(&format!("listen_addr = \"127.0.0.1:{port}\"\n{general}"))
    );
    std::fs::write(&path, toml).expect("write config");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .args(["run", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn pgsluice");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "pgsluice never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Child {
        child,
        addr,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_half_open_logins_are_cut_off_without_starving_others() {
    let _serial = SERIAL.lock().await;
    // Raised before pgsluice starts: it inherits the limit.
    let limit = raise_fd_limit();
    let sluice = spawn_pgsluice("client_login_timeout = \"3s\"\nmax_client_conn = 30000").await;
    let conninfo = format!(
        "host=127.0.0.1 port={} user={APP_USER} password={} dbname={APP_DB} connect_timeout=10",
        sluice.addr.port(),
        support::APP_PASSWORD
    );
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = bystander(conninfo.clone(), stop.clone());

    // A byte per second: cut off at client_login_timeout.
    let addr = sluice.addr;
    let slow = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let pkt = startup_packet(0, &[("user", APP_USER), ("database", APP_DB)]);
        let started = Instant::now();
        for b in pkt {
            if s.write_all(&[b]).await.is_err() {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Duration::MAX
    });

    // 10,000 half-open connections (fewer only if the open-files limit
    // cannot be raised that far).
    let want = 10_000usize.min(limit.saturating_sub(500));
    let opened = Arc::new(AtomicU64::new(0));
    let mut held = Vec::with_capacity(want);
    for _ in 0..want {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => {
                held.push(s);
                opened.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("stopped opening at {}: {e}", held.len());
                break;
            }
        }
    }
    eprintln!("{} half-open connections (fd limit {limit})", held.len());
    // An honest client still logs in and queries while they are held.
    let t = Instant::now();
    let (late, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .expect("a new client logs in");
    tokio::spawn(conn);
    late.simple_query("SELECT 1")
        .await
        .expect("a new client is served");
    let login = t.elapsed();
    // client_login_timeout closes them all (an error, then EOF): wait for
    // each up to one deadline well past it (a fixed 4 s, then 200 ms per
    // connection, was tight on a loaded machine).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut closed = 0;
    for mut s in held {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout_at(deadline, tokio::io::AsyncReadExt::read(&mut s, &mut buf))
                .await
            {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed += 1;
                    break;
                }
                Ok(Ok(_)) => continue,
                Err(_) => break,
            }
        }
    }
    let cut_after = slow.await.expect("slow client");
    stop.store(true, Ordering::Relaxed);
    let (n, errors, worst) = watcher.await.expect("bystander");
    assert_eq!(errors, 0, "the ordinary client saw errors");
    assert!(n > 0);
    assert!(
        worst < Duration::from_secs(3),
        "the ordinary client stalled for {worst:?}"
    );
    assert!(
        login < Duration::from_secs(3),
        "a new client waited {login:?}"
    );
    assert!(want >= 1000, "could only test {want} half-open connections");
    if want < 10_000 {
        eprintln!("note: the open-files limit allowed only {want} half-open connections");
    }
    assert_eq!(
        closed,
        opened.load(Ordering::Relaxed),
        "half-open connections left open"
    );
    assert!(
        cut_after >= Duration::from_secs(2) && cut_after < Duration::from_secs(10),
        "a byte-per-second login was cut after {cut_after:?}"
    );
}
