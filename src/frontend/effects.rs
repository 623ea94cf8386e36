//! What a client's SQL text may do to the session state of the server that
//! runs it, decided lexically so the plain transaction-mode path pays only
//! a byte scan.
//!
//! Two things matter in transaction and statement mode, where the next
//! request may run on another server:
//! - session-level parameter changes (`SET`, `RESET`, `DISCARD`,
//!   `set_config`): pgsluice captures the server's resulting session
//!   settings after the request, so they follow the client (see
//!   `params.rs`);
//! - features whose state lives in the server process beyond the
//!   transaction (LISTEN, session advisory locks, WITH HOLD cursors,
//!   temporary tables): the client is pinned to its server, or refused
//!   (`general.session_features`).
//!
//! The scan is conservative: it may report an effect that does not happen
//! (an extra round trip to check), never miss one that the lexer can see.
//! Text that does not lex is treated as changing parameters.

use crate::router::lexer::{self, Kw, Tok, Token};

/// A feature needing the same server beyond one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    Listen,
    AdvisoryLock,
    HoldCursor,
    TempTable,
}

impl Feature {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Listen => "LISTEN",
            Self::AdvisoryLock => "session-level advisory locks",
            Self::HoldCursor => "cursors WITH HOLD",
            Self::TempTable => "temporary tables that outlive a transaction",
        }
    }
}

/// An SQL-level prepared statement command, in text order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlPrepared {
    /// `PREPARE name … AS …`, with the statement's own text (to replay it
    /// on another server).
    Prepare { name: String, text: String },
    /// `EXECUTE name` (also inside EXPLAIN or CREATE TABLE AS).
    Execute(String),
    /// `DEALLOCATE [PREPARE] name`.
    Deallocate(String),
    /// `DEALLOCATE [PREPARE] ALL`.
    DeallocateAll,
}

impl SqlPrepared {
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Prepare { name, .. } | Self::Execute(name) | Self::Deallocate(name) => Some(name),
            Self::DeallocateAll => None,
        }
    }
}

/// What one Query or Parse text may do.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Effects {
    /// A session-level parameter may change.
    pub params: bool,
    /// Parameter names given to SET/RESET (custom `a.b` names included),
    /// lower-cased unless quoted.
    pub names: Vec<String>,
    /// A session-only feature is used.
    pub feature: Option<Feature>,
    /// SQL-level PREPARE / EXECUTE / DEALLOCATE, in order.
    pub sql: Vec<SqlPrepared>,
}

impl Effects {
    pub fn is_none(&self) -> bool {
        !self.params && self.feature.is_none() && self.sql.is_empty()
    }
}

/// Statements that matter when they come first (`EXPLAIN EXECUTE`).
const FIRST_WORDS: &[&[u8]] = &[
    b"execute",
    b"explain",
    b"set",
    b"reset",
    b"discard",
    b"listen",
    b"declare",
    b"create",
    b"prepare",
    b"deallocate",
];

/// Every word that matters, for texts of several statements.
const EVERYWHERE: &[&[u8]] = &[
    b"set",
    b"discard",
    b"listen",
    b"declare",
    b"create",
    b"prepare",
    b"deallocate",
    b"execute",
    b"advisory",
    b"temp",
];

static ANYWHERE_FINDERS: std::sync::OnceLock<Vec<memchr::memmem::Finder<'static>>> =
    std::sync::OnceLock::new();
static EVERYWHERE_FINDERS: std::sync::OnceLock<Vec<memchr::memmem::Finder<'static>>> =
    std::sync::OnceLock::new();

/// Words that matter anywhere in a statement: function names and
/// `INTO TEMP`. (`CREATE TABLE … AS EXECUTE` starts with CREATE.)
const ANYWHERE: &[&[u8]] = &[b"set_config", b"advisory", b"temp"];

/// False when the text surely changes nothing we track. One statement
/// (the common case) is judged by its first word plus a few needles, so
/// `UPDATE … SET` costs no lexing; several statements, or a leading
/// comment, by every needle.
fn may_matter(text: &[u8]) -> bool {
    let trimmed = text
        .iter()
        .rposition(|&b| !(b == b';' || b.is_ascii_whitespace()))
        .map_or(&text[..0], |end| &text[..=end]);
    let start = trimmed
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(trimmed.len());
    let body = &trimmed[start..];
    let single = !body.contains(&b';') && !matches!(body.first(), Some(b'/' | b'-' | b'('));
    if single {
        let end = body
            .iter()
            .position(|b| !b.is_ascii_alphabetic())
            .unwrap_or(body.len());
        let first = &body[..end];
        FIRST_WORDS.iter().any(|w| first.eq_ignore_ascii_case(w))
            || contains_any(body, finders(&ANYWHERE_FINDERS, ANYWHERE))
    } else {
        contains_any(body, finders(&EVERYWHERE_FINDERS, EVERYWHERE))
    }
}

/// Whether `text` contains any of `needles` (lower-case; matched ASCII
/// case-insensitively): the text is lower-cased into a stack buffer (in
/// overlapping chunks) and searched with SIMD substring search.
fn contains_any(text: &[u8], needles: &[memchr::memmem::Finder<'static>]) -> bool {
    const CHUNK: usize = 512;
    let longest = needles.iter().map(|n| n.needle().len()).max().unwrap_or(0);
    let mut buf = [0u8; CHUNK];
    let mut start = 0;
    while start < text.len() {
        let end = (start + CHUNK).min(text.len());
        let lower = &mut buf[..end - start];
        for (d, s) in lower.iter_mut().zip(&text[start..end]) {
            *d = s.to_ascii_lowercase();
        }
        if needles.iter().any(|n| n.find(lower).is_some()) {
            return true;
        }
        if end == text.len() {
            break;
        }
        start = end - longest.min(end - start);
    }
    false
}

/// Substring finders for `words`, built once.
fn finders(
    cell: &'static std::sync::OnceLock<Vec<memchr::memmem::Finder<'static>>>,
    words: &'static [&'static [u8]],
) -> &'static [memchr::memmem::Finder<'static>] {
    cell.get_or_init(|| {
        words
            .iter()
            .map(|w| memchr::memmem::Finder::new(*w))
            .collect()
    })
}

/// Scans a Query or Parse text.
pub fn scan(text: &[u8]) -> Effects {
    if !may_matter(text) {
        return Effects::default();
    }
    lex_scan(text)
}

/// How a failed implicit transaction running `text` can be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replan {
    /// Not safe to resend: several statements, transaction control (the
    /// failure may not have undone everything before it), or unlexable.
    No,
    /// One statement that is not transaction control.
    Yes,
    /// One `EXECUTE` of an SQL-level prepared statement.
    Execute,
}

/// Decides [`Replan`] for a Query or Parse text (lexes it: call only off
/// the per-query path, or once per statement text).
pub fn replan(text: &[u8]) -> Replan {
    let Ok(sql) = std::str::from_utf8(text) else {
        return Replan::No;
    };
    let mut tokens = Vec::new();
    if lexer::tokenize(sql, &mut tokens).is_err() {
        return Replan::No;
    }
    let mut statements = tokens
        .split(|t| t.tok == Tok::Semicolon)
        .filter(|s| !s.is_empty());
    let (Some(statement), None) = (statements.next(), statements.next()) else {
        return Replan::No;
    };
    match statement[0].kw() {
        Kw::Begin
        | Kw::Start
        | Kw::Commit
        | Kw::End
        | Kw::Rollback
        | Kw::Abort
        | Kw::Savepoint
        | Kw::Release
        | Kw::Prepare => Replan::No,
        Kw::Execute => Replan::Execute,
        _ => Replan::Yes,
    }
}

/// The scan proper, without the prefilter.
fn lex_scan(text: &[u8]) -> Effects {
    let Ok(sql) = std::str::from_utf8(text) else {
        return Effects {
            params: true,
            ..Effects::default()
        };
    };
    let mut tokens = Vec::new();
    if lexer::tokenize(sql, &mut tokens).is_err() {
        return Effects {
            params: true,
            ..Effects::default()
        };
    }
    let mut fx = Effects::default();
    for stmt in tokens.split(|t| t.tok == Tok::Semicolon) {
        statement(sql, stmt, &mut fx);
    }
    fx
}

fn word_is(sql: &str, t: Option<&Token>, word: &str) -> bool {
    t.is_some_and(|t| matches!(t.tok, Tok::Word(_)) && t.text(sql).eq_ignore_ascii_case(word))
}

fn statement(sql: &str, st: &[Token], fx: &mut Effects) {
    let Some(first) = st.first() else {
        return;
    };
    sql_prepared(sql, st, fx);
    match first.kw() {
        Kw::Set => {
            let mut i = 1;
            if st.get(1).is_some_and(|t| t.is(Kw::Local))
                || st.get(1).is_some_and(|t| t.is(Kw::Transaction))
                || word_is(sql, st.get(1), "constraints")
            {
                return;
            }
            if st.get(1).is_some_and(|t| t.is(Kw::Session)) {
                i = 2;
            }
            fx.params = true;
            if let Some(name) = setting_name(sql, &st[i.min(st.len())..]) {
                fx.names.push(name);
            }
        }
        Kw::Reset => {
            fx.params = true;
            if let Some(name) = setting_name(sql, &st[1..]) {
                if name != "all" {
                    fx.names.push(name);
                }
            }
        }
        Kw::Discard => fx.params = true,
        Kw::Listen => fx.feature = fx.feature.or(Some(Feature::Listen)),
        Kw::Declare
            if st
                .windows(2)
                .any(|w| w[0].is(Kw::With) && word_is(sql, Some(&w[1]), "hold")) =>
        {
            fx.feature = fx.feature.or(Some(Feature::HoldCursor));
        }
        Kw::Create => {
            let temp = st[1..st.len().min(3)]
                .iter()
                .any(|t| word_is(sql, Some(t), "temp") || word_is(sql, Some(t), "temporary"));
            if temp && !on_commit_drop(sql, st) {
                fx.feature = fx.feature.or(Some(Feature::TempTable));
            }
        }
        _ => {}
    }
    for (i, t) in st.iter().enumerate() {
        if !matches!(t.tok, Tok::Word(_)) {
            continue;
        }
        let w = t.text(sql);
        if w.eq_ignore_ascii_case("set_config") {
            fx.params = true;
        } else if starts_with_ci(w, "pg_advisory_lock") || starts_with_ci(w, "pg_try_advisory_lock")
        {
            fx.feature = fx.feature.or(Some(Feature::AdvisoryLock));
        } else if t.is(Kw::Into)
            && (word_is(sql, st.get(i + 1), "temp") || word_is(sql, st.get(i + 1), "temporary"))
        {
            fx.feature = fx.feature.or(Some(Feature::TempTable));
        }
    }
}

fn sql_prepared(sql: &str, st: &[Token], fx: &mut Effects) {
    match st[0].kw() {
        Kw::Prepare if !st.get(1).is_some_and(|t| t.is(Kw::Transaction)) => {
            if let (Some(name), Some(last)) = (setting_part(sql, st.get(1)), st.last()) {
                let text = sql.get(st[0].start..last.end).unwrap_or("").to_owned();
                fx.sql.push(SqlPrepared::Prepare { name, text });
            }
            return;
        }
        Kw::Deallocate => {
            let at = if st.get(1).is_some_and(|t| t.is(Kw::Prepare)) {
                2
            } else {
                1
            };
            match setting_part(sql, st.get(at)) {
                Some(n) if n == "all" && matches!(st[at].tok, Tok::Word(_)) => {
                    fx.sql.push(SqlPrepared::DeallocateAll)
                }
                Some(n) => fx.sql.push(SqlPrepared::Deallocate(n)),
                None => {}
            }
            return;
        }
        _ => {}
    }
    for w in st.windows(2) {
        if w[0].is(Kw::Execute) {
            if let Some(name) = setting_part(sql, Some(&w[1])) {
                // GRANT EXECUTE ON FUNCTION …, CREATE TRIGGER … EXECUTE FUNCTION
                if !matches!(name.as_str(), "on" | "function" | "procedure") {
                    fx.sql.push(SqlPrepared::Execute(name));
                }
            }
        }
    }
}

/// An identifier: unquoted lower-cased, quoted as written.
fn setting_part(sql: &str, t: Option<&Token>) -> Option<String> {
    let t = t?;
    match t.tok {
        Tok::Word(_) => Some(t.text(sql).to_ascii_lowercase()),
        Tok::QuotedIdent => {
            let inner = t.text(sql).strip_prefix('"')?.strip_suffix('"')?;
            Some(inner.replace("\"\"", "\""))
        }
        _ => None,
    }
}

fn starts_with_ci(s: &str, prefix: &str) -> bool {
    s.get(..prefix.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
}

fn on_commit_drop(sql: &str, st: &[Token]) -> bool {
    st.windows(3)
        .any(|w| word_is(sql, Some(&w[0]), "on") && w[1].is(Kw::Commit) && w[2].is(Kw::Drop))
}

/// `name` or `a.b` (quoted parts allowed) at the start of `st`.
fn setting_name(sql: &str, st: &[Token]) -> Option<String> {
    let mut name = setting_part(sql, st.first())?;
    if st.get(1).is_some_and(|t| t.tok == Tok::Dot) {
        name.push('.');
        name.push_str(&setting_part(sql, st.get(2))?);
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fx(s: &str) -> Effects {
        scan(s.as_bytes())
    }

    #[test]
    fn plain_statements_cost_no_lexing() {
        assert!(!may_matter(b"SELECT * FROM t WHERE id = $1"));
        assert!(!may_matter(b"UPDATE t SET a = 1 WHERE id = 2;"));
        assert!(may_matter(b" set x = 1;"));
        assert!(may_matter(b"/* c */ SET x = 1"));
        assert!(may_matter(b"SELECT 1; SET x = 1"));
        assert!(may_matter(b"select pg_advisory_lock(1)"));
        assert!(may_matter(b"EXECUTE q(1)"));
        assert!(may_matter(b"explain execute q"));
        assert!(may_matter(b"SELECT 1 INTO TEMP t"));
        assert!(fx("SELECT 1").is_none());
        assert!(fx("UPDATE t SET a = 1").is_none(), "SET clause of UPDATE");
        assert!(fx("SELECT 'SET x = 1'").is_none(), "inside a string");
    }

    /// The prefilter never hides what the lexer sees.
    #[test]
    fn prefilter_agrees_with_the_lexer() {
        for sql in [
            "SET x = 1",
            "  reset ALL ;",
            "DISCARD ALL",
            "select set_config('a', 'b', false)",
            "SELECT PG_ADVISORY_LOCK(1)",
            "select pg_try_advisory_lock_shared(1)",
            "LISTEN c",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "CREATE TEMPORARY TABLE t (a int)",
            "SELECT * INTO TEMP t FROM x",
            "PREPARE p AS SELECT 1",
            "EXECUTE p",
            "EXPLAIN ANALYZE EXECUTE p",
            "CREATE TABLE t AS EXECUTE p",
            "DEALLOCATE p",
            "/* hint */ SET x = 1",
            "-- c\nLISTEN x",
            "(SELECT pg_advisory_lock(1))",
            "SELECT 1; SET x = 2",
            "BEGIN; LISTEN x; COMMIT",
            "UPDATE t SET a = 1",
            "SELECT 1",
            "INSERT INTO t VALUES (1)",
        ] {
            assert_eq!(scan(sql.as_bytes()), lex_scan(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn session_sets_are_seen_with_their_names() {
        let f = fx("set search_path = a, b");
        assert!(f.params);
        assert_eq!(f.names, ["search_path"]);
        let f = fx("BEGIN; SET SESSION my.\"Opt\" TO 'x'; COMMIT");
        assert_eq!(f.names, ["my.Opt"]);
        assert!(fx("RESET ALL").params && fx("RESET ALL").names.is_empty());
        assert_eq!(fx("reset work_mem").names, ["work_mem"]);
        assert!(fx("DISCARD ALL").params);
        assert!(fx("SELECT set_config('a.b', 'x', false)").params);
        assert!(!fx("SET LOCAL work_mem = '1MB'").params);
        assert!(!fx("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").params);
        assert!(fx("SET 'x").params, "unlexable text is assumed to SET");
    }

    #[test]
    fn sql_level_prepared_statements_are_seen() {
        let f = fx("prepare Q1 (int) AS SELECT $1; EXECUTE q1(2); deallocate prepare \"Q1\"");
        assert_eq!(
            f.sql,
            [
                SqlPrepared::Prepare {
                    name: "q1".into(),
                    text: "prepare Q1 (int) AS SELECT $1".into()
                },
                SqlPrepared::Execute("q1".into()),
                SqlPrepared::Deallocate("Q1".into()),
            ]
        );
        assert_eq!(fx("DEALLOCATE ALL").sql, [SqlPrepared::DeallocateAll]);
        assert_eq!(
            fx("EXPLAIN EXECUTE p").sql,
            [SqlPrepared::Execute("p".into())]
        );
        assert!(fx("GRANT EXECUTE ON FUNCTION f() TO x").sql.is_empty());
        assert!(
            fx("CREATE TRIGGER t AFTER INSERT ON x EXECUTE FUNCTION f()")
                .sql
                .is_empty()
        );
        assert!(fx("PREPARE TRANSACTION 'x'").sql.is_empty());
    }

    #[test]
    fn session_features_are_seen() {
        assert_eq!(fx("LISTEN chan").feature, Some(Feature::Listen));
        assert_eq!(
            fx("select pg_advisory_lock(1)").feature,
            Some(Feature::AdvisoryLock)
        );
        assert_eq!(fx("select pg_advisory_xact_lock(1)").feature, None);
        assert_eq!(
            fx("DECLARE c CURSOR WITH HOLD FOR SELECT 1").feature,
            Some(Feature::HoldCursor)
        );
        assert_eq!(fx("DECLARE c CURSOR FOR SELECT 1").feature, None);
        assert_eq!(
            fx("create temp table t (a int)").feature,
            Some(Feature::TempTable)
        );
        assert_eq!(
            fx("CREATE GLOBAL TEMPORARY TABLE t (a int)").feature,
            Some(Feature::TempTable)
        );
        assert_eq!(
            fx("CREATE TEMP TABLE t (a int) ON COMMIT DROP").feature,
            None
        );
        assert_eq!(fx("SELECT 1 INTO TEMP t").feature, Some(Feature::TempTable));
    }
}
