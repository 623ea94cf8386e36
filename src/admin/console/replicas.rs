//! `SHOW REPLICAS`, `BAN <node>`, `UNBAN <node>` (pgsluice's own): every
//! node of every database with replicas, what the monitor last saw, and
//! the operator's switch to take a replica out of read rotation.

use std::time::Instant;

use super::result::{Column, ResultSet, v};
use super::{ConsoleError, Ctx, Outcome, Reply};
use crate::cluster::{Availability, Role};
use crate::protocol::sqlstate;

const COLUMNS: [Column; 12] = [
    Column::Text("database"),
    Column::Text("node"),
    Column::Text("role"),
    Column::Text("host"),
    Column::Int4("port"),
    Column::Text("state"),
    Column::Text("reason"),
    Column::Numeric("lag_ms"),
    Column::Int8("lag_bytes"),
    Column::Text("replayed_lsn"),
    Column::Int4("banned"),
    Column::Int4("clients"),
];

/// `0/3000060`, as PostgreSQL prints an LSN.
pub fn lsn(l: u64) -> String {
    format!("{:X}/{:X}", l >> 32, l & 0xffff_ffff)
}

pub fn show(ctx: &Ctx<'_>) -> Outcome {
    let now = Instant::now();
    let mut rs = ResultSet::new(&COLUMNS);
    for (name, cluster) in ctx.shared.clusters().iter() {
        for node in cluster.nodes() {
            let (role, state, reason, lag) = match node.role {
                Role::Primary => {
                    let up = cluster.primary_reachable(now);
                    (
                        "primary",
                        if up { "reachable" } else { "unreachable" },
                        String::new(),
                        None,
                    )
                }
                Role::Replica => {
                    let (state, reason) = match cluster.availability(node.index, now) {
                        Availability::InRotation { .. } => ("in_rotation", String::new()),
                        Availability::Out(r) => ("out", r.as_str().to_owned()),
                    };
                    ("replica", state, reason, cluster.lag(node.index, now))
                }
            };
            let replayed = node.replayed();
            rs.push(vec![
                v(name),
                v(&node.name),
                v(role),
                v(&node.addr.host),
                v(node.addr.port),
                v(state),
                v(reason),
                lag.map(|l| format!("{:.3}", l.as_secs_f64() * 1000.0)),
                if node.role == Role::Replica {
                    cluster.lag_bytes(node.index).map(|b| b.to_string())
                } else {
                    None
                },
                (replayed > 0).then(|| lsn(replayed)),
                v(u8::from(node.is_banned())),
                v(node.outstanding()),
            ]);
        }
    }
    Ok(Reply::Rows(rs))
}

/// `BAN` / `UNBAN`: `db@replicaN`, `replicaN` (in every database that has
/// it) or `host:port` (every node there). A banned replica serves no new
/// reads; clients attached to it keep it until their transaction ends.
pub fn ban(ctx: &Ctx<'_>, target: &str, banned: bool) -> Outcome {
    let verb = if banned { "BAN" } else { "UNBAN" };
    let (db, node) = match target.split_once('@') {
        Some((db, node)) => (Some(db), node),
        None => (None, target),
    };
    let mut matched = Vec::new();
    let mut primary = false;
    for (name, cluster) in ctx.shared.clusters().iter() {
        if db.is_some_and(|d| d != name) {
            continue;
        }
        for n in cluster.nodes() {
            if n.name != node && n.addr.to_string() != node {
                continue;
            }
            if n.role == Role::Primary {
                primary = true;
                continue;
            }
            matched.push((name.clone(), n.index));
        }
    }
    if matched.is_empty() {
        return Err(if primary {
            ConsoleError::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "{verb} {target}: a primary cannot be banned (only replicas leave read rotation)"
                ),
            )
        } else {
            ConsoleError::new(
                sqlstate::UNDEFINED_OBJECT,
                format!(
                    "{verb} {target}: no such replica; name one as db@replicaN, replicaN or host:port (see SHOW REPLICAS)"
                ),
            )
        });
    }
    for (name, i) in &matched {
        if let Some(cluster) = ctx.shared.clusters().get(name) {
            cluster.nodes()[*i].set_banned(banned);
            tracing::info!(database = %name, node = %cluster.nodes()[*i].name, banned, "replica ban changed from the admin console");
        }
    }
    Ok(Reply::Done(verb))
}

#[cfg(test)]
mod tests {
    #[test]
    fn lsns_print_like_postgresql() {
        assert_eq!(super::lsn(0x3000060), "0/3000060");
        assert_eq!(super::lsn((1 << 32) | 0xAB), "1/AB");
    }
}
