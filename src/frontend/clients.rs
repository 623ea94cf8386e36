//! Every logged-in client, as the admin console and `/metrics` see it, and
//! the switch that `KILL` / `KILL_CLIENT` pull.
//!
//! A session writes its state with relaxed stores into its own entry when
//! it waits for a server, gets one and gives it back (a few plain stores
//! per transaction, no lock); readers walk the registry when asked. The
//! registry's lock is taken once at login and once at logout.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Instant, SystemTime};

use atomic_waker::AtomicWaker;

/// What a client is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Between requests, no server.
    Idle,
    /// Waiting for a server connection (or for `RESUME`).
    Waiting,
    /// A server is attached (or, for the admin console, always).
    Active,
}

impl ClientState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Waiting => "waiting",
            Self::Active => "active",
        }
    }
}

/// Who a client is; fixed at login.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    /// Shared with every other client of the user (see `Shared::admit`).
    pub user: Arc<str>,
    /// The database it connected to (for the console: `pgsluice` or
    /// `pgbouncer`).
    pub database: Arc<str>,
    pub peer: SocketAddr,
    pub local: Option<SocketAddr>,
    pub tls: bool,
    /// As the client gave it at login; clients with the same name share
    /// one copy ([`ClientRegistry::register`]).
    pub application_name: Arc<str>,
    /// An admin console connection.
    pub console: bool,
}

/// One client: its identity and live state.
#[derive(Debug)]
pub struct ClientInfo {
    /// pgsluice's process id for this client (its BackendKeyData), which
    /// `SHOW CLIENTS` shows and `KILL_CLIENT` takes.
    pub pid: i32,
    pub id: ClientIdentity,
    /// Login time, µs since the Unix epoch (see [`ClientInfo::connected`]).
    connected_us: u64,
    state: AtomicU8,
    /// µs since [`epoch`] of the last state change.
    since: AtomicU64,
    /// Node of the server it waits for or holds.
    node: AtomicU8,
    /// The attached server: its connection id + 1 (0: none), backend pid,
    /// creation (µs since the epoch) and local address (see `pack`).
    link: AtomicU64,
    link_pid: AtomicI32,
    link_created: AtomicU64,
    link_local: AtomicU64,
    killed: AtomicBool,
    /// Parking (see `frontend/park.rs`): [`PARK_NONE`], [`PARK_ASKED`] or
    /// [`PARK_DONE`].
    park: AtomicU8,
    /// The request time (`since`) the parking sweep saw this client idle
    /// with last (`u64::MAX`: not idle then).
    park_mark: AtomicU64,
    kill_waker: AtomicWaker,
    /// Where a cancel request for this client goes (see `cancel.rs`).
    pub cancel: super::CancelSlot,
}

/// Not asked to park.
const PARK_NONE: u8 = 0;
/// The sweep asked the session to park at its next idle wait.
const PARK_ASKED: u8 = 1;
/// Parked: the session has no task; its socket waits in the parking lot.
const PARK_DONE: u8 = 2;

/// The server attached to a client, as `SHOW SERVERS` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub server_id: u64,
    pub pid: i32,
    pub created: Instant,
    /// The server connection's local address (for IPv6 only the port is
    /// kept: the address shows as `::`).
    pub local: Option<SocketAddr>,
    /// The server connection is encrypted.
    pub tls: bool,
}

const TLS_BIT: u64 = 1 << 50;

/// A local address in one atomic word: bit 48 set, IPv4 in bits 16..48,
/// port in bits 0..16; bit 49 for an IPv6 address (port only); 0 = none.
fn pack(a: Option<SocketAddr>) -> u64 {
    match a {
        None => 0,
        Some(SocketAddr::V4(v4)) => {
            1 << 48 | u64::from(u32::from(*v4.ip())) << 16 | u64::from(v4.port())
        }
        Some(SocketAddr::V6(v6)) => 1 << 49 | u64::from(v6.port()),
    }
}

fn unpack(w: u64) -> Option<SocketAddr> {
    let port = (w & 0xffff) as u16;
    if w & 1 << 48 != 0 {
        let ip = std::net::Ipv4Addr::from(((w >> 16) & 0xffff_ffff) as u32);
        Some(SocketAddr::from((ip, port)))
    } else if w & 1 << 49 != 0 {
        Some(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)))
    } else {
        None
    }
}

impl Link {
    pub fn of(conn: &crate::backend::ServerConn) -> Link {
        Link {
            server_id: conn.id,
            pid: conn.process_id(),
            created: conn.created,
            local: conn.local_addr,
            tls: conn.stream.is_tls(),
        }
    }
}

/// Why killed clients were killed, by entry ([`ClientInfo::key`]): kills
/// are rare, and a reason in every entry would cost each client 24 bytes.
/// An entry's reason goes with the entry.
fn kill_reasons() -> std::sync::MutexGuard<'static, Vec<(usize, Box<str>)>> {
    static REASONS: Mutex<Vec<(usize, Box<str>)>> = Mutex::new(Vec::new());
    REASONS.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for ClientInfo {
    fn drop(&mut self) {
        if self.is_killed() {
            let key = self.key();
            kill_reasons().retain(|(k, _)| *k != key);
        }
    }
}

/// The instant the entries' timestamps count from: one per process, so an
/// entry need not carry it.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl ClientInfo {
    /// Identifies this entry while it lives (its address).
    fn key(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    fn micros_since_epoch(&self, t: Instant) -> u64 {
        crate::stats::micros(t.saturating_duration_since(epoch()))
    }

    fn instant(&self, us: u64) -> Instant {
        epoch() + std::time::Duration::from_micros(us)
    }

    /// When the client logged in.
    pub fn connected(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(self.connected_us)
    }

    /// Waiting for a server on `node` since `since`.
    #[inline]
    pub fn waiting(&self, node: usize, since: Instant) {
        // A request began: a parking request from before it is stale.
        self.park.store(PARK_NONE, Ordering::Relaxed);
        self.node.store(node as u8, Ordering::Relaxed);
        self.since
            .store(self.micros_since_epoch(since), Ordering::Relaxed);
        self.state
            .store(ClientState::Waiting as u8, Ordering::Relaxed);
    }

    /// Holding server connection `id` (backend `pid`, opened at `created`)
    /// on `node`.
    #[inline]
    pub fn attached(&self, node: usize, link: Link) {
        self.node.store(node as u8, Ordering::Relaxed);
        self.link_pid.store(link.pid, Ordering::Relaxed);
        self.link_created
            .store(self.micros_since_epoch(link.created), Ordering::Relaxed);
        self.link_local.store(
            pack(link.local) | if link.tls { TLS_BIT } else { 0 },
            Ordering::Relaxed,
        );
        self.link.store(link.server_id + 1, Ordering::Relaxed);
        self.state
            .store(ClientState::Active as u8, Ordering::Relaxed);
    }

    /// Back between requests, without a server.
    #[inline]
    pub fn idle(&self) {
        self.link.store(0, Ordering::Relaxed);
        self.state.store(ClientState::Idle as u8, Ordering::Relaxed);
    }

    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }

    /// When the current state began (the request time).
    pub fn since(&self) -> Instant {
        self.instant(self.since.load(Ordering::Relaxed))
    }

    pub fn node(&self) -> usize {
        usize::from(self.node.load(Ordering::Relaxed))
    }

    pub fn link(&self) -> Option<Link> {
        let id = self.link.load(Ordering::Relaxed).checked_sub(1)?;
        Some(Link {
            server_id: id,
            pid: self.link_pid.load(Ordering::Relaxed),
            created: self.instant(self.link_created.load(Ordering::Relaxed)),
            local: unpack(self.link_local.load(Ordering::Relaxed)),
            tls: self.link_local.load(Ordering::Relaxed) & TLS_BIT != 0,
        })
    }

    /// Asks the session to close (with `reason` in its FATAL message).
    pub fn kill(&self, reason: &str) {
        {
            let mut reasons = kill_reasons();
            let key = self.key();
            reasons.retain(|(k, _)| *k != key);
            reasons.push((key, reason.into()));
        }
        self.killed.store(true, Ordering::Release);
        self.kill_waker.wake();
    }

    pub fn kill_reason(&self) -> String {
        let key = self.key();
        kill_reasons()
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, r)| r.to_string())
            .unwrap_or_default()
    }

    /// Resolves once the client is killed. Cheap to poll (an atomic load
    /// and a waker registration), so sessions keep it in their `select!`.
    pub fn killed(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.killed.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.kill_waker.register(cx.waker());
            if self.killed.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Wakes what [`ClientInfo::alerted`] waits on (after a phase change).
    pub fn nudge(&self) {
        self.kill_waker.wake();
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    /// The parking sweep's look at this client (`frontend/park.rs`): asks
    /// the session to park, and wakes it, when the client was idle with the
    /// same request time at the previous sweep too (so idle for at least
    /// the time between sweeps). Consoles, TLS clients and clients already
    /// asked or parked are left alone.
    pub(crate) fn sweep_for_parking(&self) -> bool {
        if self.id.console || self.id.tls || self.park.load(Ordering::Relaxed) != PARK_NONE {
            return false;
        }
        if self.state() != ClientState::Idle || self.is_killed() {
            self.park_mark.store(u64::MAX, Ordering::Relaxed);
            return false;
        }
        let since = self.since.load(Ordering::Relaxed);
        if self.park_mark.swap(since, Ordering::Relaxed) != since {
            return false;
        }
        self.park.store(PARK_ASKED, Ordering::Relaxed);
        self.kill_waker.wake();
        true
    }

    /// The session declined to park (it was not at rest): ask again later.
    pub(crate) fn park_declined(&self) {
        self.park.store(PARK_NONE, Ordering::Relaxed);
        self.park_mark.store(u64::MAX, Ordering::Relaxed);
    }

    /// The session parked: from now on `waker` (the parking lot's) is what
    /// a kill or a phase change wakes.
    pub(crate) fn parked(&self, waker: &std::task::Waker) {
        self.park.store(PARK_DONE, Ordering::Relaxed);
        self.kill_waker.register(waker);
    }

    /// The session left the parking lot.
    pub(crate) fn unparked(&self) {
        self.park.store(PARK_NONE, Ordering::Relaxed);
        self.park_mark.store(u64::MAX, Ordering::Relaxed);
    }

    pub fn is_parked(&self) -> bool {
        self.park.load(Ordering::Relaxed) == PARK_DONE
    }

    /// [`ClientInfo::alerted`] for a session waiting between requests, which
    /// also reports the parking sweep's request ([`Alert::Park`]).
    pub fn alerted_idle<'a, T>(
        &'a self,
        phase: &'a tokio::sync::watch::Receiver<T>,
    ) -> impl Future<Output = Alert> + 'a {
        self.alert_when(move || {
            if self.park.load(Ordering::Relaxed) == PARK_ASKED {
                return Some(Alert::Park);
            }
            self.check_alert(phase)
        })
    }

    /// Resolves with what `check` reports, re-checked after each wake of
    /// the kill waker (registered before the second check: no lost wake).
    fn alert_when<'a>(
        &'a self,
        check: impl Fn() -> Option<Alert> + 'a,
    ) -> impl Future<Output = Alert> + 'a {
        std::future::poll_fn(move |cx| {
            if let Some(a) = check() {
                return Poll::Ready(a);
            }
            self.kill_waker.register(cx.waker());
            match check() {
                Some(a) => Poll::Ready(a),
                None => Poll::Pending,
            }
        })
    }

    fn check_alert<T>(&self, phase: &tokio::sync::watch::Receiver<T>) -> Option<Alert> {
        if self.killed.load(Ordering::Acquire) {
            return Some(Alert::Killed);
        }
        match phase.has_changed() {
            Ok(false) => None,
            Ok(true) => Some(Alert::Phase(true)),
            Err(_) => Some(Alert::Phase(false)),
        }
    }

    /// Resolves once the client is killed or `phase` holds a value the
    /// session has not seen (`Alert::Phase(false)`: its sender is gone).
    /// As cheap as [`ClientInfo::killed`]: the relay loop keeps it in its
    /// `select!` instead of `phase.changed()`, whose waiter-list
    /// registration cost more than the rest of a poll. Whoever changes the
    /// phase must [`ClientInfo::nudge`] every client afterwards
    /// (`proxy::nudge_on_phase_change`).
    pub fn alerted<'a, T>(
        &'a self,
        phase: &'a tokio::sync::watch::Receiver<T>,
    ) -> impl Future<Output = Alert> + 'a {
        self.alert_when(move || self.check_alert(phase))
    }
}

/// What [`ClientInfo::alerted`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alert {
    Killed,
    /// The phase changed (`false`: its sender is gone).
    Phase(bool),
    /// The parking sweep asks the idle session to park
    /// ([`ClientInfo::alerted_idle`] only).
    Park,
}

/// The clients logged in now, by pid.
#[derive(Default)]
pub struct ClientRegistry {
    inner: Arc<Inner>,
}

/// How many distinct application names the registry shares.
const SHARED_APP_NAMES: usize = 64;

#[derive(Default)]
struct Inner {
    clients: Mutex<HashMap<i32, Arc<ClientInfo>>>,
    /// Application names of recent logins, held weakly.
    app_names: Mutex<Vec<std::sync::Weak<str>>>,
}

impl Inner {
    /// Replaces `name` by an equal live copy if one is known (a driver's
    /// name in thousands of entries is then kept once); otherwise
    /// remembers it, forgetting dead names, then the oldest.
    fn share_app_name(&self, name: &mut Arc<str>) {
        let mut names = self.app_names.lock().unwrap_or_else(|e| e.into_inner());
        for known in names.iter() {
            if let Some(known) = known.upgrade() {
                if known == *name {
                    *name = known;
                    return;
                }
            }
        }
        names.retain(|w| w.strong_count() > 0);
        if names.len() >= SHARED_APP_NAMES {
            names.remove(0);
        }
        names.push(Arc::downgrade(name));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Arc<ClientInfo>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A registered client; dropping it removes the client from the registry.
pub struct ClientHandle {
    info: Arc<ClientInfo>,
    registry: Arc<Inner>,
}

impl std::ops::Deref for ClientHandle {
    type Target = ClientInfo;
    fn deref(&self) -> &ClientInfo {
        &self.info
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.info.pid);
    }
}

impl ClientRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A process id for a client logging in: the next of `cancels` that no
    /// live client has (a long-lived client keeps its id when the counter
    /// wraps). Concurrent logins get distinct ones from the counter.
    pub fn new_pid(&self, cancels: &super::CancelRegistry) -> i32 {
        let clients = self.inner.lock();
        loop {
            let pid = cancels.next_pid();
            if !clients.contains_key(&pid) {
                return pid;
            }
        }
    }

    /// Registers a logged-in client under the process id and cancel key it
    /// was given ([`ClientRegistry::new_pid`]); dropping the handle removes
    /// it. Registered only once logged in: allocated after the login's
    /// temporaries, the entry leaves no hole in the heap when they go.
    pub fn register(
        &self,
        pid: i32,
        cancel: super::CancelSlot,
        mut id: ClientIdentity,
    ) -> ClientHandle {
        self.inner.share_app_name(&mut id.application_name);
        let now = Instant::now();
        let info = Arc::new(ClientInfo {
            pid,
            state: AtomicU8::new(if id.console {
                ClientState::Active as u8
            } else {
                ClientState::Idle as u8
            }),
            id,
            connected_us: crate::stats::micros(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default(),
            ),
            since: AtomicU64::new(crate::stats::micros(now.saturating_duration_since(epoch()))),
            node: AtomicU8::new(0),
            link: AtomicU64::new(0),
            link_pid: AtomicI32::new(0),
            link_created: AtomicU64::new(0),
            link_local: AtomicU64::new(0),
            killed: AtomicBool::new(false),
            park: AtomicU8::new(PARK_NONE),
            park_mark: AtomicU64::new(u64::MAX),
            kill_waker: AtomicWaker::new(),
            cancel,
        });
        let replaced = self.inner.lock().insert(pid, info.clone());
        debug_assert!(replaced.is_none(), "process id {pid} given twice");
        ClientHandle {
            info,
            registry: self.inner.clone(),
        }
    }

    pub fn get(&self, pid: i32) -> Option<Arc<ClientInfo>> {
        self.inner.lock().get(&pid).cloned()
    }

    /// Every client, ordered by pid.
    pub fn all(&self) -> Vec<Arc<ClientInfo>> {
        let mut v: Vec<_> = self.inner.lock().values().cloned().collect();
        v.sort_by_key(|c| c.pid);
        v
    }

    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    /// Calls `f` on every client, under the registry's lock (no copy of the
    /// list; `f` must be quick).
    pub fn for_each(&self, mut f: impl FnMut(&ClientInfo)) {
        for c in self.inner.lock().values() {
            f(c);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::CancelSlot;
    use std::time::Duration;

    fn identity() -> ClientIdentity {
        ClientIdentity {
            user: "u".into(),
            database: "d".into(),
            peer: "127.0.0.1:5000".parse().expect("addr"),
            local: None,
            tls: false,
            application_name: Arc::from(""),
            console: false,
        }
    }

    #[tokio::test]
    async fn states_links_and_kills() {
        let r = ClientRegistry::new();
        let cancels = crate::frontend::CancelRegistry::new();
        let h = r.register(r.new_pid(&cancels), CancelSlot::new(), identity());
        assert_eq!(r.len(), 1);
        assert_eq!(h.state(), ClientState::Idle);
        let t = Instant::now();
        h.waiting(2, t);
        assert_eq!((h.state(), h.node()), (ClientState::Waiting, 2));
        assert!(h.since() <= t && t - h.since() < Duration::from_micros(2));
        let link = Link {
            server_id: 0,
            pid: 4242,
            created: t,
            local: Some("127.0.0.1:50000".parse().expect("addr")),
            tls: true,
        };
        h.attached(1, link);
        assert_eq!(h.state(), ClientState::Active);
        let got = h.link().expect("linked");
        assert_eq!((got.server_id, got.pid, got.tls), (0, 4242, true));
        assert_eq!(got.local, Some("127.0.0.1:50000".parse().expect("addr")));
        for a in ["10.1.2.3:1", "[::1]:5432", "255.255.255.255:65535"] {
            let a: SocketAddr = a.parse().expect("addr");
            let back = unpack(pack(Some(a))).expect("packed");
            assert_eq!(back.port(), a.port());
            if a.is_ipv4() {
                assert_eq!(back, a);
            }
        }
        assert_eq!(unpack(pack(None)), None);
        h.idle();
        assert_eq!((h.state(), h.link()), (ClientState::Idle, None));

        let info = r.get(h.pid).expect("registered");
        let waiter = tokio::spawn(async move { info.killed().await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        h.kill("KILL_CLIENT");
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(h.kill_reason(), "KILL_CLIENT");
        drop(h);
        assert!(r.is_empty());
    }

    #[test]
    fn clients_share_equal_application_names() {
        let r = ClientRegistry::new();
        let cancels = crate::frontend::CancelRegistry::new();
        let named = |name: &str| ClientIdentity {
            application_name: Arc::from(name),
            ..identity()
        };
        let a = r.register(r.new_pid(&cancels), CancelSlot::new(), named("app"));
        let b = r.register(r.new_pid(&cancels), CancelSlot::new(), named("app"));
        let c = r.register(r.new_pid(&cancels), CancelSlot::new(), named("other"));
        assert!(Arc::ptr_eq(&a.id.application_name, &b.id.application_name));
        assert_eq!(&*c.id.application_name, "other");
        assert_ne!(a.pid, b.pid);
        // Kill reasons stay with their entry.
        b.kill("KILL b");
        assert_eq!(b.kill_reason(), "KILL b");
        assert_eq!(a.kill_reason(), "");
    }

    #[test]
    fn the_sweep_asks_clients_idle_since_the_last_sweep() {
        let r = ClientRegistry::new();
        let cancels = crate::frontend::CancelRegistry::new();
        let h = r.register(r.new_pid(&cancels), CancelSlot::new(), identity());
        // First sight of an idle client: only marked.
        assert!(!h.sweep_for_parking());
        // Idle with the same request time at the next sweep: asked.
        assert!(h.sweep_for_parking());
        // Asked already: not again.
        assert!(!h.sweep_for_parking());
        // It declined (not at rest): the count starts over.
        h.park_declined();
        assert!(!h.sweep_for_parking());
        // A request between two sweeps: not idle long enough.
        h.waiting(0, Instant::now() + Duration::from_millis(1));
        h.idle();
        assert!(!h.sweep_for_parking());
        assert!(h.sweep_for_parking());
        // Busy at a sweep: the mark is cleared.
        h.park_declined();
        assert!(!h.sweep_for_parking());
        h.waiting(0, Instant::now());
        assert!(!h.sweep_for_parking());
        h.idle();
        assert!(!h.sweep_for_parking());
        assert!(h.sweep_for_parking());
        // Parked clients, killed ones, consoles and TLS clients are never asked.
        let waker = std::task::Waker::noop();
        h.parked(waker);
        assert!(h.is_parked());
        assert!(!h.sweep_for_parking());
        h.unparked();
        h.kill("x");
        assert!(!h.sweep_for_parking());
        assert!(!h.sweep_for_parking());
        for (console, tls) in [(true, false), (false, true)] {
            let c = r.register(
                r.new_pid(&cancels),
                CancelSlot::new(),
                ClientIdentity {
                    console,
                    tls,
                    ..identity()
                },
            );
            assert!(!c.sweep_for_parking());
            assert!(!c.sweep_for_parking());
        }
    }
}
