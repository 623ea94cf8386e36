//! Classifier cost per statement: uncached for typical OLTP statements, and a cache hit.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use pgsluice::router::{ClassCache, FunctionCatalog, classify};

const STATEMENTS: &[(&str, &str)] = &[
    (
        "point_select",
        "SELECT id, name, email FROM users WHERE id = $1",
    ),
    (
        "join",
        "SELECT u.id, u.name, o.id, o.total FROM users u JOIN orders o ON o.user_id = u.id \
         WHERE u.id = $1 AND o.created_at > $2 ORDER BY o.created_at DESC LIMIT 20",
    ),
    (
        "insert",
        "INSERT INTO orders (user_id, total, created_at) VALUES ($1, $2, now()) RETURNING id",
    ),
    ("update", "UPDATE users SET last_seen = now() WHERE id = $1"),
    (
        "cte",
        "WITH recent AS (SELECT user_id, count(*) AS n FROM orders WHERE created_at > $1 \
         GROUP BY user_id) SELECT u.name, r.n FROM users u JOIN recent r ON r.user_id = u.id",
    ),
    (
        "select_now",
        "SELECT id, status FROM sessions WHERE expires_at > now() AND user_id = $1",
    ),
    (
        "locking",
        "SELECT id FROM jobs WHERE state = 'new' ORDER BY id LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED",
    ),
    ("begin", "BEGIN READ ONLY"),
    // The one shape that reaches sqlparser: a DML keyword used as a column name.
    (
        "parser_fallback",
        "SELECT update, id FROM audit WHERE id = $1",
    ),
];

fn catalog() -> FunctionCatalog {
    let volatile = [
        "random",
        "nextval",
        "setval",
        "clock_timestamp",
        "my_writer",
    ];
    let allow: Vec<String> = FunctionCatalog::DEFAULT_ALLOW
        .iter()
        .map(|s| s.to_string())
        .collect();
    FunctionCatalog::from_catalog(volatile.map(String::from), &allow)
}

fn uncached(c: &mut Criterion) {
    let functions = catalog();
    let mut group = c.benchmark_group("classify_uncached");
    for (name, sql) in STATEMENTS {
        group.bench_function(*name, |b| b.iter(|| classify(black_box(sql), &functions)));
    }
    group.finish();
}

fn cached(c: &mut Criterion) {
    let functions = catalog();
    let cache = ClassCache::new(1024);
    for (_, sql) in STATEMENTS {
        cache.classify(sql, &functions);
    }
    let mut group = c.benchmark_group("classify_cached");
    for (name, sql) in STATEMENTS
        .iter()
        .filter(|(n, _)| *n == "point_select" || *n == "join")
    {
        group.bench_function(*name, |b| {
            b.iter(|| cache.classify(black_box(sql), &functions))
        });
    }
    // Simple-protocol clients inline their values: each text is new, its
    // shape (the cache key) is not.
    let texts: Vec<String> = (0..1024)
        .map(|aid| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"))
        .collect();
    let mut next = texts.iter().cycle();
    group.bench_function("new_literals", |b| {
        b.iter(|| {
            let sql = next.next().map_or("", String::as_str);
            cache.classify(black_box(sql), &functions)
        })
    });
    group.finish();
}

criterion_group!(benches, uncached, cached);
criterion_main!(benches);
