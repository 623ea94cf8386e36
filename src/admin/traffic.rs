//! The `/metrics` families built from the traffic counters, the client
//! registry and the routing counters (names: docs/admin.md#metrics, the
//! dashboards' contract). Histograms are read from fixed atomic buckets
//! (`stats::Buckets`) and encoded as Prometheus histograms in seconds.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::frontend::ClientState;
use crate::pool::node_name;
use crate::proxy::Shared;
use crate::stats::{BUCKETS_SECONDS, HistogramSnapshot};

type Labels = Vec<(&'static str, String)>;

/// A histogram whose value was summed from pools at scrape time.
#[derive(Debug, Default)]
struct Histogram(Mutex<HistogramSnapshot>);

impl Histogram {
    fn add(&self, s: &HistogramSnapshot) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).add(s);
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let s = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        let buckets: Vec<(f64, u64)> = BUCKETS_SECONDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(s.counts)
            .collect();
        // The buckets are read one by one: count them, so that `_count`
        // always equals the `+Inf` bucket.
        let count = s.counts.iter().sum();
        encoder.encode_histogram::<NoLabelSet>(s.sum_us as f64 / 1e6, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn db_node(database: &str, node: usize) -> Labels {
    vec![("database", database.to_owned()), ("node", node_name(node))]
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Registers the traffic, client, routing, replica and error families.
pub fn register(registry: &mut Registry, shared: &Shared) {
    clients(registry, shared);
    traffic(registry, shared);
    routing(registry, shared);

    let errors = Family::<Labels, Counter>::default();
    for (class, n) in shared.stats.errors.snapshot() {
        errors.get_or_create(&vec![("class", class)]).inc_by(n);
    }
    registry.register(
        "errors",
        "ErrorResponses sent to clients, by SQLSTATE class (first two characters)",
        errors,
    );

    let max = Gauge::<i64>::default();
    max.set(to_i64(shared.config().general.max_client_conn as u64));
    registry.register(
        "client_connections_max",
        "general.max_client_conn: client connections accepted at most",
        max,
    );

    let p = &shared.stats.prepared;
    for (name, help, counter) in [
        (
            "prepared_client_parses",
            "Parse messages received from clients",
            &p.client_parses,
        ),
        (
            "prepared_server_parses",
            "Parse messages sent to servers (the clients' and injected ones)",
            &p.server_parses,
        ),
        (
            "prepared_cache_hits",
            "Client Parses answered by pgsluice because the server held the statement",
            &p.cache_hits,
        ),
        (
            "prepared_evictions",
            "Prepared statements closed on servers (max_prepared_statements, stale plans)",
            &p.evictions,
        ),
        (
            "session_pins",
            "Clients pinned to their server by a session-only feature",
            &p.pins,
        ),
        (
            "prepared_replans",
            "Requests sent again after a stale cached plan, once the statement was prepared afresh",
            &p.replans,
        ),
    ] {
        let c = Counter::<u64>::default();
        c.inc_by(counter.load(std::sync::atomic::Ordering::Relaxed));
        registry.register(name, help, c);
    }
    shards(registry, shared);
}

/// Sharded databases: statements placed and fan-outs per shard, refusals
/// per database, and each shard node's availability.
fn shards(registry: &mut Registry, shared: &Shared) {
    let statements = Family::<Labels, Counter>::default();
    let fanouts = Family::<Labels, Counter>::default();
    let refused = Family::<Labels, Counter>::default();
    let up = Family::<Labels, Gauge>::default();
    let now = std::time::Instant::now();
    for (name, db) in &shared.shards {
        refused
            .get_or_create(&vec![("database", name.clone())])
            .inc_by(db.refused());
        for shard in &db.shards {
            let labels = vec![
                ("database", name.clone()),
                ("shard", shard.index.to_string()),
            ];
            statements.get_or_create(&labels).inc_by(shard.statements());
            fanouts.get_or_create(&labels).inc_by(shard.fanouts());
            for node in shard.cluster.nodes() {
                let serving = match node.role {
                    crate::cluster::Role::Primary => shard.cluster.primary_reachable(now),
                    crate::cluster::Role::Replica => matches!(
                        shard.cluster.availability(node.index, now),
                        crate::cluster::Availability::InRotation { .. }
                    ),
                };
                let mut l = labels.clone();
                l.push(("node", node.name.clone()));
                up.get_or_create(&l).set(i64::from(serving));
            }
        }
    }
    registry.register(
        "shard_statements",
        "Statements placed on one shard, per shard",
        statements,
    );
    registry.register(
        "shard_fanouts",
        "Key-less reads run on every shard and merged (counted per shard)",
        fanouts,
    );
    registry.register(
        "shard_refused",
        "Statements refused because they cannot be placed or merged exactly",
        refused,
    );
    registry.register(
        "shard_node_serving",
        "1 when a shard's primary is reachable, or its replica is in read rotation",
        up,
    );
}

/// `clients{database,user,state}`: every (database, user) with pools gets
/// all three states (zeros included), so series do not come and go.
fn clients(registry: &mut Registry, shared: &Shared) {
    let mut counts: BTreeMap<(String, String), [i64; 3]> = BTreeMap::new();
    for e in shared.pools.entries() {
        counts.entry((e.database, e.user)).or_default();
    }
    for c in shared.registry.all() {
        let slot = match c.state() {
            ClientState::Active => 0,
            ClientState::Waiting => 1,
            ClientState::Idle => 2,
        };
        counts
            .entry((c.id.database.to_string(), c.id.user.to_string()))
            .or_default()[slot] += 1;
    }
    let family = Family::<Labels, Gauge>::default();
    for ((database, user), n) in counts {
        for (state, value) in ["active", "waiting", "idle"].into_iter().zip(n) {
            family
                .get_or_create(&vec![
                    ("database", database.clone()),
                    ("user", user.clone()),
                    ("state", state.to_owned()),
                ])
                .set(value);
        }
    }
    registry.register(
        "clients",
        "Logged-in clients by state: active (holding a server), waiting (for one), idle",
        family,
    );
}

/// Per (database, node), users summed: transactions, queries, their
/// latency histograms; per database: the wait histogram.
fn traffic(registry: &mut Registry, shared: &Shared) {
    let xacts = Family::<Labels, Counter>::default();
    let queries = Family::<Labels, Counter>::default();
    let xact_time = Family::<Labels, Histogram>::default();
    let query_time = Family::<Labels, Histogram>::default();
    let wait = Family::<Labels, Histogram>::default();
    for e in shared.pools.entries() {
        for (node, pool) in e.pools.iter().enumerate() {
            let labels = db_node(&e.database, node);
            let s = pool.stats();
            let t = s.totals();
            xacts.get_or_create(&labels).inc_by(t.xact_count);
            queries.get_or_create(&labels).inc_by(t.query_count);
            xact_time.get_or_create(&labels).add(&s.xact_histogram());
            query_time.get_or_create(&labels).add(&s.query_histogram());
            wait.get_or_create(&vec![("database", e.database.clone())])
                .add(&s.wait_histogram());
        }
    }
    registry.register(
        "transactions",
        "Transactions finished (an autocommit statement is one)",
        xacts,
    );
    registry.register(
        "queries",
        "Requests answered (one per ReadyForQuery)",
        queries,
    );
    registry.register(
        "transaction_duration_seconds",
        "Transaction time, first request to the idle ReadyForQuery",
        xact_time,
    );
    registry.register(
        "query_duration_seconds",
        "Request time, sent to answered (ReadyForQuery)",
        query_time,
    );
    registry.register(
        "client_wait_seconds",
        "Time clients waited for a server connection (checkout)",
        wait,
    );
}

/// Routing decisions, replica lag in bytes, bans.
fn routing(registry: &mut Registry, shared: &Shared) {
    let decisions = Family::<Labels, Counter>::default();
    let lag = Family::<Labels, Gauge>::default();
    let banned = Family::<Labels, Gauge>::default();
    for (name, cluster) in shared.clusters().iter() {
        for (target, reason, n) in cluster.decisions.snapshot() {
            decisions
                .get_or_create(&vec![
                    ("database", name.clone()),
                    ("target", target.to_owned()),
                    ("reason", reason.as_str().to_owned()),
                ])
                .inc_by(n);
        }
        for node in cluster.nodes().iter().skip(1) {
            let labels = db_node(name, node.index);
            if let Some(bytes) = cluster.lag_bytes(node.index) {
                lag.get_or_create(&labels).set(to_i64(bytes));
            }
            banned
                .get_or_create(&labels)
                .set(i64::from(node.is_banned()));
        }
    }
    registry.register(
        "routing_decisions",
        "Routing decisions by target (primary, replica) and reason",
        decisions,
    );
    registry.register(
        "replica_lag_bytes",
        "WAL bytes the replica has not replayed, against the primary's last sampled position",
        lag,
    );
    registry.register(
        "node_banned",
        "1 while an operator has banned the replica (admin console BAN)",
        banned,
    );
}
