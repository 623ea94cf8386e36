//! Load generator for `bench/scale.sh`: many client connections, active traffic with a
//! client-count schedule, connection churn, and machine-readable results.
//!
//! Every line on stdout is one JSON object with an `"event"` field, so the script can build
//! its tables without parsing prose:
//!
//! - `idle`: opens `--clients` logged-in connections spread over loopback source addresses
//!   (127.0.0.2, 127.0.0.3, … — one source address has only ~28k ephemeral ports), prints
//!   `ramp` ticks and a `ready` line, holds them until SIGTERM/SIGINT (or `--hold-secs`),
//!   then runs `SELECT 1` on every one of them and prints `done`. A connection the server
//!   closed, or a failed login or query, is counted as an error, never dropped silently.
//!   With `--query-first` each client first runs one prepared `SELECT $1::int` (a named
//!   statement, prepared, run and closed by tokio-postgres; `--query-first simple`: one
//!   simple-Query `SELECT 1`, which pgbouncer's transaction mode serves too), so the idle
//!   clients are ones that have worked (docs/performance.md, "A client that has worked").
//! - `active`: runs clients doing `SELECT abalance FROM pgbench_accounts WHERE aid = $1`
//!   (and, with `--write-pct`, TPC-B-like write transactions), the number of clients following
//!   `--schedule`; with `--reconnect-after N` every client reconnects after ~N transactions.
//!   Prints a `tick` line per second (tps, latency percentiles, errors) and a `summary`.
//!
//! Errors are counted by SQLSTATE when the server sent one, else by kind (`io`, `closed`,
//! `timeout`, `rows`, …), with the first few messages kept as samples.
//!
//! Build it in release mode: tokio-postgres runs SCRAM's PBKDF2 (4096 iterations) for every
//! login, which is ~50x slower in a debug build.
//!
//! ```text
//! cargo build --release --example loadgen
//! loadgen idle   --port 6432 --clients 10000 --sources 2
//! loadgen active --port 6432 --clients 1000 --duration 30
//! loadgen active --port 6432 --schedule 0:100,10:5000,20:100 --duration 35
//! loadgen active --port 6432 --clients 50 --write-pct 20 --reconnect-after 50 --duration 600
//! ```

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

#[derive(Parser)]
#[command(about = "Load generator for bench/scale.sh (JSON lines on stdout)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open N logged-in idle connections and hold them until SIGTERM/SIGINT.
    Idle(IdleArgs),
    /// Run active clients (reads, optional writes, optional churn) following a schedule.
    Active(ActiveArgs),
}

#[derive(Args, Clone)]
struct ConnArgs {
    #[arg(long, default_value = "127.0.0.1")]
    host: Ipv4Addr,
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "app")]
    user: String,
    #[arg(long, default_value = "app")]
    password: String,
    #[arg(long, default_value = "app")]
    dbname: String,
    /// Startup `options` (e.g. `-c pgsluice.route=primary`).
    #[arg(long)]
    options: Option<String>,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+K); 0 = let the kernel pick (127.0.0.1).
    #[arg(long, default_value_t = 0)]
    sources: u8,
    /// Give up on one connection attempt (TCP connect + login) after this many seconds.
    #[arg(long, default_value_t = 60)]
    connect_timeout: u64,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[arg(long)]
    clients: usize,
    /// Logins in flight at once (each costs the client a PBKDF2).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Hold for this many seconds instead of until a signal.
    #[arg(long)]
    hold_secs: Option<u64>,
    /// Each client runs one query right after its login, then idles: the
    /// memory of a client that has worked, not of one that only logged in.
    /// `prepared` (the default): `SELECT $1::int` as a named statement
    /// (extended protocol); `simple`: `SELECT 1` as a simple Query, which
    /// pgbouncer's transaction mode also serves.
    #[arg(long, num_args = 0..=1, default_missing_value = "prepared")]
    query_first: Option<QueryFirst>,
}

#[derive(Clone, Copy, ValueEnum)]
enum QueryFirst {
    Prepared,
    Simple,
}

#[derive(Clone, Copy, ValueEnum)]
enum Protocol {
    /// Query text with the key inlined, like `pgbench -M simple`.
    Simple,
    /// Statement prepared once per connection, then Bind/Execute, like `pgbench -M prepared`.
    Prepared,
}

#[derive(Args)]
struct ActiveArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Constant number of clients (ignored with --schedule).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Client count over time: `SECOND:CLIENTS,...`, e.g. `0:100,10:5000,20:100`.
    #[arg(long)]
    schedule: Option<String>,
    /// Seconds to run.
    #[arg(long)]
    duration: u64,
    #[arg(long, value_enum, default_value_t = Protocol::Simple)]
    protocol: Protocol,
    /// pgbench scale of the tables (aid in 1..=100000*scale).
    #[arg(long, default_value_t = 10)]
    scale: u64,
    /// Percentage of transactions that are TPC-B-like writes (BEGIN; UPDATE; SELECT; INSERT; END).
    #[arg(long, default_value_t = 0)]
    write_pct: u32,
    /// Each client disconnects and logs in again after about this many transactions (0 = never).
    #[arg(long, default_value_t = 0)]
    reconnect_after: u64,
}

// ---------------------------------------------------------------- measurements

/// Log-linear histogram of microseconds (64 sub-buckets per power of two, ~1.6% resolution),
/// lock-free so every client task records without contention.
struct Hist {
    buckets: Vec<AtomicU64>,
    max: AtomicU64,
}

const SUB: u64 = 64;
const HIST_LEN: usize = 64 * 40;

impl Hist {
    fn new() -> Self {
        Self {
            buckets: (0..HIST_LEN).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }
    fn index(us: u64) -> usize {
        if us < SUB {
            return us as usize;
        }
        let exp = 63 - u64::from(us.leading_zeros()); // >= 6
        let mant = (us >> (exp - 6)) & (SUB - 1);
        (((exp - 5) * SUB + mant) as usize).min(HIST_LEN - 1)
    }
    fn lower_bound(idx: usize) -> u64 {
        let idx = idx as u64;
        if idx < SUB {
            return idx;
        }
        let exp = idx / SUB + 5;
        let mant = idx % SUB;
        (SUB + mant) << (exp - 6)
    }
    fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets[Self::index(us)].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(us, Ordering::Relaxed);
    }
    /// Copies the counts out, resetting them when `reset`.
    fn snapshot(&self, reset: bool) -> Snapshot {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| {
                if reset {
                    b.swap(0, Ordering::Relaxed)
                } else {
                    b.load(Ordering::Relaxed)
                }
            })
            .collect();
        let max = if reset {
            self.max.swap(0, Ordering::Relaxed)
        } else {
            self.max.load(Ordering::Relaxed)
        };
        Snapshot { counts, max }
    }
}

struct Snapshot {
    counts: Vec<u64>,
    max: u64,
}

impl Snapshot {
    fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
    /// Nearest-rank percentile in milliseconds (bucket lower bound), None when empty.
    fn pct_ms(&self, p: f64) -> Option<f64> {
        let n = self.total();
        if n == 0 {
            return None;
        }
        let rank = ((p / 100.0) * n as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(ms(Hist::lower_bound(i)));
            }
        }
        Some(ms(self.max))
    }
    fn max_ms(&self) -> Option<f64> {
        (self.total() > 0).then(|| ms(self.max))
    }
}

fn ms(us: u64) -> f64 {
    (us as f64 / 10.0).round() / 100.0
}

/// Errors by SQLSTATE or kind, with a few sample messages.
#[derive(Default)]
struct Errors {
    by_code: Mutex<BTreeMap<String, u64>>,
    samples: Mutex<Vec<String>>,
    total: AtomicU64,
}

impl Errors {
    fn add(&self, phase: &str, code: &str, message: &str) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.by_code.lock() {
            *m.entry(format!("{phase}:{code}")).or_default() += 1;
        }
        if let Ok(mut s) = self.samples.lock()
            && s.len() < 8
        {
            s.push(format!("{phase}:{code}: {message}"));
        }
    }
    fn pg(&self, phase: &str, e: &tokio_postgres::Error) {
        let code = match e.code() {
            Some(c) => c.code().to_owned(),
            None if e.is_closed() => "closed".to_owned(),
            None => "io".to_owned(),
        };
        let msg = match e.as_db_error() {
            Some(db) => db.message().to_owned(),
            None => e.to_string(),
        };
        self.add(phase, &code, &msg);
    }
    fn json(&self) -> Value {
        let by = self.by_code.lock().map(|m| m.clone()).unwrap_or_default();
        let samples = self.samples.lock().map(|s| s.clone()).unwrap_or_default();
        json!({ "errors": self.total.load(Ordering::Relaxed), "errors_by_code": by, "error_samples": samples })
    }
}

fn emit(v: &Value) {
    println!("{v}");
}

// ---------------------------------------------------------------- connecting

struct Connector {
    args: ConnArgs,
    config: tokio_postgres::Config,
    next_source: AtomicUsize,
}

impl Connector {
    fn new(args: &ConnArgs) -> Arc<Self> {
        let mut config = tokio_postgres::Config::new();
        config
            .user(&args.user)
            .password(&args.password)
            .dbname(&args.dbname)
            .application_name("loadgen");
        if let Some(o) = &args.options {
            config.options(o);
        }
        Arc::new(Self {
            args: args.clone(),
            config,
            next_source: AtomicUsize::new(0),
        })
    }

    /// TCP connect from the next source address, then log in. The connection's driver task
    /// is spawned; `closed` is set when it ends.
    async fn connect(&self, errors: &Errors) -> Option<Held> {
        let dest = SocketAddr::V4(SocketAddrV4::new(self.args.host, self.args.port));
        let attempt = async {
            let socket = TcpSocket::new_v4().map_err(|e| ("io", e.to_string()))?;
            // Ports of earlier runs' connections in TIME_WAIT may be reused.
            socket
                .set_reuseaddr(true)
                .map_err(|e| ("io", e.to_string()))?;
            if self.args.sources > 0 {
                let k = self.next_source.fetch_add(1, Ordering::Relaxed)
                    % usize::from(self.args.sources);
                let ip = Ipv4Addr::new(127, 0, 0, 2 + k as u8);
                socket
                    .bind(SocketAddr::V4(SocketAddrV4::new(ip, 0)))
                    .map_err(|e| ("bind", format!("{ip}: {e}")))?;
            }
            let stream = socket
                .connect(dest)
                .await
                .map_err(|e| ("tcp", e.to_string()))?;
            stream
                .set_nodelay(true)
                .map_err(|e| ("io", e.to_string()))?;
            self.config
                .connect_raw(stream, NoTls)
                .await
                .map_err(|e| match e.code() {
                    Some(c) => (
                        "sqlstate",
                        format!(
                            "{}|{}",
                            c.code(),
                            e.as_db_error()
                                .map_or(e.to_string(), |d| d.message().to_owned())
                        ),
                    ),
                    None => ("login", e.to_string()),
                })
        };
        match tokio::time::timeout(Duration::from_secs(self.args.connect_timeout), attempt).await {
            Err(_) => {
                errors.add(
                    "connect",
                    "timeout",
                    "connect + login did not finish in time",
                );
                None
            }
            Ok(Err((kind, msg))) => {
                match (kind, msg.split_once('|')) {
                    ("sqlstate", Some((code, m))) => errors.add("connect", code, m),
                    _ => errors.add("connect", kind, &msg),
                }
                None
            }
            Ok(Ok((client, connection))) => {
                let closed = Arc::new(AtomicBool::new(false));
                let flag = closed.clone();
                tokio::spawn(async move {
                    let _ = connection.await;
                    flag.store(true, Ordering::Relaxed);
                });
                Some((client, closed))
            }
        }
    }
}

/// A logged-in client and the flag its connection task sets when the server closes it.
type Held = (Client, Arc<AtomicBool>);

fn rss_kb() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

// ---------------------------------------------------------------- idle

async fn idle(a: IdleArgs) {
    let connector = Connector::new(&a.conn);
    let errors = Arc::new(Errors::default());
    let connect_hist = Arc::new(Hist::new());
    let opened = Arc::new(AtomicUsize::new(0));
    let sem = Arc::new(Semaphore::new(a.concurrency.max(1)));
    let held: Arc<Mutex<Vec<Held>>> = Arc::new(Mutex::new(Vec::with_capacity(a.clients)));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(a.clients);
    let query_first = a.query_first;
    for _ in 0..a.clients {
        let (connector, errors, hist, opened, sem, held) = (
            connector.clone(),
            errors.clone(),
            connect_hist.clone(),
            opened.clone(),
            sem.clone(),
            held.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let Ok(_permit) = sem.acquire().await else {
                return;
            };
            let t = Instant::now();
            if let Some(c) = connector.connect(&errors).await {
                hist.record(t.elapsed());
                let worked = match query_first {
                    None => Ok(()),
                    Some(QueryFirst::Prepared) => {
                        c.0.query_one("SELECT $1::int", &[&1i32]).await.map(drop)
                    }
                    Some(QueryFirst::Simple) => c.0.simple_query("SELECT 1").await.map(drop),
                };
                if let Err(e) = worked {
                    errors.add("query_first", "error", &e.to_string());
                }
                opened.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut h) = held.lock() {
                    h.push(c);
                }
            }
        }));
    }
    let ramp = async {
        for t in tasks {
            let _ = t.await;
        }
    };
    let ticker = async {
        let mut iv = tokio::time::interval(Duration::from_secs(1));
        iv.tick().await;
        loop {
            iv.tick().await;
            emit(
                &json!({"event": "ramp", "t": start.elapsed().as_secs(), "opened": opened.load(Ordering::Relaxed),
                         "errors": errors.total.load(Ordering::Relaxed)}),
            );
        }
    };
    tokio::select! { () = ramp => {}, () = ticker => {} }
    let ramp_s = start.elapsed().as_secs_f64();
    let snap = connect_hist.snapshot(false);
    let mut ready = json!({
        "event": "ready", "clients": a.clients, "opened": opened.load(Ordering::Relaxed),
        "ramp_s": (ramp_s * 100.0).round() / 100.0,
        "logins_per_s": (opened.load(Ordering::Relaxed) as f64 / ramp_s).round(),
        "login_p50_ms": snap.pct_ms(50.0), "login_p99_ms": snap.pct_ms(99.0), "login_max_ms": snap.max_ms(),
        "loadgen_rss_kb": rss_kb(),
    });
    merge(&mut ready, errors.json());
    emit(&ready);

    match a.hold_secs {
        Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
        None => wait_for_signal().await,
    }

    // Every held connection must still be open and answer a query.
    let conns = held
        .lock()
        .map(|mut h| std::mem::take(&mut *h))
        .unwrap_or_default();
    let closed_early = conns
        .iter()
        .filter(|(_, c)| c.load(Ordering::Relaxed))
        .count();
    if closed_early > 0 {
        errors.add(
            "hold",
            "closed",
            &format!("{closed_early} connections were closed by the server while idle"),
        );
    }
    let checked = Arc::new(AtomicUsize::new(0));
    let sem = Arc::new(Semaphore::new(256));
    let mut checks = Vec::with_capacity(conns.len());
    for (client, closed) in conns {
        if closed.load(Ordering::Relaxed) {
            continue;
        }
        let (errors, checked, sem) = (errors.clone(), checked.clone(), sem.clone());
        checks.push(tokio::spawn(async move {
            let Ok(_permit) = sem.acquire().await else {
                return;
            };
            match client.simple_query("SELECT 1").await {
                Ok(_) => {
                    checked.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => errors.pg("verify", &e),
            }
        }));
    }
    for c in checks {
        let _ = c.await;
    }
    let mut done = json!({"event": "done", "opened": opened.load(Ordering::Relaxed),
        "closed_while_idle": closed_early, "verified": checked.load(Ordering::Relaxed),
        "held_s": ((start.elapsed().as_secs_f64() - ramp_s) * 10.0).round() / 10.0});
    merge(&mut done, errors.json());
    emit(&done);
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, from) {
        a.extend(b);
    }
}

// ---------------------------------------------------------------- active

struct Shared {
    connector: Arc<Connector>,
    errors: Errors,
    /// Clients with an index below this keep running; the others finish and disconnect.
    target: AtomicUsize,
    connected: AtomicUsize,
    stop: AtomicBool,
    tx: AtomicU64,
    tx_tick: AtomicU64,
    connects: AtomicU64,
    connects_tick: AtomicU64,
    lat_tick: Hist,
    lat_all: Hist,
    login_tick: Hist,
    login_all: Hist,
    protocol: Protocol,
    accounts: u64,
    write_pct: u32,
    reconnect_after: u64,
}

/// xorshift64*: a per-client generator, no shared state and no locking.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

enum Outcome {
    Ok,
    /// The connection is unusable: log in again.
    Reconnect,
}

fn parse_schedule(s: &str) -> Result<Vec<(u64, usize)>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let (t, n) = part
            .split_once(':')
            .ok_or_else(|| format!("--schedule: `{part}` is not SECOND:CLIENTS"))?;
        let t: u64 = t
            .trim()
            .parse()
            .map_err(|_| format!("--schedule: bad second `{t}`"))?;
        let n: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("--schedule: bad client count `{n}`"))?;
        out.push((t, n));
    }
    out.sort_by_key(|p| p.0);
    if out.first().is_none_or(|p| p.0 != 0) {
        return Err("--schedule must start at second 0".into());
    }
    Ok(out)
}

async fn active(a: ActiveArgs) -> Result<(), String> {
    let schedule = match &a.schedule {
        Some(s) => parse_schedule(s)?,
        None => vec![(0, a.clients)],
    };
    let shared = Arc::new(Shared {
        connector: Connector::new(&a.conn),
        errors: Errors::default(),
        target: AtomicUsize::new(0),
        connected: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        tx: AtomicU64::new(0),
        tx_tick: AtomicU64::new(0),
        connects: AtomicU64::new(0),
        connects_tick: AtomicU64::new(0),
        lat_tick: Hist::new(),
        lat_all: Hist::new(),
        login_tick: Hist::new(),
        login_all: Hist::new(),
        protocol: a.protocol,
        accounts: 100_000 * a.scale.max(1),
        write_pct: a.write_pct.min(100),
        reconnect_after: a.reconnect_after,
    });
    let mut handles: Vec<Option<tokio::task::JoinHandle<()>>> = Vec::new();
    let start = Instant::now();
    let mut iv = tokio::time::interval(Duration::from_secs(1));
    let mut timeline = Vec::new();
    for second in 0..=a.duration {
        iv.tick().await; // the first tick is immediate
        if second > 0 {
            let tx = shared.tx_tick.swap(0, Ordering::Relaxed);
            let lat = shared.lat_tick.snapshot(true);
            let login = shared.login_tick.snapshot(true);
            let line = json!({
                "event": "tick", "t": second, "target": shared.target.load(Ordering::Relaxed),
                "connected": shared.connected.load(Ordering::Relaxed), "tps": tx,
                "p50_ms": lat.pct_ms(50.0), "p99_ms": lat.pct_ms(99.0), "max_ms": lat.max_ms(),
                "logins": shared.connects_tick.swap(0, Ordering::Relaxed), "login_max_ms": login.max_ms(),
                "errors": shared.errors.total.load(Ordering::Relaxed),
            });
            emit(&line);
            timeline.push(tx);
        }
        if second == a.duration {
            break;
        }
        let want = schedule
            .iter()
            .rev()
            .find(|(t, _)| *t <= second)
            .map_or(0, |p| p.1);
        shared.target.store(want, Ordering::Relaxed);
        if handles.len() < want {
            handles.resize_with(want, || None);
        }
        for (i, h) in handles.iter_mut().enumerate().take(want) {
            if h.as_ref().is_none_or(|h| h.is_finished()) {
                *h = Some(tokio::spawn(client_loop(shared.clone(), i)));
            }
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    for h in handles.into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(30), h).await;
    }
    let lat = shared.lat_all.snapshot(false);
    let login = shared.login_all.snapshot(false);
    let tx = shared.tx.load(Ordering::Relaxed);
    let mut summary = json!({
        "event": "summary", "duration_s": (elapsed * 10.0).round() / 10.0, "tx": tx,
        "tps": (tx as f64 / elapsed).round(),
        "p50_ms": lat.pct_ms(50.0), "p95_ms": lat.pct_ms(95.0), "p99_ms": lat.pct_ms(99.0),
        "max_ms": lat.max_ms(),
        "logins": shared.connects.load(Ordering::Relaxed),
        "login_p50_ms": login.pct_ms(50.0), "login_p99_ms": login.pct_ms(99.0), "login_max_ms": login.max_ms(),
        "tps_timeline": timeline,
    });
    merge(&mut summary, shared.errors.json());
    emit(&summary);
    Ok(())
}

async fn client_loop(s: Arc<Shared>, id: usize) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((id as u64 + 1) * 0x1000_0000_01B3));
    'session: while !s.stop.load(Ordering::Relaxed) && id < s.target.load(Ordering::Relaxed) {
        let t = Instant::now();
        let Some((client, _closed)) = s.connector.connect(&s.errors).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        s.login_tick.record(t.elapsed());
        s.login_all.record(t.elapsed());
        s.connects.fetch_add(1, Ordering::Relaxed);
        s.connects_tick.fetch_add(1, Ordering::Relaxed);
        s.connected.fetch_add(1, Ordering::Relaxed);
        let stmt = match s.protocol {
            Protocol::Simple => None,
            Protocol::Prepared => {
                match client
                    .prepare("SELECT abalance FROM pgbench_accounts WHERE aid = $1")
                    .await
                {
                    Ok(st) => Some(st),
                    Err(e) => {
                        s.errors.pg("prepare", &e);
                        s.connected.fetch_sub(1, Ordering::Relaxed);
                        continue 'session;
                    }
                }
            }
        };
        // Spread reconnects so that clients do not log in again in lockstep.
        let budget = match s.reconnect_after {
            0 => u64::MAX,
            n => n / 2 + rng.below(n + 1),
        };
        let mut done = 0;
        while !s.stop.load(Ordering::Relaxed)
            && id < s.target.load(Ordering::Relaxed)
            && done < budget
        {
            let outcome = if rng.below(100) < u64::from(s.write_pct) {
                write_tx(&s, &client, &mut rng).await
            } else {
                read_tx(&s, &client, stmt.as_ref(), &mut rng).await
            };
            done += 1;
            if let Outcome::Reconnect = outcome {
                break;
            }
        }
        s.connected.fetch_sub(1, Ordering::Relaxed);
        drop(client);
    }
}

async fn read_tx(
    s: &Shared,
    client: &Client,
    stmt: Option<&tokio_postgres::Statement>,
    rng: &mut Rng,
) -> Outcome {
    let aid = 1 + rng.below(s.accounts);
    let t = Instant::now();
    let rows = match stmt {
        Some(st) => {
            let aid = i32::try_from(aid).unwrap_or(1);
            client.query(st, &[&aid]).await.map(|r| r.len())
        }
        None => client
            .simple_query(&format!(
                "SELECT abalance FROM pgbench_accounts WHERE aid = {aid}"
            ))
            .await
            .map(|msgs| {
                msgs.iter()
                    .filter(|m| matches!(m, SimpleQueryMessage::Row(_)))
                    .count()
            }),
    };
    finish(s, client, t, "read", rows.map(|n| n == 1))
}

async fn write_tx(s: &Shared, client: &Client, rng: &mut Rng) -> Outcome {
    let aid = 1 + rng.below(s.accounts);
    let tid = 1 + rng.below(10 * s.accounts / 100_000);
    let bid = 1 + rng.below(s.accounts / 100_000);
    let delta = rng.below(10_001) as i64 - 5_000;
    let t = Instant::now();
    let statements = [
        "BEGIN".to_owned(),
        format!("UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid}"),
        format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid}"),
        format!(
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({tid}, {bid}, {aid}, {delta}, CURRENT_TIMESTAMP)"
        ),
        "END".to_owned(),
    ];
    let mut result = Ok(true);
    for sql in &statements {
        if let Err(e) = client.simple_query(sql).await {
            result = Err(e);
            break;
        }
    }
    finish(s, client, t, "write", result)
}

fn finish(
    s: &Shared,
    client: &Client,
    t: Instant,
    phase: &str,
    r: Result<bool, tokio_postgres::Error>,
) -> Outcome {
    match r {
        Ok(true) => {
            s.lat_tick.record(t.elapsed());
            s.lat_all.record(t.elapsed());
            s.tx.fetch_add(1, Ordering::Relaxed);
            s.tx_tick.fetch_add(1, Ordering::Relaxed);
            Outcome::Ok
        }
        Ok(false) => {
            s.errors.add(
                phase,
                "rows",
                "the point select did not return exactly one row",
            );
            Outcome::Ok
        }
        Err(e) => {
            s.errors.pg(phase, &e);
            // After an error inside BEGIN … END the session may be in a failed transaction:
            // start over on a fresh connection rather than guess.
            if client.is_closed() || phase == "write" {
                Outcome::Reconnect
            } else {
                Outcome::Ok
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Idle(a) => {
                idle(a).await;
                Ok(())
            }
            Cmd::Active(a) => active(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
