//! The operator's switches for one database, shared by all its pools
//! (every user, every node): `PAUSE`/`RESUME` hold new checkouts, `DISABLE`
//! and `SHUTDOWN WAIT_FOR_CLIENTS` refuse new client logins.
//!
//! A checkout reads one relaxed flag when nothing is paused; only a paused
//! checkout touches the `Notify`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Gate {
    paused: AtomicBool,
    disabled: AtomicBool,
    closing: AtomicBool,
    resumed: Notify,
}

impl Gate {
    #[inline]
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// New checkouts wait from now on. False if it was paused already.
    pub fn pause(&self) -> bool {
        !self.paused.swap(true, Ordering::SeqCst)
    }

    /// Lets waiting checkouts go. False if it was not paused.
    pub fn resume(&self) -> bool {
        let was = self.paused.swap(false, Ordering::SeqCst);
        self.resumed.notify_waiters();
        was
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::Relaxed)
    }

    pub fn set_disabled(&self, disabled: bool) {
        self.disabled.store(disabled, Ordering::Relaxed);
    }

    /// New logins are refused because pgsluice is on its way out.
    pub fn set_closing(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    /// Why a new client of `database` is refused, if it is: (SQLSTATE,
    /// message).
    pub fn refusal(&self, database: &str) -> Option<(&'static str, String)> {
        if self.closing.load(Ordering::Relaxed) {
            return Some((
                crate::protocol::sqlstate::ADMIN_SHUTDOWN,
                "pgsluice is shutting down (admin console SHUTDOWN WAIT_FOR_CLIENTS): no new clients"
                    .to_owned(),
            ));
        }
        self.is_disabled().then(|| {
            (
                crate::protocol::sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "database \"{database}\" is not currently accepting connections (admin console DISABLE; ENABLE {database} lifts it)"
                ),
            )
        })
    }

    /// Waits until resumed; false if `deadline` came first.
    pub async fn wait_resumed(&self, deadline: Instant) -> bool {
        loop {
            let resumed = self.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if !self.paused.load(Ordering::SeqCst) {
                return true;
            }
            if tokio::time::timeout_at(deadline.into(), resumed)
                .await
                .is_err()
            {
                return !self.paused.load(Ordering::SeqCst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn paused_checkouts_wait_for_resume_or_their_deadline() {
        let gate = Arc::new(Gate::default());
        assert!(gate.wait_resumed(Instant::now()).await, "not paused");
        assert!(gate.pause());
        assert!(!gate.pause(), "already paused");
        let soon = Instant::now() + Duration::from_millis(30);
        assert!(!gate.wait_resumed(soon).await, "deadline first");
        let g = gate.clone();
        let waiter = tokio::spawn(async move {
            g.wait_resumed(Instant::now() + Duration::from_secs(10))
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(gate.resume());
        assert!(waiter.await.expect("waiter"));
        assert!(!gate.resume(), "not paused any more");
    }
}
