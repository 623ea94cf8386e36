#!/usr/bin/env bash
# pgbench -M prepared through pgsluice: 20 clients, each preparing pgbench's
# statements (P_0, P_1, ...) once on its connection and then only binding and
# executing them. Checks exit status, failed/aborted transactions and that
# the TPC-B balances add up afterwards. Usage:
#
#   bash check.sh postgres://user:pass@host:port/db
set -uo pipefail
URL="${1:-${DATABASE_URL:?usage: check.sh postgres://user:pass@host:port/db}}"
CLIENTS="${WORKERS:-20}"
DURATION="${PGBENCH_SECONDS:-5}"
PASSED=0
FAILED=0
OUT="$(mktemp)"
trap 'rm -f "$OUT"' EXIT
unset PGOPTIONS PGSERVICE PGSSLMODE PGTZ PGCLIENTENCODING
export PGCONNECT_TIMEOUT=60

pass() { PASSED=$((PASSED + 1)); }
fail() { FAILED=$((FAILED + 1)); echo "FAIL $1"; sed 's/^/    /' "$OUT" | tail -n 15; }

# Initialise (COPY FROM for pgbench_accounts) through the same endpoint.
if pgbench -i -q -s 1 "$URL" >"$OUT" 2>&1; then pass; else fail "init: pgbench -i exited $?"; fi

run_bench() {
    local what="$1"; shift
    local start rc
    start=$(date +%s)
    # -j = -c: pgbench prepares synchronously (PQprepare) and a thread blocks
    # while one of its clients waits for a server; with one client per thread
    # a waiting client cannot hold up one that has a server (session mode).
    pgbench -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$DURATION" "$@" "$URL" >"$OUT" 2>&1
    rc=$?
    echo "pgbench $what: $(grep -E '^(number of transactions actually processed|number of failed transactions|tps = )' "$OUT" | tr '\n' ';') $(( $(date +%s) - start ))s"
    if [ "$rc" = 0 ]; then pass; else fail "$what: pgbench exited $rc"; fi
    if grep -q 'error:' "$OUT"; then fail "$what: errors reported"; else pass; fi
    local n; n="$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$OUT")"
    if [ -n "$n" ] && [ "$n" -gt 0 ]; then pass; else fail "$what: ${n:-no} transactions processed"; fi
    if grep -q '^number of failed transactions: 0 ' "$OUT"; then pass; else fail "$what: failed transactions"; fi
}

run_bench "TPC-B"
run_bench "select-only" -S

# Every committed TPC-B transaction moved the same delta into an account, a
# teller, a branch and the history: the sums agree only if none was torn.
if psql -X -q -t -A -v ON_ERROR_STOP=1 "$URL" >"$OUT" 2>&1 -c "
    SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history)
       AND (SELECT sum(tbalance) FROM pgbench_tellers) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history)
       AND (SELECT sum(bbalance) FROM pgbench_branches) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history)
       AND (SELECT count(*) FROM pgbench_history) > 0" && [ "$(cat "$OUT")" = t ]; then
    pass
else
    fail "balances: account, teller, branch and history sums differ"
fi

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
