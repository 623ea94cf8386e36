//! `/metrics`: a Prometheus text exposition built at each scrape from the
//! live state (pools, the replica monitor, client counts). Building a
//! registry per scrape costs microseconds for a few hundred series and keeps
//! no metric state of its own that could drift from the truth.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::cluster::Availability;
use crate::proxy::{Phase, Shared};

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// The whole exposition, in Prometheus text format.
pub fn render_metrics(shared: &Shared) -> String {
    let mut registry = Registry::with_prefix("pgsluice");

    let build = Family::<Labels, Gauge>::default();
    build
        .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())])
        .set(1);
    registry.register("build_info", "Build information", build);

    let clients = Gauge::<i64>::default();
    clients.set(i64::try_from(shared.client_count()).unwrap_or(i64::MAX));
    registry.register("clients_connected", "Client connections open", clients);

    let parked = Gauge::<i64>::default();
    parked.set(i64::try_from(shared.parking.len()).unwrap_or(i64::MAX));
    registry.register(
        "clients_parked",
        "Idle clients parked without a task (park_idle_clients_after)",
        parked,
    );

    let draining = Gauge::<i64>::default();
    draining.set(i64::from(*shared.phase.borrow() != Phase::Running));
    registry.register(
        "draining",
        "1 while shutting down (not accepting clients)",
        draining,
    );

    let statements = Gauge::<i64>::default();
    statements.set(i64::try_from(shared.statements.len()).unwrap_or(i64::MAX));
    registry.register(
        "prepared_statements_distinct",
        "Distinct prepared statements known across all clients",
        statements,
    );

    let reloads = Family::<Labels, Counter>::default();
    for (outcome, n) in [
        ("success", shared.reloads.successes()),
        ("failure", shared.reloads.failures()),
    ] {
        reloads
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc_by(n);
    }
    registry.register(
        "config_reloads",
        "Configuration reloads (SIGHUP, RELOAD) by outcome",
        reloads,
    );
    let last_reload = FloatGauge::default();
    last_reload.set(shared.reloads.last_success_seconds());
    registry.register(
        "config_last_reload_success_timestamp_seconds",
        "When the configuration was last loaded successfully (startup or reload), Unix time",
        last_reload,
    );

    let servers = Family::<Labels, Gauge>::default();
    let waiting = Family::<Labels, Gauge>::default();
    for pool in shared.pools.all() {
        let s = pool.status();
        let (database, user, node) = split_label(pool.label());
        let base = |state: &str| {
            vec![
                ("database", database.clone()),
                ("user", user.clone()),
                ("node", node.clone()),
                ("state", state.to_owned()),
            ]
        };
        servers.get_or_create(&base("idle")).set(to_i64(s.idle));
        servers
            .get_or_create(&base("active"))
            .set(to_i64(s.open.saturating_sub(s.idle)));
        servers
            .get_or_create(&base("opening"))
            .set(to_i64(s.opening));
        waiting
            .get_or_create(&vec![
                ("database", database.clone()),
                ("user", user.clone()),
                ("node", node.clone()),
            ])
            .set(to_i64(s.waiting));
    }
    registry.register(
        "server_connections",
        "Server connections per pool, by state",
        servers,
    );
    registry.register(
        "clients_waiting",
        "Clients waiting for a server connection, per pool",
        waiting,
    );

    let now = Instant::now();
    let lag = Family::<Labels, FloatGauge>::default();
    let in_rotation = Family::<Labels, Gauge>::default();
    let attached = Family::<Labels, Gauge>::default();
    let primary_up = Family::<Labels, Gauge>::default();
    let retries = Family::<Labels, Counter>::default();
    for (name, cluster) in shared.clusters().iter() {
        primary_up
            .get_or_create(&vec![("database", name.clone())])
            .set(i64::from(cluster.primary_reachable(now)));
        retries
            .get_or_create(&vec![("database", name.clone())])
            .inc_by(cluster.retries());
        for node in cluster.nodes() {
            let labels = vec![("database", name.clone()), ("node", node.name.clone())];
            attached
                .get_or_create(&labels)
                .set(to_i64(node.outstanding()));
            if node.index == 0 {
                continue;
            }
            if let Some(l) = cluster.lag(node.index, now) {
                lag.get_or_create(&labels).set(l.as_secs_f64());
            }
            let (value, reason) = match cluster.availability(node.index, now) {
                Availability::InRotation { .. } => (1, "in_rotation"),
                Availability::Out(r) => (0, r.as_str()),
            };
            let mut labels = labels;
            labels.push(("reason", reason.replace(' ', "_")));
            in_rotation.get_or_create(&labels).set(value);
        }
    }
    registry.register(
        "replica_lag_seconds",
        "Age of the oldest primary WAL position the replica has not replayed",
        lag,
    );
    registry.register(
        "replica_in_rotation",
        "1 when the replica serves reads; the reason label says why not",
        in_rotation,
    );
    registry.register(
        "node_clients_attached",
        "Clients holding a server on this node now",
        attached,
    );
    registry.register(
        "primary_reachable",
        "1 when the monitor reaches the database's primary",
        primary_up,
    );
    registry.register(
        "read_retries",
        "Reads sent again elsewhere after a replica failed them before any row",
        retries,
    );

    super::traffic::register(&mut registry, shared);

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `db/user@node` → (db, user, node).
fn split_label(label: &str) -> (String, String, String) {
    let (rest, node) = label.rsplit_once('@').unwrap_or((label, ""));
    let (db, user) = rest.split_once('/').unwrap_or((rest, ""));
    (db.to_owned(), user.to_owned(), node.to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn pool_labels_split() {
        assert_eq!(
            super::split_label("app/u@replica2"),
            ("app".into(), "u".into(), "replica2".into())
        );
    }
}
