//! Topology: each database's primary and replicas, and what the monitor
//! last measured about them.
//!
//! The monitor (`monitor.rs`) writes; sessions read. Everything a routing
//! decision needs is an atomic load or a short lock, computed at decision
//! time: a paused replica's lag grows in real time between probes, and a
//! replica whose measurements stopped arriving is out (fail closed).

pub mod history;
mod monitor;
pub mod shards;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::{Database, ReadBalance, Routing, ServerAddr};
use crate::router::{Class, ClassCache, FunctionCatalog};
use history::WalHistory;

pub use monitor::{MonitorLogin, spawn_monitor};
pub use shards::{SHARDS_COLUMNS, ShardedDatabase, shards_report};

/// A node's part in its replication group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
}

/// Why a replica is not serving reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutReason {
    /// The monitor never measured it.
    Unknown,
    /// No successful probe for longer than the staleness limit.
    Unreachable,
    /// It is not in recovery: not a replica any more.
    NotInRecovery,
    /// Further behind than `max_replica_lag`.
    Lagging,
    /// An operator banned it.
    Banned,
}

impl OutReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "not yet measured",
            Self::Unreachable => "unreachable",
            Self::NotInRecovery => "not in recovery",
            Self::Lagging => "lag above max_replica_lag",
            Self::Banned => "banned",
        }
    }
}

/// A replica's state at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    InRotation { lag: Duration, replayed: u64 },
    Out(OutReason),
}

pub struct Node {
    /// 0 is the primary; replicas follow in configuration order.
    pub index: usize,
    pub role: Role,
    pub addr: ServerAddr,
    /// `primary` or `replicaN` (1-based), as in logs and errors.
    pub name: String,
    /// Relative share of reads (replicas).
    pub weight: u32,
    /// Clients attached to this node right now: holding one of its servers
    /// or waiting for one.
    outstanding: AtomicUsize,
    /// Offset from the cluster epoch of the last successful probe + 1 ns
    /// (0 = never).
    last_ok: AtomicU64,
    replayed: AtomicU64,
    /// Offset + 1 ns of the oldest primary sample not replayed (0 = none).
    behind_since: AtomicU64,
    in_recovery: AtomicBool,
    /// The last probe failed: out at once, without waiting for staleness.
    failing: AtomicBool,
    banned: AtomicBool,
}

impl Node {
    fn new(index: usize, addr: ServerAddr, weight: u32) -> Self {
        Self {
            weight: weight.max(1),
            index,
            role: if index == 0 {
                Role::Primary
            } else {
                Role::Replica
            },
            addr,
            name: if index == 0 {
                "primary".to_owned()
            } else {
                format!("replica{index}")
            },
            outstanding: AtomicUsize::new(0),
            last_ok: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            behind_since: AtomicU64::new(0),
            in_recovery: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            banned: AtomicBool::new(false),
        }
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    pub fn replayed(&self) -> u64 {
        self.replayed.load(Ordering::Acquire)
    }

    pub fn set_banned(&self, banned: bool) {
        self.banned.store(banned, Ordering::Relaxed);
    }

    /// An operator took it out of rotation (admin console `BAN`).
    pub fn is_banned(&self) -> bool {
        self.banned.load(Ordering::Relaxed)
    }
}

/// Counts one client attached to a node while alive.
pub struct Attached(Arc<Cluster>, usize);

impl Drop for Attached {
    fn drop(&mut self) {
        self.0.nodes[self.1]
            .outstanding
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Attached {
    pub fn node(&self) -> &Node {
        &self.0.nodes[self.1]
    }
}

/// One database's replication group.
pub struct Cluster {
    pub database: String,
    nodes: Vec<Node>,
    epoch: Instant,
    history: Mutex<WalHistory>,
    settings: Routing,
    /// A measurement older than this is stale.
    stale_after: Duration,
    round_robin: AtomicUsize,
    /// Sum of the replicas' weights.
    weight_total: usize,
    /// Functions that must run on the primary: built-in knowledge until the
    /// monitor has read `pg_proc`.
    functions: ArcSwap<FunctionCatalog>,
    classes: ClassCache,
    /// Reads sent again elsewhere after a replica failed them.
    retries: AtomicU64,
    /// Routing decisions by target and reason (metrics).
    pub decisions: crate::stats::RouteCounters,
    /// A reload replaced this group: its monitor stops.
    retired: AtomicBool,
}

/// Statement texts whose classification is remembered, per database.
const CLASS_CACHE_CAPACITY: usize = 10_000;

fn encode(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX - 1) + 1
}

fn decode(v: u64) -> Option<Duration> {
    (v != 0).then(|| Duration::from_nanos(v - 1))
}

impl Cluster {
    pub fn new(db: &Database, settings: &Routing) -> Arc<Self> {
        Self::of_nodes(
            &db.name,
            &db.primary,
            &db.replicas,
            &db.replica_weights,
            settings,
        )
    }

    /// A replication group named `database` (a database's name, or
    /// `NAME.shardN` for one shard of a sharded database).
    pub fn of_nodes(
        database: &str,
        primary: &ServerAddr,
        replicas: &[ServerAddr],
        replica_weights: &[u32],
        settings: &Routing,
    ) -> Arc<Self> {
        let nodes = std::iter::once(primary.clone())
            .chain(replicas.iter().cloned())
            .enumerate()
            .map(|(i, addr)| {
                let weight = i
                    .checked_sub(1)
                    .and_then(|r| replica_weights.get(r))
                    .copied()
                    .unwrap_or(1);
                Node::new(i, addr, weight)
            })
            .collect();
        let weight_total = replica_weights.iter().map(|&w| w.max(1) as usize).sum();
        // Keep a minute, or ten lag limits if that is longer: a replica
        // further behind than the oldest sample is out either way.
        let retention = Duration::from_secs(60).max(settings.max_replica_lag * 10);
        Arc::new(Self {
            database: database.to_owned(),
            nodes,
            epoch: Instant::now(),
            history: Mutex::new(WalHistory::new(retention)),
            settings: settings.clone(),
            stale_after: (settings.monitor_interval * 4)
                .max(Duration::from_millis(250))
                .max(settings.monitor_timeout),
            round_robin: AtomicUsize::new(0),
            weight_total,
            functions: ArcSwap::from_pointee(FunctionCatalog::builtin()),
            classes: ClassCache::new(CLASS_CACHE_CAPACITY),
            retries: AtomicU64::new(0),
            decisions: crate::stats::RouteCounters::default(),
            retired: AtomicBool::new(false),
        })
    }

    /// Classifies one statement string (cached by text).
    pub fn classify(&self, sql: &[u8]) -> Class {
        // from_utf8 validates valid text much faster than from_utf8_lossy.
        let sql = match std::str::from_utf8(sql) {
            Ok(text) => std::borrow::Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(sql),
        };
        self.classes.classify(&sql, &self.functions.load())
    }

    /// Replaces the function catalog (read from `pg_proc`).
    fn set_functions(&self, catalog: FunctionCatalog) {
        self.functions.store(Arc::new(catalog));
    }

    /// A reload replaced this group (topology or routing settings changed):
    /// its monitor stops; sessions move to the new group at their next
    /// request.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    pub fn count_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn settings(&self) -> &Routing {
        &self.settings
    }

    fn since_epoch(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.epoch)
    }

    fn history(&self) -> std::sync::MutexGuard<'_, WalHistory> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The monitor's probe of node `i` failed (or succeeded again).
    fn record_failing(&self, i: usize, failing: bool) {
        self.nodes[i].failing.store(failing, Ordering::Release);
    }

    /// The monitor saw the primary at `lsn` with a query sent at `sent`.
    fn record_primary(&self, sent: Instant, lsn: u64) {
        self.history().record(self.since_epoch(sent), lsn);
        self.nodes[0]
            .last_ok
            .store(encode(self.since_epoch(Instant::now())), Ordering::Release);
        self.nodes[0].replayed.store(lsn, Ordering::Release);
    }

    /// The monitor measured replica `i`.
    fn record_replica(&self, i: usize, in_recovery: bool, replayed: Option<u64>) {
        let node = &self.nodes[i];
        node.in_recovery.store(in_recovery, Ordering::Release);
        let Some(replayed) = replayed else {
            // In recovery but nothing replayed yet: unknown position.
            node.behind_since
                .store(encode(Duration::ZERO), Ordering::Release);
            node.last_ok
                .store(encode(self.since_epoch(Instant::now())), Ordering::Release);
            return;
        };
        let behind = self.history().behind_since(replayed);
        node.replayed.store(replayed, Ordering::Release);
        node.behind_since
            .store(behind.map_or(0, encode), Ordering::Release);
        node.last_ok
            .store(encode(self.since_epoch(Instant::now())), Ordering::Release);
    }

    /// Whether replica `i` may serve reads now, and why not.
    pub fn availability(&self, i: usize, now: Instant) -> Availability {
        let node = &self.nodes[i];
        if node.banned.load(Ordering::Relaxed) {
            return Availability::Out(OutReason::Banned);
        }
        let now = self.since_epoch(now);
        let Some(last_ok) = decode(node.last_ok.load(Ordering::Acquire)) else {
            return Availability::Out(OutReason::Unknown);
        };
        if now.saturating_sub(last_ok) > self.stale_after || node.failing.load(Ordering::Acquire) {
            return Availability::Out(OutReason::Unreachable);
        }
        if node.role == Role::Replica && !node.in_recovery.load(Ordering::Acquire) {
            return Availability::Out(OutReason::NotInRecovery);
        }
        let lag = decode(node.behind_since.load(Ordering::Acquire))
            .map_or(Duration::ZERO, |since| now.saturating_sub(since));
        if lag > self.settings.max_replica_lag {
            return Availability::Out(OutReason::Lagging);
        }
        Availability::InRotation {
            lag,
            replayed: node.replayed(),
        }
    }

    /// Replica `i`'s lag now, if it has been measured.
    pub fn lag(&self, i: usize, now: Instant) -> Option<Duration> {
        let node = &self.nodes[i];
        decode(node.last_ok.load(Ordering::Acquire))?;
        let now = self.since_epoch(now);
        Some(
            decode(node.behind_since.load(Ordering::Acquire))
                .map_or(Duration::ZERO, |since| now.saturating_sub(since)),
        )
    }

    /// WAL bytes node `i` has not replayed, against the primary's last
    /// sampled position (`None` until both were measured).
    pub fn lag_bytes(&self, i: usize) -> Option<u64> {
        let primary = self.nodes[0].replayed();
        let replayed = self.nodes.get(i)?.replayed();
        (primary > 0 && replayed > 0).then(|| primary.saturating_sub(replayed))
    }

    /// Whether the monitor reached the primary recently.
    pub fn primary_reachable(&self, now: Instant) -> bool {
        !self.nodes[0].failing.load(Ordering::Acquire)
            && decode(self.nodes[0].last_ok.load(Ordering::Acquire))
                .is_some_and(|t| self.since_epoch(now).saturating_sub(t) <= self.stale_after)
    }

    /// The WAL position a replica must have replayed to show a write
    /// acknowledged at `write_at`: `None` until the monitor has sampled the
    /// primary after that moment.
    pub fn lsn_after(&self, write_at: Instant) -> Option<u64> {
        self.history().lsn_after(self.since_epoch(write_at))
    }

    /// A replica for a read: in rotation, at or past `min_lsn`, chosen by
    /// the configured balance and the replicas' weights. `None` sends the
    /// read to the primary.
    ///
    /// With `least_outstanding`, `prefer` (the replica this client read from
    /// last) keeps the read unless it has clearly more clients attached per
    /// unit of weight than the least loaded one (see [`stays`]). A client
    /// that hops between replicas on every transaction runs measurably slower
    /// than one that stays (docs/performance.md), and it can see time go
    /// backwards when the replicas have replayed to different points.
    pub fn pick_replica(
        &self,
        min_lsn: Option<u64>,
        exclude: Option<usize>,
        prefer: Option<usize>,
    ) -> Option<usize> {
        let now = Instant::now();
        let n = self.nodes.len();
        if n < 2 {
            return None;
        }
        let ticket = self.round_robin.fetch_add(1, Ordering::Relaxed);
        // Start the scan at a replica chosen in proportion to the weights,
        // so ties (and round robin) share reads by weight.
        let mut slot = ticket % self.weight_total.max(1);
        let mut start = 0;
        for (k, node) in self.nodes[1..].iter().enumerate() {
            if slot < node.weight as usize {
                start = k;
                break;
            }
            slot -= node.weight as usize;
        }
        // (index, outstanding, weight) of the best so far, and of `prefer`.
        let mut best: Option<(usize, usize, u32)> = None;
        let mut preferred: Option<(usize, usize, u32)> = None;
        for k in 0..n - 1 {
            let i = 1 + (start + k) % (n - 1);
            if Some(i) == exclude {
                continue;
            }
            let Availability::InRotation { replayed, .. } = self.availability(i, now) else {
                continue;
            };
            if min_lsn.is_some_and(|m| replayed < m) {
                continue;
            }
            let node = &self.nodes[i];
            let load = node.outstanding();
            match self.settings.read_balance {
                ReadBalance::RoundRobin => return Some(i),
                ReadBalance::LeastOutstanding => {
                    if Some(i) == prefer {
                        preferred = Some((i, load, node.weight));
                    }
                    // Fewest clients per unit of weight.
                    let better = best.is_none_or(|(_, l, w)| {
                        (load as u64) * u64::from(w) < (l as u64) * u64::from(node.weight)
                    });
                    if better {
                        best = Some((i, load, node.weight));
                    }
                }
            }
        }
        match (preferred, best) {
            (Some(p), Some(b)) if stays(p, b) => Some(p.0),
            _ => best.map(|(i, _, _)| i),
        }
    }

    /// Counts a client attached to node `i` until the guard drops.
    pub fn attach(self: &Arc<Self>, i: usize) -> Attached {
        self.nodes[i].outstanding.fetch_add(1, Ordering::Relaxed);
        Attached(self.clone(), i)
    }
}

/// Whether a client stays on its last replica `p` rather than moving to the
/// least loaded `b`, each `(index, outstanding, weight)`: it stays unless
/// `p`'s clients per unit of weight exceed `b`'s by more than one client and
/// an eighth. The slack keeps clients from hopping on the moment-to-moment
/// jitter of the counts; moves still happen once a replica falls clearly
/// behind or a returning replica stands empty, so the load evens out.
fn stays(p: (usize, usize, u32), b: (usize, usize, u32)) -> bool {
    let (_, lp, wp) = p;
    let (_, lb, wb) = b;
    let (lp, wp, lb, wb) = (lp as u64, u64::from(wp), lb as u64, u64::from(wb));
    // lp / wp <= lb / wb * 9/8 + 1 / wp, scaled by 8 * wp * wb.
    8 * lp * wb <= 9 * lb * wp + 8 * wb
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn cluster(replicas: usize) -> Arc<Cluster> {
        cluster_with(replicas, "")
    }

    /// `extra`: more of `[databases.app]`, then any other tables.
    fn cluster_with(replicas: usize, extra: &str) -> Arc<Cluster> {
        let reps: Vec<String> = (0..replicas)
            .map(|i| format!("\"127.0.0.1:{}\"", 6000 + i))
            .collect();
        let toml = format!(
            "[users.u]\npassword = \"p\"\n\
             [databases.app]\nprimary = \"127.0.0.1:5999\"\nreplicas = [{}]\n{extra}",
            reps.join(",")
        );
        let config = Config::from_toml(&toml, "test", []).expect("config");
        Cluster::new(&config.databases["app"], &config.routing)
    }

    /// Both replicas of a two-replica cluster measured and caught up.
    fn caught_up(c: &Cluster) {
        c.record_primary(Instant::now(), 100);
        c.record_replica(1, true, Some(100));
        c.record_replica(2, true, Some(100));
    }

    #[test]
    fn unmeasured_replicas_are_out() {
        let c = cluster(2);
        assert_eq!(
            c.availability(1, Instant::now()),
            Availability::Out(OutReason::Unknown)
        );
        assert_eq!(c.pick_replica(None, None, None), None);
    }

    #[test]
    fn caught_up_replicas_rotate_and_lagging_ones_leave() {
        let c = cluster(2);
        let t0 = Instant::now();
        c.record_primary(t0, 100);
        c.record_replica(1, true, Some(100));
        c.record_replica(2, true, Some(100));
        assert!(c.pick_replica(None, None, None).is_some());
        // The primary moves on; replica 2 stops replaying.
        c.record_primary(t0, 200);
        c.record_replica(1, true, Some(200));
        c.record_replica(2, true, Some(100));
        let later = Instant::now() + Duration::from_millis(150);
        assert!(matches!(
            c.availability(1, later),
            Availability::InRotation { .. }
        ));
        assert_eq!(
            c.availability(2, later),
            Availability::Out(OutReason::Lagging)
        );
        // Read-your-writes: only replica 1 has replayed 200.
        for _ in 0..10 {
            assert_eq!(c.pick_replica(Some(200), None, None), Some(1));
        }
        assert_eq!(c.pick_replica(Some(201), None, None), None);
    }

    #[test]
    fn least_outstanding_prefers_the_idle_replica() {
        let c = cluster(2);
        caught_up(&c);
        let _busy = c.attach(1);
        for _ in 0..10 {
            assert_eq!(c.pick_replica(None, None, None), Some(2));
        }
        assert_eq!(c.pick_replica(None, Some(2), None), Some(1));
    }

    #[test]
    fn a_client_stays_on_its_replica_until_it_is_clearly_busier() {
        let c = cluster(2);
        caught_up(&c);
        // Replica 1 has one client more than replica 2: within the slack.
        let on_1: Vec<_> = (0..3).map(|_| c.attach(1)).collect();
        let on_2: Vec<_> = (0..2).map(|_| c.attach(2)).collect();
        for _ in 0..10 {
            assert_eq!(c.pick_replica(None, None, Some(1)), Some(1));
            assert_eq!(c.pick_replica(None, None, Some(2)), Some(2));
        }
        // Two more than replica 2 (3 > 2 * 9/8 + 1): it moves.
        let more = c.attach(1);
        assert_eq!(c.pick_replica(None, None, Some(1)), Some(2));
        drop(more);
        // The preferred replica is passed over when it cannot serve the read:
        // excluded (a failed read's retry), behind the client's writes, or
        // out of rotation.
        assert_eq!(c.pick_replica(None, Some(1), Some(1)), Some(2));
        c.record_primary(Instant::now(), 200);
        c.record_replica(2, true, Some(200));
        assert_eq!(c.pick_replica(Some(200), None, Some(1)), Some(2));
        c.record_replica(1, false, Some(200));
        assert_eq!(c.pick_replica(None, None, Some(1)), Some(2));
        drop((on_1, on_2));
    }

    #[test]
    fn round_robin_ignores_the_preference() {
        let c = cluster_with(2, "[routing]\nread_balance = \"round_robin\"\n");
        caught_up(&c);
        let mut hits = [0; 3];
        for _ in 0..10 {
            hits[c.pick_replica(None, None, Some(1)).expect("a replica")] += 1;
        }
        assert_eq!(hits, [0, 5, 5]);
    }

    #[test]
    fn weights_share_reads() {
        let c = cluster_with(
            2,
            "replica_weights = [1, 3]\n[routing]\nread_balance = \"round_robin\"\n",
        );
        caught_up(&c);
        let mut hits = [0usize; 3];
        for _ in 0..400 {
            hits[c.pick_replica(None, None, None).expect("a replica")] += 1;
        }
        assert_eq!(hits, [0, 100, 300]);
    }

    #[test]
    fn promoted_or_banned_replicas_are_out() {
        let c = cluster(1);
        c.record_primary(Instant::now(), 100);
        c.record_replica(1, false, Some(100));
        assert_eq!(
            c.availability(1, Instant::now()),
            Availability::Out(OutReason::NotInRecovery)
        );
        c.record_replica(1, true, Some(100));
        c.nodes()[1].set_banned(true);
        assert_eq!(
            c.availability(1, Instant::now()),
            Availability::Out(OutReason::Banned)
        );
    }

    #[test]
    fn stale_measurements_fail_closed() {
        let c = cluster(1);
        c.record_primary(Instant::now(), 100);
        c.record_replica(1, true, Some(100));
        let much_later = Instant::now() + Duration::from_secs(5);
        assert_eq!(
            c.availability(1, much_later),
            Availability::Out(OutReason::Unreachable)
        );
    }
}
