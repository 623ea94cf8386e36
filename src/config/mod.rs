//! Configuration: a raw TOML layer (plus the `PGSLUICE_` environment overlay)
//! validated once into typed settings. Nothing downstream parses a string or
//! interprets a bare number as time.

mod admin;
mod auth_query;
mod ops;
mod raw;
mod routing;
mod sharding;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use admin::Admin;
pub use auth_query::AuthQuery;
pub use ops::{LogFormat, MAX_INSTANCES, RESTART_ONLY, ShutdownMode, check_log_level};
use raw::RawPool;
pub use raw::{RawConfig, apply_env_overlay};
pub use routing::{DefaultRoute, ReadBalance, Routing};
pub use sharding::{MultiShardInsert, ShardKeyType, ShardNodes, Sharding, UnshardedWrites};

use crate::auth::{HbaRule, Method, Secret};
use crate::protocol::PG_MAX_MESSAGE_LEN;
use crate::tls::{ClientTlsMode, ServerTlsMode, TlsContext, TlsSettings};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{0}")]
    Env(String),
    #[error("invalid setting `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

/// `replica_weights` (at `key`) for `replicas` replicas: one weight each
/// in 1..=1000, or none (all 1).
fn replica_weights(key: String, weights: &[u64], replicas: usize) -> Result<Vec<u32>, ConfigError> {
    match weights.len() {
        0 => Ok(vec![1; replicas]),
        n if n == replicas => weights
            .iter()
            .map(|&w| {
                u32::try_from(w)
                    .ok()
                    .filter(|w| (1..=1000).contains(w))
                    .ok_or_else(|| invalid(key.clone(), format!("{w} is not between 1 and 1000")))
            })
            .collect(),
        n => Err(invalid(
            key,
            format!("{n} weights for {replicas} replicas: give one per replica"),
        )),
    }
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A client keeps one server from its first query until it disconnects.
    Session,
    /// A client holds a server only while a transaction (or an unanswered
    /// request) is open.
    Transaction,
    /// A server is released after every statement; transactions are refused.
    Statement,
}

/// What transaction/statement mode does with a client that uses a feature
/// needing its own server for longer than a transaction (LISTEN, session
/// advisory locks, WITH HOLD cursors, temporary tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionFeatures {
    /// The client keeps its server until the state is gone.
    Pin,
    /// The statement is refused with 0A000.
    Refuse,
}

impl SessionFeatures {
    fn parse(key: &str, s: &str) -> Result<Self, ConfigError> {
        match s {
            "pin" => Ok(Self::Pin),
            "refuse" => Ok(Self::Refuse),
            _ => Err(invalid(key, format!("`{s}` is not one of pin, refuse"))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pin => "pin",
            Self::Refuse => "refuse",
        }
    }
}

impl PoolMode {
    fn parse(key: &str, s: &str) -> Result<Self, ConfigError> {
        match s {
            "session" => Ok(Self::Session),
            "transaction" => Ok(Self::Transaction),
            "statement" => Ok(Self::Statement),
            _ => Err(invalid(
                key,
                format!("`{s}` is not one of session, transaction, statement"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Transaction => "transaction",
            Self::Statement => "statement",
        }
    }
}

/// `general.auth_type`: the method for every client when no access rules
/// are configured. `cert` needs a CA for client certificates; `reject`
/// would refuse everyone, so it is not a valid default.
fn parse_auth_type(s: &str, tls: &TlsSettings) -> Result<Method, ConfigError> {
    let key = "general.auth_type";
    match s {
        "plain" => Ok(Method::Password),
        "cert" if tls.client_ca_file.is_none() || tls.client_mode == ClientTlsMode::Disable => {
            Err(invalid(
                key,
                "`cert` needs TLS client certificates: set tls.client_mode (not disable) and tls.client_ca_file",
            ))
        }
        "cert" => Ok(Method::Cert),
        "reject" => Err(invalid(
            key,
            "`reject` would refuse every client; use access rules ([[hba]]) to reject some",
        )),
        _ => Method::parse(s).ok_or_else(|| {
            invalid(
                key,
                format!("`{s}` is not one of scram-sha-256, md5, password, trust"),
            )
        }),
    }
}

/// A server address; the host is resolved at connect time so DNS names
/// (Kubernetes services) follow their targets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddr {
    pub host: String,
    pub port: u16,
}

impl ServerAddr {
    fn parse(key: &str, s: &str) -> Result<Self, ConfigError> {
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() => (h, p),
            _ => return Err(invalid(key, format!("`{s}` is not host:port"))),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid(key, format!("`{s}`: port must be 1-65535")))?;
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Settings of one server pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub pool_size: usize,
    pub max_pool_size: usize,
    pub min_pool_size: usize,
    /// How long clients must have waited before the pool grows past
    /// `pool_size` (up to `max_pool_size`).
    pub reserve_pool_timeout: Duration,
    pub checkout_timeout: Duration,
    pub server_idle_timeout: Option<Duration>,
    pub server_lifetime: Option<Duration>,
    pub server_connect_timeout: Duration,
    pub server_login_retry: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct General {
    pub listen_addr: std::net::SocketAddr,
    pub pool_mode: PoolMode,
    /// The method for every client when no access rules are configured.
    pub auth_type: Method,
    /// Where the access rules were read from (`None`: `[[hba]]` tables or
    /// no rules).
    pub hba_file: Option<PathBuf>,
    pub max_client_conn: usize,
    pub max_packet_size: usize,
    pub client_login_timeout: Duration,
    pub idle_transaction_timeout: Option<Duration>,
    /// A plain-TCP client idle between requests this long is parked: no
    /// task, its socket watched by the parking lot (`frontend/park.rs`).
    pub park_idle_clients_after: Option<Duration>,
    pub query_timeout: Option<Duration>,
    pub shutdown_timeout: Duration,
    /// Threads running client and server connections; `None` = one per CPU.
    /// The default is 1: see docs/configuration.md for the measurement.
    pub worker_threads: Option<usize>,
    /// Prepared statements pgsluice keeps on each server connection in
    /// transaction/statement mode before evicting the least recently used.
    pub max_prepared_statements: usize,
    /// Transaction/statement mode: pin or refuse clients that use
    /// session-only features.
    pub session_features: SessionFeatures,
    /// Users allowed every admin console command (all in `[users]`).
    pub admin_users: Vec<String>,
    /// Users allowed the admin console's `SHOW` commands (all in `[users]`).
    pub stats_users: Vec<String>,
    /// The `SHOW STATS` averages cover one such period (pgbouncer's
    /// `stats_period`).
    pub stats_period: Duration,
    pub pool: PoolSettings,
    /// Bind the listener with SO_REUSEPORT (a new instance can start
    /// beside this one on the same port).
    pub so_reuseport: bool,
    /// This instance's number, carried in the cancel keys it hands out.
    pub instance_id: u8,
    /// Every instance's address, by instance id (cancel forwarding).
    pub peers: Vec<ServerAddr>,
    /// What SIGTERM waits for.
    pub shutdown_mode: ShutdownMode,
    pub log_format: LogFormat,
    /// Log filter directives (`RUST_LOG` syntax).
    pub log_level: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Database {
    /// Name clients connect to.
    pub name: String,
    /// Name of the database on the servers.
    pub dbname: String,
    pub primary: ServerAddr,
    /// Streaming replicas; reads are routed to them (transaction and
    /// statement mode).
    pub replicas: Vec<ServerAddr>,
    pub pool_mode: PoolMode,
    pub pool: PoolSettings,
    /// The `[users.NAME]` the replica monitor logs in as (only databases
    /// with replicas have a monitor).
    pub monitor_user: Option<String>,
    /// Relative share of reads per replica (same order as `replicas`).
    pub replica_weights: Vec<u32>,
    /// Client connections to this database at once.
    pub max_client_conn: Option<usize>,
    /// A sharded database: its shards and placement settings. `primary`,
    /// `replicas` and `replica_weights` above are then shard 0's.
    pub sharding: Option<Sharding>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    /// Checks clients: a plaintext password (serves every method, and logs
    /// in to PostgreSQL too), a SCRAM secret or an md5 hash.
    pub password: Option<Secret>,
    /// Logs in to PostgreSQL when `password` is a secret and pass-through
    /// is not possible.
    pub server_password: Option<String>,
    /// Client connections this user may hold at once.
    pub max_client_conn: Option<usize>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("password", &self.password.as_ref().map(Secret::kind))
            .field(
                "server_password",
                &self.server_password.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub general: General,
    pub databases: BTreeMap<String, Database>,
    pub users: BTreeMap<String, User>,
    pub routing: Routing,
    pub admin: Admin,
    /// Users not in `users` are looked up on the server (`None`: off).
    pub auth_query: Option<AuthQuery>,
    /// Access rules, first match wins; empty: every client uses
    /// `general.auth_type`.
    pub hba: Vec<HbaRule>,
    pub tls: TlsSettings,
}

impl Config {
    /// Reads `path`, applies the process environment's `PGSLUICE_*__*`
    /// variables and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_at(
            &text,
            &path.display().to_string(),
            path.parent(),
            std::env::vars(),
        )
    }

    /// A config from TOML text; a relative `hba_file` is read from the
    /// current directory.
    pub fn from_toml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::from_toml_at(text, origin, None, env)
    }

    /// As [`Config::from_toml`], with a relative `hba_file` read from `base`
    /// (the config file's directory).
    pub fn from_toml_at(
        text: &str,
        origin: &str,
        base: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: origin.to_owned(),
            message,
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        apply_env_overlay(&mut table, env).map_err(ConfigError::Env)?;
        let raw: RawConfig = table
            .try_into()
            .map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        Self::validate_at(raw, base)
    }

    pub fn validate(raw: RawConfig) -> Result<Self, ConfigError> {
        Self::validate_at(raw, None)
    }

    fn validate_at(raw: RawConfig, base: Option<&Path>) -> Result<Self, ConfigError> {
        let g = &raw.general;
        let tls = tls_settings(&raw.tls, base)?;
        let default_pool = g.pool();
        let ops = ops::Ops::validate(g)?;
        let pool_mode = PoolMode::parse(
            "general.pool_mode",
            g.pool_mode.as_deref().unwrap_or("transaction"),
        )?;
        let general = General {
            listen_addr: {
                let s = g.listen_addr.as_deref().unwrap_or("127.0.0.1:6432");
                s.parse().map_err(|_| {
                    invalid(
                        "general.listen_addr",
                        format!("`{s}` is not an IP:port address"),
                    )
                })?
            },
            pool_mode,
            auth_type: parse_auth_type(g.auth_type.as_deref().unwrap_or("scram-sha-256"), &tls)?,
            hba_file: g.hba_file.as_ref().map(|f| match base {
                Some(dir) if Path::new(f).is_relative() => dir.join(f),
                _ => PathBuf::from(f),
            }),
            max_client_conn: count("general.max_client_conn", g.max_client_conn, 10_000, 1)?,
            max_packet_size: {
                let v = count(
                    "general.max_packet_size",
                    g.max_packet_size,
                    PG_MAX_MESSAGE_LEN as u64,
                    1024,
                )?;
                if v > PG_MAX_MESSAGE_LEN {
                    return Err(invalid(
                        "general.max_packet_size",
                        format!("{v} exceeds PostgreSQL's own limit of {PG_MAX_MESSAGE_LEN} bytes"),
                    ));
                }
                v
            },
            client_login_timeout: duration(
                "general.client_login_timeout",
                g.client_login_timeout.as_deref(),
                "60s",
            )?,
            idle_transaction_timeout: optional_duration(
                "general.idle_transaction_timeout",
                g.idle_transaction_timeout.as_deref(),
            )?,
            park_idle_clients_after: optional_duration(
                "general.park_idle_clients_after",
                Some(g.park_idle_clients_after.as_deref().unwrap_or("5s")),
            )?,
            query_timeout: optional_duration("general.query_timeout", g.query_timeout.as_deref())?,
            shutdown_timeout: duration(
                "general.shutdown_timeout",
                g.shutdown_timeout.as_deref(),
                "30s",
            )?,
            worker_threads: match g.worker_threads.unwrap_or(1) {
                0 => None,
                n if n > 1024 => {
                    return Err(invalid(
                        "general.worker_threads",
                        format!("{n} is above the maximum of 1024 (0 = one per CPU)"),
                    ));
                }
                n => Some(n as usize),
            },
            max_prepared_statements: count(
                "general.max_prepared_statements",
                g.max_prepared_statements,
                500,
                1,
            )?,
            session_features: SessionFeatures::parse(
                "general.session_features",
                g.session_features.as_deref().unwrap_or("pin"),
            )?,
            admin_users: g.admin_users.clone().unwrap_or_default(),
            stats_users: g.stats_users.clone().unwrap_or_default(),
            stats_period: {
                let d = duration("general.stats_period", g.stats_period.as_deref(), "60s")?;
                if d < Duration::from_secs(1) {
                    return Err(invalid(
                        "general.stats_period",
                        format!("`{}` is below the minimum of 1s", fmt_d(d)),
                    ));
                }
                d
            },
            pool: pool_settings("general", &default_pool)?,
            so_reuseport: ops.so_reuseport,
            instance_id: ops.instance_id,
            peers: ops.peers,
            shutdown_mode: ops.shutdown_mode,
            log_format: ops.log_format,
            log_level: ops.log_level,
        };

        for name in raw.databases.keys() {
            if crate::admin::is_console_database(name) {
                return Err(invalid(
                    format!("databases.{name}"),
                    "this name is reserved for the admin console; rename the database (its server-side name can stay: set `dbname`)",
                ));
            }
        }
        if raw.databases.is_empty() {
            return Err(invalid(
                "databases",
                "no database configured; add a [databases.NAME] table with `primary = \"host:port\"`",
            ));
        }
        let mut databases = BTreeMap::new();
        for (name, db) in &raw.databases {
            let key = |field: &str| format!("databases.{name}.{field}");
            let db_pool_mode = match &db.pool_mode {
                Some(m) => PoolMode::parse(&key("pool_mode"), m)?,
                None => pool_mode,
            };
            if let Some(sharding) = Sharding::validate(name, db, db_pool_mode)? {
                databases.insert(
                    name.clone(),
                    sharded_database(name, db, sharding, &raw, &general)?,
                );
                continue;
            }
            let primary = db
                .primary
                .as_deref()
                .ok_or_else(|| invalid(key("primary"), "missing (host:port of the primary)"))?;
            let database = Database {
                name: name.clone(),
                dbname: db.dbname.clone().unwrap_or_else(|| name.clone()),
                primary: ServerAddr::parse(&key("primary"), primary)?,
                replicas: db
                    .replicas
                    .iter()
                    .map(|r| ServerAddr::parse(&key("replicas"), r))
                    .collect::<Result<_, _>>()?,
                pool_mode: db_pool_mode,
                pool: pool_settings(&format!("databases.{name}"), &db.pool().or(&default_pool))?,
                max_client_conn: match db.max_client_conn {
                    None | Some(0) => None,
                    Some(n) => Some(count(&key("max_client_conn"), Some(n), 0, 1)?),
                },
                replica_weights: replica_weights(
                    key("replica_weights"),
                    &db.replica_weights,
                    db.replicas.len(),
                )?,
                monitor_user: monitor_user(db, &raw),
                sharding: None,
            };
            databases.insert(name.clone(), database);
        }

        if raw.users.is_empty() {
            return Err(invalid(
                "users",
                "no user configured; add a [users.NAME] table with `password = \"...\"`",
            ));
        }
        let mut users = BTreeMap::new();
        let hba = hba_rules(&general, &raw.hba)?;
        if hba.iter().any(|r| r.method == Method::Cert)
            && (tls.client_ca_file.is_none() || tls.client_mode == ClientTlsMode::Disable)
        {
            return Err(invalid(
                "tls.client_ca_file",
                "an access rule uses `cert`, which needs tls.client_mode (not disable) and tls.client_ca_file",
            ));
        }
        for (name, u) in &raw.users {
            if hba.is_empty()
                && !matches!(general.auth_type, Method::Trust | Method::Cert)
                && u.password.is_none()
            {
                return Err(invalid(
                    format!("users.{name}.password"),
                    format!(
                        "missing, and general.auth_type = \"{}\" needs it",
                        general.auth_type.as_str()
                    ),
                ));
            }
            let password = u
                .password
                .as_deref()
                .map(Secret::parse)
                .transpose()
                .map_err(|e| invalid(format!("users.{name}.password"), e))?;
            users.insert(
                name.clone(),
                User {
                    name: name.clone(),
                    password,
                    server_password: u.server_password.clone(),
                    max_client_conn: match u.max_client_conn {
                        None | Some(0) => None,
                        Some(n) => Some(count(
                            &format!("users.{name}.max_client_conn"),
                            Some(n),
                            0,
                            1,
                        )?),
                    },
                },
            );
        }
        for db in databases.values() {
            let any_replicas = match &db.sharding {
                Some(s) => s.shards.iter().any(|s| !s.replicas.is_empty()),
                None => !db.replicas.is_empty(),
            };
            if !any_replicas {
                continue;
            }
            let key = format!("databases.{}.monitor_user", db.name);
            let Some(name) = &db.monitor_user else {
                return Err(invalid(
                    key,
                    "missing: a database with replicas needs a user for the replica monitor \
                     (set routing.monitor_user or databases.NAME.monitor_user)",
                ));
            };
            let Some(user) = users.get(name) else {
                return Err(invalid(
                    key,
                    format!("`{name}` is not a configured [users.NAME] entry"),
                ));
            };
            if user.password.is_some() && Self::monitor_password(user).is_none() {
                return Err(invalid(
                    key,
                    format!(
                        "user `{name}` has only a password secret; the replica monitor logs in \
                         by itself and needs users.{name}.server_password (or a plaintext password)"
                    ),
                ));
            }
        }
        for (key, names) in [
            ("general.admin_users", &general.admin_users),
            ("general.stats_users", &general.stats_users),
        ] {
            if let Some(name) = names.iter().find(|n| !users.contains_key(*n)) {
                return Err(invalid(
                    key,
                    format!("`{name}` is not a configured [users.NAME] entry"),
                ));
            }
        }
        let auth_query = AuthQuery::validate(&raw.auth_query)?;
        if let Some(aq) = &auth_query {
            let Some(user) = users.get(&aq.user) else {
                return Err(invalid(
                    "auth_query.user",
                    format!("`{}` is not a configured [users.NAME] entry", aq.user),
                ));
            };
            if user.password.is_some() && Self::monitor_password(user).is_none() {
                return Err(invalid(
                    "auth_query.user",
                    format!(
                        "user `{}` has only a password secret; the lookup logs in by itself and \
                         needs users.{}.server_password (or a plaintext password)",
                        aq.user, aq.user
                    ),
                ));
            }
        }
        Ok(Config {
            general,
            databases,
            users,
            routing: Routing::validate(&raw.routing)?,
            admin: Admin::validate(&raw.admin)?,
            auth_query,
            hba,
            tls,
        })
    }

    /// The effective configuration as TOML, passwords redacted.
    pub fn render(&self) -> String {
        let g = &self.general;
        let mut out = String::new();
        let _ = writeln!(out, "[general]");
        let _ = writeln!(out, "listen_addr = \"{}\"", g.listen_addr);
        let _ = writeln!(out, "pool_mode = \"{}\"", g.pool_mode.as_str());
        let _ = writeln!(out, "auth_type = \"{}\"", g.auth_type.as_str());
        if let Some(f) = &g.hba_file {
            let _ = writeln!(
                out,
                "hba_file = \"{}\"",
                toml_escape(&f.display().to_string())
            );
        }
        let _ = writeln!(out, "max_client_conn = {}", g.max_client_conn);
        let _ = writeln!(out, "max_packet_size = {}", g.max_packet_size);
        let _ = writeln!(
            out,
            "client_login_timeout = \"{}\"",
            fmt_d(g.client_login_timeout)
        );
        let _ = writeln!(
            out,
            "idle_transaction_timeout = \"{}\"",
            fmt_od(g.idle_transaction_timeout)
        );
        let _ = writeln!(
            out,
            "park_idle_clients_after = \"{}\"",
            fmt_od(g.park_idle_clients_after)
        );
        let _ = writeln!(out, "query_timeout = \"{}\"", fmt_od(g.query_timeout));
        let _ = writeln!(out, "shutdown_timeout = \"{}\"", fmt_d(g.shutdown_timeout));
        let _ = writeln!(out, "worker_threads = {}", g.worker_threads.unwrap_or(0));
        let _ = writeln!(
            out,
            "max_prepared_statements = {}",
            g.max_prepared_statements
        );
        let _ = writeln!(
            out,
            "session_features = \"{}\"",
            g.session_features.as_str()
        );
        let _ = writeln!(out, "admin_users = {}", toml_list(&g.admin_users));
        let _ = writeln!(out, "stats_users = {}", toml_list(&g.stats_users));
        let _ = writeln!(out, "stats_period = \"{}\"", fmt_d(g.stats_period));
        ops::render(&mut out, g);
        render_pool(&mut out, &g.pool);
        for db in self.databases.values() {
            let _ = writeln!(out, "\n[databases.{}]", toml_key(&db.name));
            let _ = writeln!(out, "dbname = \"{}\"", db.dbname);
            if let Some(s) = &db.sharding {
                s.render(&mut out);
            } else {
                let _ = writeln!(out, "primary = \"{}\"", db.primary);
                let replicas: Vec<String> =
                    db.replicas.iter().map(|r| format!("\"{r}\"")).collect();
                let _ = writeln!(out, "replicas = [{}]", replicas.join(", "));
            }
            let _ = writeln!(out, "pool_mode = \"{}\"", db.pool_mode.as_str());
            if let Some(u) = &db.monitor_user {
                let _ = writeln!(out, "monitor_user = \"{u}\"");
            }
            if !db.replicas.is_empty() && db.sharding.is_none() {
                let w: Vec<String> = db.replica_weights.iter().map(u32::to_string).collect();
                let _ = writeln!(out, "replica_weights = [{}]", w.join(", "));
            }
            render_pool(&mut out, &db.pool);
        }
        self.routing.render(&mut out);
        self.admin.render(&mut out);
        if let Some(a) = &self.auth_query {
            a.render(&mut out);
        }
        for u in self.users.values() {
            let _ = writeln!(out, "\n[users.{}]", toml_key(&u.name));
            if let Some(p) = &u.password {
                let _ = writeln!(out, "password = \"<redacted>\"  # {}", p.kind());
            }
            if u.server_password.is_some() {
                let _ = writeln!(out, "server_password = \"<redacted>\"");
            }
        }
        render_tls(&mut out, &self.tls);
        if g.hba_file.is_none() {
            for r in &self.hba {
                let (conn, db, user, addr, method) = r.columns();
                let _ = writeln!(out, "\n[[hba]]");
                let _ = writeln!(out, "type = \"{}\"", toml_escape(&conn));
                let _ = writeln!(out, "database = \"{}\"", toml_escape(&db));
                let _ = writeln!(out, "user = \"{}\"", toml_escape(&user));
                let _ = writeln!(out, "address = \"{}\"", toml_escape(&addr));
                let _ = writeln!(out, "method = \"{}\"", toml_escape(&method));
            }
        } else {
            for r in &self.hba {
                let _ = writeln!(out, "# hba: {r}");
            }
        }
        out
    }
}

/// The monitor's user: the database's, else `routing.monitor_user`, else
/// the only configured user.
fn monitor_user(db: &raw::RawDatabase, raw: &RawConfig) -> Option<String> {
    db.monitor_user
        .clone()
        .or_else(|| raw.routing.monitor_user.clone())
        .or_else(|| {
            // With a single user there is nothing to choose.
            (raw.users.len() == 1)
                .then(|| raw.users.keys().next().cloned())
                .flatten()
        })
}

/// A sharded `[databases.NAME]`: shard 0's nodes stand in `primary` and
/// `replicas` (the welcome and auth_query lookups use them).
fn sharded_database(
    name: &str,
    db: &raw::RawDatabase,
    sharding: Sharding,
    raw: &RawConfig,
    general: &General,
) -> Result<Database, ConfigError> {
    let key = |field: &str| format!("databases.{name}.{field}");
    let shard0 = sharding.shards[0].clone();
    Ok(Database {
        name: name.to_owned(),
        dbname: db.dbname.clone().unwrap_or_else(|| name.to_owned()),
        primary: shard0.primary,
        replicas: shard0.replicas,
        replica_weights: shard0.replica_weights,
        pool_mode: match &db.pool_mode {
            Some(m) => PoolMode::parse(&key("pool_mode"), m)?,
            None => general.pool_mode,
        },
        pool: pool_settings(
            &format!("databases.{name}"),
            &db.pool().or(&raw.general.pool()),
        )?,
        max_client_conn: match db.max_client_conn {
            None | Some(0) => None,
            Some(n) => Some(count(&key("max_client_conn"), Some(n), 0, 1)?),
        },
        monitor_user: monitor_user(db, raw),
        sharding: Some(sharding),
    })
}

fn render_tls(out: &mut String, t: &TlsSettings) {
    let _ = writeln!(out, "\n[tls]");
    let _ = writeln!(out, "client_mode = \"{}\"", t.client_mode.as_str());
    let files = [
        ("client_cert_file", &t.client_cert_file),
        ("client_key_file", &t.client_key_file),
        ("client_ca_file", &t.client_ca_file),
        ("server_ca_file", &t.server_ca_file),
        ("server_cert_file", &t.server_cert_file),
        ("server_key_file", &t.server_key_file),
    ];
    let _ = writeln!(out, "server_mode = \"{}\"", t.server_mode.as_str());
    for (k, v) in files {
        if let Some(p) = v {
            let _ = writeln!(out, "{k} = \"{}\"", toml_escape(&p.display().to_string()));
        }
    }
    if !t.cert_map.is_empty() {
        let _ = writeln!(out, "\n[tls.cert_map]");
        for (cn, user) in &t.cert_map {
            let _ = writeln!(out, "{} = \"{}\"", toml_key(cn), toml_escape(user));
        }
    }
}

/// `[tls]`: modes and paths (relative ones from `base`). The files are read
/// here too, so a missing or malformed one stops startup naming its key.
fn tls_settings(raw: &raw::RawTls, base: Option<&Path>) -> Result<TlsSettings, ConfigError> {
    let path = |f: &Option<String>| {
        f.as_ref().map(|f| match base {
            Some(dir) if Path::new(f).is_relative() => dir.join(f),
            _ => PathBuf::from(f),
        })
    };
    let client_mode = match raw.client_mode.as_deref() {
        None => ClientTlsMode::Disable,
        Some(s) => ClientTlsMode::parse(s).ok_or_else(|| {
            invalid(
                "tls.client_mode",
                format!("`{s}` is not one of {}", crate::tls::CLIENT_MODES),
            )
        })?,
    };
    let server_mode = match raw.server_mode.as_deref() {
        // Opportunistic by default, as libpq; without any [tls] table the
        // server is asked for TLS and plaintext is used if it has none.
        None => ServerTlsMode::Prefer,
        Some(s) => ServerTlsMode::parse(s).ok_or_else(|| {
            invalid(
                "tls.server_mode",
                format!("`{s}` is not one of {}", crate::tls::SERVER_MODES),
            )
        })?,
    };
    if raw.server_cert_file.is_some() != raw.server_key_file.is_some() {
        return Err(invalid(
            "tls.server_key_file",
            "set tls.server_cert_file and tls.server_key_file together",
        ));
    }
    for (cn, user) in &raw.cert_map {
        if cn.is_empty() || user.is_empty() {
            return Err(invalid(
                "tls.cert_map",
                "empty certificate name or user name",
            ));
        }
    }
    let settings = TlsSettings {
        client_mode,
        client_cert_file: path(&raw.client_cert_file),
        client_key_file: path(&raw.client_key_file),
        client_ca_file: path(&raw.client_ca_file),
        server_mode,
        server_ca_file: path(&raw.server_ca_file),
        server_cert_file: path(&raw.server_cert_file),
        server_key_file: path(&raw.server_key_file),
        cert_map: raw.cert_map.clone(),
    };
    TlsContext::load(&settings).map_err(|e| invalid(e.key, format!("{}: {}", e.file, e.reason)))?;
    Ok(settings)
}

fn toml_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Access rules from `general.hba_file` or `[[hba]]` tables (not both).
fn hba_rules(general: &General, raw: &[raw::RawHba]) -> Result<Vec<HbaRule>, ConfigError> {
    if let Some(path) = &general.hba_file {
        if !raw.is_empty() {
            return Err(invalid(
                "general.hba_file",
                "set either general.hba_file or [[hba]] tables, not both",
            ));
        }
        let key = "general.hba_file";
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
        let rules = crate::auth::hba::parse(&text)
            .map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
        if rules.is_empty() {
            return Err(invalid(
                key,
                format!(
                    "{} has no rules; every client would be refused",
                    path.display()
                ),
            ));
        }
        return Ok(rules);
    }
    raw.iter()
        .enumerate()
        .map(|(i, r)| {
            let method = r.method.as_deref().ok_or_else(|| {
                invalid(
                    format!("hba[{i}].method"),
                    "missing (scram-sha-256, md5, password, trust, cert or reject)",
                )
            })?;
            HbaRule::from_columns(
                r.conn_type.as_deref().unwrap_or("host"),
                r.database.as_deref().unwrap_or("all"),
                r.user.as_deref().unwrap_or("all"),
                r.address.as_deref().unwrap_or("all"),
                method,
            )
            .map_err(|e| invalid(format!("hba[{i}]"), e))
        })
        .collect()
}

impl Config {
    /// The users' credential for logging in to PostgreSQL from config
    /// alone: `server_password`, else a plaintext password, else an md5
    /// hash (which answers md5 challenges).
    /// The password the replica monitor logs in with: `server_password`,
    /// or a plaintext `password` (a secret cannot log in by itself).
    pub fn monitor_password(user: &User) -> Option<String> {
        match (&user.server_password, &user.password) {
            (Some(p), _) | (None, Some(Secret::Plain(p))) => Some(p.clone()),
            _ => None,
        }
    }

    pub fn server_credential(user: &User) -> Option<crate::auth::ServerCredential> {
        use crate::auth::ServerCredential as C;
        if let Some(p) = &user.server_password {
            return Some(C::Password(p.clone()));
        }
        match &user.password {
            Some(Secret::Plain(p)) => Some(C::Password(p.clone())),
            Some(Secret::Md5(h)) => Some(C::Md5Hash(h.clone())),
            Some(Secret::Scram(_)) | None => None,
        }
    }
}

/// `["a", "b"]`.
fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|i| format!("\"{}\"", toml_escape(i)))
        .collect();
    format!("[{}]", quoted.join(", "))
}

fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        k.to_owned()
    } else {
        format!("\"{}\"", k.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

fn render_pool(out: &mut String, p: &PoolSettings) {
    let _ = writeln!(out, "pool_size = {}", p.pool_size);
    let _ = writeln!(out, "max_pool_size = {}", p.max_pool_size);
    let _ = writeln!(out, "min_pool_size = {}", p.min_pool_size);
    let _ = writeln!(
        out,
        "reserve_pool_timeout = \"{}\"",
        fmt_d(p.reserve_pool_timeout)
    );
    let _ = writeln!(out, "checkout_timeout = \"{}\"", fmt_d(p.checkout_timeout));
    let _ = writeln!(
        out,
        "server_idle_timeout = \"{}\"",
        fmt_od(p.server_idle_timeout)
    );
    let _ = writeln!(out, "server_lifetime = \"{}\"", fmt_od(p.server_lifetime));
    let _ = writeln!(
        out,
        "server_connect_timeout = \"{}\"",
        fmt_d(p.server_connect_timeout)
    );
    let _ = writeln!(
        out,
        "server_login_retry = \"{}\"",
        fmt_d(p.server_login_retry)
    );
}

fn fmt_d(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn fmt_od(d: Option<Duration>) -> String {
    d.map_or_else(|| "0s".to_owned(), fmt_d)
}

fn count(key: &str, v: Option<u64>, default: u64, min: u64) -> Result<usize, ConfigError> {
    let v = v.unwrap_or(default);
    if v < min {
        return Err(invalid(key, format!("{v} is below the minimum of {min}")));
    }
    usize::try_from(v).map_err(|_| invalid(key, format!("{v} is too large")))
}

fn duration(key: &str, v: Option<&str>, default: &str) -> Result<Duration, ConfigError> {
    let s = v.unwrap_or(default);
    humantime::parse_duration(s).map_err(|e| {
        invalid(
            key,
            format!("`{s}` is not a duration ({e}); write e.g. \"30s\", \"500ms\", \"10m\""),
        )
    })
}

/// A duration where `"0s"` (or absence) means "off".
fn optional_duration(key: &str, v: Option<&str>) -> Result<Option<Duration>, ConfigError> {
    let d = duration(key, v, "0s")?;
    Ok((!d.is_zero()).then_some(d))
}

fn pool_settings(prefix: &str, p: &RawPool) -> Result<PoolSettings, ConfigError> {
    let key = |field: &str| format!("{prefix}.{field}");
    let pool_size = count(&key("pool_size"), p.pool_size, 20, 1)?;
    let max_pool_size = count(
        &key("max_pool_size"),
        p.max_pool_size,
        100.max(pool_size as u64),
        1,
    )?;
    if max_pool_size < pool_size {
        return Err(invalid(
            key("max_pool_size"),
            format!("{max_pool_size} is below pool_size ({pool_size})"),
        ));
    }
    let min_pool_size = count(&key("min_pool_size"), p.min_pool_size, 0, 0)?;
    if min_pool_size > pool_size {
        return Err(invalid(
            key("min_pool_size"),
            format!("{min_pool_size} is above pool_size ({pool_size})"),
        ));
    }
    let checkout_timeout = duration(
        &key("checkout_timeout"),
        p.checkout_timeout.as_deref(),
        "30s",
    )?;
    if checkout_timeout.is_zero() {
        return Err(invalid(key("checkout_timeout"), "must be greater than 0s"));
    }
    let server_connect_timeout = duration(
        &key("server_connect_timeout"),
        p.server_connect_timeout.as_deref(),
        "5s",
    )?;
    if server_connect_timeout.is_zero() {
        return Err(invalid(
            key("server_connect_timeout"),
            "must be greater than 0s",
        ));
    }
    Ok(PoolSettings {
        pool_size,
        max_pool_size,
        min_pool_size,
        reserve_pool_timeout: duration(
            &key("reserve_pool_timeout"),
            p.reserve_pool_timeout.as_deref(),
            "100ms",
        )?,
        checkout_timeout,
        server_idle_timeout: optional_duration(
            &key("server_idle_timeout"),
            Some(p.server_idle_timeout.as_deref().unwrap_or("10m")),
        )?,
        server_lifetime: optional_duration(
            &key("server_lifetime"),
            Some(p.server_lifetime.as_deref().unwrap_or("1h")),
        )?,
        server_connect_timeout,
        server_login_retry: duration(
            &key("server_login_retry"),
            p.server_login_retry.as_deref(),
            "5s",
        )?,
    })
}

#[cfg(test)]
mod tests;
