//! Sharding by `user_id` against four real PostgreSQL shards.
//!
//! Each shard holds only its own hash partition of `accounts`, `orders` and
//! `events` (`PARTITION BY HASH (user_id)`, partition `MODULUS 4, REMAINDER
//! r` on shard r and no other), so a row sent to the wrong shard fails
//! there with "no partition of relation … found for row": PostgreSQL itself
//! checks every placement. Shard 0 has a streaming replica. An unsharded
//! copy of the same data (database `copy` on shard 2's server) is the
//! reference for fan-out reads.
//!
//! The tests share the shards, and one stops a shard's primary: they run one
//! at a time (`SERIAL`).

mod support;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pgsluice::config::Config;
use pgsluice::localpg::{ClusterOptions, LocalCluster};
use pgsluice::proxy::{Proxy, Shared, ShutdownHandle};
use pgsluice::router::shard::{KeyType, KeyValue, shard_of};
use support::{eventually, message, sqlstate};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SHARDS: usize = 4;
/// Users 1..=USERS, each with ACCOUNTS accounts.
const USERS: i64 = 40;
const ACCOUNTS: i64 = 3;

fn schema(remainder: Option<usize>) -> String {
    let tables = [
        "accounts (user_id bigint NOT NULL, id bigint NOT NULL, name text NOT NULL, \
         balance bigint NOT NULL, amount numeric(12,2) NOT NULL, opened date NOT NULL, \
         PRIMARY KEY (user_id, id))",
        "orders (user_id bigint NOT NULL, order_id bigint NOT NULL, total integer NOT NULL)",
        "events (user_id bigint NOT NULL, note text NOT NULL)",
    ];
    let mut sql = String::new();
    for t in tables {
        let name = t.split_whitespace().next().unwrap_or_default();
        match remainder {
            Some(r) => sql.push_str(&format!(
                "CREATE TABLE {t} PARTITION BY HASH (user_id); \
                 CREATE TABLE {name}_p{r} PARTITION OF {name} FOR VALUES WITH (MODULUS {SHARDS}, REMAINDER {r}); "
            )),
            None => sql.push_str(&format!("CREATE TABLE {t}; ")),
        }
    }
    sql.push_str(
        "CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL); \
         GRANT ALL ON ALL TABLES IN SCHEMA public TO app;",
    );
    sql
}

/// Four shards (shard 0 with a replica); schema created.
fn shards() -> &'static [LocalCluster] {
    static SHARDS_: OnceLock<Vec<LocalCluster>> = OnceLock::new();
    SHARDS_.get_or_init(|| {
        let handles: Vec<_> = (0..SHARDS)
            .map(|r| {
                std::thread::spawn(move || {
                    let c = LocalCluster::start(ClusterOptions {
                        replicas: usize::from(r == 0),
                        max_connections: 100,
                        ..ClusterOptions::default()
                    })
                    .unwrap_or_else(|e| panic!("cannot start shard {r}: {e}"));
                    c.psql(0, "app", &[&schema(Some(r))])
                        .unwrap_or_else(|e| panic!("schema on shard {r}: {e}"));
                    if r == 2 {
                        c.psql(0, "postgres", &["CREATE DATABASE copy OWNER app"])
                            .expect("copy database");
                        c.psql(0, "copy", &[&schema(None)]).expect("copy schema");
                    }
                    c
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("shard start thread"))
            .collect()
    })
}

fn key_shard(user_id: i64) -> usize {
    shard_of(KeyType::BigInt, &KeyValue::Int(user_id), SHARDS)
}

/// Users 1..=USERS whose rows live on shard `s`.
fn users_on(s: usize) -> Vec<i64> {
    (1..=USERS).filter(|&u| key_shard(u) == s).collect()
}

struct Sharded {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    handle: ShutdownHandle,
}

impl Drop for Sharded {
    fn drop(&mut self) {
        self.handle.stop_now();
        self.shared.pools.close_all();
    }
}

impl Sharded {
    async fn start(extra: &str) -> Sharded {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let clusters = tokio::task::spawn_blocking(shards).await.expect("shards");
        let list: Vec<String> = clusters
            .iter()
            .map(|c| {
                let replicas: Vec<String> = c
                    .replicas()
                    .iter()
                    .map(|n| format!("\"{}\"", n.addr()))
                    .collect();
                format!(
                    "{{ primary = \"{}\", replicas = [{}] }}",
                    c.primary().addr(),
                    replicas.join(", ")
                )
            })
            .collect();
        let toml = format!(
            "[general]\nlisten_addr = \"127.0.0.1:0\"\npool_size = 4\nadmin_users = [\"app\"]\n\
             [databases.app]\nshards = [{}]\nshard_key = \"user_id\"\n\
             unsharded_tables = [\"countries\"]\n{extra}\n\
             [routing]\nmonitor_user = \"app\"\nmonitor_interval = \"25ms\"\n\
             [users.app]\npassword = \"app\"\n",
            list.join(", ")
        );
        let config = Config::from_toml(&toml, "test", std::iter::empty())
            .unwrap_or_else(|e| panic!("config: {e}\n{toml}"));
        let proxy = Proxy::bind(config).await.expect("bind");
        let addr = proxy.local_addr().expect("addr");
        let shared = proxy.shared().clone();
        let handle = proxy.shutdown_handle();
        tokio::spawn(proxy.run());
        let s = Sharded {
            addr,
            shared,
            handle,
        };
        load(&s).await;
        s
    }

    fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=app password=app dbname=app connect_timeout=10",
            self.addr.port()
        )
    }

    async fn connect(&self) -> Client {
        connect(&self.conninfo()).await
    }
}

async fn connect(conninfo: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {conninfo}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A direct connection to shard `s`'s primary (`app` database).
async fn direct(s: usize) -> Client {
    let port = shards()[s].primary().port;
    connect(&format!(
        "host=127.0.0.1 port={port} user=app password=app dbname=app"
    ))
    .await
}

/// The unsharded copy of the data.
async fn copy() -> Client {
    let port = shards()[2].primary().port;
    connect(&format!(
        "host=127.0.0.1 port={port} user=app password=app dbname=copy"
    ))
    .await
}

fn account_row(u: i64, id: i64) -> String {
    format!(
        "({u}, {id}, 'user{u:02}-{id}', {}, {}.{:02}, date '2024-01-01' + {})",
        (u * 37 + id * 11) % 1000 - 200,
        (u * 13 + id) % 500,
        (u * 7 + id) % 100,
        (u * 7 + id) % 300
    )
}

/// Loads the data once: through pgsluice (one INSERT per user, placed by a
/// `shard_key` hint, so PostgreSQL checks each placement; the keyed shapes
/// are tested on their own) and directly into the copy.
async fn load(s: &Sharded) {
    static LOADED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    LOADED
        .get_or_init(|| async {
            let c = s.connect().await;
            let copy = copy().await;
            for u in 1..=USERS {
                let rows: Vec<String> = (1..=ACCOUNTS).map(|id| account_row(u, id)).collect();
                let insert = format!("INSERT INTO accounts VALUES {}", rows.join(", "));
                let hinted = format!("/* pgsluice: shard_key={u} */ {insert}");
                c.batch_execute(&hinted)
                    .await
                    .unwrap_or_else(|e| panic!("{insert}: {}", message(&e)));
                copy.batch_execute(&insert).await.expect("copy insert");
                let orders = format!(
                    "INSERT INTO orders (user_id, order_id, total) VALUES ({u}, 1, {}), ({u}, 2, {})",
                    u * 3,
                    u * 5 % 17
                );
                c.batch_execute(&format!("/* pgsluice: shard_key={u} */ {orders}"))
                    .await
                    .unwrap_or_else(|e| panic!("{orders}: {}", message(&e)));
                copy.batch_execute(&orders).await.expect("copy orders");
            }
        })
        .await;
}

fn rows_of(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

async fn simple(c: &Client, sql: &str) -> Result<Vec<Vec<Option<String>>>, tokio_postgres::Error> {
    Ok(rows_of(&c.simple_query(sql).await?))
}

async fn count(c: &Client, sql: &str) -> i64 {
    let rows = simple(c, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", message(&e)));
    rows[0][0]
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{sql}: no count in {rows:?}"))
}

#[tokio::test]
async fn keyed_statements_go_to_their_shard_with_literals_and_bound_parameters() {
    let _serial = SERIAL.lock().await;
    let proxy = Sharded::start("").await;
    // The load succeeded: PostgreSQL accepted every row on the shard
    // pgsluice chose. Each shard holds exactly its users.
    for s in 0..SHARDS {
        let d = direct(s).await;
        let expected = users_on(s).len() as i64 * ACCOUNTS;
        assert_eq!(
            count(&d, "SELECT count(*) FROM accounts").await,
            expected,
            "shard {s}"
        );
    }
    let c = proxy.connect().await;
    let u = 7;
    let same: Vec<i64> = users_on(key_shard(u));
    let other = (1..=USERS)
        .find(|&x| key_shard(x) != key_shard(u))
        .expect("another shard");
    // Literals, simple protocol.
    for sql in [
        format!("SELECT name FROM accounts WHERE user_id = {u}"),
        format!("SELECT name FROM accounts WHERE id > 0 AND user_id = {u} AND balance > -1000"),
        format!(
            "SELECT name FROM accounts WHERE user_id IN ({u}, {})",
            same[0]
        ),
        format!(
            "SELECT a.name FROM accounts a JOIN orders o ON o.user_id = a.user_id \
             WHERE a.user_id = {u} AND o.user_id = {u}"
        ),
    ] {
        let rows = simple(&c, &sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {}", message(&e)));
        assert!(!rows.is_empty(), "{sql}");
    }
    // Bound parameters (tokio-postgres sends them in binary).
    let rows = c
        .query(
            "SELECT name FROM accounts WHERE user_id = $1 ORDER BY id",
            &[&u],
        )
        .await
        .expect("bound bigint");
    assert_eq!(rows.len(), ACCOUNTS as usize);
    assert_eq!(rows[0].get::<_, String>(0), format!("user{u:02}-1"));
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM accounts a JOIN orders o ON o.user_id = a.user_id \
             WHERE a.user_id = $1 AND o.user_id = $1",
            &[&u],
        )
        .await
        .expect("join with a bound key")
        .get(0);
    assert_eq!(n, ACCOUNTS * 2);
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM accounts WHERE user_id IN ($1, $2)",
            &[&u, &same[0]],
        )
        .await
        .expect("IN with bound keys on one shard")
        .get(0);
    assert_eq!(n, if same[0] == u { ACCOUNTS } else { 2 * ACCOUNTS });
    let stmt = c
        .prepare("SELECT count(*) FROM accounts WHERE id = $2 AND user_id = $1")
        .await
        .expect("prepare");
    for x in [u, other] {
        let n: i64 = c
            .query_one(&stmt, &[&x, &1i64])
            .await
            .expect("named")
            .get(0);
        assert_eq!(n, 1, "user {x}");
    }
    // Writes with the key: INSERT (column list, one and several rows on
    // one shard), UPDATE and DELETE.
    c.execute(
        "INSERT INTO events (user_id, note) VALUES ($1, 'one')",
        &[&u],
    )
    .await
    .expect("insert bound");
    c.batch_execute(&format!(
        "INSERT INTO events (note, user_id) VALUES ('two', {u}), ('three', {})",
        same[0]
    ))
    .await
    .expect("multi-row insert on one shard");
    let n = c
        .execute(
            "UPDATE events SET note = note || '!' WHERE user_id = $1",
            &[&u],
        )
        .await
        .expect("update");
    assert_eq!(n, 2);
    let n = c
        .execute("DELETE FROM events WHERE user_id = $1", &[&u])
        .await
        .expect("delete");
    assert_eq!(n, 2);
    c.batch_execute(&format!("DELETE FROM events WHERE user_id = {}", same[0]))
        .await
        .expect("delete literal");
    // The statement counters moved.
    let db = &proxy.shared.shards["app"];
    assert!(db.shards[key_shard(u)].statements() > 0);
}

#[tokio::test]
async fn psycopg_places_text_and_binary_parameters() {
    let _serial = SERIAL.lock().await;
    let has_psycopg = std::process::Command::new("python3")
        .args(["-c", "import psycopg"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_psycopg {
        assert!(
            std::env::var_os("PGSLUICE_REQUIRE_DRIVERS").is_none(),
            "psycopg 3 is required (PGSLUICE_REQUIRE_DRIVERS is set)"
        );
        eprintln!("skipped: python3 with psycopg 3 not found (tests/clients/run.sh installs it)");
        return;
    }
    let proxy = Sharded::start("").await;
    let u = 11;
    let same = users_on(key_shard(u));
    let script = format!(
        r#"
import sys, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
u, v = {u}, {v}
def one(sql, params=None, binary=False):
    with conn.cursor(binary=binary) as cur:
        cur.execute(sql, params)
        return cur.fetchall()
# text-format parameters (psycopg's default)
assert len(one("SELECT name FROM accounts WHERE user_id = %s", (u,))) == 3
assert len(one("SELECT name FROM accounts WHERE id = %s AND user_id = %s", (2, u))) == 1
assert len(one("SELECT name FROM accounts WHERE user_id IN (%s, %s)", (u, v))) == 6
# binary-format parameters and results
assert len(one("SELECT name FROM accounts WHERE user_id = %b", (u,), binary=True)) == 3
# prepared on the server (named statements), then executed again
for _ in range(6):
    assert one("SELECT count(*) FROM accounts WHERE user_id = %s", (u,), )[0][0] == 3
with conn.cursor() as cur:
    cur.execute("INSERT INTO events (user_id, note) VALUES (%s, %s)", (u, "py"), prepare=True)
    cur.execute("INSERT INTO events (user_id, note) VALUES (%b, %b)", (v, "pyb"))
assert one("SELECT note FROM events WHERE user_id = %s", (u,)) == [("py",)]
# key-less reads fan out (unnamed statements; text and binary results)
assert one("SELECT count(*) FROM accounts")[0][0] == {total}
assert one("SELECT count(*), sum(balance) FROM accounts WHERE balance > %s", (0,), binary=True)[0][0] > 0
top = one("SELECT user_id, id, balance FROM accounts ORDER BY balance DESC, user_id, id LIMIT 3", binary=True)
assert len(top) == 3, top
# hints and SET
assert one("/* pgsluice: shard_key=%s */ SELECT count(*) FROM events" % u)[0][0] >= 1
conn.execute("SET pgsluice.shard_key = '%s'" % u)
assert one("SHOW pgsluice.shard_key")[0][0] == str(u)
conn.execute("RESET pgsluice.shard_key")
# a transaction stays on its shard
with conn.transaction():
    conn.execute("INSERT INTO events (user_id, note) VALUES (%s, 'tx')", (u,))
    assert one("SELECT count(*) FROM events WHERE user_id = %s", (u,))[0][0] == 2
conn.execute("DELETE FROM events WHERE user_id = %s", (u,))
conn.execute("DELETE FROM events WHERE user_id = %s", (v,))
print("ok")
"#,
        v = same.iter().find(|&&x| x != u).copied().unwrap_or(u),
        total = USERS * ACCOUNTS
    );
    let copy = copy().await;
    let want = simple(
        &copy,
        "SELECT user_id, id, balance FROM accounts ORDER BY balance DESC, user_id, id LIMIT 3",
    )
    .await
    .expect("copy");
    let top: Vec<String> = want
        .iter()
        .map(|r| {
            let v: Vec<&str> = r.iter().map(|c| c.as_deref().unwrap_or("")).collect();
            format!("({})", v.join(", "))
        })
        .collect();
    let script = script.replace(
        "assert len(top) == 3, top",
        &format!("assert top == [{}], top", top.join(", ")),
    );
    let conninfo = proxy.conninfo();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", &script, &conninfo])
            .output()
    })
    .await
    .expect("join")
    .expect("python3");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "psycopg script failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn hints_and_set_pick_the_shard() {
    let _serial = SERIAL.lock().await;
    let proxy = Sharded::start("").await;
    let c = proxy.connect().await;
    let per_shard: Vec<i64> = (0..SHARDS)
        .map(|s| users_on(s).len() as i64 * ACCOUNTS)
        .collect();
    for (s, expected) in per_shard.iter().enumerate() {
        let sql = format!("/* pgsluice: shard={s} */ SELECT count(*) FROM accounts");
        assert_eq!(count(&c, &sql).await, *expected, "{sql}");
    }
    let u = 5;
    let sql = format!("/* pgsluice: shard_key={u} */ SELECT count(*) FROM accounts");
    assert_eq!(count(&c, &sql).await, per_shard[key_shard(u)], "{sql}");

    // SET pgsluice.shard_key for the session: key-less statements go there.
    c.batch_execute(&format!("SET pgsluice.shard_key = '{u}'"))
        .await
        .expect("set shard_key");
    assert_eq!(
        count(&c, "SELECT count(*) FROM accounts").await,
        per_shard[key_shard(u)]
    );
    assert_eq!(
        simple(&c, "SHOW pgsluice.shard_key").await.expect("show")[0][0].as_deref(),
        Some("5")
    );
    // A statement whose own key (here a hint) is on another shard is refused.
    let other = (1..=USERS)
        .find(|&x| key_shard(x) != key_shard(u))
        .expect("other");
    let e = simple(&c, &format!("/* pgsluice: shard_key={other} */ SELECT 1"))
        .await
        .expect_err("conflicting key");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{}", message(&e));
    c.batch_execute("RESET pgsluice.shard_key")
        .await
        .expect("reset");
    c.batch_execute("SET pgsluice.shard = 3")
        .await
        .expect("set shard");
    assert_eq!(
        count(&c, "SELECT count(*) FROM accounts").await,
        per_shard[3]
    );
    let e = c
        .batch_execute("SET pgsluice.shard = 4")
        .await
        .expect_err("out of range");
    assert_eq!(sqlstate(&e).as_deref(), Some("22023"), "{}", message(&e));
    c.batch_execute("RESET pgsluice.shard")
        .await
        .expect("reset");
    // SET LOCAL: for the transaction only.
    c.batch_execute("BEGIN").await.expect("begin");
    c.batch_execute("SET LOCAL pgsluice.shard = 1")
        .await
        .expect("set local");
    assert_eq!(
        count(&c, "SELECT count(*) FROM accounts").await,
        per_shard[1]
    );
    c.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(
        count(&c, "SELECT count(*) FROM accounts").await,
        USERS * ACCOUNTS,
        "after the transaction the read fans out again"
    );
}

/// Runs `sql` through pgsluice and on the unsharded copy, in the simple
/// (text) and extended (binary) protocol.
async fn same_as_copy(proxy: &Client, copy: &Client, sql: &str, ordered: bool) {
    let mut got = simple(proxy, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {} ({:?})", message(&e), sqlstate(&e)));
    let mut want = simple(copy, sql).await.expect("copy");
    if !ordered {
        got.sort();
        want.sort();
    }
    assert_eq!(got, want, "{sql}");
    // Extended protocol: results in binary, compared byte for byte.
    let got = proxy
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql} (extended): {}", message(&e)));
    let want = copy.query(sql, &[]).await.expect("copy extended");
    let raw = |rows: &[tokio_postgres::Row]| -> Vec<Vec<Option<Vec<u8>>>> {
        let mut v: Vec<Vec<Option<Vec<u8>>>> = rows
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| r.get::<_, Option<Raw>>(i).map(|x| x.0))
                    .collect()
            })
            .collect();
        if !ordered {
            v.sort();
        }
        v
    };
    assert_eq!(raw(&got), raw(&want), "{sql} (extended, binary)");
    if let (Some(a), Some(b)) = (got.first(), want.first()) {
        let types = |r: &tokio_postgres::Row| -> Vec<String> {
            r.columns()
                .iter()
                .map(|c| c.type_().name().to_owned())
                .collect()
        };
        assert_eq!(types(a), types(b), "{sql}");
    }
}

/// Any column value, as PostgreSQL sent it (binary format).
struct Raw(Vec<u8>);

impl<'a> tokio_postgres::types::FromSql<'a> for Raw {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

#[tokio::test]
async fn key_less_reads_fan_out_and_merge_like_one_database() {
    let _serial = SERIAL.lock().await;
    let proxy = Sharded::start("").await;
    let c = proxy.connect().await;
    let copy = copy().await;
    // Concatenation, compared as sets.
    for sql in [
        "SELECT user_id, id, name FROM accounts",
        "SELECT user_id, id FROM accounts WHERE balance > 100",
    ] {
        same_as_copy(&c, &copy, sql, false).await;
    }
    // ORDER BY (+ LIMIT/OFFSET), compared exactly.
    for sql in [
        "SELECT user_id, id, balance FROM accounts ORDER BY balance DESC, user_id, id",
        "SELECT user_id, id, balance FROM accounts ORDER BY balance, user_id DESC, id LIMIT 10 OFFSET 5",
        "SELECT name, amount FROM accounts ORDER BY amount DESC, name LIMIT 20",
        "SELECT name, opened FROM accounts ORDER BY opened, name LIMIT 15 OFFSET 3",
        "SELECT name FROM accounts ORDER BY name DESC LIMIT 7",
        "SELECT user_id, id FROM accounts ORDER BY user_id, id OFFSET 100",
    ] {
        same_as_copy(&c, &copy, sql, true).await;
    }
    // Aggregates without and with GROUP BY.
    for sql in [
        "SELECT count(*) FROM accounts",
        "SELECT count(*), sum(balance), min(balance), max(balance), sum(amount), min(name), max(opened) FROM accounts",
        "SELECT opened, count(*), sum(balance) FROM accounts GROUP BY opened ORDER BY opened",
        "SELECT id, count(*), sum(amount), min(balance), max(name) FROM accounts GROUP BY id ORDER BY id",
        "SELECT total, count(*) FROM orders GROUP BY total ORDER BY count(*) DESC, total LIMIT 5",
    ] {
        same_as_copy(&c, &copy, sql, true).await;
    }
    assert!(proxy.shared.shards["app"].fanouts() > 0);
}

#[tokio::test]
async fn what_cannot_be_placed_or_merged_is_refused_with_its_sqlstate() {
    let _serial = SERIAL.lock().await;
    let proxy = Sharded::start("").await;
    let c = proxy.connect().await;
    let (a, b) = {
        let a = 3;
        let b = (1..=USERS)
            .find(|&x| key_shard(x) != key_shard(a))
            .expect("b");
        (a, b)
    };
    for sql in [
        // A key-less write.
        "UPDATE accounts SET balance = 0".to_owned(),
        "DELETE FROM events".to_owned(),
        // A merge pgsluice cannot do exactly.
        "SELECT avg(balance) FROM accounts".to_owned(),
        // A row that would move to another shard.
        format!("UPDATE accounts SET user_id = {b} WHERE user_id = {a}"),
        // Rows for two shards, with multi_shard_insert = refuse.
        format!("INSERT INTO events (user_id, note) VALUES ({a}, 'x'), ({b}, 'y')"),
        // A write to an unsharded table, with unsharded_writes = refuse.
        "INSERT INTO countries VALUES ('fr', 'France')".to_owned(),
    ] {
        let e = simple(&c, &sql).await.expect_err(&sql);
        assert_eq!(
            sqlstate(&e).as_deref(),
            Some("0A000"),
            "{sql}: {}",
            message(&e)
        );
    }
    // A shard's own error is the answer of a fan-out (division by zero on
    // the shard holding user 5 only), and every server comes back clean.
    let e = simple(&c, "SELECT 1 / (user_id - 5) FROM accounts")
        .await
        .expect_err("error on one shard");
    assert_eq!(sqlstate(&e).as_deref(), Some("22012"), "{}", message(&e));
    assert_eq!(
        count(&c, "SELECT count(*) FROM accounts").await,
        USERS * ACCOUNTS
    );
    // Extended protocol too, and the connection stays usable.
    let e = c
        .execute("UPDATE accounts SET balance = $1", &[&1i64])
        .await
        .expect_err("key-less bound write");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{}", message(&e));
    assert_eq!(count(&c, "SELECT 1").await, 1);
    // The row budget of a fan-out.
    drop(c);
    drop(proxy);
    let proxy = Sharded::start("max_fanout_rows = 10").await;
    let c = proxy.connect().await;
    let e = simple(&c, "SELECT * FROM accounts")
        .await
        .expect_err("over max_fanout_rows");
    assert_eq!(sqlstate(&e).as_deref(), Some("54000"), "{}", message(&e));
    assert!(message(&e).contains("max_fanout_rows"), "{}", message(&e));
    assert_eq!(
        count(&c, "SELECT count(*) FROM accounts").await,
        USERS * ACCOUNTS
    );
}

#[tokio::test]
async fn a_transaction_stays_on_the_shard_of_its_first_keyed_statement() {
    let _serial = SERIAL.lock().await;
    let proxy = Sharded::start("").await;
    let mut c = proxy.connect().await;
    let a = 9;
    let b = (1..=USERS)
        .find(|&x| key_shard(x) != key_shard(a))
        .expect("b");
    // Committed on its shard.
    {
        let tx = c.transaction().await.expect("begin");
        tx.execute(
            "INSERT INTO events (user_id, note) VALUES ($1, 'tx')",
            &[&a],
        )
        .await
        .expect("insert");
        let n: i64 = tx
            .query_one("SELECT count(*) FROM events WHERE user_id = $1", &[&a])
            .await
            .expect("read in tx")
            .get(0);
        assert_eq!(n, 1);
        tx.commit().await.expect("commit");
    }
    let d = direct(key_shard(a)).await;
    assert_eq!(
        count(
            &d,
            &format!("SELECT count(*) FROM events WHERE user_id = {a}")
        )
        .await,
        1
    );
    // A statement for another shard: refused, the transaction aborted.
    let tx = c.transaction().await.expect("begin");
    tx.execute(
        "INSERT INTO events (user_id, note) VALUES ($1, 'lost')",
        &[&a],
    )
    .await
    .expect("first insert");
    let e = tx
        .execute(
            "INSERT INTO events (user_id, note) VALUES ($1, 'other')",
            &[&b],
        )
        .await
        .expect_err("other shard");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{}", message(&e));
    assert!(
        message(&e).contains(&format!("shard {}", key_shard(a)))
            && message(&e).contains(&format!("shard {}", key_shard(b))),
        "{}",
        message(&e)
    );
    let e = tx
        .execute("SELECT 1", &[])
        .await
        .expect_err("aborted transaction");
    assert_eq!(sqlstate(&e).as_deref(), Some("25P02"), "{}", message(&e));
    tx.rollback().await.expect("rollback");
    assert_eq!(
        count(
            &d,
            &format!("SELECT count(*) FROM events WHERE user_id = {a}")
        )
        .await,
        1,
        "the aborted transaction's insert is gone"
    );
    // A key-less read inside a transaction is refused too.
    c.batch_execute(&format!("BEGIN; SELECT * FROM events WHERE user_id = {a}"))
        .await
        .expect("keyed");
    let e = simple(&c, "SELECT count(*) FROM accounts")
        .await
        .expect_err("fan-out in tx");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{}", message(&e));
    c.batch_execute("ROLLBACK").await.expect("rollback");
    // BEGIN ... COMMIT with nothing in between, and a refusal before any
    // shard was touched.
    c.batch_execute("BEGIN").await.expect("begin");
    c.batch_execute("COMMIT").await.expect("commit");
    c.batch_execute("BEGIN").await.expect("begin");
    let e = simple(&c, "UPDATE accounts SET balance = 0")
        .await
        .expect_err("key-less write");
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"));
    let e = simple(&c, "SELECT 1").await.expect_err("aborted");
    assert_eq!(sqlstate(&e).as_deref(), Some("25P02"));
    c.batch_execute("ROLLBACK").await.expect("rollback");
    c.batch_execute(&format!("DELETE FROM events WHERE user_id = {a}"))
        .await
        .expect("cleanup");
}

#[tokio::test]
async fn unsharded_tables_and_split_inserts_when_configured() {
    let _serial = SERIAL.lock().await;
    let proxy = Sharded::start("unsharded_writes = \"all\"\nmulti_shard_insert = \"split\"").await;
    let c = proxy.connect().await;
    c.batch_execute("INSERT INTO countries VALUES ('se', 'Sweden')")
        .await
        .expect("write to every shard");
    for s in 0..SHARDS {
        let d = direct(s).await;
        assert_eq!(
            count(&d, "SELECT count(*) FROM countries WHERE code = 'se'").await,
            1,
            "shard {s}"
        );
    }
    assert_eq!(
        simple(&c, "SELECT name FROM countries WHERE code = 'se'")
            .await
            .expect("read")[0][0]
            .as_deref(),
        Some("Sweden")
    );
    c.batch_execute("DELETE FROM countries")
        .await
        .expect("delete everywhere");
    // One INSERT per shard; PostgreSQL checks each row's partition.
    let values: Vec<String> = (1..=USERS).map(|u| format!("({u}, 'split')")).collect();
    let msgs = c
        .simple_query(&format!(
            "INSERT INTO events (user_id, note) VALUES {}",
            values.join(", ")
        ))
        .await
        .expect("split insert");
    let inserted = msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::CommandComplete(n) => Some(*n),
        _ => None,
    });
    assert_eq!(inserted, Some(USERS as u64));
    for s in 0..SHARDS {
        let d = direct(s).await;
        assert_eq!(
            count(&d, "SELECT count(*) FROM events WHERE note = 'split'").await,
            users_on(s).len() as i64,
            "shard {s}"
        );
        d.batch_execute("DELETE FROM events WHERE note = 'split'")
            .await
            .expect("clean");
    }
}

#[tokio::test]
async fn a_stopped_shard_primary_fails_only_that_shards_writes() {
    let _serial = SERIAL.lock().await;
    let proxy = Sharded::start("").await;
    let c = proxy.connect().await;
    // Shards report their nodes, and shard 0's replica joins read rotation.
    let db = proxy.shared.shards["app"].clone();
    eventually(
        "shard 0's replica in rotation",
        Duration::from_secs(20),
        || {
            let db = db.clone();
            async move {
                pgsluice::cluster::shards_report([&db])
                    .iter()
                    .any(|r| r[1] == "0" && r[2] == "replica1" && r[5] == "in rotation")
            }
        },
    )
    .await;
    let report = pgsluice::cluster::shards_report([&db]);
    assert_eq!(report.len(), SHARDS + 1, "{report:?}");

    let down = 3;
    let victim = users_on(down)[0];
    let alive = users_on(1)[0];
    tokio::task::spawn_blocking(move || shards()[down].stop_node(0))
        .await
        .expect("join")
        .expect("stop shard 3's primary");
    // Started again whatever happens below (the other tests need it).
    struct Restart(usize);
    impl Drop for Restart {
        fn drop(&mut self) {
            let _ = shards()[self.0].start_node(0);
        }
    }
    let restart = Restart(down);
    let monitored = db.clone();
    eventually(
        "the monitor sees shard 3's primary down",
        Duration::from_secs(10),
        || {
            let db = monitored.clone();
            async move {
                !db.shards[down]
                    .cluster
                    .primary_reachable(std::time::Instant::now())
            }
        },
    )
    .await;
    let e = c
        .execute(
            "INSERT INTO events (user_id, note) VALUES ($1, 'down')",
            &[&victim],
        )
        .await
        .expect_err("shard 3 is down");
    assert!(
        sqlstate(&e).is_some_and(|s| s.starts_with("08") || s.starts_with("57")),
        "{e}"
    );
    for (u, s) in [(alive, 1), (users_on(0)[0], 0), (users_on(2)[0], 2)] {
        c.execute(
            "INSERT INTO events (user_id, note) VALUES ($1, 'up')",
            &[&u],
        )
        .await
        .unwrap_or_else(|e| panic!("shard {s} write: {}", message(&e)));
        let n: i64 = c
            .query_one("SELECT count(*) FROM events WHERE user_id = $1", &[&u])
            .await
            .expect("read")
            .get(0);
        assert_eq!(n, 1);
    }
    tokio::task::spawn_blocking(move || drop(restart))
        .await
        .expect("restart");
    eventually("shard 3 writable again", Duration::from_secs(20), || {
        let c = &c;
        async move {
            c.execute(
                "INSERT INTO events (user_id, note) VALUES ($1, 'back')",
                &[&victim],
            )
            .await
            .is_ok()
        }
    })
    .await;
    for s in 0..SHARDS {
        direct(s)
            .await
            .batch_execute("DELETE FROM events")
            .await
            .expect("clean");
    }
}

/// The admin console shows every shard's nodes and where a statement goes.
#[tokio::test]
async fn the_admin_console_shows_shards_and_routes() {
    let _serial = SERIAL.lock().await;
    let proxy = Sharded::start("").await;
    let admin = connect(&proxy.conninfo().replace("dbname=app", "dbname=pgsluice")).await;
    let rows: Vec<Vec<String>> = admin
        .simple_query("SHOW SHARDS")
        .await
        .expect("SHOW SHARDS")
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("").to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), SHARDS + 1, "{rows:?}");
    for s in 0..SHARDS {
        assert!(
            rows.iter()
                .any(|r| r[1] == s.to_string() && r[3] == "primary"),
            "shard {s} has a primary row: {rows:?}"
        );
    }
    let user = users_on(2)[0];
    let route = admin
        .simple_query(&format!(
            "SHOW ROUTE SELECT * FROM accounts WHERE user_id = {user}"
        ))
        .await
        .expect("SHOW ROUTE");
    let row = route
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((
                r.get(3).unwrap_or("").to_owned(),
                r.get(5).unwrap_or("").to_owned(),
            )),
            _ => None,
        })
        .expect("a row");
    assert_eq!(row.0, "shard 2", "{row:?}");
    assert!(row.1.contains(&user.to_string()), "{row:?}");
    let fanout = admin
        .simple_query("SHOW ROUTE SELECT count(*) FROM accounts")
        .await
        .expect("SHOW ROUTE");
    assert!(
        fanout
            .iter()
            .any(|m| matches!(m, SimpleQueryMessage::Row(r) if r.get(3) == Some("all shards"))),
        "{fanout:?}"
    );
}
