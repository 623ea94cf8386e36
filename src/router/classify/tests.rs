use proptest::prelude::*;

use super::*;

fn catalog() -> FunctionCatalog {
    let allow: Vec<String> = FunctionCatalog::DEFAULT_ALLOW
        .iter()
        .map(|s| s.to_string())
        .collect();
    FunctionCatalog::from_catalog(
        [
            "random",
            "nextval",
            "my_writer",
            "clock_timestamp",
            "system",
        ]
        .map(String::from),
        &allow,
    )
}

fn class(sql: &str) -> Class {
    classify(sql, &catalog())
}

#[track_caller]
fn check(sql: &str, access: Access, reason: Reason) {
    let c = class(sql);
    assert_eq!((c.access, c.reason), (access, reason), "{sql}");
}

#[test]
fn reads() {
    check("SELECT 1", Access::Read, Reason::Select);
    check(
        "select * from t where id = $1",
        Access::Read,
        Reason::Select,
    );
    check("(SELECT 1) UNION (SELECT 2)", Access::Read, Reason::Select);
    check(
        "WITH x AS (SELECT 1) SELECT * FROM x",
        Access::Read,
        Reason::Select,
    );
    check("VALUES (1), (2)", Access::Read, Reason::Select);
    check("TABLE t", Access::Read, Reason::Select);
    check("SELECT 'DELETE FROM t'", Access::Read, Reason::Select);
    check(
        "SELECT 1 /* ; DROP TABLE t */",
        Access::Read,
        Reason::Select,
    );
    check("SELECT $$ ; insert into t $$", Access::Read, Reason::Select);
    check(r#"SELECT "update" FROM t"#, Access::Read, Reason::Select);
    check(
        "SELECT now(), random(), count(*) FROM t",
        Access::Read,
        Reason::Select,
    );
    check("SHOW search_path", Access::Read, Reason::ReadOnlyCommand);
    check("", Access::Read, Reason::Empty);
    check(" ;; -- nothing\n", Access::Read, Reason::Empty);
}

#[test]
fn writes() {
    check(
        "INSERT INTO t VALUES (1)",
        Access::Write,
        Reason::DataModifying,
    );
    check(
        "SELECT * FROM t FOR UPDATE",
        Access::Write,
        Reason::LockingRead,
    );
    check(
        "SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED",
        Access::Write,
        Reason::LockingRead,
    );
    check("SELECT a INTO b FROM t", Access::Write, Reason::SelectInto);
    check(
        "WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x",
        Access::Write,
        Reason::WritingCte,
    );
    check(
        "WITH x AS (SELECT 1) UPDATE t SET a = 1",
        Access::Write,
        Reason::DataModifying,
    );
    check(
        "SELECT nextval('s')",
        Access::Write,
        Reason::WritingFunction,
    );
    check(
        "SELECT public.my_writer()",
        Access::Write,
        Reason::VolatileFunction,
    );
    check("SELECT 'x\\'", Access::Write, Reason::Unparsable);
    check("SELECT (1", Access::Write, Reason::Unparsable);
    check("SELECT 1)", Access::Write, Reason::Unparsable);
    check(
        "SELECT 1; DELETE FROM t",
        Access::Write,
        Reason::DataModifying,
    );
    check("FROBNICATE", Access::Write, Reason::Unknown);
    check("42", Access::Write, Reason::Unparsable);
}

#[test]
fn ambiguous_dml_words_go_to_the_parser() {
    check("SELECT update FROM t", Access::Read, Reason::Select);
    check(
        "SELECT * FROM t WHERE x IN (WITH d AS (DELETE FROM u RETURNING a) SELECT a FROM d)",
        Access::Write,
        Reason::WritingCte,
    );
}

#[test]
fn not_calls() {
    check(
        "SELECT x::numeric(10,2), CAST(y AS varchar(3)) FROM t",
        Access::Read,
        Reason::Select,
    );
    check(
        "SELECT * FROM t TABLESAMPLE system (10)",
        Access::Read,
        Reason::Select,
    );
    check(
        "WITH my_writer(a) AS (SELECT 1) SELECT * FROM my_writer",
        Access::Read,
        Reason::Select,
    );
    check(
        "SELECT * FROM t, my_writer() AS (a int)",
        Access::Write,
        Reason::VolatileFunction,
    );
    check(
        "SELECT * FROM t WHERE a IN (1) AND EXISTS (SELECT 1)",
        Access::Read,
        Reason::Select,
    );
}

#[test]
fn function_names_are_normalised() {
    check(
        "SELECT NEXTVAL('s')",
        Access::Write,
        Reason::WritingFunction,
    );
    check(
        r#"SELECT "nextval"('s')"#,
        Access::Write,
        Reason::WritingFunction,
    );
    check(
        r#"SELECT pg_catalog . nextval ('s')"#,
        Access::Write,
        Reason::WritingFunction,
    );
    check(
        r#"SELECT U&"nextv\0061l"('s')"#,
        Access::Write,
        Reason::VolatileFunction,
    );
    let long = format!("SELECT {}x()", "a".repeat(63));
    let truncated = "a".repeat(63);
    let functions = FunctionCatalog::from_catalog([truncated], &[]);
    assert_eq!(classify(&long, &functions).access, Access::Write);
}

#[test]
fn builtin_catalog_fails_closed() {
    let functions = FunctionCatalog::builtin();
    assert_eq!(
        classify("SELECT lower(a) FROM t", &functions).access,
        Access::Read
    );
    assert_eq!(
        classify("SELECT f(a) FROM t", &functions).access,
        Access::Write
    );
}

#[test]
fn transactions() {
    let c = class("BEGIN");
    assert_eq!(
        (c.access, c.tx),
        (Access::Write, TxControl::Begin { read_only: false })
    );
    let c = class("begin transaction isolation level repeatable read, read only");
    assert_eq!(
        (c.access, c.tx),
        (Access::Read, TxControl::Begin { read_only: true })
    );
    let c = class("START TRANSACTION READ ONLY ISOLATION LEVEL SERIALIZABLE");
    assert_eq!(c.access, Access::Write);
    let c = class("SET TRANSACTION READ ONLY");
    assert_eq!(
        (c.access, c.tx),
        (Access::Read, TxControl::SetTransaction { read_only: true })
    );
    let c = class("COMMIT");
    assert_eq!((c.access, c.tx), (Access::Read, TxControl::End));
    let c = class("ROLLBACK TO SAVEPOINT a");
    assert_eq!((c.access, c.tx), (Access::Read, TxControl::None));
    let c = class("BEGIN READ ONLY; SELECT 1; COMMIT");
    assert_eq!(
        (c.access, c.tx, c.reason),
        (Access::Read, TxControl::End, Reason::ReadOnlyTransaction)
    );
    let c = class("BEGIN; SELECT 1; COMMIT");
    assert_eq!((c.access, c.tx), (Access::Write, TxControl::End));
    let c = class("COMMIT; BEGIN READ ONLY");
    assert_eq!(c.tx, TxControl::Begin { read_only: true });
    let c = class("PREPARE TRANSACTION 'x'");
    assert_eq!((c.access, c.tx), (Access::Write, TxControl::End));
}

#[test]
fn atomic_function_bodies_are_one_statement() {
    let c = class(
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; SELECT 2; END",
    );
    assert_eq!(
        (c.access, c.tx, c.reason),
        (Access::Write, TxControl::None, Reason::Ddl)
    );
}

#[test]
fn route_commands() {
    let cmd = |sql: &str| class(sql).command;
    assert_eq!(
        cmd("SET pgsluice.route = primary"),
        Some(Command::SetRoute(RouteMode::Primary))
    );
    assert_eq!(
        cmd("set PGSLUICE.ROUTE to 'Replica';"),
        Some(Command::SetRoute(RouteMode::Replica))
    );
    assert_eq!(
        cmd("SET SESSION pgsluice.route TO auto"),
        Some(Command::SetRoute(RouteMode::Auto))
    );
    assert_eq!(
        cmd("SET LOCAL pgsluice.route = \"primary\""),
        Some(Command::SetRoute(RouteMode::Primary))
    );
    assert_eq!(
        cmd("RESET pgsluice.route"),
        Some(Command::SetRoute(RouteMode::Auto))
    );
    assert_eq!(cmd("SHOW pgsluice.route"), Some(Command::ShowRoute));
    assert!(
        matches!(cmd("SET pgsluice.route = sideways"), Some(Command::Invalid(m)) if m.contains("pgsluice.route") && m.contains("replica"))
    );
    assert!(
        matches!(cmd("SHOW pgsluice.colour"), Some(Command::Invalid(m)) if m.contains("pgsluice.colour"))
    );
    assert!(matches!(
        cmd("SET pgsluice.route = primary; SELECT 1"),
        Some(Command::Invalid(_))
    ));
    assert_eq!(cmd("SET search_path = a"), None);
    assert_eq!(cmd("SHOW pgsluice_route"), None);
}

#[test]
fn explain() {
    check("EXPLAIN SELECT 1", Access::Read, Reason::ReadOnlyCommand);
    check(
        "EXPLAIN DELETE FROM t",
        Access::Read,
        Reason::ReadOnlyCommand,
    );
    check(
        "EXPLAIN ANALYZE DELETE FROM t",
        Access::Write,
        Reason::ExplainAnalyzeWrite,
    );
    check(
        "EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1",
        Access::Write,
        Reason::ExplainAnalyzeWrite,
    );
    check(
        "EXPLAIN (ANALYZE off) UPDATE t SET a = 1",
        Access::Read,
        Reason::ReadOnlyCommand,
    );
    check(
        "EXPLAIN ANALYZE SELECT 1",
        Access::Read,
        Reason::ReadOnlyCommand,
    );
    check("EXPLAIN", Access::Write, Reason::Unparsable);
    check(
        "EXPLAIN EXPLAIN SELECT 1",
        Access::Write,
        Reason::Unparsable,
    );
}

#[test]
fn copy_prepare_declare() {
    check("COPY t FROM STDIN", Access::Write, Reason::CopyFrom);
    check(
        "COPY t (a, b) TO STDOUT",
        Access::Read,
        Reason::ReadOnlyCommand,
    );
    check(
        "COPY (SELECT 1) TO STDOUT",
        Access::Read,
        Reason::ReadOnlyCommand,
    );
    check(
        "COPY (DELETE FROM t RETURNING *) TO STDOUT",
        Access::Write,
        Reason::DataModifying,
    );
    check("COPY t TO '/tmp/x'", Access::Write, Reason::CopyFile);
    check(
        "PREPARE p(int) AS SELECT $1",
        Access::Read,
        Reason::SessionCommand,
    );
    check(
        "PREPARE p AS DELETE FROM t",
        Access::Write,
        Reason::DataModifying,
    );
    check("EXECUTE p(1)", Access::Write, Reason::Execute);
    check(
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        Access::Read,
        Reason::Select,
    );
    check(
        "DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE",
        Access::Write,
        Reason::LockingRead,
    );
}

#[test]
fn nesting_is_bounded() {
    let deep = "PREPARE a AS ".repeat(10_000) + "SELECT 1";
    check(&deep, Access::Write, Reason::Unparsable);
    // The lexical path does not recurse; sqlparser stops at its recursion limit.
    let parens = "(".repeat(100_000) + "SELECT 1" + &")".repeat(100_000);
    assert_eq!(class(&parens).access, Access::Read);
    let parens = "(".repeat(100_000) + "SELECT update FROM t" + &")".repeat(100_000);
    check(&parens, Access::Write, Reason::Unparsable);
}

#[test]
fn hint_is_reported_and_access_stays_honest() {
    let c = class("/* pgsluice: replica */ DELETE FROM t");
    assert_eq!(
        (c.hint, c.access),
        (Some(super::super::Hint::Replica), Access::Write)
    );
}

proptest! {
    #[test]
    fn never_panics(sql in "\\PC*") {
        let _ = class(&sql);
    }

    #[test]
    fn never_panics_on_sql_shaped_noise(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("select"), Just("with"), Just("insert"), Just("update"), Just("for"),
                Just("("), Just(")"), Just("'"), Just("\""), Just("$$"), Just("$a$"),
                Just("/*"), Just("*/"), Just("--"), Just("\n"), Just(";"), Just("e'\\'"),
                Just("explain"), Just("copy"), Just("as"), Just("f("), Just("::"), Just("x"),
            ],
            0..40,
        )
    ) {
        let _ = class(&parts.join(" "));
    }

    #[test]
    fn an_appended_insert_makes_a_write(prefix in "\\PC*") {
        // The INSERT is top-level only if the prefix leaves no string, comment, quoted
        // identifier or dollar quote open; otherwise the prefix is unlexable (also a write).
        // It starts a line of its own: after a `--` in the prefix, the rest of that line
        // is a comment, and "--; INSERT …" on one line runs nothing (proptest found it).
        let sql = format!("{prefix}\n; INSERT INTO t VALUES (1)");
        prop_assert_eq!(class(&sql).access, Access::Write, "{}", sql);
    }

    #[test]
    fn an_insert_after_a_line_comment_is_a_comment(prefix in "[a-z ]*") {
        // The other side of the case above: on the same line as `--`, it is not a statement.
        let sql = format!("SELECT 1 --{prefix}; INSERT INTO t VALUES (1)");
        prop_assert_eq!(class(&sql).access, Access::Read, "{}", sql);
    }

    #[test]
    fn an_appended_insert_after_a_read_makes_a_write(
        read in prop_oneof![
            Just("SELECT 1"), Just("SELECT 'a;b'"), Just("SELECT $$;$$"),
            Just("SELECT 1 /* ; */"), Just("SHOW x"), Just("BEGIN READ ONLY"),
            Just("SELECT update FROM t"), Just("VALUES (1)"), Just("-- c\nSELECT 1"),
        ],
        hint in prop_oneof![Just(""), Just("/* pgsluice: replica */ ")],
    ) {
        let sql = format!("{hint}{read}; INSERT INTO t VALUES (1)");
        prop_assert_eq!(class(&sql).access, Access::Write, "{}", sql);
    }
}
