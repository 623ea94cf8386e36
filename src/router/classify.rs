//! The classifier: tokens → statements → one verdict per statement → one [`Class`].
//!
//! Each statement is decided from its first keyword. Queries (`SELECT`, `WITH`, `VALUES`,
//! `TABLE`, `(`) get a single scan over their tokens for anything that writes: `INTO`, a
//! locking clause, a data-modifying statement inside `WITH` or after it, and function calls
//! the [`FunctionCatalog`] says write. Only a DML keyword in a position where it may be a
//! column name sends the statement to sqlparser ([`super::parse`]).
//!
//! Invariant: every path that is not sure returns a write.

use super::functions::NAME_BUF;
use super::lexer::{self, Kw, Tok, Token};
use super::parse::{self, Parsed};
use super::{Access, Class, Command, FunctionCatalog, Reason, RouteMode, TxControl};

/// `EXPLAIN`, `PREPARE`, `DECLARE` and `COPY` wrap other statements; PostgreSQL never nests
/// them deeper than this, and the bound keeps hostile input from exhausting the stack.
const MAX_NESTING: usize = 3;

/// The verdict on one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    access: Access,
    reason: Reason,
    tx: TxControl,
    command: Option<Command>,
}

impl Verdict {
    fn read(reason: Reason) -> Self {
        Verdict {
            access: Access::Read,
            reason,
            tx: TxControl::None,
            command: None,
        }
    }

    fn write(reason: Reason) -> Self {
        Verdict {
            access: Access::Write,
            ..Verdict::read(reason)
        }
    }

    fn with_tx(self, tx: TxControl) -> Self {
        Verdict { tx, ..self }
    }

    fn command(command: Command) -> Self {
        Verdict {
            command: Some(command),
            ..Verdict::read(Reason::SessionCommand)
        }
    }
}

struct Cx<'a> {
    sql: &'a str,
    functions: &'a FunctionCatalog,
    /// Set when sqlparser was asked (the expensive path).
    parsed: std::cell::Cell<bool>,
}

pub(crate) fn classify(sql: &str, functions: &FunctionCatalog) -> Class {
    classify_costed(sql, functions).0
}

/// [`classify`], and whether the result is worth caching: the statement
/// needed sqlparser, or it has no literals (a parameterised text, which
/// comes back verbatim). A text with literals that the lexer decided alone
/// is cheaper to classify again than to cache: its next use usually
/// carries other values, and caching it would only evict useful entries.
pub(crate) fn classify_costed(sql: &str, functions: &FunctionCatalog) -> (Class, bool) {
    let hint = lexer::leading_hint(sql);
    let mut tokens = Vec::with_capacity(sql.len() / 6 + 4);
    if lexer::tokenize(sql, &mut tokens).is_err() {
        let class = Class {
            access: Access::Write,
            tx: TxControl::None,
            hint,
            command: None,
            reason: Reason::Unparsable,
        };
        return (class, true);
    }
    let cx = Cx {
        sql,
        functions,
        parsed: std::cell::Cell::new(false),
    };
    let mut count = 0usize;
    let mut first_reason = Reason::Empty;
    let mut write_reason = None;
    let mut read_only_tx = false;
    let mut tx = TxControl::None;
    let mut command = None;
    for stmt in Statements::new(&tokens) {
        let verdict = statement(&cx, stmt, 0);
        if count == 0 {
            first_reason = verdict.reason;
        }
        count += 1;
        if verdict.access == Access::Write && write_reason.is_none() {
            write_reason = Some(verdict.reason);
        }
        read_only_tx |= verdict.reason == Reason::ReadOnlyTransaction;
        if verdict.tx != TxControl::None {
            tx = verdict.tx;
        }
        if verdict.command.is_some() {
            command = verdict.command;
        }
    }
    if count > 1 && command.is_some() {
        command = Some(Command::Invalid(
            "pgsluice.route must be set, reset or shown in a statement of its own".to_string(),
        ));
    }
    let (access, reason) = match write_reason {
        Some(reason) => (Access::Write, reason),
        None if read_only_tx => (Access::Read, Reason::ReadOnlyTransaction),
        None => (Access::Read, first_reason),
    };
    let class = Class {
        access,
        tx,
        hint,
        command,
        reason,
    };
    let worth_caching = cx.parsed.get()
        || !tokens
            .iter()
            .any(|t| matches!(t.tok, Tok::Number | Tok::String));
    (class, worth_caching)
}

/// Splits tokens at top-level `;`, except inside a `BEGIN ATOMIC … END` function body.
/// Empty statements are skipped.
struct Statements<'t> {
    rest: &'t [Token],
}

impl<'t> Statements<'t> {
    fn new(tokens: &'t [Token]) -> Self {
        Statements { rest: tokens }
    }
}

impl<'t> Iterator for Statements<'t> {
    type Item = &'t [Token];

    fn next(&mut self) -> Option<&'t [Token]> {
        loop {
            if self.rest.is_empty() {
                return None;
            }
            let t = self.rest;
            let (mut atomic, mut case) = (0usize, 0usize);
            let mut end = t.len();
            for (i, tok) in t.iter().enumerate() {
                match tok.tok {
                    Tok::Semicolon if atomic == 0 => {
                        end = i;
                        break;
                    }
                    Tok::Word(Kw::Begin) if t.get(i + 1).is_some_and(|n| n.is(Kw::Atomic)) => {
                        atomic += 1;
                    }
                    Tok::Word(Kw::Case) if atomic > 0 => case += 1,
                    Tok::Word(Kw::End) if atomic > 0 => {
                        if case > 0 {
                            case -= 1;
                        } else {
                            atomic -= 1;
                        }
                    }
                    _ => {}
                }
            }
            self.rest = t.get(end + 1..).unwrap_or(&[]);
            if end > 0 {
                return Some(&t[..end]);
            }
        }
    }
}

fn statement(cx: &Cx, t: &[Token], depth: usize) -> Verdict {
    let Some(first) = t.first() else {
        return Verdict::read(Reason::Empty);
    };
    if depth > MAX_NESTING {
        return Verdict::write(Reason::Unparsable);
    }
    let second = t.get(1).map_or(Kw::None, Token::kw);
    match first.tok {
        Tok::LParen => return query(cx, t),
        Tok::Word(_) => {}
        _ => return Verdict::write(Reason::Unparsable),
    }
    match first.kw() {
        Kw::Select | Kw::With | Kw::Values | Kw::Table => query(cx, t),
        Kw::Insert | Kw::Update | Kw::Delete | Kw::Merge => Verdict::write(Reason::DataModifying),
        Kw::Explain => explain(cx, t, depth),
        Kw::Show => show(cx, t),
        Kw::Set => set(cx, t),
        Kw::Reset => reset(cx, t),
        Kw::Begin => begin(cx, &t[1..]),
        Kw::Start if second == Kw::Transaction => begin(cx, &t[2..]),
        Kw::Commit if second == Kw::Prepared => Verdict::write(Reason::TwoPhase),
        Kw::Rollback if second == Kw::Prepared => Verdict::write(Reason::TwoPhase),
        Kw::Rollback | Kw::Abort if t.iter().any(|x| x.is(Kw::To)) => {
            Verdict::read(Reason::TransactionControl)
        }
        Kw::Commit | Kw::End | Kw::Rollback | Kw::Abort => {
            Verdict::read(Reason::TransactionControl).with_tx(TxControl::End)
        }
        Kw::Savepoint | Kw::Release => Verdict::read(Reason::TransactionControl),
        Kw::Prepare if second == Kw::Transaction => {
            Verdict::write(Reason::TwoPhase).with_tx(TxControl::End)
        }
        Kw::Prepare => prepare(cx, t, depth),
        Kw::Execute => Verdict::write(Reason::Execute),
        Kw::Deallocate | Kw::Discard => Verdict::read(Reason::SessionCommand),
        Kw::Copy => copy(cx, t, depth),
        Kw::Declare => declare(cx, t, depth),
        Kw::Fetch | Kw::Move | Kw::Close => Verdict::read(Reason::ReadOnlyCommand),
        Kw::Lock => Verdict::write(Reason::Lock),
        Kw::Call | Kw::Do => Verdict::write(Reason::CallOrDo),
        Kw::Listen | Kw::Unlisten | Kw::Notify => Verdict::write(Reason::ListenNotify),
        Kw::Create
        | Kw::Alter
        | Kw::Drop
        | Kw::Truncate
        | Kw::Grant
        | Kw::Revoke
        | Kw::Comment
        | Kw::Vacuum
        | Kw::Analyze
        | Kw::Analyse
        | Kw::Cluster
        | Kw::Reindex
        | Kw::Refresh
        | Kw::Security
        | Kw::Import
        | Kw::Reassign => Verdict::write(Reason::Ddl),
        _ => Verdict::write(Reason::Unknown),
    }
}

/// `SELECT`, `WITH`, `VALUES`, `TABLE` or a parenthesised query.
fn query(cx: &Cx, t: &[Token]) -> Verdict {
    let mut depth = 0usize;
    let mut ambiguous = false;
    for (i, tok) in t.iter().enumerate() {
        let prev = i.checked_sub(1).map(|p| t[p].tok);
        match tok.tok {
            Tok::LParen => depth += 1,
            Tok::RParen => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return Verdict::write(Reason::Unparsable),
            },
            Tok::Other => return Verdict::write(Reason::Unparsable),
            Tok::Word(Kw::Into) => {
                // INTO is reserved: it is SELECT INTO, or the INSERT/MERGE INTO of a
                // data-modifying statement that could not be placed (`SELECT insert INTO x`).
                return match prev {
                    Some(Tok::Word(Kw::Insert | Kw::Merge)) => {
                        Verdict::write(Reason::DataModifying)
                    }
                    _ => Verdict::write(Reason::SelectInto),
                };
            }
            Tok::Word(Kw::For) if locking_clause(&t[i + 1..]) => {
                return Verdict::write(Reason::LockingRead);
            }
            Tok::Word(Kw::Insert | Kw::Update | Kw::Delete | Kw::Merge) => {
                let prev2 = i.checked_sub(2).map(|p| t[p].tok);
                if prev == Some(Tok::LParen)
                    && matches!(prev2, Some(Tok::Word(Kw::As | Kw::Materialized)))
                {
                    return Verdict::write(Reason::WritingCte);
                }
                if depth == 0 && prev == Some(Tok::RParen) {
                    // The main statement after a WITH list.
                    return Verdict::write(Reason::DataModifying);
                }
                ambiguous = true;
            }
            Tok::Word(_) | Tok::QuotedIdent
                if t.get(i + 1).is_some_and(|n| n.tok == Tok::LParen) =>
            {
                if let Some(reason) = call_effect(cx, t, i) {
                    return Verdict::write(reason);
                }
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Verdict::write(Reason::Unparsable);
    }
    if ambiguous {
        let (Some(first), Some(last)) = (t.first(), t.last()) else {
            return Verdict::write(Reason::Unparsable);
        };
        let text = cx.sql.get(first.start..last.end).unwrap_or("");
        cx.parsed.set(true);
        return match parse::parse_statement(text) {
            Parsed::Read => Verdict::read(Reason::Select),
            Parsed::Write(reason) => Verdict::write(reason),
            Parsed::Unparsable => Verdict::write(Reason::Unparsable),
        };
    }
    Verdict::read(Reason::Select)
}

/// After `FOR`: `UPDATE`, `SHARE`, `NO KEY UPDATE` or `KEY SHARE`.
fn locking_clause(rest: &[Token]) -> bool {
    let kw = |i: usize| rest.get(i).map_or(Kw::None, Token::kw);
    match kw(0) {
        Kw::Update | Kw::Share => true,
        Kw::No => kw(1) == Kw::Key && kw(2) == Kw::Update,
        Kw::Key => kw(1) == Kw::Share,
        _ => false,
    }
}

/// `t[i]` is a name followed by `(`: why calling it writes, if it is a call and does.
fn call_effect(cx: &Cx, t: &[Token], i: usize) -> Option<Reason> {
    // A type (`x::numeric(10,2)`, `CAST(x AS varchar(3))`), an alias with column names
    // (`AS t(a, b)`) or a sampling method (`TABLESAMPLE system (10)`): not calls.
    if i > 0
        && matches!(
            t[i - 1].tok,
            Tok::DoubleColon | Tok::Word(Kw::As | Kw::Tablesample)
        )
    {
        return None;
    }
    let mut buf = [0u8; NAME_BUF];
    let Some(name) = call_name(&t[i], cx.sql, &mut buf) else {
        // A U&"…" name: we cannot tell which function it is.
        return Some(Reason::VolatileFunction);
    };
    if matches!(t[i].tok, Tok::Word(_)) && is_syntax_keyword(name) {
        return None;
    }
    let effect = cx.functions.effect(name)?;
    if is_cte_name(t, i) {
        return None;
    }
    Some(effect)
}

/// The function name as PostgreSQL resolves it: an unquoted name lower-cased, a quoted one
/// unescaped, both cut to 63 bytes. `None` for a `U&"…"` name.
fn call_name<'b>(tok: &Token, sql: &str, buf: &'b mut [u8; NAME_BUF]) -> Option<&'b str> {
    const MAX: usize = NAME_BUF - 1;
    let text = tok.text(sql).as_bytes();
    let mut n = 0;
    match tok.tok {
        Tok::QuotedIdent => {
            if text.first() != Some(&b'"') || text.len() < 2 {
                return None;
            }
            let mut j = 1;
            while j < text.len() - 1 && n < MAX {
                buf[n] = text[j];
                n += 1;
                j += if text[j] == b'"' { 2 } else { 1 };
            }
        }
        _ => {
            for &c in text.iter().take(MAX) {
                buf[n] = c.to_ascii_lowercase();
                n += 1;
            }
        }
    }
    let bytes = &buf[..n];
    match std::str::from_utf8(bytes) {
        Ok(name) => Some(name),
        // Cut in the middle of a character: keep the whole characters, as PostgreSQL does.
        Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).ok(),
    }
}

/// `name (a, b) AS [NOT] [MATERIALIZED] (SELECT …`: a CTE with a column list, not a call.
/// (`FROM f() AS (a int)` is a call: a column definition list starts with a name and a type.)
fn is_cte_name(t: &[Token], i: usize) -> bool {
    let mut j = i + 2;
    // Only names and commas may stand in a CTE's column list.
    loop {
        match t.get(j).map(|x| x.tok) {
            Some(Tok::RParen) => break,
            Some(Tok::Word(_) | Tok::QuotedIdent | Tok::Comma) => j += 1,
            _ => return false,
        }
    }
    let kw = |k: usize| t.get(k).map_or(Kw::None, Token::kw);
    if kw(j + 1) != Kw::As {
        return false;
    }
    let mut k = j + 2;
    if kw(k) == Kw::Not {
        k += 1;
    }
    if kw(k) == Kw::Materialized {
        k += 1;
    }
    if t.get(k).map(|x| x.tok) != Some(Tok::LParen) {
        return false;
    }
    match t.get(k + 1).map(|x| x.tok) {
        Some(Tok::LParen) => true,
        Some(Tok::Word(Kw::Values)) => t.get(k + 2).is_some_and(|x| x.tok == Tok::LParen),
        Some(Tok::Word(
            Kw::Select | Kw::With | Kw::Table | Kw::Insert | Kw::Update | Kw::Delete | Kw::Merge,
        )) => true,
        _ => false,
    }
}

/// Reserved, column-name and type/function-name keywords that stand before `(` as syntax
/// (`IN (`, `EXISTS (`, `OVER (`, `JOIN (`, `CAST (`, `COALESCE (` …): none of them can be a
/// user function's unquoted name, and none of them writes.
fn is_syntax_keyword(lower: &str) -> bool {
    matches!(
        lower,
        "all"
            | "and"
            | "any"
            | "array"
            | "as"
            | "asc"
            | "between"
            | "bigint"
            | "bit"
            | "boolean"
            | "both"
            | "case"
            | "cast"
            | "char"
            | "character"
            | "check"
            | "coalesce"
            | "collate"
            | "cross"
            | "current_date"
            | "current_time"
            | "current_timestamp"
            | "dec"
            | "decimal"
            | "default"
            | "desc"
            | "distinct"
            | "else"
            | "end"
            | "except"
            | "exists"
            | "extract"
            | "fetch"
            | "float"
            | "for"
            | "from"
            | "full"
            | "greatest"
            | "group"
            | "grouping"
            | "having"
            | "ilike"
            | "in"
            | "inner"
            | "int"
            | "integer"
            | "intersect"
            | "interval"
            | "is"
            | "join"
            | "json"
            | "json_array"
            | "json_arrayagg"
            | "json_exists"
            | "json_object"
            | "json_objectagg"
            | "json_query"
            | "json_scalar"
            | "json_serialize"
            | "json_table"
            | "json_value"
            | "lateral"
            | "leading"
            | "least"
            | "like"
            | "limit"
            | "localtime"
            | "localtimestamp"
            | "natural"
            | "nchar"
            | "normalize"
            | "not"
            | "nullif"
            | "numeric"
            | "offset"
            | "on"
            | "only"
            | "or"
            | "order"
            | "outer"
            | "overlaps"
            | "overlay"
            | "position"
            | "precision"
            | "real"
            | "returning"
            | "row"
            | "select"
            | "similar"
            | "smallint"
            | "some"
            | "substring"
            | "symmetric"
            | "table"
            | "then"
            | "time"
            | "timestamp"
            | "to"
            | "trailing"
            | "treat"
            | "trim"
            | "union"
            | "using"
            | "values"
            | "varchar"
            | "when"
            | "where"
            | "window"
            | "with"
            | "xmlattributes"
            | "xmlconcat"
            | "xmlelement"
            | "xmlexists"
            | "xmlforest"
            | "xmlnamespaces"
            | "xmlparse"
            | "xmlpi"
            | "xmlroot"
            | "xmlserialize"
            | "xmltable"
    )
}

/// `EXPLAIN [ANALYZE] [VERBOSE] stmt` or `EXPLAIN (option [value], …) stmt`.
fn explain(cx: &Cx, t: &[Token], depth: usize) -> Verdict {
    let mut analyze = false;
    let mut i = 1;
    if t.get(1).is_some_and(|x| x.tok == Tok::LParen) {
        let Some(close) = matching_paren(t, 1) else {
            return Verdict::write(Reason::Unparsable);
        };
        for option in t[2..close].split(|x| x.tok == Tok::Comma) {
            if let [name, rest @ ..] = option {
                if name.is(Kw::Analyze) || name.is(Kw::Analyse) {
                    // Only an explicit false value turns ANALYZE off.
                    analyze = !rest.first().is_some_and(|v| is_false(v.text(cx.sql)));
                }
            }
        }
        i = close + 1;
    } else {
        while let Some(x) = t.get(i) {
            match x.kw() {
                Kw::Analyze | Kw::Analyse => analyze = true,
                Kw::Verbose => {}
                _ => break,
            }
            i += 1;
        }
    }
    let inner = &t[i.min(t.len())..];
    let explainable = inner.first().is_some_and(|x| {
        x.tok == Tok::LParen
            || matches!(
                x.kw(),
                Kw::Select
                    | Kw::With
                    | Kw::Values
                    | Kw::Table
                    | Kw::Insert
                    | Kw::Update
                    | Kw::Delete
                    | Kw::Merge
                    | Kw::Execute
            )
    });
    if !explainable {
        return Verdict::write(Reason::Unparsable);
    }
    let verdict = statement(cx, inner, depth + 1);
    match (verdict.reason, verdict.access, analyze) {
        (Reason::Unparsable, _, _) => Verdict::write(Reason::Unparsable),
        (_, Access::Write, true) => Verdict::write(Reason::ExplainAnalyzeWrite),
        _ => Verdict::read(Reason::ReadOnlyCommand),
    }
}

fn is_false(value: &str) -> bool {
    let value = unquote(value);
    ["false", "off", "0", "no", "f", "n"]
        .iter()
        .any(|f| value.eq_ignore_ascii_case(f))
}

fn is_true(value: &str) -> bool {
    let value = unquote(value);
    ["true", "on", "1", "yes", "t", "y"]
        .iter()
        .any(|f| value.eq_ignore_ascii_case(f))
}

/// `'x'` or `"x"` → `x` (doubled quotes are left as they are; callers compare plain words).
fn unquote(text: &str) -> &str {
    let quoted = text.len() >= 2
        && ((text.starts_with('\'') && text.ends_with('\''))
            || (text.starts_with('"') && text.ends_with('"')));
    if quoted {
        &text[1..text.len() - 1]
    } else {
        text
    }
}

/// Index of the `)` that closes the `(` at `open`.
fn matching_paren(t: &[Token], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, x) in t.iter().enumerate().skip(open) {
        match x.tok {
            Tok::LParen => depth += 1,
            Tok::RParen => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Transaction modes: `(read_only, serializable)`; `read_only` is `None` when neither
/// `READ ONLY` nor `READ WRITE` is given (the last one given wins).
fn transaction_modes(cx: &Cx, t: &[Token]) -> (Option<bool>, bool) {
    let mut read_only = None;
    let mut serializable = false;
    for (i, x) in t.iter().enumerate() {
        if x.is(Kw::Read) {
            match t.get(i + 1).map(Token::kw) {
                Some(Kw::Only) => read_only = Some(true),
                Some(Kw::Write) => read_only = Some(false),
                _ => {}
            }
        }
        serializable |= unquote(x.text(cx.sql)).eq_ignore_ascii_case("serializable");
    }
    (read_only, serializable)
}

/// `BEGIN` / `START TRANSACTION`, from the token after the command words.
fn begin(cx: &Cx, t: &[Token]) -> Verdict {
    let t = match t.first().map(Token::kw) {
        Some(Kw::Work | Kw::Transaction) => &t[1..],
        _ => t,
    };
    let (read_only, serializable) = transaction_modes(cx, t);
    let read_only = read_only == Some(true);
    let verdict = match (read_only, serializable) {
        (true, false) => Verdict::read(Reason::ReadOnlyTransaction),
        (true, true) => Verdict::write(Reason::Serializable),
        // An explicit read-write transaction belongs on the primary.
        (false, _) => Verdict::write(Reason::TransactionControl),
    };
    verdict.with_tx(TxControl::Begin { read_only })
}

/// `SET …`: transaction modes, `pgsluice.route`, or a harmless session setting.
fn set(cx: &Cx, t: &[Token]) -> Verdict {
    let kw = |i: usize| t.get(i).map_or(Kw::None, Token::kw);
    if kw(1) == Kw::Session && kw(2) == Kw::Characteristics {
        // The session's default transaction mode; a standby refuses read-write and
        // serializable transactions, so only READ ONLY (or isolation alone) stays a read.
        return match transaction_modes(cx, &t[3..]) {
            (_, true) => Verdict::write(Reason::Serializable),
            (Some(false), _) => Verdict::write(Reason::TransactionControl),
            _ => Verdict::read(Reason::SessionCommand),
        };
    }
    if kw(1) == Kw::Transaction {
        if kw(2) == Kw::Snapshot {
            // Imports a snapshot exported on the primary.
            return Verdict::write(Reason::TransactionControl);
        }
        let (read_only, serializable) = transaction_modes(cx, &t[2..]);
        let tx = read_only.map_or(TxControl::None, |read_only| TxControl::SetTransaction {
            read_only,
        });
        let verdict = match (read_only, serializable) {
            (_, true) => Verdict::write(Reason::Serializable),
            (Some(true), _) => Verdict::read(Reason::ReadOnlyTransaction),
            (Some(false), _) => Verdict::write(Reason::TransactionControl),
            (None, _) => Verdict::read(Reason::SessionCommand),
        };
        return verdict.with_tx(tx);
    }
    let i = if matches!(kw(1), Kw::Session | Kw::Local) {
        2
    } else {
        1
    };
    let rest = t.get(i..).unwrap_or(&[]);
    if let Some(setting) = pgsluice_setting(cx, rest) {
        return Verdict::command(set_route(cx, setting, &rest[3..]));
    }
    let name = rest.first().map_or("", |x| x.text(cx.sql));
    if name.eq_ignore_ascii_case("transaction_read_only")
        && !rest.get(2).is_some_and(|v| is_true(v.text(cx.sql)))
    {
        return Verdict::write(Reason::TransactionControl);
    }
    if transaction_modes(cx, rest).1 {
        return Verdict::write(Reason::Serializable);
    }
    Verdict::read(Reason::SessionCommand)
}

/// `pgsluice . name` at the start of `t`: the setting's name.
fn pgsluice_setting<'a>(cx: &Cx<'a>, t: &[Token]) -> Option<&'a str> {
    let [prefix, dot, name, ..] = t else {
        return None;
    };
    let is_name = |x: &Token| matches!(x.tok, Tok::Word(_) | Tok::QuotedIdent);
    (is_name(prefix)
        && unquote(prefix.text(cx.sql)).eq_ignore_ascii_case("pgsluice")
        && dot.tok == Tok::Dot
        && is_name(name))
    .then(|| unquote(name.text(cx.sql)))
}

const ROUTE_VALUES: &str = "allowed: primary, replica, auto";

fn unknown_setting(name: &str) -> Command {
    Command::Invalid(format!(
        "unrecognized configuration parameter \"pgsluice.{name}\": the only pgsluice setting \
         is pgsluice.route ({ROUTE_VALUES})"
    ))
}

/// `SET pgsluice.<setting> {= | TO} value`, `rest` being what follows the name.
fn set_route(cx: &Cx, setting: &str, rest: &[Token]) -> Command {
    if !setting.eq_ignore_ascii_case("route") {
        return unknown_setting(setting);
    }
    let value = match rest {
        [assign, value] if assign.is(Kw::To) || assign.text(cx.sql) == "=" => {
            unquote(value.text(cx.sql))
        }
        _ => {
            let (Some(first), Some(last)) = (rest.first(), rest.last()) else {
                return Command::Invalid(format!(
                    "SET pgsluice.route needs a value ({ROUTE_VALUES})"
                ));
            };
            cx.sql.get(first.start..last.end).unwrap_or("")
        }
    };
    let mode = [
        ("primary", RouteMode::Primary),
        ("replica", RouteMode::Replica),
        ("auto", RouteMode::Auto),
        ("default", RouteMode::Auto),
    ]
    .into_iter()
    .find(|(name, _)| value.eq_ignore_ascii_case(name));
    match mode {
        Some((_, mode)) => Command::SetRoute(mode),
        None => Command::Invalid(format!(
            "invalid value for parameter \"pgsluice.route\": \"{value}\" ({ROUTE_VALUES})"
        )),
    }
}

fn show(cx: &Cx, t: &[Token]) -> Verdict {
    match pgsluice_setting(cx, &t[1..]) {
        Some(name) if name.eq_ignore_ascii_case("route") && t.len() == 4 => {
            Verdict::command(Command::ShowRoute)
        }
        Some(name) => Verdict::command(unknown_setting(name)),
        None => Verdict::read(Reason::ReadOnlyCommand),
    }
}

fn reset(cx: &Cx, t: &[Token]) -> Verdict {
    match pgsluice_setting(cx, &t[1..]) {
        Some(name) if name.eq_ignore_ascii_case("route") && t.len() == 4 => {
            Verdict::command(Command::SetRoute(RouteMode::Auto))
        }
        Some(name) => Verdict::command(unknown_setting(name)),
        None => Verdict::read(Reason::SessionCommand),
    }
}

/// `PREPARE name [(types)] AS stmt`: preparing runs nothing, but the verdict carries the
/// body's access so the router can remember it for `EXECUTE name`.
fn prepare(cx: &Cx, t: &[Token], depth: usize) -> Verdict {
    let mut level = 0usize;
    for (i, x) in t.iter().enumerate() {
        match x.tok {
            Tok::LParen => level += 1,
            Tok::RParen => level = level.saturating_sub(1),
            Tok::Word(Kw::As) if level == 0 => {
                let body = statement(cx, &t[i + 1..], depth + 1);
                return match body.access {
                    _ if body.tx != TxControl::None || body.reason == Reason::Empty => {
                        Verdict::write(Reason::Unparsable)
                    }
                    Access::Read => Verdict::read(Reason::SessionCommand),
                    Access::Write => Verdict::write(body.reason),
                };
            }
            _ => {}
        }
    }
    Verdict::write(Reason::Unparsable)
}

/// `COPY table [(cols)] FROM …` writes; `COPY table | (query) TO STDOUT` reads (if the query
/// does); `COPY … TO 'file' | PROGRAM` touches the server host, so it stays on the primary.
fn copy(cx: &Cx, t: &[Token], depth: usize) -> Verdict {
    let mut i = 1;
    if t.get(i).is_some_and(|x| x.is(Kw::Binary)) {
        i += 1;
    }
    let mut source = Verdict::read(Reason::ReadOnlyCommand);
    if t.get(i).is_some_and(|x| x.tok == Tok::LParen) {
        let Some(close) = matching_paren(t, i) else {
            return Verdict::write(Reason::Unparsable);
        };
        source = statement(cx, &t[i + 1..close], depth + 1);
        if matches!(source.reason, Reason::Unparsable | Reason::Empty) {
            return Verdict::write(Reason::Unparsable);
        }
        i = close + 1;
    } else {
        while t
            .get(i)
            .is_some_and(|x| matches!(x.tok, Tok::Word(Kw::None) | Tok::QuotedIdent | Tok::Dot))
        {
            i += 1;
        }
        if t.get(i).is_some_and(|x| x.tok == Tok::LParen) {
            match matching_paren(t, i) {
                Some(close) => i = close + 1,
                None => return Verdict::write(Reason::Unparsable),
            }
        }
        if t.get(i).is_some_and(|x| x.is(Kw::From)) {
            return Verdict::write(Reason::CopyFrom);
        }
    }
    if !t.get(i).is_some_and(|x| x.is(Kw::To)) {
        return Verdict::write(Reason::Unparsable);
    }
    if !t.get(i + 1).is_some_and(|x| x.is(Kw::Stdout)) {
        return Verdict::write(Reason::CopyFile);
    }
    match source.access {
        Access::Read => Verdict::read(Reason::ReadOnlyCommand),
        Access::Write => source,
    }
}

/// `DECLARE name … CURSOR … FOR query`: the query decides.
fn declare(cx: &Cx, t: &[Token], depth: usize) -> Verdict {
    let Some(cursor) = t.iter().position(|x| x.is(Kw::Cursor)) else {
        return Verdict::write(Reason::Unparsable);
    };
    let Some(offset) = t[cursor..].iter().position(|x| x.is(Kw::For)) else {
        return Verdict::write(Reason::Unparsable);
    };
    let body = &t[cursor + offset + 1..];
    let is_query = body.first().is_some_and(|x| {
        x.tok == Tok::LParen || matches!(x.kw(), Kw::Select | Kw::With | Kw::Values | Kw::Table)
    });
    if !is_query {
        return Verdict::write(Reason::Unparsable);
    }
    statement(cx, body, depth + 1)
}

#[cfg(test)]
mod tests;
