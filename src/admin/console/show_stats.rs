//! `SHOW STATS`, `SHOW STATS_TOTALS`, `SHOW STATS_AVERAGES`, `SHOW TOTALS`:
//! traffic per database row (the primary as `db`, each replica as
//! `db@replicaN`, users summed), with pgbouncer's columns and meanings.
//! Averages cover the last complete `general.stats_period`.

use std::collections::BTreeMap;
use std::time::Duration;

use super::result::{Column, ResultSet, v};
use super::{Ctx, Outcome, Reply, node_row_name};
use crate::stats::{Averages, Totals};

/// Totals and last-period deltas of one row.
#[derive(Debug, Default, Clone, Copy)]
struct Row {
    totals: Totals,
    delta: Totals,
    period: Duration,
}

impl Row {
    fn averages(&self) -> Averages {
        Averages::of(self.delta, self.period)
    }
}

/// Rows by (database, node), users summed.
fn rows(ctx: &Ctx<'_>) -> BTreeMap<(String, usize), Row> {
    let mut out: BTreeMap<(String, usize), Row> = BTreeMap::new();
    for entry in ctx.shared.pools.entries() {
        for (node, pool) in entry.pools.iter().enumerate() {
            let row = out.entry((entry.database.clone(), node)).or_default();
            row.totals += pool.stats().totals();
            if let Some((delta, over)) = pool.stats().last_period() {
                row.delta += delta;
                row.period = row.period.max(over);
            }
        }
    }
    out
}

const STATS: [Column; 16] = [
    Column::Text("database"),
    Column::Numeric("total_xact_count"),
    Column::Numeric("total_query_count"),
    Column::Numeric("total_received"),
    Column::Numeric("total_sent"),
    Column::Numeric("total_xact_time"),
    Column::Numeric("total_query_time"),
    Column::Numeric("total_wait_time"),
    Column::Numeric("avg_xact_count"),
    Column::Numeric("avg_query_count"),
    Column::Numeric("avg_recv"),
    Column::Numeric("avg_sent"),
    Column::Numeric("avg_xact_time"),
    Column::Numeric("avg_query_time"),
    Column::Numeric("avg_wait_time"),
    // Not in pgbouncer 1.18: its name before 1.8 for total_query_count,
    // still read by Debian's prometheus-pgbouncer-exporter (1.7).
    Column::Numeric("total_requests"),
];

pub fn stats(ctx: &Ctx<'_>) -> Outcome {
    let mut rs = ResultSet::new(&STATS);
    for ((db, node), row) in rows(ctx) {
        let (t, a) = (row.totals, row.averages());
        rs.push(vec![
            v(node_row_name(&db, node)),
            v(t.xact_count),
            v(t.query_count),
            v(t.received),
            v(t.sent),
            v(t.xact_time),
            v(t.query_time),
            v(t.wait_time),
            v(a.xact_count),
            v(a.query_count),
            v(a.received),
            v(a.sent),
            v(a.xact_time),
            v(a.query_time),
            v(a.wait_time),
            v(t.query_count),
        ]);
    }
    Ok(Reply::Rows(rs))
}

const TOTALS_COLUMNS: [Column; 8] = [
    Column::Text("database"),
    Column::Numeric("xact_count"),
    Column::Numeric("query_count"),
    Column::Numeric("bytes_received"),
    Column::Numeric("bytes_sent"),
    Column::Numeric("xact_time"),
    Column::Numeric("query_time"),
    Column::Numeric("wait_time"),
];

pub fn totals(ctx: &Ctx<'_>) -> Outcome {
    let mut rs = ResultSet::new(&TOTALS_COLUMNS);
    for ((db, node), row) in rows(ctx) {
        let t = row.totals;
        rs.push(vec![
            v(node_row_name(&db, node)),
            v(t.xact_count),
            v(t.query_count),
            v(t.received),
            v(t.sent),
            v(t.xact_time),
            v(t.query_time),
            v(t.wait_time),
        ]);
    }
    Ok(Reply::Rows(rs))
}

pub fn averages(ctx: &Ctx<'_>) -> Outcome {
    let mut rs = ResultSet::new(&TOTALS_COLUMNS);
    for ((db, node), row) in rows(ctx) {
        let a = row.averages();
        rs.push(vec![
            v(node_row_name(&db, node)),
            v(a.xact_count),
            v(a.query_count),
            v(a.received),
            v(a.sent),
            v(a.xact_time),
            v(a.query_time),
            v(a.wait_time),
        ]);
    }
    Ok(Reply::Rows(rs))
}

/// `SHOW TOTALS`: everything summed, as name/value rows.
pub fn grand_totals(ctx: &Ctx<'_>) -> Outcome {
    let mut all = Row::default();
    for row in rows(ctx).into_values() {
        all.totals += row.totals;
        all.delta += row.delta;
        all.period = all.period.max(row.period);
    }
    let (t, a) = (all.totals, all.averages());
    let mut rs = ResultSet::new(&[Column::Text("name"), Column::Numeric("value")]);
    for (name, value) in [
        ("total_xact_count", t.xact_count),
        ("total_query_count", t.query_count),
        ("total_client_bytes", t.received),
        ("total_server_bytes", t.sent),
        ("total_xact_time", t.xact_time),
        ("total_query_time", t.query_time),
        ("total_wait_time", t.wait_time),
        ("avg_xact_count", a.xact_count),
        ("avg_query_count", a.query_count),
        ("avg_client_bytes", a.received),
        ("avg_server_bytes", a.sent),
        ("avg_xact_time", a.xact_time),
        ("avg_query_time", a.query_time),
        ("avg_wait_time", a.wait_time),
    ] {
        rs.push(vec![v(name), v(value)]);
    }
    Ok(Reply::Rows(rs))
}
