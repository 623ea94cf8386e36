//! `SHOW ROUTE <sql>` (pgsluice's own): where the statement would go now,
//! for a client that just connected (default route, no write of its own
//! yet), in every database — the classifier's verdict and the router's
//! decision with the replicas' current state. Nothing is counted or run.

use super::result::{Column, ResultSet, v};
use super::{Ctx, Outcome, Reply};
use crate::pool::node_name;
use crate::router::Access;

const COLUMNS: [Column; 6] = [
    Column::Text("database"),
    Column::Text("access"),
    Column::Text("class"),
    Column::Text("target"),
    Column::Text("node"),
    Column::Text("reason"),
];

pub fn show(ctx: &Ctx<'_>, sql: &str) -> Outcome {
    let mut rs = ResultSet::new(&COLUMNS);
    for db in ctx.shared.config().databases.values() {
        let access = |a: Access| match a {
            Access::Read => "read",
            Access::Write => "write",
        };
        if let Some(sharded) = ctx.shared.shards.get(&db.name) {
            // Sharded: the shard and why; the node within the shard follows
            // the replication rules above.
            let (target, reason) = sharded.explain(sql);
            let class = match sharded.shards.first() {
                Some(shard) => shard.cluster.classify(sql.as_bytes()),
                None => crate::router::classify(sql, &crate::router::FunctionCatalog::builtin()),
            };
            rs.push(vec![
                v(&db.name),
                v(access(class.access)),
                v(class.reason.as_str()),
                v(target),
                None,
                v(reason),
            ]);
            continue;
        }
        match ctx.shared.clusters().get(&db.name) {
            Some(cluster) if db.pool_mode != crate::config::PoolMode::Session => {
                let (class, node, reason) = crate::frontend::preview_route(cluster, sql);
                rs.push(vec![
                    v(&db.name),
                    v(access(class.access)),
                    v(class.reason.as_str()),
                    v(if node == 0 { "primary" } else { "replica" }),
                    v(node_name(node)),
                    v(reason.as_str()),
                ]);
            }
            // No replicas, or session mode: no routing, the primary runs
            // everything.
            _ => rs.push(vec![
                v(&db.name),
                None,
                None,
                v("primary"),
                v(node_name(0)),
                v(if db.replicas.is_empty() {
                    "no_replicas"
                } else {
                    "session_mode"
                }),
            ]),
        }
    }
    Ok(Reply::Rows(rs))
}
