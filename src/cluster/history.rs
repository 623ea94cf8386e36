//! The primary's WAL position over time, as the monitor sampled it.
//!
//! Consecutive samples with the same LSN (an idle primary) are kept as one
//! run with its first and last sample time, so an idle cluster holds a
//! handful of entries and a busy one at most `retention` worth.
//!
//! Two questions are answered from it:
//! - a replica's lag: the age of the oldest sample it has not replayed
//!   (zero when it has replayed the newest);
//! - read-your-writes: the first LSN sampled after a moment in time, which a
//!   replica must have replayed to show a write committed before it.

use std::collections::VecDeque;
use std::time::Duration;

/// A run of samples that all saw the same LSN. Times are offsets from the
/// cluster's epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    lsn: u64,
    first: Duration,
    last: Duration,
}

#[derive(Debug)]
pub struct WalHistory {
    runs: VecDeque<Run>,
    retention: Duration,
}

impl WalHistory {
    pub fn new(retention: Duration) -> Self {
        Self {
            runs: VecDeque::new(),
            retention,
        }
    }

    /// Records that a query sent at `at` saw the primary at `lsn`. Samples
    /// must arrive in time order; an LSN below the last one (a primary
    /// restored from backup or replaced) starts the history afresh.
    pub fn record(&mut self, at: Duration, lsn: u64) {
        match self.runs.back_mut() {
            Some(r) if r.lsn == lsn => r.last = r.last.max(at),
            Some(r) if r.lsn > lsn => {
                self.runs.clear();
                self.runs.push_back(Run {
                    lsn,
                    first: at,
                    last: at,
                });
            }
            _ => self.runs.push_back(Run {
                lsn,
                first: at,
                last: at,
            }),
        }
        // Keep the newest run always; drop runs older than the retention.
        while self.runs.len() > 1 {
            match self.runs.front() {
                Some(r) if at.saturating_sub(r.last) > self.retention => {
                    self.runs.pop_front();
                }
                _ => break,
            }
        }
    }

    /// When the oldest sample a replica at `replayed` has not replayed was
    /// taken; `None` when it has replayed every sample. If it is behind even
    /// the oldest retained sample, that sample's time is a lower bound of
    /// its lag, which is already beyond any sensible limit.
    pub fn behind_since(&self, replayed: u64) -> Option<Duration> {
        // Runs are in increasing LSN order: find the first one beyond.
        let i = self.runs.partition_point(|r| r.lsn <= replayed);
        self.runs.get(i).map(|r| r.first)
    }

    /// The LSN of the first sample taken after `at`; `None` if no sample
    /// has been taken since.
    pub fn lsn_after(&self, at: Duration) -> Option<u64> {
        let i = self.runs.partition_point(|r| r.last <= at);
        self.runs.get(i).map(|r| r.lsn)
    }

    /// Time of the newest sample.
    pub fn newest(&self) -> Option<(Duration, u64)> {
        self.runs.back().map(|r| (r.last, r.lsn))
    }

    pub fn len(&self) -> usize {
        self.runs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

/// Parses PostgreSQL's `pg_lsn` text form (`16/B374D848`).
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
        return None;
    }
    Some(hi << 32 | lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn lsn_text() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("16"), None);
        assert_eq!(parse_lsn("x/1"), None);
        assert_eq!(parse_lsn("1FFFFFFFF/0"), None);
    }

    #[test]
    fn idle_primary_is_one_run_and_caught_up_replica_has_no_lag() {
        let mut h = WalHistory::new(ms(60_000));
        for t in 0..100 {
            h.record(ms(t * 25), 1000);
        }
        assert_eq!(h.len(), 1);
        assert_eq!(h.behind_since(1000), None);
        assert_eq!(h.behind_since(999), Some(ms(0)));
    }

    #[test]
    fn lag_is_age_of_oldest_unreplayed_sample() {
        let mut h = WalHistory::new(ms(60_000));
        h.record(ms(0), 100);
        h.record(ms(25), 200);
        h.record(ms(50), 200);
        h.record(ms(75), 300);
        assert_eq!(h.behind_since(100), Some(ms(25)));
        assert_eq!(h.behind_since(250), Some(ms(75)));
        assert_eq!(h.behind_since(300), None);
    }

    #[test]
    fn read_your_writes_needs_a_sample_after_the_write() {
        let mut h = WalHistory::new(ms(60_000));
        h.record(ms(0), 100);
        h.record(ms(25), 100);
        h.record(ms(50), 300);
        // A write acknowledged at 10 ms: the sample sent at 25 ms saw 100,
        // so the write's WAL ends at or before 100.
        assert_eq!(h.lsn_after(ms(10)), Some(100));
        assert_eq!(h.lsn_after(ms(30)), Some(300));
        assert_eq!(h.lsn_after(ms(50)), None);
    }

    #[test]
    fn retention_drops_old_runs_but_keeps_the_newest() {
        let mut h = WalHistory::new(ms(100));
        for t in 0..50 {
            h.record(ms(t * 25), t);
        }
        assert!(h.len() <= 6, "{}", h.len());
        h.record(ms(10_000), 49);
        assert_eq!(h.len(), 1);
        // A replica behind everything retained lags at least that long.
        assert_eq!(h.behind_since(0), Some(ms(1225)));
    }

    #[test]
    fn lsn_going_back_restarts_history() {
        let mut h = WalHistory::new(ms(60_000));
        h.record(ms(0), 500);
        h.record(ms(25), 100);
        assert_eq!(h.len(), 1);
        assert_eq!(h.behind_since(100), None);
    }
}
