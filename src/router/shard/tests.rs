//! Placement of every supported statement shape and every refusal.

use super::*;

fn rules() -> ShardingRules {
    let mut r = ShardingRules::new(KeyType::BigInt, 4);
    r.unsharded_tables = vec!["countries".into(), "ref.currencies".into()];
    r
}

/// The shard of a bigint key.
fn s(k: i64) -> usize {
    shard_of(KeyType::BigInt, &KeyValue::Int(k), 4)
}

/// Two keys on different shards, and a third on the first one's shard.
fn keys_on_two_shards() -> (i64, i64, i64) {
    let a = 1;
    let b = (2..).find(|&k| s(k) != s(a)).unwrap_or(2);
    let c = (b + 1..).find(|&k| s(k) == s(a)).unwrap_or(3);
    (a, b, c)
}

fn p(sql: &str) -> Placement {
    place(sql, None, &rules())
}

fn p_with(sql: &str, r: &ShardingRules) -> Placement {
    place(sql, None, r)
}

#[track_caller]
fn shard(sql: &str) -> usize {
    match p(sql) {
        Placement::Shard { shard, .. } => shard,
        other => panic!("{sql}: expected one shard, got {other:?}"),
    }
}

#[track_caller]
fn assert_shard(sql: &str, want: usize) {
    assert_eq!(shard(sql), want, "{sql}");
}

#[track_caller]
fn reason(sql: &str) -> String {
    match p(sql) {
        Placement::Shard { reason, .. }
        | Placement::AnyShard { reason }
        | Placement::AllShards { reason, .. }
        | Placement::AllShardsWrite { reason }
        | Placement::Split { reason, .. } => reason,
        other => panic!("{sql}: {other:?}"),
    }
}

#[track_caller]
fn any(sql: &str) {
    assert!(
        matches!(p(sql), Placement::AnyShard { .. }),
        "{sql}: {:?}",
        p(sql)
    );
}

#[track_caller]
fn refused(sql: &str) -> (&'static str, String) {
    refused_with(sql, &rules())
}

#[track_caller]
fn refused_with(sql: &str, r: &ShardingRules) -> (&'static str, String) {
    match p_with(sql, r) {
        Placement::Refuse { code, message } => (code, message),
        other => panic!("{sql}: expected a refusal, got {other:?}"),
    }
}

/// Refused with 0A000 and a message containing every one of `words`.
#[track_caller]
fn refuses(sql: &str, words: &[&str]) {
    let (code, message) = refused(sql);
    assert_eq!(code, "0A000", "{sql}: {message}");
    for w in words {
        assert!(message.contains(w), "{sql}: {message:?} lacks {w:?}");
    }
}

#[track_caller]
fn fan_out(sql: &str) -> (MergePlan, Option<String>) {
    match p(sql) {
        Placement::AllShards {
            plan,
            per_shard_sql,
            ..
        } => (plan, per_shard_sql),
        other => panic!("{sql}: expected a fan-out, got {other:?}"),
    }
}

fn concat() -> MergePlan {
    MergePlan {
        order_by: vec![],
        limit: None,
        offset: None,
        columns: None,
    }
}

fn asc(column: usize) -> SortKey {
    SortKey {
        column,
        descending: false,
        nulls_first: false,
    }
}

fn desc(column: usize) -> SortKey {
    SortKey {
        column,
        descending: true,
        nulls_first: true,
    }
}

// ------------------------------------------------------------------ WHERE key = value

#[test]
fn key_equality_alone_and_anded() {
    assert_shard("SELECT * FROM orders WHERE user_id = 42", s(42));
    assert_eq!(
        reason("SELECT * FROM orders WHERE user_id = 42"),
        "user_id = 42"
    );
    assert_shard(
        "SELECT id FROM orders WHERE status = 'open' AND user_id = 7 AND total > 10",
        s(7),
    );
    assert_shard(
        "SELECT * FROM orders WHERE (user_id = 7 AND (id = 1))",
        s(7),
    );
    assert_shard("select * from orders where USER_ID = 9;", s(9));
    assert_shard("SELECT * FROM orders WHERE \"user_id\" = 9", s(9));
    // A quoted name that is not the key column.
    assert!(matches!(
        p("SELECT * FROM orders WHERE \"User_Id\" = 9"),
        Placement::AllShards { .. }
    ));
}

#[test]
fn qualified_reversed_and_cast_keys() {
    assert_shard("SELECT * FROM orders o WHERE o.user_id = 42", s(42));
    assert_shard("SELECT * FROM orders WHERE orders.user_id = 42", s(42));
    assert_shard(
        "SELECT * FROM public.orders WHERE public.orders.user_id = 42",
        s(42),
    );
    assert_shard("SELECT * FROM orders WHERE 42 = user_id", s(42));
    assert_shard("SELECT * FROM orders WHERE user_id = '42'", s(42));
    assert_shard("SELECT * FROM orders WHERE user_id = '42'::bigint", s(42));
    assert_shard(
        "SELECT * FROM orders WHERE user_id = CAST('42' AS int8)",
        s(42),
    );
    assert_shard("SELECT * FROM orders WHERE user_id = 42::integer", s(42));
    assert_shard("SELECT * FROM orders WHERE user_id = bigint '42'", s(42));
    assert_shard("SELECT * FROM orders WHERE user_id = -5", s(-5));
    assert_shard("SELECT * FROM orders WHERE user_id = $$42$$", s(42));
    assert_shard(
        "SELECT * FROM orders WHERE user_id = -9223372036854775808",
        s(i64::MIN),
    );
    // A cast of the column is not the column.
    assert!(matches!(
        p("SELECT * FROM orders WHERE user_id::text = '42'"),
        Placement::AllShards { .. }
    ));
    // A value PostgreSQL would reject is refused with its SQLSTATE.
    let (code, message) = refused("SELECT * FROM orders WHERE user_id = 'forty-two'");
    assert_eq!(code, "22P02");
    assert!(message.contains("type bigint"), "{message}");
    let (code, _) = refused("SELECT * FROM orders WHERE user_id = '99999'::smallint");
    assert_eq!(code, "22003");
}

#[test]
fn in_lists() {
    let (a, b, c) = keys_on_two_shards();
    let one = format!("SELECT * FROM orders WHERE user_id IN ({a}, {c})");
    assert_shard(&one, s(a));
    assert_eq!(
        reason(&one),
        format!("user_id IN (...) all on shard {}", s(a))
    );
    // Spanning shards: a read fans out, a write is refused.
    let (plan, _) = fan_out(&format!("SELECT * FROM orders WHERE user_id IN ({a}, {b})"));
    assert_eq!(plan, concat());
    refuses(
        &format!("UPDATE orders SET x = 1 WHERE user_id IN ({a}, {b})"),
        &["UPDATE on orders touches rows on shards", "several shards"],
    );
    refuses(
        &format!("DELETE FROM orders WHERE user_id IN ({a}, {b})"),
        &["DELETE on orders touches rows on shards"],
    );
    assert_shard(
        &format!("SELECT * FROM orders WHERE user_id = ANY (ARRAY[{a}, {c}])"),
        s(a),
    );
    assert!(matches!(
        p(&format!(
            "SELECT * FROM orders WHERE user_id = ANY (ARRAY[{a}, {b}])"
        )),
        Placement::AllShards { .. }
    ));
    let (va, vc) = (a.to_string(), c.to_string());
    let values = [Some(va.as_str()), Some(vc.as_str())];
    let params = text_params(&values, &[]);
    assert!(matches!(
        place_params("SELECT * FROM orders WHERE user_id IN ($1, $2)", &params),
        Placement::Shard { shard, .. } if shard == s(a)
    ));
    // NOT IN pins nothing.
    assert!(matches!(
        p(&format!("SELECT * FROM orders WHERE user_id NOT IN ({a})")),
        Placement::AllShards { .. }
    ));
    // Two conjuncts narrowing to one shard.
    assert_shard(
        &format!("SELECT * FROM orders WHERE user_id IN ({a}, {b}) AND user_id = {a}"),
        s(a),
    );
}

#[test]
fn or_and_not_are_not_single_shard() {
    let (a, b, c) = keys_on_two_shards();
    for sql in [
        format!("SELECT * FROM orders WHERE user_id = {a} OR user_id = {b}"),
        format!("SELECT * FROM orders WHERE user_id = {a} OR user_id = {c}"),
        format!("SELECT * FROM orders WHERE user_id = {a} OR x = 1"),
        format!("SELECT * FROM orders WHERE NOT (user_id = {a})"),
        format!("SELECT * FROM orders WHERE user_id <> {a}"),
        format!("SELECT * FROM orders WHERE user_id > {a}"),
    ] {
        assert!(
            matches!(p(&sql), Placement::AllShards { .. }),
            "{sql}: {:?}",
            p(&sql)
        );
    }
    refuses(
        &format!("DELETE FROM orders WHERE user_id = {a} OR user_id = {c}"),
        &["DELETE on orders without user_id in WHERE would touch every shard"],
    );
    // Contradictory keys: no shard holds a row; a read still fans out (and finds nothing).
    assert!(matches!(
        p(&format!(
            "SELECT * FROM orders WHERE user_id = {a} AND user_id = {b}"
        )),
        Placement::AllShards { .. }
    ));
}

// ------------------------------------------------------------------ joins and subqueries

#[test]
fn joins_on_the_key() {
    assert_shard(
        "SELECT * FROM orders o JOIN users u ON u.user_id = o.user_id WHERE o.user_id = 42",
        s(42),
    );
    assert_shard(
        "SELECT * FROM orders o, users u WHERE o.user_id = u.user_id AND u.user_id = 42",
        s(42),
    );
    assert_shard(
        "SELECT * FROM orders o JOIN users u ON true WHERE o.user_id = 42 AND u.user_id = 42",
        s(42),
    );
    assert_shard(
        "SELECT * FROM orders JOIN users USING (user_id) WHERE user_id = 42",
        s(42),
    );
    assert_shard(
        "SELECT * FROM orders o JOIN users u ON o.user_id = u.user_id \
         JOIN items i ON i.user_id = u.user_id AND i.order_id = o.id WHERE u.user_id = 42",
        s(42),
    );
    // Outer joins: the nullable side is pinned through ON, the preserved side by WHERE.
    assert_shard(
        "SELECT * FROM users u LEFT JOIN orders o ON o.user_id = u.user_id WHERE u.user_id = 42",
        s(42),
    );
    assert_shard(
        "SELECT * FROM orders o RIGHT JOIN users u ON o.user_id = u.user_id WHERE u.user_id = 42",
        s(42),
    );
    // ON of a LEFT JOIN does not pin the preserved side: joined on the key, it fans out.
    assert!(matches!(
        p(
            "SELECT u.id FROM users u LEFT JOIN orders o ON o.user_id = u.user_id AND u.user_id = 42"
        ),
        Placement::AllShards { .. }
    ));
    // Unsharded tables join freely.
    assert_shard(
        "SELECT * FROM orders o JOIN countries c ON c.id = o.country_id WHERE o.user_id = 42",
        s(42),
    );
    assert_shard(
        "SELECT * FROM orders o JOIN ref.currencies c ON c.code = o.currency WHERE o.user_id = 42",
        s(42),
    );
}

#[test]
fn joins_that_span_shards_are_refused() {
    // The second table is not joined on the key: its rows may be anywhere.
    refuses(
        "SELECT * FROM orders o JOIN items i ON i.order_id = o.id WHERE o.user_id = 42",
        &["not all joined on user_id", "orders", "items"],
    );
    // Each table on its own shard.
    let (a, b, _) = keys_on_two_shards();
    refuses(
        &format!("SELECT * FROM orders o, users u WHERE o.user_id = {a} AND u.user_id = {b}"),
        &["not all joined on user_id"],
    );
    // A full join pins nothing, but joined on the key it can fan out.
    assert!(matches!(
        p("SELECT o.id FROM orders o FULL JOIN users u ON o.user_id = u.user_id"),
        Placement::AllShards { .. }
    ));
}

#[test]
fn subqueries_and_ctes() {
    assert_shard(
        "SELECT * FROM users u WHERE u.user_id = 42 AND EXISTS \
         (SELECT 1 FROM orders o WHERE o.user_id = u.user_id)",
        s(42),
    );
    assert_shard(
        "SELECT * FROM users WHERE user_id = 42 AND id IN \
         (SELECT x FROM orders WHERE user_id = 42)",
        s(42),
    );
    assert_shard(
        "SELECT (SELECT count(*) FROM orders o WHERE o.user_id = u.user_id) FROM users u \
         WHERE u.user_id = 42",
        s(42),
    );
    assert_shard(
        "WITH o AS (SELECT * FROM orders WHERE user_id = 42) SELECT * FROM o",
        s(42),
    );
    assert_shard(
        "SELECT * FROM (SELECT * FROM orders WHERE user_id = 42) sub WHERE sub.total > 1",
        s(42),
    );
    // A pin inside a subquery says nothing about the outer table's rows.
    let (plan, _) = fan_out(
        "SELECT o.id FROM orders o WHERE NOT EXISTS \
         (SELECT 1 FROM users u WHERE u.user_id = o.user_id AND u.user_id = 42)",
    );
    assert_eq!(plan, concat());
    assert!(matches!(
        p("SELECT o.id FROM orders o WHERE EXISTS (SELECT 1 FROM users u WHERE o.user_id = 42)"),
        Placement::Refuse { .. }
    ));
    // A subquery on another sharded table without the key.
    refuses(
        "SELECT * FROM users WHERE user_id = 42 AND id IN (SELECT x FROM orders)",
        &["not all joined on user_id"],
    );
    // A subquery that alone reads the sharded tables cannot fan out.
    refuses(
        "SELECT * FROM countries WHERE id IN (SELECT country_id FROM orders)",
        &["subquery", "user_id"],
    );
    refuses("SELECT (SELECT count(*) FROM orders)", &["subquery"]);
    // Correlated on the key: each shard answers for its own users.
    let (plan, _) = fan_out(
        "SELECT u.id FROM users u WHERE EXISTS \
         (SELECT 1 FROM orders o WHERE o.user_id = u.user_id AND o.total > 100)",
    );
    assert_eq!(plan, concat());
    // A derived table that aggregates would be merged wrongly.
    refuses(
        "SELECT * FROM (SELECT count(*) AS n FROM orders) c",
        &["an aggregate"],
    );
    refuses(
        "WITH t AS (SELECT * FROM orders LIMIT 5) SELECT * FROM t",
        &["LIMIT"],
    );
    // A row-by-row derived table or CTE is fine.
    let (plan, _) = fan_out("WITH t AS (SELECT id FROM orders WHERE total > 5) SELECT id FROM t");
    assert_eq!(plan, concat());
    // A CTE name shadows a table of that name; a sharded table named like a later CTE is
    // still a table.
    any("WITH orders AS (SELECT 1 AS x) SELECT * FROM orders");
}

// ------------------------------------------------------------------ no sharded table

#[test]
fn statements_without_sharded_tables_run_anywhere() {
    for sql in [
        "SELECT 1",
        "SELECT now()",
        "select version(), current_setting('TimeZone')",
        "SET statement_timeout = 1000",
        "SET LOCAL search_path TO public",
        "SHOW server_version",
        "BEGIN",
        "START TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        "COMMIT",
        "ROLLBACK",
        "SAVEPOINT a",
        "RELEASE SAVEPOINT a",
        "ROLLBACK TO SAVEPOINT a",
        "DISCARD ALL",
        "RESET ALL",
        "SELECT * FROM countries",
        "SELECT * FROM countries c JOIN ref.currencies r ON r.code = c.currency",
        "SELECT * FROM pg_catalog.pg_class",
        "SELECT * FROM pg_stat_activity",
        "SELECT * FROM information_schema.tables",
        "",
        "  -- only a comment\n",
    ] {
        any(sql);
    }
    // `currencies` is unsharded only in schema `ref`.
    assert!(matches!(
        p("SELECT * FROM currencies"),
        Placement::AllShards { .. }
    ));
}

#[test]
fn writes_to_unsharded_tables() {
    refuses(
        "UPDATE countries SET name = 'x' WHERE id = 1",
        &["UPDATE of unsharded table countries", "unsharded_writes"],
    );
    let mut r = rules();
    r.unsharded_writes = UnshardedWrites::AllShards;
    for sql in [
        "UPDATE countries SET name = 'x' WHERE id = 1",
        "INSERT INTO countries (id, name) VALUES (1, 'x')",
        "DELETE FROM ref.currencies WHERE code = 'EUR'",
    ] {
        assert!(
            matches!(p_with(sql, &r), Placement::AllShardsWrite { .. }),
            "{sql}"
        );
    }
    // A replicated table filled from a sharded one would differ per shard.
    let (code, message) = refused_with(
        "INSERT INTO countries (id) SELECT country_id FROM orders WHERE user_id = 1",
        &r,
    );
    assert_eq!(code, "0A000");
    assert!(
        message.contains("copies on the shards would differ"),
        "{message}"
    );
}

// ------------------------------------------------------------------ INSERT

#[test]
fn insert_rows() {
    assert_shard("INSERT INTO orders (user_id, total) VALUES (42, 10)", s(42));
    assert_eq!(
        reason("INSERT INTO orders (user_id, total) VALUES (42, 10)"),
        "INSERT user_id = 42"
    );
    assert_shard(
        "INSERT INTO orders (total, user_id) VALUES (10, '42')",
        s(42),
    );
    assert_shard(
        "INSERT INTO orders AS o (id, user_id) VALUES (1, 42) \
         ON CONFLICT (id) DO UPDATE SET total = o.total + 1 RETURNING id",
        s(42),
    );
    assert_shard(
        "INSERT INTO orders (id, user_id) VALUES (1, 42) ON CONFLICT DO NOTHING",
        s(42),
    );
    // A NULL key goes where PostgreSQL's hash partitioning puts it: remainder 0.
    assert_shard("INSERT INTO orders (id, user_id) VALUES (1, NULL)", 0);
    let (a, _, c) = keys_on_two_shards();
    let sql = format!("INSERT INTO orders (user_id, total) VALUES ({a}, 1), ({c}, 2)");
    assert_shard(&sql, s(a));
    assert_eq!(
        reason(&sql),
        format!("INSERT of 2 rows, all on shard {}", s(a))
    );
    // A subquery in a row on the same shard.
    assert_shard(
        "INSERT INTO orders (user_id, total) VALUES \
         (42, (SELECT max(total) FROM orders WHERE user_id = 42))",
        s(42),
    );
}

#[test]
fn insert_refusals() {
    refuses(
        "INSERT INTO orders VALUES (1, 42)",
        &[
            "without a column list",
            "name the columns, including user_id",
        ],
    );
    refuses(
        "INSERT INTO orders (id, total) VALUES (1, 2)",
        &["without user_id in its column list"],
    );
    refuses(
        "INSERT INTO orders (user_id, total) SELECT user_id, 1 FROM users WHERE user_id = 42",
        &["INSERT … SELECT into sharded table orders"],
    );
    refuses(
        "INSERT INTO orders (user_id, total) VALUES (40 + 2, 1)",
        &["row 1", "not a literal or a parameter"],
    );
    refuses(
        "INSERT INTO orders (user_id, total) VALUES (DEFAULT, 1)",
        &["row 1", "not a literal or a parameter"],
    );
    refuses("INSERT INTO orders DEFAULT VALUES", &["column list"]);
    refuses(
        "INSERT INTO orders (id, user_id) VALUES (1, 42) \
         ON CONFLICT (id) DO UPDATE SET user_id = excluded.user_id",
        &["ON CONFLICT DO UPDATE SET user_id", "another shard"],
    );
    let (code, _) = refused("INSERT INTO orders (user_id) VALUES ('x')");
    assert_eq!(code, "22P02");
}

#[test]
fn multi_row_insert_spanning_shards() {
    let (a, b, c) = keys_on_two_shards();
    let sql = format!(
        "/* app */ INSERT INTO orders (user_id, note) VALUES ({a}, 'x, (y)'),\n ({b}, 'b'), \
         ({c}, $$c$$) RETURNING id;"
    );
    refuses(&sql, &["multi_shard_insert", "rows for shards"]);
    let mut r = rules();
    r.multi_shard_insert = MultiShardInsert::Split;
    let Placement::Split { parts, reason } = p_with(&sql, &r) else {
        panic!("{:?}", p_with(&sql, &r));
    };
    assert!(reason.contains("3 rows"), "{reason}");
    let mut want = vec![
        (
            s(a),
            format!(
                "/* app */ INSERT INTO orders (user_id, note) VALUES ({a}, 'x, (y)'), ({c}, \
                 $$c$$) RETURNING id"
            ),
        ),
        (
            s(b),
            format!("/* app */ INSERT INTO orders (user_id, note) VALUES ({b}, 'b') RETURNING id"),
        ),
    ];
    want.sort();
    assert_eq!(parts, want);
    // Bound parameters are never split.
    let params = BoundParams {
        formats: vec![],
        values: vec![
            Some(a.to_string().into_bytes().leak()),
            Some(b.to_string().into_bytes().leak()),
        ],
        types: vec![],
    };
    match place(
        "INSERT INTO orders (user_id) VALUES ($1), ($2)",
        Some(&params),
        &r,
    ) {
        Placement::Refuse { code, message } => {
            assert_eq!(code, "0A000");
            assert!(message.contains("bound parameters"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // In a multi-statement string it cannot be split either.
    let (_, message) = refused_with(&format!("SELECT 1; {sql}"), &r);
    assert!(message.contains("only statement"), "{message}");
}

// ------------------------------------------------------------------ UPDATE / DELETE

#[test]
fn updates_and_deletes() {
    assert_shard(
        "UPDATE orders SET total = 0 WHERE user_id = 42 AND id = 7",
        s(42),
    );
    assert_shard("UPDATE orders o SET total = 0 WHERE o.user_id = 42", s(42));
    assert_shard(
        "UPDATE orders o SET total = u.credit FROM users u \
         WHERE u.user_id = o.user_id AND o.user_id = 42",
        s(42),
    );
    assert_shard(
        "UPDATE orders SET total = 0 WHERE user_id = 42 RETURNING *",
        s(42),
    );
    assert_shard("DELETE FROM orders WHERE user_id = 42", s(42));
    assert_shard(
        "DELETE FROM orders o USING users u WHERE u.user_id = o.user_id AND u.user_id = 42",
        s(42),
    );
    assert_shard(
        "WITH d AS (DELETE FROM orders WHERE user_id = 42 RETURNING *) SELECT count(*) FROM d",
        s(42),
    );
    assert_shard(
        "SELECT * FROM orders WHERE user_id = 42 FOR UPDATE SKIP LOCKED",
        s(42),
    );
    // Lock strengths sqlparser does not know.
    assert_shard(
        "SELECT id FROM jobs WHERE user_id = 42 ORDER BY id LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED",
        s(42),
    );
    assert_shard(
        "SELECT * FROM orders o WHERE o.user_id = 42 FOR KEY SHARE OF o NOWAIT",
        s(42),
    );
}

#[test]
fn write_refusals() {
    refuses(
        "UPDATE orders SET total = 0 WHERE id = 7",
        &["UPDATE on orders without user_id in WHERE would touch every shard"],
    );
    refuses(
        "DELETE FROM orders",
        &["DELETE on orders without user_id in WHERE would touch every shard"],
    );
    refuses(
        "UPDATE orders SET user_id = 43 WHERE user_id = 42",
        &["sets user_id", "another shard"],
    );
    refuses(
        "UPDATE orders SET (total, user_id) = (1, 43) WHERE user_id = 42",
        &["sets user_id"],
    );
    refuses(
        "UPDATE orders SET total = 0 WHERE user_id = 42 AND id IN (SELECT order_id FROM items)",
        &["reads items without user_id"],
    );
    refuses(
        "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
        &["DELETE on orders without user_id"],
    );
    refuses(
        "SELECT * FROM orders FOR UPDATE",
        &["FOR UPDATE/SHARE", "every shard"],
    );
    refuses(
        "SELECT * FROM (SELECT * FROM orders FOR SHARE) o",
        &["FOR UPDATE/SHARE", "every shard"],
    );
    refuses(
        "SELECT id FROM jobs ORDER BY id LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED",
        &["FOR UPDATE/SHARE", "every shard"],
    );
    refuses(
        "MERGE INTO orders o USING users u ON o.id = u.id WHEN MATCHED THEN DELETE",
        &["MERGE"],
    );
}

// ------------------------------------------------------------------ fan-out reads

#[test]
fn fan_out_concatenation_order_and_limits() {
    assert_eq!(fan_out("SELECT * FROM orders").0, concat());
    assert_eq!(fan_out("SELECT * FROM orders WHERE total > 5").0, concat());
    let (plan, sql) = fan_out("SELECT id, total FROM orders ORDER BY total DESC, id");
    assert_eq!(plan.order_by, vec![desc(1), asc(0)]);
    assert_eq!(sql, None);
    let (plan, _) = fan_out(
        "SELECT o.id, o.total AS t FROM orders o ORDER BY t NULLS FIRST, 1 DESC NULLS LAST, o.id",
    );
    assert_eq!(
        plan.order_by,
        vec![
            SortKey {
                column: 1,
                descending: false,
                nulls_first: true
            },
            SortKey {
                column: 0,
                descending: true,
                nulls_first: false
            },
            asc(0),
        ]
    );
    let (plan, _) = fan_out("SELECT id, lower(name) FROM orders ORDER BY lower(name)");
    assert_eq!(plan.order_by, vec![asc(1)]);
    // Positions count a * too.
    let (plan, _) = fan_out("SELECT * FROM orders ORDER BY 2");
    assert_eq!(plan.order_by, vec![asc(1)]);
    let (plan, _) = fan_out("SELECT id, * FROM orders ORDER BY id");
    assert_eq!(plan.order_by, vec![asc(0)]);

    let (plan, sql) = fan_out("SELECT id FROM orders ORDER BY id LIMIT 10");
    assert_eq!((plan.limit, plan.offset, sql), (Some(10), None, None));
    let (plan, sql) = fan_out("SELECT id FROM orders ORDER BY id LIMIT 10 OFFSET 5;");
    assert_eq!((plan.limit, plan.offset), (Some(10), Some(5)));
    assert_eq!(
        sql.as_deref(),
        Some("SELECT id FROM orders ORDER BY id LIMIT 15")
    );
    let (plan, sql) = fan_out("SELECT id FROM orders ORDER BY id OFFSET 5 LIMIT 10");
    assert_eq!((plan.limit, plan.offset), (Some(10), Some(5)));
    assert_eq!(
        sql.as_deref(),
        Some("SELECT id FROM orders ORDER BY id LIMIT 15")
    );
    let (plan, sql) = fan_out("SELECT id FROM orders ORDER BY id OFFSET 5");
    assert_eq!((plan.limit, plan.offset), (None, Some(5)));
    assert_eq!(sql.as_deref(), Some("SELECT id FROM orders ORDER BY id"));
    let (plan, sql) = fan_out("SELECT id FROM orders ORDER BY id FETCH FIRST 3 ROWS ONLY");
    assert_eq!((plan.limit, sql), (Some(3), None));
    let (plan, sql) =
        fan_out("SELECT id FROM orders ORDER BY id OFFSET 2 ROWS FETCH NEXT 3 ROWS ONLY");
    assert_eq!((plan.limit, plan.offset), (Some(3), Some(2)));
    assert_eq!(
        sql.as_deref(),
        Some("SELECT id FROM orders ORDER BY id LIMIT 5")
    );
    let (plan, _) = fan_out("SELECT id FROM orders LIMIT NULL");
    assert_eq!(plan.limit, None);
    let (plan, sql) = fan_out("SELECT id FROM orders ORDER BY id LIMIT 10 OFFSET 0");
    assert_eq!((plan.limit, plan.offset, sql), (Some(10), None, None));
}

#[test]
fn fan_out_aggregates() {
    let (plan, sql) = fan_out("SELECT count(*) FROM orders");
    assert_eq!(plan.columns, Some(vec![MergeColumn::Count]));
    assert_eq!(sql, None);
    let (plan, _) = fan_out(
        "SELECT status, count(*), sum(total), min(created), max(created), count(note) \
         FROM orders WHERE total > 0 GROUP BY status ORDER BY status",
    );
    assert_eq!(
        plan.columns,
        Some(vec![
            MergeColumn::GroupKey,
            MergeColumn::Count,
            MergeColumn::Sum,
            MergeColumn::Min,
            MergeColumn::Max,
            MergeColumn::Count,
        ])
    );
    assert_eq!(plan.order_by, vec![asc(0)]);
    let (plan, _) = fan_out(
        "SELECT o.status AS st, date_trunc('day', created), count(*) AS n FROM orders o \
         GROUP BY 1, date_trunc('day', created) ORDER BY n DESC",
    );
    assert_eq!(
        plan.columns,
        Some(vec![
            MergeColumn::GroupKey,
            MergeColumn::GroupKey,
            MergeColumn::Count
        ])
    );
    assert_eq!(plan.order_by, vec![desc(2)]);
    let (plan, _) = fan_out("SELECT status FROM orders GROUP BY status");
    assert_eq!(plan.columns, Some(vec![MergeColumn::GroupKey]));
    let (plan, _) = fan_out("SELECT count(*) FILTER (WHERE total > 5) FROM orders");
    assert_eq!(plan.columns, Some(vec![MergeColumn::Count]));
    // An aggregating query's LIMIT applies to merged groups: shards return all groups.
    let (plan, sql) = fan_out(
        "SELECT status, count(*) FROM orders GROUP BY status ORDER BY 2 DESC LIMIT 3 OFFSET 1",
    );
    assert_eq!((plan.limit, plan.offset), (Some(3), Some(1)));
    assert_eq!(
        sql.as_deref(),
        Some("SELECT status, count(*) FROM orders GROUP BY status ORDER BY 2 DESC")
    );
}

#[test]
fn fan_out_refusals_name_the_reason() {
    let cases: &[(&str, &str)] = &[
        (
            "SELECT avg(total) FROM orders",
            "avg() across shards; select sum() and count()",
        ),
        ("SELECT DISTINCT status FROM orders", "SELECT DISTINCT"),
        (
            "SELECT DISTINCT ON (status) status FROM orders",
            "DISTINCT ON",
        ),
        (
            "SELECT status, count(*) FROM orders GROUP BY status HAVING count(*) > 1",
            "HAVING",
        ),
        (
            "SELECT id, row_number() OVER () FROM orders",
            "window functions",
        ),
        (
            "SELECT count(*) FROM orders GROUP BY status",
            "GROUP BY status",
        ),
        (
            "SELECT count(*) + 1 FROM orders",
            "an aggregate inside an expression",
        ),
        (
            "SELECT coalesce(sum(total), 0) FROM orders",
            "an aggregate inside an expression",
        ),
        (
            "SELECT count(DISTINCT status) FROM orders",
            "count(DISTINCT …)",
        ),
        ("SELECT string_agg(note, ',') FROM orders", "string_agg()"),
        (
            "SELECT status, count(*) FROM orders",
            "neither an aggregate nor in GROUP BY",
        ),
        (
            "SELECT * , count(*) FROM orders GROUP BY id",
            "SELECT * with aggregates",
        ),
        ("SELECT id FROM orders ORDER BY total", "ORDER BY total"),
        (
            "SELECT * FROM orders ORDER BY id",
            "not listed before any *",
        ),
        (
            "SELECT *, id FROM orders ORDER BY id",
            "not listed before any *",
        ),
        ("SELECT id FROM orders ORDER BY 3", "position 3"),
        (
            "SELECT id FROM orders UNION SELECT id FROM countries",
            "UNION",
        ),
        (
            "SELECT id FROM orders UNION ALL SELECT id FROM users",
            "not all joined on user_id",
        ),
        (
            "SELECT id FROM orders ORDER BY id LIMIT $1 OFFSET 5",
            "LIMIT $n with OFFSET",
        ),
        ("SELECT id FROM orders OFFSET $1", "OFFSET $n"),
        ("SELECT id FROM orders LIMIT 2 + 3", "LIMIT"),
        (
            "SELECT id FROM orders ORDER BY id FETCH FIRST 3 ROWS WITH TIES",
            "WITH TIES",
        ),
        (
            "SELECT status, count(*) FROM orders GROUP BY ROLLUP (status)",
            "ROLLUP",
        ),
        ("SELECT id FROM orders ORDER BY id USING <", "USING"),
    ];
    for (sql, words) in cases {
        refuses(sql, &[words]);
    }
}

// ------------------------------------------------------------------ several statements

#[test]
fn several_statements_in_one_query_string() {
    let (a, b, c) = keys_on_two_shards();
    assert_shard(
        &format!(
            "BEGIN; UPDATE orders SET x = 1 WHERE user_id = {a}; \
             INSERT INTO orders (user_id) VALUES ({c}); COMMIT"
        ),
        s(a),
    );
    refuses(
        &format!(
            "UPDATE orders SET x = 1 WHERE user_id = {a}; UPDATE orders SET x = 1 WHERE user_id = {b}"
        ),
        &["different shards", "send them separately"],
    );
    any("SET x = 1; SELECT 1; SHOW y");
    refuses("SET x = 1; SELECT count(*) FROM orders", &["every shard"]);
    refuses(
        "SELECT 1; UPDATE orders SET x = 1",
        &["without user_id in WHERE"],
    );
}

// ------------------------------------------------------------------ other statements

#[test]
fn explain_declare_and_commands() {
    assert_shard("EXPLAIN SELECT * FROM orders WHERE user_id = 42", s(42));
    assert_shard(
        "EXPLAIN (ANALYZE, BUFFERS) UPDATE orders SET x = 1 WHERE user_id = 42",
        s(42),
    );
    any("EXPLAIN SELECT 1");
    refuses(
        "EXPLAIN SELECT * FROM orders",
        &["EXPLAIN", "several shards"],
    );
    assert_shard(
        "DECLARE c CURSOR FOR SELECT * FROM orders WHERE user_id = 42",
        s(42),
    );
    refuses("DECLARE c CURSOR FOR SELECT * FROM orders", &["DECLARE"]);
    any("FETCH 10 FROM c");
    any("CLOSE c");
    refuses(
        "CREATE TABLE t (a int)",
        &["CREATE TABLE", "each shard directly"],
    );
    refuses("DROP TABLE orders", &["DROP TABLE"]);
    refuses("TRUNCATE orders", &["TRUNCATE"]);
    refuses("VACUUM orders", &["VACUUM"]);
    refuses("COPY orders FROM STDIN", &["COPY"]);
    refuses("PREPARE q AS SELECT 1", &["PREPARE/EXECUTE"]);
    refuses("EXECUTE q", &["PREPARE/EXECUTE"]);
    refuses("LISTEN chan", &["LISTEN/NOTIFY"]);
    refuses("CALL do_things()", &["CALL"]);
    refuses("LOCK TABLE orders", &["LOCK"]);
}

#[test]
fn unparsable_statements_ask_for_a_hint() {
    let (code, message) = refused("SELECT FROM WHERE (");
    assert_eq!(code, "0A000");
    assert!(
        message.contains("cannot parse") && message.contains("shard_key="),
        " {message}"
    );
}

// ------------------------------------------------------------------ hints

#[test]
fn hints() {
    assert_eq!(
        parse_hint("/* pgsluice: shard_key=42 */ SELECT 1"),
        Some(Hint::Key("42".into()))
    );
    assert_eq!(
        parse_hint("-- x\n/* other */ /*PGSLUICE : Shard_Key = 'o''b' */ SELECT 1"),
        Some(Hint::Key("o'b".into()))
    );
    assert_eq!(
        parse_hint("/* pgsluice: shard=2 */ SELECT 1"),
        Some(Hint::Shard(2))
    );
    assert_eq!(
        parse_hint("/* pgsluice: replica */ /* pgsluice: shard = 3 */ SELECT 1"),
        Some(Hint::Shard(3))
    );
    assert_eq!(parse_hint("SELECT 1 /* pgsluice: shard=2 */"), None);
    assert_eq!(parse_hint("/* pgsluice: shard=two */ SELECT 1"), None);
    // The routing hint still reads the same comments.
    assert_eq!(
        crate::router::lexer::leading_hint("/* pgsluice: shard=3 */ /* pgsluice: replica */ x"),
        Some(crate::router::Hint::Replica)
    );

    // A hint decides, even over a key in the statement and over text sqlparser rejects.
    assert_shard(
        "/* pgsluice: shard_key=42 */ SELECT * FROM orders WHERE user_id = 7",
        s(42),
    );
    assert_eq!(
        reason("/* pgsluice: shard_key=42 */ SELECT 1"),
        "hint shard_key=42"
    );
    assert_shard(
        "/* pgsluice: shard=3 */ SELECT * FROM orders FOR NO KEY UPDATE OF x",
        3,
    );
    assert_eq!(reason("/* pgsluice: shard=3 */ SELECT 1"), "hint shard=3");
    let (code, message) = refused("/* pgsluice: shard=4 */ SELECT 1");
    assert_eq!(code, "22023");
    assert!(message.contains("4 shards (0 to 3)"), "{message}");
    let (code, message) = refused("/* pgsluice: shard_key=abc */ SELECT 1");
    assert_eq!(code, "22P02");
    assert!(message.contains("type bigint"), "{message}");
}

// ------------------------------------------------------------------ bound parameters

fn text_params<'a>(values: &'a [Option<&'a str>], types: &[u32]) -> BoundParams<'a> {
    BoundParams {
        formats: vec![],
        values: values.iter().map(|v| v.map(str::as_bytes)).collect(),
        types: types.to_vec(),
    }
}

fn place_params(sql: &str, params: &BoundParams<'_>) -> Placement {
    place(sql, Some(params), &rules())
}

#[test]
fn text_and_binary_parameters() {
    let sql = "SELECT * FROM orders WHERE user_id = $1 AND id = $2";
    let params = text_params(&[Some("42"), Some("7")], &[]);
    assert_eq!(
        place_params(sql, &params),
        Placement::Shard {
            shard: s(42),
            reason: "user_id = 42 ($1)".into()
        }
    );
    // Binary int8, int4 (declared), and a text parameter cast in SQL.
    let eight = 42i64.to_be_bytes();
    let params = BoundParams {
        formats: vec![1],
        values: vec![Some(&eight[..])],
        types: vec![20],
    };
    assert!(
        matches!(place_params("SELECT * FROM orders WHERE user_id = $1", &params),
        Placement::Shard { shard, .. } if shard == s(42))
    );
    let four = 42i32.to_be_bytes();
    let params = BoundParams {
        formats: vec![1],
        values: vec![Some(&four[..])],
        types: vec![23],
    };
    assert!(
        matches!(place_params("DELETE FROM orders WHERE user_id = $1", &params),
        Placement::Shard { shard, .. } if shard == s(42))
    );
    let params = text_params(&[Some("42")], &[25]);
    assert!(
        matches!(place_params("SELECT * FROM orders WHERE user_id = $1::bigint", &params),
        Placement::Shard { shard, .. } if shard == s(42))
    );
    // Per-parameter formats.
    let params = BoundParams {
        formats: vec![0, 1],
        values: vec![Some(b"x"), Some(&eight[..])],
        types: vec![],
    };
    assert!(matches!(
        place_params("INSERT INTO orders (note, user_id) VALUES ($1, $2)", &params),
        Placement::Shard { shard, .. } if shard == s(42)
    ));
    // The same analysis placed with other parameters: no new parse.
    let analysis = analyze("SELECT * FROM orders WHERE user_id = $1", &rules());
    for k in [1i64, 2, 3, 99, -7] {
        let v = k.to_string();
        let values = [Some(v.as_str())];
        let params = text_params(&values, &[]);
        assert!(matches!(analysis.place(Some(&params), &rules()),
            Placement::Shard { shard, .. } if shard == s(k)));
    }
}

#[test]
fn parameters_that_pin_nothing_or_fail() {
    let sql = "SELECT * FROM orders WHERE user_id = $1";
    // NULL matches no row: the read is not pinned.
    let params = text_params(&[None], &[]);
    assert!(matches!(
        place_params(sql, &params),
        Placement::AllShards { .. }
    ));
    // A numeric parameter is compared as numeric: not read as a key.
    let params = text_params(&[Some("42")], &[1700]);
    assert!(matches!(
        place_params(sql, &params),
        Placement::AllShards { .. }
    ));
    let params = text_params(&[Some("abc")], &[]);
    let Placement::Refuse { code, message } = place_params(sql, &params) else {
        panic!()
    };
    assert_eq!(code, "22P02");
    assert!(message.contains("type bigint"), "{message}");
    let params = BoundParams {
        formats: vec![1],
        values: vec![Some(&[1, 2, 3][..])],
        types: vec![20],
    };
    let Placement::Refuse { code, message } = place_params(sql, &params) else {
        panic!()
    };
    assert_eq!(code, "22P03");
    assert!(message.contains("$1"), "{message}");
    let Placement::Refuse { code, .. } = place(sql, None, &rules()) else {
        panic!()
    };
    assert_eq!(code, "08P01");
    // An INSERT's NULL key parameter goes to remainder 0.
    let params = text_params(&[None], &[]);
    assert!(matches!(
        place_params("INSERT INTO orders (user_id) VALUES ($1)", &params),
        Placement::Shard { shard: 0, .. }
    ));
    let params = text_params(&[Some("5")], &[1700]);
    let Placement::Refuse { message, .. } =
        place_params("INSERT INTO orders (user_id) VALUES ($1)", &params)
    else {
        panic!()
    };
    assert!(
        message.contains("does not match the key column"),
        "{message}"
    );
}

#[test]
fn limit_parameter() {
    let params = text_params(&[Some("25")], &[]);
    let Placement::AllShards {
        plan,
        per_shard_sql,
        ..
    } = place_params("SELECT id FROM orders ORDER BY id LIMIT $1", &params)
    else {
        panic!()
    };
    assert_eq!((plan.limit, per_shard_sql), (Some(25), None));
    let params = text_params(&[Some("-1")], &[]);
    let Placement::Refuse { code, .. } =
        place_params("SELECT id FROM orders ORDER BY id LIMIT $1", &params)
    else {
        panic!()
    };
    assert_eq!(code, "2201W");
}

// ------------------------------------------------------------------ other key types

#[test]
fn text_uuid_and_integer_keys() {
    let mut r = ShardingRules::new(KeyType::Text, 4);
    r.key_column = "tenant".into();
    let t = |k: &str| shard_of(KeyType::Text, &KeyValue::Text(k.into()), 4);
    let at = |sql: &str, r: &ShardingRules| match place(sql, None, r) {
        Placement::Shard { shard, .. } => shard,
        other => panic!("{sql}: {other:?}"),
    };
    assert_eq!(
        at("SELECT * FROM docs WHERE tenant = 'acme'", &r),
        t("acme")
    );
    assert_eq!(
        at("SELECT * FROM docs WHERE tenant = 'o''brien'", &r),
        t("o'brien")
    );
    assert_eq!(
        at("SELECT * FROM docs WHERE tenant = 42::text", &r),
        t("42")
    );
    // An integer is not a text key (PostgreSQL would reject text = integer).
    assert!(matches!(
        place("SELECT * FROM docs WHERE tenant = 42", None, &r),
        Placement::AllShards { .. }
    ));
    // user_id is just another column here.
    assert!(matches!(
        place("SELECT * FROM docs WHERE user_id = 1", None, &r),
        Placement::AllShards { .. }
    ));

    let r = ShardingRules::new(KeyType::Uuid, 4);
    let u = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
    let want = shard_of(
        KeyType::Uuid,
        &KeyType::Uuid.parse_text(u).unwrap_or(KeyValue::Int(0)),
        4,
    );
    for form in [
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
        "'{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}'",
        "'a0eebc999c0b4ef8bb6d6bb9bd380a11'::uuid",
    ] {
        assert_eq!(
            at(&format!("SELECT * FROM t WHERE user_id = {form}"), &r),
            want,
            "{form}"
        );
    }
    let params = BoundParams {
        formats: vec![1],
        values: vec![Some(
            &[
                0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
                0x0a, 0x11,
            ][..],
        )],
        types: vec![2950],
    };
    assert!(matches!(
        place("SELECT * FROM t WHERE user_id = $1", Some(&params), &r),
        Placement::Shard { shard, .. } if shard == want
    ));
    match place("SELECT * FROM t WHERE user_id = 'nope'", None, &r) {
        Placement::Refuse { code, message } => {
            assert_eq!(code, "22P02");
            assert!(message.contains("type uuid"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    let r = ShardingRules::new(KeyType::Integer, 4);
    let i = |k: i64| shard_of(KeyType::Integer, &KeyValue::Int(k), 4);
    assert_eq!(at("SELECT * FROM t WHERE user_id = 42", &r), i(42));
    // Beyond integer's range the comparison matches nothing: not a pin, so it fans out.
    assert!(matches!(
        place("SELECT * FROM t WHERE user_id = 3000000000", None, &r),
        Placement::AllShards { .. }
    ));
    // …and such a row cannot be stored.
    match place("INSERT INTO t (user_id) VALUES (3000000000)", None, &r) {
        Placement::Refuse { code, .. } => assert_eq!(code, "22003"),
        other => panic!("{other:?}"),
    }
}

// ------------------------------------------------------------------ properties

mod props {
    use super::{
        BoundParams, KeyType, KeyValue, MultiShardInsert, Placement, assert_shard, p_with,
        place_params, rules, s, text_params,
    };
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn literal_text_and_binary_keys_agree(k in any::<i64>()) {
            let want = s(k);
            assert_shard(&format!("SELECT * FROM orders WHERE user_id = {k}"), want);
            assert_shard(&format!("DELETE FROM orders WHERE user_id = '{k}'"), want);
            let text = k.to_string();
            let values = [Some(text.as_str())];
            let params = text_params(&values, &[]);
            let placed = place_params("UPDATE orders SET x = 1 WHERE user_id = $1", &params);
            prop_assert!(matches!(placed, Placement::Shard { shard, .. } if shard == want), "{:?}", placed);
            let bytes = k.to_be_bytes();
            let params = BoundParams { formats: vec![1], values: vec![Some(&bytes[..])], types: vec![20] };
            let placed = place_params("INSERT INTO orders (user_id) VALUES ($1)", &params);
            prop_assert!(matches!(placed, Placement::Shard { shard, .. } if shard == want), "{:?}", placed);
        }

        #[test]
        fn uuid_text_forms_round_trip(b in any::<[u8; 16]>()) {
            let v = KeyValue::Uuid(b);
            let text = v.to_string();
            prop_assert_eq!(KeyType::Uuid.parse_text(&text), Ok(v.clone()));
            prop_assert_eq!(KeyType::Uuid.parse_text(&text.to_uppercase().replace('-', "")), Ok(v.clone()));
            prop_assert_eq!(KeyType::Uuid.parse_text(&format!("{{{text}}}")), Ok(v));
        }

        /// A split INSERT keeps every row exactly once, each on the shard it belongs to.
        #[test]
        fn split_insert_parts_hold_their_rows(keys in proptest::collection::vec(-50i64..50, 1..12)) {
            let mut r = rules();
            r.multi_shard_insert = MultiShardInsert::Split;
            let rows: Vec<String> = keys
                .iter()
                .enumerate()
                .map(|(i, k)| format!("('n{i}, ''x''', {k})"))
                .collect();
            let sql = format!("INSERT INTO orders (note, user_id) VALUES {} RETURNING id", rows.join(", "));
            match p_with(&sql, &r) {
                Placement::Shard { shard, .. } => {
                    prop_assert!(keys.iter().all(|&k| s(k) == shard));
                }
                Placement::Split { parts, .. } => {
                    let mut seen = Vec::new();
                    for (shard, text) in &parts {
                        let placed = p_with(text, &r);
                        prop_assert!(
                            matches!(placed, Placement::Shard { shard: x, .. } if x == *shard),
                            "{:?}: {:?}", text, placed
                        );
                        for (i, row) in rows.iter().enumerate() {
                            if text.contains(&format!("'n{i}, ")) {
                                prop_assert!(text.contains(row.as_str()));
                                prop_assert_eq!(s(keys[i]), *shard);
                                seen.push(i);
                            }
                        }
                    }
                    seen.sort_unstable();
                    prop_assert_eq!(seen, (0..keys.len()).collect::<Vec<_>>());
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
