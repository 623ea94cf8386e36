//! The listener: accepts clients, bounds them, and runs graceful shutdown.
//!
//! State is built once here and shared as an `Arc`; there are no globals, so
//! any number of proxies can run in one process (the tests do). The live
//! configuration and the replication groups sit behind `ArcSwap`s that a
//! reload replaces (see `reload.rs`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::{Notify, watch};

use crate::admin::HttpEndpoint;
use crate::backend::auth_query::AuthLookup;
use crate::cluster::{Cluster, ShardedDatabase};
use crate::config::{Config, Database, ShutdownMode, User};
use crate::frontend::{self, CancelRegistry, ClientRegistry, StatementRegistry};
use crate::pool::Pools;
use crate::tls::{TlsContext, TlsFileError, TlsHandle};

/// Where the process is in its life; sessions watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Not accepting (`shutdown_mode = "clients"`); clients, and
    /// connections already accepted, go on until they disconnect.
    Quiescing,
    /// Not accepting; sessions leave at their next transaction boundary.
    Draining,
    /// shutdown_timeout passed: sessions leave now.
    Stopping,
}

/// Databases with replicas, by name: topology and monitor state.
pub type Clusters = std::collections::BTreeMap<String, Arc<Cluster>>;

pub struct Shared {
    /// The live configuration; [`Shared::config`] reads it.
    pub(crate) config: ArcSwap<Config>,
    pub pools: Pools,
    /// [`Shared::clusters`] reads it.
    pub(crate) clusters: ArcSwap<Clusters>,
    /// Bumped by every applied reload: sessions compare it at each request
    /// boundary and pick up the new topology.
    pub(crate) generation: AtomicU64,
    /// Sharded databases, by name: each shard's replication group and
    /// counters (`cluster/shards.rs`). Built at startup; a reload does not
    /// change shard lists (restart to change them).
    pub shards: std::collections::BTreeMap<String, Arc<ShardedDatabase>>,
    pub cancels: CancelRegistry,
    /// Prepared statements deduplicated across clients and servers.
    pub statements: StatementRegistry,
    /// Event counters for metrics.
    pub stats: Stats,
    pub phase: watch::Receiver<Phase>,
    /// Key of the fake SCRAM salts shown for unknown users (per process).
    pub fake_salt_key: crate::auth::FakeSaltKey,
    /// Certificates and keys for new connections, both ways; replaced by
    /// [`Shared::reload_tls`].
    pub tls: TlsHandle,
    /// Looks up users who are not in the config (`[auth_query]`).
    pub(crate) auth_lookup: ArcSwapOption<AuthLookup>,
    /// The config file, reload counters and timestamp.
    pub reloads: crate::reload::ReloadState,
    /// The runtime log filter, when the process installed one (`main`).
    pub log: OnceLock<crate::logging::LogControl>,
    /// Logged-in clients, for the admin console and metrics.
    pub registry: ClientRegistry,
    /// Clients' session-parameter lists, shared when identical.
    pub param_lists: crate::frontend::ParamInterner,
    /// Clients idle long enough to wait without a task (`frontend/park.rs`).
    pub parking: crate::frontend::ParkingLot,
    /// The proxy's phase switch (weak: the phase channel closes when the
    /// proxy is gone), for the admin console's `SHUTDOWN`.
    phase_tx: std::sync::Weak<watch::Sender<Phase>>,
    clients: AtomicUsize,
    clients_gone: Notify,
    /// Logged-in clients per user and per database (their limits).
    per_user: Mutex<HashMap<Arc<str>, usize>>,
    per_database: Mutex<HashMap<Arc<str>, usize>>,
}

impl Shared {
    /// The live configuration (a cheap snapshot; hold it briefly, or turn
    /// it into an `Arc` with `arc_swap::Guard::into_inner`).
    pub fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    /// The replication groups of the databases with replicas, as of the
    /// last reload.
    pub fn clusters(&self) -> arc_swap::Guard<Arc<Clusters>> {
        self.clusters.load()
    }

    /// The `[auth_query]` lookup, when configured.
    pub fn auth_lookup(&self) -> Option<Arc<AuthLookup>> {
        self.auth_lookup.load_full()
    }

    /// How many reloads have been applied.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Triggers this proxy's shutdown (`None` once it is gone).
    pub fn shutdown_handle(&self) -> Option<ShutdownHandle> {
        self.phase_tx.upgrade().map(ShutdownHandle)
    }

    /// Counts a logged-in client against its user's and database's
    /// `max_client_conn`; the error names the limit.
    pub fn admit(self: &Arc<Self>, user: &User, db: &Database) -> Result<Admitted, String> {
        let mut users = lock(&self.per_user);
        let mut dbs = lock(&self.per_database);
        let u = users.get(user.name.as_str()).copied().unwrap_or(0);
        let d = dbs.get(db.name.as_str()).copied().unwrap_or(0);
        if let Some(max) = user.max_client_conn.filter(|&m| u >= m) {
            return Err(format!(
                "too many connections for role \"{}\" (users.{}.max_client_conn = {max})",
                user.name, user.name
            ));
        }
        if let Some(max) = db.max_client_conn.filter(|&m| d >= m) {
            return Err(format!(
                "too many connections for database \"{}\" (databases.{}.max_client_conn = {max})",
                db.name, db.name
            ));
        }
        // Every client of a user shares one copy of its name (and of its
        // database's): the maps' keys.
        let count = |map: &mut HashMap<Arc<str>, usize>, name: &str| {
            let key = map
                .get_key_value(name)
                .map_or_else(|| Arc::from(name), |(k, _)| Arc::clone(k));
            *map.entry(Arc::clone(&key)).or_default() += 1;
            key
        };
        Ok(Admitted {
            shared: self.clone(),
            user: count(&mut users, &user.name),
            database: count(&mut dbs, &db.name),
        })
    }

    /// Re-reads the TLS certificate, key and CA files named in the
    /// configuration. New connections use them; established ones keep
    /// theirs. On error nothing changes and the error names the setting,
    /// the file and what is wrong with it.
    pub fn reload_tls(&self) -> Result<(), TlsFileError> {
        let context = TlsContext::load(&self.config().tls)?;
        self.tls.store(Arc::new(context));
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A client counted against its user's and database's limits while alive.
pub struct Admitted {
    shared: Arc<Shared>,
    user: Arc<str>,
    database: Arc<str>,
}

impl Admitted {
    pub fn user(&self) -> &Arc<str> {
        &self.user
    }

    pub fn database(&self) -> &Arc<str> {
        &self.database
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        for (map, key) in [
            (&self.shared.per_user, &self.user),
            (&self.shared.per_database, &self.database),
        ] {
            let mut m = lock(map);
            if let Some(n) = m.get_mut(&**key) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&**key);
                }
            }
        }
    }
}

/// Process-wide counters, read by the metrics endpoint and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Prepared statements and session pins (transaction/statement mode).
    pub prepared: crate::frontend::PreparedStats,
    /// ErrorResponses sent to clients, by SQLSTATE class.
    pub errors: crate::stats::ErrorClasses,
}

/// Counts one client connection against `max_client_conn` while alive.
pub struct ClientPermit {
    shared: Arc<Shared>,
    /// This client is beyond `max_client_conn` and must be refused.
    pub over_limit: bool,
}

impl ClientPermit {
    fn acquire(shared: &Arc<Shared>) -> Self {
        let n = shared.clients.fetch_add(1, Ordering::AcqRel) + 1;
        Self {
            shared: shared.clone(),
            over_limit: n > shared.config().general.max_client_conn,
        }
    }
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        if self.shared.clients.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.clients_gone.notify_waiters();
        }
    }
}

/// Triggers graceful shutdown of a running [`Proxy`].
#[derive(Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<Phase>>);

impl ShutdownHandle {
    /// Stop accepting; let transactions finish up to `shutdown_timeout`.
    pub fn shutdown(&self) {
        self.shutdown_with(ShutdownMode::Transactions);
    }

    /// Stop accepting; `Transactions`: close each client at its next
    /// transaction boundary; `Clients`: let clients go on until they leave.
    /// Either way, what remains at `shutdown_timeout` is closed. A drain
    /// already under way only ever gets stricter.
    pub fn shutdown_with(&self, mode: ShutdownMode) {
        let next = match mode {
            ShutdownMode::Transactions => Phase::Draining,
            ShutdownMode::Clients => Phase::Quiescing,
        };
        self.0.send_if_modified(|p| {
            if *p < next {
                *p = next;
                true
            } else {
                false
            }
        });
    }

    /// Close every client now.
    pub fn stop_now(&self) {
        self.0.send_replace(Phase::Stopping);
    }
}

pub struct Proxy {
    listener: crate::listener::Listener,
    shared: Arc<Shared>,
    phase_tx: Arc<watch::Sender<Phase>>,
    http: Option<HttpEndpoint>,
}

impl Proxy {
    pub async fn bind(config: Config) -> std::io::Result<Self> {
        // Validation read the files already; read again for the configs
        // (a file changed in between is reported like any startup error).
        let tls = TlsContext::load(&config.tls)
            .map_err(std::io::Error::other)?
            .handle();
        let listener = crate::listener::Listener::bind(&config.general)?;
        let http = match config.admin.http_listen_addr {
            Some(addr) => Some(HttpEndpoint::bind(addr).await?),
            None => None,
        };
        let (phase_tx, phase) = watch::channel(Phase::Running);
        let phase_tx = Arc::new(phase_tx);
        let clusters = config
            .databases
            .values()
            .filter(|db| !db.replicas.is_empty() && db.sharding.is_none())
            .map(|db| (db.name.clone(), Cluster::new(db, &config.routing)))
            .collect();
        let shards = config
            .databases
            .values()
            .filter_map(|db| Some((db.name.clone(), ShardedDatabase::new(db, &config.routing)?)))
            .collect();
        let auth_lookup = AuthLookup::new(&config, tls.clone()).map(Arc::new);
        let config = Arc::new(config);
        let pools = Pools::new(tls.clone());
        pools.reconfigure(config.clone());
        let shared = Arc::new(Shared {
            auth_lookup: ArcSwapOption::new(auth_lookup),
            cancels: CancelRegistry::with_instance(config.general.instance_id),
            config: ArcSwap::new(config),
            pools,
            clusters: ArcSwap::from_pointee(clusters),
            generation: AtomicU64::new(0),
            reloads: crate::reload::ReloadState::new(),
            log: OnceLock::new(),
            shards,
            statements: StatementRegistry::new(),
            stats: Stats::default(),
            phase,
            fake_salt_key: crate::auth::FakeSaltKey::random(),
            tls,
            registry: ClientRegistry::new(),
            param_lists: Default::default(),
            parking: crate::frontend::ParkingLot::new(),
            phase_tx: Arc::downgrade(&phase_tx),
            clients: AtomicUsize::new(0),
            clients_gone: Notify::new(),
            per_user: Mutex::default(),
            per_database: Mutex::default(),
        });
        let config = shared.config();
        for (name, cluster) in shared.clusters().iter() {
            crate::reload::start_monitor(&shared, name, cluster, &config);
        }
        drop(config);
        start_shard_monitors(&shared);
        crate::admin::spawn_stats_period(&shared);
        Ok(Self {
            listener,
            http,
            shared,
            phase_tx,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Where `/health`, `/ready` and `/metrics` are served, if configured.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|h| h.local_addr().ok())
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.phase_tx.clone())
    }

    /// Accepts clients until shutdown, then drains.
    pub async fn run(self) {
        let Self {
            listener,
            shared,
            phase_tx,
            http,
        } = self;
        if let Some(http) = http {
            tokio::spawn(http.run(shared.clone()));
        }
        tokio::spawn(nudge_on_phase_change(shared.clone()));
        crate::frontend::ParkingLot::start(&shared);
        let mut phase = shared.phase.clone();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, peer)) => admit_client(&shared, stream, peer),
                    Err(e) => {
                        // EMFILE and friends: back off, never spin or exit.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                r = phase.changed() => {
                    if r.is_err() || *phase.borrow() != Phase::Running {
                        break;
                    }
                }
            }
        }
        // Beside a new instance on the same port (SO_REUSEPORT), new
        // connections are steered to it and those already queued here are
        // served before the listener closes; see listener.rs.
        listener
            .close(|stream, peer| admit_client(&shared, stream, peer))
            .await;
        let timeout = shared.config().general.shutdown_timeout;
        tracing::info!(
            clients = shared.client_count(),
            ?timeout,
            "draining: no new clients"
        );
        if !wait_for_clients(&shared, timeout).await {
            tracing::warn!(
                clients = shared.client_count(),
                "shutdown_timeout reached: closing remaining clients"
            );
            phase_tx.send_replace(Phase::Stopping);
            wait_for_clients(&shared, Duration::from_secs(5)).await;
        }
        shared.pools.close_all();
        shared.parking.close();
        tracing::info!("shutdown complete");
    }
}

/// One monitor per shard of every sharded database (each shard is a
/// replication group of its own). A node that answers again clears its
/// pools' remembered login failure.
fn start_shard_monitors(shared: &Arc<Shared>) {
    let config = shared.config();
    for (name, db) in &shared.shards {
        for shard in &db.shards {
            let group = crate::pool::shard_group(name, shard.index);
            crate::reload::start_monitor_for(shared, name, &group, &shard.cluster, &config);
        }
    }
}

/// Sessions relaying a transaction watch the phase through
/// `ClientInfo::alerted`, which a phase change does not wake by itself:
/// this task wakes every client after each change.
async fn nudge_on_phase_change(shared: Arc<Shared>) {
    let mut phase = shared.phase.clone();
    loop {
        let alive = phase.changed().await.is_ok();
        for client in shared.registry.all() {
            client.nudge();
        }
        if !alive {
            return;
        }
    }
}

/// Starts serving one accepted connection.
fn admit_client(shared: &Arc<Shared>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let permit = ClientPermit::acquire(shared);
    let _ = stream.set_nodelay(true);
    tokio::spawn(frontend::serve(stream, peer, shared.clone(), permit));
}

async fn wait_for_clients(shared: &Shared, timeout: Duration) -> bool {
    let wait = async {
        loop {
            let gone = shared.clients_gone.notified();
            tokio::pin!(gone);
            gone.as_mut().enable();
            if shared.client_count() == 0 {
                return;
            }
            gone.await;
        }
    };
    tokio::time::timeout(timeout, wait).await.is_ok()
}
