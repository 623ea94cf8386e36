//! `[general]` settings for running pgsluice as one of several instances and
//! for its logs, and which settings a reload may change.
//!
//! Reload rule: every setting takes effect on reload except the few that
//! shape the process itself ([`RESTART_ONLY`]); for those a reload keeps
//! the running value and reports the setting as needing a restart.

use std::fmt::Write as _;

use super::{Config, ConfigError, ServerAddr, invalid};

/// The most instances whose ids fit in a cancel key (7 bits of the
/// BackendKeyData process id).
pub const MAX_INSTANCES: usize = 128;

/// `general.log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line (with the client/server span fields).
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// `general.shutdown_mode`: what SIGTERM waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// Each client is closed (57P01) at its next transaction boundary.
    Transactions,
    /// Clients go on until they disconnect by themselves (for a rolling
    /// restart beside a new instance on the same port).
    Clients,
}

impl ShutdownMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transactions => "transactions",
            Self::Clients => "clients",
        }
    }
}

/// The parsed operations settings of `[general]`.
pub(super) struct Ops {
    pub so_reuseport: bool,
    pub instance_id: u8,
    pub peers: Vec<ServerAddr>,
    pub shutdown_mode: ShutdownMode,
    pub log_format: LogFormat,
    pub log_level: String,
}

impl Ops {
    pub(super) fn validate(g: &super::raw::RawGeneral) -> Result<Self, ConfigError> {
        let peers = g
            .peers
            .iter()
            .map(|p| ServerAddr::parse("general.peers", p))
            .collect::<Result<Vec<_>, _>>()?;
        if peers.len() > MAX_INSTANCES {
            return Err(invalid(
                "general.peers",
                format!("{} entries; at most {MAX_INSTANCES} instances", peers.len()),
            ));
        }
        let instance_id = match g.instance_id.unwrap_or(0) {
            n if n < MAX_INSTANCES as u64 => n as u8,
            n => {
                return Err(invalid(
                    "general.instance_id",
                    format!("{n} is above the maximum of {}", MAX_INSTANCES - 1),
                ));
            }
        };
        if !peers.is_empty() && usize::from(instance_id) >= peers.len() {
            return Err(invalid(
                "general.instance_id",
                format!(
                    "{instance_id} has no entry in general.peers ({} entries): list every \
                     instance, this one included, in instance_id order",
                    peers.len()
                ),
            ));
        }
        let shutdown_mode = match g.shutdown_mode.as_deref().unwrap_or("transactions") {
            "transactions" => ShutdownMode::Transactions,
            "clients" => ShutdownMode::Clients,
            s => {
                return Err(invalid(
                    "general.shutdown_mode",
                    format!("`{s}` is not one of transactions, clients"),
                ));
            }
        };
        let log_format = match g.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            s => {
                return Err(invalid(
                    "general.log_format",
                    format!("`{s}` is not one of text, json"),
                ));
            }
        };
        let log_level = g.log_level.clone().unwrap_or_else(|| "info".to_owned());
        check_log_level(&log_level).map_err(|e| invalid("general.log_level", e))?;
        Ok(Self {
            so_reuseport: g.so_reuseport.unwrap_or(false),
            instance_id,
            peers,
            shutdown_mode,
            log_format,
            log_level,
        })
    }
}

/// Whether `directives` is a valid log filter (`info`,
/// `pgsluice=debug,warn`, ...); the error says why not.
pub fn check_log_level(directives: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(directives)
        .map(|_| ())
        .map_err(|e| {
            format!(
                "`{directives}` is not a log filter ({e}); e.g. \"info\" or \"pgsluice=debug,info\""
            )
        })
}

pub(super) fn render(out: &mut String, g: &super::General) {
    let _ = writeln!(out, "so_reuseport = {}", g.so_reuseport);
    let _ = writeln!(out, "instance_id = {}", g.instance_id);
    let peers: Vec<String> = g.peers.iter().map(|p| format!("\"{p}\"")).collect();
    let _ = writeln!(out, "peers = [{}]", peers.join(", "));
    let _ = writeln!(out, "shutdown_mode = \"{}\"", g.shutdown_mode.as_str());
    let _ = writeln!(out, "log_format = \"{}\"", g.log_format.as_str());
    let _ = writeln!(out, "log_level = \"{}\"", super::toml_escape(&g.log_level));
}

/// Settings a running process cannot change: a reload keeps their running
/// values and reports them.
pub const RESTART_ONLY: &[&str] = &[
    "general.listen_addr",
    "general.worker_threads",
    "general.so_reuseport",
    "general.instance_id",
    "general.log_format",
    "admin.http_listen_addr",
    "databases.*.shards",
];

impl Config {
    /// The restart-only settings that differ between `self` (running) and
    /// `next`; `next` gets the running values back.
    pub fn keep_restart_only(&self, next: &mut Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        macro_rules! keep {
            ($name:literal, $($field:tt)+) => {
                if self.$($field)+ != next.$($field)+ {
                    changed.push($name);
                    next.$($field)+ = self.$($field)+.clone();
                }
            };
        }
        keep!("general.listen_addr", general.listen_addr);
        keep!("general.worker_threads", general.worker_threads);
        keep!("general.so_reuseport", general.so_reuseport);
        keep!("general.instance_id", general.instance_id);
        keep!("general.log_format", general.log_format);
        keep!("admin.http_listen_addr", admin.http_listen_addr);
        // Sharded databases: shard lists, their monitors and placement are
        // built at startup. A reload keeps them (and a sharded database
        // added or removed waits for a restart); their pool settings apply.
        let mut shards = false;
        for (name, running) in self.databases.iter().filter(|(_, d)| d.sharding.is_some()) {
            match next.databases.get_mut(name) {
                Some(db) if db.sharding == running.sharding => {}
                Some(db) => {
                    shards = true;
                    db.sharding = running.sharding.clone();
                    db.primary = running.primary.clone();
                    db.replicas = running.replicas.clone();
                    db.replica_weights = running.replica_weights.clone();
                }
                None => {
                    shards = true;
                    next.databases.insert(name.clone(), running.clone());
                }
            }
        }
        let added: Vec<String> = next
            .databases
            .iter()
            .filter(|(name, db)| {
                db.sharding.is_some()
                    && self
                        .databases
                        .get(*name)
                        .is_none_or(|d| d.sharding.is_none())
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in added {
            shards = true;
            match self.databases.get(&name) {
                Some(running) => {
                    next.databases.insert(name, running.clone());
                }
                None => {
                    next.databases.remove(&name);
                }
            }
        }
        if shards {
            changed.push("databases.*.shards");
        }
        debug_assert!(changed.iter().all(|c| RESTART_ONLY.contains(c)));
        changed
    }
}
