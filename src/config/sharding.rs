//! A sharded database: `[databases.NAME]` with `shards = [...]` instead of
//! `primary`/`replicas`, and the settings that say how statements are
//! placed on the shards (see docs/sharding.md).

use std::fmt::Write as _;

use serde::Deserialize;

use super::raw::RawDatabase;
use super::{ConfigError, PoolMode, ServerAddr, count, invalid};

/// One `{ primary = "h:p", replicas = [...], replica_weights = [...] }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShard {
    pub primary: Option<String>,
    #[serde(default)]
    pub replicas: Vec<String>,
    #[serde(default)]
    pub replica_weights: Vec<u64>,
}

/// The type of the shard key column: decides how a key is hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardKeyType {
    BigInt,
    Integer,
    Text,
    Uuid,
}

impl ShardKeyType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BigInt => "bigint",
            Self::Integer => "integer",
            Self::Text => "text",
            Self::Uuid => "uuid",
        }
    }
}

/// A write to a table listed in `unsharded_tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnshardedWrites {
    /// Run on every shard's primary (one transaction per shard).
    All,
    /// Refused with 0A000.
    Refuse,
}

/// A multi-row INSERT whose rows belong to several shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultiShardInsert {
    /// One INSERT per shard with that shard's rows (not atomic across shards).
    Split,
    /// Refused with 0A000.
    Refuse,
}

/// One shard: a primary and its streaming replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardNodes {
    pub primary: ServerAddr,
    pub replicas: Vec<ServerAddr>,
    pub replica_weights: Vec<u32>,
}

/// How a sharded database places statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sharding {
    /// In order: shard `i` holds the rows of hash partition REMAINDER `i`.
    pub shards: Vec<ShardNodes>,
    /// The shard key column (lower case unless it was quoted).
    pub key_column: String,
    pub key_type: ShardKeyType,
    /// Tables present in full on every shard (lower case, optionally
    /// schema-qualified).
    pub unsharded_tables: Vec<String>,
    pub unsharded_writes: UnshardedWrites,
    pub multi_shard_insert: MultiShardInsert,
    /// Rows a fan-out read may hold in memory before it is refused.
    pub max_fanout_rows: usize,
}

impl Sharding {
    /// Validates the sharding settings of `[databases.NAME]`: `None` for a
    /// database without `shards` (whose other sharding settings must then
    /// be absent too).
    pub(super) fn validate(
        name: &str,
        db: &RawDatabase,
        pool_mode: PoolMode,
    ) -> Result<Option<Self>, ConfigError> {
        let key = |field: &str| format!("databases.{name}.{field}");
        let Some(shards) = &db.shards else {
            let stray = [
                ("shard_key", db.shard_key.is_some()),
                ("shard_key_type", db.shard_key_type.is_some()),
                ("unsharded_tables", db.unsharded_tables.is_some()),
                ("unsharded_writes", db.unsharded_writes.is_some()),
                ("multi_shard_insert", db.multi_shard_insert.is_some()),
                ("max_fanout_rows", db.max_fanout_rows.is_some()),
            ];
            if let Some((field, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(invalid(
                    key(field),
                    "only applies to a sharded database: list its shards in `shards`",
                ));
            }
            return Ok(None);
        };
        for (field, set) in [
            ("primary", db.primary.is_some()),
            ("replicas", !db.replicas.is_empty()),
            ("replica_weights", !db.replica_weights.is_empty()),
        ] {
            if set {
                return Err(invalid(
                    key(field),
                    format!(
                        "a sharded database lists its nodes in `shards` (each with its own \
                         primary, replicas and replica_weights); remove `{field}`"
                    ),
                ));
            }
        }
        if shards.is_empty() {
            return Err(invalid(
                key("shards"),
                "empty: list at least one shard ({ primary = \"host:port\" })",
            ));
        }
        if shards.len() > 1024 {
            return Err(invalid(
                key("shards"),
                format!("{} shards is above the maximum of 1024", shards.len()),
            ));
        }
        if pool_mode == PoolMode::Session {
            return Err(invalid(
                key("pool_mode"),
                "a sharded database needs pool_mode = \"transaction\" or \"statement\" \
                 (a session-mode client would be tied to one shard's server)",
            ));
        }
        let shards = shards
            .iter()
            .enumerate()
            .map(|(i, s)| shard_nodes(&key(&format!("shards[{i}]")), s))
            .collect::<Result<Vec<_>, _>>()?;
        let key_column = match db.shard_key.as_deref().unwrap_or("user_id").trim() {
            "" => return Err(invalid(key("shard_key"), "empty column name")),
            c if c.len() > 2 && c.starts_with('"') && c.ends_with('"') => {
                c[1..c.len() - 1].to_owned()
            }
            c if c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !c.starts_with(|ch: char| ch.is_ascii_digit()) =>
            {
                c.to_ascii_lowercase()
            }
            c => {
                return Err(invalid(
                    key("shard_key"),
                    format!("`{c}` is not a column name (quote it as \"\\\"{c}\\\"\" if it is)"),
                ));
            }
        };
        let key_type = match db.shard_key_type.as_deref().unwrap_or("bigint") {
            "bigint" | "int8" => ShardKeyType::BigInt,
            "integer" | "int" | "int4" => ShardKeyType::Integer,
            "text" | "varchar" => ShardKeyType::Text,
            "uuid" => ShardKeyType::Uuid,
            other => {
                return Err(invalid(
                    key("shard_key_type"),
                    format!("`{other}` is not one of bigint, integer, text, uuid"),
                ));
            }
        };
        let unsharded_tables = db
            .unsharded_tables
            .iter()
            .flatten()
            .map(|t| {
                let t = t.trim();
                if t.is_empty() || t.split('.').count() > 2 || t.split('.').any(str::is_empty) {
                    Err(invalid(
                        key("unsharded_tables"),
                        format!("`{t}` is not a table name (table or schema.table)"),
                    ))
                } else {
                    Ok(t.to_ascii_lowercase())
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let unsharded_writes = match db.unsharded_writes.as_deref().unwrap_or("refuse") {
            "all" => UnshardedWrites::All,
            "refuse" => UnshardedWrites::Refuse,
            other => {
                return Err(invalid(
                    key("unsharded_writes"),
                    format!("`{other}` is not one of all, refuse"),
                ));
            }
        };
        let multi_shard_insert = match db.multi_shard_insert.as_deref().unwrap_or("refuse") {
            "split" => MultiShardInsert::Split,
            "refuse" => MultiShardInsert::Refuse,
            other => {
                return Err(invalid(
                    key("multi_shard_insert"),
                    format!("`{other}` is not one of split, refuse"),
                ));
            }
        };
        Ok(Some(Self {
            shards,
            key_column,
            key_type,
            unsharded_tables,
            unsharded_writes,
            multi_shard_insert,
            max_fanout_rows: count(&key("max_fanout_rows"), db.max_fanout_rows, 100_000, 1)?,
        }))
    }

    pub(super) fn render(&self, out: &mut String) {
        let _ = writeln!(out, "shards = [");
        for s in &self.shards {
            let replicas: Vec<String> = s.replicas.iter().map(|r| format!("\"{r}\"")).collect();
            let weights: Vec<String> = s.replica_weights.iter().map(u32::to_string).collect();
            let _ = writeln!(
                out,
                "  {{ primary = \"{}\", replicas = [{}], replica_weights = [{}] }},",
                s.primary,
                replicas.join(", "),
                weights.join(", ")
            );
        }
        let _ = writeln!(out, "]");
        let _ = writeln!(
            out,
            "shard_key = \"{}\"",
            self.key_column.replace('\\', "\\\\").replace('"', "\\\"")
        );
        let _ = writeln!(out, "shard_key_type = \"{}\"", self.key_type.as_str());
        let tables: Vec<String> = self
            .unsharded_tables
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect();
        let _ = writeln!(out, "unsharded_tables = [{}]", tables.join(", "));
        let _ = writeln!(
            out,
            "unsharded_writes = \"{}\"",
            match self.unsharded_writes {
                UnshardedWrites::All => "all",
                UnshardedWrites::Refuse => "refuse",
            }
        );
        let _ = writeln!(
            out,
            "multi_shard_insert = \"{}\"",
            match self.multi_shard_insert {
                MultiShardInsert::Split => "split",
                MultiShardInsert::Refuse => "refuse",
            }
        );
        let _ = writeln!(out, "max_fanout_rows = {}", self.max_fanout_rows);
    }
}

/// A primary with its replicas and their weights; `prefix` names the table
/// in errors (`databases.app.shards[2]`).
fn shard_nodes(prefix: &str, s: &RawShard) -> Result<ShardNodes, ConfigError> {
    let key = |field: &str| format!("{prefix}.{field}");
    let primary = s
        .primary
        .as_deref()
        .ok_or_else(|| invalid(key("primary"), "missing (host:port of the shard's primary)"))?;
    let replicas = s
        .replicas
        .iter()
        .map(|r| ServerAddr::parse(&key("replicas"), r))
        .collect::<Result<Vec<_>, _>>()?;
    let replica_weights =
        super::replica_weights(key("replica_weights"), &s.replica_weights, replicas.len())?;
    Ok(ShardNodes {
        primary: ServerAddr::parse(&key("primary"), primary)?,
        replicas,
        replica_weights,
    })
}
