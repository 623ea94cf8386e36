//! Per-pool traffic counters, with pgbouncer's meanings (docs/admin.md):
//! a *query* is one request answered by a ReadyForQuery, a *transaction*
//! runs from the first request after an idle ReadyForQuery to the next idle
//! one (an autocommit statement is one of each), *wait* is the time a
//! client waited for a server connection.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{Buckets, HistogramSnapshot, micros};

/// Running totals of one pool (one database, user and node).
#[derive(Debug)]
pub struct PoolStats {
    xact_count: AtomicU64,
    query_count: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
    xact_time: AtomicU64,
    query_time: AtomicU64,
    wait_time: AtomicU64,
    assignments: AtomicU64,
    xact_buckets: Buckets,
    query_buckets: Buckets,
    wait_buckets: Buckets,
    /// The totals at the last period boundary and what the period before
    /// it added (for the averages); touched once per `stats_period`.
    period: Mutex<Period>,
}

#[derive(Debug)]
struct Period {
    at: Instant,
    totals: Totals,
    last: Option<(Totals, Duration)>,
}

impl Default for PoolStats {
    fn default() -> Self {
        Self {
            xact_count: AtomicU64::new(0),
            query_count: AtomicU64::new(0),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            xact_time: AtomicU64::new(0),
            query_time: AtomicU64::new(0),
            wait_time: AtomicU64::new(0),
            assignments: AtomicU64::new(0),
            xact_buckets: Buckets::default(),
            query_buckets: Buckets::default(),
            wait_buckets: Buckets::default(),
            period: Mutex::new(Period {
                at: Instant::now(),
                totals: Totals::default(),
                last: None,
            }),
        }
    }
}

/// A reading of the counters (times in microseconds, bytes as counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub xact_count: u64,
    pub query_count: u64,
    /// Bytes read from clients.
    pub received: u64,
    /// Bytes read from servers and relayed to clients.
    pub sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
    /// Times a client was given a server connection.
    pub assignments: u64,
}

impl std::ops::AddAssign for Totals {
    fn add_assign(&mut self, o: Totals) {
        self.xact_count += o.xact_count;
        self.query_count += o.query_count;
        self.received += o.received;
        self.sent += o.sent;
        self.xact_time += o.xact_time;
        self.query_time += o.query_time;
        self.wait_time += o.wait_time;
        self.assignments += o.assignments;
    }
}

impl Totals {
    fn minus(self, o: Totals) -> Totals {
        Totals {
            xact_count: self.xact_count.saturating_sub(o.xact_count),
            query_count: self.query_count.saturating_sub(o.query_count),
            received: self.received.saturating_sub(o.received),
            sent: self.sent.saturating_sub(o.sent),
            xact_time: self.xact_time.saturating_sub(o.xact_time),
            query_time: self.query_time.saturating_sub(o.query_time),
            wait_time: self.wait_time.saturating_sub(o.wait_time),
            assignments: self.assignments.saturating_sub(o.assignments),
        }
    }
}

/// pgbouncer's averages over one stats period: counts and bytes per
/// second, times per query / transaction in µs, wait in µs per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Averages {
    pub xact_count: u64,
    pub query_count: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
}

impl Averages {
    /// From what a period of length `over` added (summed over pools).
    pub fn of(delta: Totals, over: Duration) -> Averages {
        let us = micros(over);
        if us == 0 {
            return Averages::default();
        }
        let per_second = |v: u64| (u128::from(v) * 1_000_000 / u128::from(us)) as u64;
        Averages {
            xact_count: per_second(delta.xact_count),
            query_count: per_second(delta.query_count),
            received: per_second(delta.received),
            sent: per_second(delta.sent),
            xact_time: delta.xact_time.checked_div(delta.xact_count).unwrap_or(0),
            query_time: delta.query_time.checked_div(delta.query_count).unwrap_or(0),
            wait_time: per_second(delta.wait_time),
        }
    }
}

impl PoolStats {
    /// A ReadyForQuery reached the client: a query of `query` ended, and a
    /// transaction of `xact` if the server is idle again; `received` client
    /// bytes arrived for it.
    #[inline]
    pub fn ready(&self, query: Duration, xact: Option<Duration>, received: u64) {
        let q = micros(query);
        self.query_count.fetch_add(1, Ordering::Relaxed);
        self.query_time.fetch_add(q, Ordering::Relaxed);
        self.query_buckets.observe_us(q);
        if let Some(x) = xact {
            let x = micros(x);
            self.xact_count.fetch_add(1, Ordering::Relaxed);
            self.xact_time.fetch_add(x, Ordering::Relaxed);
            self.xact_buckets.observe_us(x);
        }
        if received > 0 {
            self.received.fetch_add(received, Ordering::Relaxed);
        }
    }

    /// `n` bytes of server output went on to the client.
    #[inline]
    pub fn sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A client got a server connection after waiting `waited`.
    #[inline]
    pub fn assigned(&self, waited: Duration) {
        let w = micros(waited);
        self.assignments.fetch_add(1, Ordering::Relaxed);
        if w > 0 {
            self.wait_time.fetch_add(w, Ordering::Relaxed);
        }
        self.wait_buckets.observe_us(w);
    }

    pub fn totals(&self) -> Totals {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Totals {
            xact_count: l(&self.xact_count),
            query_count: l(&self.query_count),
            received: l(&self.received),
            sent: l(&self.sent),
            xact_time: l(&self.xact_time),
            query_time: l(&self.query_time),
            wait_time: l(&self.wait_time),
            assignments: l(&self.assignments),
        }
    }

    pub fn query_histogram(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self.query_buckets.counts(),
            count: self.query_count.load(Ordering::Relaxed),
            sum_us: self.query_time.load(Ordering::Relaxed),
        }
    }

    pub fn xact_histogram(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self.xact_buckets.counts(),
            count: self.xact_count.load(Ordering::Relaxed),
            sum_us: self.xact_time.load(Ordering::Relaxed),
        }
    }

    pub fn wait_histogram(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self.wait_buckets.counts(),
            count: self.assignments.load(Ordering::Relaxed),
            sum_us: self.wait_time.load(Ordering::Relaxed),
        }
    }

    /// Closes the current stats period at `now` (called every
    /// `stats_period`).
    pub fn roll(&self, now: Instant) {
        let totals = self.totals();
        let mut p = self.period.lock().unwrap_or_else(|e| e.into_inner());
        let over = now.saturating_duration_since(p.at);
        p.last = Some((totals.minus(p.totals), over));
        p.totals = totals;
        p.at = now;
    }

    /// What the last complete period added, and its length (`None` before
    /// the first period ended).
    pub fn last_period(&self) -> Option<(Totals, Duration)> {
        self.period.lock().unwrap_or_else(|e| e.into_inner()).last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_transactions_and_waits_add_up() {
        let s = PoolStats::default();
        // BEGIN; SELECT; COMMIT as three requests, then an autocommit one.
        s.ready(Duration::from_micros(10), None, 11);
        s.ready(Duration::from_micros(20), None, 22);
        s.ready(
            Duration::from_micros(30),
            Some(Duration::from_micros(100)),
            33,
        );
        s.ready(Duration::from_micros(5), Some(Duration::from_micros(5)), 0);
        s.sent(1000);
        s.assigned(Duration::ZERO);
        s.assigned(Duration::from_millis(2));
        let t = s.totals();
        assert_eq!(
            t,
            Totals {
                xact_count: 2,
                query_count: 4,
                received: 66,
                sent: 1000,
                xact_time: 105,
                query_time: 65,
                wait_time: 2000,
                assignments: 2,
            }
        );
        let w = s.wait_histogram();
        assert_eq!(
            (w.count, w.sum_us, w.counts[0], w.counts[2]),
            (2, 2000, 1, 1)
        );
        assert_eq!(s.query_histogram().counts[0], 4);
    }

    #[test]
    fn averages_follow_pgbouncer() {
        let s = PoolStats::default();
        let t0 = Instant::now();
        s.roll(t0);
        for _ in 0..20 {
            s.ready(
                Duration::from_micros(300),
                Some(Duration::from_micros(300)),
                50,
            );
        }
        s.assigned(Duration::from_millis(10));
        s.roll(t0 + Duration::from_secs(10));
        let (delta, over) = s.last_period().expect("a period ended");
        assert_eq!(over, Duration::from_secs(10));
        let a = Averages::of(delta, over);
        assert_eq!(a.xact_count, 2, "20 transactions in 10 s");
        assert_eq!(a.query_count, 2);
        assert_eq!(a.received, 100, "1000 bytes in 10 s");
        assert_eq!(a.query_time, 300, "µs per query");
        assert_eq!(a.xact_time, 300);
        assert_eq!(a.wait_time, 1000, "10 ms waited in 10 s");
        assert_eq!(
            Averages::of(Totals::default(), Duration::ZERO),
            Averages::default()
        );
    }
}
