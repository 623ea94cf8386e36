//! Logs of the real binary: `log_format = "json"` writes one parseable JSON
//! object per line, carrying the client span (peer, user, database, client
//! id) and the server span (pool, pid); the level changes at runtime (here
//! by a reload of `general.log_level`).

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_postgres::NoTls;

const BIN: &str = env!("CARGO_BIN_EXE_pgsluice");

#[test]
fn json_lines_with_spans_and_a_runtime_level() {
    let cluster = support::cluster();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = dir.path().join("pgsluice.toml");
    let config = |level: &str| {
        format!(
            "[general]\nlisten_addr = \"127.0.0.1:{port}\"\nlog_format = \"json\"\nlog_level = \"{level}\"\n\
             [databases.app]\nprimary = \"{}\"\n[users.app]\npassword = \"app\"\n",
            cluster.primary().addr()
        )
    };
    std::fs::write(&path, config("info")).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let wait_for = |lines: &mut Vec<String>, needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !lines.iter().any(|l: &String| l.contains(needle)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => lines.push(l),
                Err(_) => panic!("no line with {needle:?}: {lines:#?}"),
            }
        }
    };
    wait_for(&mut lines, "pgsluice listening");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!("host=127.0.0.1 port={port} user=app password=app dbname=app");
    let first = rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(conn);
        c.batch_execute("BEGIN").await.unwrap();
        c
    });
    // Debug from now on: a reload of general.log_level.
    std::fs::write(&path, config("debug")).unwrap();
    kill(pid, Signal::SIGHUP).unwrap();
    wait_for(&mut lines, "log filter changed");
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(conn);
        // The first client holds a server: this one gets a new one.
        c.batch_execute("SELECT 1").await.unwrap();
        first.batch_execute("COMMIT").await.unwrap();
    });
    wait_for(&mut lines, "server connection opened");
    wait_for(&mut lines, "client authenticated");
    kill(pid, Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "pgsluice did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    lines.extend(rx.try_iter());

    let objects: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object: {l:?}: {e}"))
        })
        .collect();
    assert!(
        objects
            .iter()
            .all(|o| o.is_object() && o["level"].is_string())
    );
    let before_reload: Vec<_> = objects
        .iter()
        .take_while(|o| o["fields"]["message"] != "log filter changed")
        .collect();
    assert!(
        before_reload.iter().all(|o| o["level"] != "DEBUG"),
        "debug lines at level info"
    );
    let in_span = |name: &str, message: &str| {
        objects
            .iter()
            .find(|o| {
                o["fields"]["message"] == message
                    && o["spans"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|s| s["name"] == name))
            })
            .unwrap_or_else(|| panic!("no {message:?} in a {name} span: {lines:#?}"))
    };
    let auth = in_span("client", "client authenticated");
    let client = auth["spans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "client")
        .unwrap();
    assert_eq!(client["user"], "app");
    assert_eq!(client["database"], "app");
    assert!(client["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    let opened = in_span("server", "server connection opened");
    let server = &opened["span"];
    assert_eq!(server["name"], "server");
    assert_eq!(server["pool"], "app/app@primary");
    assert!(server["pid"].as_i64().is_some_and(|p| p > 0), "{server}");
}
