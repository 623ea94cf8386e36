//! From statement text to a [`Placement`].
//!
//! [`analyze`] parses the text once (sqlparser, PostgreSQL dialect) and keeps what does not
//! depend on the parameters: which tables are sharded, which key values pin them (literals
//! already hashed to a shard, parameters by number), the merge plan of a key-less read,
//! the per-shard texts of a split INSERT, or a refusal. [`Analysis::place`] then resolves
//! the parameters of one execution, which costs no parse.

use std::fmt::Write as _;
use std::ops::ControlFlow;

use sqlparser::ast::{ObjectName, Statement, Visit, Visitor};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::merge::{self, FanOut};
use super::params::{KeyExpr, Resolved};
use super::scope::{BlockKind, Walker, Write};
use super::{
    BoundParams, Hint, KeyValue, MultiShardInsert, Placement, ShardingRules, UnshardedWrites,
    codes, parse_hint, shard_of, split,
};

/// The parameter-independent part of placing one statement text: cache it per text (and
/// per prepared statement) and call [`Analysis::place`] for each execution.
#[derive(Debug, Clone)]
pub struct Analysis {
    inner: Inner,
}

#[derive(Debug, Clone)]
enum Inner {
    Hint(Hint),
    /// One entry per statement of the text.
    Statements(Vec<Stmt>),
}

#[derive(Debug, Clone)]
enum Stmt {
    /// Decided without parameters (AnyShard for `SET`, a refusal, …).
    Fixed(Placement),
    Placed(Box<Placed>),
    /// `EXPLAIN` or `DECLARE … CURSOR FOR`: the inner statement, which must stay on one shard.
    OneShard {
        what: &'static str,
        inner: Box<Stmt>,
    },
}

/// One data statement after the walk.
#[derive(Debug, Clone)]
struct Placed {
    pins: Vec<Vec<KeyExpr>>,
    /// The sharded tables read or written (index into `names`, pins that hold for it).
    tables: Vec<(usize, Vec<usize>)>,
    writes: Vec<Write>,
    /// Names of sharded tables, by index into the walk's table list, for `writes`.
    names: Vec<String>,
    /// For a read: its merge across shards, or why it cannot be merged.
    fan_out: Option<Result<FanOut, String>>,
    /// For a literal multi-row INSERT spanning shards: the per-shard texts, or why not.
    split: Option<Result<Vec<(usize, String)>, String>>,
}

/// Analyzes one statement text (simple-protocol Query or Parse), parsing it once.
pub fn analyze(sql: &str, rules: &ShardingRules) -> Analysis {
    if let Some(hint) = parse_hint(sql) {
        return Analysis {
            inner: Inner::Hint(hint),
        };
    }
    let parsed = Parser::parse_sql(&PostgreSqlDialect {}, sql).or_else(|e| {
        // sqlparser does not know `FOR NO KEY UPDATE` / `FOR KEY SHARE`; the lock strength
        // does not change the placement, so parse it as `FOR UPDATE` / `FOR SHARE`.
        match weaker_locks_blanked(sql) {
            Some(text) => Parser::parse_sql(&PostgreSqlDialect {}, &text).map_err(|_| e),
            None => Err(e),
        }
    });
    let statements = match parsed {
        Ok(statements) => statements,
        Err(e) => {
            return fixed(Placement::refuse(format!(
                "pgsluice cannot parse this statement to find its shard ({e}); add a /* \
                 pgsluice: shard_key=… */ or /* pgsluice: shard=… */ hint"
            )));
        }
    };
    if statements.is_empty() {
        return fixed(Placement::AnyShard {
            reason: "empty query".to_string(),
        });
    }
    let many = statements.len() > 1;
    let stmts = statements
        .iter()
        .map(|s| {
            let text = if many {
                Err(
                    "pgsluice runs a statement on every shard only as a query string of its \
                     own"
                    .to_string(),
                )
            } else {
                Ok(sql)
            };
            statement(s, text, rules)
        })
        .collect();
    Analysis {
        inner: Inner::Statements(stmts),
    }
}

/// `sql` with the `NO KEY` of `FOR NO KEY UPDATE` and the `KEY` of `FOR KEY SHARE` replaced
/// by spaces (so every other byte keeps its offset); `None` if there is neither.
fn weaker_locks_blanked(sql: &str) -> Option<String> {
    use crate::router::lexer::{self, Kw, Tok};
    let mut tokens = Vec::new();
    lexer::tokenize(sql, &mut tokens).ok()?;
    let mut bytes = sql.as_bytes().to_vec();
    let mut changed = false;
    for (i, t) in tokens.iter().enumerate() {
        if t.tok != Tok::Word(Kw::For) {
            continue;
        }
        let kw = |j: usize| tokens.get(i + j).map(|t| t.kw());
        let blank = match (kw(1), kw(2), kw(3)) {
            (Some(Kw::No), Some(Kw::Key), Some(Kw::Update)) => 1..3,
            (Some(Kw::Key), Some(Kw::Share), _) => 1..2,
            _ => continue,
        };
        for j in blank {
            let t = &tokens[i + j];
            bytes[t.start..t.end].fill(b' ');
        }
        changed = true;
    }
    if !changed {
        return None;
    }
    String::from_utf8(bytes).ok()
}

fn fixed(p: Placement) -> Analysis {
    Analysis {
        inner: Inner::Statements(vec![Stmt::Fixed(p)]),
    }
}

fn any_shard(what: &str) -> Stmt {
    Stmt::Fixed(Placement::AnyShard {
        reason: format!("{what}: no sharded table"),
    })
}

/// `sql` is the statement's text when it is the only statement (for rewrites), else why a
/// fan-out or a split is not possible here.
fn statement(s: &Statement, sql: Result<&str, String>, rules: &ShardingRules) -> Stmt {
    match s {
        Statement::Query(_)
        | Statement::Insert(_)
        | Statement::Update(_)
        | Statement::Delete(_) => data_statement(s, sql, rules),
        Statement::Explain {
            statement: inner, ..
        } => Stmt::OneShard {
            what: "EXPLAIN",
            inner: Box::new(statement(
                inner,
                Err(one_shard_only("EXPLAIN", rules)),
                rules,
            )),
        },
        Statement::Declare { stmts, .. } => match stmts.as_slice() {
            [d] => match &d.for_query {
                Some(q) => Stmt::OneShard {
                    what: "DECLARE … CURSOR",
                    inner: Box::new(statement(
                        &Statement::Query(q.clone()),
                        Err(one_shard_only("DECLARE … CURSOR", rules)),
                        rules,
                    )),
                },
                None => refuse_kind("this DECLARE"),
            },
            _ => refuse_kind("this DECLARE"),
        },
        Statement::Set(_) => any_shard("SET"),
        Statement::ShowVariable { .. } | Statement::ShowVariables { .. } => any_shard("SHOW"),
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. } => any_shard("transaction control"),
        Statement::Discard { .. } | Statement::Reset(_) | Statement::Deallocate { .. } => {
            any_shard("session command")
        }
        Statement::Fetch { .. } | Statement::Close { .. } => any_shard("cursor command"),
        Statement::Prepare { .. } | Statement::Execute { .. } => Stmt::Fixed(Placement::refuse(
            "SQL-level PREPARE/EXECUTE cannot be placed on a shard by pgsluice: use the \
             protocol's prepared statements (every driver does)",
        )),
        Statement::Copy { .. } => Stmt::Fixed(Placement::refuse(
            "pgsluice does not route COPY in a sharded database: use INSERT, or COPY on each \
             shard directly",
        )),
        Statement::LISTEN { .. } | Statement::UNLISTEN { .. } | Statement::NOTIFY { .. } => {
            Stmt::Fixed(Placement::refuse(
                "pgsluice does not route LISTEN/NOTIFY in a sharded database",
            ))
        }
        other => {
            let text = other.to_string();
            let what: Vec<&str> = text.split_whitespace().take(2).collect();
            refuse_kind(&what.join(" "))
        }
    }
}

fn one_shard_only(what: &str, rules: &ShardingRules) -> String {
    format!(
        "{what} of a statement that runs on several shards: pgsluice runs {what} on one shard \
         only; add {} = … or a /* pgsluice: shard=… */ hint",
        rules.key_column
    )
}

fn refuse_kind(what: &str) -> Stmt {
    Stmt::Fixed(Placement::refuse(format!(
        "pgsluice does not run {what} in a sharded database: run it on each shard directly"
    )))
}

/// Counts the table names sqlparser sees, to check that the walk saw them all.
#[derive(Default)]
struct Relations(usize);

impl Visitor for Relations {
    type Break = ();
    fn pre_visit_relation(&mut self, _: &ObjectName) -> ControlFlow<()> {
        self.0 += 1;
        ControlFlow::Continue(())
    }
}

fn data_statement(s: &Statement, sql: Result<&str, String>, rules: &ShardingRules) -> Stmt {
    let mut walker = Walker::new(rules);
    let top_query = match s {
        Statement::Query(q) => {
            walker.query(q, None, BlockKind::Top);
            Some(q)
        }
        other => {
            walker.dml(other, None);
            None
        }
    };
    if let Some((code, message)) = walker.w.refusal.take() {
        return Stmt::Fixed(Placement::Refuse { code, message });
    }
    let mut relations = Relations::default();
    let _ = s.visit(&mut relations);
    if relations.0 != walker.w.relations {
        return Stmt::Fixed(Placement::refuse(
            "pgsluice cannot place this statement: it names a table where pgsluice does not \
             look for one; add a /* pgsluice: shard_key=… */ hint",
        ));
    }
    let table_pins = walker.table_pins();
    let w = &walker.w;
    let tables: Vec<(usize, Vec<usize>)> = w
        .tables
        .iter()
        .zip(table_pins)
        .enumerate()
        .filter(|(_, (t, _))| t.sharded)
        .map(|(i, (_, pins))| (i, pins))
        .collect();
    let fan_out = match top_query {
        Some(q) if w.writes.is_empty() && !tables.is_empty() => {
            Some(match (walker.fan_out_problem(), &sql) {
                (Some(problem), _) => Err(problem),
                (None, Ok(sql)) => merge::fan_out(q, sql),
                (None, Err(why)) => Err(why.clone()),
            })
        }
        _ => None,
    };
    let split = split_insert(s, sql.as_ref().ok().copied(), &walker, rules);
    Stmt::Placed(Box::new(Placed {
        pins: w.pins.clone(),
        tables,
        writes: w.writes.clone(),
        names: w.tables.iter().map(|t| t.name.clone()).collect(),
        fan_out,
        split,
    }))
}

/// The per-shard texts of a top-level multi-row INSERT of literal rows that span shards.
fn split_insert(
    s: &Statement,
    sql: Option<&str>,
    walker: &Walker<'_>,
    rules: &ShardingRules,
) -> Option<Result<Vec<(usize, String)>, String>> {
    let Statement::Insert(insert) = s else {
        return None;
    };
    let [Write::Insert { rows, .. }] = walker.w.writes.as_slice() else {
        return None;
    };
    let mut shards = Vec::with_capacity(rows.len());
    for row in rows {
        match row {
            KeyExpr::Shard { shard, .. } => shards.push(*shard),
            KeyExpr::Null => shards.push(shard_of_null()),
            // Parameters: placed per execution, never split.
            _ => return None,
        }
    }
    if shards.iter().all(|&s| s == shards[0]) {
        return None;
    }
    let key = &rules.key_column;
    if rules.multi_shard_insert == MultiShardInsert::Refuse {
        return Some(Err(format!(
            "this INSERT has rows for shards {}: pgsluice does not split a multi-row INSERT \
             across shards (multi_shard_insert = \"refuse\"); insert each shard's rows in a \
             statement of their own",
            list(&shards)
        )));
    }
    if walker.w.tables.iter().filter(|t| t.sharded).count() > 1 {
        return Some(Err(format!(
            "this INSERT has rows for shards {} and reads other sharded tables: pgsluice \
             cannot split it; insert each shard's rows in a statement of their own ({key})",
            list(&shards)
        )));
    }
    let Some(sql) = sql else {
        return Some(Err(format!(
            "this INSERT has rows for shards {}: pgsluice splits a multi-row INSERT only when \
             it is the only statement of the query string",
            list(&shards)
        )));
    };
    Some(split::split(sql, insert, &shards).ok_or_else(|| {
        format!(
            "this INSERT has rows for shards {} and pgsluice could not split its text; insert \
             each shard's rows in a statement of their own",
            list(&shards)
        )
    }))
}

/// A NULL key is hashed as nothing: row hash 0, remainder 0.
fn shard_of_null() -> usize {
    0
}

/// `0, 2 and 3` from shard numbers (sorted, deduplicated).
fn list(shards: &[usize]) -> String {
    let mut s: Vec<usize> = shards.to_vec();
    s.sort_unstable();
    s.dedup();
    let text: Vec<String> = s.iter().map(usize::to_string).collect();
    match text.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => text.join(""),
    }
}

impl Analysis {
    /// The placement of one execution, given its bound parameters (if any).
    pub fn place(&self, params: Option<&BoundParams<'_>>, rules: &ShardingRules) -> Placement {
        match &self.inner {
            Inner::Hint(hint) => place_hint(hint, rules),
            Inner::Statements(stmts) => match stmts.as_slice() {
                [one] => one.place(params, rules),
                many => combine(many.iter().map(|s| s.place(params, rules))),
            },
        }
    }
}

fn place_hint(hint: &Hint, rules: &ShardingRules) -> Placement {
    match hint {
        Hint::Shard(s) if *s < rules.shards => Placement::Shard {
            shard: *s,
            reason: format!("hint shard={s}"),
        },
        Hint::Shard(s) => Placement::Refuse {
            code: codes::INVALID_PARAMETER_VALUE,
            message: format!(
                "hint shard={s} is out of range: this database has {} shards (0 to {})",
                rules.shards,
                rules.shards.saturating_sub(1)
            ),
        },
        Hint::Key(k) => match rules.key_type.parse_text_coded(k) {
            Ok(v) => Placement::Shard {
                shard: shard_of(rules.key_type, &v, rules.shards),
                reason: format!("hint shard_key={v}"),
            },
            Err(e) => Placement::Refuse {
                code: e.code,
                message: format!("hint shard_key: {}", e.message),
            },
        },
    }
}

/// Several statements in one query string: they must all run on one shard.
fn combine(placements: impl Iterator<Item = Placement>) -> Placement {
    let mut shard: Option<(usize, String)> = None;
    let mut any: Option<String> = None;
    for p in placements {
        match p {
            Placement::Shard { shard: s, reason } => match &shard {
                None => shard = Some((s, reason)),
                Some((first, first_reason)) if *first != s => {
                    return Placement::refuse(format!(
                        "the statements of this query string belong to different shards \
                         ({first_reason}: shard {first}; {reason}: shard {s}); pgsluice runs a \
                         query string on one shard: send them separately"
                    ));
                }
                Some(_) => {}
            },
            Placement::AnyShard { reason } => {
                any.get_or_insert(reason);
            }
            Placement::Refuse { .. } => return p,
            Placement::AllShards { reason, .. }
            | Placement::AllShardsWrite { reason }
            | Placement::Split { reason, .. } => {
                return Placement::refuse(format!(
                    "a statement of this query string must run on every shard ({reason}): \
                     pgsluice runs it only as a query string of its own"
                ));
            }
        }
    }
    match (shard, any) {
        (Some((shard, reason)), _) => Placement::Shard { shard, reason },
        (None, reason) => Placement::AnyShard {
            reason: reason.unwrap_or_else(|| "no sharded table".to_string()),
        },
    }
}

impl Stmt {
    fn place(&self, params: Option<&BoundParams<'_>>, rules: &ShardingRules) -> Placement {
        match self {
            Stmt::Fixed(p) => p.clone(),
            Stmt::Placed(placed) => placed.place(params, rules),
            Stmt::OneShard { what, inner } => match inner.place(params, rules) {
                p @ (Placement::Shard { .. }
                | Placement::AnyShard { .. }
                | Placement::Refuse { .. }) => p,
                Placement::AllShards { reason, .. }
                | Placement::AllShardsWrite { reason }
                | Placement::Split { reason, .. } => Placement::refuse(format!(
                    "{what} of a statement that runs on several shards ({reason}): pgsluice \
                     runs {what} on one shard only; add {} = … or a /* pgsluice: shard=… */ \
                     hint",
                    rules.key_column
                )),
            },
        }
    }
}

/// Where one sharded table's rows are, for one execution.
enum Pinned {
    /// No usable key equality.
    Free,
    /// The key values pinning it fall on exactly this shard.
    One(usize),
    /// On several shards (or on none: contradictory values).
    Several(Vec<usize>),
}

impl Placed {
    fn place(&self, params: Option<&BoundParams<'_>>, rules: &ShardingRules) -> Placement {
        let key = &rules.key_column;
        // Each pin's shards; None = it does not constrain (a parameter of another type).
        let mut pin_shards: Vec<Option<Vec<usize>>> = Vec::with_capacity(self.pins.len());
        let mut first_value: Vec<Option<KeyValue>> = Vec::with_capacity(self.pins.len());
        for pin in &self.pins {
            let mut shards = Vec::with_capacity(pin.len());
            let mut usable = true;
            let mut value = None;
            for alt in pin {
                match alt.resolve(params, rules) {
                    Err(e) => {
                        return Placement::Refuse {
                            code: e.code,
                            message: e.message,
                        };
                    }
                    Ok(Resolved::Key { shard, value: v }) => {
                        shards.push(shard);
                        value.get_or_insert(v);
                    }
                    // `key = NULL` matches no row.
                    Ok(Resolved::Null) => {}
                    Ok(Resolved::NotAKey) => usable = false,
                }
            }
            shards.sort_unstable();
            shards.dedup();
            pin_shards.push(usable.then_some(shards));
            first_value.push(value);
        }

        // INSERT rows place their target table.
        let insert_targets: Vec<usize> = self
            .writes
            .iter()
            .filter_map(|w| match w {
                Write::Insert { table, .. } => Some(*table),
                _ => None,
            })
            .collect();
        let mut row_shards: Vec<usize> = Vec::new();
        let mut first_row: Option<KeyValue> = None;
        for write in &self.writes {
            let Write::Insert { rows, table } = write else {
                continue;
            };
            for (i, row) in rows.iter().enumerate() {
                match row.resolve(params, rules) {
                    Err(e) => {
                        return Placement::Refuse {
                            code: e.code,
                            message: e.message,
                        };
                    }
                    Ok(Resolved::Key { shard, value }) => {
                        row_shards.push(shard);
                        first_row.get_or_insert(value);
                    }
                    Ok(Resolved::Null) => row_shards.push(shard_of_null()),
                    Ok(Resolved::NotAKey) => {
                        return Placement::refuse(format!(
                            "row {} of the INSERT into {}: the {key} parameter's type does not \
                             match the key column ({})",
                            i + 1,
                            self.name(*table),
                            rules.key_type.as_str()
                        ));
                    }
                }
            }
        }

        let mut placed: Option<usize> = None;
        let mut reason = String::new();
        let mut free: Option<&str> = None;
        let mut several: Option<Vec<usize>> = None;
        let mut disagree = false;
        for (table, pins) in &self.tables {
            if insert_targets.contains(table) {
                continue;
            }
            match pinned(pins, &pin_shards) {
                Pinned::Free => {
                    free.get_or_insert(self.name(*table));
                }
                Pinned::Several(s) => {
                    several.get_or_insert(s);
                }
                Pinned::One(s) => {
                    if placed.is_some_and(|p| p != s) {
                        disagree = true;
                    }
                    if placed.is_none() {
                        placed = Some(s);
                        reason = pin_reason(key, pins, &pin_shards, &first_value, &self.pins, s);
                    }
                }
            }
        }

        let unsharded_write = self.writes.iter().find_map(|w| match w {
            Write::Unsharded { verb, name } => Some((*verb, name.as_str())),
            _ => None,
        });
        let sharded_write = self.writes.iter().find_map(|w| match w {
            Write::Modify { verb, table } => Some((*verb, *table)),
            Write::Insert { table, .. } => Some(("INSERT", *table)),
            Write::Unsharded { .. } => None,
        });

        if let Some((verb, name)) = unsharded_write {
            if !self.tables.is_empty() {
                return Placement::refuse(format!(
                    "{verb} of unsharded table {name} in a statement that also touches sharded \
                     tables: its copies on the shards would differ; pgsluice refuses it"
                ));
            }
            return match rules.unsharded_writes {
                UnshardedWrites::AllShards => Placement::AllShardsWrite {
                    reason: format!("{verb} of unsharded table {name}: written on every shard"),
                },
                UnshardedWrites::Refuse => Placement::refuse(format!(
                    "{verb} of unsharded table {name}: writes to unsharded tables are refused \
                     (unsharded_writes = \"refuse\"); write it on each shard directly"
                )),
            };
        }
        if self.tables.is_empty() {
            return Placement::AnyShard {
                reason: "no sharded table".to_string(),
            };
        }

        // Everything on one shard?
        let rows_shard = match row_shards.split_first() {
            None => None,
            Some((first, rest)) if rest.iter().all(|s| s == first) => Some(*first),
            Some(_) => {
                disagree = true;
                None
            }
        };
        if free.is_none() && several.is_none() && !disagree {
            let insert_reason = |rs: usize| match &first_row {
                Some(v) if row_shards.len() == 1 => format!("INSERT {key} = {v}"),
                Some(_) => format!("INSERT of {} rows, all on shard {rs}", row_shards.len()),
                None => format!("INSERT {key} = NULL"),
            };
            match (placed, rows_shard) {
                (Some(s), None) if row_shards.is_empty() => {
                    return Placement::Shard { shard: s, reason };
                }
                (Some(s), Some(rs)) if s == rs => {
                    return Placement::Shard {
                        shard: s,
                        reason: format!("{}; {reason}", insert_reason(rs)),
                    };
                }
                (None, Some(rs)) => {
                    return Placement::Shard {
                        shard: rs,
                        reason: insert_reason(rs),
                    };
                }
                _ => {}
            }
        }
        let only_insert_tables =
            !row_shards.is_empty() && self.tables.iter().all(|(t, _)| insert_targets.contains(t));

        // Not on one shard.
        if let Some((verb, table)) = sharded_write {
            let name = self.name(table);
            if verb == "INSERT" && only_insert_tables {
                return match &self.split {
                    Some(Ok(parts)) => Placement::Split {
                        parts: parts.clone(),
                        reason: format!(
                            "INSERT of {} rows into {name} split over shards {}",
                            row_shards.len(),
                            list(&row_shards)
                        ),
                    },
                    Some(Err(message)) => Placement::refuse(message.clone()),
                    None => Placement::refuse(format!(
                        "this INSERT into {name} has rows for shards {}: pgsluice splits a \
                         multi-row INSERT only when its rows are literals (simple query \
                         protocol); with bound parameters send one statement per shard",
                        list(&row_shards)
                    )),
                };
            }
            if let Some(t) = free {
                return Placement::refuse(if t == name {
                    format!(
                        "{verb} on {name} without {key} in WHERE would touch every shard: add \
                         {key} = … (pgsluice does not write to several shards at once)"
                    )
                } else {
                    format!(
                        "{verb} on {name} reads {t} without {key} = …, which would need every \
                         shard: pgsluice does not write to several shards at once"
                    )
                });
            }
            let mut shards: Vec<usize> = several.unwrap_or_default();
            shards.extend(placed);
            shards.extend(row_shards.iter().copied());
            return Placement::refuse(format!(
                "{verb} on {name} touches rows on shards {}: pgsluice does not write to \
                 several shards at once",
                list(&shards)
            ));
        }
        match &self.fan_out {
            Some(Ok(f)) => fan_out(f, params, rules),
            Some(Err(message)) => Placement::refuse(message.clone()),
            None => Placement::refuse("pgsluice cannot place this statement on one shard"),
        }
    }
}

impl Placed {
    fn name(&self, table: usize) -> &str {
        self.names.get(table).map_or("?", String::as_str)
    }
}

fn pinned(pins: &[usize], pin_shards: &[Option<Vec<usize>>]) -> Pinned {
    let mut usable = pins
        .iter()
        .filter_map(|&p| pin_shards.get(p).and_then(Option::as_ref));
    let Some(first) = usable.next() else {
        return Pinned::Free;
    };
    let mut set: Option<Vec<usize>> = None;
    for shards in usable {
        let prev = set.as_ref().unwrap_or(first);
        set = Some(
            prev.iter()
                .copied()
                .filter(|s| shards.contains(s))
                .collect(),
        );
    }
    match set.as_ref().unwrap_or(first).as_slice() {
        [one] => Pinned::One(*one),
        many => Pinned::Several(many.to_vec()),
    }
}

/// "user_id = 42" or "user_id IN (…) all on shard 1", from the first pin that decided.
fn pin_reason(
    key: &str,
    pins: &[usize],
    pin_shards: &[Option<Vec<usize>>],
    values: &[Option<KeyValue>],
    exprs: &[Vec<KeyExpr>],
    shard: usize,
) -> String {
    let Some(&p) = pins
        .iter()
        .find(|&&p| matches!(pin_shards.get(p), Some(Some(s)) if s.len() == 1))
    else {
        return format!("{key} on shard {shard}");
    };
    let mut reason = String::new();
    match (exprs[p].as_slice(), &values[p]) {
        ([one], Some(v)) => {
            let _ = write!(reason, "{key} = {v}");
            if let KeyExpr::Param { index, .. } = one {
                let _ = write!(reason, " (${})", index + 1);
            }
        }
        _ => {
            let _ = write!(reason, "{key} IN (...) all on shard {shard}");
        }
    }
    reason
}

fn fan_out(f: &FanOut, params: Option<&BoundParams<'_>>, rules: &ShardingRules) -> Placement {
    let mut plan = f.plan.clone();
    if let Some(i) = f.limit_param {
        match super::params::count_param(params, i) {
            Ok(limit) => plan.limit = limit,
            Err(e) => {
                return Placement::Refuse {
                    code: e.code,
                    message: e.message,
                };
            }
        }
    }
    Placement::AllShards {
        plan,
        per_shard_sql: f.per_shard_sql.clone(),
        reason: format!(
            "no {} = … pins this read: it runs on all {} shards and the results are merged",
            rules.key_column, rules.shards
        ),
    }
}
