//! The [`MergePlan`] of a key-less read: how the rows of every shard combine into the
//! answer the client would get from one database, or why they cannot.
//!
//! Only the top-level SELECT is planned here (the walk in [`super::scope`] has already
//! checked that its sharded tables are joined on the key and that no subquery aggregates
//! across shards). Each output column is a group key or a bare `count`/`sum`/`min`/`max`;
//! ORDER BY names output columns; LIMIT/OFFSET are applied after merging, with each shard
//! asked for `LIMIT limit + offset` rows (or, when the query aggregates, for all its groups).

use sqlparser::ast::{
    Distinct, DuplicateTreatment, Expr, Function, FunctionArguments, GroupByExpr, LimitClause,
    OrderByKind, OrderBySort, Query, SelectItem, SetExpr, Statement, Value, Visit,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::aggregates::{Aggregates, aggregate_name};
use super::scope::fold;
use super::values::placeholder;
use super::{MergeColumn, MergePlan, SortKey};
use crate::router::lexer::{self, Kw, Tok};

/// A LIMIT or OFFSET count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Count {
    Literal(u64),
    /// `$n`, 0-based.
    Param(usize),
}

/// The merge of one key-less read, before its parameters are known.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct FanOut {
    /// `limit` is `None` here when it is a parameter (`limit_param`).
    pub plan: MergePlan,
    pub limit_param: Option<usize>,
    pub per_shard_sql: Option<String>,
}

const PREFIX: &str = "pgsluice cannot merge";

fn refuse<T>(what: impl std::fmt::Display) -> Result<T, String> {
    Err(format!("{PREFIX} {what} across shards"))
}

/// One select-list item.
struct Item<'q> {
    expr: Option<&'q Expr>,
    /// The output column name PostgreSQL gives it (alias, or the column's own name).
    name: Option<String>,
    alias: Option<String>,
}

fn items(projection: &[SelectItem]) -> Vec<Item<'_>> {
    projection
        .iter()
        .map(|item| match item {
            SelectItem::UnnamedExpr(e) => Item {
                expr: Some(e),
                name: column_name(e),
                alias: None,
            },
            SelectItem::ExprWithAlias { expr, alias } => {
                let a = fold(alias).into_owned();
                Item {
                    expr: Some(expr),
                    name: Some(a.clone()),
                    alias: Some(a),
                }
            }
            _ => Item {
                expr: None,
                name: None,
                alias: None,
            },
        })
        .collect()
}

fn column_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(id) => Some(fold(id).into_owned()),
        Expr::CompoundIdentifier(parts) => parts.last().map(|id| fold(id).into_owned()),
        _ => None,
    }
}

fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Nested(inner) => strip(inner),
        other => other,
    }
}

fn positional(e: &Expr) -> Option<usize> {
    match strip(e) {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse::<usize>().ok().and_then(|n| n.checked_sub(1)),
            _ => None,
        },
        _ => None,
    }
}

/// How a select-list aggregate merges.
fn merge_column(f: &Function, name: &str) -> Result<MergeColumn, String> {
    let column = match name {
        "count" => MergeColumn::Count,
        "sum" => MergeColumn::Sum,
        "min" => MergeColumn::Min,
        "max" => MergeColumn::Max,
        "avg" => {
            return Err(format!(
                "{PREFIX} avg() across shards; select sum() and count() and divide"
            ));
        }
        other => return refuse(format_args!("{other}()")),
    };
    if f.over.is_some() {
        return refuse(format_args!("the window function {name}() OVER (…)"));
    }
    if !f.within_group.is_empty() || f.null_treatment.is_some() {
        return refuse(format_args!("{f}"));
    }
    match &f.args {
        FunctionArguments::List(list) => {
            if list.duplicate_treatment == Some(DuplicateTreatment::Distinct) {
                return refuse(format_args!("{name}(DISTINCT …)"));
            }
            if !list.clauses.is_empty() {
                return refuse(format_args!("{f}"));
            }
        }
        _ => return refuse(format_args!("{f}")),
    }
    Ok(column)
}

fn has_aggregate<V: Visit>(node: &V) -> Aggregates {
    let mut found = Aggregates::default();
    let _ = node.visit(&mut found);
    found
}

/// Plans the merge of `q`, the only statement of `sql`.
pub(super) fn fan_out(q: &Query, sql: &str) -> Result<FanOut, String> {
    let select = match q.body.as_ref() {
        SetExpr::Select(select) => select,
        SetExpr::SetOperation { .. } => return refuse("UNION/INTERSECT/EXCEPT results"),
        SetExpr::Values(_) => return refuse("VALUES"),
        _ => return refuse("a parenthesized query"),
    };
    if !q.locks.is_empty() {
        return Err(
            "pgsluice refuses SELECT … FOR UPDATE/SHARE without the shard key: it would lock \
             rows on every shard"
                .to_string(),
        );
    }
    match &select.distinct {
        None | Some(Distinct::All) => {}
        Some(Distinct::Distinct) => return refuse("SELECT DISTINCT"),
        Some(Distinct::On(_)) => return refuse("SELECT DISTINCT ON"),
    }
    if select.having.is_some() {
        return refuse("HAVING");
    }
    if !select.named_window.is_empty() {
        return refuse("window functions");
    }
    let list = items(&select.projection);
    let in_list = has_aggregate(&select.projection);
    let in_order = q.order_by.as_ref().map(has_aggregate).unwrap_or_default();
    if in_list.window || in_order.window {
        return refuse("window functions");
    }
    let group: &[Expr] = match &select.group_by {
        GroupByExpr::All(_) => return refuse("GROUP BY ALL"),
        GroupByExpr::Expressions(_, modifiers) if !modifiers.is_empty() => {
            return refuse("GROUP BY ROLLUP/CUBE/GROUPING SETS");
        }
        GroupByExpr::Expressions(exprs, _) => exprs,
    };
    if group
        .iter()
        .any(|g| matches!(g, Expr::Rollup(_) | Expr::Cube(_) | Expr::GroupingSets(_)))
    {
        return refuse("GROUP BY ROLLUP/CUBE/GROUPING SETS");
    }
    let aggregating = in_list.aggregate || in_order.aggregate || !group.is_empty();
    let columns = if aggregating {
        Some(aggregate_columns(&list, group)?)
    } else {
        None
    };
    let order_by = order_by(q, &list)?;
    let (limit, offset) = limits(q)?;
    let limit_param = match limit {
        Some(Count::Param(i)) => Some(i),
        _ => None,
    };
    let offset_value = match offset {
        None => None,
        Some(Count::Literal(m)) => Some(m),
        Some(Count::Param(_)) => return refuse("OFFSET $n (write the offset as a number)"),
    };
    let plan = MergePlan {
        order_by,
        limit: match limit {
            Some(Count::Literal(n)) => Some(n),
            _ => None,
        },
        offset: offset_value.filter(|&m| m > 0),
        columns,
    };
    let per_shard_sql = per_shard_limit(q, sql, aggregating, limit, offset_value)?;
    Ok(FanOut {
        plan,
        limit_param,
        per_shard_sql,
    })
}

fn aggregate_columns(list: &[Item<'_>], group: &[Expr]) -> Result<Vec<MergeColumn>, String> {
    if list.iter().any(|it| it.expr.is_none()) {
        return refuse("SELECT * with aggregates (list the columns)");
    }
    // Which select-list item each GROUP BY entry returns.
    let mut grouped = vec![false; list.len()];
    for g in group {
        let at = positional(g)
            .filter(|&i| i < list.len())
            .or_else(|| list.iter().position(|it| it.expr == Some(g)))
            .or_else(|| match strip(g) {
                Expr::Identifier(id) => {
                    let name = fold(id);
                    list.iter().position(|it| {
                        it.alias.as_deref() == Some(&*name)
                            || (it.alias.is_none() && it.name.as_deref() == Some(&*name))
                    })
                }
                _ => None,
            });
        match at {
            Some(i) => grouped[i] = true,
            None => {
                return Err(format!(
                    "{PREFIX} GROUP BY {g} across shards: it is not in the select list, and \
                     pgsluice merges groups by the values they return; add {g} to the select \
                     list"
                ));
            }
        }
    }
    let mut columns = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let Some(expr) = item.expr else {
            return refuse("SELECT * with aggregates (list the columns)");
        };
        if let Expr::Function(f) = strip(expr) {
            if let Some(name) = aggregate_name(f) {
                if grouped[i] {
                    return refuse(format_args!("GROUP BY on an aggregate ({expr})"));
                }
                columns.push(merge_column(f, &name)?);
                continue;
            }
        }
        if has_aggregate(expr).aggregate {
            return Err(format!(
                "{PREFIX} {expr} across shards: pgsluice merges a bare count/sum/min/max, not \
                 an aggregate inside an expression; select the aggregate itself"
            ));
        }
        if !grouped[i] {
            return Err(format!(
                "{PREFIX} {expr} across shards: it is neither an aggregate nor in GROUP BY"
            ));
        }
        columns.push(MergeColumn::GroupKey);
    }
    Ok(columns)
}

fn order_by(q: &Query, list: &[Item<'_>]) -> Result<Vec<SortKey>, String> {
    let Some(order) = &q.order_by else {
        return Ok(Vec::new());
    };
    let exprs = match &order.kind {
        OrderByKind::Expressions(exprs) => exprs,
        OrderByKind::All(_) => return refuse("ORDER BY ALL"),
    };
    let first_wildcard = list.iter().position(|it| it.expr.is_none());
    let mut keys = Vec::with_capacity(exprs.len());
    for o in exprs {
        let e = &o.expr;
        let found = if let Some(n) = positional(e) {
            // With a * the output is wider than the list; PostgreSQL checks the position.
            if n >= list.len() && first_wildcard.is_none() {
                return Err(format!(
                    "ORDER BY position {} is not in the select list",
                    n + 1
                ));
            }
            Some(n)
        } else {
            let by_name = match strip(e) {
                Expr::Identifier(id) => {
                    let name = fold(id);
                    let matching: Vec<usize> = (0..list.len())
                        .filter(|&i| list[i].name.as_deref() == Some(&*name))
                        .collect();
                    matching.first().copied()
                }
                _ => None,
            };
            let at = by_name.or_else(|| list.iter().position(|it| it.expr == Some(e)));
            if let (Some(at), Some(w)) = (at, first_wildcard) {
                if w < at {
                    return Err(format!(
                        "{PREFIX} ORDER BY {e} across shards: it is not listed before any * in \
                         the select list, so pgsluice cannot tell its position; list the \
                         columns or ORDER BY a position"
                    ));
                }
            }
            at
        };
        let Some(column) = found else {
            if first_wildcard.is_some() {
                return Err(format!(
                    "{PREFIX} ORDER BY {e} across shards: it is not listed before any * in the \
                     select list, so pgsluice cannot tell its position; list the columns or \
                     ORDER BY a position"
                ));
            }
            return Err(format!(
                "{PREFIX} ORDER BY {e} across shards: pgsluice merges sorted results by \
                 returned columns; add {e} to the select list"
            ));
        };
        let descending = match o.options.sort {
            None | Some(OrderBySort::Asc) => false,
            Some(OrderBySort::Desc) => true,
            Some(_) => return refuse("ORDER BY … USING"),
        };
        if o.with_fill.is_some() {
            return refuse("ORDER BY … WITH FILL");
        }
        keys.push(SortKey {
            column,
            descending,
            // PostgreSQL's default: NULLs sort as larger than any value.
            nulls_first: o.options.nulls_first.unwrap_or(descending),
        });
    }
    Ok(keys)
}

/// A LIMIT/OFFSET/FETCH count: a number, `$n`, or NULL (= none).
fn count(e: &Expr, what: &str) -> Result<Option<Count>, String> {
    match strip(e) {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n
                .parse::<u64>()
                .map(|n| Some(Count::Literal(n)))
                .map_err(|_| format!("{PREFIX} {what} {n} across shards")),
            Value::Null => Ok(None),
            Value::Placeholder(p) => match placeholder(p) {
                Some(i) => Ok(Some(Count::Param(i))),
                None => refuse(format_args!("{what} {p}")),
            },
            _ => refuse(format_args!("{what} {e}")),
        },
        other => refuse(format_args!("{what} {other} (write it as a number)")),
    }
}

fn limits(q: &Query) -> Result<(Option<Count>, Option<Count>), String> {
    let (mut limit, mut offset) = (None, None);
    match &q.limit_clause {
        None => {}
        Some(LimitClause::LimitOffset {
            limit: l,
            offset: o,
            limit_by,
        }) => {
            if !limit_by.is_empty() {
                return refuse("LIMIT BY");
            }
            if let Some(l) = l {
                limit = count(l, "LIMIT")?;
            }
            if let Some(o) = o {
                offset = count(&o.value, "OFFSET")?;
            }
        }
        Some(LimitClause::OffsetCommaLimit { .. }) => return refuse("LIMIT offset, count"),
    }
    if let Some(fetch) = &q.fetch {
        if fetch.with_ties {
            return refuse("FETCH … WITH TIES");
        }
        if fetch.percent {
            return refuse("FETCH … PERCENT");
        }
        limit = match &fetch.quantity {
            None => Some(Count::Literal(1)),
            Some(e) => count(e, "FETCH FIRST")?,
        };
    }
    Ok((limit, offset))
}

/// The text each shard runs when it differs from the client's: LIMIT n OFFSET m becomes
/// LIMIT n+m, OFFSET alone goes, and an aggregating query loses both (the limit applies to
/// merged groups).
fn per_shard_limit(
    q: &Query,
    sql: &str,
    aggregating: bool,
    limit: Option<Count>,
    offset: Option<u64>,
) -> Result<Option<String>, String> {
    let new_limit = if aggregating {
        if limit.is_none() && offset.is_none() {
            return Ok(None);
        }
        None
    } else {
        match (limit, offset) {
            (_, None) | (_, Some(0)) => return Ok(None),
            (Some(Count::Literal(n)), Some(m)) => Some(n.saturating_add(m)),
            (None, Some(_)) => None,
            (Some(Count::Param(_)), Some(_)) => {
                return refuse("LIMIT $n with OFFSET (write the limit as a number)");
            }
        }
    };
    let cannot = || format!("{PREFIX} this LIMIT/OFFSET across shards (could not rewrite it)");
    let start = limit_clause_start(sql).ok_or_else(cannot)?;
    let mut text = sql[..start].trim_end().to_string();
    if let Some(n) = new_limit {
        text.push_str(&format!(" LIMIT {n}"));
    }
    // The rewrite must be the same query with only its LIMIT/OFFSET changed.
    let same = match Parser::parse_sql(&PostgreSqlDialect {}, &text).as_deref() {
        Ok([Statement::Query(r)]) => {
            r.body == q.body
                && r.with == q.with
                && r.order_by == q.order_by
                && r.locks.is_empty()
                && r.fetch.is_none()
                && match &r.limit_clause {
                    None => new_limit.is_none(),
                    Some(LimitClause::LimitOffset {
                        limit: Some(l),
                        offset: None,
                        ..
                    }) => {
                        matches!(count(l, "LIMIT"), Ok(Some(Count::Literal(n))) if Some(n) == new_limit)
                    }
                    _ => false,
                }
        }
        _ => false,
    };
    if !same {
        return Err(cannot());
    }
    Ok(Some(text))
}

/// Byte offset of the first top-level `LIMIT`, `OFFSET` or `FETCH` keyword.
fn limit_clause_start(sql: &str) -> Option<usize> {
    let mut tokens = Vec::new();
    lexer::tokenize(sql, &mut tokens).ok()?;
    let mut depth = 0usize;
    for (i, t) in tokens.iter().enumerate() {
        match t.tok {
            Tok::LParen => depth += 1,
            Tok::RParen => depth = depth.saturating_sub(1),
            Tok::Semicolon if depth == 0 => return None,
            Tok::Word(Kw::None | Kw::Fetch) if depth == 0 => {
                let word = t.text(sql);
                let after_dot_or_as =
                    i > 0 && matches!(tokens[i - 1].tok, Tok::Dot | Tok::Word(Kw::As));
                if !after_dot_or_as
                    && ["limit", "offset", "fetch"]
                        .iter()
                        .any(|k| word.eq_ignore_ascii_case(k))
                {
                    return Some(t.start);
                }
            }
            _ => {}
        }
    }
    None
}
