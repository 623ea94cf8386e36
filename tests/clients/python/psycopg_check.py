"""psycopg 3 through pgsluice: WORKERS threads, one connection each.

Every statement with parameters is a named server-side prepared statement
(prepare_threshold=0 and prepare=True), including inside pipeline mode and
executemany; psycopg binds parameters server-side. Usage:

    python3 psycopg_check.py postgres://user:pass@host:port/db
"""

import logging
import threading
import time

import psycopg
from psycopg import errors, sql

from common import (
    BIG_ROWS,
    BIG_WIDTH,
    COPY_ROWS,
    DEADLINE,
    ITERS,
    WORKERS,
    Checks,
    big_row,
    copy_rows,
    expect,
    rotated,
    url_from_argv,
)

# psycopg logs "error ignored terminating <Pipeline>" when a pipeline exits on
# the error check_pipeline_error provokes on purpose.
logging.getLogger("psycopg").setLevel(logging.ERROR)

URL = url_from_argv()
T = "sluice_psycopg"
checks = Checks("psycopg")

# (name, sql, args(i, w), expected(i, w))
SELECTS = [
    ("add", "SELECT %s::int * 2 + %s::int", lambda i, w: (i, w), lambda i, w: i * 2 + w),
    ("concat", "SELECT %s::text || '-' || %s::int", lambda i, w: (f"w{w}", i), lambda i, w: f"w{w}-{i}"),
    ("count", "SELECT count(*) FROM generate_series(1, %s::int)", lambda i, w: (i,), lambda i, w: i),
    ("row", "SELECT %s::int AS w, %s::bigint * 1000000000 AS big, %s::text IS NULL AS n",
     lambda i, w: (w, i, None), lambda i, w: (w, i * 1_000_000_000, True)),
]


def connect(w, **kw):
    return psycopg.connect(
        URL,
        autocommit=True,
        prepare_threshold=0,
        connect_timeout=60,
        application_name=f"psycopg-w{w}",
        **kw,
    )


def one(conn, query, args=None, prepare=True):
    return conn.execute(query, args, prepare=prepare).fetchone()


def check_prepared(conn, w):
    for i in range(ITERS):
        for name, q, args, exp in rotated(SELECTS, w):
            row = conn.execute(q, args(i, w), prepare=True).fetchone()
            got = row if name == "row" else row[0]
            expect(got == exp(i, w), f"{name} i={i}: expected {exp(i, w)!r}, got {got!r}")


def check_executemany(conn, w):
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {T} (w, i, s, kind) VALUES (%s, %s, %s, 'many')",
            [(w, i, f"m{i}") for i in range(50)],
        )
    got = one(conn, f"SELECT count(*), sum(i) FROM {T} WHERE w = %s AND kind = 'many'", (w,))
    expect(tuple(got) == (50, sum(range(50))), f"got {got}")


def check_pipeline(conn, w):
    with conn.pipeline():
        curs = []
        for i in range(50):
            curs.append(conn.execute(SELECTS[0][1], (i, w), prepare=True))
            curs.append(conn.execute(SELECTS[1][1], (f"w{w}", i), prepare=True))
    for i in range(50):
        a = curs[2 * i].fetchone()[0]
        b = curs[2 * i + 1].fetchone()[0]
        expect(a == i * 2 + w and b == f"w{w}-{i}", f"i={i}: {a!r} {b!r}")


def check_pipeline_error(conn, w):
    """An error mid-pipeline discards the rest up to the next Sync."""
    before = after = None
    raised = None
    try:
        with conn.pipeline() as p:
            before = conn.execute(SELECTS[0][1], (1, w), prepare=True)
            p.sync()
            conn.execute("SELECT 10 / %s::int", (0,), prepare=True)
            after = conn.execute(SELECTS[0][1], (2, w), prepare=True)
    except errors.DivisionByZero as e:
        raised = e
    expect(raised is not None, "no DivisionByZero from the pipeline")
    expect(before.fetchone()[0] == 2 + w, "result before the Sync lost")
    # psycopg may raise while queueing `after` (then it was never sent) or
    # leave it without a result.
    if after is not None:
        try:
            after.fetchone()
            expect(False, "statement after the error was not discarded")
        except (errors.PipelineAborted, psycopg.ProgrammingError):
            pass  # "no result available"
    # The connection and its prepared statements work afterwards.
    with conn.pipeline():
        c = conn.execute(SELECTS[0][1], (3, w), prepare=True)
        d = conn.execute("SELECT 10 / %s::int", (5,), prepare=True)
    expect(c.fetchone()[0] == 6 + w and d.fetchone()[0] == 2, "pipeline after error")


def check_rollback(conn, w):
    with conn.transaction():
        conn.execute(f"INSERT INTO {T} (w, i, s, kind) VALUES (%s, 1, 'x', 'rolled-back')", (w,))
        raise psycopg.Rollback()
    with conn.transaction():
        conn.execute(f"INSERT INTO {T} (w, i, s, kind) VALUES (%s, 1, 'x', 'committed')", (w,))
        with conn.transaction():  # savepoint
            conn.execute(f"INSERT INTO {T} (w, i, s, kind) VALUES (%s, 1, 'x', 'savepoint')", (w,))
            raise psycopg.Rollback()
    # Default (non-autocommit) mode: implicit BEGIN, explicit rollback/commit.
    conn.autocommit = False
    try:
        conn.execute(f"INSERT INTO {T} (w, i, s, kind) VALUES (%s, 2, 'x', 'rolled-back')", (w,))
        conn.rollback()
        conn.execute(f"INSERT INTO {T} (w, i, s, kind) VALUES (%s, 2, 'x', 'committed')", (w,))
        conn.commit()
    finally:
        conn.autocommit = True
    rows = conn.execute(
        f"SELECT kind, count(*) FROM {T} WHERE w = %s AND kind IN "
        "('rolled-back', 'committed', 'savepoint') GROUP BY kind ORDER BY kind",
        (w,),
        prepare=True,
    ).fetchall()
    expect(rows == [("committed", 2)], f"expected only 2 committed rows, got {rows}")


def check_error_in_transaction(conn, w):
    try:
        with conn.transaction():
            conn.execute(f"INSERT INTO {T} (w, i, s, kind) VALUES (%s, 1, 'x', 'doomed')", (w,))
            conn.execute("SELECT 1 / %s::int", (0,))
        expect(False, "no error")
    except errors.DivisionByZero:
        pass
    expect(conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE, "not idle after rollback")
    n = one(conn, f"SELECT count(*) FROM {T} WHERE w = %s AND kind = 'doomed'", (w,))[0]
    expect(n == 0, f"{n} rows of a rolled-back transaction are visible")


def check_copy(conn, w):
    rows = copy_rows(w)
    with conn.cursor() as cur:
        with cur.copy(f"COPY {T} (w, i, s, kind) FROM STDIN") as copy:
            for r in rows:
                copy.write_row((*r, "copy"))
        q = sql.SQL(
            "COPY (SELECT w, i, s FROM {} WHERE w = {} AND kind = 'copy' ORDER BY i) TO STDOUT {}"
        )
        for fmt in ("", "(FORMAT BINARY)"):
            with cur.copy(q.format(sql.Identifier(T), sql.Literal(w), sql.SQL(fmt))) as copy:
                copy.set_types(["int4", "int4", "text"])
                got = list(copy.rows())
            expect(got == rows, f"COPY TO {fmt or 'text'}: {len(got)} rows, first {got[:1]}")
    n = one(conn, f"SELECT count(*) FROM {T} WHERE w = %s AND kind = 'copy'", (w,))[0]
    expect(n == COPY_ROWS, f"{n} rows after COPY FROM")


def check_big_result(conn, w):
    cur = conn.execute(
        "SELECT i, repeat(chr(65 + mod(i, 26)), %s) FROM generate_series(0, %s - 1) i ORDER BY i",
        (BIG_WIDTH, BIG_ROWS),
        prepare=True,
    )
    rows = cur.fetchall()
    expect(len(rows) == BIG_ROWS, f"{len(rows)} rows")
    for i, (n, s) in enumerate(rows):
        if n != i or s != big_row(i):
            expect(False, f"row {i} wrong: {n} {s[:10]!r}")


def check_error_recovery(conn, w):
    try:
        conn.execute("SELECT 1/0")
        expect(False, "no error")
    except errors.DivisionByZero:
        pass
    expect(one(conn, "SELECT %s::int + 1", (41,))[0] == 42, "simple query after error")
    # A prepared statement that fails, then succeeds with other arguments.
    for arg, want in ((0, None), (4, 25), (0, None), (5, 20)):
        try:
            got = one(conn, "SELECT 100 / %s::int", (arg,))[0]
            expect(want is not None and got == want, f"100/{arg} gave {got}")
        except errors.DivisionByZero:
            expect(want is None, f"100/{arg} failed")
    # A statement that fails to parse, then the connection still works.
    try:
        conn.execute("SELEC %s::int", (1,), prepare=True)
        expect(False, "no syntax error")
    except errors.SyntaxError:
        pass
    expect(one(conn, SELECTS[0][1], (5, w))[0] == 10 + w, "prepared statement after errors")


def check_prepared_eviction(conn, w):
    """More statements than psycopg keeps prepared: it deallocates the oldest."""
    old = conn.prepared_max
    conn.prepared_max = 3
    try:
        for rnd in range(3):
            for k in range(6):
                got = one(conn, f"SELECT %s::int + {k} /* evict {k} */", (w,))[0]
                expect(got == w + k, f"round {rnd} statement {k}: {got}")
    finally:
        conn.prepared_max = old


def check_cancel_in_transaction(conn, w):
    timer = threading.Timer(0.3, conn.cancel_safe)
    start = time.monotonic()
    try:
        with conn.transaction():
            one(conn, "SELECT 1", prepare=False)
            timer.start()
            conn.execute("SELECT pg_sleep(30)", prepare=False)
        expect(False, "pg_sleep was not cancelled")
    except errors.QueryCanceled:
        pass
    finally:
        timer.cancel()
        timer.join()
    elapsed = time.monotonic() - start
    expect(elapsed < 15, f"cancel took {elapsed:.1f}s")
    expect(one(conn, SELECTS[0][1], (7, w))[0] == 14 + w, "query after cancel")


def check_cancel_autocommit(conn, w):
    """Outside a transaction the query may still wait for a server, where a
    cancel has nothing to hit: keep cancelling until it ends, as a client would."""
    done = threading.Event()

    def canceller():
        while not done.wait(0.3):
            conn.cancel_safe()

    t = threading.Thread(target=canceller, daemon=True)
    start = time.monotonic()
    t.start()
    try:
        conn.execute("SELECT pg_sleep(30)", prepare=False)
        expect(False, "pg_sleep was not cancelled")
    except errors.QueryCanceled:
        pass
    finally:
        done.set()
        t.join()
    elapsed = time.monotonic() - start
    expect(elapsed < 15, f"cancel took {elapsed:.1f}s")
    expect(one(conn, SELECTS[1][1], (f"w{w}", 9))[0] == f"w{w}-9", "query after cancel")


WORKER_CHECKS = [
    ("prepared", check_prepared),
    ("executemany", check_executemany),
    ("pipeline", check_pipeline),
    ("pipeline-error", check_pipeline_error),
    ("rollback", check_rollback),
    ("error-in-transaction", check_error_in_transaction),
    ("copy", check_copy),
    ("big-result", check_big_result),
    ("error-recovery", check_error_recovery),
    ("prepared-eviction", check_prepared_eviction),
    ("cancel-in-transaction", check_cancel_in_transaction),
    ("cancel-autocommit", check_cancel_autocommit),
    ("prepared-again", check_prepared),
]


def worker(w, barrier):
    try:
        barrier.wait(timeout=30)
    except threading.BrokenBarrierError:
        pass
    try:
        conn = connect(w)
    except Exception as e:  # noqa: BLE001
        checks.fail("connect", f"worker {w}: {type(e).__name__}: {e}")
        return
    checks.ok("connect")
    with conn:
        for name, fn in WORKER_CHECKS:
            if conn.closed:
                checks.fail(name, f"worker {w}: connection closed")
                continue
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()  # a failed check left a transaction open
            checks.run(name, fn, conn, w)


def setup():
    with connect(-1) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {T}")
        conn.execute(f"CREATE TABLE {T} (w int NOT NULL, i int NOT NULL, s text NOT NULL, kind text NOT NULL)")


def totals():
    with connect(-1) as conn:
        rows = dict(conn.execute(f"SELECT kind, count(*) FROM {T} GROUP BY kind").fetchall())
    want = {"many": 50 * WORKERS, "committed": 2 * WORKERS, "copy": COPY_ROWS * WORKERS}
    expect(rows == want, f"table totals {rows}, expected {want}")


def main():
    if not checks.run("setup", setup):
        checks.finish()
    barrier = threading.Barrier(WORKERS)
    threads = [threading.Thread(target=worker, args=(w, barrier), daemon=True) for w in range(WORKERS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + DEADLINE
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    unfinished = sum(t.is_alive() for t in threads)
    if not unfinished:
        checks.run("totals", totals)
    checks.finish(unfinished)


main()
