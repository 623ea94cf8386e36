#!/usr/bin/env bash
# Real-driver suite: psycopg 3, asyncpg, node-postgres, pgjdbc and
# `pgbench -M prepared`, each with >= 20 concurrent workers, through pgsluice
# (pool_size = max_pool_size = 2) or directly against PostgreSQL.
#
#   tests/clients/run.sh                       # demo cluster, pgsluice in transaction mode
#   tests/clients/run.sh --mode session        # ... in session mode
#   tests/clients/run.sh --direct              # the demo's primary, no pgsluice (checks the checks)
#   tests/clients/run.sh --only psycopg,jdbc   # a subset (psycopg asyncpg node jdbc pgbench)
#   PGSLUICE_URL=postgres://u:p@127.0.0.1:6432/db tests/clients/run.sh   # a running pgsluice
#
# Installs missing drivers first (pip, npm, apt). Each driver script prints
# one final `N passed, N failed`; so does this script, last, summed over all,
# and it exits non-zero if anything failed. See tests/clients/README.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
ALL_DRIVERS="psycopg asyncpg node jdbc pgbench"

MODE="${PGSLUICE_GENERAL__POOL_MODE:-transaction}"
DIRECT=0
INSTALL=1
DRIVERS="$ALL_DRIVERS"
export WORKERS="${WORKERS:-20}"
# Per-driver limit; each script also stops itself at CHECK_DEADLINE.
DRIVER_TIMEOUT="${DRIVER_TIMEOUT:-150}"
export CHECK_DEADLINE="${CHECK_DEADLINE:-120}"

usage() {
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
    echo "options: --mode session|transaction|statement, --direct, --only LIST, --workers N, --no-install"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --mode) MODE="${2:?--mode needs session|transaction|statement}"; shift 2 ;;
        --mode=*) MODE="${1#--mode=}"; shift ;;
        --direct) DIRECT=1; shift ;;
        --only) DRIVERS="${2:?--only needs a list}"; DRIVERS="${DRIVERS//,/ }"; shift 2 ;;
        --only=*) DRIVERS="${1#--only=}"; DRIVERS="${DRIVERS//,/ }"; shift ;;
        --workers) WORKERS="${2:?}"; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$MODE" in session|transaction|statement) ;; *) echo "run.sh: bad --mode $MODE" >&2; exit 2 ;; esac
for d in $DRIVERS; do
    case " $ALL_DRIVERS " in *" $d "*) ;; *) echo "run.sh: unknown driver $d (known: $ALL_DRIVERS)" >&2; exit 2 ;; esac
done
wants() { case " $DRIVERS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

say() { echo "clients: $*"; }

# ---------------------------------------------------------------- installs
# Runs a command quietly; shows its output only if it fails.
quietly() {
    local log rc=0
    log="$(mktemp)"
    "$@" >"$log" 2>&1 || rc=$?
    [ "$rc" = 0 ] || { cat "$log" >&2; echo "run.sh: failed ($rc): $*" >&2; }
    rm -f "$log"
    return "$rc"
}

APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" = 0 ]; then
        quietly apt-get update -q
        APT_UPDATED=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    quietly apt-get install -y -q "$@"
}

install_drivers() {
    if wants psycopg || wants asyncpg; then
        command -v python3 >/dev/null || { say "installing python3"; apt_install python3 python3-pip; }
        if ! python3 -c 'import psycopg, asyncpg' 2>/dev/null; then
            say "installing psycopg 3 and asyncpg (pip)"
            local pep668=()
            # A distribution's own Python (PEP 668) needs consent to install with pip.
            python3 -c 'import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))' \
                && pep668=(--break-system-packages)
            quietly python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
                "${pep668[@]}" -r "$HERE/python/requirements.txt"
        fi
    fi
    if wants node; then
        command -v npm >/dev/null || { say "installing node.js and npm"; apt_install nodejs npm; }
        local nm="$HERE/node/node_modules/.package-lock.json"
        if [ ! -f "$nm" ] || [ "$HERE/node/package-lock.json" -nt "$nm" ]; then
            say "installing node-postgres (npm ci)"
            (cd "$HERE/node" && quietly npm ci --no-audit --no-fund --loglevel=error)
        fi
    fi
    if wants jdbc; then
        command -v javac >/dev/null || { say "installing a JDK"; apt_install openjdk-17-jdk-headless; }
        [ -f /usr/share/java/postgresql.jar ] || { say "installing pgjdbc (apt)"; apt_install libpostgresql-jdbc-java; }
    fi
    if wants pgbench; then
        command -v pgbench >/dev/null || { say "installing pgbench"; apt_install postgresql-client postgresql-contrib; }
    fi
}
[ "$INSTALL" = 1 ] && install_drivers

# ---------------------------------------------------------------- endpoint
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pgsluice-clients.XXXXXX")"
DEMO_PID=""
# The demo is running (an exited child stays a zombie until waited for, and
# `kill -0` still succeeds on a zombie).
demo_alive() {
    local state
    state="$(cut -d' ' -f3 "/proc/$DEMO_PID/stat" 2>/dev/null || true)"
    [ -n "$state" ] && [ "$state" != Z ]
}
cleanup() {
    if [ -n "$DEMO_PID" ] && demo_alive; then
        # SIGTERM: the demo closes its clients, stops PostgreSQL and removes
        # the data. SIGKILL only if it has not exited 30 s later.
        kill -TERM "$DEMO_PID" 2>/dev/null || true
        for _ in $(seq 1 300); do demo_alive || break; sleep 0.1; done
        kill -KILL "$DEMO_PID" 2>/dev/null || true
    fi
    if [ -n "$DEMO_PID" ]; then wait "$DEMO_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -n "${PGSLUICE_URL:-}" ]; then
    if [ "$DIRECT" = 1 ]; then
        URL="${PGSLUICE_DIRECT_URL:?--direct with PGSLUICE_URL needs PGSLUICE_DIRECT_URL (PostgreSQL itself)}"
        say "direct to PostgreSQL at ${URL##*@}"
    else
        URL="$PGSLUICE_URL"
        say "pgsluice at ${URL##*@} (mode and pool as configured there)"
    fi
else
    BIN="${PGSLUICE_BIN:-$ROOT/target/debug/pgsluice}"
    if [ -z "${PGSLUICE_BIN:-}" ]; then
        # Build when missing or older than the sources, so a run never tests a stale binary.
        if [ ! -x "$BIN" ] || [ -n "$(find "$ROOT/src" "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" -newer "$BIN" -print -quit)" ]; then
            say "building pgsluice (cargo build)"
            (cd "$ROOT" && cargo build --quiet --bin pgsluice)
        fi
    fi
    [ -x "$BIN" ] || { echo "run.sh: no pgsluice binary at $BIN" >&2; exit 2; }
    # Session mode queues 20 workers' whole sessions on 2 servers: the last
    # ones wait ~20 s, too close to the default 30 s checkout_timeout.
    CHECKOUT_TIMEOUT=30s
    [ "$MODE" = session ] && CHECKOUT_TIMEOUT=120s
    PGSLUICE_GENERAL__POOL_SIZE="${PGSLUICE_GENERAL__POOL_SIZE:-2}" \
    PGSLUICE_GENERAL__MAX_POOL_SIZE="${PGSLUICE_GENERAL__MAX_POOL_SIZE:-2}" \
    NO_COLOR=1 PGSLUICE_GENERAL__POOL_MODE="$MODE" \
    PGSLUICE_GENERAL__CHECKOUT_TIMEOUT="${PGSLUICE_GENERAL__CHECKOUT_TIMEOUT:-$CHECKOUT_TIMEOUT}" \
        "$BIN" demo --port 0 >"$WORK/demo.out" 2>"$WORK/demo.err" </dev/null &
    DEMO_PID=$!
    for _ in $(seq 1 600); do
        grep -q '^primary: ' "$WORK/demo.out" 2>/dev/null && break
        if ! demo_alive; then
            echo "run.sh: pgsluice demo exited before it was ready:" >&2
            cat "$WORK/demo.err" >&2
            exit 2
        fi
        sleep 0.1
    done
    grep -q '^primary: ' "$WORK/demo.out" || { echo "run.sh: demo not ready after 60s" >&2; cat "$WORK/demo.err" >&2; exit 2; }
    URL="$(sed -n 's/^pgsluice: //p' "$WORK/demo.out")"
    PRIMARY="$(sed -n 's/^primary: //p' "$WORK/demo.out")"
    if [ "$DIRECT" = 1 ]; then
        # Same user, password and database, on the primary itself.
        URL="${URL%@*}@$PRIMARY/${URL##*/}"
        say "direct to the demo primary $PRIMARY (no pgsluice)"
    else
        say "pgsluice demo at ${URL##*@}, pool_mode=$MODE, pool_size=${PGSLUICE_GENERAL__POOL_SIZE:-2}, workers=$WORKERS"
    fi
fi

# ---------------------------------------------------------------- drivers
run_driver() {
    local name="$1"; shift
    case "$name" in
        psycopg) (cd "$HERE/python" && exec python3 psycopg_check.py "$URL") ;;
        asyncpg) (cd "$HERE/python" && exec python3 asyncpg_check.py "$URL") ;;
        node) (cd "$HERE/node" && exec node check.js "$URL") ;;
        jdbc)
            mkdir -p "$WORK/java"
            javac -nowarn -d "$WORK/java" -cp /usr/share/java/postgresql.jar "$HERE/java/JdbcCheck.java" &&
                java -cp "$WORK/java:/usr/share/java/postgresql.jar" JdbcCheck "$URL" ;;
        pgbench) bash "$HERE/pgbench/check.sh" "$URL" ;;
    esac
}

export HERE URL WORK
TOTAL_PASSED=0
TOTAL_FAILED=0
SUMMARY=()
for d in $DRIVERS; do
    say "---- $d"
    start=$(date +%s)
    set +e
    timeout -k 5 "$DRIVER_TIMEOUT" bash -c "$(declare -f run_driver); run_driver $d" \
        </dev/null 2>&1 | tee "$WORK/$d.log" | sed -u "s/^/[$d] /"
    rc=${PIPESTATUS[0]}
    set -e
    secs=$(( $(date +%s) - start ))
    line="$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$WORK/$d.log" | tail -n 1 || true)"
    if [ -n "$line" ]; then
        p="${line%% passed*}"; f="${line#*passed, }"; f="${f%% failed*}"
    else
        p=0; f=0
    fi
    if [ "$rc" != 0 ] && [ "$f" = 0 ]; then
        # Crashed, hung (124 = timeout) or failed without counting it.
        f=1
        echo "[$d] FAIL exited with status $rc$([ "$rc" = 124 ] && echo " (killed after ${DRIVER_TIMEOUT}s)")"
    fi
    TOTAL_PASSED=$((TOTAL_PASSED + p))
    TOTAL_FAILED=$((TOTAL_FAILED + f))
    SUMMARY+=("$(printf '%-8s %5s passed, %3s failed  (%ss)' "$d" "$p" "$f" "$secs")")
done

if [ -n "$DEMO_PID" ] && ! demo_alive; then
    echo "clients: FAIL the pgsluice demo died during the run:"
    tail -n 20 "$WORK/demo.err"
    TOTAL_FAILED=$((TOTAL_FAILED + 1))
fi
if [ "$TOTAL_FAILED" != 0 ] && [ -n "$DEMO_PID" ] && [ "$DIRECT" = 0 ]; then
    warnings="$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/demo.err" | grep -E ' (WARN|ERROR) ' | tail -n 10 || true)"
    if [ -n "$warnings" ]; then
        say "last pgsluice warnings:"
        echo "$warnings" | sed 's/^/  /'
    fi
fi

if [ "$DIRECT" = 1 ]; then target="direct"; elif [ -n "${PGSLUICE_URL:-}" ]; then target="pgsluice"; else target="pgsluice $MODE mode"; fi
say "==== $target"
for s in "${SUMMARY[@]}"; do say "$s"; done
if [ "$TOTAL_FAILED" != 0 ]; then
    for d in $DRIVERS; do
        grep -h 'by check (passed/total)' "$WORK/$d.log" 2>/dev/null | sed 's/^/clients: /' || true
    done
fi
echo "$TOTAL_PASSED passed, $TOTAL_FAILED failed"
[ "$TOTAL_FAILED" = 0 ]
