//! Routing decisions by target (primary or a replica) and reason.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why the router sent a request where it did (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteReason {
    /// The request may write.
    Write,
    /// A read, sent to a replica in rotation.
    Read,
    /// A `/* pgsluice: … */` hint.
    Hint,
    /// `SET pgsluice.route` or `routing.default_route`.
    Setting,
    /// A read with no replica in rotation.
    NoReplica,
    /// A read after the client's own write, before a replica replayed it.
    ReadYourWrites,
    /// A read sent again after a replica failed it.
    Retry,
}

impl RouteReason {
    pub const ALL: [RouteReason; 7] = [
        Self::Write,
        Self::Read,
        Self::Hint,
        Self::Setting,
        Self::NoReplica,
        Self::ReadYourWrites,
        Self::Retry,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Read => "read",
            Self::Hint => "hint",
            Self::Setting => "setting",
            Self::NoReplica => "no_replica",
            Self::ReadYourWrites => "read_your_writes",
            Self::Retry => "retry",
        }
    }
}

/// Counts per (target, reason); one relaxed add per decision.
#[derive(Debug, Default)]
pub struct RouteCounters([[AtomicU64; 7]; 2]);

impl RouteCounters {
    pub fn count(&self, replica: bool, reason: RouteReason) {
        self.0[usize::from(replica)][reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// (target, reason, count) for every pair, zeros included.
    pub fn snapshot(&self) -> Vec<(&'static str, RouteReason, u64)> {
        let mut out = Vec::with_capacity(14);
        for (t, target) in ["primary", "replica"].into_iter().enumerate() {
            for reason in RouteReason::ALL {
                out.push((
                    target,
                    reason,
                    self.0[t][reason as usize].load(Ordering::Relaxed),
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_counted_per_target_and_reason() {
        let c = RouteCounters::default();
        c.count(true, RouteReason::Read);
        c.count(true, RouteReason::Read);
        c.count(false, RouteReason::Write);
        let s = c.snapshot();
        assert_eq!(s.len(), 14);
        assert!(s.contains(&("replica", RouteReason::Read, 2)));
        assert!(s.contains(&("primary", RouteReason::Write, 1)));
        assert_eq!(s.iter().map(|x| x.2).sum::<u64>(), 3);
        for (i, r) in RouteReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
