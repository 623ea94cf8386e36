//! Cancel requests. Each client gets pgsluice's own BackendKeyData; a cancel
//! carrying it is forwarded, over a new connection, to the server the client
//! is using *at that moment*, with that server's key.
//!
//! Guarantee: a cancel never hits another client's query. The target is set
//! while a server is attached and cleared before the server is released, and
//! release waits for any cancel already on its way to that server to be
//! delivered, so a late cancel cannot land on the server's next client.
//! A cancel for a client waiting for a server (checkout) ends that wait:
//! the client gets 57014, as PostgreSQL answers a cancelled query (pgbouncer
//! drops such a cancel; the query would then run later). A cancel for an
//! idle client is dropped.
//!
//! Several instances (`general.instance_id`, `general.peers`): the process
//! id a client gets carries its instance's id in bits 24-30, so a cancel
//! that a load balancer sends to another instance is forwarded to the right
//! one. The secret key's lowest bit says whether the request may still be
//! forwarded: clients get it set, a forwarded request has it cleared, so a
//! request crosses at most one hop and misconfigured peers cannot loop it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::backend::{self, CancelKey};
use crate::config::ServerAddr;
use crate::frontend::ClientRegistry;
use crate::pool::{PoolError, Pooled};

/// Process ids count in the low 24 bits; the instance id sits above.
const COUNTER_BITS: u32 = 24;
const COUNTER_MASK: u32 = (1 << COUNTER_BITS) - 1;
/// Secret-key bit: the request may be forwarded to a peer (set in keys given
/// to clients, cleared in forwarded requests).
const FORWARDABLE: i32 = 1;
/// How long forwarding a cancel to a peer instance may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// The instance that handed out process id `pid`.
pub fn instance_of(pid: i32) -> u8 {
    ((pid as u32) >> COUNTER_BITS) as u8 & 0x7f
}

#[derive(Default)]
struct SlotState {
    target: Option<CancelKey>,
    in_flight: usize,
    /// The client is waiting for a server (a checkout is under way).
    waiting: bool,
    /// A cancel arrived during that wait.
    wait_cancelled: bool,
}

/// A client's cancel state; part of its registry entry
/// ([`ClientInfo`](crate::frontend::ClientInfo)), found by process id.
pub struct CancelSlot {
    secret_key: i32,
    state: Mutex<SlotState>,
}

impl std::fmt::Debug for CancelSlot {
    // The secret key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelSlot").finish_non_exhaustive()
    }
}

impl Default for CancelSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl CancelSlot {
    /// A slot with a fresh random secret key.
    pub fn new() -> Self {
        Self {
            secret_key: rand::random::<i32>() | FORWARDABLE,
            state: Mutex::new(SlotState::default()),
        }
    }

    /// Wakes whoever waits on this slot's state: a release waiting for
    /// cancels in flight to be delivered, a checkout that a cancel ends.
    /// Waiters re-check the state when woken, so slots share a few
    /// `Notify`s (by secret key) instead of each carrying its own (32 bytes
    /// of every client's entry); a cancel wakes the few others sharing it
    /// for nothing.
    fn changed(&self) -> &'static Notify {
        static CHANGED: [Notify; 16] = [const { Notify::const_new() }; 16];
        &CHANGED[(self.secret_key as u32 >> 1) as usize % CHANGED.len()]
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn secret_key(&self) -> i32 {
        self.secret_key
    }

    /// A server is now attached to this client.
    pub fn attach(&self, key: CancelKey) {
        self.lock().target = Some(key);
    }

    /// Detaches the server; returns once no cancel for it is in flight.
    pub async fn detach(&self) {
        {
            let mut s = self.lock();
            s.target = None;
            if s.in_flight == 0 {
                return;
            }
        }
        // Rare: a cancel is on its way to this server. No new one can start
        // (the target is gone); wait for those in flight to be delivered.
        loop {
            let delivered = self.changed().notified();
            tokio::pin!(delivered);
            delivered.as_mut().enable();
            if self.lock().in_flight == 0 {
                return;
            }
            delivered.await;
        }
    }

    /// Runs the checkout that `checkout` makes (a wait for a server) unless
    /// a cancel for this client arrives first; then the checkout is
    /// abandoned (the client leaves the pool's queue) and the client gets
    /// 57014 like a cancelled query.
    ///
    /// The checkout future is made inside: a future passed in would be kept
    /// twice (as a captured argument and inside the `select!`; rustc issue
    /// 62958), 880 bytes instead of ~500, and the boxed wait of every client
    /// that queues for a server would then be too large for the allocator's
    /// per-thread cache (see `Session::wait_checkout`).
    pub async fn abortable<F>(&self, checkout: impl FnOnce() -> F) -> Result<Pooled, PoolError>
    where
        F: std::future::Future<Output = Result<Pooled, PoolError>>,
    {
        {
            let mut s = self.lock();
            s.waiting = true;
            s.wait_cancelled = false;
        }
        let cancelled = async {
            loop {
                let woken = self.changed().notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                if self.lock().wait_cancelled {
                    return;
                }
                woken.await;
            }
        };
        let result = tokio::select! {
            biased;
            r = checkout() => r,
            () = cancelled => Err(PoolError::Canceled),
        };
        let mut s = self.lock();
        s.waiting = false;
        s.wait_cancelled = false;
        result
    }

    /// Forwards a cancel to the attached server, if any.
    async fn cancel(&self) {
        let target = {
            let mut s = self.lock();
            let Some(t) = s.target else {
                if s.waiting {
                    tracing::debug!("cancel for a client waiting for a server: wait ended");
                    s.wait_cancelled = true;
                    drop(s);
                    self.changed().notify_waiters();
                } else {
                    tracing::debug!("cancel for a client with no server attached: dropped");
                }
                return;
            };
            s.in_flight += 1;
            t
        };
        if let Err(e) = backend::send_cancel(target, Duration::from_secs(5)).await {
            tracing::warn!(server = %target.addr, error = %e, "cancel request failed");
        }
        self.lock().in_flight -= 1;
        self.changed().notify_waiters();
    }
}

/// Hands out pgsluice's BackendKeyData process ids and routes cancel
/// requests: a client's slot is found through the client registry (one map
/// for both, not a second entry per client).
pub struct CancelRegistry {
    next_pid: AtomicU32,
    /// This instance's id (bits 24-30 of every process id handed out).
    instance: u8,
}

impl Default for CancelRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl CancelRegistry {
    pub fn new() -> Self {
        Self::with_instance(0)
    }

    /// Process ids carry `instance` (0-127; `general.instance_id`).
    pub fn with_instance(instance: u8) -> Self {
        Self {
            next_pid: AtomicU32::new(rand::random_range(1..1 << 20)),
            instance: instance & 0x7f,
        }
    }

    /// A process id for a new client: this instance's id above a counter
    /// (never 0). The caller makes sure no live client has it
    /// ([`ClientRegistry::register`]).
    pub fn next_pid(&self) -> i32 {
        loop {
            let counter = self.next_pid.fetch_add(1, Ordering::Relaxed) & COUNTER_MASK;
            if counter != 0 {
                return ((u32::from(self.instance) << COUNTER_BITS) | counter) as i32;
            }
        }
    }

    /// Handles a CancelRequest from the wire.
    pub async fn cancel(&self, clients: &ClientRegistry, pid: i32, secret_key: i32) {
        self.cancel_or_forward(clients, pid, secret_key, &[]).await;
    }

    /// Handles a CancelRequest from the wire: for one of this instance's
    /// clients, or forwarded once to the instance whose id the process id
    /// carries (`peers`, indexed by instance id).
    pub async fn cancel_or_forward(
        &self,
        clients: &ClientRegistry,
        pid: i32,
        secret_key: i32,
        peers: &[ServerAddr],
    ) {
        let instance = instance_of(pid);
        if instance != self.instance {
            if secret_key & FORWARDABLE == 0 {
                tracing::debug!(
                    pid,
                    instance,
                    "forwarded cancel request for another instance: dropped (forwarded once already)"
                );
                return;
            }
            let Some(peer) = peers.get(usize::from(instance)) else {
                tracing::debug!(
                    pid,
                    instance,
                    "cancel request for an instance not in general.peers: ignored"
                );
                return;
            };
            // The TTL bit goes: the peer will not forward it again.
            match forward(peer, pid, secret_key & !FORWARDABLE).await {
                Ok(()) => tracing::debug!(pid, instance, %peer, "cancel request forwarded"),
                Err(e) => {
                    tracing::warn!(pid, instance, %peer, error = %e, "cannot forward a cancel request to its instance (general.peers)")
                }
            }
            return;
        }
        match clients.get(pid) {
            Some(client)
                if constant_time_eq(client.cancel.secret_key, secret_key | FORWARDABLE) =>
            {
                client.cancel.cancel().await
            }
            _ => tracing::debug!(pid, "cancel request with an unknown key: ignored"),
        }
    }
}

/// Sends a CancelRequest to a peer instance and waits until it has handled
/// it (it closes the connection), within [`FORWARD_TIMEOUT`].
async fn forward(peer: &ServerAddr, pid: i32, secret_key: i32) -> std::io::Result<()> {
    let addr = tokio::time::timeout(
        FORWARD_TIMEOUT,
        tokio::net::lookup_host((peer.host.as_str(), peer.port)),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "name lookup timed out"))??
    .next()
    .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
    let key = CancelKey {
        addr,
        process_id: pid,
        secret_key,
    };
    backend::send_cancel(key, FORWARD_TIMEOUT).await
}

fn constant_time_eq(a: i32, b: i32) -> bool {
    (a ^ b) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_ids_carry_the_instance() {
        for instance in [0u8, 1, 5, 127] {
            let r = CancelRegistry::with_instance(instance);
            for _ in 0..3 {
                let pid = r.next_pid();
                assert!(pid > 0, "{pid}");
                assert_eq!(instance_of(pid), instance);
            }
            assert_eq!(CancelSlot::new().secret_key() & FORWARDABLE, FORWARDABLE);
        }
    }
}
