//! Real command-line clients through pgsluice: pgbench (initialisation with
//! COPY, select-only and TPC-B loads, simple and extended protocol) and psql
//! (multi-statement scripts, transactions, `\copy`, ON_ERROR_STOP). Each
//! tool runs under `timeout`, so a hang fails the test instead of CI.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use support::*;

/// What a finished command-line tool left behind.
#[derive(Debug)]
struct ToolOutput {
    /// Exit code; 124 means `timeout` killed it.
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl ToolOutput {
    fn assert_success(&self, what: &str) {
        assert_ne!(
            self.code,
            Some(124),
            "{what} hung and was killed:\n{self:#?}"
        );
        assert_eq!(self.code, Some(0), "{what} failed:\n{self:#?}");
    }
}

/// Runs `program args…` against pgsluice on `port`, feeding `stdin`, killed
/// after `timeout_secs`. Blocking, so it runs on the blocking pool.
async fn run_tool(
    program: &'static str,
    port: u16,
    args: Vec<String>,
    stdin: Option<Vec<u8>>,
    timeout_secs: u32,
) -> ToolOutput {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("timeout");
        cmd.arg("--kill-after=5")
            .arg(timeout_secs.to_string())
            .arg(program)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", APP_USER])
            .args(&args)
            .arg(APP_DB)
            .env("PGPASSWORD", APP_PASSWORD)
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGAPPNAME", program);
        for var in [
            "PGOPTIONS",
            "PGSERVICE",
            "PGSSLMODE",
            "PGTZ",
            "PGCLIENTENCODING",
        ] {
            cmd.env_remove(var);
        }
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        if let Some(data) = stdin {
            let mut pipe = child.stdin.take().expect("stdin pipe");
            // A writer thread, so a tool that stops reading cannot block us.
            std::thread::spawn(move || {
                let _ = pipe.write_all(&data);
            });
        }
        let out = child.wait_with_output().expect("wait for tool");
        ToolOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .expect("tool runner")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

// ----- pgbench -------------------------------------------------------------------

/// The summary of one pgbench run.
#[derive(Debug)]
struct BenchResult {
    processed: u64,
    failed: u64,
    tps: f64,
}

fn parse_pgbench(out: &ToolOutput) -> BenchResult {
    let value_after = |prefix: &str| -> &str {
        out.stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .unwrap_or_else(|| panic!("pgbench output has no `{prefix}` line:\n{out:#?}"))
            .trim()
    };
    let first_word = |s: &str| s.split_whitespace().next().unwrap_or_default().to_owned();
    let processed = value_after("number of transactions actually processed:");
    let processed = first_word(processed.split('/').next().unwrap_or_default());
    BenchResult {
        processed: processed
            .parse()
            .unwrap_or_else(|_| panic!("processed `{processed}`")),
        failed: first_word(value_after("number of failed transactions:"))
            .parse()
            .expect("failed count"),
        tps: first_word(value_after("tps =")).parse().expect("tps"),
    }
}

async fn pgbench_run(port: u16, what: &str, args: &[&str]) -> BenchResult {
    let out = run_tool("pgbench", port, strings(args), None, 60).await;
    out.assert_success(what);
    assert!(
        !out.stderr.contains("aborted") && !out.stdout.contains("aborted"),
        "{what}: a client aborted:\n{out:#?}"
    );
    let r = parse_pgbench(&out);
    eprintln!("pgbench {what}: {r:?}");
    assert_eq!(r.failed, 0, "{what}: failed transactions:\n{out:#?}");
    assert!(
        r.processed > 0,
        "{what}: no transaction processed:\n{out:#?}"
    );
    assert!(r.tps > 0.0, "{what}: tps {}:\n{out:#?}", r.tps);
    r
}

/// The TPC-B invariants PostgreSQL keeps whatever the interleaving: every
/// committed transaction moved the same delta through account, teller,
/// branch and history.
async fn assert_tpcb_consistent(c: &tokio_postgres::Client) -> i64 {
    let row = c
        .query_one(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts)::int8, \
                    (SELECT sum(tbalance) FROM pgbench_tellers)::int8, \
                    (SELECT sum(bbalance) FROM pgbench_branches)::int8, \
                    (SELECT coalesce(sum(delta), 0) FROM pgbench_history)::int8, \
                    (SELECT count(*) FROM pgbench_history)",
            &[],
        )
        .await
        .expect("pgbench totals");
    let (a, t, b, h): (i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert!(
        a == t && t == b && b == h,
        "balances disagree: accounts {a}, tellers {t}, branches {b}, history {h}"
    );
    row.get(4)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_through_pgsluice_without_failures() {
    let proxy = TestProxy::start("").await;
    let port = proxy.addr.port();

    // pgbench -i: DROP/CREATE, COPY of 100k accounts, VACUUM, primary keys.
    let init = run_tool("pgbench", port, strings(&["-i", "-s", "1"]), None, 120).await;
    init.assert_success("pgbench -i -s 1");
    assert!(
        init.stderr.contains("done"),
        "pgbench -i output:\n{init:#?}"
    );
    let c = proxy.connect().await;
    let row = c
        .query_one(
            "SELECT (SELECT count(*) FROM pgbench_accounts), \
                    (SELECT count(*) FROM pgbench_tellers), \
                    (SELECT count(*) FROM pgbench_branches), \
                    (SELECT count(*) FROM pgbench_history)",
            &[],
        )
        .await
        .expect("pgbench tables");
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
            row.get::<_, i64>(3)
        ),
        (100_000, 10, 1, 0),
        "pgbench -i -s 1 loaded its tables"
    );

    pgbench_run(
        port,
        "select-only, 20 clients",
        &["-n", "-S", "-T", "3", "-c", "20", "-j", "2"],
    )
    .await;

    let mut committed = 0;
    let tpcb = pgbench_run(
        port,
        "TPC-B, 10 clients",
        &["-n", "-T", "3", "-c", "10", "-j", "2"],
    )
    .await;
    committed += tpcb.processed;
    let tpcb_ext = pgbench_run(
        port,
        "TPC-B, extended protocol",
        &["-n", "-M", "extended", "-T", "3", "-c", "10", "-j", "2"],
    )
    .await;
    committed += tpcb_ext.processed;
    let select_ext = pgbench_run(
        port,
        "select-only, extended protocol",
        &[
            "-n", "-S", "-M", "extended", "-T", "2", "-c", "10", "-j", "2",
        ],
    )
    .await;
    assert!(select_ext.processed > 0);

    // Every transaction pgbench counted as done is in the database; at most
    // one in flight per client when the time ran out may be extra.
    let history = assert_tpcb_consistent(&c).await as u64;
    assert!(
        history >= committed && history <= committed + 20,
        "pgbench_history has {history} rows for {committed} committed TPC-B transactions"
    );
}

// ----- psql --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_transaction_and_copy_from_stdin() {
    let proxy = TestProxy::start("").await;
    let port = proxy.addr.port();

    let mut copy_data = String::new();
    for i in 10..1010 {
        copy_data.push_str(&format!("{i}\tcopied {i} ü\n"));
    }
    copy_data.push_str("\\.\n");
    let out = run_tool(
        "psql",
        port,
        strings(&[
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-A",
            "-t",
            "-c",
            "DROP TABLE IF EXISTS tools_psql; \
             CREATE TABLE tools_psql (id int PRIMARY KEY, note text NOT NULL)",
            "-c",
            "BEGIN; INSERT INTO tools_psql VALUES (1, 'one'); \
             INSERT INTO tools_psql VALUES (2, 'two'); COMMIT;",
            "-c",
            "BEGIN; INSERT INTO tools_psql VALUES (3, 'rolled back'); ROLLBACK;",
            "-c",
            "\\copy tools_psql FROM stdin",
            "-c",
            "SELECT 'rows=' || count(*) || ' sum=' || sum(id) || ' last=' || \
             max(note) FILTER (WHERE id = 1009) FROM tools_psql",
        ]),
        Some(copy_data.into_bytes()),
        60,
    )
    .await;
    out.assert_success("psql with a transaction and \\copy");
    assert!(out.stdout.contains("COMMIT"), "psql output:\n{out:#?}");
    assert!(out.stdout.contains("ROLLBACK"), "psql output:\n{out:#?}");
    assert!(out.stdout.contains("COPY 1000"), "psql output:\n{out:#?}");
    let sum: i64 = 1 + 2 + (10..1010).sum::<i64>();
    assert!(
        out.stdout
            .contains(&format!("rows=1002 sum={sum} last=copied 1009 ü")),
        "psql output:\n{out:#?}"
    );

    // What PostgreSQL holds, read by another client.
    let c = proxy.connect().await;
    let row = c
        .query_one("SELECT count(*), sum(id)::int8 FROM tools_psql", &[])
        .await
        .expect("read back");
    assert_eq!(row.get::<_, i64>(0), 1002);
    assert_eq!(row.get::<_, i64>(1), sum);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_errors_stop_or_continue_as_asked() {
    let proxy = TestProxy::start("").await;
    let port = proxy.addr.port();
    let c = proxy.connect().await;
    c.batch_execute(
        "DROP TABLE IF EXISTS tools_psql_err; CREATE TABLE tools_psql_err (id int PRIMARY KEY)",
    )
    .await
    .expect("setup");

    // ON_ERROR_STOP=1: psql stops at the error with exit code 3.
    let script = "INSERT INTO tools_psql_err VALUES (100);\n\
                  SELECT 1/0;\n\
                  INSERT INTO tools_psql_err VALUES (101);\n";
    let out = run_tool(
        "psql",
        port,
        strings(&["-X", "-v", "ON_ERROR_STOP=1", "-f", "-"]),
        Some(script.as_bytes().to_vec()),
        60,
    )
    .await;
    assert_eq!(out.code, Some(3), "ON_ERROR_STOP=1 exit code:\n{out:#?}");
    assert!(out.stderr.contains("division by zero"), "{out:#?}");

    // ON_ERROR_STOP=0: the error is reported and the script goes on, in
    // the same session (a failed COPY included).
    let script = "INSERT INTO tools_psql_err VALUES (200);\n\
                  SELECT 1/0;\n\
                  INSERT INTO tools_psql_err VALUES (201);\n\
                  BEGIN;\n\
                  INSERT INTO tools_psql_err VALUES (202);\n\
                  INSERT INTO tools_psql_err VALUES (202);\n\
                  SELECT 'inside aborted transaction';\n\
                  ROLLBACK;\n\
                  \\copy tools_psql_err FROM stdin\n\
                  300\n\
                  not-a-number\n\
                  301\n\
                  \\.\n\
                  SELECT 'after-copy:' || count(*) FROM tools_psql_err;\n\
                  INSERT INTO tools_psql_err VALUES (203);\n";
    let out = run_tool(
        "psql",
        port,
        strings(&["-X", "-v", "ON_ERROR_STOP=0", "-A", "-t", "-f", "-"]),
        Some(script.as_bytes().to_vec()),
        60,
    )
    .await;
    assert_eq!(out.code, Some(0), "ON_ERROR_STOP=0 exit code:\n{out:#?}");
    assert!(out.stderr.contains("division by zero"), "{out:#?}");
    assert!(out.stderr.contains("duplicate key"), "{out:#?}");
    assert!(
        out.stderr.contains("current transaction is aborted"),
        "{out:#?}"
    );
    assert!(out.stderr.contains("invalid input syntax"), "{out:#?}");
    assert!(out.stdout.contains("after-copy:3"), "{out:#?}");

    let rows = c
        .query("SELECT id FROM tools_psql_err ORDER BY id", &[])
        .await
        .expect("read back");
    let ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        ids,
        [100, 200, 201, 203],
        "ON_ERROR_STOP=1 stopped before 101; the rolled back transaction and failed COPY left nothing"
    );
}
