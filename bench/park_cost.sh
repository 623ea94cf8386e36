#!/usr/bin/env bash
# What parking costs in CPU: pgsluice's CPU per request for clients that pause between
# requests, with parking off (park_idle_clients_after = "0s") and at other settings.
#
# usage: bench/park_cost.sh [--clients N] [--think-ms MS] [--seconds S] [--rounds R] [SETTING...]
#   SETTING      park_idle_clients_after values to compare with "0s" (default: 1s 5s)
#   --clients N  pgbench clients (default 600)
#   --think-ms   each client's pause before each request (default 3000: every request
#                of a client parked after 1 s wakes it)
#   --seconds S  measured window, after 10 s of warm-up (default 35)
#   --rounds R   rounds; each runs every setting once, in rotated order (default 2)
# environment: PGSLUICE_BIN (default <repo>/target/release/pgsluice)
#
# Each run starts `pgsluice demo` with PGSLUICE_GENERAL__PARK_IDLE_CLIENTS_AFTER set, runs
# pgbench -n with a script of `\sleep` then one point select through it, and reads pgsluice's
# user + system CPU ticks (/proc/PID/stat) at the start and end of the window; requests in
# the window come from pgbench's per-second progress lines. The demo's replica monitor and
# the logins before the window are in neither. Prints one markdown table: µs of CPU per
# request per setting (median over rounds) and the difference from "0s".
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

CLIENTS=600 THINK_MS=3000 SECONDS_MEASURED=35 ROUNDS=2 WARM=10
SETTINGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --clients) [ $# -ge 2 ] || die "--clients needs a value"; CLIENTS=$2; shift 2 ;;
    --think-ms) [ $# -ge 2 ] || die "--think-ms needs a value"; THINK_MS=$2; shift 2 ;;
    --seconds) [ $# -ge 2 ] || die "--seconds needs a value"; SECONDS_MEASURED=$2; shift 2 ;;
    --rounds) [ $# -ge 2 ] || die "--rounds needs a value"; ROUNDS=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) die "unknown argument: $1" ;;
    *) SETTINGS+=("$1"); shift ;;
  esac
done
for v in "$CLIENTS" "$THINK_MS" "$SECONDS_MEASURED" "$ROUNDS"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || die "numbers must be positive integers (got '$v')"
done
[ ${#SETTINGS[@]} -gt 0 ] || SETTINGS=(1s 5s)
SETTINGS=(0s "${SETTINGS[@]}")

BIN=${PGSLUICE_BIN:-$REPO/target/release/pgsluice}
[ -x "$BIN" ] || die "$BIN is missing: cargo build --release"
command -v pgbench >/dev/null || die "pgbench not found"
ensure_pg_user
ulimit -n "$(ulimit -Hn)"

WORK=$(mktemp -d /tmp/pgsluice-parkcost.XXXXXX)
chmod 755 "$WORK"
DEMO_PID=''
cleanup() {
  [ -z "$DEMO_PID" ] || stop_pid "$DEMO_PID" TERM 60
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

printf '\\set aid random(1, 100000 * :scale)\n\\sleep %s ms\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n' \
  "$THINK_MS" >"$WORK/think.sql"
export PGPASSWORD=app
TICK=$(getconf CLK_TCK)

# run SETTING -> prints "µs-per-request requests"
run() {
  local setting=$1 port t0 t1 reqs i
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  PGSLUICE_GENERAL__PARK_IDLE_CLIENTS_AFTER=$setting PGSLUICE_GENERAL__MAX_CLIENT_CONN=$((CLIENTS + 100)) \
    setsid "$BIN" demo --port "$port" --max-connections 300 </dev/null >"$WORK/demo.out" 2>"$WORK/demo.err" &
  DEMO_PID=$!
  for ((i = 0; i < 1800; i++)); do
    [ "$(grep -c '^replica: ' "$WORK/demo.out" 2>/dev/null)" -ge 2 ] && break
    alive "$DEMO_PID" || { tail -n 20 "$WORK/demo.err" >&2; die "the demo exited"; }
    sleep 0.1
  done
  pgbench -i -q -s 10 -h 127.0.0.1 -p "$port" -U app app >"$WORK/init.log" 2>&1 ||
    { tail -n 20 "$WORK/init.log" >&2; die "pgbench -i failed"; }
  pgbench -n -f "$WORK/think.sql" -c "$CLIENTS" -j 2 -P 1 -T $((WARM + SECONDS_MEASURED + 5)) \
    -h 127.0.0.1 -p "$port" -U app app >"$WORK/pgbench.out" 2>"$WORK/pgbench.err" &
  local pgb=$!
  sleep "$WARM"
  t0=$(awk '{ print $14 + $15 }' "/proc/$DEMO_PID/stat")
  sleep "$SECONDS_MEASURED"
  t1=$(awk '{ print $14 + $15 }' "/proc/$DEMO_PID/stat")
  wait "$pgb" || { tail -n 20 "$WORK/pgbench.err" >&2; die "pgbench failed"; }
  reqs=$(awk -v a="$WARM" -v b=$((WARM + SECONDS_MEASURED)) \
    '/^progress: / { t = $2 + 0; if (t > a && t <= b) n += $4 } END { printf "%d", n }' "$WORK/pgbench.err")
  [ "$reqs" -gt 0 ] || die "no requests in the window (pgbench output: $WORK/pgbench.err)"
  stop_pid "$DEMO_PID" TERM 60
  DEMO_PID=''
  python3 -c 'import sys; t0, t1, tick, n = map(float, sys.argv[1:]); print("%.1f %d" % ((t1 - t0) / tick * 1e6 / n, n))' \
    "$t0" "$t1" "$TICK" "$reqs"
}

declare -A RESULTS
for ((r = 0; r < ROUNDS; r++)); do
  n=${#SETTINGS[@]}
  for ((k = 0; k < n; k++)); do
    s=${SETTINGS[$(((k + r) % n))]}
    log "round $((r + 1)): park_idle_clients_after = $s"
    read -r us reqs < <(run "$s")
    log "  $us µs of CPU per request ($reqs requests)"
    RESULTS[$s]="${RESULTS[$s]:-} $us"
  done
done

echo "| park_idle_clients_after | µs of pgsluice CPU per request (median; rounds) | vs \"0s\" |"
echo "|---|---:|---:|"
base=''
for s in "${SETTINGS[@]}"; do
  read -r med all < <(python3 -c 'import statistics, sys; v = [float(x) for x in sys.argv[1].split()]; print("%.1f" % statistics.median(v), ", ".join("%.1f" % x for x in v))' "${RESULTS[$s]}")
  [ -n "$base" ] || base=$med
  diff=$(python3 -c 'import sys; print("%+.1f µs" % (float(sys.argv[1]) - float(sys.argv[2])))' "$med" "$base")
  [ "$s" = 0s ] && diff='—'
  echo "| \`$s\` | $med ($all) | $diff |"
done
echo
echo "$CLIENTS pgbench clients, each pausing ${THINK_MS} ms before every point select; ${SECONDS_MEASURED} s measured after ${WARM} s; $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo none)."
