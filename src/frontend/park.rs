//! The parking lot: clients idle for a while wait here without a task.
//!
//! An idle session costs a tokio task (a cell of at least 256 bytes plus its
//! future) and a tokio socket registration (256 bytes) whatever it holds;
//! that floor alone was above pgbouncer's memory per idle client
//! (docs/performance.md). Idle for `park_idle_clients_after`, a plain-TCP
//! client therefore gives both up: its socket leaves tokio and is watched by
//! the lot's own epoll set (mio, on a thread of the lot's own that sleeps in
//! `epoll_wait`), and what the session must keep (`session/parked.rs`) waits
//! in a slab. The first of these gives it a task again, on the runtime:
//! - the socket becomes readable (a message, or the client closing);
//! - the client is killed (`KILL`, `KILL_CLIENT`): the kill wakes the lot's
//!   waker, registered in the client's entry in place of the task's;
//! - the process drains or stops (the phase change wakes the same waker);
//! - the lot ends (the proxy is gone: its phase channel closed).
//!
//! The sweep that asks idle clients to park runs here too: every
//! `park_idle_clients_after` it looks at every client, and asks those that
//! were idle with the same request time at the previous sweep (see
//! `ClientInfo::sweep_for_parking`). A client is therefore parked after
//! between one and two periods of idleness. Parking and waking cost a few
//! system calls (the socket leaves one epoll set for another) and a task
//! spawn: nothing on the path of a busy client.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tokio::sync::watch;

use super::session::parked::Parked;
use crate::proxy::{Phase, Shared};

/// How often the sweep looks again while parking is off.
const SWEEP_OFF_PERIOD: Duration = Duration::from_secs(1);
/// Events taken per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 256;
/// The lot's own wake-up (parked clients use slab keys below it).
const WAKE: Token = Token(usize::MAX);
/// The slab keeps room for as many clients as were ever parked at once;
/// past this many slots, and at most a quarter of them used, a sweep
/// compacts it (~200 bytes a slot).
const COMPACT_ABOVE_SLOTS: usize = 1024;

/// Parked clients of one proxy.
pub struct ParkingLot {
    /// Registers parked sockets; `None` if the epoll set could not be made
    /// (nothing parks then).
    registry: Option<mio::Registry>,
    /// Taken by the lot's thread when it starts.
    poll: Mutex<Option<Poll>>,
    parked: Mutex<Slab<Parked>>,
    /// Set while the lot's thread runs; nothing parks otherwise.
    open: AtomicBool,
    /// The proxy finished: the lot releases everyone and ends.
    closing: AtomicBool,
    signal: Arc<Signal>,
    /// Wakes the lot to look at every parked client (a kill or a phase
    /// change): what a parked client's entry holds instead of a task's
    /// waker.
    waker: Waker,
}

/// Behind the lot's waker.
struct Signal {
    look: AtomicBool,
    wake: Option<mio::Waker>,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.look.store(true, Ordering::Release);
        if let Some(w) = &self.wake {
            let _ = w.wake();
        }
    }
}

impl Default for ParkingLot {
    fn default() -> Self {
        Self::new()
    }
}

impl ParkingLot {
    pub fn new() -> Self {
        let made = Poll::new().and_then(|poll| {
            let registry = poll.registry().try_clone()?;
            let wake = mio::Waker::new(poll.registry(), WAKE)?;
            Ok((poll, registry, wake))
        });
        let (poll, registry, wake) = match made {
            Ok((p, r, w)) => (Some(p), Some(r), Some(w)),
            Err(e) => {
                tracing::warn!(error = %e, "no epoll set for parking idle clients; they keep their tasks");
                (None, None, None)
            }
        };
        let signal = Arc::new(Signal {
            look: AtomicBool::new(false),
            wake,
        });
        Self {
            registry,
            poll: Mutex::new(poll),
            parked: Mutex::new(Slab::new()),
            open: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            waker: Waker::from(signal.clone()),
            signal,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slab<Parked>> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Clients parked now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slots the slab holds room for, used or not.
    pub fn slots(&self) -> usize {
        self.lock().capacity()
    }

    /// Gives back the room of clients no longer parked once few of its
    /// slots are used: the parked move to the lowest free keys (their
    /// sockets re-registered under them), the rest is freed. Runs on the
    /// lot's thread, the only one that takes clients out by key.
    fn compact(&self) {
        let Some(registry) = &self.registry else {
            return;
        };
        let mut parked = self.lock();
        if parked.capacity() <= COMPACT_ABOVE_SLOTS || parked.len() > parked.capacity() / 4 {
            return;
        }
        parked.compact(|p, _from, to| {
            // A readiness already queued is delivered under the new token.
            let fd = p.socket().as_raw_fd();
            registry
                .reregister(&mut SourceFd(&fd), Token(to), Interest::READABLE)
                .is_ok()
        });
    }

    /// Takes a client in; when it cannot, the client gets a task again at
    /// once.
    pub(crate) fn park(&self, p: Parked, shared: &Arc<Shared>) {
        if let Err(p) = self.try_park(p, &shared.phase) {
            p.resume(shared);
        }
    }

    #[allow(clippy::result_large_err)] // given back to `park`, never stored
    fn try_park(&self, p: Parked, phase: &watch::Receiver<Phase>) -> Result<(), Parked> {
        let Some(registry) = &self.registry else {
            return Err(p);
        };
        let mut parked = self.lock();
        // Under the lock: the lot closes under it too, then releases all.
        if !self.open.load(Ordering::Acquire) {
            return Err(p);
        }
        let entry = parked.vacant_entry();
        let fd = p.socket().as_raw_fd();
        // Edge-triggered, but a socket that is readable when added reports
        // it: bytes that came before this call wake the client at once. mio
        // asks for EPOLLRDHUP too: the client closing wakes it.
        if let Err(e) =
            registry.register(&mut SourceFd(&fd), Token(entry.key()), Interest::READABLE)
        {
            tracing::debug!(error = %e, "could not park an idle client");
            return Err(p);
        }
        // From here a kill or a phase change wakes the lot. One that came
        // before woke the ended task: look now.
        p.client().parked(&self.waker);
        let look = p.client().is_killed() || *phase.borrow() >= Phase::Draining;
        entry.insert(p);
        drop(parked);
        if look {
            self.waker.wake_by_ref();
        }
        Ok(())
    }

    /// Takes client `key` out and gives it a task (the caller is in the
    /// runtime's context).
    fn release(&self, key: usize, shared: &Arc<Shared>) {
        let Some(p) = self.lock().try_remove(key) else {
            return;
        };
        if let Some(registry) = &self.registry {
            // Before the socket can be closed or enter tokio's set.
            let fd = p.socket().as_raw_fd();
            let _ = registry.deregister(&mut SourceFd(&fd));
        }
        p.resume(shared);
    }

    /// Releases the clients that were killed, or all of them.
    fn look(&self, shared: &Arc<Shared>, all: bool) {
        let keys: Vec<usize> = self
            .lock()
            .iter()
            .filter(|(_, p)| all || p.client().is_killed())
            .map(|(k, _)| k)
            .collect();
        for k in keys {
            self.release(k, shared);
        }
    }

    /// The proxy has finished: the lot's thread gives every client still
    /// parked a task again and ends.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.waker.wake_by_ref();
    }

    /// Starts the lot's thread (once per proxy, from within its runtime).
    /// It serves until the proxy finishes ([`ParkingLot::close`]) or its
    /// phase channel closes, then gives every client still parked a task
    /// again.
    pub fn start(shared: &Arc<Shared>) {
        let Some(poll) = shared
            .parking
            .poll
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let runtime = tokio::runtime::Handle::current();
        let shared = shared.clone();
        let started = std::thread::Builder::new()
            .name("pgsluice-park".into())
            .spawn(move || {
                // Resumed sessions register their sockets with, and are
                // spawned on, the proxy's runtime.
                let _runtime = runtime.enter();
                serve(&shared, poll);
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start the parking lot; idle clients keep their tasks");
        }
    }
}

fn serve(shared: &Arc<Shared>, mut poll: Poll) {
    let lot = &shared.parking;
    lot.open.store(true, Ordering::Release);
    let mut events = Events::with_capacity(EVENTS_PER_WAIT);
    let mut next_sweep = Instant::now() + sweep_period(shared);
    loop {
        let timeout = next_sweep.saturating_duration_since(Instant::now());
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::warn!(error = %e, "parking lot: epoll_wait failed");
                break;
            }
        }
        for ev in &events {
            if ev.token() != WAKE {
                lot.release(ev.token().0, shared);
            }
        }
        if lot.closing.load(Ordering::Acquire) || shared.phase.has_changed().is_err() {
            break;
        }
        if lot.signal.look.swap(false, Ordering::AcqRel) {
            lot.look(shared, *shared.phase.borrow() >= Phase::Draining);
        }
        if Instant::now() >= next_sweep {
            if shared.config().general.park_idle_clients_after.is_some() {
                shared.registry.for_each(|c| {
                    c.sweep_for_parking();
                });
            }
            lot.compact();
            next_sweep = Instant::now() + sweep_period(shared);
        }
    }
    {
        let _parked = lot.lock();
        lot.open.store(false, Ordering::Release);
    }
    lot.look(shared, true);
}

fn sweep_period(shared: &Shared) -> Duration {
    shared
        .config()
        .general
        .park_idle_clients_after
        .unwrap_or(SWEEP_OFF_PERIOD)
}
