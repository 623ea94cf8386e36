//! Topology of a sharded database: one replication group ([`Cluster`]) per
//! shard, each with its own monitor, lag measurements and read rotation,
//! plus per-shard counters for metrics and `SHOW SHARDS`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{Availability, Cluster, Role};
use crate::config::{Database, MultiShardInsert, Routing, ShardKeyType, Sharding, UnshardedWrites};
use crate::router::shard::{self, Analysis, BoundParams, KeyType, Placement, ShardingRules};

/// Statement texts whose placement analysis is remembered, per database.
const ANALYSIS_CACHE_CAPACITY: usize = 10_000;

/// One shard of a sharded database.
pub struct Shard {
    /// Its number: the hash partition REMAINDER it holds.
    pub index: usize,
    /// Its primary and replicas, named `NAME.shardN`.
    pub cluster: Arc<Cluster>,
    /// Requests placed on this shard alone.
    statements: AtomicU64,
    /// Fan-out reads and all-shard writes this shard took part in.
    fanouts: AtomicU64,
    /// The database's default collation, once a fan-out asked: 0 = not
    /// known yet, 1 = `C`/`POSIX` (text compares bytewise), 2 = another.
    text_order: AtomicU8,
}

impl Shard {
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }

    pub fn fanouts(&self) -> u64 {
        self.fanouts.load(Ordering::Relaxed)
    }

    pub fn count_statement(&self) {
        self.statements.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_fanout(&self) {
        self.fanouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether text on this shard sorts bytewise (`None`: not known yet).
    pub fn bytewise_text(&self) -> Option<bool> {
        match self.text_order.load(Ordering::Relaxed) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    /// Records the database's `datcollate` as read on this shard.
    pub fn set_collation(&self, collation: &str) {
        let bytewise =
            matches!(collation, "C" | "POSIX" | "ucs_basic") || collation.starts_with("C.");
        self.text_order
            .store(if bytewise { 1 } else { 2 }, Ordering::Relaxed);
    }
}

/// A sharded database's shards and counters.
pub struct ShardedDatabase {
    pub database: String,
    pub settings: Sharding,
    /// The placement rules derived from `settings`.
    pub rules: ShardingRules,
    pub shards: Vec<Shard>,
    /// Placement analyses by statement text (the parse is the expensive
    /// part; bound parameters are applied per execution).
    analyses: Mutex<HashMap<Box<str>, Arc<Analysis>>>,
    /// Key-less reads run on every shard.
    fanouts: AtomicU64,
    /// Statements refused because they cannot be placed or merged.
    refused: AtomicU64,
}

impl ShardedDatabase {
    /// `None` for a database that is not sharded.
    pub fn new(db: &Database, routing: &Routing) -> Option<Arc<Self>> {
        let settings = db.sharding.clone()?;
        let shards = settings
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| Shard {
                index: i,
                cluster: Cluster::of_nodes(
                    &crate::pool::shard_group(&db.name, i),
                    &s.primary,
                    &s.replicas,
                    &s.replica_weights,
                    routing,
                ),
                statements: AtomicU64::new(0),
                fanouts: AtomicU64::new(0),
                text_order: AtomicU8::new(0),
            })
            .collect();
        let rules = ShardingRules {
            key_column: settings.key_column.clone(),
            key_type: match settings.key_type {
                ShardKeyType::BigInt => KeyType::BigInt,
                ShardKeyType::Integer => KeyType::Integer,
                ShardKeyType::Text => KeyType::Text,
                ShardKeyType::Uuid => KeyType::Uuid,
            },
            shards: settings.shards.len(),
            unsharded_tables: settings.unsharded_tables.clone(),
            unsharded_writes: match settings.unsharded_writes {
                UnshardedWrites::All => shard::UnshardedWrites::AllShards,
                UnshardedWrites::Refuse => shard::UnshardedWrites::Refuse,
            },
            multi_shard_insert: match settings.multi_shard_insert {
                MultiShardInsert::Split => shard::MultiShardInsert::Split,
                MultiShardInsert::Refuse => shard::MultiShardInsert::Refuse,
            },
        };
        Some(Arc::new(Self {
            database: db.name.clone(),
            settings,
            rules,
            analyses: Mutex::new(HashMap::new()),
            shards,
            fanouts: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }))
    }

    pub fn fanouts(&self) -> u64 {
        self.fanouts.load(Ordering::Relaxed)
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn count_fanout(&self) {
        self.fanouts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Places one statement text with its bound parameters (the text's
    /// analysis is cached).
    pub fn place(&self, sql: &str, params: Option<&BoundParams<'_>>) -> Placement {
        let analysis = {
            let mut cache = self.analyses.lock().unwrap_or_else(|e| e.into_inner());
            match cache.get(sql) {
                Some(a) => a.clone(),
                None => {
                    let a = Arc::new(shard::analyze(sql, &self.rules));
                    if cache.len() >= ANALYSIS_CACHE_CAPACITY {
                        cache.clear();
                    }
                    cache.insert(sql.into(), a.clone());
                    a
                }
            }
        };
        analysis.place(params, &self.rules)
    }

    /// For `SHOW ROUTE <sql>`: where a statement would go and why, as
    /// (target, reason): target is `shard N`, `any shard`, `all shards`
    /// (a merged read), `all primaries` (a write to an unsharded table),
    /// `split: shards 0, 2` or `refused (SQLSTATE)`.
    pub fn explain(&self, sql: &str) -> (String, String) {
        match self.place(sql, None) {
            Placement::Shard { shard, reason } => (format!("shard {shard}"), reason),
            Placement::AnyShard { reason } => ("any shard".to_owned(), reason),
            Placement::AllShards { reason, .. } => ("all shards".to_owned(), reason),
            Placement::AllShardsWrite { reason } => ("all primaries".to_owned(), reason),
            Placement::Split { parts, reason } => (
                format!(
                    "split: shards {}",
                    parts
                        .iter()
                        .map(|(s, _)| s.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                reason,
            ),
            Placement::Refuse { code, message } => (format!("refused ({code})"), message),
        }
    }
}

/// One row of `SHOW SHARDS`, as text, in [`SHARDS_COLUMNS`] order.
pub type Row = Vec<String>;

/// Column names of [`shards_report`].
pub const SHARDS_COLUMNS: &[&str] = &[
    "database",
    "shard",
    "node",
    "role",
    "addr",
    "state",
    "lag_ms",
    "clients",
    "statements",
    "fanouts",
];

/// `SHOW SHARDS`: one row per node of every shard of every sharded
/// database: where it is, whether it serves (the primary: reachable by the
/// monitor; a replica: in read rotation or why not), its lag, the clients
/// attached to it now, and the shard's request counters.
pub fn shards_report<'a>(
    databases: impl IntoIterator<Item = &'a Arc<ShardedDatabase>>,
) -> Vec<Row> {
    let now = Instant::now();
    let mut rows = Vec::new();
    for db in databases {
        for shard in &db.shards {
            let cluster = &shard.cluster;
            for node in cluster.nodes() {
                let state = match (node.role, cluster.availability(node.index, now)) {
                    (Role::Primary, _) if cluster.primary_reachable(now) => "up".to_owned(),
                    (Role::Primary, Availability::Out(r)) => r.as_str().to_owned(),
                    (Role::Primary, Availability::InRotation { .. }) => "up".to_owned(),
                    (Role::Replica, Availability::InRotation { .. }) => "in rotation".to_owned(),
                    (Role::Replica, Availability::Out(r)) => r.as_str().to_owned(),
                };
                let lag = match node.role {
                    Role::Primary => String::new(),
                    Role::Replica => cluster
                        .lag(node.index, now)
                        .map(|l| format!("{:.1}", l.as_secs_f64() * 1000.0))
                        .unwrap_or_default(),
                };
                rows.push(vec![
                    db.database.clone(),
                    shard.index.to_string(),
                    node.name.clone(),
                    match node.role {
                        Role::Primary => "primary".to_owned(),
                        Role::Replica => "replica".to_owned(),
                    },
                    node.addr.to_string(),
                    state,
                    lag,
                    node.outstanding().to_string(),
                    shard.statements().to_string(),
                    shard.fanouts().to_string(),
                ]);
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn one_group_per_shard_and_a_report_row_per_node() {
        let config = Config::from_toml(
            "[databases.app]\nshards = [{ primary = \"127.0.0.1:5001\", replicas = [\"127.0.0.1:5002\"] }, \
             { primary = \"127.0.0.1:5003\" }]\n[users.u]\npassword = \"p\"\n",
            "test",
            [],
        )
        .expect("config");
        let db = ShardedDatabase::new(&config.databases["app"], &config.routing).expect("sharded");
        assert_eq!(db.shards.len(), 2);
        assert_eq!(db.shards[0].cluster.database, "app.shard0");
        assert_eq!(db.shards[0].cluster.nodes().len(), 2);
        db.shards[1].count_statement();
        let rows = shards_report([&db]);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0][..4], ["app", "0", "primary", "primary"]);
        assert_eq!(rows[1][2], "replica1");
        assert_eq!(rows[1][5], "not yet measured");
        assert_eq!(rows[2][4], "127.0.0.1:5003");
        assert_eq!(rows[2][8], "1");
        assert!(rows.iter().all(|r| r.len() == SHARDS_COLUMNS.len()));
        db.shards[0].set_collation("en_US.UTF-8");
        assert_eq!(db.shards[0].bytewise_text(), Some(false));
        db.shards[1].set_collation("C");
        assert_eq!(db.shards[1].bytewise_text(), Some(true));
    }
}
