//! `SHOW POOLS`: one row per pool, that is per database, user and node.
//! The primary's row carries the database's plain name, a replica's
//! `db@replicaN`, so a database without replicas reads exactly as in
//! pgbouncer and every row has its own (database, user) pair.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::result::{Column, ResultSet, v};
use super::{Ctx, Outcome, Reply, node_row_name};
use crate::frontend::ClientState;

const COLUMNS: [Column; 16] = [
    Column::Text("database"),
    Column::Text("user"),
    Column::Int4("cl_active"),
    Column::Int4("cl_waiting"),
    Column::Int4("cl_active_cancel_req"),
    Column::Int4("cl_waiting_cancel_req"),
    Column::Int4("sv_active"),
    Column::Int4("sv_active_cancel"),
    Column::Int4("sv_being_canceled"),
    Column::Int4("sv_idle"),
    Column::Int4("sv_used"),
    Column::Int4("sv_tested"),
    Column::Int4("sv_login"),
    Column::Int4("maxwait"),
    Column::Int4("maxwait_us"),
    Column::Text("pool_mode"),
];

/// Clients of one pool: (active, waiting, longest wait).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct PoolClients {
    pub active: usize,
    pub waiting: usize,
    pub max_wait: Duration,
}

/// Clients per (database, user, node). A client between requests counts as
/// active on the primary's row (pgbouncer counts logged-in clients that
/// are not waiting as active); one waiting or holding a server counts on
/// that node's row.
pub(super) fn clients_by_pool(ctx: &Ctx<'_>) -> HashMap<(String, String, usize), PoolClients> {
    let now = Instant::now();
    let mut out: HashMap<(String, String, usize), PoolClients> = HashMap::new();
    for c in ctx.shared.registry.all() {
        if c.id.console {
            continue;
        }
        let state = c.state();
        let node = if state == ClientState::Idle {
            0
        } else {
            c.node()
        };
        let e = out
            .entry((c.id.database.to_string(), c.id.user.to_string(), node))
            .or_default();
        if state == ClientState::Waiting {
            e.waiting += 1;
            e.max_wait = e.max_wait.max(now.saturating_duration_since(c.since()));
        } else {
            e.active += 1;
        }
    }
    out
}

pub fn pools(ctx: &Ctx<'_>) -> Outcome {
    let clients = clients_by_pool(ctx);
    let mut rs = ResultSet::new(&COLUMNS);
    for entry in ctx.shared.pools.entries() {
        let mode = ctx
            .shared
            .config()
            .databases
            .get(&entry.database)
            .map_or("transaction", |d| d.pool_mode.as_str());
        for (node, pool) in entry.pools.iter().enumerate() {
            let s = pool.status();
            let c = clients
                .get(&(entry.database.clone(), entry.user.clone(), node))
                .copied()
                .unwrap_or_default();
            rs.push(vec![
                v(node_row_name(&entry.database, node)),
                v(&entry.user),
                v(c.active),
                v(c.waiting),
                v(0),
                v(0),
                v(s.open.saturating_sub(s.idle)),
                v(0),
                v(0),
                v(s.idle),
                v(0),
                v(0),
                v(s.opening),
                v(c.max_wait.as_secs()),
                v(c.max_wait.subsec_micros()),
                v(mode),
            ]);
        }
    }
    Ok(Reply::Rows(rs))
}
