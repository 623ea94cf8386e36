//! Sharding by a key column (`user_id`): which shard owns the rows a statement touches.
//!
//! Pure: no I/O, no async. The session asks [`place`] (or [`analyze`] once per statement
//! text and [`Analysis::place`] per execution) and gets a [`Placement`]: one shard, any
//! shard, every shard with a [`MergePlan`], an INSERT split per shard, or a refusal with a
//! SQLSTATE and a message that names the reason.
//!
//! Guarantees:
//! - **Placement is PostgreSQL's.** [`shard_of`] is the remainder of PostgreSQL's
//!   `PARTITION BY HASH` row hash ([`hash`]), so shard `r` holds exactly the rows a table
//!   partitioned `PARTITION BY HASH (user_id)` puts in its partition `MODULUS n, REMAINDER r`.
//! - **Never a wrong answer.** A statement is placed on one shard only when every sharded
//!   table it reads or writes is pinned to that shard by a key equality; a read fans out only
//!   when its result is the merge of the per-shard results (every sharded table joined on the
//!   key, and a [`MergePlan`] that merges its columns exactly); anything else is refused with
//!   `0A000` and the reason.
//!
//! See `docs/sharding.md` for what routes where.

mod aggregates;
mod extract;
pub mod hash;
mod key;
mod merge;
mod params;
mod scope;
mod split;
mod values;

#[cfg(test)]
mod tests;

pub use extract::{Analysis, analyze};
pub use key::KeyError;

/// SQLSTATEs of sharding refusals and bad keys.
pub mod codes {
    pub use crate::protocol::sqlstate::{FEATURE_NOT_SUPPORTED, INVALID_PARAMETER_VALUE};
    pub const INVALID_TEXT_REPRESENTATION: &str = "22P02";
    pub const NUMERIC_VALUE_OUT_OF_RANGE: &str = "22003";
    pub const INVALID_BINARY_REPRESENTATION: &str = "22P03";
    pub const PROTOCOL_VIOLATION: &str = "08P01";
}

/// The shard key column's type (config: `"bigint" | "integer" | "text" | "uuid"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    BigInt,
    Integer,
    Text,
    Uuid,
}

/// One shard key value. Integers of both key types are `Int`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyValue {
    Int(i64),
    Text(String),
    Uuid([u8; 16]),
}

/// PostgreSQL's `PARTITION BY HASH` row hash for one key column (seed + combine step).
pub fn partition_hash(ty: KeyType, v: &KeyValue) -> u64 {
    hash::partition_hash(ty, v)
}

/// `partition_hash % shards`: the remainder of the hash partition holding the row.
/// `shards` must be at least 1 (the config guarantees it; 0 is treated as 1).
pub fn shard_of(ty: KeyType, v: &KeyValue, shards: usize) -> usize {
    (partition_hash(ty, v) % shards.max(1) as u64) as usize
}

/// What to do with a write to a table listed in `unsharded_tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnshardedWrites {
    /// Run it on every shard (one transaction each).
    AllShards,
    Refuse,
}

/// What to do with a multi-row INSERT whose rows belong to different shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultiShardInsert {
    /// Send each shard the rows it owns (simple protocol, literal rows only).
    Split,
    Refuse,
}

/// The sharding settings of one database.
#[derive(Debug, Clone)]
pub struct ShardingRules {
    /// Default `"user_id"`: the column's name as PostgreSQL stores it (lower case unless
    /// it was created quoted). SQL names are folded as PostgreSQL folds them (unquoted to
    /// lower case) before they are compared with it.
    pub key_column: String,
    /// The key column's type. A text key must use a deterministic collation (the default):
    /// PostgreSQL hashes nondeterministic collations by sort key, which pgsluice does not.
    pub key_type: KeyType,
    pub shards: usize,
    /// Lower-case, optionally schema-qualified (`"countries"`, `"ref.countries"`). An
    /// unqualified entry matches the table in any schema. System catalogs (`pg_catalog.*`,
    /// `information_schema.*`, unqualified `pg_*`) are always unsharded.
    pub unsharded_tables: Vec<String>,
    pub unsharded_writes: UnshardedWrites,
    pub multi_shard_insert: MultiShardInsert,
}

impl ShardingRules {
    /// `user_id` of `key_type` over `shards` shards, no unsharded tables, writes to
    /// unsharded tables and spanning INSERTs refused.
    pub fn new(key_type: KeyType, shards: usize) -> Self {
        ShardingRules {
            key_column: "user_id".to_string(),
            key_type,
            shards,
            unsharded_tables: Vec::new(),
            unsharded_writes: UnshardedWrites::Refuse,
            multi_shard_insert: MultiShardInsert::Refuse,
        }
    }
}

/// Parameters of a Bind: format code and value per parameter (`None` = NULL), and the
/// parameter type OIDs from the Parse (0 = unspecified).
///
/// `formats` follows the protocol: empty = all text, one entry = for every parameter,
/// otherwise one per parameter.
#[derive(Debug, Clone, Default)]
pub struct BoundParams<'a> {
    pub formats: Vec<i16>,
    pub values: Vec<Option<&'a [u8]>>,
    pub types: Vec<u32>,
}

/// Where a statement runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// One shard owns every row the statement touches. `reason` is human readable
    /// ("user_id = 42", "hint shard=2", "user_id IN (...) all on shard 1").
    Shard { shard: usize, reason: String },
    /// Touches no sharded table (SELECT 1, SET, SHOW, unsharded-table read): any shard.
    AnyShard { reason: String },
    /// A key-less read: run on every shard and merge with `plan`.
    /// `per_shard_sql`: the text to send each shard when it differs from the client's
    /// (LIMIT n OFFSET m becomes LIMIT n+m without OFFSET); None = send as is.
    AllShards {
        plan: MergePlan,
        per_shard_sql: Option<String>,
        reason: String,
    },
    /// A write to an unsharded (replicated) table with unsharded_writes = AllShards.
    AllShardsWrite { reason: String },
    /// A multi-row INSERT (simple protocol, literals) split per shard: (shard, SQL text),
    /// in shard order.
    Split {
        parts: Vec<(usize, String)>,
        reason: String,
    },
    /// Cannot be placed or merged correctly: SQLSTATE (0A000 unless another fits) and a
    /// message naming the reason.
    Refuse { code: &'static str, message: String },
}

impl Placement {
    pub(crate) fn refuse(message: impl Into<String>) -> Self {
        Placement::Refuse {
            code: codes::FEATURE_NOT_SUPPORTED,
            message: message.into(),
        }
    }
}

/// Places one statement (simple-protocol text, or Parse text + Bind params).
///
/// A leading `/* pgsluice: shard_key=… */` or `/* pgsluice: shard=… */` hint decides
/// before anything else. Costs a sqlparser parse (2–40 µs): callers cache [`analyze`]'s
/// result per statement text and call [`Analysis::place`] per execution.
pub fn place(sql: &str, params: Option<&BoundParams<'_>>, rules: &ShardingRules) -> Placement {
    analyze(sql, rules).place(params, rules)
}

/// A leading comment hint: `/* pgsluice: shard_key=42 */` or `/* pgsluice: shard=2 */`.
///
/// Same syntax as the routing hints (`/* pgsluice: primary */`): a block comment before the
/// first token, `pgsluice:` then the setting, case-insensitive, any whitespace; other
/// comments may come first. The key is returned as written (quotes around it removed) and
/// is parsed against the key type by the caller ([`KeyType::parse_text`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint {
    Key(String),
    Shard(usize),
}

pub fn parse_hint(sql: &str) -> Option<Hint> {
    crate::router::lexer::leading_pgsluice_comment(sql, hint_in_comment)
}

/// `shard_key = 42`, `shard_key='abc'`, `shard=2` (after `pgsluice:`).
fn hint_in_comment(value: &str) -> Option<Hint> {
    let (name, v) = value.split_once('=')?;
    let name = name.trim();
    let v = v.trim();
    if name.eq_ignore_ascii_case("shard_key") {
        let v = v
            .strip_prefix('\'')
            .and_then(|v| v.strip_suffix('\''))
            .map_or(v.to_string(), |inner| inner.replace("''", "'"));
        Some(Hint::Key(v))
    } else if name.eq_ignore_ascii_case("shard") {
        v.parse().ok().map(Hint::Shard)
    } else {
        None
    }
}

/// How to merge the result sets of a fan-out read (per output column, by position).
#[derive(Debug, Clone, PartialEq)]
pub struct MergePlan {
    /// Empty = concatenate in shard order.
    pub order_by: Vec<SortKey>,
    pub limit: Option<u64>,
    pub offset: Option<u64>,
    /// Some when the query aggregates: one entry per output column. Rows with equal
    /// `GroupKey` columns (all of them, NULLs equal) are merged into one; without any
    /// `GroupKey` column every shard returns one row and they merge into one. `Count` and
    /// `Sum` add (NULL counts as nothing; all NULL stays NULL), `Min`/`Max` compare
    /// ignoring NULLs.
    pub columns: Option<Vec<MergeColumn>>,
}

/// One ORDER BY item, as an output column (0-based).
#[derive(Debug, Clone, PartialEq)]
pub struct SortKey {
    pub column: usize,
    pub descending: bool,
    pub nulls_first: bool,
}

/// How one output column of an aggregating fan-out read merges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MergeColumn {
    GroupKey,
    Count,
    Sum,
    Min,
    Max,
}
// ORDER BY comparison of values is the executor's job, by the RowDescription type OID:
// integers/numeric/float/bool/date/timestamp compare by value; text/varchar only when the
// column's collation is known to be "C" (else the executor refuses with 0A000, never guesses).
