"""Shared bits of the Python driver checks (tests/clients/run.sh).

Each check is one named assertion about one worker; the script ends with
exactly one line `N passed, N failed` and exits non-zero on any failure.
"""

import os
import sys
import threading
import time

WORKERS = int(os.environ.get("WORKERS", "20"))
# Executions of each prepared statement per worker.
ITERS = int(os.environ.get("ITERS", "100"))
# The whole script gives up (and reports what it has) after this many seconds.
DEADLINE = float(os.environ.get("CHECK_DEADLINE", "90"))
# Rows of the ~10 MB result: BIG_ROWS x BIG_WIDTH bytes of text.
BIG_ROWS = 10_000
BIG_WIDTH = 1_000
# Rows per worker for COPY in/out.
COPY_ROWS = 500


class Checks:
    """Thread-safe pass/fail tally with readable failure lines."""

    def __init__(self, driver):
        self.driver = driver
        self.lock = threading.Lock()
        self.passed = 0
        self.failed = 0
        self.failures = {}  # check name -> count (to summarise repeats)
        self.by_name = {}  # check name -> [passed, failed]
        self.start = time.monotonic()

    def ok(self, name):
        with self.lock:
            self.passed += 1
            self.by_name.setdefault(name, [0, 0])[0] += 1

    def fail(self, name, detail):
        with self.lock:
            self.failed += 1
            self.by_name.setdefault(name, [0, 0])[1] += 1
            n = self.failures.get(name, 0)
            self.failures[name] = n + 1
            # Print the first few of each kind in full; count the rest.
            if n < 3:
                print(f"FAIL {name}: {detail}", flush=True)

    def check(self, name, cond, detail=""):
        if cond:
            self.ok(name)
        else:
            self.fail(name, detail or "condition false")
        return cond

    def run(self, name, fn, *args):
        """Runs fn(*args); any exception fails check `name`."""
        try:
            fn(*args)
            self.ok(name)
            return True
        except Exception as e:  # noqa: BLE001 - every failure is reported
            self.fail(name, f"{type(e).__name__}: {e}".strip())
            return False

    def finish(self, unfinished=0):
        if unfinished:
            with self.lock:
                self.failed += unfinished
            print(
                f"FAIL deadline: {unfinished} worker(s) still running after {DEADLINE:.0f}s",
                flush=True,
            )
        elapsed = time.monotonic() - self.start
        with self.lock:
            if self.failed:
                # Per check, in the order first seen: passed/total.
                summary = ", ".join(f"{k} {p}/{p + f}" for k, (p, f) in self.by_name.items())
                print(f"{self.driver}: by check (passed/total): {summary}", flush=True)
            print(f"{self.driver}: {elapsed:.1f}s", flush=True)
            print(f"{self.passed} passed, {self.failed} failed", flush=True)
            code = 1 if self.failed or not self.passed else 0
        sys.stdout.flush()
        # os._exit: stuck driver threads must not keep the process alive.
        os._exit(code)


def expect(cond, detail):
    if not cond:
        raise AssertionError(detail)


def rotated(items, w):
    """items rotated by worker id, so each connection prepares its
    statements in a different order (driver-generated names like _pg3_0 or
    __asyncpg_stmt_1__ then mean different SQL on different connections)."""
    k = w % len(items)
    return items[k:] + items[:k]


def big_row(i):
    return chr(65 + i % 26) * BIG_WIDTH


def copy_rows(w):
    return [(w, i, f"copy\t{w}/{i} \\ é") for i in range(COPY_ROWS)]


def url_from_argv():
    if len(sys.argv) > 1:
        return sys.argv[1]
    url = os.environ.get("DATABASE_URL")
    if not url:
        sys.exit("usage: script.py postgres://user:pass@host:port/db")
    return url


def copy_text(rows):
    """rows as COPY's text format (tab-separated, backslash escapes), bytes."""

    def field(v):
        return str(v).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")

    return "".join("\t".join(field(v) for v in r) + "\n" for r in rows).encode()
