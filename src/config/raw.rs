//! The configuration file as written: TOML with every field optional, plus
//! the `PGSLUICE_` environment overlay applied to the TOML table before it is
//! deserialised. Unknown keys are errors, so a typo never silently falls back
//! to a default.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub general: RawGeneral,
    #[serde(default)]
    pub databases: BTreeMap<String, RawDatabase>,
    #[serde(default)]
    pub users: BTreeMap<String, RawUser>,
    #[serde(default)]
    pub routing: super::routing::RawRouting,
    #[serde(default)]
    pub admin: super::admin::RawAdmin,
    #[serde(default)]
    pub auth_query: super::auth_query::RawAuthQuery,
    /// Access rules, first match wins (alternative to `general.hba_file`).
    #[serde(default)]
    pub hba: Vec<RawHba>,
    #[serde(default)]
    pub tls: RawTls,
}

/// `[tls]`: modes and PEM files for both sides, and the certificate map.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub client_mode: Option<String>,
    pub client_cert_file: Option<String>,
    pub client_key_file: Option<String>,
    pub client_ca_file: Option<String>,
    pub server_mode: Option<String>,
    pub server_ca_file: Option<String>,
    pub server_cert_file: Option<String>,
    pub server_key_file: Option<String>,
    /// Certificate CN → user name.
    #[serde(default)]
    pub cert_map: BTreeMap<String, String>,
}

/// One `[[hba]]` table: the five columns of a rule line, in the same syntax.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHba {
    #[serde(rename = "type")]
    pub conn_type: Option<String>,
    pub database: Option<String>,
    pub user: Option<String>,
    pub address: Option<String>,
    pub method: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGeneral {
    pub listen_addr: Option<String>,
    pub pool_mode: Option<String>,
    pub auth_type: Option<String>,
    pub hba_file: Option<String>,
    pub max_client_conn: Option<u64>,
    pub max_packet_size: Option<u64>,
    pub client_login_timeout: Option<String>,
    pub idle_transaction_timeout: Option<String>,
    pub park_idle_clients_after: Option<String>,
    pub query_timeout: Option<String>,
    pub shutdown_timeout: Option<String>,
    pub worker_threads: Option<u64>,
    pub max_prepared_statements: Option<u64>,
    pub session_features: Option<String>,
    /// Users with every admin console command (`pgsluice` database).
    #[serde(default, deserialize_with = "name_list")]
    pub admin_users: Option<Vec<String>>,
    /// Users with the admin console's `SHOW` commands only.
    #[serde(default, deserialize_with = "name_list")]
    pub stats_users: Option<Vec<String>>,
    /// Period over which the admin console's averages are computed.
    pub stats_period: Option<String>,
    pub so_reuseport: Option<bool>,
    pub instance_id: Option<u64>,
    #[serde(default)]
    pub peers: Vec<String>,
    pub shutdown_mode: Option<String>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    // Pool settings for every pool (see `RawPool`). Listed inline rather
    // than flattened: serde cannot deny unknown fields through `flatten`.
    pub pool_size: Option<u64>,
    pub max_pool_size: Option<u64>,
    pub min_pool_size: Option<u64>,
    pub reserve_pool_timeout: Option<String>,
    pub checkout_timeout: Option<String>,
    pub server_idle_timeout: Option<String>,
    pub server_lifetime: Option<String>,
    pub server_connect_timeout: Option<String>,
    pub server_login_retry: Option<String>,
}

/// Pool settings: set in `[general]` for every pool, overridable per database.
#[derive(Debug, Default, Clone)]
pub struct RawPool {
    pub pool_size: Option<u64>,
    pub max_pool_size: Option<u64>,
    pub min_pool_size: Option<u64>,
    pub reserve_pool_timeout: Option<String>,
    pub checkout_timeout: Option<String>,
    pub server_idle_timeout: Option<String>,
    pub server_lifetime: Option<String>,
    pub server_connect_timeout: Option<String>,
    pub server_login_retry: Option<String>,
}

macro_rules! pool_of {
    ($s:expr) => {
        RawPool {
            pool_size: $s.pool_size,
            max_pool_size: $s.max_pool_size,
            min_pool_size: $s.min_pool_size,
            reserve_pool_timeout: $s.reserve_pool_timeout.clone(),
            checkout_timeout: $s.checkout_timeout.clone(),
            server_idle_timeout: $s.server_idle_timeout.clone(),
            server_lifetime: $s.server_lifetime.clone(),
            server_connect_timeout: $s.server_connect_timeout.clone(),
            server_login_retry: $s.server_login_retry.clone(),
        }
    };
}

impl RawGeneral {
    pub fn pool(&self) -> RawPool {
        pool_of!(self)
    }
}

impl RawDatabase {
    pub fn pool(&self) -> RawPool {
        pool_of!(self)
    }
}

impl RawPool {
    /// `self` with unset fields taken from `defaults`.
    pub fn or(self, defaults: &RawPool) -> RawPool {
        RawPool {
            pool_size: self.pool_size.or(defaults.pool_size),
            max_pool_size: self.max_pool_size.or(defaults.max_pool_size),
            min_pool_size: self.min_pool_size.or(defaults.min_pool_size),
            reserve_pool_timeout: self
                .reserve_pool_timeout
                .or(defaults.reserve_pool_timeout.clone()),
            checkout_timeout: self.checkout_timeout.or(defaults.checkout_timeout.clone()),
            server_idle_timeout: self
                .server_idle_timeout
                .or(defaults.server_idle_timeout.clone()),
            server_lifetime: self.server_lifetime.or(defaults.server_lifetime.clone()),
            server_connect_timeout: self
                .server_connect_timeout
                .or(defaults.server_connect_timeout.clone()),
            server_login_retry: self
                .server_login_retry
                .or(defaults.server_login_retry.clone()),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub primary: Option<String>,
    #[serde(default)]
    pub replicas: Vec<String>,
    pub dbname: Option<String>,
    pub pool_mode: Option<String>,
    /// Overrides `routing.monitor_user` for this database.
    pub monitor_user: Option<String>,
    /// Client connections to this database at once (0 = no limit).
    pub max_client_conn: Option<u64>,
    /// Share of reads per replica, in `replicas` order (default all 1).
    #[serde(default)]
    pub replica_weights: Vec<u64>,
    // Sharding (see `sharding.rs`): the shards in order, instead of
    // `primary`/`replicas`.
    pub shards: Option<Vec<super::sharding::RawShard>>,
    pub shard_key: Option<String>,
    pub shard_key_type: Option<String>,
    pub unsharded_tables: Option<Vec<String>>,
    pub unsharded_writes: Option<String>,
    pub multi_shard_insert: Option<String>,
    pub max_fanout_rows: Option<u64>,
    // Pool settings for every pool (see `RawPool`). Listed inline rather
    // than flattened: serde cannot deny unknown fields through `flatten`.
    pub pool_size: Option<u64>,
    pub max_pool_size: Option<u64>,
    pub min_pool_size: Option<u64>,
    pub reserve_pool_timeout: Option<String>,
    pub checkout_timeout: Option<String>,
    pub server_idle_timeout: Option<String>,
    pub server_lifetime: Option<String>,
    pub server_connect_timeout: Option<String>,
    pub server_login_retry: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    #[serde(default, deserialize_with = "string_or_number")]
    pub password: Option<String>,
    #[serde(default, deserialize_with = "string_or_number")]
    pub server_password: Option<String>,
    /// Client connections this user may hold at once (0 = no limit).
    pub max_client_conn: Option<u64>,
}

/// Passwords set through the environment arrive untyped: `12345` is a
/// password, not an integer.
fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        S(String),
        I(i64),
        F(f64),
    }
    Ok(Some(match Either::deserialize(d)? {
        Either::S(s) => s,
        Either::I(i) => i.to_string(),
        Either::F(f) => f.to_string(),
    }))
}

/// A list of names: a TOML array, or one string of comma-separated names
/// (as pgbouncer writes them, and as an environment variable gives them).
fn name_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        One(String),
    }
    let names = match Either::deserialize(d)? {
        Either::List(l) => l,
        Either::One(s) => s.split(',').map(str::to_owned).collect(),
    };
    Ok(Some(
        names
            .into_iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect(),
    ))
}

/// Applies `PGSLUICE_SECTION__KEY[__SUBKEY]=value` variables to `table`.
///
/// Path segments are lower-cased (`PGSLUICE_GENERAL__POOL_SIZE` →
/// `general.pool_size`, `PGSLUICE_DATABASES__APP__PRIMARY` →
/// `databases.app.primary`). A value replacing an existing string stays a
/// string; otherwise it is read as a TOML value (number, bool, array) and
/// falls back to a string.
pub fn apply_env_overlay(
    table: &mut toml::Table,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, String> {
    let mut applied = Vec::new();
    for (name, value) in vars {
        let Some(path) = name.strip_prefix("PGSLUICE_") else {
            continue;
        };
        if !path.contains("__") {
            // PGSLUICE_CONFIG and friends are for the CLI, not the file.
            continue;
        }
        let segments: Vec<String> = path.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!("environment variable {name}: empty path segment"));
        }
        set_path(table, &segments, &value)
            .map_err(|e| format!("environment variable {name}: {e}"))?;
        applied.push(name);
    }
    Ok(applied)
}

fn set_path(table: &mut toml::Table, path: &[String], raw: &str) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty path")?;
    let mut cur = table;
    for seg in parents {
        let entry = cur
            .entry(seg.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{seg}` is not a table in the config file"))?;
    }
    let value = match cur.get(last) {
        Some(toml::Value::String(_)) => toml::Value::String(raw.to_owned()),
        _ => parse_scalar(raw),
    };
    cur.insert(last.clone(), value);
    Ok(())
}

fn parse_scalar(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}
