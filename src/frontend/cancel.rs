//! Cancel requests. Each client gets pgsluice's own BackendKeyData; a cancel
//! carrying it is forwarded, over a new connection, to the server the client
//! is using *at that moment*, with that server's key.
//!
//! Guarantee: a cancel never hits another client's query. The target is set
//! while a server is attached and cleared before the server is released, and
//! release waits for any cancel already on its way to that server to be
//! delivered, so a late cancel cannot land on the server's next client.
//! A cancel for a client with no server attached is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::backend::{self, CancelKey};

#[derive(Default)]
struct SlotState {
    target: Option<CancelKey>,
    in_flight: usize,
}

pub struct CancelSlot {
    secret_key: i32,
    state: Mutex<SlotState>,
    delivered: Notify,
}

impl CancelSlot {
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
            let delivered = self.delivered.notified();
            tokio::pin!(delivered);
            delivered.as_mut().enable();
            if self.lock().in_flight == 0 {
                return;
            }
            delivered.await;
        }
    }

    /// Forwards a cancel to the attached server, if any.
    async fn cancel(&self) {
        let target = {
            let mut s = self.lock();
            let Some(t) = s.target else {
                tracing::debug!("cancel for a client with no server attached: dropped");
                return;
            };
            s.in_flight += 1;
            t
        };
        if let Err(e) = backend::send_cancel(target, Duration::from_secs(5)).await {
            tracing::warn!(server = %target.addr, error = %e, "cancel request failed");
        }
        self.lock().in_flight -= 1;
        self.delivered.notify_waiters();
    }
}

/// Maps pgsluice's BackendKeyData process ids to client slots.
pub struct CancelRegistry {
    slots: Mutex<HashMap<i32, Arc<CancelSlot>>>,
    next_pid: AtomicI32,
}

impl Default for CancelRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl CancelRegistry {
    pub fn new() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            next_pid: AtomicI32::new(rand::random_range(1..1 << 20)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Arc<CancelSlot>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new client; returns its process id and slot.
    pub fn register(&self) -> (i32, Arc<CancelSlot>) {
        let slot = Arc::new(CancelSlot {
            secret_key: rand::random(),
            state: Mutex::new(SlotState::default()),
            delivered: Notify::new(),
        });
        let mut slots = self.lock();
        loop {
            let pid = self
                .next_pid
                .fetch_add(1, Ordering::Relaxed)
                .checked_abs()
                .unwrap_or(1)
                .max(1);
            if let std::collections::hash_map::Entry::Vacant(e) = slots.entry(pid) {
                e.insert(slot.clone());
                return (pid, slot);
            }
        }
    }

    pub fn unregister(&self, pid: i32) {
        self.lock().remove(&pid);
    }

    /// Handles a CancelRequest from the wire.
    pub async fn cancel(&self, pid: i32, secret_key: i32) {
        let slot = self.lock().get(&pid).cloned();
        match slot {
            Some(slot) if constant_time_eq(slot.secret_key, secret_key) => slot.cancel().await,
            _ => tracing::debug!(pid, "cancel request with an unknown key: ignored"),
        }
    }
}

fn constant_time_eq(a: i32, b: i32) -> bool {
    (a ^ b) == 0
}
