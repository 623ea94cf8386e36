//! `SHOW PREPARED` (pgsluice's own): the named prepared statements shared
//! across clients in transaction and statement mode.

use std::sync::Arc;

use super::result::{Column, ResultSet, v};
use super::{Ctx, Outcome, Reply};

const COLUMNS: [Column; 4] = [
    Column::Text("name"),
    Column::Int4("refs"),
    Column::Int4("params"),
    Column::Text("query"),
];

/// One row per live statement: its server-side name, how many clients and
/// server connections hold it, its declared parameter count and its text.
/// (The cache's counters are on `/metrics`: `pgsluice_prepared_*`.)
pub fn show(ctx: &Ctx<'_>) -> Outcome {
    let mut rs = ResultSet::new(&COLUMNS);
    for s in ctx.shared.statements.live() {
        // Minus the reference held by this listing.
        let refs = Arc::strong_count(&s) - 1;
        rs.push(vec![
            v(&s.server_name),
            v(refs),
            v(s.declared_params()),
            v(String::from_utf8_lossy(s.text())),
        ]);
    }
    Ok(Reply::Rows(rs))
}
