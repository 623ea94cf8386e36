//! pgsluice's shard of a key is the partition PostgreSQL itself picks: for 10,000 random
//! keys of each key type, rows are inserted into a table `PARTITION BY HASH (k)` with four
//! partitions `MODULUS 4, REMAINDER r`, and each row's partition (read back through
//! `tableoid`) must be `shard_of(key, 4)`. A second check asks `satisfies_hash_partition`
//! with 7 partitions, so a modulus other than a power of two is covered too.

use pgsluice::localpg::{ClusterOptions, LocalCluster};
use pgsluice::router::shard::{KeyType, KeyValue, shard_of};
use rand::Rng;
use tokio_postgres::{Client, NoTls};

const KEYS: usize = 10_000;

async fn connect(cluster: &LocalCluster) -> Client {
    let o = cluster.options();
    let conninfo = format!(
        "host=127.0.0.1 port={} user={} password={} dbname={} connect_timeout=5",
        cluster.primary().port,
        o.app_user,
        o.app_password,
        o.database
    );
    let (client, conn) = tokio_postgres::connect(&conninfo, NoTls)
        .await
        .expect("connect to the test PostgreSQL");
    tokio::spawn(conn);
    client
}

/// Creates `name` partitioned by hash on `k` of `sql_type`, with `modulus` partitions
/// `name_0` … named after their remainders.
async fn partitioned(client: &Client, name: &str, sql_type: &str, modulus: usize) {
    let mut ddl = format!("CREATE TABLE {name} (i int, k {sql_type}) PARTITION BY HASH (k);");
    for r in 0..modulus {
        ddl.push_str(&format!(
            "CREATE TABLE {name}_{r} PARTITION OF {name} \
             FOR VALUES WITH (MODULUS {modulus}, REMAINDER {r});"
        ));
    }
    client.batch_execute(&ddl).await.expect("create partitions");
}

/// Inserts the keys (as text, cast to the column type by PostgreSQL) in one statement and
/// returns the remainder of the partition each one landed in, by position.
async fn remainders(client: &Client, name: &str, sql_type: &str, keys: &[String]) -> Vec<usize> {
    let insert = format!(
        "INSERT INTO {name} (i, k) \
         SELECT n, k::{sql_type} FROM unnest($1::text[]) WITH ORDINALITY AS u(k, n)"
    );
    client
        .execute(&insert, &[&keys])
        .await
        .expect("insert the keys");
    let rows = client
        .query(
            &format!("SELECT i, tableoid::regclass::text FROM {name} ORDER BY i"),
            &[],
        )
        .await
        .expect("read the partitions back");
    assert_eq!(rows.len(), keys.len());
    rows.iter()
        .map(|row| {
            let partition: String = row.get(1);
            let (_, r) = partition.rsplit_once('_').expect("partition name");
            r.parse().expect("remainder")
        })
        .collect()
}

fn random_keys(ty: KeyType, rng: &mut impl Rng) -> Vec<String> {
    let mut keys: Vec<String> = match ty {
        KeyType::BigInt => [
            "0",
            "1",
            "-1",
            "9223372036854775807",
            "-9223372036854775808",
        ]
        .map(String::from)
        .to_vec(),
        KeyType::Integer => ["0", "1", "-1", "2147483647", "-2147483648"]
            .map(String::from)
            .to_vec(),
        KeyType::Text => ["", "a", "abcdefghijkl", "abcdefghijklm", "héllo wörld ✓"]
            .map(String::from)
            .to_vec(),
        KeyType::Uuid => vec![
            "00000000-0000-0000-0000-000000000000".to_string(),
            "ffffffff-ffff-ffff-ffff-ffffffffffff".to_string(),
        ],
    };
    while keys.len() < KEYS {
        keys.push(match ty {
            // Half small (typical ids), half over the whole range.
            KeyType::BigInt if rng.random_bool(0.5) => {
                rng.random_range(0..10_000_000i64).to_string()
            }
            KeyType::BigInt => rng.random::<i64>().to_string(),
            KeyType::Integer => rng.random::<i32>().to_string(),
            KeyType::Text => {
                let len = rng.random_range(0..40);
                (0..len)
                    .map(|_| match rng.random_range(0..10) {
                        0 => rng.random_range('\u{80}'..'\u{800}'),
                        1 => rng.random_range('\u{800}'..'\u{d7ff}'),
                        2 => rng.random_range('\u{10000}'..'\u{10ffff}'),
                        _ => rng.random_range(' '..'\u{7f}'),
                    })
                    .collect()
            }
            KeyType::Uuid => {
                let b: [u8; 16] = rng.random();
                KeyValue::Uuid(b).to_string()
            }
        });
    }
    keys
}

fn sql_type(ty: KeyType) -> &'static str {
    ty.as_str()
}

#[test]
fn shard_of_matches_postgres_hash_partitioning() {
    let cluster = LocalCluster::start(ClusterOptions {
        replicas: 0,
        ..ClusterOptions::default()
    })
    .unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = connect(&cluster).await;
        let mut rng = rand::rng();
        for ty in [
            KeyType::BigInt,
            KeyType::Integer,
            KeyType::Text,
            KeyType::Uuid,
        ] {
            let keys = random_keys(ty, &mut rng);
            let name = format!("p_{}", ty.as_str());
            partitioned(&client, &name, sql_type(ty), 4).await;
            let pg = remainders(&client, &name, sql_type(ty), &keys).await;
            let mut per_shard = [0usize; 4];
            for (key, &want) in keys.iter().zip(&pg) {
                let value = ty
                    .parse_text(key)
                    .unwrap_or_else(|e| panic!("{ty:?} {key:?}: {e}"));
                assert_eq!(
                    shard_of(ty, &value, 4),
                    want,
                    "{} key {key:?}: PostgreSQL put it in remainder {want}",
                    ty.as_str()
                );
                per_shard[want] += 1;
            }
            // The keys really spread (a constant answer would not pass the loop above by
            // luck, but make it visible).
            assert!(per_shard.iter().all(|&n| n > KEYS / 8), "{per_shard:?}");

            // MODULUS 7 through satisfies_hash_partition on a 7-way parent.
            let name7 = format!("q_{}", ty.as_str());
            partitioned(&client, &name7, sql_type(ty), 7).await;
            let sample: Vec<String> = keys.iter().take(2_000).cloned().collect();
            let rows = client
                .query(
                    &format!(
                        "SELECT n, r FROM unnest($1::text[]) WITH ORDINALITY AS u(k, n), \
                         generate_series(0, 6) AS r \
                         WHERE satisfies_hash_partition('{name7}'::regclass, 7, r, k::{}) \
                         ORDER BY n",
                        sql_type(ty)
                    ),
                    &[&sample],
                )
                .await
                .expect("satisfies_hash_partition");
            assert_eq!(rows.len(), sample.len(), "one remainder per key");
            for row in rows {
                let n: i64 = row.get(0);
                let r: i32 = row.get(1);
                let key = &sample[n as usize - 1];
                let value = ty.parse_text(key).unwrap_or(KeyValue::Int(0));
                assert_eq!(
                    shard_of(ty, &value, 7) as i32,
                    r,
                    "{} key {key:?} with 7 shards",
                    ty.as_str()
                );
            }
        }
    });
    drop(cluster);
}
