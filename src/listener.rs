//! The client listener, and how it hands over to a new instance.
//!
//! With `general.so_reuseport`, several instances listen on one port and
//! the kernel spreads new connections over them. Linux resets the
//! connections still queued in a listener's backlog when that listener
//! closes (unless `net.ipv4.tcp_migrate_req = 1`), so a draining instance
//! that simply closed would fail a few connects. Instead, when another
//! instance listens on the same port, [`Listener::close`]:
//!
//! 1. finds which socket of the port's reuseport group is its own (it
//!    steers the group to one socket at a time with a classic-BPF program
//!    and connects to the port until its own listener sees the probe);
//! 2. attaches a program that sends every new connection to one of the
//!    *other* sockets, at random;
//! 3. keeps accepting (and serving) what was already on its way to it until
//!    nothing has arrived for [`QUIET`];
//! 4. closes. Nothing is left in its backlog to be reset.
//!
//! The program stays with the group after this instance is gone; with the
//! remaining sockets it keeps choosing among them (or falls back to the
//! kernel's hashing), and an instance that starts later resets it to the
//! kernel's hashing when it binds.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::config::General;

/// Accept queue length (the kernel caps it at `net.core.somaxconn`): a burst
/// of thousands of new clients overflowed 1,024 here (bench/scale.sh spike),
/// and every dropped SYN costs its client a retransmit of a second or more.
const BACKLOG: u32 = 4096;
/// After steering, the listener closes once nothing arrived for this long
/// (handshakes already under way finish within a round trip).
const QUIET: Duration = Duration::from_millis(200);
/// Upper bound on the whole hand-over.
const HANDOVER_LIMIT: Duration = Duration::from_secs(5);
/// How long a probe connection may take to show up on this listener.
const PROBE_WAIT: Duration = Duration::from_millis(150);

pub struct Listener {
    inner: TcpListener,
    reuseport: bool,
}

impl Listener {
    /// Binds `general.listen_addr`, with SO_REUSEPORT when
    /// `general.so_reuseport` is set.
    pub fn bind(general: &General) -> io::Result<Self> {
        let addr = general.listen_addr;
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if general.so_reuseport {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        let inner = socket.listen(BACKLOG)?;
        if general.so_reuseport {
            steer::reset(&inner);
            if !steer::migrate_enabled() {
                tracing::debug!(
                    "net.ipv4.tcp_migrate_req is 0: on shutdown pgsluice hands its queue over itself"
                );
            }
        }
        Ok(Self {
            inner,
            reuseport: general.so_reuseport,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        self.inner.accept().await
    }

    /// Stops listening. Beside another instance on the same port, new
    /// connections are first steered to it and the ones already on their
    /// way here are accepted and given to `serve`, so none is reset.
    pub async fn close(self, serve: impl Fn(TcpStream, SocketAddr)) {
        if !self.reuseport {
            return;
        }
        let Ok(local) = self.inner.local_addr() else {
            return;
        };
        let others = steer::listeners_on(local).saturating_sub(1);
        if others == 0 {
            tracing::info!(addr = %local, "no other instance listens on this port: closing the listener");
            return;
        }
        let started = Instant::now();
        match self.steer_away(local, others + 1, &serve).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot steer new connections to the other instance; closing the listener (connections queued now may be reset)");
                return;
            }
        }
        // Serve what is still on its way here, until it stops.
        let deadline = started + HANDOVER_LIMIT;
        let mut served = 0usize;
        loop {
            let until = (Instant::now() + QUIET).min(deadline);
            match tokio::time::timeout_at(until.into(), self.inner.accept()).await {
                Ok(Ok((stream, peer))) => {
                    served += 1;
                    serve(stream, peer);
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "accept failed during hand-over"),
                Err(_) => break,
            }
        }
        tracing::info!(
            addr = %local,
            accepted_during_handover = served,
            took_ms = started.elapsed().as_millis() as u64,
            "listener handed over to the other instance(s) and closed"
        );
    }

    /// Finds this listener's index in the reuseport group of `n` sockets,
    /// then sends new connections to the others.
    async fn steer_away(
        &self,
        local: SocketAddr,
        n: usize,
        serve: &impl Fn(TcpStream, SocketAddr),
    ) -> io::Result<()> {
        let target = SocketAddr::new(connectable(local.ip()), local.port());
        let mut own = None;
        for index in 0..n - 1 {
            steer::to_index(&self.inner, index)?;
            if self.probe_lands_here(target, serve).await? {
                own = Some(index);
                break;
            }
        }
        // Not found among the first n - 1: the last one.
        let own = own.unwrap_or(n - 1);
        steer::away_from(&self.inner, own, n)?;
        tracing::debug!(
            own,
            sockets = n,
            "new connections steered to the other instance(s)"
        );
        Ok(())
    }

    /// Connects to the port and reports whether this listener got the
    /// connection; clients accepted meanwhile are served.
    async fn probe_lands_here(
        &self,
        target: SocketAddr,
        serve: &impl Fn(TcpStream, SocketAddr),
    ) -> io::Result<bool> {
        let probe = tokio::time::timeout(PROBE_WAIT, TcpStream::connect(target))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "probe connect timed out"))??;
        let mine = probe.local_addr()?;
        let deadline = Instant::now() + PROBE_WAIT;
        loop {
            match tokio::time::timeout_at(deadline.into(), self.inner.accept()).await {
                Ok(Ok((_, peer))) if peer == mine => return Ok(true),
                Ok(Ok((stream, peer))) => serve(stream, peer),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(false),
            }
        }
    }
}

/// An address of this host that reaches a listener bound to `ip`.
fn connectable(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

#[cfg(target_os = "linux")]
mod steer {
    //! SO_ATTACH_REUSEPORT_CBPF programs and the count of listeners on a
    //! port (from /proc/net/tcp*).

    use std::io;
    use std::net::{IpAddr, SocketAddr};

    use nix::libc::{SKF_AD_OFF, SKF_AD_RANDOM, sock_filter, sock_fprog};
    use nix::sys::socket::{setsockopt, sockopt};
    use tokio::net::TcpListener;

    // Classic BPF opcodes (linux/filter.h).
    const LD_W_ABS: u16 = 0x20;
    const ALU_MOD_K: u16 = 0x94;
    const ALU_ADD_K: u16 = 0x04;
    const JMP_JGE_K: u16 = 0x35;
    const RET_K: u16 = 0x06;
    const RET_A: u16 = 0x16;

    fn insn(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
        sock_filter { code, jt, jf, k }
    }

    fn attach(listener: &TcpListener, mut program: Vec<sock_filter>) -> io::Result<()> {
        let prog = sock_fprog {
            len: program.len() as u16,
            filter: program.as_mut_ptr(),
        };
        setsockopt(listener, sockopt::AttachReusePortCbpf, &prog).map_err(io::Error::from)
    }

    /// Every new connection of the group goes to socket `index`.
    pub fn to_index(listener: &TcpListener, index: usize) -> io::Result<()> {
        attach(listener, vec![insn(RET_K, 0, 0, index as u32)])
    }

    /// New connections go to a random socket of the `n`, never `own`.
    /// (Indices past the group's end make the kernel fall back to hashing.)
    pub fn away_from(listener: &TcpListener, own: usize, n: usize) -> io::Result<()> {
        let random = (SKF_AD_OFF + SKF_AD_RANDOM) as u32;
        attach(
            listener,
            vec![
                insn(LD_W_ABS, 0, 0, random),
                insn(ALU_MOD_K, 0, 0, (n - 1) as u32),
                // A >= own: skip over own (A + 1); else keep A.
                insn(JMP_JGE_K, 0, 1, own as u32),
                insn(ALU_ADD_K, 0, 0, 1),
                insn(RET_A, 0, 0, 0),
            ],
        )
    }

    /// Back to the kernel's own hashing (a program returning an index past
    /// any group's end), undoing what a drained instance left.
    pub fn reset(listener: &TcpListener) {
        if let Err(e) = attach(listener, vec![insn(RET_K, 0, 0, u32::MAX)]) {
            tracing::debug!(error = %e, "cannot reset the reuseport program");
        }
    }

    /// Whether the kernel moves a closed listener's queue to the others.
    pub fn migrate_enabled() -> bool {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").is_ok_and(|v| v.trim() == "1")
    }

    /// Listening TCP sockets bound to exactly `addr` in this network
    /// namespace (this one included).
    pub fn listeners_on(addr: SocketAddr) -> usize {
        let (file, want) = match addr.ip() {
            IpAddr::V4(v4) => (
                "/proc/net/tcp",
                format!("{:08X}", u32::from_ne_bytes(v4.octets())),
            ),
            IpAddr::V6(v6) => (
                "/proc/net/tcp6",
                v6.octets()
                    .chunks(4)
                    .map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
            ),
        };
        let want = format!("{want}:{:04X}", addr.port());
        let Ok(text) = std::fs::read_to_string(file) else {
            return 1;
        };
        text.lines()
            .skip(1)
            .filter(|line| {
                let mut cols = line.split_whitespace();
                let local = cols.nth(1);
                let state = cols.nth(1);
                local == Some(want.as_str()) && state == Some("0A")
            })
            .count()
    }
}

#[cfg(not(target_os = "linux"))]
mod steer {
    use std::io;
    use std::net::SocketAddr;

    use tokio::net::TcpListener;

    pub fn to_index(_: &TcpListener, _: usize) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    pub fn away_from(_: &TcpListener, _: usize, _: usize) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    pub fn reset(_: &TcpListener) {}
    pub fn migrate_enabled() -> bool {
        false
    }
    pub fn listeners_on(_: SocketAddr) -> usize {
        1
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn general(addr: &str) -> General {
        let toml = format!(
            "[general]\nlisten_addr = \"{addr}\"\nso_reuseport = true\n\
             [databases.app]\nprimary = \"127.0.0.1:1\"\n[users.u]\npassword = \"p\"\n"
        );
        crate::config::Config::from_toml(&toml, "test", [])
            .expect("config")
            .general
    }

    /// Two listeners on one port; the first hands over: every connection
    /// made during and after the hand-over is accepted by one of them.
    #[tokio::test]
    async fn handover_steers_connections_to_the_other_listener() {
        let first = Listener::bind(&general("127.0.0.1:0")).expect("bind");
        let addr = first.local_addr().expect("addr");
        let second = Listener::bind(&general(&addr.to_string())).expect("bind beside");
        assert_eq!(steer::listeners_on(addr), 2);

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let tx2 = tx.clone();
        let second_task = tokio::spawn(async move {
            while let Ok((s, _)) = second.accept().await {
                let _ = tx2.send(("second", s));
            }
        });
        let closing = tokio::spawn(async move {
            first
                .close(move |s, _| {
                    let _ = tx.send(("first", s));
                })
                .await;
        });
        // Clients connect the whole time.
        let mut clients = std::collections::HashSet::new();
        let mut streams = Vec::new();
        for _ in 0..200 {
            let s = TcpStream::connect(addr).await.expect("connect");
            clients.insert(s.local_addr().expect("addr"));
            streams.push(s);
        }
        closing.await.expect("handover");
        for _ in 0..50 {
            let s = TcpStream::connect(addr).await.expect("connect after");
            clients.insert(s.local_addr().expect("addr"));
            streams.push(s);
        }
        // Every client was accepted by one of the two (none reset in a
        // closed backlog); probes may show up too.
        while !clients.is_empty() {
            let (_, s) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{} connections never accepted", clients.len()))
                .expect("channel");
            clients.remove(&s.peer_addr().expect("peer"));
        }
        second_task.abort();
    }
}

/// Measurement: connections lost when the first of two SO_REUSEPORT
/// listeners closes, plainly vs with the hand-over (which must lose none).
/// Takes ~40 s: `cargo test --lib listener::measure -- --ignored --nocapture`.
/// Measured (10 rounds of 8 clients connecting for ~150 ms, kernel 6.18,
/// tcp_migrate_req = 0): plain close lost 531 of 11,996 connections with a
/// busy accept loop; the hand-over lost 0 of 12,000.
#[cfg(all(test, target_os = "linux"))]
mod measure {
    use super::*;
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    async fn round(handover: bool, accept_delay: Duration) -> (usize, usize) {
        let general = |addr: &str| {
            let toml = format!(
                "[general]\nlisten_addr = \"{addr}\"\nso_reuseport = true\n\
                 [databases.app]\nprimary = \"127.0.0.1:1\"\n[users.u]\npassword = \"p\"\n"
            );
            crate::config::Config::from_toml(&toml, "m", [])
                .expect("config")
                .general
        };
        let first = Listener::bind(&general("127.0.0.1:0")).expect("bind");
        let addr = first.local_addr().expect("addr");
        let second = Listener::bind(&general(&addr.to_string())).expect("bind");
        let accepted = Arc::new(Mutex::new(HashSet::new()));
        let a2 = accepted.clone();
        let t2 = tokio::spawn(async move {
            while let Ok((_, p)) = second.accept().await {
                a2.lock().unwrap().insert(p);
            }
        });
        let a1 = accepted.clone();
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let t1 = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = first.accept() => if let Ok((_, p)) = r { a1.lock().unwrap().insert(p); },
                    _ = &mut stop_rx => break,
                }
                tokio::time::sleep(accept_delay).await;
            }
            if handover {
                let a = a1.clone();
                first
                    .close(move |_, p| {
                        a.lock().unwrap().insert(p);
                    })
                    .await;
            }
            // dropped here: closed
        });
        let clients = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let clients = clients.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..150 {
                    if let Ok(s) = TcpStream::connect(addr).await {
                        clients.lock().unwrap().push((s.local_addr().unwrap(), s));
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        let _ = stop_tx.send(());
        for t in tasks {
            let _ = t.await;
        }
        let _ = t1.await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        t2.abort();
        let clients = clients.lock().unwrap();
        let accepted = accepted.lock().unwrap();
        let lost = clients
            .iter()
            .filter(|(a, _)| !accepted.contains(a))
            .count();
        (clients.len(), lost)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore]
    async fn measure() {
        for delay in [Duration::ZERO, Duration::from_millis(2)] {
            for handover in [false, true] {
                let (mut total, mut lost) = (0, 0);
                for _ in 0..10 {
                    let (t, l) = round(handover, delay).await;
                    total += t;
                    lost += l;
                }
                println!(
                    "accept delay {delay:?} handover {handover}: {lost} of {total} connections lost"
                );
                if handover {
                    assert_eq!(lost, 0, "connections lost despite the hand-over");
                }
            }
        }
    }
}
