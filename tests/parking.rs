//! Parked idle clients (`park_idle_clients_after`) against real PostgreSQL:
//! a client idle long enough loses its task and comes back on its next
//! message with its session intact (parameters, prepared statements);
//! clients inside a transaction never park; a parked client that leaves,
//! is killed or is shut down is handled as any other; many clients parked
//! at once all come back.

mod support;

use std::time::Duration;

use support::{TestProxy, eventually, http_get, metric_sum, raise_fd_limit, sqlstate};
use tokio_postgres::SimpleQueryMessage;

/// Parks after 200–400 ms of idleness; an admin user for KILL_CLIENT.
const GENERAL: &str =
    "park_idle_clients_after = \"200ms\"\nadmin_users = [\"admin\"]\npool_size = 4\n";
const USERS: &str =
    "\n[users.admin]\npassword = \"adminpw\"\n[admin]\nhttp_listen_addr = \"127.0.0.1:0\"\n";

async fn start() -> TestProxy {
    TestProxy::start_with(GENERAL, USERS).await
}

fn parked(proxy: &TestProxy) -> usize {
    proxy.shared.parking.len()
}

async fn wait_parked(proxy: &TestProxy, n: usize) {
    eventually(
        &format!("{n} clients parked"),
        Duration::from_secs(10),
        || async { parked(proxy) == n },
    )
    .await;
}

fn first_value(rows: &[SimpleQueryMessage]) -> String {
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row")
}

#[tokio::test]
async fn a_parked_client_keeps_its_session() {
    let proxy = start().await;
    let client = proxy.connect().await;
    client
        .simple_query("SET statement_timeout = '4321ms'")
        .await
        .expect("set");
    let stmt = client.prepare("SELECT $1::int + 1").await.expect("prepare");
    let row = client.query_one(&stmt, &[&1i32]).await.expect("run");
    assert_eq!(row.get::<_, i32>(0), 2);
    client
        .simple_query("PREPARE sqlp AS SELECT 40 + 2")
        .await
        .expect("sql prepare");

    wait_parked(&proxy, 1).await;
    let info = proxy.shared.registry.all();
    assert_eq!(info.len(), 1);
    assert!(info[0].is_parked());
    let metrics = http_get(proxy.http_addr.expect("http"), "/metrics").await;
    assert_eq!(
        metric_sum(&metrics, "pgsluice_clients_parked", &[]),
        Some(1.0)
    );
    assert_eq!(
        metric_sum(&metrics, "pgsluice_clients_connected", &[]),
        Some(1.0)
    );

    // The next message wakes it; everything the session had is still there.
    let row = client
        .query_one(&stmt, &[&41i32])
        .await
        .expect("after parking");
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(parked(&proxy), 0);
    wait_parked(&proxy, 1).await;
    let rows = client
        .simple_query("SHOW statement_timeout")
        .await
        .expect("show");
    assert_eq!(first_value(&rows), "4321ms");
    wait_parked(&proxy, 1).await;
    let rows = client.simple_query("EXECUTE sqlp").await.expect("execute");
    assert_eq!(first_value(&rows), "42");
    // And again, parked twice more in between.
    for i in 0..2 {
        wait_parked(&proxy, 1).await;
        let row = client.query_one(&stmt, &[&i]).await.expect("again");
        assert_eq!(row.get::<_, i32>(0), i + 1);
    }
}

#[tokio::test]
async fn clients_in_a_transaction_or_busy_do_not_park() {
    let proxy = start().await;
    let in_tx = proxy.connect().await;
    in_tx.simple_query("BEGIN").await.expect("begin");
    in_tx
        .simple_query("CREATE TEMP TABLE parked_tx (x int) ON COMMIT DROP")
        .await
        .expect("create");
    let idle = proxy.connect().await;
    idle.simple_query("SELECT 1").await.expect("select");
    // The idle one parks; the one holding a transaction never does.
    wait_parked(&proxy, 1).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(parked(&proxy), 1);
    in_tx
        .simple_query("INSERT INTO parked_tx VALUES (1)")
        .await
        .expect("still in its transaction");
    in_tx.simple_query("COMMIT").await.expect("commit");

    // A client that keeps sending never parks.
    let busy = proxy
        .connect_with("application_name=busy")
        .await
        .expect("busy");
    for _ in 0..30 {
        busy.simple_query("SELECT 1").await.expect("busy");
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(
            !proxy
                .shared
                .registry
                .all()
                .iter()
                .any(|c| c.is_parked() && &*c.id.application_name == "busy")
        );
    }
}

#[tokio::test]
async fn parking_off_keeps_every_client() {
    let proxy = TestProxy::start("park_idle_clients_after = \"0s\"").await;
    let client = proxy.connect().await;
    client.simple_query("SELECT 1").await.expect("select");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(parked(&proxy), 0);
    client.simple_query("SELECT 1").await.expect("select");
}

#[tokio::test]
async fn a_parked_client_that_leaves_is_gone() {
    let proxy = start().await;
    let client = proxy.connect().await;
    client.simple_query("SELECT 1").await.expect("select");
    wait_parked(&proxy, 1).await;
    drop(client);
    eventually("client gone", Duration::from_secs(10), || async {
        proxy.shared.registry.is_empty() && proxy.shared.client_count() == 0
    })
    .await;
    assert_eq!(parked(&proxy), 0);
}

#[tokio::test]
async fn a_parked_client_can_be_killed() {
    let proxy = start().await;
    let victim = proxy
        .connect_with("application_name=victim")
        .await
        .expect("victim");
    victim.simple_query("SELECT 1").await.expect("select");
    wait_parked(&proxy, 1).await;
    let admin = proxy
        .connect_as("admin", "adminpw", "pgsluice")
        .await
        .expect("console");
    let rows = admin.simple_query("SHOW CLIENTS").await.expect("show");
    let victim_row = rows
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) if r.get("application_name") == Some("victim") => Some((
                r.get("state").map(str::to_owned),
                r.get("ptr").map(str::to_owned),
            )),
            _ => None,
        })
        .expect("the parked client is listed");
    assert_eq!(victim_row.0.as_deref(), Some("idle"));
    let ptr = victim_row.1.expect("ptr");
    admin
        .simple_query(&format!("KILL_CLIENT {ptr}"))
        .await
        .expect("kill");
    let e = victim.simple_query("SELECT 1").await.expect_err("killed");
    assert!(
        sqlstate(&e).as_deref() == Some("57P01") || e.is_closed(),
        "{e}"
    );
    eventually("victim gone", Duration::from_secs(10), || async {
        proxy
            .shared
            .registry
            .all()
            .iter()
            .all(|c| &*c.id.application_name != "victim")
    })
    .await;
    assert_eq!(parked(&proxy), 0);
}

#[tokio::test]
async fn shutdown_closes_parked_clients() {
    let proxy =
        TestProxy::start_with(&format!("{GENERAL}shutdown_timeout = \"20s\"\n"), USERS).await;
    let client = proxy.connect().await;
    client.simple_query("SELECT 1").await.expect("select");
    wait_parked(&proxy, 1).await;
    let started = std::time::Instant::now();
    proxy.handle.shutdown();
    // Parked, the client is between transactions: it is closed at once,
    // not after shutdown_timeout.
    eventually("parked client closed", Duration::from_secs(10), || async {
        client.is_closed()
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    eventually("no clients", Duration::from_secs(10), || async {
        proxy.shared.client_count() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_parked_clients_all_come_back() {
    let proxy = start().await;
    let mut clients = Vec::new();
    for _ in 0..200 {
        let c = proxy.connect().await;
        c.simple_query("SELECT 1").await.expect("select");
        clients.push(c);
    }
    wait_parked(&proxy, 200).await;
    let clients = each_answers_at_once(clients).await;
    wait_parked(&proxy, 200).await;
    drop(clients);
    all_gone(&proxy).await;
}

/// Client `i` of `clients`, all at once, runs `SELECT i` and gets `i` back
/// within 10 s; returns the clients.
async fn each_answers_at_once(clients: Vec<tokio_postgres::Client>) -> Vec<tokio_postgres::Client> {
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let rows = tokio::time::timeout(
                Duration::from_secs(10),
                c.simple_query(&format!("SELECT {i}")),
            )
            .await
            .expect("an answer within 10 s")
            .expect("after parking");
            assert_eq!(first_value(&rows), i.to_string());
            c
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.expect("task"));
    }
    clients
}

async fn all_gone(proxy: &TestProxy) {
    eventually("all gone", Duration::from_secs(10), || async {
        proxy.shared.client_count() == 0 && parked(proxy) == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lot_gives_its_room_back_and_the_clients_left_still_answer() {
    // Each end of 1,100 connections is in this process.
    if raise_fd_limit() < 3_000 {
        eprintln!("skipped: fewer than 3,000 open files allowed");
        return;
    }
    // Trust logins: 1,100 SCRAM logins in a debug build would take long.
    let proxy = TestProxy::start_with(&format!("{GENERAL}auth_type = \"trust\"\n"), USERS).await;
    let mut clients = Vec::new();
    for _ in 0..1_100 {
        clients.push(proxy.connect().await);
    }
    // Silent after login: parked within 20 ms.
    eventually("1,100 clients parked", Duration::from_secs(30), || async {
        parked(&proxy) == 1_100
    })
    .await;
    assert!(proxy.shared.parking.slots() >= 1_100);
    // 1,000 leave; a sweep then finds the slab a tenth used and compacts
    // it, moving the 100 left to other keys.
    let kept: Vec<_> = clients.drain(..100).collect();
    drop(clients);
    eventually(
        "the lot's slab compacted",
        Duration::from_secs(20),
        || async { parked(&proxy) == 100 && proxy.shared.parking.slots() < 1_024 },
    )
    .await;
    // Each wakes under its new key and gets its own answer, at once.
    let kept = each_answers_at_once(kept).await;
    wait_parked(&proxy, 100).await;
    drop(kept);
    all_gone(&proxy).await;
}
