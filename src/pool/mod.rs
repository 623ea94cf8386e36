//! Server connection pools, one per (node, database, user).
//!
//! Guarantees:
//! - idle connections are reused LIFO (warm caches, and the oldest ones age
//!   out under `server_idle_timeout`);
//! - waiters are served FIFO by direct hand-off: a released connection goes
//!   to the longest waiter under the pool lock, never back through the idle
//!   list where a newcomer could take it;
//! - new connections are opened in parallel, one per waiting client, up to
//!   `pool_size`, and up to `max_pool_size` once a client has waited longer
//!   than `reserve_pool_timeout`;
//! - a failed login is remembered for `server_login_retry`: clients that
//!   nothing could serve fail fast with that error instead of piling up;
//! - a checkout that waits `checkout_timeout` fails with 53300 naming the pool
//!   and the setting; a merely busy pool is never treated as a dead server;
//! - a connection that is not explicitly released (client vanished, error,
//!   panic) is closed, never handed to anyone else.

mod gate;
mod registry;

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::oneshot;

use crate::backend::{BackendError, LoginSpec, ServerConn, ServerParams};
use crate::config::PoolSettings;
use crate::protocol::sqlstate;

pub use gate::Gate;
pub use registry::{NodePools, PoolEntry, Pools, node_name, shard_group};

#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    #[error("no server connection available within checkout_timeout ({timeout}) for pool {pool}")]
    Timeout { pool: String, timeout: String },
    #[error("{0}")]
    Server(BackendError),
    #[error("pool {0} is shutting down")]
    Closed(String),
    #[error(
        "database \"{database}\" is paused (admin console PAUSE) and was not resumed within checkout_timeout ({timeout})"
    )]
    Paused { database: String, timeout: String },
}

impl PoolError {
    pub fn sqlstate(&self) -> &str {
        match self {
            Self::Timeout { .. } | Self::Paused { .. } => sqlstate::TOO_MANY_CONNECTIONS,
            Self::Server(e) => e.sqlstate(),
            Self::Closed(_) => sqlstate::ADMIN_SHUTDOWN,
        }
    }
}

/// A snapshot of a pool's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStatus {
    pub idle: usize,
    /// Open connections, idle or in use.
    pub open: usize,
    pub opening: usize,
    pub waiting: usize,
    /// Open connections that a `RECONNECT` marked for closing (closed as
    /// soon as their client releases them).
    pub close_needed: usize,
}

type Handoff = Result<ServerConn, PoolError>;

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Handoff>,
}

#[derive(Default)]
struct Inner {
    idle: Vec<ServerConn>,
    waiters: VecDeque<Waiter>,
    open: usize,
    opening: usize,
    /// Last login failure; blocks new connects for `server_login_retry`.
    login_failure: Option<(Instant, BackendError)>,
    closed: bool,
    next_waiter: u64,
    /// `RECONNECT`: connections created up to this instant are closed when
    /// released; `close_needed` of them are still open.
    reconnect_before: Option<Instant>,
    close_needed: usize,
}

impl Inner {
    fn marked(&self, conn: &ServerConn) -> bool {
        self.reconnect_before.is_some_and(|t| conn.created <= t)
    }
}

/// An idle server connection as the admin console shows it.
#[derive(Debug, Clone)]
pub struct IdleServer {
    pub id: u64,
    pub pid: i32,
    pub created: Instant,
    pub last_used: Instant,
    pub local_addr: Option<std::net::SocketAddr>,
    pub tls: bool,
}

pub struct Pool {
    label: String,
    spec: LoginSpec,
    settings: PoolSettings,
    inner: Mutex<Inner>,
    conn_ids: Arc<AtomicU64>,
    /// ParameterStatus set of the first server login, for client welcomes.
    welcome: Mutex<Option<Arc<ServerParams>>>,
    /// The database's PAUSE/DISABLE switches (shared by its pools).
    gate: Arc<Gate>,
    /// Traffic counters (admin console, /metrics).
    stats: crate::stats::PoolStats,
}

impl Pool {
    pub fn new(
        label: String,
        spec: LoginSpec,
        settings: PoolSettings,
        conn_ids: Arc<AtomicU64>,
        gate: Arc<Gate>,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            label,
            spec,
            settings,
            inner: Mutex::new(Inner::default()),
            conn_ids,
            welcome: Mutex::new(None),
            gate,
            stats: crate::stats::PoolStats::default(),
        });
        tokio::spawn(maintain(Arc::downgrade(&pool)));
        pool
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Remembers a credential a client's login taught us (its cleartext
    /// password or SCRAM keys for pass-through), and forgets a cached
    /// login failure so the next checkout tries it.
    pub fn learn_credential(&self, c: crate::auth::ServerCredential) {
        self.spec.credentials.learn(c);
        let mut g = lock(&self.inner);
        if matches!(g.login_failure, Some((_, BackendError::NoPassword { .. }))) {
            g.login_failure = None;
        }
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    pub fn stats(&self) -> &crate::stats::PoolStats {
        &self.stats
    }

    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// The server this pool connects to.
    pub fn addr(&self) -> &crate::config::ServerAddr {
        &self.spec.addr
    }

    /// `RECONNECT`: closes the idle connections now and every other open
    /// one when its client releases it.
    pub fn reconnect(&self) {
        let mut g = lock(&self.inner);
        g.reconnect_before = Some(Instant::now());
        let idle = std::mem::take(&mut g.idle);
        g.open -= idle.len();
        g.close_needed = g.open;
        drop(g);
        for c in idle {
            c.terminate();
        }
    }

    /// When the last `RECONNECT` marked the connections open then.
    pub fn reconnect_mark(&self) -> Option<Instant> {
        lock(&self.inner).reconnect_before
    }

    /// The idle connections, for `SHOW SERVERS`.
    pub fn idle_servers(&self) -> Vec<IdleServer> {
        lock(&self.inner)
            .idle
            .iter()
            .map(|c| IdleServer {
                id: c.id,
                pid: c.process_id(),
                created: c.created,
                last_used: c.last_used,
                local_addr: c.local_addr,
                tls: c.stream.is_tls(),
            })
            .collect()
    }

    pub fn welcome_params(&self) -> Option<Arc<ServerParams>> {
        lock(&self.welcome).clone()
    }

    pub fn status(&self) -> PoolStatus {
        let g = lock(&self.inner);
        PoolStatus {
            idle: g.idle.len(),
            open: g.open,
            opening: g.opening,
            waiting: g.waiters.len(),
            close_needed: g.close_needed,
        }
    }

    /// Forgets the last login failure (the server is known to answer again).
    pub fn forget_login_failure(&self) {
        lock(&self.inner).login_failure = None;
    }

    /// Takes a server connection, waiting up to `checkout_timeout`.
    pub async fn checkout(self: &Arc<Self>) -> Result<Pooled, PoolError> {
        let started = Instant::now();
        self.checkout_by(started, started + self.settings.checkout_timeout)
            .await
    }

    /// Takes a server connection for a client that started waiting at
    /// `started`, giving up at `deadline` (one deadline across every pool a
    /// client tries).
    pub async fn checkout_by(
        self: &Arc<Self>,
        started: Instant,
        deadline: Instant,
    ) -> Result<Pooled, PoolError> {
        if self.gate.is_paused() && !self.gate.wait_resumed(deadline).await {
            return Err(self.paused_error());
        }
        let (id, mut rx) = {
            let mut g = lock(&self.inner);
            if g.closed {
                return Err(PoolError::Closed(self.label.clone()));
            }
            while let Some(mut conn) = g.idle.pop() {
                if conn.is_clean_idle() && !retired(&conn) {
                    self.stats.assigned(Duration::ZERO);
                    return Ok(Pooled::new(conn, self.clone()));
                }
                g.open -= 1;
                tracing::debug!(pool = %self.label, pid = conn.process_id(), "dropping stale idle server connection");
            }
            let (tx, rx) = oneshot::channel();
            let id = g.next_waiter;
            g.next_waiter += 1;
            g.waiters.push_back(Waiter { id, tx });
            if let Err(e) = self.grow(&mut g, self.settings.pool_size) {
                g.waiters.retain(|w| w.id != id);
                return Err(e);
            }
            (id, rx)
        };

        let reserve = self.settings.max_pool_size > self.settings.pool_size;
        if reserve {
            let reserve_at = (started + self.settings.reserve_pool_timeout).min(deadline);
            match tokio::time::timeout_at(reserve_at.into(), &mut rx).await {
                Ok(r) => return self.received(r, started),
                Err(_) => {
                    let mut g = lock(&self.inner);
                    // Clients are waiting longer than the reserve delay: pressure.
                    let _ = self.grow(&mut g, self.settings.max_pool_size);
                }
            }
        }
        match tokio::time::timeout_at(deadline.into(), &mut rx).await {
            Ok(r) => self.received(r, started),
            Err(_) => {
                let mut g = lock(&self.inner);
                let before = g.waiters.len();
                g.waiters.retain(|w| w.id != id);
                if g.waiters.len() < before {
                    drop(g);
                    return Err(PoolError::Timeout {
                        pool: self.label.clone(),
                        timeout: humantime::format_duration(self.settings.checkout_timeout)
                            .to_string(),
                    });
                }
                drop(g);
                // Handed a connection (under the lock) just as time ran out.
                match rx.try_recv() {
                    Ok(r) => self.received(Ok(r), started),
                    Err(_) => Err(PoolError::Timeout {
                        pool: self.label.clone(),
                        timeout: humantime::format_duration(self.settings.checkout_timeout)
                            .to_string(),
                    }),
                }
            }
        }
    }

    fn paused_error(&self) -> PoolError {
        PoolError::Paused {
            database: self.label.split('/').next().unwrap_or_default().to_owned(),
            timeout: humantime::format_duration(self.settings.checkout_timeout).to_string(),
        }
    }

    fn received(
        self: &Arc<Self>,
        r: Result<Handoff, oneshot::error::RecvError>,
        started: Instant,
    ) -> Result<Pooled, PoolError> {
        match r {
            Ok(Ok(conn)) => {
                self.stats.assigned(started.elapsed());
                Ok(Pooled::new(conn, self.clone()))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(PoolError::Closed(self.label.clone())),
        }
    }

    /// Opens connections so that each waiter beyond those already being
    /// opened gets one, up to `limit` in total. Fails fast if a recent login
    /// failed and nothing open could serve the waiters.
    fn grow(
        self: &Arc<Self>,
        g: &mut MutexGuard<'_, Inner>,
        limit: usize,
    ) -> Result<(), PoolError> {
        if let Some((at, err)) = &g.login_failure {
            if at.elapsed() < self.settings.server_login_retry {
                if g.open == 0 && g.opening == 0 {
                    return Err(PoolError::Server(err.clone()));
                }
                return Ok(());
            }
            g.login_failure = None;
        }
        while g.opening < g.waiters.len() && g.open + g.opening < limit {
            g.opening += 1;
            self.spawn_connect();
        }
        Ok(())
    }

    fn spawn_connect(self: &Arc<Self>) {
        let pool = self.clone();
        let id = self.conn_ids.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let result = ServerConn::connect(&pool.spec, id).await;
            pool.connected(result);
        });
    }

    fn connected(self: &Arc<Self>, result: Result<ServerConn, BackendError>) {
        match result {
            Ok(mut conn) => {
                {
                    let mut w = lock(&self.welcome);
                    if w.is_none() {
                        *w = Some(Arc::new(conn.params.clone()));
                    }
                }
                if let Some(lifetime) = self.settings.server_lifetime {
                    // Stagger retirements over the last fifth of the lifetime
                    // so connections opened together do not all close together.
                    let jitter = rand::rng().random_range(0.8..=1.0);
                    conn.retire_at = Some(conn.created + lifetime.mul_f64(jitter));
                }
                tracing::debug!(pool = %self.label, pid = conn.process_id(), "server connection opened");
                let mut g = lock(&self.inner);
                g.opening -= 1;
                g.open += 1;
                g.login_failure = None;
                if g.marked(&conn) {
                    // Still logging in when RECONNECT came: already new.
                    conn.created = Instant::now();
                }
                if g.closed {
                    g.open -= 1;
                    return;
                }
                Self::hand_off(&mut g, conn);
            }
            Err(err) => {
                tracing::warn!(pool = %self.label, error = %err, "server login failed");
                let mut g = lock(&self.inner);
                g.opening -= 1;
                g.login_failure = Some((Instant::now(), err.clone()));
                if g.open == 0 && g.opening == 0 {
                    // Nothing could ever serve them: fail them now, not in 30 s.
                    for w in g.waiters.drain(..) {
                        let _ = w.tx.send(Err(PoolError::Server(err.clone())));
                    }
                }
            }
        }
    }

    /// Gives `conn` to the longest waiter still waiting, else parks it idle.
    fn hand_off(g: &mut MutexGuard<'_, Inner>, mut conn: ServerConn) {
        while let Some(w) = g.waiters.pop_front() {
            match w.tx.send(Ok(conn)) {
                Ok(()) => return,
                Err(Ok(back)) => conn = back,
                Err(Err(_)) => unreachable!("only connections are handed off here"),
            }
        }
        g.idle.push(conn);
    }

    fn release(self: &Arc<Self>, mut conn: ServerConn) {
        conn.last_used = Instant::now();
        conn.forget_read_readiness();
        if retired(&conn) {
            tracing::debug!(pool = %self.label, pid = conn.process_id(), "server_lifetime reached; closing");
            self.discard(conn);
            return;
        }
        let mut g = lock(&self.inner);
        if g.closed {
            g.open -= 1;
            return;
        }
        if g.marked(&conn) {
            drop(g);
            tracing::debug!(pool = %self.label, pid = conn.process_id(), "closing server marked by RECONNECT");
            self.discard(conn);
            return;
        }
        Self::hand_off(&mut g, conn);
    }

    fn discard(self: &Arc<Self>, conn: ServerConn) {
        let created = conn.created;
        conn.terminate();
        let mut g = lock(&self.inner);
        if g.reconnect_before.is_some_and(|t| created <= t) {
            g.close_needed = g.close_needed.saturating_sub(1);
        }
        g.open -= 1;
        // Replace it if someone is waiting.
        let _ = self.grow(&mut g, self.settings.pool_size);
    }

    /// Closes idle connections and refuses new checkouts.
    pub fn close(&self) {
        let mut g = lock(&self.inner);
        g.closed = true;
        let idle = g.idle.len();
        g.open -= idle;
        for c in g.idle.drain(..) {
            c.terminate();
        }
        for w in g.waiters.drain(..) {
            let _ = w.tx.send(Err(PoolError::Closed(self.label.clone())));
        }
    }

    /// Periodic upkeep: idle timeout, lifetime, dead idle connections,
    /// `min_pool_size`.
    fn maintain_once(self: &Arc<Self>) {
        let now = Instant::now();
        let mut g = lock(&self.inner);
        if g.closed {
            return;
        }
        let min = self.settings.min_pool_size;
        let idle_timeout = self.settings.server_idle_timeout;
        let mut keep = Vec::with_capacity(g.idle.len());
        let mut open = g.open;
        // Oldest idle first (the front of the LIFO stack).
        for mut conn in std::mem::take(&mut g.idle) {
            let idle_expired =
                idle_timeout.is_some_and(|t| now.duration_since(conn.last_used) >= t) && open > min;
            if idle_expired || retired(&conn) || !conn.is_clean_idle() {
                open -= 1;
                conn.terminate();
            } else {
                keep.push(conn);
            }
        }
        g.idle = keep;
        g.open = open;
        let recently_failed = g
            .login_failure
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < self.settings.server_login_retry);
        while !recently_failed && !self.gate.is_paused() && g.open + g.opening < min {
            g.opening += 1;
            self.spawn_connect();
        }
    }
}

async fn maintain(pool: Weak<Pool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        if lock(&pool.inner).closed {
            return;
        }
        pool.maintain_once();
    }
}

fn retired(conn: &ServerConn) -> bool {
    conn.retire_at.is_some_and(|t| Instant::now() >= t)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a pool lock leaves only counters behind, which
    // stay meaningful; keep serving rather than poisoning every client.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A checked-out server connection. Return it with [`Pooled::release`] when
/// it is clean (idle, nothing unanswered); dropping it closes it instead.
pub struct Pooled {
    conn: Option<ServerConn>,
    pool: Arc<Pool>,
}

impl Pooled {
    fn new(conn: ServerConn, pool: Arc<Pool>) -> Self {
        Self {
            conn: Some(conn),
            pool,
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Back to the pool for the next client. Only for a connection at a
    /// clean boundary (ReadyForQuery idle, nothing unanswered).
    pub fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.release(conn);
        }
    }
}

impl Deref for Pooled {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        self.conn
            .as_ref()
            .expect("connection present until release or drop")
    }
}

impl DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn
            .as_mut()
            .expect("connection present until release or drop")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.discard(conn);
        }
    }
}
