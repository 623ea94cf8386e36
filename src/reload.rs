//! Hot reload (SIGHUP, and the admin console's `RELOAD`): the config file the
//! process was started with is read again — with its `hba_file` and TLS
//! files — and validated completely before anything changes. An invalid
//! file changes nothing and the error names the file and the setting.
//!
//! A valid one is swapped in without dropping a client:
//! - new logins see the new databases, users, access rules and TLS files;
//!   a removed database or user is refused like any unknown one, while its
//!   clients already logged in carry on (as pgbouncer does) until they
//!   leave;
//! - pools change their settings in place; connections to an address,
//!   database or credential that changed are closed as they become idle and
//!   never handed out again ([`crate::pool::Pools::reconfigure`]);
//! - a database whose primary, replicas, weights, monitor login or
//!   `[routing]` changed gets a new replication group (with its monitor);
//!   every session moves to it at its next request boundary — never inside
//!   a transaction — and the old group's monitor stops;
//! - settings that shape the process ([`RESTART_ONLY`]) keep their running
//!   values and are reported as needing a restart.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::backend::auth_query::AuthLookup;
use crate::cluster::{Cluster, MonitorLogin, spawn_monitor};
use crate::config::{Config, ConfigError, RESTART_ONLY};
use crate::proxy::{Clusters, Shared};
use crate::tls::{TlsContext, TlsFileError};

/// Where the config came from, and how reloads went (for `/metrics`).
pub struct ReloadState {
    path: OnceLock<PathBuf>,
    /// One reload at a time.
    lock: Mutex<()>,
    successes: AtomicU64,
    failures: AtomicU64,
    /// Unix time in milliseconds of the last successful load (startup
    /// counts).
    last_success_ms: AtomicU64,
}

impl Default for ReloadState {
    fn default() -> Self {
        Self::new()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ReloadState {
    pub fn new() -> Self {
        Self {
            path: OnceLock::new(),
            lock: Mutex::new(()),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_success_ms: AtomicU64::new(now_ms()),
        }
    }

    /// The file [`Shared::reload`] reads (set once, by `main`, or a test).
    pub fn set_config_file(&self, path: PathBuf) {
        let _ = self.path.set(path);
    }

    pub fn config_file(&self) -> Option<&Path> {
        self.path.get().map(PathBuf::as_path)
    }

    pub fn successes(&self) -> u64 {
        self.successes.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// When the configuration was last loaded successfully (startup or
    /// reload), in seconds since the Unix epoch.
    pub fn last_success_seconds(&self) -> f64 {
        self.last_success_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

/// What a successful reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// One entry per changed setting or table, e.g. `databases.app.replicas
    /// = [...] (was [...])`, `users.bob removed`.
    pub changes: Vec<String>,
    /// Settings that changed in the file but need a restart; their running
    /// values were kept.
    pub needs_restart: Vec<&'static str>,
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changes.is_empty() {
            write!(f, "no changes")?;
        } else {
            write!(f, "{}", self.changes.join("; "))?;
        }
        if !self.needs_restart.is_empty() {
            write!(
                f,
                "; needs a restart (running value kept): {}",
                self.needs_restart.join(", ")
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no configuration file to reload (this pgsluice was not started from one)")]
    NoConfigFile,
    /// The file cannot be read, parsed or validated.
    #[error("{}; the running configuration is unchanged", describe_config_error(.file, .error))]
    Config { file: String, error: ConfigError },
    /// A TLS file changed between validation and use.
    #[error("{0}; the running configuration is unchanged")]
    Tls(TlsFileError),
}

fn describe_config_error(file: &str, error: &ConfigError) -> String {
    match error {
        // These name the file already.
        ConfigError::Read { .. } | ConfigError::Parse { .. } => error.to_string(),
        _ => format!("config file {file}: {error}"),
    }
}

impl ReloadError {
    /// The setting the error is about, when it is about one.
    pub fn setting(&self) -> Option<&str> {
        match self {
            Self::Config {
                error: ConfigError::Invalid { key, .. },
                ..
            } => Some(key),
            Self::Tls(e) => Some(e.key),
            _ => None,
        }
    }
}

impl Shared {
    /// Re-reads the config file this process was started with (plus
    /// `hba_file` and the TLS files), validates it fully, and applies it;
    /// on any error the running configuration stays as it was and the
    /// error names the file and the setting. Counted in
    /// `pgsluice_config_reloads_total{outcome}`.
    pub fn reload(self: &Arc<Self>) -> Result<ReloadReport, ReloadError> {
        let result = match self.reloads.config_file() {
            None => Err(ReloadError::NoConfigFile),
            Some(path) => Config::load(path)
                .map_err(|error| ReloadError::Config {
                    file: path.display().to_string(),
                    error,
                })
                .and_then(|config| self.apply_validated(config)),
        };
        self.count(result)
    }

    /// Applies an already validated configuration, as [`Shared::reload`]
    /// does with the file's.
    pub fn apply_config(self: &Arc<Self>, config: Config) -> Result<ReloadReport, ReloadError> {
        let result = self.apply_validated(config);
        self.count(result)
    }

    fn count(
        &self,
        result: Result<ReloadReport, ReloadError>,
    ) -> Result<ReloadReport, ReloadError> {
        match &result {
            Ok(report) => {
                self.reloads.successes.fetch_add(1, Ordering::Relaxed);
                self.reloads
                    .last_success_ms
                    .store(now_ms(), Ordering::Relaxed);
                if report.needs_restart.is_empty() {
                    tracing::info!(changes = %report, "configuration reloaded");
                } else {
                    tracing::warn!(changes = %report, needs_restart = ?report.needs_restart, "configuration reloaded; some changed settings need a restart and keep their running values");
                }
            }
            Err(e) => {
                self.reloads.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, setting = e.setting().unwrap_or(""), "configuration reload failed; keeping the running configuration");
            }
        }
        result
    }

    fn apply_validated(self: &Arc<Self>, mut next: Config) -> Result<ReloadReport, ReloadError> {
        let _one_at_a_time = self.reloads.lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.config.load_full();
        let needs_restart = old.keep_restart_only(&mut next);
        debug_assert!(needs_restart.iter().all(|s| RESTART_ONLY.contains(s)));
        // Read the TLS files again now (validation read them too, but a
        // file may have changed since; what is used is what is checked).
        let tls = TlsContext::load(&next.tls).map_err(ReloadError::Tls)?;
        let mut changes = describe_changes(&old, &next);
        let next = Arc::new(next);

        self.tls.store(Arc::new(tls));
        if auth_lookup_changed(&old, &next) {
            self.auth_lookup
                .store(AuthLookup::new(&next, self.tls.clone()).map(Arc::new));
        }
        let current = self.clusters.load_full();
        let Rebuilt {
            clusters,
            started,
            retired,
        } = rebuild_clusters(&old, &next, &current);
        self.clusters.store(Arc::new(clusters));
        self.config.store(next.clone());
        let pools = self.pools.reconfigure(next.clone());
        for (name, cluster) in &started {
            start_monitor(self, name, cluster, &next);
        }
        for cluster in &retired {
            cluster.retire();
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        if old.general.log_level != next.general.log_level {
            if let Some(log) = self.log.get() {
                if let Err(e) = log.set_level(&next.general.log_level) {
                    tracing::warn!(error = %e, "general.log_level not applied");
                }
            }
        }
        for label in &pools.replaced {
            changes.push(format!(
                "pool {label}: server connections replaced as they become idle"
            ));
        }
        Ok(ReloadReport {
            changes,
            needs_restart,
        })
    }
}

/// Whether the `[auth_query]` lookup must be rebuilt.
fn auth_lookup_changed(old: &Config, next: &Config) -> bool {
    if old.auth_query != next.auth_query {
        return true;
    }
    let password = |c: &Config| {
        c.auth_query
            .as_ref()
            .and_then(|a| c.users.get(&a.user))
            .and_then(Config::monitor_password)
    };
    password(old) != password(next)
}

/// What a database's replication group is built from.
fn cluster_inputs_equal(name: &str, old: &Config, next: &Config) -> bool {
    let (Some(a), Some(b)) = (old.databases.get(name), next.databases.get(name)) else {
        return false;
    };
    let monitor = |c: &Config, u: &Option<String>| {
        u.as_ref()
            .and_then(|u| c.users.get(u))
            .map(|u| (u.name.clone(), Config::monitor_password(u)))
    };
    a.primary == b.primary
        && a.replicas == b.replicas
        && a.replica_weights == b.replica_weights
        && a.dbname == b.dbname
        && monitor(old, &a.monitor_user) == monitor(next, &b.monitor_user)
        && old.routing == next.routing
}

/// The groups for `next`: unchanged ones kept, changed or new ones built
/// (returned to have their monitors started), replaced ones returned to be
/// retired. A removed database's group is not retired: its clients finish
/// with it, and it goes when they do.
struct Rebuilt {
    clusters: Clusters,
    /// New groups, whose monitors must start.
    started: Vec<(String, Arc<Cluster>)>,
    /// Replaced groups, whose monitors must stop.
    retired: Vec<Arc<Cluster>>,
}

fn rebuild_clusters(old: &Config, next: &Config, current: &Clusters) -> Rebuilt {
    let mut clusters = Clusters::new();
    let mut started = Vec::new();
    let mut retired = Vec::new();
    for db in next
        .databases
        .values()
        .filter(|db| !db.replicas.is_empty() && db.sharding.is_none())
    {
        match current.get(&db.name) {
            Some(c) if cluster_inputs_equal(&db.name, old, next) => {
                clusters.insert(db.name.clone(), c.clone());
            }
            existing => {
                if let Some(c) = existing {
                    retired.push(c.clone());
                }
                let c = Cluster::new(db, &next.routing);
                started.push((db.name.clone(), c.clone()));
                clusters.insert(db.name.clone(), c);
            }
        }
    }
    for (name, c) in current {
        // Replicas removed (the database stays): its sessions stop routing.
        if next.databases.contains_key(name) && !clusters.contains_key(name) {
            retired.push(c.clone());
        }
    }
    Rebuilt {
        clusters,
        started,
        retired,
    }
}

/// Starts the monitor of one database's replication group. A node that
/// answers again clears its pools' remembered login failure, so clients
/// need not wait out `server_login_retry` (writes resume as soon as a
/// primary is back).
pub fn start_monitor(shared: &Arc<Shared>, name: &str, cluster: &Arc<Cluster>, config: &Config) {
    start_monitor_for(shared, name, name, cluster, config);
}

/// As [`start_monitor`], for the replication group `group` of database
/// `name` (a shard's group, whose pools are registered under it).
pub fn start_monitor_for(
    shared: &Arc<Shared>,
    name: &str,
    group: &str,
    cluster: &Arc<Cluster>,
    config: &Config,
) {
    let Some(db) = config.databases.get(name) else {
        return;
    };
    let Some(user) = db.monitor_user.as_ref().and_then(|u| config.users.get(u)) else {
        return;
    };
    let login = MonitorLogin {
        user: user.name.clone(),
        password: Config::monitor_password(user),
        dbname: db.dbname.clone(),
        connect_timeout: config.routing.monitor_timeout,
        tls: shared.tls.clone(),
    };
    let weak = Arc::downgrade(shared);
    let database = group.to_owned();
    spawn_monitor(
        cluster,
        login,
        Arc::new(move |node| {
            if let Some(shared) = weak.upgrade() {
                shared.pools.node_reachable(&database, node);
            }
        }),
    );
}

/// Human-readable differences: settings as `key = new (was old)`, tables
/// added or removed, secrets and access rules as "changed" (never shown).
fn describe_changes(old: &Config, next: &Config) -> Vec<String> {
    let before = settings_of(&old.render());
    let after = settings_of(&next.render());
    let mut out = Vec::new();
    let tables = |m: &std::collections::BTreeMap<(String, String), String>| {
        m.keys()
            .map(|(t, _)| t.clone())
            .collect::<std::collections::BTreeSet<_>>()
    };
    let (tables_before, tables_after) = (tables(&before), tables(&after));
    for t in tables_after.difference(&tables_before) {
        out.push(format!("{t} added"));
    }
    for t in tables_before.difference(&tables_after) {
        out.push(format!("{t} removed"));
    }
    for ((table, key), value) in &after {
        if !tables_before.contains(table) {
            continue;
        }
        match before.get(&(table.clone(), key.clone())) {
            Some(was) if was == value => {}
            Some(was) => out.push(format!("{table}.{key} = {value} (was {was})")),
            None => out.push(format!("{table}.{key} = {value}")),
        }
    }
    for (table, key) in before.keys() {
        if tables_after.contains(table) && !after.contains_key(&(table.clone(), key.clone())) {
            out.push(format!("{table}.{key} removed"));
        }
    }
    for (name, user) in &next.users {
        if let Some(was) = old.users.get(name) {
            if was.password != user.password || was.server_password != user.server_password {
                out.push(format!("users.{name}: password changed"));
            }
        }
    }
    if old.hba != next.hba {
        out.push(format!("access rules changed ({} rules)", next.hba.len()));
    }
    out
}

/// `(table, key) → value` from a rendered config; `[[hba]]` rules and
/// comments are left out (compared separately).
fn settings_of(rendered: &str) -> std::collections::BTreeMap<(String, String), String> {
    let mut out = std::collections::BTreeMap::new();
    let mut table = String::new();
    for line in rendered.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with("[[") {
            table.clear();
            continue;
        }
        if let Some(t) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            t.clone_into(&mut table);
            continue;
        }
        if table.is_empty() {
            continue;
        }
        if let Some((k, v)) = line.split_once(" = ") {
            // A redacted secret shows its kind after a comment.
            let v = v.split_once("  #").map_or(v, |(v, _)| v);
            out.insert((table.clone(), k.to_owned()), v.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let toml = format!(
            "[general]\n{extra}\n[databases.app]\nprimary = \"127.0.0.1:5432\"\n\
             [users.app]\npassword = \"secret\"\n"
        );
        Config::from_toml(&toml, "test.toml", []).expect("config")
    }

    #[test]
    fn changes_are_described_without_secrets() {
        let old = config("");
        let mut next = config("max_client_conn = 7");
        next.users.insert(
            "bob".into(),
            crate::config::User {
                name: "bob".into(),
                password: Some(crate::auth::Secret::Plain("hunter2".into())),
                server_password: None,
                max_client_conn: None,
            },
        );
        let changes = describe_changes(&old, &next).join("\n");
        assert!(
            changes.contains("general.max_client_conn = 7 (was 10000)"),
            "{changes}"
        );
        assert!(changes.contains("users.bob added"), "{changes}");
        assert!(!changes.contains("hunter2"), "{changes}");
        assert!(describe_changes(&old, &old).is_empty());
    }

    #[test]
    fn restart_only_settings_keep_their_running_values() {
        let old = config("");
        let mut next =
            config("listen_addr = \"127.0.0.1:7777\"\nworker_threads = 2\npool_size = 9");
        let kept = old.keep_restart_only(&mut next);
        assert_eq!(kept, ["general.listen_addr", "general.worker_threads"]);
        assert_eq!(next.general.listen_addr, old.general.listen_addr);
        assert_eq!(next.general.worker_threads, old.general.worker_threads);
        assert_eq!(next.general.pool.pool_size, 9);
    }

    #[test]
    fn shard_lists_keep_their_running_values() {
        let sharded = |shards: &str, pool: u32| {
            Config::from_toml(
                &format!(
                    "[general]\npool_size = {pool}\n\
                     [databases.app]\nshards = [{shards}]\n\
                     [users.app]\npassword = \"p\"\n"
                ),
                "test",
                std::iter::empty(),
            )
            .expect("valid")
        };
        let old = sharded("{ primary = \"h:1\" }, { primary = \"h:2\" }", 4);
        let mut next = sharded(
            "{ primary = \"h:1\" }, { primary = \"h:2\" }, { primary = \"h:3\" }",
            6,
        );
        let kept = old.keep_restart_only(&mut next);
        assert_eq!(kept, ["databases.*.shards"]);
        assert_eq!(
            next.databases["app"].sharding, old.databases["app"].sharding,
            "the running shard list stays"
        );
        assert_eq!(next.general.pool.pool_size, 6, "pool settings apply");
        let mut same = sharded("{ primary = \"h:1\" }, { primary = \"h:2\" }", 5);
        assert!(old.keep_restart_only(&mut same).is_empty());
    }
}
