//! Counters and histograms that the data path writes and the admin console
//! and `/metrics` read.
//!
//! Cost is the point of this module: everything written per query is a
//! relaxed atomic add on memory owned by one pool (no lock, no allocation,
//! no clock read beyond what the relay already does). Readers add the
//! values up when they are asked; a reading may mix counts from a few
//! nanoseconds apart, which no operator can tell from exact.

mod errors;
mod pool;
mod routing;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use errors::ErrorClasses;
pub use pool::{Averages, PoolStats, Totals};
pub use routing::{RouteCounters, RouteReason};

/// Histogram bucket upper bounds in seconds, shared by every latency and
/// wait histogram (the dashboards' contract, docs/admin.md).
pub const BUCKETS_SECONDS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The same bounds in microseconds, for the comparison on the hot path.
const BUCKETS_US: [u64; 15] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000, 30_000_000,
];

/// Whole microseconds of `d` (saturating).
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Fixed buckets of relaxed atomic counts (the last one is `+Inf`). The
/// observation count and sum live with the owner, which counts them anyway
/// (`query_count`, `query_time`), so an observation costs one add.
#[derive(Debug, Default)]
pub struct Buckets([AtomicU64; 16]);

impl Buckets {
    pub fn observe_us(&self, us: u64) {
        let i = BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(15);
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Per-bucket (not cumulative) counts.
    pub fn counts(&self) -> [u64; 16] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }
}

/// A histogram as read: per-bucket counts (the last is `+Inf`), the number
/// of observations and their sum in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub counts: [u64; 16],
    pub count: u64,
    pub sum_us: u64,
}

impl HistogramSnapshot {
    pub fn add(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.sum_us += other.sum_us;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let b = Buckets::default();
        for us in [
            0,
            500,
            501,
            1_000,
            29_999_999,
            30_000_000,
            30_000_001,
            u64::MAX,
        ] {
            b.observe_us(us);
        }
        let c = b.counts();
        assert_eq!(c[0], 2, "0 and 500 µs are within 0.5 ms");
        assert_eq!(c[1], 2, "501 µs and 1 ms are within 1 ms");
        assert_eq!(c[14], 2, "up to 30 s");
        assert_eq!(c[15], 2, "beyond 30 s is +Inf");
        assert_eq!(c.iter().sum::<u64>(), 8);
        for (s, us) in BUCKETS_SECONDS.iter().zip(BUCKETS_US) {
            assert_eq!((s * 1e6).round() as u64, us);
        }
    }
}
