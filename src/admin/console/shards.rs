//! `SHOW SHARDS` (pgsluice's own): every node of every shard of the
//! sharded databases — address, role, state (in rotation or why not), lag,
//! attached clients — and each shard's statement and fan-out counters.

use super::result::{Column, ResultSet, v};
use super::{Ctx, Outcome, Reply};
use crate::cluster::{SHARDS_COLUMNS, shards_report};

const COLUMNS: [Column; 10] = [
    Column::Text("database"),
    Column::Int4("shard"),
    Column::Text("node"),
    Column::Text("role"),
    Column::Text("addr"),
    Column::Text("state"),
    Column::Numeric("lag_ms"),
    Column::Int4("clients"),
    Column::Int8("statements"),
    Column::Int8("fanouts"),
];

pub fn show(ctx: &Ctx<'_>) -> Outcome {
    debug_assert_eq!(COLUMNS.len(), SHARDS_COLUMNS.len());
    let mut rs = ResultSet::new(&COLUMNS);
    for row in shards_report(ctx.shared.shards.values()) {
        // An empty lag (a primary, or not measured yet) is NULL.
        rs.push(
            row.into_iter()
                .map(|cell| if cell.is_empty() { None } else { v(cell) })
                .collect(),
        );
    }
    Ok(Reply::Rows(rs))
}
