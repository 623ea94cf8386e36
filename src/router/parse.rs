//! The sqlparser fallback, asked only when the lexical scan cannot decide.
//!
//! The fast path sends a statement here when `INSERT`, `UPDATE`, `DELETE` or `MERGE` appears
//! where it might be a column or alias name (`SELECT update FROM t`). Locking clauses,
//! `INTO` and function calls are settled lexically before this point, because sqlparser does
//! not know all of PostgreSQL (it cannot parse `FOR NO KEY UPDATE SKIP LOCKED`, for one).
//! A statement sqlparser cannot parse is a write.

use std::ops::ControlFlow;

use sqlparser::ast::{Query, SetExpr, Statement, Visit, Visitor};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::Reason;

/// What sqlparser makes of one statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A query with nothing that writes.
    Read,
    Write(Reason),
    /// sqlparser failed, or found other than exactly one statement.
    Unparsable,
}

/// Parse one statement's text and look for anything that writes, at any depth.
pub(crate) fn parse_statement(sql: &str) -> Parsed {
    let statements = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(statements) => statements,
        Err(_) => return Parsed::Unparsable,
    };
    let [statement] = statements.as_slice() else {
        return Parsed::Unparsable;
    };
    match statement.visit(&mut FindWrite) {
        ControlFlow::Break(reason) => Parsed::Write(reason),
        ControlFlow::Continue(()) => Parsed::Read,
    }
}

/// Stops at the first thing that writes.
struct FindWrite;

impl Visitor for FindWrite {
    type Break = Reason;

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<Reason> {
        match statement {
            Statement::Query(_) => ControlFlow::Continue(()),
            Statement::Insert(_)
            | Statement::Update(_)
            | Statement::Delete(_)
            | Statement::Merge(_) => ControlFlow::Break(Reason::DataModifying),
            _ => ControlFlow::Break(Reason::Unknown),
        }
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<Reason> {
        if !query.locks.is_empty() {
            return ControlFlow::Break(Reason::LockingRead);
        }
        if let Some(with) = &query.with {
            if with.cte_tables.iter().any(|cte| modifies(&cte.query.body)) {
                return ControlFlow::Break(Reason::WritingCte);
            }
        }
        if modifies(&query.body) {
            return ControlFlow::Break(Reason::DataModifying);
        }
        if selects_into(&query.body) {
            return ControlFlow::Break(Reason::SelectInto);
        }
        ControlFlow::Continue(())
    }
}

/// A query body that is itself a data-modifying statement.
fn modifies(body: &SetExpr) -> bool {
    match body {
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => true,
        SetExpr::SetOperation { left, right, .. } => modifies(left) || modifies(right),
        _ => false,
    }
}

fn selects_into(body: &SetExpr) -> bool {
    match body {
        SetExpr::Select(select) => select.into.is_some(),
        SetExpr::SetOperation { left, right, .. } => selects_into(left) || selects_into(right),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyword_named_columns_are_reads() {
        assert_eq!(parse_statement("SELECT update FROM t"), Parsed::Read);
        assert_eq!(
            parse_statement("SELECT t.delete, insert FROM t"),
            Parsed::Read
        );
    }

    #[test]
    fn writes_at_any_depth() {
        assert_eq!(
            parse_statement(
                "WITH a AS (WITH b AS (DELETE FROM t RETURNING *) SELECT * FROM b) SELECT * FROM a"
            ),
            Parsed::Write(Reason::WritingCte)
        );
        assert_eq!(
            parse_statement(
                "SELECT * FROM t WHERE x IN (WITH d AS (UPDATE u SET a = 1 RETURNING a) SELECT a FROM d)"
            ),
            Parsed::Write(Reason::WritingCte)
        );
        assert_eq!(
            parse_statement("SELECT a INTO new_t FROM t"),
            Parsed::Write(Reason::SelectInto)
        );
        assert_eq!(
            parse_statement("INSERT INTO t VALUES (1)"),
            Parsed::Write(Reason::DataModifying)
        );
    }

    #[test]
    fn failures_are_unparsable() {
        assert_eq!(parse_statement("SELECT FROM WHERE ("), Parsed::Unparsable);
        assert_eq!(parse_statement("SELECT 1; SELECT 2"), Parsed::Unparsable);
        assert_eq!(parse_statement(""), Parsed::Unparsable);
    }
}
