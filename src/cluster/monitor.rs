//! The monitor: one task per node, each with its own cheap connection,
//! probing every `monitor_interval` under one `monitor_timeout` deadline
//! per probe (connect included).
//!
//! The primary's task samples `pg_current_wal_lsn()`; a replica's task reads
//! `pg_is_in_recovery()` and `pg_last_wal_replay_lsn()`. Nothing is written
//! to any server. Transitions in and out of rotation are logged with the
//! reason. The tasks hold only a weak reference: dropping the cluster stops
//! them.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

use super::history::parse_lsn;
use super::{Availability, Cluster, Role};
use crate::router::FunctionCatalog;
use crate::tls::TlsHandle;

/// Function names whose every overload is immutable or stable: calls of
/// anything else (volatile, or created later) go to the primary.
const FUNCTIONS_SQL: &str = "SELECT lower(proname::text) FROM pg_catalog.pg_proc \
     GROUP BY 1 HAVING bool_and(provolatile <> 'v')";

const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
     ELSE pg_current_wal_lsn() END";

/// Longest pause between reconnect attempts to a node that is down.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// How the monitor logs in: one user, the same on every node.
#[derive(Clone)]
pub struct MonitorLogin {
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub connect_timeout: Duration,
    /// `tls.server_mode` and its connector, read at each (re)connect.
    pub tls: TlsHandle,
}

/// Called with a node index when that node answers again after failing.
type OnReachable = Arc<dyn Fn(usize) + Send + Sync>;

/// Starts one probing task per node of `cluster`. `on_reachable(i)` runs
/// when node `i` answers again after failing (e.g. to clear a pool's
/// remembered login failure so writes resume at once).
pub fn spawn_monitor(cluster: &Arc<Cluster>, login: MonitorLogin, on_reachable: OnReachable) {
    for node in cluster.nodes() {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&node.addr.host)
            .port(node.addr.port)
            .user(&login.user)
            .dbname(&login.dbname)
            .application_name("pgsluice monitor")
            .connect_timeout(login.connect_timeout);
        if let Some(p) = &login.password {
            config.password(p);
        }
        tokio::spawn(watch_node(
            Arc::downgrade(cluster),
            node.index,
            Probe {
                config,
                tls: login.tls.clone(),
            },
            on_reachable.clone(),
        ));
    }
}

struct Sample {
    sent: Instant,
    in_recovery: bool,
    lsn: Option<u64>,
}

/// How a node's monitor task connects.
struct Probe {
    config: tokio_postgres::Config,
    tls: TlsHandle,
}

impl Probe {
    /// A new connection, with TLS as `tls.server_mode` says (the same
    /// certificate checks as pooled connections).
    async fn connect(&self) -> Result<Client, String> {
        crate::tls::connect_postgres(&self.config, &self.tls).await
    }
}

async fn probe(client: &mut Option<Client>, probe: &Probe) -> Result<Sample, String> {
    if client.is_none() {
        *client = Some(probe.connect().await?);
    }
    let Some(c) = client.as_ref() else {
        return Err("no connection".into());
    };
    let sent = Instant::now();
    let messages = c.simple_query(PROBE_SQL).await.map_err(|e| e.to_string())?;
    let row = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .ok_or("probe returned no row")?;
    let in_recovery = row.get(0) == Some("t");
    let lsn = match row.get(1) {
        Some(s) => Some(parse_lsn(s).ok_or_else(|| format!("unreadable LSN {s:?}"))?),
        None => None,
    };
    Ok(Sample {
        sent,
        in_recovery,
        lsn,
    })
}

/// Reads the names of the read-only functions on the primary.
async fn read_only_functions(client: &Client) -> Result<Vec<String>, String> {
    let messages = client
        .simple_query(FUNCTIONS_SQL)
        .await
        .map_err(|e| e.to_string())?;
    Ok(messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect())
}

/// Coarse state for transition logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Up,
    Out(&'static str),
}

async fn watch_node(
    cluster: Weak<Cluster>,
    index: usize,
    config: Probe,
    on_reachable: OnReachable,
) {
    let (interval, timeout) = match cluster.upgrade() {
        Some(c) => (c.settings.monitor_interval, c.settings.monitor_timeout),
        None => return,
    };
    let mut client = None;
    let mut seen: Option<Seen> = None;
    let mut failures: u32 = 0;
    let mut next_attempt = Instant::now();
    let mut last_error = String::new();
    let mut functions_due = Instant::now();
    loop {
        let now = Instant::now();
        let wake = if next_attempt > now {
            next_attempt
        } else {
            now + interval
        };
        if failures == 0 || next_attempt <= now {
            let result = match tokio::time::timeout(timeout, probe(&mut client, &config)).await {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "no answer within routing.monitor_timeout ({})",
                    humantime::format_duration(timeout)
                )),
            };
            let Some(cluster) = cluster.upgrade() else {
                return;
            };
            if cluster.is_retired() {
                return;
            }
            let node = &cluster.nodes()[index];
            match result {
                Ok(sample) => {
                    if failures > 0 {
                        cluster.record_failing(index, false);
                        on_reachable(index);
                    }
                    failures = 0;
                    match node.role {
                        Role::Primary if sample.in_recovery => {
                            last_error = "the primary is in recovery (a standby?)".into();
                        }
                        Role::Primary => {
                            if let Some(lsn) = sample.lsn {
                                cluster.record_primary(sample.sent, lsn);
                            }
                            if Instant::now() >= functions_due {
                                refresh_functions(&cluster, client.as_ref(), timeout).await;
                                functions_due =
                                    Instant::now() + cluster.settings.function_refresh_interval;
                            }
                        }
                        Role::Replica => {
                            cluster.record_replica(index, sample.in_recovery, sample.lsn)
                        }
                    }
                }
                Err(e) => {
                    cluster.record_failing(index, true);
                    client = None;
                    failures = failures.saturating_add(1);
                    let backoff = interval
                        .saturating_mul(1 << failures.min(10))
                        .min(MAX_BACKOFF.max(interval));
                    next_attempt = Instant::now() + backoff;
                    last_error = e;
                }
            }
            let state = match node.role {
                Role::Primary if cluster.primary_reachable(Instant::now()) => Seen::Up,
                Role::Primary => Seen::Out("unreachable"),
                Role::Replica => match cluster.availability(index, Instant::now()) {
                    Availability::InRotation { .. } => Seen::Up,
                    Availability::Out(r) => Seen::Out(r.as_str()),
                },
            };
            if seen != Some(state) {
                log_transition(&cluster, index, seen, state, &last_error);
                seen = Some(state);
            }
        }
        tokio::time::sleep_until(wake.into()).await;
    }
}

async fn refresh_functions(cluster: &Cluster, client: Option<&Client>, timeout: Duration) {
    let Some(client) = client else {
        return;
    };
    match tokio::time::timeout(timeout * 5, read_only_functions(client)).await {
        Ok(Ok(names)) => {
            let mut allow: Vec<String> = FunctionCatalog::DEFAULT_ALLOW
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
            allow.extend(cluster.settings.read_only_functions.iter().cloned());
            tracing::debug!(database = %cluster.database, read_only = names.len(), "function catalog loaded");
            cluster.set_functions(FunctionCatalog::from_read_only(names, &allow));
        }
        Ok(Err(e)) => {
            tracing::warn!(database = %cluster.database, error = %e, "cannot read the function list from pg_proc; keeping the previous list")
        }
        Err(_) => {
            tracing::warn!(database = %cluster.database, "reading the function list from pg_proc timed out; keeping the previous list")
        }
    }
}

fn log_transition(cluster: &Cluster, index: usize, before: Option<Seen>, now: Seen, error: &str) {
    let node = &cluster.nodes()[index];
    let (db, name, addr) = (&cluster.database, &node.name, &node.addr);
    match (node.role, now) {
        (Role::Primary, Seen::Up) => {
            tracing::info!(database = %db, node = %name, %addr, "primary reachable")
        }
        (Role::Primary, Seen::Out(_)) => {
            tracing::warn!(database = %db, node = %name, %addr, error, "primary unreachable")
        }
        (Role::Replica, Seen::Up) => {
            tracing::info!(database = %db, node = %name, %addr, "replica joined read rotation")
        }
        (Role::Replica, Seen::Out(reason)) if before.is_none() && reason == "not yet measured" => {
            tracing::debug!(database = %db, node = %name, %addr, "replica not yet measured")
        }
        (Role::Replica, Seen::Out(reason)) => {
            let error = if reason == "unreachable" { error } else { "" };
            tracing::warn!(database = %db, node = %name, %addr, reason, error, "replica out of read rotation")
        }
    }
}
