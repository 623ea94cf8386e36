//! Which function calls force a statement onto the primary.
//!
//! No SQL parser can know that `nextval()`, `pg_advisory_lock()` or a user's PL/pgSQL
//! function writes. PostgreSQL's own answer is volatility: a function that is not volatile
//! (`provolatile` `i` or `s`) cannot modify the database. So a call of a volatile function
//! goes to the primary unless an allow-list says it is volatile but read-only (`random()`,
//! `clock_timestamp()`, …). Before the pooler has read `pg_proc`, [`FunctionCatalog::builtin`]
//! fails closed: only a compact list of well-known read-only functions counts as a read.
//!
//! Names are compared on the unqualified name. An unquoted name is folded to lower case (as
//! PostgreSQL does); a quoted name keeps its case, except that the volatile and always-write
//! lists are checked case-insensitively, because `pg_proc` is read through `lower(proname)`
//! and erring towards the primary is the safe side.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Reason;

/// Functions that must run on the primary.
#[derive(Debug, Clone)]
pub struct FunctionCatalog {
    /// What `pg_proc` said; `None` before it has been read.
    known: Option<Known>,
    /// Volatile functions that are nonetheless read-only.
    allow: HashSet<String>,
    generation: u64,
}

/// A function list read from `pg_proc` (lower-cased names).
#[derive(Debug, Clone)]
enum Known {
    /// These are volatile; every other name is read-only.
    Volatile(HashSet<String>),
    /// Only these are read-only (every overload immutable or stable); any
    /// other name — volatile, or created since the list was read — writes.
    ReadOnly(HashSet<String>),
}

/// Source of [`FunctionCatalog::generation`]: every catalog instance gets a fresh number, so a
/// cache entry computed with an older catalog is never served after a reload.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

impl FunctionCatalog {
    /// Volatile functions that are read-only and safe on a hot-standby replica: the default
    /// allow-list for [`FunctionCatalog::from_catalog`].
    pub const DEFAULT_ALLOW: &[&str] = &[
        "bernoulli",
        "clock_timestamp",
        "current_query",
        "gen_random_bytes",
        "gen_random_uuid",
        "now",
        "pg_blocking_pids",
        "pg_current_snapshot",
        "pg_database_size",
        "pg_indexes_size",
        "pg_is_in_recovery",
        "pg_jit_available",
        "pg_last_wal_receive_lsn",
        "pg_last_wal_replay_lsn",
        "pg_last_xact_replay_timestamp",
        "pg_lock_status",
        "pg_notification_queue_usage",
        "pg_relation_size",
        "pg_sleep",
        "pg_sleep_for",
        "pg_sleep_until",
        "pg_table_size",
        "pg_tablespace_size",
        "pg_total_relation_size",
        "random",
        "random_normal",
        "setseed",
        "statement_timestamp",
        "system",
        "timeofday",
        "transaction_timestamp",
        "txid_current_snapshot",
        "uuid_generate_v1",
        "uuid_generate_v1mc",
        "uuid_generate_v4",
    ];

    /// Before `pg_proc` has been loaded: a call of any function not on a built-in list of
    /// well-known read-only functions counts as a write.
    pub fn builtin() -> Self {
        FunctionCatalog {
            known: None,
            allow: HashSet::new(),
            generation: next_generation(),
        }
    }

    /// From `SELECT DISTINCT lower(proname) FROM pg_proc WHERE provolatile = 'v'`: a call of
    /// any of these names is a write unless it is on `allow`; other names are read-only.
    /// The built-in always-write functions (`nextval`, advisory locks, …) stay writes.
    pub fn from_catalog(volatile: impl IntoIterator<Item = String>, allow: &[String]) -> Self {
        FunctionCatalog {
            known: Some(Known::Volatile(
                volatile.into_iter().map(|n| n.to_lowercase()).collect(),
            )),
            allow: allow.iter().map(|n| n.to_lowercase()).collect(),
            generation: next_generation(),
        }
    }

    /// From `SELECT lower(proname) FROM pg_proc GROUP BY 1 HAVING
    /// bool_and(provolatile <> 'v')`: only calls of these names (or of `allow`)
    /// are read-only. Fails closed for functions created after the list was
    /// read, which is what the pooler uses.
    pub fn from_read_only(read_only: impl IntoIterator<Item = String>, allow: &[String]) -> Self {
        FunctionCatalog {
            known: Some(Known::ReadOnly(
                read_only.into_iter().map(|n| n.to_lowercase()).collect(),
            )),
            allow: allow.iter().map(|n| n.to_lowercase()).collect(),
            generation: next_generation(),
        }
    }

    /// Distinct for every catalog instance; a cache keyed on it is invalidated by a reload.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Why a call of `name` (already normalised: lower-cased unless it was quoted) sends the
    /// statement to the primary, or `None` when it is read-only.
    pub(crate) fn effect(&self, name: &str) -> Option<Reason> {
        let mut buf = [0u8; NAME_BUF];
        let lower = ascii_lower(name, &mut buf);
        if ALWAYS_WRITE.binary_search(&lower).is_ok() {
            return Some(Reason::WritingFunction);
        }
        let writes = match &self.known {
            None => BUILTIN_READ_ONLY.binary_search(&name).is_err(),
            Some(Known::Volatile(volatile)) => {
                volatile.contains(lower) && !self.allow.contains(name)
            }
            Some(Known::ReadOnly(read_only)) => {
                !read_only.contains(lower) && !self.allow.contains(name)
            }
        };
        writes.then_some(Reason::VolatileFunction)
    }
}

fn next_generation() -> u64 {
    NEXT_GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// PostgreSQL truncates identifiers to 63 bytes; names are never longer than this.
pub(crate) const NAME_BUF: usize = 64;

/// `name` lower-cased (ASCII only) into `buf`; a name too long for `buf` is returned as is.
fn ascii_lower<'a>(name: &'a str, buf: &'a mut [u8; NAME_BUF]) -> &'a str {
    if name.len() > NAME_BUF || !name.bytes().any(|c| c.is_ascii_uppercase()) {
        return name;
    }
    let out = &mut buf[..name.len()];
    out.copy_from_slice(name.as_bytes());
    out.make_ascii_lowercase();
    std::str::from_utf8(out).unwrap_or(name)
}

/// Functions that write or must see the primary's session state, whatever `pg_proc` says
/// (several are merely stable there, e.g. `txid_current`). Sorted for binary search.
const ALWAYS_WRITE: &[&str] = &[
    "currval",
    "lastval",
    "lo_close",
    "lo_creat",
    "lo_create",
    "lo_export",
    "lo_from_bytea",
    "lo_import",
    "lo_lseek",
    "lo_lseek64",
    "lo_open",
    "lo_put",
    "lo_truncate",
    "lo_truncate64",
    "lo_unlink",
    "lowrite",
    "nextval",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_all",
    "pg_advisory_unlock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_cancel_backend",
    "pg_copy_logical_replication_slot",
    "pg_copy_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_create_physical_replication_slot",
    "pg_create_restore_point",
    "pg_current_xact_id",
    "pg_drop_replication_slot",
    "pg_export_snapshot",
    "pg_import_system_collations",
    "pg_log_backend_memory_contexts",
    "pg_logical_emit_message",
    "pg_logical_slot_get_binary_changes",
    "pg_logical_slot_get_changes",
    "pg_notify",
    "pg_reload_conf",
    "pg_replication_origin_advance",
    "pg_replication_origin_create",
    "pg_replication_origin_drop",
    "pg_replication_origin_session_reset",
    "pg_replication_origin_session_setup",
    "pg_replication_origin_xact_reset",
    "pg_replication_origin_xact_setup",
    "pg_replication_slot_advance",
    "pg_rotate_logfile",
    "pg_start_backup",
    "pg_stat_reset",
    "pg_stat_reset_replication_slot",
    "pg_stat_reset_shared",
    "pg_stat_reset_single_function_counters",
    "pg_stat_reset_single_table_counters",
    "pg_stat_reset_slru",
    "pg_stat_reset_subscription_stats",
    "pg_stop_backup",
    "pg_switch_wal",
    "pg_switch_xlog",
    "pg_terminate_backend",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "set_config",
    "setval",
    "txid_current",
];

/// Well-known read-only functions for [`FunctionCatalog::builtin`], plus unreserved words
/// that precede `(` as syntax (`filter`, `over`, `by`, `cube`, …). Sorted for binary search.
const BUILTIN_READ_ONLY: &[&str] = &[
    "abs",
    "acos",
    "age",
    "array_agg",
    "array_append",
    "array_cat",
    "array_dims",
    "array_length",
    "array_lower",
    "array_ndims",
    "array_position",
    "array_positions",
    "array_prepend",
    "array_remove",
    "array_replace",
    "array_to_json",
    "array_to_string",
    "array_upper",
    "ascii",
    "asin",
    "atan",
    "atan2",
    "avg",
    "bernoulli",
    "bit_and",
    "bit_length",
    "bit_or",
    "bool_and",
    "bool_or",
    "btrim",
    "by",
    "cardinality",
    "cbrt",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "chr",
    "clock_timestamp",
    "col_description",
    "concat",
    "concat_ws",
    "convert_from",
    "convert_to",
    "corr",
    "cos",
    "count",
    "covar_pop",
    "covar_samp",
    "cube",
    "cume_dist",
    "current_database",
    "current_query",
    "current_schema",
    "current_schemas",
    "current_setting",
    "date_bin",
    "date_part",
    "date_trunc",
    "decode",
    "degrees",
    "dense_rank",
    "div",
    "encode",
    "escape",
    "every",
    "exp",
    "factorial",
    "filter",
    "first_value",
    "floor",
    "format",
    "format_type",
    "gcd",
    "gen_random_uuid",
    "generate_series",
    "generate_subscripts",
    "has_column_privilege",
    "has_database_privilege",
    "has_function_privilege",
    "has_schema_privilege",
    "has_sequence_privilege",
    "has_table_privilege",
    "host",
    "inet_client_addr",
    "inet_client_port",
    "inet_server_addr",
    "inet_server_port",
    "initcap",
    "isfinite",
    "json_agg",
    "json_array_elements",
    "json_array_elements_text",
    "json_array_length",
    "json_build_array",
    "json_build_object",
    "json_each",
    "json_each_text",
    "json_extract_path",
    "json_extract_path_text",
    "json_object_agg",
    "json_object_keys",
    "json_populate_record",
    "json_populate_recordset",
    "json_strip_nulls",
    "json_to_record",
    "json_to_recordset",
    "json_typeof",
    "jsonb_agg",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "jsonb_array_length",
    "jsonb_build_array",
    "jsonb_build_object",
    "jsonb_each",
    "jsonb_each_text",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "jsonb_insert",
    "jsonb_object_agg",
    "jsonb_object_keys",
    "jsonb_path_exists",
    "jsonb_path_match",
    "jsonb_path_query",
    "jsonb_path_query_array",
    "jsonb_path_query_first",
    "jsonb_populate_record",
    "jsonb_populate_recordset",
    "jsonb_pretty",
    "jsonb_set",
    "jsonb_set_lax",
    "jsonb_strip_nulls",
    "jsonb_to_record",
    "jsonb_to_recordset",
    "jsonb_typeof",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "lag",
    "last_value",
    "lcm",
    "lead",
    "left",
    "length",
    "ln",
    "log",
    "log10",
    "lower",
    "lpad",
    "ltrim",
    "make_date",
    "make_interval",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "masklen",
    "max",
    "md5",
    "min",
    "mod",
    "mode",
    "netmask",
    "network",
    "now",
    "nth_value",
    "ntile",
    "num_nonnulls",
    "num_nulls",
    "obj_description",
    "octet_length",
    "over",
    "percent_rank",
    "percentile_cont",
    "percentile_disc",
    "pg_backend_pid",
    "pg_column_size",
    "pg_current_snapshot",
    "pg_database_size",
    "pg_get_constraintdef",
    "pg_get_expr",
    "pg_get_functiondef",
    "pg_get_indexdef",
    "pg_get_userbyid",
    "pg_get_viewdef",
    "pg_has_role",
    "pg_indexes_size",
    "pg_is_in_recovery",
    "pg_last_wal_receive_lsn",
    "pg_last_wal_replay_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_postmaster_start_time",
    "pg_relation_size",
    "pg_size_pretty",
    "pg_sleep",
    "pg_table_is_visible",
    "pg_table_size",
    "pg_total_relation_size",
    "pg_typeof",
    "phraseto_tsquery",
    "pi",
    "plainto_tsquery",
    "position",
    "power",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "radians",
    "random",
    "rank",
    "regexp_count",
    "regexp_instr",
    "regexp_like",
    "regexp_match",
    "regexp_matches",
    "regexp_replace",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "regexp_substr",
    "repeat",
    "repeatable",
    "replace",
    "reverse",
    "right",
    "rollup",
    "round",
    "row_number",
    "row_to_json",
    "rpad",
    "rtrim",
    "sets",
    "setweight",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "sign",
    "sin",
    "split_part",
    "sqrt",
    "starts_with",
    "statement_timestamp",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "string_agg",
    "string_to_array",
    "string_to_table",
    "strpos",
    "substr",
    "sum",
    "system",
    "tan",
    "timeofday",
    "to_ascii",
    "to_char",
    "to_date",
    "to_hex",
    "to_json",
    "to_jsonb",
    "to_number",
    "to_regclass",
    "to_timestamp",
    "to_tsquery",
    "to_tsvector",
    "transaction_timestamp",
    "translate",
    "trim_array",
    "trim_scale",
    "trunc",
    "ts_headline",
    "ts_rank",
    "ts_rank_cd",
    "txid_current_snapshot",
    "unistr",
    "unnest",
    "upper",
    "var_pop",
    "var_samp",
    "variance",
    "version",
    "websearch_to_tsquery",
    "width_bucket",
    "xmlagg",
    "zone",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_sorted_for_binary_search() {
        for list in [
            ALWAYS_WRITE,
            BUILTIN_READ_ONLY,
            FunctionCatalog::DEFAULT_ALLOW,
        ] {
            assert!(list.windows(2).all(|w| w[0] < w[1]), "{list:?}");
        }
    }

    #[test]
    fn builtin_fails_closed() {
        let c = FunctionCatalog::builtin();
        assert_eq!(c.effect("count"), None);
        assert_eq!(c.effect("now"), None);
        assert_eq!(c.effect("nextval"), Some(Reason::WritingFunction));
        assert_eq!(c.effect("NEXTVAL"), Some(Reason::WritingFunction));
        assert_eq!(c.effect("my_func"), Some(Reason::VolatileFunction));
        // A quoted upper-case name is a different function from now().
        assert_eq!(c.effect("NOW"), Some(Reason::VolatileFunction));
    }

    #[test]
    fn catalog_volatile_minus_allow_list() {
        let allow: Vec<String> = FunctionCatalog::DEFAULT_ALLOW
            .iter()
            .map(|s| s.to_string())
            .collect();
        let c = FunctionCatalog::from_catalog(
            ["random", "my_writer", "nextval"].map(String::from),
            &allow,
        );
        assert_eq!(c.effect("random"), None);
        assert_eq!(c.effect("my_writer"), Some(Reason::VolatileFunction));
        assert_eq!(c.effect("My_Writer"), Some(Reason::VolatileFunction));
        assert_eq!(c.effect("lower"), None);
        assert_eq!(c.effect("setval"), Some(Reason::WritingFunction));
        assert_eq!(c.effect("txid_current"), Some(Reason::WritingFunction));
    }

    #[test]
    fn generations_differ() {
        let a = FunctionCatalog::builtin();
        let b = FunctionCatalog::builtin();
        assert_ne!(a.generation(), b.generation());
        assert_eq!(a.clone().generation(), a.generation());
    }
}
