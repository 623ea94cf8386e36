//! Aggregate and window calls: which select lists aggregate, and which aggregates a
//! fan-out read can merge.

use std::ops::ControlFlow;

use sqlparser::ast::{Expr, Function, FunctionArguments, Query, Visitor};

use super::scope::name_parts;

/// Aggregate and window function names PostgreSQL ships (an aggregate the walk does not
/// know — a user-defined one — is not recognised; see docs/sharding.md).
#[rustfmt::skip]
pub(super) const AGGREGATES: &[&str] = &[
    "count", "sum", "min", "max", "avg", "array_agg", "string_agg", "json_agg", "jsonb_agg",
    "json_object_agg", "jsonb_object_agg", "json_object_agg_strict", "json_object_agg_unique",
    "json_object_agg_unique_strict", "jsonb_object_agg_strict", "jsonb_object_agg_unique",
    "jsonb_object_agg_unique_strict", "json_arrayagg", "json_objectagg", "xmlagg", "bit_and",
    "bit_or", "bit_xor", "bool_and", "bool_or", "every", "any_value", "range_agg",
    "range_intersect_agg", "corr", "covar_pop", "covar_samp", "regr_avgx", "regr_avgy",
    "regr_count", "regr_intercept", "regr_r2", "regr_slope", "regr_sxx", "regr_sxy", "regr_syy",
    "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop", "var_samp", "mode",
    "percentile_cont", "percentile_disc", "rank", "dense_rank", "percent_rank", "cume_dist",
    "grouping",
];

/// The function's name if it is one of [`AGGREGATES`] (unqualified or in pg_catalog).
pub(super) fn aggregate_name(f: &Function) -> Option<String> {
    let parts = name_parts(&f.name)?;
    let (name, schema) = parts.split_last()?;
    if !(schema.is_empty() || schema == ["pg_catalog"]) {
        return None;
    }
    AGGREGATES.contains(&name.as_str()).then(|| name.clone())
}

/// Finds aggregate and window calls outside nested subqueries.
#[derive(Default)]
pub(super) struct Aggregates {
    pub aggregate: bool,
    pub window: bool,
    depth: usize,
}

impl Visitor for Aggregates {
    type Break = ();

    fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
        self.depth = self.depth.saturating_sub(1);
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if self.depth == 0 {
            if let Expr::Function(f) = e {
                if f.over.is_some() {
                    self.window = true;
                } else if aggregate_name(f).is_some()
                    || f.filter.is_some()
                    || !f.within_group.is_empty()
                    || matches!(&f.args, FunctionArguments::List(l) if !l.clauses.is_empty())
                {
                    self.aggregate = true;
                }
            }
        }
        ControlFlow::Continue(())
    }
}
