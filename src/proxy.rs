//! The listener: accepts clients, bounds them, and runs graceful shutdown.
//!
//! State is built once here and shared as an `Arc`; there are no globals, so
//! any number of proxies can run in one process (the tests do).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use crate::cluster::{Cluster, MonitorLogin, spawn_monitor};
use crate::config::Config;
use crate::frontend::{self, CancelRegistry, StatementRegistry};
use crate::pool::Pools;

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
    pub cancels: CancelRegistry,
    /// Prepared statements deduplicated across clients and servers.
    pub statements: StatementRegistry,
    /// Event counters for metrics.
    pub stats: Stats,
    pub phase: watch::Receiver<Phase>,
    /// Key of the fake SCRAM salts shown for unknown users (per process).
    pub fake_salt_key: crate::auth::FakeSaltKey,
    clients: AtomicUsize,
    clients_gone: Notify,
}

impl Shared {
    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }
}

/// Process-wide counters, read by the metrics endpoint and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Prepared statements and session pins (transaction/statement mode).
    pub prepared: crate::frontend::PreparedStats,
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
}

impl Proxy {
    pub async fn bind(config: Config) -> std::io::Result<Self> {
        let listener = TcpListener::bind(config.general.listen_addr).await?;
        let (phase_tx, phase) = watch::channel(Phase::Running);
        let clusters = config
            .databases
            .values()
            .filter(|db| !db.replicas.is_empty())
            .map(|db| (db.name.clone(), Cluster::new(db, &config.routing)))
            .collect();
        let shared = Arc::new(Shared {
            config: Arc::new(config),
            pools: Pools::new(),
            clusters,
            cancels: CancelRegistry::new(),
            statements: StatementRegistry::new(),
            stats: Stats::default(),
            phase,
            fake_salt_key: crate::auth::FakeSaltKey::random(),
            clients: AtomicUsize::new(0),
            clients_gone: Notify::new(),
        });
        start_monitors(&shared);
        Ok(Self {
            listener,
            shared,
            phase_tx: Arc::new(phase_tx),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
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
        } = self;
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
    for (name, cluster) in &shared.clusters {
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
        };
        let weak = Arc::downgrade(shared);
        let database = name.clone();
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
