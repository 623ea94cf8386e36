//! The admin console (`pgsluice` / `pgbouncer` database) against real
//! PostgreSQL: every SHOW's columns and types (compared with a live
//! pgbouncer 1.18 when one is installed), exact counters after a scripted
//! workload, who may do what, PAUSE/RESUME under load without a client
//! error, KILL / KILL_CLIENT, RECONNECT + WAIT_CLOSE, DISABLE, SHUTDOWN,
//! BAN/UNBAN and SHOW ROUTE with replicas, `/metrics` parsed by a
//! Prometheus parser, and Debian's prometheus-pgbouncer-exporter scraping
//! pgsluice.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::raw::{Msg, Raw, query, startup_packet};
use support::{TestProxy, cluster, eventually, message, sqlstate};
use tokio_postgres::{Client, SimpleQueryMessage};

const ADMIN: (&str, &str) = ("admin", "adminpw");
const STATS: (&str, &str) = ("stats", "statspw");

/// admin_users / stats_users, and a short stats period.
const GENERAL: &str =
    "admin_users = [\"admin\"]\nstats_users = \"stats\"\nstats_period = \"1s\"\npool_size = 4\n";
const USERS: &str = "\n[users.admin]\npassword = \"adminpw\"\n[users.stats]\npassword = \"statspw\"\n\
                     [admin]\nhttp_listen_addr = \"127.0.0.1:0\"\n";
/// Routing on: reads to replicas.
const ROUTING: &str =
    "\n[routing]\ndefault_route = \"auto\"\nmonitor_interval = \"25ms\"\nmonitor_user = \"app\"\n";

async fn start() -> TestProxy {
    TestProxy::start_with(GENERAL, USERS).await
}

async fn start_routed() -> TestProxy {
    let proxy = TestProxy::start_with(GENERAL, &format!("{ROUTING}{USERS}")).await;
    let cl = proxy.shared.clusters()["app"].clone();
    eventually("replicas in rotation", Duration::from_secs(20), || {
        let cl = cl.clone();
        async move {
            (1..=2).all(|i| {
                matches!(
                    cl.availability(i, Instant::now()),
                    pgsluice::cluster::Availability::InRotation { .. }
                )
            })
        }
    })
    .await;
    proxy
}

async fn console(proxy: &TestProxy, who: (&str, &str)) -> Client {
    proxy
        .connect_as(who.0, who.1, "pgsluice")
        .await
        .expect("admin console login")
}

/// Rows of a console command as column → value maps.
async fn show(c: &Client, sql: &str) -> Vec<BTreeMap<String, String>> {
    let messages = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, col)| {
                        (
                            col.name().to_owned(),
                            r.get(i).unwrap_or("<null>").to_owned(),
                        )
                    })
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The row whose `key` column is `value`.
fn row<'a>(
    rows: &'a [BTreeMap<String, String>],
    key: &str,
    value: &str,
) -> &'a BTreeMap<String, String> {
    rows.iter()
        .find(|r| r.get(key).map(String::as_str) == Some(value))
        .unwrap_or_else(|| panic!("no row with {key} = {value}: {rows:?}"))
}

fn num(r: &BTreeMap<String, String>, col: &str) -> u64 {
    r.get(col)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{col} is not a number in {r:?}"))
}

// ----- the raw wire: column types ----------------------------------------

/// A console reached with a hand-written client, to see RowDescriptions.
struct RawConsole(Raw);

/// What a query got back.
#[derive(Debug, Default)]
struct Answer {
    columns: Vec<(String, i32)>,
    rows: usize,
    tag: Option<String>,
    error: Option<Msg>,
}

impl RawConsole {
    /// Logs in as `user` (trust, cleartext, md5 or SCRAM); the FATAL
    /// error if refused.
    async fn login(addr: SocketAddr, user: &str, password: &str, db: &str) -> Result<Self, Msg> {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        use postgres_protocol::message::frontend;
        let mut raw = Raw::connect(addr).await;
        raw.send(&startup_packet(0, &[("user", user), ("database", db)]))
            .await;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let m = raw.recv(Duration::from_secs(10)).await.expect("a reply");
            if m.tag == b'E' {
                return Err(m);
            }
            if m.tag != b'R' {
                continue;
            }
            let code = i32::from_be_bytes(m.body[..4].try_into().expect("auth code"));
            let data = &m.body[4..];
            let mut out = bytes::BytesMut::new();
            match code {
                0 => break,
                3 => frontend::password_message(password.as_bytes(), &mut out).expect("encode"),
                5 => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        password.as_bytes(),
                        data.try_into().expect("md5 salt"),
                    );
                    frontend::password_message(hash.as_bytes(), &mut out).expect("encode");
                }
                10 => {
                    let s = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                        .expect("encode");
                    scram = Some(s);
                }
                11 => {
                    let s = scram.as_mut().expect("SASL started");
                    s.update(data).expect("server-first");
                    frontend::sasl_response(s.message(), &mut out).expect("encode");
                }
                12 => continue,
                other => panic!("unexpected authentication request {other}"),
            }
            raw.send(&out).await;
        }
        loop {
            let m = raw.recv(Duration::from_secs(10)).await.expect("welcome");
            match m.tag {
                b'Z' => return Ok(RawConsole(raw)),
                b'E' => return Err(m),
                _ => {}
            }
        }
    }

    async fn query(&mut self, sql: &str) -> Answer {
        self.0.send(&query(sql)).await;
        let mut a = Answer::default();
        loop {
            let m = self.0.recv(Duration::from_secs(30)).await.expect("a reply");
            match m.tag {
                b'T' => a.columns = row_description(&m.body),
                b'D' => a.rows += 1,
                b'C' => {
                    a.tag = Some(String::from_utf8_lossy(&m.body[..m.body.len() - 1]).into_owned())
                }
                b'E' => a.error = Some(m),
                b'Z' => return a,
                _ => {}
            }
        }
    }
}

/// (name, type OID) of each column.
fn row_description(body: &[u8]) -> Vec<(String, i32)> {
    let n = i16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let end = at + body[at..].iter().position(|&b| b == 0).expect("name");
        let name = String::from_utf8_lossy(&body[at..end]).into_owned();
        at = end + 1;
        let oid = i32::from_be_bytes(body[at + 6..at + 10].try_into().expect("oid"));
        at += 18;
        out.push((name, oid));
    }
    out
}

const TEXT: i32 = 25;
const INT4: i32 = 23;
const NUMERIC: i32 = 1700;

/// pgbouncer 1.18's columns for each SHOW (read from a running 1.18 by
/// `pgbouncer_agrees`).
fn pgbouncer_columns() -> Vec<(&'static str, Vec<(&'static str, i32)>)> {
    let socket = vec![
        ("type", TEXT),
        ("user", TEXT),
        ("database", TEXT),
        ("state", TEXT),
        ("addr", TEXT),
        ("port", INT4),
        ("local_addr", TEXT),
        ("local_port", INT4),
        ("connect_time", TEXT),
        ("request_time", TEXT),
        ("wait", INT4),
        ("wait_us", INT4),
        ("close_needed", INT4),
        ("ptr", TEXT),
        ("link", TEXT),
        ("remote_pid", INT4),
        ("tls", TEXT),
        ("application_name", TEXT),
    ];
    let mut stats = vec![("database", TEXT)];
    for c in [
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_xact_time",
        "total_query_time",
        "total_wait_time",
        "avg_xact_count",
        "avg_query_count",
        "avg_recv",
        "avg_sent",
        "avg_xact_time",
        "avg_query_time",
        "avg_wait_time",
    ] {
        stats.push((c, NUMERIC));
    }
    let mut totals = vec![("database", TEXT)];
    for c in [
        "xact_count",
        "query_count",
        "bytes_received",
        "bytes_sent",
        "xact_time",
        "query_time",
        "wait_time",
    ] {
        totals.push((c, NUMERIC));
    }
    let mut pools = vec![("database", TEXT), ("user", TEXT)];
    for c in [
        "cl_active",
        "cl_waiting",
        "cl_active_cancel_req",
        "cl_waiting_cancel_req",
        "sv_active",
        "sv_active_cancel",
        "sv_being_canceled",
        "sv_idle",
        "sv_used",
        "sv_tested",
        "sv_login",
        "maxwait",
        "maxwait_us",
    ] {
        pools.push((c, INT4));
    }
    pools.push(("pool_mode", TEXT));
    vec![
        ("SHOW POOLS", pools),
        ("SHOW STATS", stats),
        ("SHOW STATS_TOTALS", totals.clone()),
        ("SHOW STATS_AVERAGES", totals),
        ("SHOW TOTALS", vec![("name", TEXT), ("value", NUMERIC)]),
        ("SHOW CLIENTS", socket.clone()),
        ("SHOW SERVERS", socket),
        (
            "SHOW DATABASES",
            vec![
                ("name", TEXT),
                ("host", TEXT),
                ("port", INT4),
                ("database", TEXT),
                ("force_user", TEXT),
                ("pool_size", INT4),
                ("min_pool_size", INT4),
                ("reserve_pool", INT4),
                ("pool_mode", TEXT),
                ("max_connections", INT4),
                ("current_connections", INT4),
                ("paused", INT4),
                ("disabled", INT4),
            ],
        ),
        ("SHOW USERS", vec![("name", TEXT), ("pool_mode", TEXT)]),
        ("SHOW LISTS", vec![("list", TEXT), ("items", INT4)]),
        (
            "SHOW CONFIG",
            vec![
                ("key", TEXT),
                ("value", TEXT),
                ("default", TEXT),
                ("changeable", TEXT),
            ],
        ),
        ("SHOW VERSION", vec![("version", TEXT)]),
    ]
}

fn owned(cols: &[(&str, i32)]) -> Vec<(String, i32)> {
    cols.iter().map(|(n, t)| ((*n).to_owned(), *t)).collect()
}

#[tokio::test]
async fn every_show_has_pgbouncers_columns_and_types() {
    let proxy = start().await;
    // Something in every list: a client with a pool and a server.
    let app = proxy.connect().await;
    app.simple_query("SELECT 1").await.expect("query");
    let mut c = RawConsole::login(proxy.addr, ADMIN.0, ADMIN.1, "pgsluice")
        .await
        .expect("admin login");
    for (sql, expected) in pgbouncer_columns() {
        let got = c.query(sql).await;
        assert!(got.error.is_none(), "{sql}: {:?}", got.error);
        assert_eq!(got.tag.as_deref(), Some("SHOW"), "{sql}");
        let mut expected = owned(&expected);
        if sql == "SHOW STATS" {
            // The one extra column, last: what Debian's exporter reads.
            expected.push(("total_requests".into(), NUMERIC));
        }
        assert_eq!(got.columns, expected, "{sql}");
        assert!(got.rows > 0, "{sql} has rows");
    }
    // pgsluice's own commands.
    for (sql, first) in [
        ("SHOW REPLICAS", "database"),
        ("SHOW PREPARED", "name"),
        ("SHOW ROUTE SELECT 1", "database"),
    ] {
        let got = c.query(sql).await;
        assert!(got.error.is_none(), "{sql}: {:?}", got.error);
        assert_eq!(
            got.columns.first().map(|c| c.0.as_str()),
            Some(first),
            "{sql}"
        );
    }
    // The alias, and lower case with a semicolon.
    let mut alias = RawConsole::login(proxy.addr, ADMIN.0, ADMIN.1, "pgbouncer")
        .await
        .expect("alias login");
    let got = alias.query("show version;").await;
    assert_eq!(got.columns, owned(&[("version", TEXT)]));
    pgbouncer_agrees().await;
}

/// Runs the installed pgbouncer (1.18) and checks that its admin console
/// has exactly the columns the test above expects of pgsluice.
async fn pgbouncer_agrees() {
    let Some(binary) = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        assert!(
            std::env::var_os("PGSLUICE_REQUIRE_PGBOUNCER").is_none(),
            "pgbouncer is not installed and PGSLUICE_REQUIRE_PGBOUNCER is set"
        );
        println!("SKIPPED the live comparison with pgbouncer: pgbouncer is not installed");
        return;
    };
    let bouncer = Pgbouncer::start(binary).await;
    let mut c = RawConsole::login(bouncer.addr, "admin", "x", "pgbouncer")
        .await
        .expect("pgbouncer admin login");
    let version = c.query("SHOW VERSION").await;
    assert!(version.error.is_none());
    for (sql, expected) in pgbouncer_columns() {
        let got = c.query(sql).await;
        assert_eq!(got.columns, owned(&expected), "pgbouncer's {sql}");
    }
    // A user not in admin_users/stats_users is refused at login.
    let refused = RawConsole::login(bouncer.addr, "app", "x", "pgbouncer")
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.field(b'S').as_deref(), Some("FATAL"));
}

/// A pgbouncer in a temporary directory (as `postgres` when root).
struct Pgbouncer {
    addr: SocketAddr,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Pgbouncer {
    async fn start(binary: &str) -> Pgbouncer {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let ini = dir.path().join("pgbouncer.ini");
        let users = dir.path().join("users.txt");
        std::fs::write(&users, "\"admin\" \"x\"\n\"app\" \"x\"\n").expect("users");
        std::fs::write(
            &ini,
            format!(
                "[databases]\napp = host=127.0.0.1 port=1 dbname=app\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {}\nadmin_users = admin\n",
                users.display()
            ),
        )
        .expect("ini");
        let root = nix::unistd::geteuid().is_root();
        let mut cmd = if root {
            let pg = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .expect("a postgres user to run pgbouncer as");
            for p in [dir.path(), &ini, &users] {
                nix::unistd::chown(p, Some(pg.uid), Some(pg.gid)).expect("chown");
            }
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--", binary]);
            c
        } else {
            std::process::Command::new(binary)
        };
        let child = cmd
            .arg(&ini)
            .current_dir("/")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        eventually("pgbouncer listening", Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
        Pgbouncer {
            addr,
            child,
            _dir: dir,
        }
    }
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        // runuser forwards SIGTERM to pgbouncer.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

// ----- counters -----------------------------------------------------------

/// Bytes of a simple Query message for `sql`.
fn query_bytes(sql: &str) -> u64 {
    (1 + 4 + sql.len() + 1) as u64
}

#[tokio::test]
async fn counters_are_exact_after_a_scripted_workload() {
    let proxy = start().await;
    // 5 logins, 6 transactions, 15 queries (one Query message each).
    let scripts: [&[&str]; 5] = [
        &["SELECT 1", "SELECT 2"],
        &["BEGIN", "SELECT 1", "SELECT 2", "COMMIT"],
        &["BEGIN", "SELECT 3", "ROLLBACK"],
        &["BEGIN", "SELECT 4", "SELECT 5", "COMMIT"],
        &["BEGIN", "COMMIT"],
    ];
    let mut clients = Vec::new();
    let mut received = 0;
    for script in scripts {
        let c = proxy.connect().await;
        for sql in script {
            c.simple_query(sql).await.expect(sql);
            received += query_bytes(sql);
        }
        clients.push(c);
    }
    let admin = console(&proxy, ADMIN).await;

    let stats = show(&admin, "SHOW STATS").await;
    let app = row(&stats, "database", "app");
    assert_eq!(num(app, "total_xact_count"), 6, "{app:?}");
    assert_eq!(num(app, "total_query_count"), 15, "{app:?}");
    assert_eq!(num(app, "total_requests"), 15, "{app:?}");
    assert_eq!(num(app, "total_received"), received, "{app:?}");
    assert!(num(app, "total_sent") > 0);
    let (xact_time, query_time) = (num(app, "total_xact_time"), num(app, "total_query_time"));
    assert!(
        query_time > 0 && query_time <= xact_time,
        "queries take part of their transactions: {app:?}"
    );
    // Nothing went to the replicas (the harness routes to the primary).
    for replica in ["app@replica1", "app@replica2"] {
        if let Some(r) = stats.iter().find(|r| r["database"] == replica) {
            assert_eq!(num(r, "total_query_count"), 0, "{r:?}");
        }
    }

    let totals = show(&admin, "SHOW STATS_TOTALS").await;
    let t = row(&totals, "database", "app");
    assert_eq!(
        (
            num(t, "xact_count"),
            num(t, "query_count"),
            num(t, "bytes_received")
        ),
        (6, 15, received)
    );
    let grand = show(&admin, "SHOW TOTALS").await;
    assert_eq!(num(row(&grand, "name", "total_xact_count"), "value"), 6);
    assert_eq!(num(row(&grand, "name", "total_query_count"), "value"), 15);
    assert_eq!(
        num(row(&grand, "name", "total_client_bytes"), "value"),
        received
    );

    // The averages cover the last stats period (1 s here): the workload's
    // period shows 6 transactions; a later, quiet one shows none.
    eventually(
        "a stats period with the workload",
        Duration::from_secs(5),
        || {
            let admin = &admin;
            async move {
                let avg = show(admin, "SHOW STATS_AVERAGES").await;
                let a = row(&avg, "database", "app");
                num(a, "xact_count") > 0 && num(a, "query_time") > 0
            }
        },
    )
    .await;
    eventually("a quiet stats period", Duration::from_secs(5), || {
        let admin = &admin;
        async move {
            let avg = show(admin, "SHOW STATS_AVERAGES").await;
            num(row(&avg, "database", "app"), "query_count") == 0
        }
    })
    .await;

    // The same numbers on /metrics.
    let s = scrape(&proxy).await;
    let at_primary = [("database", "app"), ("node", "primary")];
    assert_eq!(
        value(&s, "pgsluice_transactions_total", &at_primary),
        Some(6.0)
    );
    assert_eq!(value(&s, "pgsluice_queries_total", &at_primary), Some(15.0));
    assert_eq!(
        value(
            &s,
            "pgsluice_transaction_duration_seconds_count",
            &at_primary
        ),
        Some(6.0)
    );
    assert_eq!(
        value(&s, "pgsluice_query_duration_seconds_count", &at_primary),
        Some(15.0)
    );
    // One checkout per transaction, plus the first login's (it fetches
    // the server parameters new clients are welcomed with).
    assert_eq!(
        value(
            &s,
            "pgsluice_client_wait_seconds_count",
            &[("database", "app")]
        ),
        Some(7.0)
    );
    // With the route fixed to the primary, every checkout was decided by
    // the setting.
    assert_eq!(
        value(
            &s,
            "pgsluice_routing_decisions_total",
            &[("target", "primary"), ("reason", "setting")]
        ),
        Some(6.0)
    );
    assert_eq!(
        value(
            &s,
            "pgsluice_clients",
            &[("database", "app"), ("user", "app"), ("state", "idle")]
        ),
        Some(5.0)
    );
    // Pools: 5 clients between transactions count as active, as in pgbouncer.
    let pools = show(&admin, "SHOW POOLS").await;
    let p = pools
        .iter()
        .find(|r| r["database"] == "app" && r["user"] == "app")
        .expect("app pool");
    assert_eq!((num(p, "cl_active"), num(p, "cl_waiting")), (5, 0), "{p:?}");
    assert_eq!(num(p, "sv_active"), 0, "{p:?}");
    assert!(num(p, "sv_idle") >= 1, "{p:?}");
    assert_eq!(p["pool_mode"], "transaction");
}

// ----- access -------------------------------------------------------------

#[tokio::test]
async fn only_admin_and_stats_users_get_in_and_stats_users_only_look() {
    let proxy = start().await;
    // The application user: FATAL 28000 naming the settings.
    for db in ["pgsluice", "pgbouncer"] {
        let e = RawConsole::login(proxy.addr, "app", "app", db)
            .await
            .err()
            .expect("app refused");
        assert_eq!(e.field(b'S').as_deref(), Some("FATAL"));
        assert_eq!(e.sqlstate().as_deref(), Some("28000"));
        let m = e.field(b'M').unwrap_or_default();
        assert!(m.contains("general.admin_users"), "{m}");
    }
    // A wrong password fails like anywhere else.
    let e = RawConsole::login(proxy.addr, "admin", "nope", "pgsluice")
        .await
        .err()
        .expect("bad password refused");
    assert_eq!(e.sqlstate().as_deref(), Some("28P01"));

    let stats = console(&proxy, STATS).await;
    show(&stats, "SHOW POOLS").await;
    show(&stats, "SHOW STATS").await;
    show(&stats, "SHOW ROUTE SELECT 1").await;
    for command in [
        "PAUSE",
        "RESUME app",
        "KILL app",
        "SHUTDOWN",
        "BAN replica1",
        "DISABLE app",
    ] {
        let e = stats.simple_query(command).await.expect_err(command);
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{command}: {e}");
        assert!(message(&e).contains("general.admin_users"), "{e}");
    }
    // Still usable afterwards.
    assert!(!show(&stats, "SHOW VERSION").await.is_empty());

    // Unknown commands and SQL: 42601; the extended protocol: 0A000;
    // the connection survives both.
    let admin = console(&proxy, ADMIN).await;
    for bad in ["SELECT 1", "SHOW FOO", "PAUSE a b"] {
        let e = admin.simple_query(bad).await.expect_err(bad);
        assert_eq!(sqlstate(&e).as_deref(), Some("42601"), "{bad}: {e}");
    }
    let e = admin.query("SHOW POOLS", &[]).await.expect_err("extended");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    assert!(message(&e).contains("simple query protocol"), "{e}");
    let e = admin.simple_query("PAUSE nosuch").await.expect_err("no db");
    assert_eq!(sqlstate(&e).as_deref(), Some("3D000"), "{e}");
    let e = admin
        .simple_query("RESUME app")
        .await
        .expect_err("not paused");
    assert_eq!(sqlstate(&e).as_deref(), Some("55000"), "{e}");
    assert_eq!(show(&admin, "SHOW VERSION").await.len(), 1);
    let version = &show(&admin, "SHOW VERSION").await[0]["version"];
    assert!(
        version.starts_with("PgBouncer 1.18.0 (pgsluice "),
        "{version}"
    );

    // SHOW CONFIG names the console settings; SHOW USERS lists the users.
    let config = show(&admin, "SHOW CONFIG").await;
    let r = row(&config, "key", "general.admin_users");
    assert_eq!((r["value"].as_str(), r["default"].as_str()), ("admin", ""));
    assert_eq!(row(&config, "key", "general.stats_period")["value"], "1s");
    assert_eq!(
        row(&config, "key", "general.listen_addr")["changeable"],
        "no"
    );
    let users = show(&admin, "SHOW USERS").await;
    let names: Vec<&str> = users.iter().map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ["admin", "app", "stats"]);
}

#[test]
fn console_users_must_be_configured_users() {
    for (key, general) in [
        ("general.admin_users", "admin_users = [\"ghost\"]"),
        ("general.stats_users", "stats_users = \"app, ghost\""),
    ] {
        let toml = format!(
            "[general]\n{general}\n[databases.app]\nprimary = \"127.0.0.1:5432\"\n\
             [users.app]\npassword = \"x\"\n"
        );
        let e = pgsluice::config::Config::from_toml(&toml, "t", std::iter::empty())
            .expect_err(key)
            .to_string();
        assert!(e.contains(key) && e.contains("ghost"), "{e}");
    }
    let e = pgsluice::config::Config::from_toml(
        "[databases.pgbouncer]\nprimary = \"127.0.0.1:5432\"\n[users.app]\npassword = \"x\"\n",
        "t",
        std::iter::empty(),
    )
    .expect_err("reserved name")
    .to_string();
    assert!(
        e.contains("databases.pgbouncer") && e.contains("admin console"),
        "{e}"
    );
}

// ----- control ------------------------------------------------------------

#[tokio::test]
async fn pause_and_resume_during_a_workload_cost_no_client_an_error() {
    let proxy = start().await;
    let setup = proxy.connect().await;
    setup
        .batch_execute("CREATE TABLE IF NOT EXISTS admin_pause (id serial, w int)")
        .await
        .expect("table");
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..8 {
        let c = proxy.connect().await;
        let (done, stop) = (done.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = async {
                    c.batch_execute(&format!(
                        "BEGIN; INSERT INTO admin_pause (w) VALUES ({w}); SELECT pg_sleep(0.002); COMMIT"
                    ))
                    .await?;
                    c.simple_query("SELECT count(*) FROM admin_pause").await?;
                    Ok::<_, tokio_postgres::Error>(())
                }
                .await;
                match r {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            errors
        }));
    }
    let admin = console(&proxy, ADMIN).await;
    eventually("the workload runs", Duration::from_secs(10), || async {
        done.load(Ordering::Relaxed) > 20
    })
    .await;

    // PAUSE returns once every server is back, and closes them.
    admin.simple_query("PAUSE app").await.expect("PAUSE");
    let pools = show(&admin, "SHOW POOLS").await;
    let p = row(&pools, "database", "app");
    assert_eq!((num(p, "sv_active"), num(p, "sv_idle")), (0, 0), "{p:?}");
    let databases = show(&admin, "SHOW DATABASES").await;
    assert_eq!(row(&databases, "name", "app")["paused"], "1");
    // Nothing completes while paused; the clients wait.
    let before = done.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(done.load(Ordering::Relaxed), before, "no work while paused");
    // Each client waits once it has sent its next query (on a loaded
    // machine that can come after the 500 ms).
    eventually("all 8 clients waiting", Duration::from_secs(10), || {
        let admin = &admin;
        async move {
            let pools = show(admin, "SHOW POOLS").await;
            num(row(&pools, "database", "app"), "cl_waiting") == 8
        }
    })
    .await;
    let pools = show(&admin, "SHOW POOLS").await;
    let p = row(&pools, "database", "app");
    assert_eq!(num(p, "cl_waiting"), 8, "{p:?}");
    assert!(num(p, "maxwait_us") > 0 || num(p, "maxwait") > 0, "{p:?}");
    let clients = show(&admin, "SHOW CLIENTS").await;
    assert_eq!(
        clients.iter().filter(|c| c["state"] == "waiting").count(),
        8,
        "{clients:?}"
    );
    let e = admin.simple_query("PAUSE app").await.expect_err("twice");
    assert_eq!(sqlstate(&e).as_deref(), Some("55000"));

    admin.simple_query("RESUME app").await.expect("RESUME");
    eventually("work resumes", Duration::from_secs(10), || async {
        done.load(Ordering::Relaxed) > before + 20
    })
    .await;

    // A global PAUSE / RESUME too.
    admin.simple_query("PAUSE").await.expect("PAUSE all");
    admin.simple_query("RESUME").await.expect("RESUME all");
    let resumed = done.load(Ordering::Relaxed);
    eventually("work resumes again", Duration::from_secs(10), || async {
        done.load(Ordering::Relaxed) > resumed + 20
    })
    .await;

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let errors = w.await.expect("worker");
        assert!(errors.is_empty(), "client errors: {errors:?}");
    }
}

/// pg_stat_activity rows of the app user on the primary, as (pid, state).
async fn backends(proxy: &TestProxy) -> Vec<(i32, String)> {
    let _ = proxy;
    let su = support::superuser(0).await;
    su.query(
        "SELECT pid, state FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'",
        &[],
    )
    .await
    .expect("pg_stat_activity")
    .iter()
    .map(|r| (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default()))
    .collect()
}

#[tokio::test]
async fn kill_client_and_kill_database() {
    let proxy = start().await;
    let victim = proxy
        .connect_with("application_name=victim")
        .await
        .expect("victim");
    let bystander = proxy
        .connect_with("application_name=bystander")
        .await
        .expect("bystander");
    // The victim holds a server inside a transaction.
    victim.simple_query("BEGIN").await.expect("begin");
    let rows = victim
        .simple_query("SELECT pg_backend_pid()")
        .await
        .expect("pid");
    let victim_backend: i32 = rows
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .expect("backend pid");
    let admin = console(&proxy, ADMIN).await;
    let clients = show(&admin, "SHOW CLIENTS").await;
    let v = row(&clients, "application_name", "victim");
    assert_eq!(v["state"], "active");
    assert_eq!(v["database"], "app");
    assert!(v["link"].starts_with("srv-"), "{v:?}");
    let servers = show(&admin, "SHOW SERVERS").await;
    let s = row(&servers, "link", &v["ptr"]);
    assert_eq!(num(s, "remote_pid"), victim_backend as u64);
    assert_eq!(s["state"], "active");
    assert_eq!(num(s, "port"), u64::from(cluster().nodes()[0].port));
    assert_eq!(s["application_name"], "victim");

    admin
        .simple_query(&format!("KILL_CLIENT {}", v["ptr"]))
        .await
        .expect("KILL_CLIENT");
    let e = victim
        .simple_query("SELECT 1")
        .await
        .expect_err("killed client");
    assert!(
        sqlstate(&e).as_deref() == Some("57P01") || e.is_closed(),
        "{e}"
    );
    bystander.simple_query("SELECT 1").await.expect("bystander");
    // The victim's transaction was rolled back and its server returned
    // clean (or closed): no backend is left idle in transaction.
    eventually(
        "no idle-in-transaction backend",
        Duration::from_secs(5),
        || async {
            backends(&proxy)
                .await
                .iter()
                .all(|(_, state)| state != "idle in transaction")
        },
    )
    .await;
    let e = admin
        .simple_query(&format!("KILL_CLIENT {}", v["ptr"]))
        .await
        .expect_err("gone");
    assert_eq!(sqlstate(&e).as_deref(), Some("42704"));

    // KILL app: every client of app closed, servers too; new clients wait
    // for RESUME (pgbouncer's semantics).
    admin.simple_query("KILL app").await.expect("KILL");
    let e = bystander
        .simple_query("SELECT 1")
        .await
        .expect_err("killed with its database");
    assert!(
        sqlstate(&e).as_deref() == Some("57P01") || e.is_closed(),
        "{e}"
    );
    let late = proxy.connect().await;
    let waiting = tokio::spawn(async move { late.simple_query("SELECT 1").await.map(|_| late) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a new client waits for RESUME");
    admin.simple_query("RESUME app").await.expect("RESUME");
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("served after RESUME")
        .expect("task")
        .expect("query after RESUME");
}

#[tokio::test]
async fn reconnect_wait_close_and_disable() {
    let proxy = start().await;
    let holder = proxy.connect().await;
    holder.simple_query("BEGIN").await.expect("begin");
    holder.simple_query("SELECT 1").await.expect("in tx");
    let other = proxy.connect().await;
    other.simple_query("SELECT 1").await.expect("warm");
    let admin = console(&proxy, ADMIN).await;

    admin
        .simple_query("RECONNECT app")
        .await
        .expect("RECONNECT");
    let servers = show(&admin, "SHOW SERVERS").await;
    let held = row(&servers, "state", "active");
    assert_eq!(held["close_needed"], "1", "{servers:?}");
    assert!(
        servers.iter().all(|s| s["state"] != "idle"),
        "idle servers closed at once: {servers:?}"
    );
    // WAIT_CLOSE returns only once the held server is closed, after COMMIT.
    let admin2 = console(&proxy, ADMIN).await;
    let wait = tokio::spawn(async move { admin2.simple_query("WAIT_CLOSE app").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!wait.is_finished(), "WAIT_CLOSE waits for the held server");
    holder.simple_query("COMMIT").await.expect("commit");
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("WAIT_CLOSE returns")
        .expect("task")
        .expect("WAIT_CLOSE");
    let pools = show(&admin, "SHOW POOLS").await;
    assert_eq!(num(row(&pools, "database", "app"), "sv_active"), 0);

    // DISABLE refuses new clients (55000), keeps the connected ones.
    admin.simple_query("DISABLE app").await.expect("DISABLE");
    let e = proxy.connect_with("").await.expect_err("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("55000"), "{e}");
    assert!(message(&e).contains("ENABLE app"), "{e}");
    other
        .simple_query("SELECT 1")
        .await
        .expect("connected client");
    assert_eq!(
        row(&show(&admin, "SHOW DATABASES").await, "name", "app")["disabled"],
        "1"
    );
    admin.simple_query("ENABLE app").await.expect("ENABLE");
    proxy
        .connect()
        .await
        .simple_query("SELECT 1")
        .await
        .expect("after ENABLE");
}

#[tokio::test]
async fn shutdown_modes() {
    // WAIT_FOR_CLIENTS: new clients refused; exits once the last leaves.
    let proxy = start().await;
    let stays = proxy.connect().await;
    let admin = console(&proxy, ADMIN).await;
    admin
        .simple_query("SHUTDOWN WAIT_FOR_CLIENTS")
        .await
        .expect("SHUTDOWN");
    let e = proxy.connect_with("").await.expect_err("no new clients");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e}");
    stays.simple_query("SELECT 1").await.expect("still served");
    assert!(!proxy.task.is_finished());
    drop(stays);
    let mut proxy = proxy;
    tokio::time::timeout(Duration::from_secs(10), &mut proxy.task)
        .await
        .expect("proxy exits after its clients left")
        .expect("proxy task");

    // Plain SHUTDOWN: everyone is closed at once.
    let proxy = start().await;
    let client = proxy.connect().await;
    client.simple_query("BEGIN").await.expect("begin");
    let admin = console(&proxy, ADMIN).await;
    admin.simple_query("SHUTDOWN").await.expect("SHUTDOWN");
    let mut proxy = proxy;
    tokio::time::timeout(Duration::from_secs(10), &mut proxy.task)
        .await
        .expect("proxy exits")
        .expect("proxy task");
    assert!(client.simple_query("SELECT 1").await.is_err());
}

// ----- replicas and routing -----------------------------------------------

async fn server_port(c: &Client) -> u16 {
    c.simple_query("SELECT inet_server_port()")
        .await
        .expect("read")
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .expect("a port")
}

#[tokio::test]
async fn replicas_ban_unban_and_show_route() {
    let proxy = start_routed().await;
    let admin = console(&proxy, ADMIN).await;
    let replicas = show(&admin, "SHOW REPLICAS").await;
    assert_eq!(replicas.len(), 3, "{replicas:?}");
    let primary = row(&replicas, "node", "primary");
    assert_eq!(
        (primary["role"].as_str(), primary["state"].as_str()),
        ("primary", "reachable")
    );
    let r1 = row(&replicas, "node", "replica1");
    assert_eq!(
        (r1["role"].as_str(), r1["state"].as_str()),
        ("replica", "in_rotation")
    );
    assert_eq!(num(r1, "port"), u64::from(cluster().nodes()[1].port));
    assert!(r1["lag_ms"].parse::<f64>().is_ok(), "{r1:?}");
    assert!(r1["replayed_lsn"].contains('/'), "{r1:?}");

    let route = show(&admin, "SHOW ROUTE SELECT 1").await;
    let r = row(&route, "database", "app");
    assert_eq!(
        (
            r["access"].as_str(),
            r["class"].as_str(),
            r["target"].as_str(),
            r["reason"].as_str()
        ),
        ("read", "select", "replica", "read")
    );
    let route = show(&admin, "SHOW ROUTE INSERT INTO t VALUES (1)").await;
    let r = row(&route, "database", "app");
    assert_eq!(
        (
            r["access"].as_str(),
            r["class"].as_str(),
            r["node"].as_str(),
            r["reason"].as_str()
        ),
        ("write", "data_modifying", "primary", "write")
    );
    let route = show(&admin, "SHOW ROUTE /* pgsluice: primary */ SELECT 1").await;
    assert_eq!(row(&route, "database", "app")["reason"], "hint");

    // BAN replica1: it leaves rotation (reason banned) and gets no reads.
    admin.simple_query("BAN app@replica1").await.expect("BAN");
    let r1 = row(&show(&admin, "SHOW REPLICAS").await, "node", "replica1").clone();
    assert_eq!(
        (
            r1["state"].as_str(),
            r1["reason"].as_str(),
            r1["banned"].as_str()
        ),
        ("out", "banned", "1")
    );
    let c = proxy.connect().await;
    let replica2 = cluster().nodes()[2].port;
    for _ in 0..20 {
        assert_eq!(
            server_port(&c).await,
            replica2,
            "reads avoid the banned replica"
        );
    }
    let s = scrape(&proxy).await;
    assert_eq!(
        value(&s, "pgsluice_node_banned", &[("node", "replica1")]),
        Some(1.0)
    );
    assert!(
        value(
            &s,
            "pgsluice_routing_decisions_total",
            &[("target", "replica"), ("reason", "read")]
        )
        .unwrap_or(0.0)
            >= 20.0
    );
    // Both replicas banned: reads go to the primary (no_replica).
    admin
        .simple_query("BAN replica2")
        .await
        .expect("BAN by node name");
    let primary_port = cluster().nodes()[0].port;
    assert_eq!(server_port(&c).await, primary_port);
    let route = show(&admin, "SHOW ROUTE SELECT 1").await;
    assert_eq!(row(&route, "database", "app")["reason"], "no_replica");

    admin
        .simple_query("UNBAN app@replica1")
        .await
        .expect("UNBAN");
    let addr2 = cluster().nodes()[2].addr().to_string();
    admin
        .simple_query(&format!("UNBAN {addr2}"))
        .await
        .expect("UNBAN by address");
    let replicas = show(&admin, "SHOW REPLICAS").await;
    assert!(replicas.iter().all(|r| r["banned"] == "0"), "{replicas:?}");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        seen.insert(server_port(&c).await);
    }
    assert!(
        !seen.contains(&primary_port),
        "reads back on replicas: {seen:?}"
    );

    let e = admin
        .simple_query("BAN app@primary")
        .await
        .expect_err("primary");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    let e = admin.simple_query("BAN nosuch").await.expect_err("unknown");
    assert_eq!(sqlstate(&e).as_deref(), Some("42704"), "{e}");

    // Per-node rows in SHOW POOLS / STATS / DATABASES.
    let databases = show(&admin, "SHOW DATABASES").await;
    for (i, name) in ["app", "app@replica1", "app@replica2"].iter().enumerate() {
        let d = row(&databases, "name", name);
        assert_eq!(num(d, "port"), u64::from(cluster().nodes()[i].port));
    }
    let stats = show(&admin, "SHOW STATS").await;
    let on_replicas: u64 = ["app@replica1", "app@replica2"]
        .iter()
        .map(|n| num(row(&stats, "database", n), "total_query_count"))
        .sum();
    assert!(on_replicas >= 40, "{stats:?}");
    let pools = show(&admin, "SHOW POOLS").await;
    assert!(
        pools.iter().any(|p| p["database"] == "app@replica2"),
        "{pools:?}"
    );
}

#[tokio::test]
async fn show_prepared_lists_shared_statements() {
    let proxy = start().await;
    let a = proxy.connect().await;
    let b = proxy.connect().await;
    let sql = "SELECT $1::int + 41 AS admin_console_prepared";
    let mut kept = Vec::new();
    for c in [&a, &b] {
        let st = c
            .prepare_typed(sql, &[tokio_postgres::types::Type::INT4])
            .await
            .expect("prepare");
        c.query(&st, &[&1i32]).await.expect("execute");
        kept.push(st);
    }
    let admin = console(&proxy, ADMIN).await;
    let prepared = show(&admin, "SHOW PREPARED").await;
    let p = row(&prepared, "query", sql);
    assert!(p["name"].starts_with("PGSLUICE_"), "{p:?}");
    assert!(num(p, "refs") >= 2, "both clients hold it: {p:?}");
    assert_eq!(p["params"], "1");
}

// ----- /metrics -------------------------------------------------------------

async fn scrape(proxy: &TestProxy) -> prometheus_parse::Scrape {
    let addr = proxy.http_addr.expect("HTTP endpoint");
    let body = support::http_get(addr, "/metrics").await;
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("invalid exposition: {e}\n{body}"))
}

fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .filter_map(|x| match &x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(*v),
            _ => None,
        })
        .reduce(|a, b| a + b)
}

// ----- Debian's prometheus-pgbouncer-exporter -------------------------------

#[tokio::test]
async fn prometheus_pgbouncer_exporter_scrapes_pgsluice() {
    let binary = "/usr/bin/prometheus-pgbouncer-exporter";
    if !std::path::Path::new(binary).exists() {
        assert!(
            std::env::var_os("PGSLUICE_REQUIRE_EXPORTER").is_none(),
            "{binary} is missing and PGSLUICE_REQUIRE_EXPORTER is set \
             (apt-get install -y prometheus-pgbouncer-exporter)"
        );
        println!(
            "SKIPPED prometheus_pgbouncer_exporter_scrapes_pgsluice: {binary} is not installed \
             (apt-get install -y prometheus-pgbouncer-exporter; .ci/run installs it)"
        );
        return;
    }
    let proxy = start().await;
    // Traffic, and clients that stay connected.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let c = proxy.connect().await;
        c.simple_query("SELECT 1").await.expect("query");
        clients.push(c);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let exporter = std::process::Command::new(binary)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--pgbouncer-host",
            "127.0.0.1",
            "--pgbouncer-port",
            &proxy.addr.port().to_string(),
            "--pgbouncer-user",
            STATS.0,
        ])
        .env("PGPASSWORD", STATS.1)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the exporter");
    let mut exporter = Exporter(Some(exporter));
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Some(status) = exporter.exited() {
            panic!("the exporter exited ({status}):\n{}", exporter.stop().await);
        }
        assert!(Instant::now() < deadline, "the exporter never listened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two scrapes: the values follow the load in between.
    let first = support::http_get(addr, "/metrics").await;
    for c in &clients {
        c.simple_query("SELECT 2").await.expect("more load");
    }
    let second = support::http_get(addr, "/metrics").await;
    let log = exporter.stop().await;
    assert!(!log.contains("Traceback"), "the exporter failed:\n{log}");

    let parse = |text: &str| {
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .unwrap_or_else(|e| panic!("exporter output unparsable: {e}\n{text}"))
    };
    let (a, b) = (parse(&first), parse(&second));
    let app = [("database", "app")];
    let requests =
        |s: &prometheus_parse::Scrape| value(s, "pgbouncer_requests_total", &app).unwrap_or(0.0);
    assert!(requests(&a) >= 3.0, "{first}");
    assert!(
        requests(&b) >= requests(&a) + 3.0,
        "requests follow the load"
    );
    assert!(value(&b, "pgbouncer_received_bytes_total", &app).unwrap_or(0.0) > 0.0);
    assert!(value(&b, "pgbouncer_sent_bytes_total", &app).unwrap_or(0.0) > 0.0);
    assert!(value(&b, "pgbouncer_query_microseconds_total", &app).unwrap_or(0.0) > 0.0);
    assert_eq!(
        value(
            &b,
            "pgbouncer_active_clients",
            &[("database", "app"), ("user", "app")]
        ),
        Some(3.0),
        "{second}"
    );
    // One SHOW DATABASES row per node, all with database = app.
    let pool_sizes: Vec<f64> = b
        .samples
        .iter()
        .filter(|x| x.metric == "pgbouncer_pool_size" && x.labels.get("database") == Some("app"))
        .filter_map(|x| match x.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
        .collect();
    assert!(
        !pool_sizes.is_empty() && pool_sizes.iter().all(|&v| v == 4.0),
        "{second}"
    );
    assert!(value(&b, "pgbouncer_used_clients", &[]).unwrap_or(0.0) >= 4.0);
    assert!(value(&b, "pgbouncer_pools", &[]).unwrap_or(0.0) >= 1.0);
}

/// The exporter process: stopped (SIGTERM) when the test ends, even on a
/// failed assertion.
struct Exporter(Option<std::process::Child>);

impl Exporter {
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Stops it; returns what it wrote to stderr.
    async fn stop(&mut self) -> String {
        let Some(child) = self.0.take() else {
            return String::new();
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .expect("join");
        out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
