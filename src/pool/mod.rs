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
//!   panic) is closed, never handed to anyone else;
//! - settings change in place on reload ([`Pool::reconfigure`]); after a
//!   change of address, database or credential every older connection is
//!   closed as it becomes idle, never handed out again.

mod gate;
mod registry;

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rand::Rng;
use tokio::sync::oneshot;
use tracing::Instrument;

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
    /// The client cancelled its request while waiting for a server
    /// (PostgreSQL's words for a cancelled query).
    #[error("canceling statement due to user request")]
    Canceled,
}

impl PoolError {
    pub fn sqlstate(&self) -> &str {
        match self {
            Self::Timeout { .. } | Self::Paused { .. } => sqlstate::TOO_MANY_CONNECTIONS,
            Self::Server(e) => e.sqlstate(),
            Self::Closed(_) => sqlstate::ADMIN_SHUTDOWN,
            Self::Canceled => sqlstate::QUERY_CANCELED,
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

/// Boxed so that handing a connection around (idle stack, waiter, session)
/// moves a pointer, not the whole connection state.
type Handoff = Result<Box<ServerConn>, PoolError>;

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Handoff>,
}

#[derive(Default)]
struct Inner {
    /// Boxed on purpose: connections move between this stack, waiters
    /// and sessions, and a box moves as one pointer.
    #[allow(clippy::vec_box)]
    idle: Vec<Box<ServerConn>>,
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
    spec: ArcSwap<LoginSpec>,
    settings: ArcSwap<PoolSettings>,
    inner: Mutex<Inner>,
    conn_ids: Arc<AtomicU64>,
    /// Connections with a smaller id were opened with an address,
    /// database or credential that is no longer configured.
    min_valid_id: AtomicU64,
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
            spec: ArcSwap::from_pointee(spec),
            settings: ArcSwap::from_pointee(settings),
            inner: Mutex::new(Inner::default()),
            conn_ids,
            min_valid_id: AtomicU64::new(0),
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
        self.spec.load().credentials.learn(c);
        let mut g = lock(&self.inner);
        if matches!(g.login_failure, Some((_, BackendError::NoPassword { .. }))) {
            g.login_failure = None;
        }
    }

    pub fn settings(&self) -> arc_swap::Guard<Arc<PoolSettings>> {
        self.settings.load()
    }

    /// How new connections log in (address, user, database, credential).
    pub fn spec(&self) -> Arc<LoginSpec> {
        self.spec.load_full()
    }

    /// Applies reloaded settings. New checkouts and new connections use
    /// them at once; waiting clients get connections if the pool may now
    /// grow. When the address, database or configured credential changed,
    /// every connection opened before is closed as it becomes idle (and
    /// idle ones now). Returns whether connections are being replaced.
    pub fn reconfigure(self: &Arc<Self>, spec: LoginSpec, settings: PoolSettings) -> bool {
        let old = self.spec.load();
        let replace = old.addr != spec.addr
            || old.database != spec.database
            || old.user != spec.user
            || old.credentials.configured != spec.credentials.configured;
        drop(old);
        self.spec.store(Arc::new(spec));
        self.settings.store(Arc::new(settings));
        let mut g = lock(&self.inner);
        if replace {
            self.min_valid_id
                .store(self.conn_ids.load(Ordering::Relaxed), Ordering::Relaxed);
            g.login_failure = None;
        }
        self.trim_idle(&mut g);
        let _ = self.grow(&mut g, self.settings.load().pool_size);
        replace
    }

    /// Whether `conn` was opened before the last change of address,
    /// database or credential.
    fn outdated(&self, conn: &ServerConn) -> bool {
        conn.id < self.min_valid_id.load(Ordering::Relaxed)
    }

    /// Closes idle connections that are outdated or beyond `max_pool_size`.
    fn trim_idle(&self, g: &mut MutexGuard<'_, Inner>) {
        let max = self.settings.load().max_pool_size;
        let idle = std::mem::take(&mut g.idle);
        for conn in idle {
            if self.outdated(&conn) || g.open > max {
                g.open -= 1;
                tracing::debug!(pool = %self.label, pid = conn.process_id(), "closing idle server connection after reload");
                conn.terminate();
            } else {
                g.idle.push(conn);
            }
        }
    }

    pub fn stats(&self) -> &crate::stats::PoolStats {
        &self.stats
    }

    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// The server this pool connects to.
    pub fn addr(&self) -> crate::config::ServerAddr {
        self.spec.load().addr.clone()
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

    /// An idle server connection if one can be had at once: no wait, no
    /// new connection. `None` sends the caller to [`Pool::checkout_by`],
    /// whose larger future it can then box (the common case needs none).
    pub fn try_checkout_idle(self: &Arc<Self>) -> Option<Pooled> {
        if self.gate.is_paused() {
            return None;
        }
        let mut g = lock(&self.inner);
        if g.closed {
            return None;
        }
        self.take_idle(&mut g)
    }

    /// The most recently used clean idle connection; stale ones met on the
    /// way are closed.
    fn take_idle(self: &Arc<Self>, g: &mut Inner) -> Option<Pooled> {
        while let Some(mut conn) = g.idle.pop() {
            if conn.is_clean_idle() && !retired(&conn) && !self.outdated(&conn) {
                self.stats.assigned(Duration::ZERO);
                return Some(Pooled::new(conn, self.clone()));
            }
            g.open -= 1;
            tracing::debug!(pool = %self.label, pid = conn.process_id(), "dropping stale idle server connection");
        }
        None
    }

    /// Takes a server connection, waiting up to `checkout_timeout`.
    pub async fn checkout(self: &Arc<Self>) -> Result<Pooled, PoolError> {
        let started = Instant::now();
        let timeout = self.settings.load().checkout_timeout;
        self.checkout_by(started, started + timeout).await
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
        let settings = self.settings.load_full();
        let mut queued = {
            let mut g = lock(&self.inner);
            if g.closed {
                return Err(PoolError::Closed(self.label.clone()));
            }
            if let Some(conn) = self.take_idle(&mut g) {
                return Ok(conn);
            }
            let (tx, rx) = oneshot::channel();
            let id = g.next_waiter;
            g.next_waiter += 1;
            g.waiters.push_back(Waiter { id, tx });
            // On failure the queue, this waiter included, was emptied.
            self.grow(&mut g, settings.pool_size)?;
            // A checkout abandoned while waiting (the client's cancel, or
            // the client went away) leaves the queue when dropped.
            Queued {
                pool: self,
                id,
                rx,
                done: false,
            }
        };

        let reserve = settings.max_pool_size > settings.pool_size;
        if reserve {
            let reserve_at = (started + settings.reserve_pool_timeout).min(deadline);
            match tokio::time::timeout_at(reserve_at.into(), &mut queued.rx).await {
                Ok(r) => {
                    queued.done = true;
                    return self.received(r, started);
                }
                Err(_) => {
                    let mut g = lock(&self.inner);
                    // Clients are waiting longer than the reserve delay: pressure.
                    let _ = self.grow(&mut g, self.settings.load().max_pool_size);
                }
            }
        }
        let waited = tokio::time::timeout_at(deadline.into(), &mut queued.rx).await;
        queued.done = true;
        match waited {
            Ok(r) => self.received(r, started),
            Err(_) => {
                let mut g = lock(&self.inner);
                let before = g.waiters.len();
                g.waiters.retain(|w| w.id != queued.id);
                if g.waiters.len() < before {
                    drop(g);
                    return Err(PoolError::Timeout {
                        pool: self.label.clone(),
                        timeout: humantime::format_duration(settings.checkout_timeout).to_string(),
                    });
                }
                drop(g);
                // Handed a connection (under the lock) just as time ran out.
                match queued.rx.try_recv() {
                    Ok(r) => self.received(Ok(r), started),
                    Err(_) => Err(PoolError::Timeout {
                        pool: self.label.clone(),
                        timeout: humantime::format_duration(settings.checkout_timeout).to_string(),
                    }),
                }
            }
        }
    }

    fn paused_error(&self) -> PoolError {
        PoolError::Paused {
            database: self.label.split('/').next().unwrap_or_default().to_owned(),
            timeout: humantime::format_duration(self.settings.load().checkout_timeout).to_string(),
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
    /// opened gets one, up to `limit` in total.
    ///
    /// While a recent login failure blocks new connects and nothing is open
    /// or opening, no waiter could ever be served: all of them fail now with
    /// that login's error (a replica's readers then go to the primary), and
    /// so does this call. Every place that closes or fails a connection
    /// calls this, so a waiter is never left to wait out `checkout_timeout`
    /// in a pool with nothing that could serve it.
    fn grow(
        self: &Arc<Self>,
        g: &mut MutexGuard<'_, Inner>,
        limit: usize,
    ) -> Result<(), PoolError> {
        if let Some((at, err)) = &g.login_failure {
            if at.elapsed() < self.settings.load().server_login_retry {
                if g.open == 0 && g.opening == 0 {
                    let err = PoolError::Server(err.clone());
                    for w in g.waiters.drain(..) {
                        let _ = w.tx.send(Err(err.clone()));
                    }
                    return Err(err);
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
        let spec = self.spec.load_full();
        let span = tracing::info_span!("server", pool = %self.label, addr = %spec.addr, conn = id, pid = tracing::field::Empty);
        tokio::spawn(
            async move {
                let result = ServerConn::connect(&spec, id).await;
                if let Ok(conn) = &result {
                    tracing::Span::current().record("pid", conn.process_id());
                }
                pool.connected(result);
            }
            .instrument(span),
        );
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
                if let Some(lifetime) = self.settings.load().server_lifetime {
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
                if self.outdated(&conn) {
                    // Opened with a setting a reload has since replaced.
                    g.open -= 1;
                    conn.terminate();
                    let _ = self.grow(&mut g, self.settings.load().pool_size);
                    return;
                }
                Self::hand_off(&mut g, Box::new(conn));
            }
            Err(err) => {
                tracing::warn!(pool = %self.label, error = %err, "server login failed");
                let mut g = lock(&self.inner);
                g.opening -= 1;
                g.login_failure = Some((Instant::now(), err));
                // With nothing else open or opening, the waiters fail now.
                let _ = self.grow(&mut g, self.settings.load().pool_size);
            }
        }
    }

    /// Gives `conn` to the longest waiter still waiting, else parks it idle.
    fn hand_off(g: &mut MutexGuard<'_, Inner>, mut conn: Box<ServerConn>) {
        while let Some(w) = g.waiters.pop_front() {
            match w.tx.send(Ok(conn)) {
                Ok(()) => return,
                Err(Ok(back)) => conn = back,
                Err(Err(_)) => unreachable!("only connections are handed off here"),
            }
        }
        g.idle.push(conn);
    }

    fn release(self: &Arc<Self>, mut conn: Box<ServerConn>) {
        conn.last_used = Instant::now();
        conn.forget_read_readiness();
        if retired(&conn) {
            tracing::debug!(pool = %self.label, pid = conn.process_id(), "server_lifetime reached; closing");
            self.discard(conn);
            return;
        }
        if self.outdated(&conn) {
            tracing::debug!(pool = %self.label, pid = conn.process_id(), "server address or credential changed by a reload; closing");
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
        if g.open > self.settings.load().max_pool_size {
            // max_pool_size was lowered by a reload.
            g.open -= 1;
            drop(g);
            conn.terminate();
            return;
        }
        Self::hand_off(&mut g, conn);
    }

    fn discard(self: &Arc<Self>, conn: Box<ServerConn>) {
        let created = conn.created;
        conn.terminate();
        let mut g = lock(&self.inner);
        if g.reconnect_before.is_some_and(|t| created <= t) {
            g.close_needed = g.close_needed.saturating_sub(1);
        }
        g.open -= 1;
        // Replace it if someone is waiting.
        let _ = self.grow(&mut g, self.settings.load().pool_size);
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
        let settings = self.settings.load_full();
        let min = settings.min_pool_size;
        let idle_timeout = settings.server_idle_timeout;
        let mut keep = Vec::with_capacity(g.idle.len());
        let mut open = g.open;
        // Oldest idle first (the front of the LIFO stack).
        for mut conn in std::mem::take(&mut g.idle) {
            let idle_expired =
                idle_timeout.is_some_and(|t| now.duration_since(conn.last_used) >= t) && open > min;
            if idle_expired
                || retired(&conn)
                || self.outdated(&conn)
                || open > settings.max_pool_size
                || !conn.is_clean_idle()
            {
                open -= 1;
                conn.terminate();
            } else {
                keep.push(conn);
            }
        }
        g.idle = keep;
        g.open = open;
        if !g.waiters.is_empty() {
            // Waiters left behind by a change nobody else followed up (a
            // login failure expiring, connections closed above): open
            // connections for them, or fail them if nothing can.
            let _ = self.grow(&mut g, settings.pool_size);
        }
        let recently_failed = g
            .login_failure
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < settings.server_login_retry);
        while !recently_failed && !self.gate.is_paused() && g.open + g.opening < min {
            g.opening += 1;
            self.spawn_connect();
        }
    }
}

impl Drop for Pool {
    /// A pool a reload removed goes when its last client does: its idle
    /// connections say goodbye to their servers.
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        for conn in inner.idle.drain(..) {
            conn.terminate();
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

/// A client's place in a pool's queue. Dropped before its checkout
/// finished (the client cancelled, or went away), it leaves the queue; a
/// connection already handed to it goes to the next waiter.
struct Queued<'a> {
    pool: &'a Pool,
    id: u64,
    rx: oneshot::Receiver<Handoff>,
    /// The checkout ended normally.
    done: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut g = lock(&self.pool.inner);
        let before = g.waiters.len();
        g.waiters.retain(|w| w.id != self.id);
        if g.waiters.len() == before {
            // Not queued any more: served under this lock already.
            if let Ok(Ok(conn)) = self.rx.try_recv() {
                Pool::hand_off(&mut g, conn);
            }
        }
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
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
}

impl Pooled {
    fn new(conn: Box<ServerConn>, pool: Arc<Pool>) -> Self {
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
