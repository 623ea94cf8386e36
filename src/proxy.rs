//! The listener: accepts clients, bounds them, and runs graceful shutdown.
//!
//! State is built once here and shared as an `Arc`; there are no globals, so
//! any number of proxies can run in one process (the tests do).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use crate::admin::HttpEndpoint;
use crate::cluster::{Cluster, MonitorLogin, ShardedDatabase, spawn_monitor};
use crate::config::{Config, Database, User};
use crate::frontend::{self, CancelRegistry, ClientRegistry, StatementRegistry};
use crate::pool::Pools;
use crate::tls::{TlsContext, TlsFileError, TlsHandle};

/// Where the process is in its life; sessions watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Not accepting; sessions leave at their next transaction boundary.
    Draining,
    /// shutdown_timeout passed: sessions leave now.
    Stopping,
}

pub struct Shared {
    pub config: Arc<Config>,
    pub pools: Pools,
    /// Databases with replicas, by name: topology and monitor state.
    pub clusters: std::collections::BTreeMap<String, Arc<Cluster>>,
    /// Sharded databases, by name: each shard's replication group and
    /// counters (`cluster/shards.rs`).
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
    pub auth_lookup: Option<crate::backend::auth_query::AuthLookup>,
    /// Logged-in clients, for the admin console and metrics.
    pub registry: ClientRegistry,
    /// The proxy's phase switch (weak: the phase channel closes when the
    /// proxy is gone), for the admin console's `SHUTDOWN`.
    phase_tx: std::sync::Weak<watch::Sender<Phase>>,
    clients: AtomicUsize,
    clients_gone: Notify,
    /// Logged-in clients per user and per database (their limits).
    per_user: Mutex<HashMap<String, usize>>,
    per_database: Mutex<HashMap<String, usize>>,
}

impl Shared {
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
        let u = users.get(&user.name).copied().unwrap_or(0);
        let d = dbs.get(&db.name).copied().unwrap_or(0);
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
        *users.entry(user.name.clone()).or_default() += 1;
        *dbs.entry(db.name.clone()).or_default() += 1;
        Ok(Admitted {
            shared: self.clone(),
            user: user.name.clone(),
            database: db.name.clone(),
        })
    }

    /// Re-reads the TLS certificate, key and CA files named in the
    /// configuration. New connections use them; established ones keep
    /// theirs. On error nothing changes and the error names the setting,
    /// the file and what is wrong with it.
    pub fn reload_tls(&self) -> Result<(), TlsFileError> {
        let context = TlsContext::load(&self.config.tls)?;
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
    user: String,
    database: String,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        for (map, key) in [
            (&self.shared.per_user, &self.user),
            (&self.shared.per_database, &self.database),
        ] {
            let mut m = lock(map);
            if let Some(n) = m.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    m.remove(key);
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
            over_limit: n > shared.config.general.max_client_conn,
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
        self.0.send_if_modified(|p| {
            if *p == Phase::Running {
                *p = Phase::Draining;
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
    listener: TcpListener,
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
        let listener = TcpListener::bind(config.general.listen_addr).await?;
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
        let auth_lookup = crate::backend::auth_query::AuthLookup::new(&config, tls.clone());
        let shared = Arc::new(Shared {
            auth_lookup,
            config: Arc::new(config),
            pools: Pools::new(tls.clone()),
            clusters,
            shards,
            cancels: CancelRegistry::new(),
            statements: StatementRegistry::new(),
            stats: Stats::default(),
            phase,
            fake_salt_key: crate::auth::FakeSaltKey::random(),
            tls,
            registry: ClientRegistry::new(),
            phase_tx: Arc::downgrade(&phase_tx),
            clients: AtomicUsize::new(0),
            clients_gone: Notify::new(),
            per_user: Mutex::default(),
            per_database: Mutex::default(),
        });
        start_monitors(&shared);
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
        let mut phase = shared.phase.clone();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        let permit = ClientPermit::acquire(&shared);
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(frontend::serve(stream, peer, shared.clone(), permit));
                    }
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
        drop(listener);
        let timeout = shared.config.general.shutdown_timeout;
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
        tracing::info!("shutdown complete");
    }
}

/// One monitor per database with replicas. A node that answers again
/// clears its pools' remembered login failure, so clients need not wait out
/// `server_login_retry` (writes resume as soon as a primary is back).
fn start_monitors(shared: &Arc<Shared>) {
    // Each shard of a sharded database is a replication group of its own.
    let shard_groups = shared.shards.iter().flat_map(|(name, db)| {
        db.shards
            .iter()
            .map(move |s| (name, crate::pool::shard_group(name, s.index), &s.cluster))
    });
    let groups = shared
        .clusters
        .iter()
        .map(|(name, cluster)| (name, name.clone(), cluster))
        .chain(shard_groups);
    for (name, group, cluster) in groups {
        let Some(db) = shared.config.databases.get(name) else {
            continue;
        };
        let Some(user) = db
            .monitor_user
            .as_ref()
            .and_then(|u| shared.config.users.get(u))
        else {
            continue;
        };
        let login = MonitorLogin {
            user: user.name.clone(),
            password: crate::config::Config::monitor_password(user),
            dbname: db.dbname.clone(),
            connect_timeout: shared.config.routing.monitor_timeout,
            tls: shared.tls.clone(),
        };
        let weak = Arc::downgrade(shared);
        let database = group;
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
