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
    pub application_name: String,
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
    pub connected: SystemTime,
    registry_epoch: Instant,
    state: AtomicU8,
    /// µs since the registry epoch of the last state change.
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
    kill_waker: AtomicWaker,
    /// Why it was killed (set before `killed`).
    kill_reason: Mutex<String>,
}

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

impl ClientInfo {
    fn micros_since_epoch(&self, t: Instant) -> u64 {
        crate::stats::micros(t.saturating_duration_since(self.registry_epoch))
    }

    fn instant(&self, us: u64) -> Instant {
        self.registry_epoch + std::time::Duration::from_micros(us)
    }

    /// Waiting for a server on `node` since `since`.
    #[inline]
    pub fn waiting(&self, node: usize, since: Instant) {
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
        *self.kill_reason.lock().unwrap_or_else(|e| e.into_inner()) = reason.to_owned();
        self.killed.store(true, Ordering::Release);
        self.kill_waker.wake();
    }

    pub fn kill_reason(&self) -> String {
        self.kill_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
        let check = move || {
            if self.killed.load(Ordering::Acquire) {
                return Some(Alert::Killed);
            }
            match phase.has_changed() {
                Ok(false) => None,
                Ok(true) => Some(Alert::Phase(true)),
                Err(_) => Some(Alert::Phase(false)),
            }
        };
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
}

/// What [`ClientInfo::alerted`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alert {
    Killed,
    /// The phase changed (`false`: its sender is gone).
    Phase(bool),
}

/// The clients logged in now, by pid.
#[derive(Default)]
pub struct ClientRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    epoch: Instant,
    clients: Mutex<HashMap<i32, Arc<ClientInfo>>>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            clients: Mutex::default(),
        }
    }
}

impl Inner {
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

    /// Registers a logged-in client under its process id.
    pub fn register(&self, pid: i32, id: ClientIdentity) -> ClientHandle {
        let now = Instant::now();
        let info = Arc::new(ClientInfo {
            pid,
            state: AtomicU8::new(if id.console {
                ClientState::Active as u8
            } else {
                ClientState::Idle as u8
            }),
            id,
            connected: SystemTime::now(),
            registry_epoch: self.inner.epoch,
            since: AtomicU64::new(crate::stats::micros(now - self.inner.epoch)),
            node: AtomicU8::new(0),
            link: AtomicU64::new(0),
            link_pid: AtomicI32::new(0),
            link_created: AtomicU64::new(0),
            link_local: AtomicU64::new(0),
            killed: AtomicBool::new(false),
            kill_waker: AtomicWaker::new(),
            kill_reason: Mutex::new(String::new()),
        });
        self.inner.lock().insert(pid, info.clone());
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

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn identity() -> ClientIdentity {
        ClientIdentity {
            user: "u".into(),
            database: "d".into(),
            peer: "127.0.0.1:5000".parse().expect("addr"),
            local: None,
            tls: false,
            application_name: String::new(),
            console: false,
        }
    }

    #[tokio::test]
    async fn states_links_and_kills() {
        let r = ClientRegistry::new();
        let h = r.register(7, identity());
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

        let info = r.get(7).expect("registered");
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
}
