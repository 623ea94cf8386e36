"""asyncpg through pgsluice: WORKERS concurrent connections in one event loop.

asyncpg runs every fetch/fetchval/fetchrow/executemany, and execute with
arguments, as a named prepared statement from its per-connection cache
(__asyncpg_stmt_N__), and conn.prepare() gives explicit ones. Usage:

    python3 asyncpg_check.py postgres://user:pass@host:port/db
"""

import asyncio
import io
import time

import asyncpg

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
    copy_text,
    expect,
    rotated,
    url_from_argv,
)

URL = url_from_argv()
T = "sluice_asyncpg"
checks = Checks("asyncpg")


class Rollback(Exception):
    pass


SELECTS = [
    ("add", "SELECT $1::int * 2 + $2::int", lambda i, w: (i, w), lambda i, w: i * 2 + w),
    ("concat", "SELECT $1::text || '-' || $2::int", lambda i, w: (f"w{w}", i), lambda i, w: f"w{w}-{i}"),
    ("count", "SELECT count(*) FROM generate_series(1, $1::int)", lambda i, w: (i,), lambda i, w: i),
    ("row", "SELECT $1::int AS w, $2::bigint * 1000000000 AS big, $3::text IS NULL AS n",
     lambda i, w: (w, i, None), lambda i, w: (w, i * 1_000_000_000, True)),
]


async def connect(w):
    return await asyncpg.connect(URL, timeout=60, server_settings={"application_name": f"asyncpg-w{w}"})


async def check_prepared(conn, w):
    for i in range(ITERS):
        for name, q, args, exp in rotated(SELECTS, w):
            if name == "row":
                got = tuple(await conn.fetchrow(q, *args(i, w)))
            else:
                got = await conn.fetchval(q, *args(i, w))
            expect(got == exp(i, w), f"{name} i={i}: expected {exp(i, w)!r}, got {got!r}")


async def check_explicit_prepare(conn, w):
    stmts = [await conn.prepare(q) for _, q, _, _ in rotated(SELECTS, w)]
    names = [n for n, _, _, _ in rotated(SELECTS, w)]
    fns = {n: (a, e) for n, _, a, e in SELECTS}
    for i in range(ITERS // 2):
        for name, stmt in zip(names, stmts):
            args, exp = fns[name]
            row = await stmt.fetchrow(*args(i, w))
            got = tuple(row) if name == "row" else row[0]
            expect(got == exp(i, w), f"{name} i={i}: expected {exp(i, w)!r}, got {got!r}")


async def check_executemany(conn, w):
    await conn.executemany(
        f"INSERT INTO {T} (w, i, s, kind) VALUES ($1, $2, $3, 'many')",
        [(w, i, f"m{i}") for i in range(50)],
    )
    got = await conn.fetchrow(f"SELECT count(*), sum(i) FROM {T} WHERE w = $1 AND kind = 'many'", w)
    expect(tuple(got) == (50, sum(range(50))), f"got {tuple(got)}")


async def check_rollback(conn, w):
    ins = f"INSERT INTO {T} (w, i, s, kind) VALUES ($1, 1, 'x', $2)"
    try:
        async with conn.transaction():
            await conn.execute(ins, w, "rolled-back")
            raise Rollback()
    except Rollback:
        pass
    async with conn.transaction():
        await conn.execute(ins, w, "committed")
        try:
            async with conn.transaction():  # savepoint
                await conn.execute(ins, w, "savepoint")
                raise Rollback()
        except Rollback:
            pass
    # Plain SQL transaction control, simple protocol.
    await conn.execute("BEGIN")
    await conn.execute(ins, w, "rolled-back")
    await conn.execute("ROLLBACK")
    await conn.execute("BEGIN")
    await conn.execute(ins, w, "committed")
    await conn.execute("COMMIT")
    rows = await conn.fetch(
        f"SELECT kind, count(*) FROM {T} WHERE w = $1 AND kind IN "
        "('rolled-back', 'committed', 'savepoint') GROUP BY kind ORDER BY kind",
        w,
    )
    got = [tuple(r) for r in rows]
    expect(got == [("committed", 2)], f"expected only 2 committed rows, got {got}")


async def check_error_in_transaction(conn, w):
    try:
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {T} (w, i, s, kind) VALUES ($1, 1, 'x', 'doomed')", w)
            await conn.fetchval("SELECT 1 / $1::int", 0)
        expect(False, "no error")
    except asyncpg.DivisionByZeroError:
        pass
    expect(not conn.is_in_transaction(), "still in a transaction after rollback")
    n = await conn.fetchval(f"SELECT count(*) FROM {T} WHERE w = $1 AND kind = 'doomed'", w)
    expect(n == 0, f"{n} rows of a rolled-back transaction are visible")


async def check_cursor(conn, w):
    """Named portals inside a transaction, fetched in chunks."""
    n = 2000
    async with conn.transaction():
        i = 0
        async for r in conn.cursor("SELECT i, $2::int FROM generate_series(0, $1 - 1) i", n, w, prefetch=100):
            expect(r[0] == i and r[1] == w, f"cursor row {i}: {tuple(r)}")
            i += 1
        expect(i == n, f"cursor gave {i} rows")
        cur = await conn.cursor("SELECT i FROM generate_series(0, $1 - 1) i", n)
        first = [r[0] for r in await cur.fetch(5)]
        await cur.forward(10)
        nxt = await cur.fetchrow()
        expect(first == [0, 1, 2, 3, 4] and nxt[0] == 15, f"cursor fetch {first} then {nxt}")


async def check_copy(conn, w):
    rows = copy_rows(w)
    half = COPY_ROWS // 2
    # Binary COPY FROM (asyncpg's records path) and text COPY FROM a file.
    await conn.copy_records_to_table(T, records=[(*r, "copy") for r in rows[:half]], columns=["w", "i", "s", "kind"])
    src = io.BytesIO(copy_text([(*r, "copy") for r in rows[half:]]))
    await conn.copy_to_table(T, source=src, columns=["w", "i", "s", "kind"])
    out = io.BytesIO()
    await conn.copy_from_query(f"SELECT w, i, s FROM {T} WHERE w = $1 AND kind = 'copy' ORDER BY i", w, output=out)
    want = copy_text(rows)
    expect(out.getvalue() == want, f"COPY TO: {len(out.getvalue())} bytes, expected {len(want)}")
    n = await conn.fetchval(f"SELECT count(*) FROM {T} WHERE w = $1 AND kind = 'copy'", w)
    expect(n == COPY_ROWS, f"{n} rows after COPY FROM")


async def check_big_result(conn, w):
    rows = await conn.fetch(
        "SELECT i, repeat(chr(65 + mod(i, 26)), $1) FROM generate_series(0, $2 - 1) i ORDER BY i",
        BIG_WIDTH,
        BIG_ROWS,
    )
    expect(len(rows) == BIG_ROWS, f"{len(rows)} rows")
    for i, r in enumerate(rows):
        if r[0] != i or r[1] != big_row(i):
            expect(False, f"row {i} wrong: {r[0]} {r[1][:10]!r}")


async def check_error_recovery(conn, w):
    try:
        await conn.execute("SELECT 1/0")  # simple protocol
        expect(False, "no error")
    except asyncpg.DivisionByZeroError:
        pass
    expect(await conn.fetchval("SELECT $1::int + 1", 41) == 42, "query after error")
    for arg, want in ((0, None), (4, 25), (0, None), (5, 20)):
        try:
            got = await conn.fetchval("SELECT 100 / $1::int", arg)
            expect(want is not None and got == want, f"100/{arg} gave {got}")
        except asyncpg.DivisionByZeroError:
            expect(want is None, f"100/{arg} failed")
    try:
        await conn.fetchval("SELEC $1::int", 1)
        expect(False, "no syntax error")
    except asyncpg.PostgresSyntaxError:
        pass
    try:
        await conn.fetchval(f"SELECT no_such_column FROM {T} WHERE w = $1", w)
        expect(False, "no undefined-column error")
    except asyncpg.UndefinedColumnError:
        pass
    expect(await conn.fetchval(SELECTS[0][1], 5, w) == 10 + w, "prepared statement after errors")


async def check_cache_eviction(w):
    """A new connection with a small statement cache: asyncpg closes the
    statements it evicts. (Opened after the worker's first connection is
    closed: one connection per worker at a time, or session mode with a
    pool of 2 could deadlock.)"""
    small = await asyncpg.connect(URL, timeout=60, statement_cache_size=3)
    try:
        for rnd in range(3):
            for k in range(6):
                got = await small.fetchval(f"SELECT $1::int + {k} /* evict {k} */", w)
                expect(got == w + k, f"round {rnd} statement {k}: {got}")
        expect(await small.fetchval(SELECTS[0][1], 1, w) == 2 + w, "reconnected worker")
    finally:
        await small.close()


async def check_cancel_timeout(conn, w):
    """timeout= makes asyncpg send a cancel request. Inside a transaction, so
    the query is on a server when the cancel arrives."""
    start = time.monotonic()
    try:
        async with conn.transaction():
            await conn.fetchval("SELECT 1")
            await conn.fetchval("SELECT pg_sleep($1)", 30.0, timeout=0.3)
        expect(False, "pg_sleep did not time out")
    except asyncio.TimeoutError:
        pass
    # The next command waits for the cancelled one: fast only if it was cancelled.
    expect(await conn.fetchval(SELECTS[0][1], 7, w) == 14 + w, "query after cancel")
    elapsed = time.monotonic() - start
    expect(elapsed < 15, f"cancel took {elapsed:.1f}s")


async def check_cancel_task(conn, w):
    """Cancelling the asyncio task running a query cancels it on the server."""
    start = time.monotonic()
    await conn.execute("BEGIN")
    await conn.execute("SELECT 1")
    task = asyncio.ensure_future(conn.execute("SELECT pg_sleep(30)"))
    await asyncio.sleep(0.3)
    task.cancel()
    try:
        await task
        expect(False, "pg_sleep was not cancelled")
    except asyncio.CancelledError:
        pass
    await conn.execute("ROLLBACK")
    expect(await conn.fetchval(SELECTS[1][1], f"w{w}", 9) == f"w{w}-9", "query after cancel")
    elapsed = time.monotonic() - start
    expect(elapsed < 15, f"cancel took {elapsed:.1f}s")


async def check_schema_change(conn, w):
    """DDL under a cached prepared statement: same column types (a widened
    varchar) must be invisible; a new column reaches asyncpg as PostgreSQL's
    InvalidCachedStatementError, which asyncpg handles by preparing again."""
    t = f"{T}_ddl_{w}"
    await conn.execute(f"DROP TABLE IF EXISTS {t}")
    await conn.execute(f"CREATE TABLE {t} (a int, v varchar(50))")
    await conn.execute(f"INSERT INTO {t} VALUES (1, 'x')")
    q = f"SELECT * FROM {t} WHERE a = $1"
    for _ in range(3):
        expect(tuple(await conn.fetchrow(q, 1)) == (1, "x"), "before DDL")
    await conn.execute(f"ALTER TABLE {t} ALTER COLUMN v TYPE varchar(75)")
    for _ in range(3):
        expect(tuple(await conn.fetchrow(q, 1)) == (1, "x"), "after widening v")
    await conn.execute(f"ALTER TABLE {t} ADD COLUMN b int")
    for _ in range(3):
        got = tuple(await conn.fetchrow(q, 1))
        expect(got == (1, "x", None), f"after ADD COLUMN: {got!r}")
    await conn.execute(f"DROP TABLE {t}")


WORKER_CHECKS = [
    ("prepared", check_prepared),
    ("explicit-prepare", check_explicit_prepare),
    ("executemany", check_executemany),
    ("rollback", check_rollback),
    ("error-in-transaction", check_error_in_transaction),
    ("cursor", check_cursor),
    ("copy", check_copy),
    ("big-result", check_big_result),
    ("error-recovery", check_error_recovery),
    ("cancel-timeout", check_cancel_timeout),
    ("cancel-task", check_cancel_task),
    ("schema-change", check_schema_change),
    ("prepared-again", check_prepared),
]


async def run_check(name, fn, conn, w):
    try:
        await fn(conn, w)
        checks.ok(name)
    except Exception as e:  # noqa: BLE001
        checks.fail(name, f"{type(e).__name__}: {e}".strip())


async def worker(w):
    try:
        conn = await connect(w)
    except Exception as e:  # noqa: BLE001
        checks.fail("connect", f"worker {w}: {type(e).__name__}: {e}")
        return
    checks.ok("connect")
    try:
        for name, fn in WORKER_CHECKS:
            if conn.is_closed():
                checks.fail(name, f"worker {w}: connection closed")
                continue
            if conn.is_in_transaction():
                await conn.execute("ROLLBACK")  # a failed check left a transaction open
            await run_check(name, fn, conn, w)
    finally:
        try:
            await conn.close(timeout=10)
        except Exception:  # noqa: BLE001 - a broken connection was reported by its checks
            conn.terminate()
    await run_check("cache-eviction", lambda c, w: check_cache_eviction(w), None, w)


async def setup():
    conn = await connect(-1)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {T}")
        await conn.execute(f"CREATE TABLE {T} (w int NOT NULL, i int NOT NULL, s text NOT NULL, kind text NOT NULL)")
    finally:
        await conn.close()


async def totals():
    conn = await connect(-1)
    try:
        rows = {r[0]: r[1] for r in await conn.fetch(f"SELECT kind, count(*) FROM {T} GROUP BY kind")}
    finally:
        await conn.close()
    want = {"many": 50 * WORKERS, "committed": 2 * WORKERS, "copy": COPY_ROWS * WORKERS}
    expect(rows == want, f"table totals {rows}, expected {want}")


async def main():
    await run_check("setup", lambda c, w: setup(), None, None)
    if checks.failed:
        checks.finish()
    tasks = [asyncio.ensure_future(worker(w)) for w in range(WORKERS)]
    done, pending = await asyncio.wait(tasks, timeout=DEADLINE)
    if not pending:
        await run_check("totals", lambda c, w: totals(), None, None)
    checks.finish(len(pending))  # exits, stuck tasks and all


asyncio.run(main())
