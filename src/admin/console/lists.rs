//! `SHOW DATABASES`, `SHOW USERS`, `SHOW LISTS`, `SHOW VERSION`,
//! `SHOW HELP`: what is configured and how much of it is in use.

use super::result::{Column, ResultSet, v};
use super::{Ctx, Outcome, Reply, node_row_name};

const DATABASES: [Column; 13] = [
    Column::Text("name"),
    Column::Text("host"),
    Column::Int4("port"),
    Column::Text("database"),
    Column::Text("force_user"),
    Column::Int4("pool_size"),
    Column::Int4("min_pool_size"),
    Column::Int4("reserve_pool"),
    Column::Text("pool_mode"),
    Column::Int4("max_connections"),
    Column::Int4("current_connections"),
    Column::Int4("paused"),
    Column::Int4("disabled"),
];

/// One row per node of every configured database (`db`, `db@replicaN`).
pub fn databases(ctx: &Ctx<'_>) -> Outcome {
    let entries = ctx.shared.pools.entries();
    let mut rs = ResultSet::new(&DATABASES);
    for db in ctx.shared.config().databases.values() {
        let gate = ctx.shared.pools.gate(&db.name);
        let nodes = std::iter::once(&db.primary).chain(db.replicas.iter());
        for (node, addr) in nodes.enumerate() {
            let current: usize = entries
                .iter()
                .filter(|e| e.database == db.name)
                .filter_map(|e| e.pools.get(node))
                .map(|p| p.status().open)
                .sum();
            rs.push(vec![
                v(node_row_name(&db.name, node)),
                v(&addr.host),
                v(addr.port),
                v(&db.dbname),
                None,
                v(db.pool.pool_size),
                v(db.pool.min_pool_size),
                v(db.pool.max_pool_size - db.pool.pool_size),
                v(db.pool_mode.as_str()),
                v(0),
                v(current),
                v(u8::from(gate.is_paused())),
                v(u8::from(gate.is_disabled())),
            ]);
        }
    }
    Ok(Reply::Rows(rs))
}

pub fn users(ctx: &Ctx<'_>) -> Outcome {
    let mut rs = ResultSet::new(&[Column::Text("name"), Column::Text("pool_mode")]);
    for name in ctx.shared.config().users.keys() {
        rs.push(vec![v(name), None]);
    }
    Ok(Reply::Rows(rs))
}

pub fn lists(ctx: &Ctx<'_>) -> Outcome {
    let pools = ctx.shared.pools.all();
    let logged_in = ctx.shared.registry.len();
    let used_servers: usize = pools.iter().map(|p| p.status().open).sum();
    let mut rs = ResultSet::new(&[Column::Text("list"), Column::Int4("items")]);
    for (name, n) in [
        ("databases", ctx.shared.config().databases.len()),
        ("users", ctx.shared.config().users.len()),
        ("pools", pools.len()),
        ("free_clients", 0),
        ("used_clients", logged_in),
        (
            "login_clients",
            ctx.shared.client_count().saturating_sub(logged_in),
        ),
        ("free_servers", 0),
        ("used_servers", used_servers),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ] {
        rs.push(vec![v(name), v(n)]);
    }
    Ok(Reply::Rows(rs))
}

/// Starts like pgbouncer's answer, so tools that read the console's
/// dialect from it pick 1.18's.
pub fn version() -> Outcome {
    let mut rs = ResultSet::new(&[Column::Text("version")]);
    rs.push(vec![v(format!(
        "PgBouncer 1.18.0 (pgsluice {})",
        env!("CARGO_PKG_VERSION")
    ))]);
    Ok(Reply::Rows(rs))
}

pub fn help() -> Outcome {
    Ok(Reply::Notice(
        "\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION|LISTS\
         \n\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS\
         \n\tSHOW REPLICAS|PREPARED\
         \n\tSHOW ROUTE <sql>\
         \n\tPAUSE [<db>]\
         \n\tRESUME [<db>]\
         \n\tDISABLE <db>\
         \n\tENABLE <db>\
         \n\tRECONNECT [<db>]\
         \n\tKILL <db>\
         \n\tKILL_CLIENT <id>\
         \n\tWAIT_CLOSE [<db>]\
         \n\tBAN <node>\
         \n\tUNBAN <node>\
         \n\tSHUTDOWN [WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS]"
            .to_owned(),
    ))
}
