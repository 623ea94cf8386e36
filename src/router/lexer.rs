//! A lexical tokenizer for PostgreSQL statement text, just precise enough for routing.
//!
//! It knows where strings, quoted identifiers, dollar quotes and comments begin and end, so
//! that nothing inside them is ever mistaken for a keyword, and it tags the few keywords the
//! classifier looks at. It does not build a syntax tree. Token boundaries always fall on ASCII
//! bytes, so every token's span is a valid `&str` slice of the input.
//!
//! Assumes `standard_conforming_strings = on` (the default since PostgreSQL 9.1). A plain
//! `'…'` string whose end would move if backslashes were escapes is reported as
//! [`LexError::AmbiguousBackslash`], so a server running with the old setting cannot see a
//! statement boundary that the classifier did not.

use super::Hint;

/// What kind of token; words carry the keyword they spell (or [`Kw::None`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tok {
    /// An unquoted identifier or keyword.
    Word(Kw),
    /// `"…"` or `U&"…"`.
    QuotedIdent,
    /// `'…'`, `E'…'`, `B'…'`, `X'…'`, `N'…'`, `U&'…'` or `$tag$…$tag$`.
    String,
    Number,
    /// `$1`, a bound parameter.
    Param,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Semicolon,
    Dot,
    Colon,
    DoubleColon,
    /// A run of operator characters (`=`, `<>`, `||`, `->>` …).
    Op,
    /// A character PostgreSQL does not accept outside strings (`\`, `{`, `}` …).
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token {
    pub tok: Tok,
    pub start: usize,
    pub end: usize,
}

impl Token {
    /// The keyword this token spells; [`Kw::None`] for anything that is not a keyword word.
    pub fn kw(&self) -> Kw {
        match self.tok {
            Tok::Word(kw) => kw,
            _ => Kw::None,
        }
    }

    pub fn is(&self, kw: Kw) -> bool {
        self.tok == Tok::Word(kw)
    }

    pub fn text<'a>(&self, sql: &'a str) -> &'a str {
        sql.get(self.start..self.end).unwrap_or("")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LexError {
    UnterminatedString,
    UnterminatedQuotedIdent,
    UnterminatedComment,
    UnterminatedDollarQuote,
    AmbiguousBackslash,
}

macro_rules! keywords {
    ($($name:ident = $text:literal,)*) => {
        /// The keywords the classifier cares about.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum Kw { None, $($name,)* }

        fn lookup(lower: &[u8]) -> Kw {
            match lower {
                $($text => Kw::$name,)*
                _ => Kw::None,
            }
        }
    };
}

keywords! {
    Abort = b"abort", Alter = b"alter", Analyse = b"analyse", Analyze = b"analyze", As = b"as",
    Atomic = b"atomic", Begin = b"begin", Binary = b"binary", Call = b"call", Case = b"case",
    Characteristics = b"characteristics", Checkpoint = b"checkpoint", Close = b"close",
    Cluster = b"cluster", Comment = b"comment", Commit = b"commit", Copy = b"copy",
    Create = b"create", Cursor = b"cursor", Deallocate = b"deallocate", Declare = b"declare",
    Default = b"default", Delete = b"delete", Discard = b"discard", Do = b"do", Drop = b"drop",
    End = b"end", Execute = b"execute", Explain = b"explain", Fetch = b"fetch", For = b"for",
    From = b"from", Grant = b"grant", Import = b"import", Insert = b"insert", Into = b"into",
    Key = b"key", Listen = b"listen", Load = b"load", Local = b"local", Lock = b"lock",
    Materialized = b"materialized", Merge = b"merge", Move = b"move", No = b"no", Not = b"not",
    Notify = b"notify", Only = b"only", Prepare = b"prepare", Prepared = b"prepared",
    Read = b"read", Reassign = b"reassign", Refresh = b"refresh", Reindex = b"reindex",
    Release = b"release", Reset = b"reset", Revoke = b"revoke", Rollback = b"rollback",
    Savepoint = b"savepoint", Security = b"security", Select = b"select", Serializable = b"serializable",
    Session = b"session", Set = b"set", Share = b"share", Show = b"show", Snapshot = b"snapshot",
    Start = b"start", Stdout = b"stdout", Table = b"table", Tablesample = b"tablesample",
    To = b"to", Transaction = b"transaction", Truncate = b"truncate", Unlisten = b"unlisten",
    Update = b"update", Vacuum = b"vacuum", Values = b"values", Verbose = b"verbose",
    With = b"with", Work = b"work", Write = b"write",
}

/// The keyword an unquoted word spells, compared case-insensitively.
fn keyword(word: &[u8]) -> Kw {
    const LONGEST: usize = 16;
    if word.len() > LONGEST {
        return Kw::None;
    }
    let mut buf = [0u8; LONGEST];
    for (dst, src) in buf.iter_mut().zip(word) {
        *dst = src.to_ascii_lowercase();
    }
    lookup(&buf[..word.len()])
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_char(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

fn is_op_char(c: u8) -> bool {
    matches!(
        c,
        b'+' | b'-'
            | b'*'
            | b'/'
            | b'<'
            | b'>'
            | b'='
            | b'~'
            | b'!'
            | b'@'
            | b'#'
            | b'%'
            | b'^'
            | b'&'
            | b'|'
            | b'`'
            | b'?'
    )
}

/// Tokenize `sql` into `out` (cleared first). Comments and whitespace produce no tokens.
pub(crate) fn tokenize(sql: &str, out: &mut Vec<Token>) -> Result<(), LexError> {
    out.clear();
    let b = sql.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        let next = b.get(i + 1).copied();
        let tok = match c {
            _ if is_space(c) => {
                i += 1;
                continue;
            }
            b'-' if next == Some(b'-') => {
                i = skip_line_comment(b, i);
                continue;
            }
            b'/' if next == Some(b'*') => {
                i = skip_block_comment(b, i)?;
                continue;
            }
            b'\'' => {
                i = standard_string(b, i + 1)?;
                Tok::String
            }
            b'"' => {
                i = quoted_ident(b, i + 1)?;
                Tok::QuotedIdent
            }
            b'$' => match next {
                Some(d) if d.is_ascii_digit() => {
                    i += 1;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                    Tok::Param
                }
                _ => match dollar_quote(sql, i)? {
                    Some(end) => {
                        i = end;
                        Tok::String
                    }
                    None => {
                        i += 1;
                        Tok::Other
                    }
                },
            },
            b'0'..=b'9' => {
                i = number(b, i);
                Tok::Number
            }
            b'.' if next.is_some_and(|d| d.is_ascii_digit()) => {
                i = number(b, i);
                Tok::Number
            }
            b'(' | b')' | b'[' | b']' | b',' | b';' | b'.' => {
                i += 1;
                match c {
                    b'(' => Tok::LParen,
                    b')' => Tok::RParen,
                    b'[' => Tok::LBracket,
                    b']' => Tok::RBracket,
                    b',' => Tok::Comma,
                    b';' => Tok::Semicolon,
                    _ => Tok::Dot,
                }
            }
            b':' => {
                if next == Some(b':') {
                    i += 2;
                    Tok::DoubleColon
                } else if next == Some(b'=') {
                    i += 2;
                    Tok::Op
                } else {
                    i += 1;
                    Tok::Colon
                }
            }
            _ if is_op_char(c) => {
                i += 1;
                while i < b.len()
                    && is_op_char(b[i])
                    && !(b[i] == b'-' && b.get(i + 1) == Some(&b'-'))
                    && !(b[i] == b'/' && b.get(i + 1) == Some(&b'*'))
                {
                    i += 1;
                }
                Tok::Op
            }
            _ if is_ident_start(c) => {
                // String and identifier prefixes: E'…', B'…', X'…', N'…', U&'…', U&"…".
                match (c.to_ascii_lowercase(), next) {
                    (b'e', Some(b'\'')) => {
                        i = escape_string(b, i + 2)?;
                        Tok::String
                    }
                    (b'b' | b'x' | b'n', Some(b'\'')) => {
                        i = standard_string(b, i + 2)?;
                        Tok::String
                    }
                    (b'u', Some(b'&')) if b.get(i + 2) == Some(&b'\'') => {
                        i = standard_string(b, i + 3)?;
                        Tok::String
                    }
                    (b'u', Some(b'&')) if b.get(i + 2) == Some(&b'"') => {
                        i = quoted_ident(b, i + 3)?;
                        Tok::QuotedIdent
                    }
                    _ => {
                        i += 1;
                        while i < b.len() && is_ident_char(b[i]) {
                            i += 1;
                        }
                        Tok::Word(keyword(&b[start..i]))
                    }
                }
            }
            _ => {
                i += 1;
                Tok::Other
            }
        };
        out.push(Token { tok, start, end: i });
    }
    Ok(())
}

/// From the first `-` of `--`: the index just past the end of the line.
fn skip_line_comment(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i] != b'\n' && b[i] != b'\r' {
        i += 1;
    }
    i
}

/// From the `/` of `/*`: the index just past the matching `*/` (comments nest).
fn skip_block_comment(b: &[u8], mut i: usize) -> Result<usize, LexError> {
    let mut depth = 0usize;
    while i + 1 < b.len() {
        if b[i] == b'/' && b[i + 1] == b'*' {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b[i + 1] == b'/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Ok(i);
            }
        } else {
            i += 1;
        }
    }
    Err(LexError::UnterminatedComment)
}

/// From just after the opening quote of a standard string: the index just past its end.
fn standard_string(b: &[u8], from: usize) -> Result<usize, LexError> {
    let mut i = from;
    let mut backslash = false;
    while i < b.len() {
        match b[i] {
            b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => {
                let end = i + 1;
                // With standard_conforming_strings = off the server would read backslashes
                // as escapes; refuse strings whose extent depends on that setting.
                if backslash && escape_string(b, from) != Ok(end) {
                    return Err(LexError::AmbiguousBackslash);
                }
                return Ok(end);
            }
            b'\\' => {
                backslash = true;
                i += 1;
            }
            _ => i += 1,
        }
    }
    Err(LexError::UnterminatedString)
}

/// From just after the opening quote of an `E'…'` string: the index just past its end.
fn escape_string(b: &[u8], from: usize) -> Result<usize, LexError> {
    let mut i = from;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err(LexError::UnterminatedString)
}

/// From just after the opening `"`: the index just past the closing one.
fn quoted_ident(b: &[u8], from: usize) -> Result<usize, LexError> {
    let mut i = from;
    while i < b.len() {
        if b[i] == b'"' {
            if b.get(i + 1) == Some(&b'"') {
                i += 2;
                continue;
            }
            return Ok(i + 1);
        }
        i += 1;
    }
    Err(LexError::UnterminatedQuotedIdent)
}

/// At a `$` that is not a parameter: `Some(end)` of a `$tag$…$tag$` string, or `None` when
/// the `$` does not open one.
fn dollar_quote(sql: &str, at: usize) -> Result<Option<usize>, LexError> {
    let b = sql.as_bytes();
    let mut i = at + 1;
    if i < b.len() && b[i] != b'$' {
        if !is_ident_start(b[i]) {
            return Ok(None);
        }
        while i < b.len() && b[i] != b'$' && (is_ident_start(b[i]) || b[i].is_ascii_digit()) {
            i += 1;
        }
    }
    if b.get(i) != Some(&b'$') {
        return Ok(None);
    }
    let body = i + 1;
    let delimiter = sql.get(at..body).ok_or(LexError::UnterminatedDollarQuote)?;
    let rest = sql.get(body..).ok_or(LexError::UnterminatedDollarQuote)?;
    match rest.find(delimiter) {
        Some(offset) => Ok(Some(body + offset + delimiter.len())),
        None => Err(LexError::UnterminatedDollarQuote),
    }
}

/// From the first digit (or a leading `.`): the index just past a numeric literal. Letters
/// after the number start a new token, as in PostgreSQL 15 (`1into` is `1 into`).
fn number(b: &[u8], mut i: usize) -> usize {
    let radix_digit: Option<fn(u8) -> bool> = match (b.get(i), b.get(i + 1)) {
        (Some(b'0'), Some(b'x' | b'X')) => Some(|c: u8| c.is_ascii_hexdigit()),
        (Some(b'0'), Some(b'o' | b'O')) => Some(|c: u8| (b'0'..=b'7').contains(&c)),
        (Some(b'0'), Some(b'b' | b'B')) => Some(|c: u8| c == b'0' || c == b'1'),
        _ => None,
    };
    if let Some(is_digit) = radix_digit {
        if b.get(i + 2).is_some_and(|&c| is_digit(c)) {
            i += 2;
            while i < b.len() && (is_digit(b[i]) || b[i] == b'_') {
                i += 1;
            }
            return i;
        }
    }
    let digits = |mut i: usize| {
        while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'_') {
            i += 1;
        }
        i
    };
    i = digits(i);
    if b.get(i) == Some(&b'.') && b.get(i + 1) != Some(&b'.') {
        i = digits(i + 1);
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
        if b.get(i + 1 + sign).is_some_and(|c| c.is_ascii_digit()) {
            i = digits(i + 1 + sign);
        }
    }
    i
}

/// The routing hint in the comments that open `sql`: the first `/* pgsluice: primary */` or
/// `/* pgsluice: replica */` before any token (case-insensitive, any whitespace).
pub(crate) fn leading_hint(sql: &str) -> Option<Hint> {
    leading_pgsluice_comment(sql, |value| {
        if value.eq_ignore_ascii_case("primary") {
            Some(Hint::Primary)
        } else if value.eq_ignore_ascii_case("replica") {
            Some(Hint::Replica)
        } else {
            None
        }
    })
}

/// The one hint syntax: block comments before the first token whose body is
/// `pgsluice: <value>` (`pgsluice` case-insensitive, whitespace anywhere around the colon).
/// `read` gets each such value, trimmed, in order; the first it accepts is returned. Other
/// comments are skipped; a token ends the search.
pub(crate) fn leading_pgsluice_comment<T>(
    sql: &str,
    mut read: impl FnMut(&str) -> Option<T>,
) -> Option<T> {
    let b = sql.as_bytes();
    let mut i = 0;
    loop {
        while i < b.len() && is_space(b[i]) {
            i += 1;
        }
        match (b.get(i), b.get(i + 1)) {
            (Some(b'-'), Some(b'-')) => i = skip_line_comment(b, i),
            (Some(b'/'), Some(b'*')) => {
                let end = skip_block_comment(b, i).ok()?;
                let body = sql.get(i + 2..end - 2)?;
                if let Some(found) = pgsluice_value(body).and_then(&mut read) {
                    return Some(found);
                }
                i = end;
            }
            _ => return None,
        }
    }
}

/// `pgsluice: value` / `PGSLUICE : value` alone in a comment body: the value, trimmed.
fn pgsluice_value(body: &str) -> Option<&str> {
    let trim = |c: char| c.is_ascii() && is_space(c as u8);
    let (name, value) = body.split_once(':')?;
    if !name.trim_matches(trim).eq_ignore_ascii_case("pgsluice") {
        return None;
    }
    Some(value.trim_matches(trim))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(sql: &str) -> Result<Vec<(Tok, &str)>, LexError> {
        let mut out = Vec::new();
        tokenize(sql, &mut out)?;
        Ok(out.iter().map(|t| (t.tok, t.text(sql))).collect())
    }

    fn kinds(sql: &str) -> Vec<Tok> {
        toks(sql)
            .expect("lexes")
            .into_iter()
            .map(|(t, _)| t)
            .collect()
    }

    #[test]
    fn keywords_are_case_insensitive_and_others_are_plain_words() {
        assert_eq!(
            kinds("SeLeCt x"),
            [Tok::Word(Kw::Select), Tok::Word(Kw::None)]
        );
        assert_eq!(kinds("characteristics"), [Tok::Word(Kw::Characteristics)]);
        assert_eq!(kinds("selectx"), [Tok::Word(Kw::None)]);
    }

    #[test]
    fn comments_vanish_and_nest() {
        assert_eq!(
            kinds("select /* a /* b */ delete */ 1 -- drop\n"),
            [Tok::Word(Kw::Select), Tok::Number]
        );
        assert_eq!(
            kinds("a--b\rdelete"),
            [Tok::Word(Kw::None), Tok::Word(Kw::Delete)]
        );
        assert_eq!(kinds("1*/*c*/2"), [Tok::Number, Tok::Op, Tok::Number]);
    }

    #[test]
    fn unterminated_things_are_errors() {
        assert_eq!(toks("select 'abc"), Err(LexError::UnterminatedString));
        assert_eq!(toks("select E'ab\\'"), Err(LexError::UnterminatedString));
        assert_eq!(toks("select \"abc"), Err(LexError::UnterminatedQuotedIdent));
        assert_eq!(
            toks("select /* /* */ 1"),
            Err(LexError::UnterminatedComment)
        );
        assert_eq!(
            toks("select $a$ x $b$"),
            Err(LexError::UnterminatedDollarQuote)
        );
        assert_eq!(toks("select $$ x"), Err(LexError::UnterminatedDollarQuote));
    }

    #[test]
    fn strings_double_quotes_and_escapes() {
        assert_eq!(
            toks("'it''s' x").expect("lexes"),
            [(Tok::String, "'it''s'"), (Tok::Word(Kw::None), "x")]
        );
        assert_eq!(
            toks(r"E'\'' x").expect("lexes"),
            [(Tok::String, r"E'\''"), (Tok::Word(Kw::None), "x")]
        );
        assert_eq!(
            toks(r"e'a\\' b").expect("lexes"),
            [(Tok::String, r"e'a\\'"), (Tok::Word(Kw::None), "b")]
        );
        assert_eq!(
            toks("U&'d\\0061t' N'x' B'01' X'ff'").expect("lexes").len(),
            4
        );
        // Backslashes that do not move the end of a standard string are fine.
        assert_eq!(kinds(r"'a\b'"), [Tok::String]);
        assert_eq!(kinds(r"'a\\'"), [Tok::String]);
        assert_eq!(
            toks(r"'x\''; delete from t; --'"),
            Err(LexError::AmbiguousBackslash)
        );
    }

    #[test]
    fn quoted_identifiers_are_not_keywords() {
        assert_eq!(
            toks(r#""update" "a""b" U&"x""#).expect("lexes"),
            [
                (Tok::QuotedIdent, r#""update""#),
                (Tok::QuotedIdent, r#""a""b""#),
                (Tok::QuotedIdent, r#"U&"x""#)
            ]
        );
    }

    #[test]
    fn dollar_quotes_and_parameters() {
        assert_eq!(
            toks("$$ delete; $$ $1 $tag$ $$ ; $tag$ a$b").expect("lexes"),
            [
                (Tok::String, "$$ delete; $$"),
                (Tok::Param, "$1"),
                (Tok::String, "$tag$ $$ ; $tag$"),
                (Tok::Word(Kw::None), "a$b"),
            ]
        );
        assert_eq!(kinds("$1x"), [Tok::Param, Tok::Word(Kw::None)]);
        assert_eq!(kinds("$ x"), [Tok::Other, Tok::Word(Kw::None)]);
        assert_eq!(kinds("$é$ x $é$"), [Tok::String]);
    }

    #[test]
    fn numbers_stop_before_letters() {
        assert_eq!(
            toks("1into 1.5e-3 .5 0x1F 1_000 1..2").expect("lexes"),
            [
                (Tok::Number, "1"),
                (Tok::Word(Kw::Into), "into"),
                (Tok::Number, "1.5e-3"),
                (Tok::Number, ".5"),
                (Tok::Number, "0x1F"),
                (Tok::Number, "1_000"),
                (Tok::Number, "1"),
                (Tok::Dot, "."),
                (Tok::Number, ".2"),
            ]
        );
    }

    #[test]
    fn punctuation_and_operators() {
        assert_eq!(
            kinds("a::int[1:2] <> b; c := ->>"),
            [
                Tok::Word(Kw::None),
                Tok::DoubleColon,
                Tok::Word(Kw::None),
                Tok::LBracket,
                Tok::Number,
                Tok::Colon,
                Tok::Number,
                Tok::RBracket,
                Tok::Op,
                Tok::Word(Kw::None),
                Tok::Semicolon,
                Tok::Word(Kw::None),
                Tok::Op,
                Tok::Op,
            ]
        );
        assert_eq!(kinds("\\ {"), [Tok::Other, Tok::Other]);
    }

    #[test]
    fn non_ascii_identifiers_slice_cleanly() {
        assert_eq!(
            toks("sélect ñ").expect("lexes"),
            [(Tok::Word(Kw::None), "sélect"), (Tok::Word(Kw::None), "ñ")]
        );
    }

    #[test]
    fn hints_come_only_from_leading_comments() {
        assert_eq!(
            leading_hint("/* pgsluice: primary */ select 1"),
            Some(Hint::Primary)
        );
        assert_eq!(
            leading_hint("-- app\n /* trace */ /*PGSLUICE :  Replica\n*/select 1"),
            Some(Hint::Replica)
        );
        assert_eq!(leading_hint("select 1 /* pgsluice: primary */"), None);
        assert_eq!(leading_hint("/* pgsluice: nowhere */ select 1"), None);
        assert_eq!(leading_hint("/* pgsluice: primary"), None);
        assert_eq!(leading_hint(""), None);
    }
}
