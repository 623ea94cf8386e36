//! Shard placement cost per statement: the full `place` (a sqlparser parse and the walk),
//! and the per-execution half alone (`Analysis::place` with bound parameters), which is
//! what a session pays when it caches the analysis per statement text.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use pgsluice::router::shard::{
    BoundParams, KeyType, KeyValue, ShardingRules, analyze, place, shard_of,
};

const STATEMENTS: &[(&str, &str)] = &[
    (
        "point_select",
        "SELECT id, total, status FROM orders WHERE user_id = $1 AND id = $2",
    ),
    (
        "join",
        "SELECT u.name, o.id, o.total FROM users u JOIN orders o ON o.user_id = u.user_id \
         WHERE u.user_id = $1 AND o.created_at > $2 ORDER BY o.created_at DESC LIMIT 20",
    ),
    (
        "insert",
        "INSERT INTO orders (user_id, total, created_at) VALUES ($1, $2, now()) RETURNING id",
    ),
    (
        "update",
        "UPDATE orders SET status = 'paid' WHERE user_id = $1 AND id = $2",
    ),
    (
        "fan_out_aggregate",
        "SELECT status, count(*), sum(total) FROM orders WHERE created_at > $1 \
         GROUP BY status ORDER BY status",
    ),
    ("literal_select", "SELECT * FROM orders WHERE user_id = 42"),
];

fn rules() -> ShardingRules {
    ShardingRules::new(KeyType::BigInt, 4)
}

fn params() -> BoundParams<'static> {
    BoundParams {
        formats: vec![0],
        values: vec![Some(b"12345"), Some(b"7")],
        types: vec![],
    }
}

fn full_place(c: &mut Criterion) {
    let rules = rules();
    let params = params();
    let mut group = c.benchmark_group("shard_place");
    for (name, sql) in STATEMENTS {
        group.bench_function(*name, |b| {
            b.iter(|| place(black_box(sql), Some(&params), &rules))
        });
    }
    group.finish();
}

fn cached_analysis(c: &mut Criterion) {
    let rules = rules();
    let params = params();
    let mut group = c.benchmark_group("shard_place_cached");
    for (name, sql) in STATEMENTS {
        let analysis = analyze(sql, &rules);
        group.bench_function(*name, |b| {
            b.iter(|| analysis.place(black_box(Some(&params)), &rules))
        });
    }
    group.finish();
}

fn hash(c: &mut Criterion) {
    c.bench_function("shard_of_bigint", |b| {
        b.iter(|| shard_of(KeyType::BigInt, black_box(&KeyValue::Int(12345)), 4))
    });
    let text = KeyValue::Text("user-7f3a9c2e@example.com".to_string());
    c.bench_function("shard_of_text", |b| {
        b.iter(|| shard_of(KeyType::Text, black_box(&text), 4))
    });
}

criterion_group!(benches, full_place, cached_analysis, hash);
criterion_main!(benches);
