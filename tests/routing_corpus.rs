//! Runs every statement of `tests/routing_corpus.txt` through the classifier and fails with
//! a list of every mismatch. The format is described at the top of the corpus file.
//!
//! The function catalog is PostgreSQL 15's own volatile functions
//! (`tests/pg15_volatile_functions.txt`) plus `my_writer`, with the default allow-list.

use pgsluice::router::{Access, FunctionCatalog, classify};

struct Case {
    line: usize,
    access: Access,
    reason: Option<String>,
    sql: String,
}

fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('\\') => out.push('\\'),
            Some(other) => panic!("unknown escape \\{other} in {text:?}"),
            None => panic!("trailing backslash in {text:?}"),
        }
    }
    out
}

fn corpus() -> Vec<Case> {
    let text = include_str!("routing_corpus.txt");
    let mut cases = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (expect, sql) = line
            .split_once('\t')
            .unwrap_or_else(|| panic!("line {}: no tab: {line:?}", index + 1));
        let (access, reason) = match expect.split_once(':') {
            Some((access, reason)) => (access, Some(reason.to_string())),
            None => (expect, None),
        };
        let access = match access {
            "read" => Access::Read,
            "write" => Access::Write,
            other => panic!(
                "line {}: expectation {other:?} is not read or write",
                index + 1
            ),
        };
        cases.push(Case {
            line: index + 1,
            access,
            reason,
            sql: unescape(sql),
        });
    }
    cases
}

fn catalog() -> FunctionCatalog {
    let volatile = include_str!("pg15_volatile_functions.txt")
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .chain(["my_writer".to_string()]);
    let allow: Vec<String> = FunctionCatalog::DEFAULT_ALLOW
        .iter()
        .map(|s| s.to_string())
        .collect();
    FunctionCatalog::from_catalog(volatile, &allow)
}

#[test]
fn every_corpus_statement_routes_as_expected() {
    let functions = catalog();
    let cases = corpus();
    assert!(
        cases.len() >= 300,
        "corpus has only {} statements",
        cases.len()
    );
    let mut mismatches = Vec::new();
    for case in &cases {
        let class = classify(&case.sql, &functions);
        let reason_ok = case
            .reason
            .as_deref()
            .is_none_or(|r| r == class.reason.as_str());
        if class.access != case.access || !reason_ok {
            mismatches.push(format!(
                "line {}: expected {:?}{} got {:?} ({}): {:?}",
                case.line,
                case.access,
                case.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default(),
                class.access,
                class.reason.as_str(),
                case.sql
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} corpus statements misrouted:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
}

/// Not a check on pgsluice: lists the corpus statements sqlparser cannot parse, which is why
/// the classifier only asks it about ambiguous statements. Run with `--nocapture` to see them.
#[test]
fn sqlparser_coverage_of_the_corpus() {
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;
    let cases = corpus();
    let failed: Vec<_> = cases
        .iter()
        .filter(|c| Parser::parse_sql(&PostgreSqlDialect {}, &c.sql).is_err())
        .collect();
    println!(
        "sqlparser failed on {} of {} corpus statements:",
        failed.len(),
        cases.len()
    );
    for case in failed {
        println!("  line {}: {:?}", case.line, case.sql);
    }
}
