//! Throwaway local PostgreSQL clusters: one primary plus streaming replicas.
//!
//! # Why
//! `pgsluice demo`, the integration tests and the benchmark script all need
//! real PostgreSQL servers — a primary to write to, hot-standby replicas to
//! route reads to, and nodes that can be stopped, crashed and restarted —
//! without touching any cluster the machine already runs, and without
//! leaving anything behind.
//!
//! # What it guarantees
//! - Everything lives in one fresh directory `/tmp/pgsluice-XXXXXX`; servers
//!   listen on 127.0.0.1 only (TCP, Unix sockets disabled), on free ports
//!   below the kernel's ephemeral range.
//! - [`LocalCluster::start`] returns only once every node accepts a real
//!   (SCRAM) login and every replica streams WAL from the primary through its
//!   own physical replication slot (`slot1`, `slot2`, ...), and has replayed
//!   the creation of the application role and database.
//! - The superuser is `postgres` with a random password; the application
//!   role and database of [`ClusterOptions`] exist, the database owned by the
//!   role, ready for `pgbench -i`.
//! - Running as root (as CI does), every PostgreSQL process runs as the
//!   unprivileged OS user `postgres` (created if missing) and inherits our
//!   resource limits; servers never inherit our stdin/stdout or any other
//!   descriptor, and run in their own process groups.
//! - Nothing outlives us: [`LocalCluster::shutdown`] or `Drop` stops the
//!   nodes and removes the directory, and if the process dies without either
//!   (a static, a panic with `panic = abort`, SIGKILL) a reaper child does
//!   the same within ~10 s (see `reaper.rs`).
//!
//! The API is blocking std code with no async runtime inside: call it from
//! synchronous code or from `tokio::task::spawn_blocking`. Setup SQL goes
//! through `psql`.

mod error;
mod node;
mod reaper;
mod tools;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rand::Rng;

pub use error::LocalPgError;
pub use tools::{BINDIR_ENV, find_bindir};

use node::{Ctx, NodeFiles, PortChoice, Postmaster};
use reaper::Reaper;

/// How long a fresh replica may take to start streaming.
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// The superuser created by initdb.
const SUPERUSER: &str = "postgres";

/// What cluster to build. `Default` gives a primary and two replicas with an
/// `app` role (password `app`) owning an `app` database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterOptions {
    /// Number of streaming replicas (0 is allowed).
    pub replicas: usize,
    /// `max_connections` of every node.
    pub max_connections: u32,
    /// Database created for the application, owned by `app_user`.
    pub database: String,
    /// Application role: LOGIN, SCRAM-SHA-256 password, not a superuser.
    pub app_user: String,
    /// Password of `app_user`.
    pub app_password: String,
    /// Also create roles that log in with other methods, for tests of
    /// pgsluice's server login: `auth_md5` (md5, password `pw`),
    /// `auth_password` (cleartext `password` method, password `pw`) and
    /// `auth_trust` (trust). Off by default: the demo has no use for them.
    pub test_auth_roles: bool,
    /// Extra postgresql.conf lines for every node, e.g. `log_statement = 'all'`.
    /// They come after this module's settings; do not set `port`.
    pub extra_conf: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            replicas: 2,
            max_connections: 200,
            database: "app".into(),
            app_user: "app".into(),
            app_password: "app".into(),
            test_auth_roles: false,
            extra_conf: Vec::new(),
        }
    }
}

/// Whether a node is the primary or a hot-standby replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeRole {
    /// Read-write node; index 0.
    Primary,
    /// Streaming hot standby; indexes 1.. .
    Replica,
}

/// One node of a [`LocalCluster`]. The port stays the same across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Primary or replica.
    pub role: NodeRole,
    /// Position in [`LocalCluster::nodes`]: 0 = primary, 1.. = replicas.
    pub index: usize,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// The node's data directory.
    pub data_dir: PathBuf,
    /// The file the postmaster's stdout and stderr (its log) go to.
    pub log_file: PathBuf,
}

impl Node {
    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// "primary" or "replicaN", as used in log and error messages.
    pub fn name(&self) -> String {
        label(self.index)
    }
}

fn label(index: usize) -> String {
    if index == 0 {
        "primary".into()
    } else {
        format!("replica{index}")
    }
}

/// A running primary with streaming replicas in a temporary directory.
/// Methods take `&self` and may be called from several threads (e.g. from a
/// `static OnceLock<LocalCluster>` shared by tests).
pub struct LocalCluster {
    options: ClusterOptions,
    ctx: Ctx,
    root: PathBuf,
    temp_dir: Option<tempfile::TempDir>,
    nodes: Vec<Node>,
    /// One slot per node; `None` while the node is stopped.
    postmasters: Vec<Mutex<Option<Postmaster>>>,
    reaper: Option<Reaper>,
    torn_down: bool,
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("root", &self.root)
            .field("nodes", &self.nodes)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl LocalCluster {
    /// Creates and starts the cluster; returns when every node accepts logins
    /// and every replica streams. On error nothing is left behind.
    pub fn start(options: ClusterOptions) -> Result<LocalCluster, LocalPgError> {
        let started = Instant::now();
        validate(&options)?;
        let tools = tools::Tools::locate()?;
        let run_as = tools::RunAs::detect()?;
        let temp_dir = tempfile::Builder::new()
            .prefix("pgsluice-")
            .tempdir_in("/tmp")
            .map_err(|e| LocalPgError::io("creating a temporary directory in /tmp", e))?;
        // Canonical, so that it matches /proc/PID/cwd of the postmasters.
        let root = std::fs::canonicalize(temp_dir.path())
            .map_err(|e| LocalPgError::io(format!("resolving {}", temp_dir.path().display()), e))?;
        run_as.chown(&root)?;
        let data_dirs: Vec<PathBuf> = (0..=options.replicas)
            .map(|i| root.join(format!("node{i}")))
            .collect();
        // Before anything can be left running.
        let reaper = Reaper::spawn(&root, &data_dirs)?;
        let mut cluster = LocalCluster {
            ctx: Ctx {
                tools,
                run_as,
                superuser: SUPERUSER.into(),
                password: random_password(),
            },
            options,
            root,
            temp_dir: Some(temp_dir),
            nodes: Vec::new(),
            postmasters: Vec::new(),
            reaper: Some(reaper),
            torn_down: false,
        };
        // On error, dropping `cluster` stops what was started and cleans up.
        cluster.start_primary()?;
        let primary_at = started.elapsed();
        // Base backups before the application database exists: their
        // checkpoint then has next to nothing to flush. The role and database
        // reach the replicas as WAL, and we wait until they have replayed it.
        cluster.start_replicas()?;
        let target_lsn = cluster.create_app_objects()?;
        for index in 1..=cluster.options.replicas {
            node::wait_streaming(
                &cluster.ctx,
                &cluster.files(index),
                cluster.nodes[index].port,
                &target_lsn,
                STREAM_TIMEOUT,
            )?;
        }
        tracing::info!(
            root = %cluster.root.display(),
            primary = cluster.nodes[0].port,
            replicas = ?cluster.replicas().iter().map(|n| n.port).collect::<Vec<_>>(),
            ?primary_at,
            elapsed = ?started.elapsed(),
            "local PostgreSQL cluster is up"
        );
        Ok(cluster)
    }

    fn files(&self, index: usize) -> NodeFiles {
        NodeFiles {
            label: label(index),
            data_dir: self.root.join(format!("node{index}")),
            log_file: self.root.join(format!("node{index}.log")),
        }
    }

    fn start_primary(&mut self) -> Result<(), LocalPgError> {
        let files = self.files(0);
        self.initdb(&files.data_dir)?;
        let hba = if self.options.test_auth_roles {
            format!("{TEST_AUTH_HBA}{PG_HBA}")
        } else {
            PG_HBA.to_owned()
        };
        std::fs::write(files.data_dir.join("pg_hba.conf"), hba)
            .map_err(|e| LocalPgError::io("writing pg_hba.conf", e))?;
        append_file(&files.data_dir.join("postgresql.conf"), &self.shared_conf())?;
        let (postmaster, port) = node::launch(&self.ctx, &files, PortChoice::Pick)?;
        self.add_node(NodeRole::Primary, files, port, postmaster);
        Ok(())
    }

    /// Creates the application role and database on the primary; returns
    /// the primary's WAL position afterwards.
    fn create_app_objects(&self) -> Result<String, LocalPgError> {
        let o = &self.options;
        let role = tools::quote_ident(&o.app_user);
        let create_role = format!(
            "CREATE ROLE {role} LOGIN PASSWORD {}",
            tools::quote_literal(&o.app_password)
        );
        let create_db = format!(
            "CREATE DATABASE {} OWNER {role}",
            tools::quote_ident(&o.database)
        );
        let started = Instant::now();
        let mut sql = vec![
            "SET password_encryption = 'scram-sha-256'",
            &create_role,
            &create_db,
        ];
        if self.options.test_auth_roles {
            sql.extend([
                "SET password_encryption = 'md5'",
                "CREATE ROLE auth_md5 LOGIN PASSWORD 'pw'",
                "SET password_encryption = 'scram-sha-256'",
                "CREATE ROLE auth_password LOGIN PASSWORD 'pw'",
                "CREATE ROLE auth_trust LOGIN",
            ]);
        }
        sql.push("SELECT pg_current_wal_lsn()");
        let lsn = self.ctx.psql(self.nodes[0].port, "postgres", &sql)?;
        tracing::debug!(elapsed = ?started.elapsed(), "created the application role and database");
        Ok(lsn)
    }

    fn initdb(&self, data_dir: &Path) -> Result<(), LocalPgError> {
        let pwfile = self.root.join("pwfile");
        std::fs::write(&pwfile, format!("{}\n", self.ctx.password))
            .map_err(|e| LocalPgError::io(format!("writing {}", pwfile.display()), e))?;
        self.ctx.run_as.chown(&pwfile)?;
        let mut cmd = tools::base_command(&self.ctx.tools.initdb);
        cmd.arg("-D")
            .arg(data_dir)
            .args([
                "-U",
                SUPERUSER,
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--no-sync", "-E", "UTF8", "--locale=C"]);
        self.ctx.run_as.apply(&mut cmd);
        let started = Instant::now();
        let result = tools::run(&mut cmd, "initdb");
        tracing::debug!(elapsed = ?started.elapsed(), "initdb finished");
        let _ = std::fs::remove_file(&pwfile);
        result.map(drop)
    }

    /// postgresql.conf settings of every node (replicas copy the primary's).
    fn shared_conf(&self) -> String {
        let o = &self.options;
        let mut conf = format!(
            "\n# ---- added by pgsluice localpg ----\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = ''\n\
             max_connections = {}\n\
             wal_level = replica\n\
             max_wal_senders = {}\n\
             max_replication_slots = {}\n\
             hot_standby = on\n\
             password_encryption = 'scram-sha-256'\n",
            o.max_connections,
            // Each concurrent base backup uses two WAL senders.
            (3 * o.replicas + 2).max(10),
            (o.replicas + 2).max(10),
        );
        if self.ctx.tools.major >= 14 {
            // Crash recovery (replica start after --no-sync base backups,
            // restart after kill_node) would otherwise fsync every file.
            conf.push_str("recovery_init_sync_method = syncfs\n");
        }
        for line in &o.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        conf.push_str(&format!("include_if_exists = '{}'\n", node::NODE_CONF));
        conf
    }

    fn start_replicas(&mut self) -> Result<(), LocalPgError> {
        let primary_port = self.nodes[0].port;
        let count = self.options.replicas;
        let ctx = &self.ctx;
        let files: Vec<NodeFiles> = (1..=count).map(|i| self.files(i)).collect();
        // The slots exist, reserving WAL, before any backup starts. With
        // `pg_basebackup -C` the slot is created only after the backup's
        // checkpoint and reserves WAL from then on, so a concurrent backup's
        // checkpoint can remove the segment the first one still has to
        // stream ("requested WAL segment ... has already been removed").
        if count > 0 {
            let slots: Vec<String> = (1..=count)
                .map(|i| format!("SELECT pg_create_physical_replication_slot('slot{i}', true)"))
                .collect();
            let slots: Vec<&str> = slots.iter().map(String::as_str).collect();
            self.ctx.psql(primary_port, "postgres", &slots)?;
        }
        // Base backups and startups overlap: each replica in its own thread.
        let results: Vec<Result<(Postmaster, u16), LocalPgError>> = std::thread::scope(|s| {
            let handles: Vec<_> = files
                .iter()
                .enumerate()
                .map(|(i, f)| s.spawn(move || provision_replica(ctx, primary_port, i + 1, f)))
                .collect();
            handles
                .into_iter()
                .zip(&files)
                .map(|(h, f)| {
                    h.join().unwrap_or_else(|_| {
                        Err(LocalPgError::SetupPanicked {
                            node: f.label.clone(),
                        })
                    })
                })
                .collect()
        });
        let mut started = Vec::with_capacity(count);
        for (f, result) in files.into_iter().zip(results) {
            // On error, the replicas already started are killed as `started`
            // is dropped (see `Postmaster`'s `Drop`).
            started.push((f, result?));
        }
        for (f, (postmaster, port)) in started {
            self.add_node(NodeRole::Replica, f, port, postmaster);
        }
        Ok(())
    }

    fn add_node(&mut self, role: NodeRole, files: NodeFiles, port: u16, postmaster: Postmaster) {
        self.nodes.push(Node {
            role,
            index: self.nodes.len(),
            port,
            data_dir: files.data_dir,
            log_file: files.log_file,
        });
        self.postmasters.push(Mutex::new(Some(postmaster)));
    }

    /// The primary (node 0).
    pub fn primary(&self) -> &Node {
        &self.nodes[0]
    }

    /// The replicas (nodes 1..).
    pub fn replicas(&self) -> &[Node] {
        &self.nodes[1..]
    }

    /// All nodes, primary first; `nodes()[i].index == i`.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node with this index, if any.
    pub fn node(&self, index: usize) -> Option<&Node> {
        self.nodes.get(index)
    }

    /// The superuser's name: `postgres`.
    pub fn superuser(&self) -> &str {
        &self.ctx.superuser
    }

    /// A pgsluice configuration (TOML) for this cluster: one database with
    /// the primary and replicas, the application user with its password,
    /// and `general` as the body of the `[general]` table.
    pub fn pgsluice_config(&self, general: &str) -> String {
        let o = &self.options;
        let replicas: Vec<String> = self
            .replicas()
            .iter()
            .map(|n| format!("\"{}\"", n.addr()))
            .collect();
        format!(
            "[general]\n{general}\n\
             [databases.{db}]\nprimary = \"{primary}\"\nreplicas = [{replicas}]\n\
             [users.{user}]\npassword = \"{password}\"\n",
            db = tools::quote_toml_key(&o.database),
            primary = self.primary().addr(),
            replicas = replicas.join(", "),
            user = tools::quote_toml_key(&o.app_user),
            password = o.app_password.replace('\\', "\\\\").replace('"', "\\\""),
        )
    }

    /// The superuser's password (random per cluster).
    pub fn superuser_password(&self) -> &str {
        &self.ctx.password
    }

    /// The options the cluster was built with.
    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    /// The temporary directory holding all data directories and logs.
    pub fn root_dir(&self) -> &Path {
        &self.root
    }

    /// The directory of the PostgreSQL binaries in use (`pgbench` and `psql`
    /// usually live there too).
    pub fn bindir(&self) -> &Path {
        &self.ctx.tools.bindir
    }

    /// Runs SQL as the superuser on node `index`, through `psql`, and returns
    /// the result rows unaligned (`|`-separated, one per line), trimmed.
    /// Each element of `sql` is sent on its own.
    pub fn psql(&self, index: usize, database: &str, sql: &[&str]) -> Result<String, LocalPgError> {
        let node = self.checked_node(index)?;
        self.ctx.psql(node.port, database, sql)
    }

    /// Whether node `index` was started and not since stopped or killed by
    /// this handle, and its postmaster is still alive.
    pub fn is_running(&self, index: usize) -> Result<bool, LocalPgError> {
        let mut slot = self.slot(index)?;
        match slot.as_mut() {
            None => Ok(false),
            Some(pm) => Ok(pm.exited()?.is_none()),
        }
    }

    /// Fast shutdown (SIGINT to the postmaster) of node `index`; returns once
    /// it is gone. A stopped node is left as it is.
    pub fn stop_node(&self, index: usize) -> Result<(), LocalPgError> {
        match self.slot(index)?.take() {
            Some(pm) => pm.stop(),
            None => Ok(()),
        }
    }

    /// Crashes node `index`: SIGKILL to the postmaster and all its children;
    /// returns once they are gone. A stopped node is left as it is.
    pub fn kill_node(&self, index: usize) -> Result<(), LocalPgError> {
        match self.slot(index)?.take() {
            Some(pm) => pm.kill(),
            None => Ok(()),
        }
    }

    /// Starts node `index` again on its port and returns once it accepts
    /// logins (after crash recovery, if it was killed). A running node is
    /// left as it is. Does not wait for a replica to resume streaming.
    pub fn start_node(&self, index: usize) -> Result<(), LocalPgError> {
        let files = self.files(index);
        let port = self.checked_node(index)?.port;
        let mut slot = self.slot(index)?;
        if let Some(pm) = slot.as_mut() {
            if pm.exited()?.is_none() {
                return Ok(());
            }
        }
        let (postmaster, _) = node::launch(&self.ctx, &files, PortChoice::Fixed(port))?;
        *slot = Some(postmaster);
        Ok(())
    }

    /// Stops every node and removes the temporary directory.
    pub fn shutdown(mut self) -> Result<(), LocalPgError> {
        self.teardown()
    }

    fn checked_node(&self, index: usize) -> Result<&Node, LocalPgError> {
        self.nodes.get(index).ok_or(LocalPgError::NoSuchNode {
            index,
            count: self.nodes.len(),
        })
    }

    fn slot(&self, index: usize) -> Result<MutexGuard<'_, Option<Postmaster>>, LocalPgError> {
        let slot = self
            .postmasters
            .get(index)
            .ok_or(LocalPgError::NoSuchNode {
                index,
                count: self.nodes.len(),
            })?;
        // A panic while holding the lock leaves the slot consistent.
        Ok(slot.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn teardown(&mut self) -> Result<(), LocalPgError> {
        if std::mem::replace(&mut self.torn_down, true) {
            return Ok(());
        }
        let mut first_error: Option<LocalPgError> = None;
        // Replicas first, then the primary; all shut down in parallel.
        let running: Vec<Postmaster> = self
            .postmasters
            .iter()
            .rev()
            .filter_map(|m| m.lock().unwrap_or_else(PoisonError::into_inner).take())
            .collect();
        for pm in &running {
            if let Err(e) = pm.request_fast_shutdown() {
                first_error.get_or_insert(e);
            }
        }
        for pm in running {
            if let Err(e) = pm.wait_stopped(node::STOP_TIMEOUT) {
                first_error.get_or_insert(e);
            }
        }
        if let Some(dir) = self.temp_dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                first_error
                    .get_or_insert(LocalPgError::io(format!("removing {}", path.display()), e));
            }
        }
        if let Some(reaper) = self.reaper.take() {
            reaper.release();
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!(error = %e, "cleaning up the local PostgreSQL cluster");
        }
    }
}

/// With `test_auth_roles`: one role per other login method, matched first.
const TEST_AUTH_HBA: &str = "\
host    all          auth_md5       127.0.0.1/32   md5
host    all          auth_password  127.0.0.1/32   password
host    all          auth_trust     127.0.0.1/32   trust
";

/// Host (TCP) access needs a SCRAM password; local lines are inert since
/// Unix sockets are disabled.
const PG_HBA: &str = "\
# written by pgsluice localpg
# TYPE  DATABASE     USER  ADDRESS        METHOD
local   all          all                  trust
local   replication  all                  trust
host    all          all   127.0.0.1/32   scram-sha-256
host    all          all   ::1/128        scram-sha-256
host    replication  all   127.0.0.1/32   scram-sha-256
host    replication  all   ::1/128        scram-sha-256
";

/// Base backup of the primary into the replica's data dir, streaming WAL
/// through the existing slot `slot{index}`, then start it.
fn provision_replica(
    ctx: &Ctx,
    primary_port: u16,
    index: usize,
    files: &NodeFiles,
) -> Result<(Postmaster, u16), LocalPgError> {
    let mut cmd = tools::base_command(&ctx.tools.pg_basebackup);
    cmd.arg("-D")
        .arg(&files.data_dir)
        .args(["-R", "-X", "stream", "-S"])
        .arg(format!("slot{index}"))
        .args(["-c", "fast", "-h", "127.0.0.1", "-p"])
        .arg(primary_port.to_string())
        .args(["-U", &ctx.superuser, "--no-sync"])
        .env("PGPASSWORD", &ctx.password);
    ctx.run_as.apply(&mut cmd);
    let started = Instant::now();
    tools::run(&mut cmd, &format!("pg_basebackup for {}", files.label))?;
    tracing::debug!(node = %files.label, elapsed = ?started.elapsed(), "pg_basebackup finished");
    node::launch(ctx, files, PortChoice::Pick)
}

fn append_file(path: &Path, text: &str) -> Result<(), LocalPgError> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| LocalPgError::io(format!("appending to {}", path.display()), e))
}

fn random_password() -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

fn validate(o: &ClusterOptions) -> Result<(), LocalPgError> {
    let bad = |msg: String| Err(LocalPgError::InvalidOptions(msg));
    for (what, name) in [("database", &o.database), ("app_user", &o.app_user)] {
        if name.is_empty() || name.len() > 63 || name.contains('\0') {
            return bad(format!("{what} {name:?} must be 1 to 63 bytes without NUL"));
        }
    }
    if o.app_user == SUPERUSER || o.app_user.starts_with("pg_") {
        return bad(format!(
            "app_user {:?} is reserved (the superuser is `postgres`; `pg_` names are system roles)",
            o.app_user
        ));
    }
    if ["postgres", "template0", "template1"].contains(&o.database.as_str()) {
        return bad(format!(
            "database {:?} already exists in every cluster",
            o.database
        ));
    }
    if o.app_password.is_empty() || o.app_password.contains('\0') {
        return bad("app_password must be non-empty and without NUL".into());
    }
    if o.max_connections < 10 {
        return bad(format!("max_connections {} is below 10", o.max_connections));
    }
    if let Some(line) = o.extra_conf.iter().find(|l| l.contains('\0')) {
        return bad(format!("extra_conf line {line:?} contains NUL"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_options_are_valid() {
        assert!(validate(&ClusterOptions::default()).is_ok());
    }

    #[test]
    fn rejects_reserved_names() {
        for o in [
            ClusterOptions {
                app_user: "postgres".into(),
                ..Default::default()
            },
            ClusterOptions {
                database: "template1".into(),
                ..Default::default()
            },
            ClusterOptions {
                max_connections: 3,
                ..Default::default()
            },
            ClusterOptions {
                database: String::new(),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(validate(&o), Err(LocalPgError::InvalidOptions(_))),
                "{o:?}"
            );
        }
    }

    #[test]
    fn node_addr_is_loopback() {
        let node = Node {
            role: NodeRole::Replica,
            index: 1,
            port: 5433,
            data_dir: PathBuf::new(),
            log_file: PathBuf::new(),
        };
        assert_eq!(node.addr().to_string(), "127.0.0.1:5433");
        assert_eq!(node.name(), "replica1");
    }

    #[test]
    fn missing_binaries_message_is_exact() {
        assert_eq!(
            LocalPgError::BinariesNotFound.to_string(),
            "PostgreSQL server binaries (initdb, postgres, pg_basebackup) not found; install them with `apt-get install -y postgresql` (or set PGSLUICE_PG_BINDIR)"
        );
    }
}
