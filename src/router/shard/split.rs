//! Splitting a multi-row `INSERT … VALUES` into one INSERT per shard, by cutting the
//! client's own text (each row's text is kept byte for byte; only the list of rows
//! changes). Every part is parsed again and compared with the original rows it should hold.

use sqlparser::ast::{Insert, SetExpr, Statement};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::router::lexer::{self, Kw, Tok};

/// `INSERT … VALUES` cut into the text before the rows, each row, and the text after.
struct Rows<'a> {
    head: &'a str,
    rows: Vec<&'a str>,
    tail: &'a str,
}

fn cut(sql: &str) -> Option<Rows<'_>> {
    let mut tokens = Vec::new();
    lexer::tokenize(sql, &mut tokens).ok()?;
    let mut depth = 0usize;
    let mut values = None;
    for (i, t) in tokens.iter().enumerate() {
        match t.tok {
            Tok::LParen => depth += 1,
            Tok::RParen => depth = depth.saturating_sub(1),
            Tok::Word(Kw::Values) if depth == 0 => {
                values = Some(i);
                break;
            }
            _ => {}
        }
    }
    let values = values?;
    let mut rows = Vec::new();
    let mut i = values + 1;
    let mut last_end;
    loop {
        let open = tokens.get(i)?;
        if open.tok != Tok::LParen {
            return None;
        }
        let mut depth = 0usize;
        let mut close = None;
        for (j, t) in tokens.iter().enumerate().skip(i) {
            match t.tok {
                Tok::LParen => depth += 1,
                Tok::RParen => {
                    depth -= 1;
                    if depth == 0 {
                        close = Some(j);
                        break;
                    }
                }
                _ => {}
            }
        }
        let close = close?;
        rows.push(sql.get(open.start..tokens[close].end)?);
        last_end = tokens[close].end;
        i = close + 1;
        if tokens.get(i).is_some_and(|t| t.tok == Tok::Comma) {
            i += 1;
        } else {
            break;
        }
    }
    // The tail runs to the end of the statement (without a final `;`).
    let end = tokens[i..]
        .iter()
        .take_while(|t| t.tok != Tok::Semicolon)
        .last()
        .map_or(last_end, |t| t.end);
    Some(Rows {
        head: sql.get(..tokens[values].end)?,
        rows,
        tail: sql.get(last_end..end)?,
    })
}

/// One INSERT per shard: `row_shards[i]` is the shard of row `i` of `original`.
pub(super) fn split(
    sql: &str,
    original: &Insert,
    row_shards: &[usize],
) -> Option<Vec<(usize, String)>> {
    let rows = cut(sql)?;
    if rows.rows.len() != row_shards.len() {
        return None;
    }
    let original_rows = match original.source.as_deref().map(|q| q.body.as_ref()) {
        Some(SetExpr::Values(v)) => &v.rows,
        _ => return None,
    };
    let mut shards: Vec<usize> = row_shards.to_vec();
    shards.sort_unstable();
    shards.dedup();
    let mut parts = Vec::with_capacity(shards.len());
    for shard in shards {
        let mine: Vec<usize> = (0..row_shards.len())
            .filter(|&i| row_shards[i] == shard)
            .collect();
        let mut text = String::with_capacity(sql.len());
        text.push_str(rows.head);
        text.push(' ');
        for (n, &i) in mine.iter().enumerate() {
            if n > 0 {
                text.push_str(", ");
            }
            text.push_str(rows.rows[i]);
        }
        text.push_str(rows.tail);
        // Check the part: the same INSERT with exactly these rows.
        let parsed = Parser::parse_sql(&PostgreSqlDialect {}, &text).ok()?;
        let [Statement::Insert(part)] = parsed.as_slice() else {
            return None;
        };
        let part_rows = match part.source.as_deref().map(|q| q.body.as_ref()) {
            Some(SetExpr::Values(v)) => &v.rows,
            _ => return None,
        };
        let same = part.table == original.table
            && part.columns == original.columns
            && part.on == original.on
            && part.returning == original.returning
            && part_rows.len() == mine.len()
            && mine
                .iter()
                .zip(part_rows)
                .all(|(&i, row)| row.content == original_rows[i].content);
        if !same {
            return None;
        }
        parts.push((shard, text));
    }
    Some(parts)
}
