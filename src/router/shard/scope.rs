//! The walk over one parsed statement: every table reference, in which query block it
//! stands, and what the key equalities in the statement say about it.
//!
//! A **block** is one `SELECT`/`UPDATE`/`DELETE`/`INSERT` level with its own FROM list (a
//! CTE body, a subquery in FROM or in an expression, a branch of a UNION). A sharded table
//! is **pinned** by a top-level AND-conjunct of its block's WHERE (or of an inner join's
//! ON) of the form `key = value` or `key IN (values)`, or by a key equality with a pinned
//! table (`a.user_id = b.user_id`). Outer joins pin only their nullable side; equalities
//! under OR or NOT pin nothing. A constraint that the walk cannot read simply pins
//! nothing: the statement then fans out (a read) or is refused (a write), never misplaced.
//!
//! **Links** (key equalities between two sharded tables anywhere in a conjunct, also in an
//! outer join's ON) tell whether a fan-out read is the union of the per-shard reads: it is
//! when every sharded table is linked to every other (each row combination then lives on
//! one shard) and no block that aggregates or limits rows spans shards on its own.

use std::borrow::Cow;
use std::ops::ControlFlow;

use sqlparser::ast::{
    AssignmentTarget, BinaryOperator, Delete, Expr, FromTable, GroupByExpr, Ident, InTarget,
    Insert, Join, JoinConstraint, JoinOperator, ObjectName, ObjectNamePart, OnConflictAction,
    OnInsert, Query, Select, SetExpr, TableFactor, TableObject, TableWithJoins, Update,
    UpdateTableFromKind, Visit, Visitor,
};

use super::ShardingRules;
use super::aggregates::Aggregates;
use super::key::KeyError;
use super::params::{KeyExpr, Scalar};
use super::values::{Raw, raw_value};

/// An identifier as PostgreSQL resolves it: unquoted names fold to lower case.
pub(super) fn fold(id: &Ident) -> Cow<'_, str> {
    if id.quote_style.is_some() || !id.value.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Borrowed(&id.value)
    } else {
        Cow::Owned(id.value.to_ascii_lowercase())
    }
}

fn part_ident(part: &ObjectNamePart) -> Option<&Ident> {
    match part {
        ObjectNamePart::Identifier(id) => Some(id),
        _ => None,
    }
}

/// The folded parts of a name; `None` if a part is not a plain identifier.
pub(super) fn name_parts(name: &ObjectName) -> Option<Vec<String>> {
    name.0
        .iter()
        .map(|p| part_ident(p).map(|id| fold(id).into_owned()))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BlockKind {
    /// The statement's own query (or the DML statement).
    Top,
    /// A `WITH` query.
    Cte,
    /// A subquery in FROM.
    Derived,
    /// A `LATERAL` subquery in FROM: evaluated per row of the tables before it.
    Lateral,
    /// A subquery in an expression (`IN (SELECT …)`, `EXISTS`, a scalar subquery).
    Expr,
    /// A branch of UNION / INTERSECT / EXCEPT, or a parenthesized query.
    Branch,
    /// An INSERT / UPDATE / DELETE (top level or inside WITH).
    Dml,
}

#[derive(Debug)]
pub(super) struct Block {
    pub parent: Option<usize>,
    pub kind: BlockKind,
    /// CTE names visible from this block and its children.
    ctes: Vec<String>,
    /// Range names in this block that are not base tables (derived tables, CTE references,
    /// functions): a qualified column naming one of them stops the search outwards.
    opaque: Vec<String>,
    /// Why this block's rows are not a per-row function of its tables' rows (it
    /// aggregates, limits, deduplicates …); `None` when they are.
    pub not_row_local: Option<&'static str>,
}

#[derive(Debug)]
pub(super) struct Table {
    /// As written (for messages).
    pub name: String,
    pub sharded: bool,
    pub block: usize,
    alias: Option<String>,
    /// Folded name parts (`["public", "orders"]`).
    parts: Vec<String>,
}

/// A table being written.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Write {
    /// UPDATE or DELETE of sharded table `table` (an index into `tables`).
    Modify { verb: &'static str, table: usize },
    /// INSERT into sharded table `table`: the key of each row.
    Insert { table: usize, rows: Vec<KeyExpr> },
    /// Any write to an unsharded table.
    Unsharded { verb: &'static str, name: String },
}

/// A column reference to the key.
#[derive(Debug, Clone, Copy)]
enum KeyCol {
    Table(usize),
    /// Unqualified in a block with several sharded tables: resolved at the end if they
    /// are all joined on the key.
    Unqualified(usize),
}

/// Which tables a conjunct may pin.
///
/// A conjunct pins only tables of its own block: `u.user_id = 42` inside `NOT EXISTS (…)`
/// says nothing about the outer `u`'s rows.
#[derive(Debug, Clone)]
struct Pinnable(Vec<usize>);

impl Pinnable {
    fn allows(&self, t: usize) -> bool {
        self.0.contains(&t)
    }
}

/// Results of the walk.
#[derive(Debug, Default)]
pub(super) struct Walk {
    pub tables: Vec<Table>,
    pub blocks: Vec<Block>,
    /// Each pin: the key is one of these values.
    pub pins: Vec<Vec<KeyExpr>>,
    /// `(table, pin)`: a conjunct of the table's block pins its key.
    direct: Vec<(usize, usize)>,
    /// `(block, pin, pinnable)`: an unqualified key in a block of several sharded tables.
    unqualified: Vec<(usize, usize, Pinnable)>,
    /// `(from, to)`: `to` is pinned wherever `from` is.
    edges: Vec<(usize, usize)>,
    /// Key equalities between two sharded tables (undirected).
    links: Vec<(usize, usize)>,
    pub writes: Vec<Write>,
    /// A refusal that holds whatever the parameters (`UPDATE … SET user_id`, …).
    pub refusal: Option<(&'static str, String)>,
    /// Base-table and CTE references seen: compared with sqlparser's own count so that a
    /// table in a position this walk does not know cannot go unnoticed.
    pub relations: usize,
    /// A locking clause (`FOR UPDATE` …) anywhere.
    pub locks: bool,
}

pub(super) struct Walker<'r> {
    pub rules: &'r ShardingRules,
    pub w: Walk,
}

impl<'r> Walker<'r> {
    pub fn new(rules: &'r ShardingRules) -> Self {
        Walker {
            rules,
            w: Walk::default(),
        }
    }

    fn refuse(&mut self, message: String) {
        if self.w.refusal.is_none() {
            self.w.refusal = Some((super::codes::FEATURE_NOT_SUPPORTED, message));
        }
    }

    fn key(&self) -> &str {
        &self.rules.key_column
    }

    /// The tables of block `b` registered so far.
    fn block_tables(&self, b: usize) -> Pinnable {
        Pinnable(
            (0..self.w.tables.len())
                .filter(|&t| self.w.tables[t].block == b)
                .collect(),
        )
    }

    fn new_block(&mut self, parent: Option<usize>, kind: BlockKind) -> usize {
        self.w.blocks.push(Block {
            parent,
            kind,
            ctes: Vec::new(),
            opaque: Vec::new(),
            not_row_local: None,
        });
        self.w.blocks.len() - 1
    }

    fn mark(&mut self, b: usize, why: &'static str) {
        let block = &mut self.w.blocks[b];
        if block.not_row_local.is_none() {
            block.not_row_local = Some(why);
        }
    }

    fn is_cte(&self, b: usize, name: &str) -> bool {
        let mut at = Some(b);
        while let Some(i) = at {
            if self.w.blocks[i].ctes.iter().any(|c| c == name) {
                return true;
            }
            at = self.w.blocks[i].parent;
        }
        false
    }

    /// Whether a table name is listed in `unsharded_tables` or is a system catalog.
    fn is_unsharded(&self, parts: &[String]) -> bool {
        let Some(bare) = parts.last() else {
            return false;
        };
        let schema = parts.len().checked_sub(2).map(|i| parts[i].as_str());
        if matches!(schema, Some("pg_catalog" | "information_schema"))
            || (schema.is_none() && bare.starts_with("pg_"))
        {
            return true;
        }
        self.rules
            .unsharded_tables
            .iter()
            .any(|entry| match entry.rsplit_once('.') {
                Some((s, t)) => schema == Some(s) && t == bare,
                None => entry == bare,
            })
    }

    fn add_table(&mut self, b: usize, name: &ObjectName, alias: Option<&Ident>) -> Option<usize> {
        let Some(parts) = name_parts(name) else {
            self.refuse(format!("pgsluice cannot place a statement on table {name}"));
            return None;
        };
        let sharded = !self.is_unsharded(&parts);
        self.w.tables.push(Table {
            name: name.to_string(),
            sharded,
            block: b,
            alias: alias.map(|a| fold(a).into_owned()),
            parts,
        });
        Some(self.w.tables.len() - 1)
    }

    // ---------------------------------------------------------------- queries

    /// A query (with its WITH list) as a new block under `parent`. Returns the block.
    pub fn query(&mut self, q: &Query, parent: Option<usize>, kind: BlockKind) -> usize {
        let b = self.new_block(parent, kind);
        if let Some(with) = &q.with {
            if with.recursive {
                self.mark(b, "WITH RECURSIVE");
                for cte in &with.cte_tables {
                    let name = fold(&cte.alias.name).into_owned();
                    self.w.blocks[b].ctes.push(name);
                }
            }
            for cte in &with.cte_tables {
                let cb = self.query(&cte.query, Some(b), BlockKind::Cte);
                if let Some(why) = self.w.blocks[cb].not_row_local {
                    self.mark(b, why);
                }
                if !with.recursive {
                    let name = fold(&cte.alias.name).into_owned();
                    self.w.blocks[b].ctes.push(name);
                }
            }
        }
        self.set_expr(&q.body, b);
        if let Some(order_by) = &q.order_by {
            self.scan(order_by, b);
        }
        if q.limit_clause.is_some() || q.fetch.is_some() {
            self.mark(b, "LIMIT/OFFSET");
            if let Some(limit) = &q.limit_clause {
                self.scan(limit, b);
            }
        }
        if !q.locks.is_empty() {
            self.w.locks = true;
        }
        b
    }

    fn set_expr(&mut self, body: &SetExpr, b: usize) {
        match body {
            SetExpr::Select(select) => self.select(select, b),
            SetExpr::Query(q) => {
                self.mark(b, "a parenthesized query");
                self.query(q, Some(b), BlockKind::Branch);
            }
            SetExpr::SetOperation { left, right, .. } => {
                self.mark(b, "UNION/INTERSECT/EXCEPT");
                for side in [left, right] {
                    let branch = self.new_block(Some(b), BlockKind::Branch);
                    self.set_expr(side, branch);
                }
            }
            SetExpr::Values(values) => self.scan(values, b),
            SetExpr::Insert(stmt) | SetExpr::Update(stmt) | SetExpr::Delete(stmt) => {
                self.mark(b, "a data-modifying statement");
                self.dml(stmt, Some(b));
            }
            SetExpr::Table(t) => {
                // `TABLE name`: sqlparser does not count it as a relation, nor does the walk.
                let Some(table) = &t.table_name else {
                    self.refuse("pgsluice cannot place this TABLE command".to_string());
                    return;
                };
                let mut parts = Vec::new();
                if let Some(schema) = &t.schema_name {
                    parts.push(schema.clone());
                }
                parts.push(table.clone());
                let name = ObjectName::from(parts);
                if t.schema_name.is_none() && self.is_cte(b, &fold(table)) {
                    return;
                }
                self.add_table(b, &name, None);
            }
            SetExpr::Merge(_) => {
                self.refuse("pgsluice does not run MERGE in a sharded database".to_string());
            }
        }
    }

    fn select(&mut self, s: &Select, b: usize) {
        if s.into.is_some() {
            self.refuse(
                "SELECT INTO creates a table: pgsluice does not run it in a sharded database"
                    .to_string(),
            );
        }
        let mut from_tables = Vec::new();
        for twj in &s.from {
            let ts = self.table_with_joins(twj, b);
            from_tables.extend(ts);
        }
        if let Some(selection) = &s.selection {
            self.conjuncts(selection, b, &self.block_tables(b));
            self.scan(selection, b);
        }
        for item in &s.projection {
            self.scan(item, b);
        }
        let mut aggregates = Aggregates::default();
        for item in &s.projection {
            let _ = item.visit(&mut aggregates);
        }
        if let Some(having) = &s.having {
            self.scan(having, b);
            let _ = having.visit(&mut aggregates);
            self.mark(b, "HAVING");
        }
        match &s.group_by {
            GroupByExpr::All(_) => self.mark(b, "GROUP BY"),
            GroupByExpr::Expressions(exprs, _) if !exprs.is_empty() => {
                for e in exprs {
                    self.scan(e, b);
                }
                self.mark(b, "GROUP BY");
            }
            GroupByExpr::Expressions(..) => {}
        }
        if aggregates.window {
            self.mark(b, "a window function");
        }
        if aggregates.aggregate {
            self.mark(b, "an aggregate");
        }
        if s.distinct.is_some() {
            self.mark(b, "DISTINCT");
        }
        for w in &s.named_window {
            self.scan(w, b);
        }
    }

    /// The base tables of one FROM item with its joins.
    fn table_with_joins(&mut self, twj: &TableWithJoins, b: usize) -> Vec<usize> {
        let mut left = self.table_factor(&twj.relation, b);
        for join in &twj.joins {
            let right = self.table_factor(&join.relation, b);
            self.join(join, &left, &right, b);
            left.extend(right);
        }
        left
    }

    fn join(&mut self, join: &Join, left: &[usize], right: &[usize], b: usize) {
        let (constraint, pinnable) = match &join.join_operator {
            JoinOperator::Join(c) | JoinOperator::Inner(c) => (c, self.block_tables(b)),
            JoinOperator::Left(c) | JoinOperator::LeftOuter(c) => (c, Pinnable(right.to_vec())),
            JoinOperator::Right(c) | JoinOperator::RightOuter(c) => (c, Pinnable(left.to_vec())),
            JoinOperator::FullOuter(c) | JoinOperator::CrossJoin(c) => (c, Pinnable(Vec::new())),
            other => {
                self.refuse(format!(
                    "pgsluice cannot place a statement with this kind of join ({other:?})"
                ));
                return;
            }
        };
        match constraint {
            JoinConstraint::On(on) => {
                self.conjuncts(on, b, &pinnable);
                self.scan(on, b);
            }
            JoinConstraint::Using(cols) => {
                let key = self.key().to_string();
                let on_key = cols
                    .iter()
                    .any(|c| name_parts(c).is_some_and(|p| p.len() == 1 && p[0] == key));
                let sharded = |ts: &[usize]| -> Vec<usize> {
                    ts.iter()
                        .copied()
                        .filter(|&t| self.w.tables[t].sharded)
                        .collect()
                };
                if let (true, [l], [r]) = (on_key, &sharded(left)[..], &sharded(right)[..]) {
                    self.link(*l, *r, &pinnable);
                }
            }
            _ => {}
        }
    }

    /// Base tables directly in this FROM item (not inside subqueries).
    fn table_factor(&mut self, tf: &TableFactor, b: usize) -> Vec<usize> {
        match tf {
            TableFactor::Table {
                name, alias, args, ..
            } => {
                self.w.relations += 1;
                if let Some(args) = args {
                    // A set-returning function in FROM: not a table.
                    self.scan(args, b);
                    if let Some(alias) = alias {
                        let a = fold(&alias.name).into_owned();
                        self.w.blocks[b].opaque.push(a);
                    }
                    return Vec::new();
                }
                let parts = name_parts(name).unwrap_or_default();
                if let [single] = parts.as_slice() {
                    if self.is_cte(b, single) {
                        let range = alias
                            .as_ref()
                            .map_or(single.clone(), |a| fold(&a.name).into_owned());
                        self.w.blocks[b].opaque.push(range);
                        return Vec::new();
                    }
                }
                self.add_table(b, name, alias.as_ref().map(|a| &a.name))
                    .into_iter()
                    .collect()
            }
            TableFactor::Derived {
                lateral,
                subquery,
                alias,
                ..
            } => {
                let kind = if *lateral {
                    BlockKind::Lateral
                } else {
                    BlockKind::Derived
                };
                self.query(subquery, Some(b), kind);
                if let Some(alias) = alias {
                    let a = fold(&alias.name).into_owned();
                    self.w.blocks[b].opaque.push(a);
                }
                Vec::new()
            }
            TableFactor::NestedJoin {
                table_with_joins,
                alias,
            } => {
                if alias.is_some() {
                    // `(a JOIN b) AS j`: columns are reached as j.col, which this walk does
                    // not follow; the tables stay unpinned by such references.
                    if let Some(alias) = alias {
                        let a = fold(&alias.name).into_owned();
                        self.w.blocks[b].opaque.push(a);
                    }
                }
                self.table_with_joins(table_with_joins, b)
            }
            TableFactor::TableFunction { expr, alias } => {
                self.scan(expr, b);
                if let Some(alias) = alias {
                    let a = fold(&alias.name).into_owned();
                    self.w.blocks[b].opaque.push(a);
                }
                Vec::new()
            }
            TableFactor::Function { args, alias, .. } => {
                for a in args {
                    self.scan(a, b);
                }
                if let Some(alias) = alias {
                    let a = fold(&alias.name).into_owned();
                    self.w.blocks[b].opaque.push(a);
                }
                Vec::new()
            }
            TableFactor::UNNEST {
                array_exprs, alias, ..
            } => {
                for e in array_exprs {
                    self.scan(e, b);
                }
                if let Some(alias) = alias {
                    let a = fold(&alias.name).into_owned();
                    self.w.blocks[b].opaque.push(a);
                }
                Vec::new()
            }
            other => {
                self.refuse(format!(
                    "pgsluice cannot place a statement with this FROM item: {other}"
                ));
                Vec::new()
            }
        }
    }

    // ---------------------------------------------------------------- DML

    /// An INSERT/UPDATE/DELETE, at the top (`parent` None) or inside WITH.
    pub fn dml(&mut self, stmt: &sqlparser::ast::Statement, parent: Option<usize>) {
        use sqlparser::ast::Statement;
        match stmt {
            Statement::Insert(insert) => self.insert(insert, parent),
            Statement::Update(update) => self.update(update, parent),
            Statement::Delete(delete) => self.delete(delete, parent),
            _ => self.refuse("pgsluice cannot place this data-modifying statement".to_string()),
        }
    }

    fn insert(&mut self, ins: &Insert, parent: Option<usize>) {
        let b = self.new_block(parent, BlockKind::Dml);
        let TableObject::TableName(name) = &ins.table else {
            self.refuse("pgsluice cannot place an INSERT into a table function".to_string());
            return;
        };
        self.w.relations += 1;
        let alias = ins.table_alias.as_ref().map(|a| &a.alias);
        let Some(t) = self.add_table(b, name, alias) else {
            return;
        };
        if let Some(returning) = &ins.returning {
            for item in returning {
                self.scan(item, b);
            }
        }
        if !self.w.tables[t].sharded {
            if let Some(source) = &ins.source {
                self.query(source, Some(b), BlockKind::Expr);
            }
            self.on_insert(ins, b, false);
            self.w.writes.push(Write::Unsharded {
                verb: "INSERT",
                name: self.w.tables[t].name.clone(),
            });
            return;
        }
        let table = self.w.tables[t].name.clone();
        let key = self.key().to_string();
        if ins.columns.is_empty() {
            self.refuse(format!(
                "INSERT into sharded table {table} without a column list cannot be placed: \
                 name the columns, including {key}"
            ));
            return;
        }
        let Some(at) = ins
            .columns
            .iter()
            .position(|c| name_parts(c).is_some_and(|p| p.last().is_some_and(|l| *l == key)))
        else {
            self.refuse(format!(
                "INSERT into sharded table {table} without {key} in its column list cannot be \
                 placed: pgsluice needs each row's {key}"
            ));
            return;
        };
        self.on_insert(ins, b, true);
        let values = match ins.source.as_deref() {
            Some(Query {
                with: None,
                body,
                order_by: None,
                limit_clause: None,
                fetch: None,
                ..
            }) => match body.as_ref() {
                SetExpr::Values(values) => values,
                _ => {
                    self.refuse(format!(
                        "INSERT … SELECT into sharded table {table} cannot be placed: \
                         pgsluice places rows by their {key} in a VALUES list"
                    ));
                    return;
                }
            },
            _ => {
                self.refuse(format!(
                    "INSERT into sharded table {table} cannot be placed: pgsluice places rows \
                     by their {key} in a VALUES list"
                ));
                return;
            }
        };
        let mut rows = Vec::with_capacity(values.rows.len());
        for (i, row) in values.rows.iter().enumerate() {
            for e in row.content.iter() {
                self.scan(e, b);
            }
            let Some(e) = row.content.get(at) else {
                self.refuse(format!(
                    "row {} of the INSERT into {table} has no value for {key}",
                    i + 1
                ));
                return;
            };
            match self.key_value(e, true) {
                Some(k) => rows.push(k),
                None => {
                    self.refuse(format!(
                        "row {} of the INSERT into {table}: {key} = {e} is not a literal or a \
                         parameter, so pgsluice cannot tell its shard",
                        i + 1
                    ));
                    return;
                }
            }
        }
        self.w.writes.push(Write::Insert { table: t, rows });
    }

    fn on_insert(&mut self, ins: &Insert, b: usize, sharded: bool) {
        match &ins.on {
            None => {}
            Some(OnInsert::OnConflict(on)) => {
                if let OnConflictAction::DoUpdate(up) = &on.action {
                    for a in &up.assignments {
                        self.scan(&a.value, b);
                        if sharded && self.assigns_key(&a.target) {
                            self.refuse(format!(
                                "INSERT … ON CONFLICT DO UPDATE SET {} would move the row to \
                                 another shard: pgsluice refuses to change a row's shard key",
                                self.key()
                            ));
                        }
                    }
                    if let Some(sel) = &up.selection {
                        self.scan(sel, b);
                    }
                }
            }
            Some(_) => self.refuse("pgsluice cannot place this INSERT variant".to_string()),
        }
    }

    fn assigns_key(&self, target: &AssignmentTarget) -> bool {
        let is_key = |n: &ObjectName| {
            name_parts(n).is_some_and(|p| p.last().is_some_and(|l| l == self.key()))
        };
        match target {
            AssignmentTarget::ColumnName(n) => is_key(n),
            AssignmentTarget::Tuple(ns) => ns.iter().any(is_key),
        }
    }

    fn update(&mut self, up: &Update, parent: Option<usize>) {
        let b = self.new_block(parent, BlockKind::Dml);
        let targets = self.table_with_joins(&up.table, b);
        if let Some(from) = &up.from {
            let (UpdateTableFromKind::BeforeSet(twjs) | UpdateTableFromKind::AfterSet(twjs)) = from;
            for twj in twjs {
                self.table_with_joins(twj, b);
            }
        }
        if let Some(selection) = &up.selection {
            self.conjuncts(selection, b, &self.block_tables(b));
            self.scan(selection, b);
        }
        for a in &up.assignments {
            self.scan(&a.value, b);
        }
        if let Some(returning) = &up.returning {
            for item in returning {
                self.scan(item, b);
            }
        }
        if !up.order_by.is_empty() || up.limit.is_some() {
            self.refuse("pgsluice cannot place UPDATE … ORDER BY/LIMIT".to_string());
        }
        let [t] = targets.as_slice() else {
            self.refuse("pgsluice cannot place this UPDATE target".to_string());
            return;
        };
        let t = *t;
        if !self.w.tables[t].sharded {
            self.w.writes.push(Write::Unsharded {
                verb: "UPDATE",
                name: self.w.tables[t].name.clone(),
            });
            return;
        }
        if up.assignments.iter().any(|a| self.assigns_key(&a.target)) {
            self.refuse(format!(
                "UPDATE of {} that sets {} would move rows to another shard: pgsluice refuses \
                 to change a row's shard key (delete the row and insert it again)",
                self.w.tables[t].name,
                self.key()
            ));
        }
        self.w.writes.push(Write::Modify {
            verb: "UPDATE",
            table: t,
        });
    }

    fn delete(&mut self, del: &Delete, parent: Option<usize>) {
        let b = self.new_block(parent, BlockKind::Dml);
        if !del.tables.is_empty() || !del.order_by.is_empty() || del.limit.is_some() {
            self.refuse("pgsluice cannot place this DELETE variant".to_string());
            return;
        }
        let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &del.from;
        let mut targets = Vec::new();
        for twj in from {
            targets.extend(self.table_with_joins(twj, b));
        }
        if let Some(using) = &del.using {
            for twj in using {
                self.table_with_joins(twj, b);
            }
        }
        if let Some(selection) = &del.selection {
            self.conjuncts(selection, b, &self.block_tables(b));
            self.scan(selection, b);
        }
        if let Some(returning) = &del.returning {
            for item in returning {
                self.scan(item, b);
            }
        }
        let [t] = targets.as_slice() else {
            self.refuse("pgsluice cannot place this DELETE target".to_string());
            return;
        };
        let t = *t;
        self.w.writes.push(if self.w.tables[t].sharded {
            Write::Modify {
                verb: "DELETE",
                table: t,
            }
        } else {
            Write::Unsharded {
                verb: "DELETE",
                name: self.w.tables[t].name.clone(),
            }
        });
    }

    // ---------------------------------------------------------------- predicates

    /// Reads the top-level AND-conjuncts of `e` for pins and links.
    fn conjuncts(&mut self, e: &Expr, b: usize, pinnable: &Pinnable) {
        match e {
            Expr::Nested(inner) => self.conjuncts(inner, b, pinnable),
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And,
                right,
            } => {
                self.conjuncts(left, b, pinnable);
                self.conjuncts(right, b, pinnable);
            }
            Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } => self.equality(left, right, b, pinnable),
            Expr::In {
                expr,
                target: InTarget::List(list),
                negated: false,
                ..
            } => self.in_list(expr, list, b, pinnable),
            // `key = ANY (ARRAY[…])`
            Expr::AnyOp {
                left,
                compare_op: BinaryOperator::Eq,
                right,
                ..
            } => {
                if let Expr::Array(array) = strip_nested(right) {
                    self.in_list(left, &array.elem, b, pinnable);
                }
            }
            _ => {}
        }
    }

    /// `key IN (v1, v2, …)`: pinned to the values' shards when every value is readable.
    fn in_list(&mut self, key: &Expr, list: &[Expr], b: usize, pinnable: &Pinnable) {
        let Some(col) = self.key_col(key, b) else {
            return;
        };
        let values: Option<Vec<KeyExpr>> = list.iter().map(|v| self.key_value(v, false)).collect();
        if let Some(values) = values {
            if !values.is_empty() {
                self.pin(col, values, pinnable);
            }
        }
    }

    fn equality(&mut self, l: &Expr, r: &Expr, b: usize, pinnable: &Pinnable) {
        match (self.key_col(l, b), self.key_col(r, b)) {
            (Some(col), None) => {
                if let Some(v) = self.key_value(r, false) {
                    self.pin(col, vec![v], pinnable);
                }
            }
            (None, Some(col)) => {
                if let Some(v) = self.key_value(l, false) {
                    self.pin(col, vec![v], pinnable);
                }
            }
            (Some(KeyCol::Table(t)), Some(KeyCol::Table(u))) if t != u => self.link(t, u, pinnable),
            _ => {}
        }
    }

    fn pin(&mut self, col: KeyCol, values: Vec<KeyExpr>, pinnable: &Pinnable) {
        self.w.pins.push(values);
        let id = self.w.pins.len() - 1;
        match col {
            KeyCol::Table(t) => {
                if pinnable.allows(t) {
                    self.w.direct.push((t, id));
                }
            }
            KeyCol::Unqualified(b) => self.w.unqualified.push((b, id, pinnable.clone())),
        }
    }

    fn link(&mut self, t: usize, u: usize, pinnable: &Pinnable) {
        if !(self.w.tables[t].sharded && self.w.tables[u].sharded) {
            return;
        }
        self.w.links.push((t, u));
        if pinnable.allows(u) {
            self.w.edges.push((t, u));
        }
        if pinnable.allows(t) {
            self.w.edges.push((u, t));
        }
    }

    /// `user_id`, `t.user_id`, `s.t.user_id` naming the key column of a sharded table.
    fn key_col(&self, e: &Expr, b: usize) -> Option<KeyCol> {
        match e {
            Expr::Nested(inner) => self.key_col(inner, b),
            Expr::Identifier(id) => {
                if fold(id) != self.key() {
                    return None;
                }
                let sharded: Vec<usize> = self
                    .w
                    .tables
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.block == b && t.sharded)
                    .map(|(i, _)| i)
                    .collect();
                match sharded.as_slice() {
                    [] => None,
                    [t] => Some(KeyCol::Table(*t)),
                    _ => Some(KeyCol::Unqualified(b)),
                }
            }
            Expr::CompoundIdentifier(parts) => {
                let (col, qualifier) = parts.split_last()?;
                if fold(col) != self.key() || qualifier.is_empty() {
                    return None;
                }
                let q: Vec<Cow<'_, str>> = qualifier.iter().map(fold).collect();
                let t = self.resolve_qualifier(&q, b)?;
                self.w.tables[t].sharded.then_some(KeyCol::Table(t))
            }
            _ => None,
        }
    }

    /// The table a qualifier names, searching this block and then the enclosing ones.
    fn resolve_qualifier(&self, q: &[Cow<'_, str>], b: usize) -> Option<usize> {
        let mut at = Some(b);
        while let Some(block) = at {
            let mut found = None;
            for (i, t) in self.w.tables.iter().enumerate() {
                if t.block != block {
                    continue;
                }
                let matches = match (&t.alias, q) {
                    (Some(alias), [one]) => alias == one,
                    (Some(_), _) => false,
                    (None, [one]) => t.parts.last().is_some_and(|l| l == one),
                    (None, q) => {
                        t.parts.len() >= q.len()
                            && t.parts[t.parts.len() - q.len()..]
                                .iter()
                                .zip(q)
                                .all(|(a, b)| a == b)
                    }
                };
                if matches {
                    if found.is_some() {
                        return None;
                    }
                    found = Some(i);
                }
            }
            if found.is_some() {
                return found;
            }
            if let [one] = q {
                if self.w.blocks[block].opaque.iter().any(|o| o == one) {
                    return None;
                }
            }
            at = self.w.blocks[block].parent;
        }
        None
    }

    /// A key value written in the statement. `insert`: an integer outside an `integer`
    /// key's range is an error (PostgreSQL refuses to store it) rather than a value that
    /// matches nothing.
    fn key_value(&self, e: &Expr, insert: bool) -> Option<KeyExpr> {
        let raw = raw_value(e)?;
        let rules = self.rules;
        Some(match raw {
            Raw::Null => KeyExpr::Null,
            Raw::Param(index, cast) => KeyExpr::Param { index, cast },
            Raw::Untyped(s) => match rules.key_type.parse_text_coded(&s) {
                Ok(value) => KeyExpr::Shard {
                    shard: super::shard_of(rules.key_type, &value, rules.shards),
                    value,
                },
                Err(e) => KeyExpr::Invalid(e),
            },
            Raw::Typed(Ok(value), ty) => {
                let out_of_range = matches!(value, Scalar::Int(i) if i32::try_from(i).is_err());
                match KeyExpr::literal(value, ty, rules) {
                    Some(k) => k,
                    None if insert && out_of_range => KeyExpr::Invalid(KeyError {
                        code: super::codes::NUMERIC_VALUE_OUT_OF_RANGE,
                        message: format!("integer out of range (shard key {e})"),
                    }),
                    None => return None,
                }
            }
            Raw::Typed(Err(e), _) => KeyExpr::Invalid(e),
        })
    }

    // ---------------------------------------------------------------- subqueries

    /// Walks subqueries anywhere inside `node` as child blocks of `b`.
    fn scan<V: Visit>(&mut self, node: &V, b: usize) {
        let mut scanner = Subqueries {
            walker: self,
            block: b,
            depth: 0,
        };
        let _ = node.visit(&mut scanner);
    }

    // ---------------------------------------------------------------- the end

    /// Which pins hold for each table, after following key equalities.
    pub fn table_pins(&self) -> Vec<Vec<usize>> {
        let w = &self.w;
        let mut pins: Vec<Vec<usize>> = vec![Vec::new(); w.tables.len()];
        for &(t, p) in &w.direct {
            pins[t].push(p);
        }
        for (b, p, pinnable) in &w.unqualified {
            let in_block: Vec<usize> = (0..w.tables.len())
                .filter(|&t| w.tables[t].block == *b && w.tables[t].sharded)
                .collect();
            if self.joined_both_ways(&in_block) {
                for &t in &in_block {
                    if pinnable.allows(t) {
                        pins[t].push(*p);
                    }
                }
            }
        }
        // Propagate along edges until nothing changes (at most once per table and pin).
        let mut changed = true;
        while changed {
            changed = false;
            for &(from, to) in &w.edges {
                for i in 0..pins[from].len() {
                    let p = pins[from][i];
                    if !pins[to].contains(&p) {
                        pins[to].push(p);
                        changed = true;
                    }
                }
            }
        }
        pins
    }

    /// Whether `tables` are connected by key equalities that pin in both directions.
    fn joined_both_ways(&self, tables: &[usize]) -> bool {
        let both =
            |a: usize, b: usize| self.w.edges.contains(&(a, b)) && self.w.edges.contains(&(b, a));
        connected(tables, both)
    }

    /// Why a read of this statement is not the union of its per-shard reads, if it is not.
    pub fn fan_out_problem(&self) -> Option<String> {
        let w = &self.w;
        let sharded: Vec<usize> = (0..w.tables.len())
            .filter(|&t| w.tables[t].sharded)
            .collect();
        if sharded.is_empty() {
            return None;
        }
        let key = self.key();
        if w.locks {
            return Some(
                "pgsluice refuses SELECT … FOR UPDATE/SHARE without the shard key: it would \
                 lock rows on every shard"
                    .to_string(),
            );
        }
        if !connected(&sharded, |a, b| {
            w.links.contains(&(a, b)) || w.links.contains(&(b, a))
        }) {
            let names: Vec<&str> = sharded.iter().map(|&t| w.tables[t].name.as_str()).collect();
            return Some(format!(
                "pgsluice cannot run this query on every shard and merge the results: the \
                 sharded tables ({}) are not all joined on {key} (add {key} = … to place it \
                 on one shard)",
                names.join(", ")
            ));
        }
        for (i, block) in w.blocks.iter().enumerate() {
            let inside: Vec<usize> = sharded
                .iter()
                .copied()
                .filter(|&t| self.within(w.tables[t].block, i))
                .collect();
            if inside.is_empty() {
                continue;
            }
            match block.kind {
                BlockKind::Expr | BlockKind::Lateral if inside.len() == sharded.len() => {
                    return Some(format!(
                        "pgsluice cannot run this query on every shard and merge the results: \
                         a subquery reads sharded tables without being joined on {key} to the \
                         outer query (add {key} = … to place it on one shard)"
                    ));
                }
                BlockKind::Derived | BlockKind::Cte | BlockKind::Branch => {
                    if let Some(why) = block.not_row_local {
                        return Some(format!(
                            "pgsluice cannot run this query on every shard and merge the \
                             results: a subquery or WITH query over sharded tables uses {why} \
                             (add {key} = … to place it on one shard)"
                        ));
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Whether block `b` is `ancestor` or inside it.
    fn within(&self, b: usize, ancestor: usize) -> bool {
        let mut at = Some(b);
        while let Some(i) = at {
            if i == ancestor {
                return true;
            }
            at = self.w.blocks[i].parent;
        }
        false
    }
}

fn strip_nested(e: &Expr) -> &Expr {
    match e {
        Expr::Nested(inner) => strip_nested(inner),
        other => other,
    }
}

/// Whether `nodes` form one connected component under `adjacent`.
fn connected(nodes: &[usize], adjacent: impl Fn(usize, usize) -> bool) -> bool {
    let Some(&first) = nodes.first() else {
        return true;
    };
    let mut seen = vec![first];
    let mut frontier = vec![first];
    while let Some(n) = frontier.pop() {
        for &m in nodes {
            if !seen.contains(&m) && adjacent(n, m) {
                seen.push(m);
                frontier.push(m);
            }
        }
    }
    seen.len() == nodes.len()
}

/// Calls the walker for each outermost subquery in an expression.
struct Subqueries<'a, 'r> {
    walker: &'a mut Walker<'r>,
    block: usize,
    depth: usize,
}

impl Visitor for Subqueries<'_, '_> {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if self.depth == 0 {
            self.walker.query(q, Some(self.block), BlockKind::Expr);
        }
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
        self.depth = self.depth.saturating_sub(1);
        ControlFlow::Continue(())
    }
}
