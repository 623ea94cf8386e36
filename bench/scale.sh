#!/usr/bin/env bash
# Scale stages of issue 7: RSS per idle client (pgsluice vs pgbouncer), many concurrent
# clients on one pgsluice, a client spike, and a soak. See bench/README.md.
#
# usage: bench/scale.sh [--stages LIST] [--merge] [--quick] [--soak-minutes N] [--clients N]
#   --stages LIST      comma-separated subset of idle-memory,idle-worked,clients50k,spike,soak
#                      (default: all)
#   --merge            keep the other stages' rows of an earlier run in the output CSV/report
#   --quick            small sizes: 2,000 idle/total clients, spike to 500, 1-minute soak;
#                      writes bench/results/scale-quick.{md,csv}
#   --soak-minutes N   soak length (default 30)
#   --clients N        total clients of the clients50k stage (default 50000)
# Other runs write bench/results/scale.{md,csv}.
# environment:
#   PGSLUICE_BIN       pgsluice binary (default: <repo>/target/release/pgsluice)
#   LOADGEN_BIN        load generator (default: built with cargo build --release --example loadgen)
#   BENCH_KEEP_WORK=1  keep the temp dir (loadgen output, pooler logs)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
SCALE_PY="$BENCH_DIR/scale.py"
spy() { python3 "$SCALE_PY" "$@"; }

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

ARGS=("$@")
STAGES=idle-memory,idle-worked,clients50k,spike,soak
QUICK=0
MERGE=0
SOAK_MINUTES=30
TOTAL_CLIENTS=''
while [ $# -gt 0 ]; do
  case $1 in
    --stages) [ $# -ge 2 ] || die "--stages needs a value"; STAGES=$2; shift 2 ;;
    --stages=*) STAGES=${1#*=}; shift ;;
    --quick) QUICK=1; shift ;;
    --merge) MERGE=1; shift ;;
    --soak-minutes) [ $# -ge 2 ] || die "--soak-minutes needs a value"; SOAK_MINUTES=$2; shift 2 ;;
    --soak-minutes=*) SOAK_MINUTES=${1#*=}; shift ;;
    --clients) [ $# -ge 2 ] || die "--clients needs a value"; TOTAL_CLIENTS=$2; shift 2 ;;
    --clients=*) TOTAL_CLIENTS=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ $SOAK_MINUTES =~ ^[1-9][0-9]*$ ]] || die "--soak-minutes must be a positive integer (got '$SOAK_MINUTES')"
for s in ${STAGES//,/ }; do
  case $s in idle-memory|idle-worked|clients50k|spike|soak) ;; *) die "unknown stage '$s' (idle-memory, idle-worked, clients50k, spike, soak)" ;; esac
done
has_stage() { [[ ",$STAGES," == *",$1,"* ]]; }

# ------------------------------------------------------------------ sizes
POOL_SIZE=20
SCALE=10
ACTIVE=1000         # active clients of clients50k
ACTIVE_SECS=30      # each active run of clients50k
IDLE_MEM_CLIENTS=10000
IDLE_SETTLE_S=12
SPIKE_BASE=100
SPIKE_PEAK=5000
SPIKE_BEFORE=10 SPIKE_HOLD=10 SPIKE_AFTER=15
SOAK_CLIENTS=50
SOAK_WRITE_PCT=20
SOAK_RECONNECT=100
SOAK_SAMPLE_S=5
LOGIN_CONCURRENCY=64
CHECKOUT_TIMEOUT_S=30 # pgsluice's default general.checkout_timeout; not overridden here
if [ "$QUICK" = 1 ]; then
  IDLE_MEM_CLIENTS=2000 ACTIVE=200 ACTIVE_SECS=10 SPIKE_PEAK=500
  [ -n "$TOTAL_CLIENTS" ] || TOTAL_CLIENTS=2000
  [[ " ${ARGS[*]} " == *" --soak-minutes"* ]] || SOAK_MINUTES=1
  OUT_MD=$BENCH_DIR/results/scale-quick.md
  OUT_CSV=$BENCH_DIR/results/scale-quick.csv
else
  OUT_MD=$BENCH_DIR/results/scale.md
  OUT_CSV=$BENCH_DIR/results/scale.csv
fi
TOTAL_CLIENTS=${TOTAL_CLIENTS:-50000}
if ! [[ $TOTAL_CLIENTS =~ ^[1-9][0-9]*$ ]] || [ "$TOTAL_CLIENTS" -le "$ACTIVE" ]; then
  die "--clients must be an integer above the $ACTIVE active clients (got '$TOTAL_CLIENTS')"
fi

# The soak's RSS reference: after 2 minutes, or a quarter of a short soak.
SOAK_SECS=$((SOAK_MINUTES * 60))
SOAK_REF_S=120
[ "$SOAK_SECS" -ge 480 ] || SOAK_REF_S=$((SOAK_SECS / 4))

export PGHOST=127.0.0.1 PGUSER=app PGPASSWORD=app PGDATABASE=app PGSSLMODE=disable PGCONNECT_TIMEOUT=15
unset PGSERVICE PGOPTIONS

START_EPOCH=$(date +%s)
COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "none")
if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  COMMIT="$COMMIT (working tree has uncommitted changes)"
fi
WORK=$(mktemp -d /tmp/pgsluice-scale.XXXXXX)
chmod 755 "$WORK"
RESULTS=$WORK/scale.csv
DEMO_PID='' BOUNCER_PID='' FLOOR_PID='' SAMPLER_PID='' WORKED_PIDS=()
LOADGEN_PIDS=()
NOTES=()

# ------------------------------------------------------------------ cleanup
stop_loadgens() {
  local p
  for p in "${LOADGEN_PIDS[@]}"; do stop_pid "$p" TERM 60; wait "$p" 2>/dev/null || true; done
  LOADGEN_PIDS=()
}

cleanup() {
  local rc=$? left p
  set +e
  trap - EXIT
  trap '' INT TERM
  stop_loadgens
  if [ -n "$SAMPLER_PID" ]; then kill "$SAMPLER_PID" 2>/dev/null; wait "$SAMPLER_PID" 2>/dev/null; fi
  if [ -n "$BOUNCER_PID" ]; then log "stopping pgbouncer (pid $BOUNCER_PID)"; stop_pid "$BOUNCER_PID" TERM 10; fi
  if [ -n "$FLOOR_PID" ]; then stop_pid "$FLOOR_PID" TERM 10; fi
  for p in "${WORKED_PIDS[@]}"; do stop_pid "$p" TERM 10; done
  if [ -n "$DEMO_PID" ]; then
    log "stopping the demo (pid $DEMO_PID)"
    stop_pid "$DEMO_PID" TERM 60
    wait "$DEMO_PID" 2>/dev/null
    left=$(ps -o pid= -s "$DEMO_PID" 2>/dev/null | tr -s ' \n' ' ' || true)
    for p in $left; do kill -TERM "$p" 2>/dev/null; done
  fi
  if [ "$rc" -ne 0 ] && [ -s "$RESULTS" ]; then
    mkdir -p "$BENCH_DIR/results" && cp "$RESULTS" "$BENCH_DIR/results/scale-partial.csv" &&
      log "the rows so far are in bench/results/scale-partial.csv"
  fi
  if [ "$rc" -ne 0 ] && [ -s "$WORK/demo.err" ]; then tail -n 20 "$WORK/demo.err" >&2; fi
  if [ "${BENCH_KEEP_WORK:-0}" = 1 ]; then log "keeping $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ------------------------------------------------------------------ 1. prerequisites
command -v python3 >/dev/null || die "python3 not found"
command -v psql >/dev/null || die "psql not found"
command -v pgbench >/dev/null || die "pgbench not found"
command -v ss >/dev/null || die "ss not found (Debian: apt-get install -y iproute2)"
if has_stage idle-memory || has_stage idle-worked; then command -v pgbouncer >/dev/null || die "pgbouncer not found (apt-get install -y pgbouncer)"; fi
ensure_pg_user

BIN=${PGSLUICE_BIN:-$REPO/target/release/pgsluice}
[ -x "$BIN" ] || die "$BIN is missing: cargo build --release (or set PGSLUICE_BIN)"
"$BIN" demo --help >/dev/null 2>&1 || die "$BIN has no working 'demo' subcommand"
if [ -n "${LOADGEN_BIN:-}" ]; then
  LOADGEN=$LOADGEN_BIN
else
  command -v cargo >/dev/null || die "cargo not found to build the load generator (or set LOADGEN_BIN)"
  log "building the load generator: cargo build --release --example loadgen --example idle_floor"
  (cd "$REPO" && cargo build --release --example loadgen --example idle_floor) >"$WORK/cargo.log" 2>&1 ||
    { tail -n 30 "$WORK/cargo.log" >&2; die "cargo build --release --example loadgen failed"; }
  LOADGEN=${CARGO_TARGET_DIR:-$REPO/target}/release/examples/loadgen
fi
[ -x "$LOADGEN" ] || die "load generator $LOADGEN not found"
# The memory floor of a tokio task per client (examples/idle_floor.rs), measured beside the
# poolers in the idle-memory stage; built next to the load generator.
FLOOR_BIN=${IDLE_FLOOR_BIN:-$(dirname "$LOADGEN")/idle_floor}
BIN_DATE="built $(date -d "@$(stat -c %Y "$BIN")" '+%Y-%m-%d %H:%M %Z')"

# Every process here (pgsluice, loadgen, pgbouncer) needs one descriptor per connection.
HARD_NOFILE=$(ulimit -Hn)
[ "$HARD_NOFILE" = unlimited ] && HARD_NOFILE=1048576
ulimit -n "$HARD_NOFILE" 2>/dev/null || true
NOFILE=$(ulimit -n)
PORT_RANGE=$(tr '\t' '-' </proc/sys/net/ipv4/ip_local_port_range)
read -r PORT_LO PORT_HI </proc/sys/net/ipv4/ip_local_port_range
PORTS_PER_SOURCE=$((PORT_HI - PORT_LO + 1))
LIMITS="open files: soft $NOFILE, hard $(ulimit -Hn) per process (fs.nr_open $(cat /proc/sys/fs/nr_open))"
LIMITS="$LIMITS; net.ipv4.ip_local_port_range $PORT_RANGE ($PORTS_PER_SOURCE ports per source address)"
LIMITS="$LIMITS; net.core.somaxconn $(cat /proc/sys/net/core/somaxconn); net.ipv4.tcp_max_syn_backlog $(cat /proc/sys/net/ipv4/tcp_max_syn_backlog)"
LIMITS="$LIMITS; memory $(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
log "limits: $LIMITS"

# clients50k: pgsluice holds every client socket in one process, so the total is bounded by
# its open-files limit (minus its listeners, server connections and files).
REQUESTED_TOTAL=$TOTAL_CLIENTS
REDUCED=''
FD_MARGIN=1000
if has_stage clients50k && [ $((TOTAL_CLIENTS + FD_MARGIN)) -gt "$NOFILE" ]; then
  TOTAL_CLIENTS=$((NOFILE - FD_MARGIN))
  REDUCED="reduced from $REQUESTED_TOTAL to $TOTAL_CLIENTS: one process may hold only $NOFILE descriptors here (ulimit -Hn $(ulimit -Hn); raising it needs CAP_SYS_RESOURCE, which this container lacks), and pgsluice needs one per client"
  log "warning: clients50k $REDUCED"
  NOTES+=("clients50k: $REDUCED.")
  [ "$TOTAL_CLIENTS" -gt "$ACTIVE" ] || die "the open-files limit $NOFILE leaves no room for $ACTIVE active clients"
fi
IDLE_CLIENTS=$((TOTAL_CLIENTS - ACTIVE))
# Enough source addresses that none needs more than 3/4 of its ephemeral ports (at least 4,
# so that closed connections in TIME_WAIT from earlier stages leave ports free).
SOURCES=$(( (TOTAL_CLIENTS + PORTS_PER_SOURCE * 3 / 4 - 1) / (PORTS_PER_SOURCE * 3 / 4) ))
[ "$SOURCES" -ge 4 ] || SOURCES=4
# One loadgen process per chunk of idle clients, each below its own descriptor limit.
IDLE_CHUNK=$((NOFILE - 500))

MAX_CLIENT_CONN=$((TOTAL_CLIENTS + SPIKE_PEAK + 1000))

# ------------------------------------------------------------------ 2. pgsluice demo + pgbouncer
read -r SLUICE_PORT ADMIN_PORT BOUNCER_PORT FLOOR_PORT < <(py freeport 4)
export PGSLUICE_GENERAL__POOL_SIZE=$POOL_SIZE PGSLUICE_GENERAL__MAX_POOL_SIZE=$POOL_SIZE
export PGSLUICE_GENERAL__MAX_CLIENT_CONN=$MAX_CLIENT_CONN
export PGSLUICE_ADMIN__HTTP_LISTEN_ADDR=127.0.0.1:$ADMIN_PORT
log "starting: $BIN demo --port $SLUICE_PORT --max-connections 300 (max_client_conn $MAX_CLIENT_CONN, admin 127.0.0.1:$ADMIN_PORT)"
setsid "$BIN" demo --port "$SLUICE_PORT" --max-connections 300 </dev/null >"$WORK/demo.out" 2>"$WORK/demo.err" &
DEMO_PID=$!
for ((i = 0; i < 1800; i++)); do
  nrep=$(grep -c '^replica: ' "$WORK/demo.out" 2>/dev/null) || nrep=0
  [ "$nrep" -ge 2 ] && break
  alive "$DEMO_PID" || { cat "$WORK/demo.out" "$WORK/demo.err" >&2; die "the demo exited before it was ready"; }
  sleep 0.1
done
[ "$nrep" -ge 2 ] || die "the demo did not print its endpoint lines within 180 s"
PRIMARY=$(sed -n 's/^primary: //p' "$WORK/demo.out" | head -n1)
PRIMARY_PORT=${PRIMARY##*:}
SLUICE_NOFILE=$(awk '/Max open files/ {print $4}' "/proc/$DEMO_PID/limits")
log "demo ready (pid $DEMO_PID, open files $SLUICE_NOFILE); primary on $PRIMARY_PORT"
psql -p "$SLUICE_PORT" -Atqc 'select 1' >/dev/null 2>"$WORK/psql.err" ||
  { cat "$WORK/psql.err" >&2; die "cannot run 'select 1' through pgsluice"; }
SLUICE_AUTH=$(py authprobe 127.0.0.1 "$SLUICE_PORT" app app || true)
log "pgsluice asks clients for: $SLUICE_AUTH"

log "pgbench -i -s $SCALE (through the primary)"
pgbench -i -s "$SCALE" -q -p "$PRIMARY_PORT" >"$WORK/init.log" 2>&1 ||
  { tail -n 20 "$WORK/init.log" >&2; die "pgbench -i failed"; }

if has_stage idle-memory || has_stage idle-worked; then
  # As in run.sh: pgbouncer's auth_file holds a SCRAM secret identical to the server's, and
  # clients get the same method pgsluice asks for.
  case $SLUICE_AUTH in trust|plain|md5|scram-sha-256) BOUNCER_AUTH=$SLUICE_AUTH ;; *) BOUNCER_AUTH=scram-sha-256 ;; esac
  AUTH_FILE_PW=app
  if [ "$BOUNCER_AUTH" = scram-sha-256 ]; then
    AUTH_FILE_PW=$(py scram-secret app)
    psql -p "$PRIMARY_PORT" -v ON_ERROR_STOP=1 -Atqc "ALTER ROLE app PASSWORD '$AUTH_FILE_PW'" >/dev/null 2>"$WORK/psql.err" ||
      { cat "$WORK/psql.err" >&2; die "could not set app's password to a SCRAM secret"; }
  fi
  start_pgbouncer "$WORK/pgbouncer" pgbouncer "$BOUNCER_PORT" "$PRIMARY_PORT" "$BOUNCER_AUTH" "$POOL_SIZE" "$MAX_CLIENT_CONN" "$AUTH_FILE_PW"
  BOUNCER_PID=$STARTED_PGBOUNCER_PID
  log "pgbouncer pid $BOUNCER_PID on $BOUNCER_PORT (auth $BOUNCER_AUTH, open files $(awk '/Max open files/ {print $4}' "/proc/$BOUNCER_PID/limits"))"
  if [ -x "$FLOOR_BIN" ]; then
    "$FLOOR_BIN" "127.0.0.1:$FLOOR_PORT" >"$WORK/idle_floor.log" 2>&1 &
    FLOOR_PID=$!
    log "idle_floor pid $FLOOR_PID on $FLOOR_PORT"
  else
    log "no $FLOOR_BIN: the idle-memory stage measures the poolers only"
  fi
fi

# ------------------------------------------------------------------ helpers
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
established() { ss -Htn state established "( sport = :$1 )" | wc -l; }
# tcpext NAME -> a TcpExt counter from /proc/net/netstat (system-wide, since boot)
tcpext() { awk -v n="$1" '$1 == "TcpExt:" { if (!h) { for (i = 2; i <= NF; i++) k[i] = $i; h = 1 } else for (i = 2; i <= NF; i++) if (k[i] == n) print $i }' /proc/net/netstat; }
scrape() { python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' "http://127.0.0.1:$ADMIN_PORT/metrics" >"$1" || : >"$1"; }
check_alive() { alive "$DEMO_PID" || die "pgsluice (demo pid $DEMO_PID) died during $1"; }

# loadgen_active OUT SECONDS ARGS... -> `loadgen active --duration SECONDS ARGS` in the foreground
loadgen_active() {
  local out=$1 secs=$2 rc=0
  shift 2
  timeout -k 10 $((secs + 300)) "$LOADGEN" active --duration "$secs" "$@" >"$out" 2>"$out.err" || rc=$?
  [ "$rc" -eq 0 ] || { tail -n 5 "$out.err" >&2; die "loadgen active failed (exit $rc)"; }
  spy event "$out" summary >/dev/null || die "loadgen active printed no summary ($out)"
}

# start_idle PORT N OUTPREFIX -> starts ceil(N/IDLE_CHUNK) holders, waits until all are ready
IDLE_FILES=()
start_idle() {
  local port=$1 n=$2 prefix=$3 k=0 left chunk f i
  shift 3 # the rest: extra loadgen idle arguments
  IDLE_FILES=()
  left=$n
  while [ "$left" -gt 0 ]; do
    chunk=$((left < IDLE_CHUNK ? left : IDLE_CHUNK))
    f="$prefix.$k.jsonl"
    "$LOADGEN" idle --port "$port" --clients "$chunk" --sources "$SOURCES" --concurrency "$LOGIN_CONCURRENCY" "$@" \
      >"$f" 2>"$f.err" &
    LOADGEN_PIDS+=("$!")
    IDLE_FILES+=("$f")
    left=$((left - chunk)); k=$((k + 1))
  done
  for f in "${IDLE_FILES[@]}"; do
    for ((i = 0; i < 36000; i++)); do
      spy event "$f" ready >/dev/null && break
      [ -s "$f.err" ] && ! grep -q '"event"' "$f" && { cat "$f.err" >&2; die "loadgen idle failed"; }
      check_alive "the idle ramp"
      sleep 0.5
    done
    spy event "$f" ready >/dev/null || die "loadgen idle did not get ready ($f)"
  done
}

# sum_field EVENT KEY -> sum of a numeric field over the idle holders' outputs
sum_field() {
  local f s=0 v
  for f in "${IDLE_FILES[@]}"; do
    v=$(spy field "$f" "$1" "$2"); v=${v%.*}
    s=$((s + ${v:-0}))
  done
  echo "$s"
}
max_field() {
  local f m=0 v
  for f in "${IDLE_FILES[@]}"; do
    v=$(spy field "$f" "$1" "$2")
    m=$(python3 -c 'import sys; print(max(float(sys.argv[1]), float(sys.argv[2] or 0)))' "$m" "$v")
  done
  echo "$m"
}

# ------------------------------------------------------------------ stage: idle-memory
# measure_idle STAGE TARGET PORT PID [LOADGEN IDLE ARGS...] -> one row of RSS per idle client
measure_idle() {
  local stage=$1 tgt=$2 port=$3 pid=$4 before fresh held after est opened verified errors ramp lps n=$IDLE_MEM_CLIENTS
  shift 4
  log "$stage: $tgt, warm-up then $n idle clients"
  # The floor runs no SQL: nothing to warm up.
  [ "$tgt" = tokio-floor ] || loadgen_active "$WORK/$stage-warm-$tgt.jsonl" 3 --port "$port" --clients 16
  sleep 2
  before=$(rss_kb "$pid")
  start_idle "$port" "$n" "$WORK/$stage-$tgt" "$@"
  sleep 3
  fresh=$(rss_kb "$pid")
  # Idle clients settle: pgsluice parks those idle for
  # park_idle_clients_after (5 s by default) within twice that.
  sleep "$IDLE_SETTLE_S"
  held=$(rss_kb "$pid")
  est=$(established "$port")
  ramp=$(max_field ready ramp_s)
  opened=$(sum_field ready opened)
  lps=$(python3 -c 'import sys; print(round(int(sys.argv[1]) / max(float(sys.argv[2]), 0.001)))' "$opened" "$ramp")
  stop_loadgens
  verified=$(sum_field "done" verified)
  errors=$(sum_field "done" errors)
  sleep 3
  after=$(rss_kb "$pid")
  log "$stage: $tgt RSS $before -> $held kB with $opened clients ($est sockets), $after kB after; errors $errors"
  spy record --csv "$RESULTS" --stage "$stage" --run "$tgt" --jsonl "${IDLE_FILES[0]}" \
    clients="$n" opened="$opened" verified="$verified" established="$est" rss_before_kb="$before" \
    rss_fresh_kb="$fresh" rss_held_kb="$held" rss_after_close_kb="$after" ready.ramp_s="$ramp" ready.logins_per_s="$lps" \
    done.errors="$errors" settle_s="$IDLE_SETTLE_S" \
    kb_per_client_fresh="$(python3 -c 'import sys; print(round((int(sys.argv[2]) - int(sys.argv[1])) / int(sys.argv[3]), 3))' "$before" "$fresh" "$n")" \
    kb_per_client="$(python3 -c 'import sys; print(round((int(sys.argv[2]) - int(sys.argv[1])) / int(sys.argv[3]), 3))' "$before" "$held" "$n")"
}

stage_idle_memory() {
  measure_idle idle-memory pgsluice "$SLUICE_PORT" "$DEMO_PID"
  measure_idle idle-memory pgbouncer "$BOUNCER_PORT" "$BOUNCER_PID"
  [ -z "$FLOOR_PID" ] || measure_idle idle-memory tokio-floor "$FLOOR_PORT" "$FLOOR_PID"
}

# ------------------------------------------------------------------ stage: idle-worked
# As idle-memory, for clients that have worked: each runs one simple-Query `SELECT 1` right
# after its login (pgbouncer's transaction mode serves it too), then idles. Measured on a
# second pgsluice (in front of the demo's nodes, set up as the demo's) and a second
# pgbouncer, both started for this stage: the idle-memory stage's clients left freed memory
# in the first two processes, which this stage's clients would reuse unseen.
stage_idle_worked() {
  local sport bport spid bpid replicas i
  read -r sport bport < <(py freeport 2)
  replicas=$(sed -n 's/^replica: //p' "$WORK/demo.out" | awk '{ printf "%s\"%s\"", (NR > 1 ? ", " : ""), $0 }')
  cat >"$WORK/worked.toml" <<EOF
[general]
listen_addr = "127.0.0.1:$sport"
pool_mode = "transaction"
pool_size = $POOL_SIZE
max_pool_size = $POOL_SIZE
max_client_conn = $MAX_CLIENT_CONN
[databases.app]
primary = "$PRIMARY"
replicas = [$replicas]
[users.app]
password = "app"
EOF
  env -u PGSLUICE_ADMIN__HTTP_LISTEN_ADDR "$BIN" -c "$WORK/worked.toml" </dev/null >"$WORK/worked.log" 2>&1 &
  spid=$!
  WORKED_PIDS+=("$spid")
  for ((i = 0; i < 300; i++)); do
    psql -p "$sport" -Atqc 'select 1' >/dev/null 2>&1 && break
    alive "$spid" || { tail -n 20 "$WORK/worked.log" >&2; die "the second pgsluice exited"; }
    sleep 0.1
  done
  start_pgbouncer "$WORK/pgbouncer-worked" pgbouncer "$bport" "$PRIMARY_PORT" "$BOUNCER_AUTH" "$POOL_SIZE" "$MAX_CLIENT_CONN" "$AUTH_FILE_PW"
  bpid=$STARTED_PGBOUNCER_PID
  WORKED_PIDS+=("$bpid")
  log "idle-worked: a second pgsluice (pid $spid) on $sport, a second pgbouncer (pid $bpid) on $bport"
  measure_idle idle-worked pgsluice "$sport" "$spid" --query-first simple
  measure_idle idle-worked pgbouncer "$bport" "$bpid" --query-first simple
  for i in "${WORKED_PIDS[@]}"; do stop_pid "$i" TERM 10; done
  WORKED_PIDS=()
}

# ------------------------------------------------------------------ stage: clients50k
stage_clients50k() {
  local args before held est_file ramp opened verified errors lps
  args=(--port "$SLUICE_PORT" --clients "$ACTIVE" --sources 1)
  log "clients50k: baseline, $ACTIVE active clients for ${ACTIVE_SECS}s without idle clients"
  loadgen_active "$WORK/c50-baseline-before.jsonl" "$ACTIVE_SECS" "${args[@]}"
  spy record --csv "$RESULTS" --stage clients50k --run baseline-before --jsonl "$WORK/c50-baseline-before.jsonl" \
    active_clients="$ACTIVE" idle_clients=0
  check_alive clients50k
  before=$(rss_kb "$DEMO_PID")
  log "clients50k: opening $IDLE_CLIENTS idle clients from $SOURCES source addresses (login concurrency $LOGIN_CONCURRENCY per holder)"
  start_idle "$SLUICE_PORT" "$IDLE_CLIENTS" "$WORK/c50-idle"
  held=$(rss_kb "$DEMO_PID")
  ramp=$(max_field ready ramp_s)
  opened=$(sum_field ready opened)
  lps=$(python3 -c 'import sys; print(round(int(sys.argv[1]) / max(float(sys.argv[2]), 0.001)))' "$opened" "$ramp")
  log "clients50k: $opened idle clients in ${ramp}s; pgsluice RSS $before -> $held kB; running $ACTIVE active clients"
  est_file=$WORK/c50-established
  ( sleep $((ACTIVE_SECS / 2)); established "$SLUICE_PORT" >"$est_file" ) &
  SAMPLER_PID=$!
  loadgen_active "$WORK/c50-with-idle.jsonl" "$ACTIVE_SECS" "${args[@]}"
  wait "$SAMPLER_PID" 2>/dev/null || true
  SAMPLER_PID=''
  spy record --csv "$RESULTS" --stage clients50k --run with-idle --jsonl "$WORK/c50-with-idle.jsonl" \
    active_clients="$ACTIVE" idle_clients="$opened"
  stop_loadgens
  verified=$(sum_field "done" verified)
  errors=$(sum_field "done" errors)
  log "clients50k: idle clients verified $verified of $IDLE_CLIENTS; errors $errors"
  spy record --csv "$RESULTS" --stage clients50k --run idle --jsonl "${IDLE_FILES[0]}" \
    requested_total="$REQUESTED_TOTAL" total="$TOTAL_CLIENTS" idle_clients="$IDLE_CLIENTS" active_clients="$ACTIVE" \
    sources="$SOURCES" concurrency="$LOGIN_CONCURRENCY" reduced_reason="$REDUCED" opened="$opened" ramp_s="$ramp" \
    logins_per_s="$lps" verified="$verified" done.errors="$errors" closed_while_idle="$(sum_field "done" closed_while_idle)" \
    rss_before_kb="$before" rss_held_kb="$held" established="$(cat "$est_file" 2>/dev/null || echo '')" \
    kb_per_client="$(python3 -c 'import sys; print(round((int(sys.argv[2]) - int(sys.argv[1])) / max(int(sys.argv[3]), 1), 3))' "$before" "$held" "$opened")"
  sleep 2
  log "clients50k: baseline again without idle clients"
  loadgen_active "$WORK/c50-baseline-after.jsonl" "$ACTIVE_SECS" "${args[@]}"
  spy record --csv "$RESULTS" --stage clients50k --run baseline-after --jsonl "$WORK/c50-baseline-after.jsonl" \
    active_clients="$ACTIVE" idle_clients=0
  check_alive clients50k
}

# ------------------------------------------------------------------ stage: spike
stage_spike() {
  local up=$SPIKE_BEFORE down=$((SPIKE_BEFORE + SPIKE_HOLD)) total=$((SPIKE_BEFORE + SPIKE_HOLD + SPIKE_AFTER))
  local burst=$((SPIKE_PEAK - SPIKE_BASE)) sched base_pid burst_pid rc=0 f cpu ovf syn
  sched="0:0,$up:$burst,$down:0"
  log "spike: $SPIKE_BASE steady clients; $burst more log in at ${up}s and leave at ${down}s (${total}s)"
  scrape "$WORK/metrics-before"
  ovf=$(tcpext ListenOverflows) syn=$(tcpext SyncookiesSent)
  # The burst runs in its own process: its clients' PBKDF2 work must not stall the steady
  # clients' runtime (on a real launch day they are other machines).
  "$LOADGEN" active --port "$SLUICE_PORT" --clients "$SPIKE_BASE" --duration "$total" --sources 1 \
    >"$WORK/spike-base.jsonl" 2>"$WORK/spike-base.jsonl.err" &
  base_pid=$!
  # nice: on a launch day the burst's clients are other machines; here they share the 2
  # cores, and their PBKDF2 work should not take the pooler's CPU first.
  nice -n 10 "$LOADGEN" active --port "$SLUICE_PORT" --schedule "$sched" --duration "$total" --sources 4 \
    >"$WORK/spike-burst.jsonl" 2>"$WORK/spike-burst.jsonl.err" &
  burst_pid=$!
  LOADGEN_PIDS+=("$base_pid" "$burst_pid")
  # Pooler CPU per second: utime+stime of the demo process over /proc/uptime's clock.
  (
    hz=$(getconf CLK_TCK)
    cpu_now() { awk '{ sub(/.*\) /, ""); split($0, f, " "); print f[12] + f[13] }' "/proc/$DEMO_PID/stat"; }
    # /proc/PID/schedstat field 2: ns the main thread (the runtime's only thread with the
    # default worker_threads = 1) waited on a run queue, i.e. runnable but not running.
    runq_now() { cut -d' ' -f2 "/proc/$DEMO_PID/schedstat"; }
    prev=$(cpu_now) prev_t=$(cut -d' ' -f1 /proc/uptime) prev_q=$(runq_now)
    for ((t = 1; t <= total; t++)); do
      sleep 1
      cur=$(cpu_now) || break
      cur_t=$(cut -d' ' -f1 /proc/uptime) cur_q=$(runq_now)
      awk -v t="$t" -v d="$((cur - prev))" -v hz="$hz" -v a="$prev_t" -v b="$cur_t" -v q="$((cur_q - prev_q))" \
        'BEGIN { printf "tick.%d.pooler_cpu_pct=%.0f\ntick.%d.pooler_runq_pct=%.0f\n", t, 100 * d / hz / (b - a), t, q / 1e7 / (b - a) }'
      prev=$cur prev_t=$cur_t prev_q=$cur_q
    done
  ) >"$WORK/spike-cpu" &
  SAMPLER_PID=$!
  for f in "$base_pid" "$burst_pid"; do wait "$f" || rc=$?; done
  LOADGEN_PIDS=()
  wait "$SAMPLER_PID" 2>/dev/null || true
  SAMPLER_PID=''
  [ "$rc" -eq 0 ] || { tail -n 5 "$WORK"/spike-*.err >&2; die "loadgen (spike) failed (exit $rc)"; }
  scrape "$WORK/metrics-after"
  spy record --csv "$RESULTS" --stage spike --run spike --jsonl "$WORK/spike-base.jsonl" --ticks \
    base_clients="$SPIKE_BASE" burst_clients="$burst" burst_schedule="$sched" up_s="$up" down_s="$down" \
    checkout_timeout_s="$CHECKOUT_TIMEOUT_S" listen_overflows="$(( $(tcpext ListenOverflows) - ovf ))" \
    syncookies_sent="$(( $(tcpext SyncookiesSent) - syn ))" \
    metrics_wait_max_s="$(spy waitmax "$WORK/metrics-before" "$WORK/metrics-after")"
  spy record --csv "$RESULTS" --stage spike --run spike --jsonl "$WORK/spike-burst.jsonl" --ticks --prefix burst.
  mapfile -t cpu <"$WORK/spike-cpu"
  [ "${#cpu[@]}" -eq 0 ] || spy record --csv "$RESULTS" --stage spike --run spike "${cpu[@]}"
  check_alive spike
}

# ------------------------------------------------------------------ stage: soak
stage_soak() {
  local t0 out=$WORK/soak.jsonl pid rc=0
  log "soak: $SOAK_MINUTES min, $SOAK_CLIENTS clients, ${SOAK_WRITE_PCT}% writes, reconnect every ~$SOAK_RECONNECT tx; RSS every ${SOAK_SAMPLE_S}s"
  "$LOADGEN" active --port "$SLUICE_PORT" --clients "$SOAK_CLIENTS" --duration "$SOAK_SECS" \
    --write-pct "$SOAK_WRITE_PCT" --reconnect-after "$SOAK_RECONNECT" --sources 1 >"$out" 2>"$out.err" &
  pid=$!
  LOADGEN_PIDS+=("$pid")
  t0=$(date +%s)
  while alive "$pid"; do
    check_alive soak
    spy record --csv "$RESULTS" --stage soak --run rss "$(( $(date +%s) - t0 ))=$(rss_kb "$DEMO_PID")"
    sleep "$SOAK_SAMPLE_S"
  done
  wait "$pid" || rc=$?
  LOADGEN_PIDS=()
  [ "$rc" -eq 0 ] || { tail -n 5 "$out.err" >&2; die "loadgen (soak) failed (exit $rc)"; }
  spy record --csv "$RESULTS" --stage soak --run rss "$(( $(date +%s) - t0 ))=$(rss_kb "$DEMO_PID")"
  spy record --csv "$RESULTS" --stage soak --run soak --jsonl "$out" minutes="$SOAK_MINUTES" clients="$SOAK_CLIENTS" \
    write_pct="$SOAK_WRITE_PCT" reconnect_after="$SOAK_RECONNECT" sample_s="$SOAK_SAMPLE_S" reference_s="$SOAK_REF_S"
}

# ------------------------------------------------------------------ run
if [ "$MERGE" = 1 ] && [ -s "$OUT_CSV" ]; then
  # Keep the rows of the stages not run now (verdicts are recomputed below).
  awk -F, -v stages=",$STAGES," 'NR == 1 || (index(stages, "," $1 ",") == 0 && $2 != "verdict")' "$OUT_CSV" >"$RESULTS"
fi
CMD="bench/scale.sh ${ARGS[*]}"
for s in ${STAGES//,/ }; do
  spy record --csv "$RESULTS" --stage "$s" --run meta commit="$COMMIT" date="$(date '+%Y-%m-%d %H:%M %Z')" \
    command="${CMD% }" pgsluice_bin="$BIN_DATE"
  case $s in
    idle-memory) stage_idle_memory ;;
    idle-worked) stage_idle_worked ;;
    clients50k) stage_clients50k ;;
    spike) stage_spike ;;
    soak) stage_soak ;;
  esac
done
spy judge --csv "$RESULTS"

ELAPSED=$(( $(date +%s) - START_EPOCH ))
{
  echo "date=$(date '+%Y-%m-%d %H:%M:%S %Z')"
  echo "cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  echo "nproc=$(nproc)"
  echo "mem=$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "kernel=$(uname -sr)"
  echo "commit=$COMMIT"
  echo "pgsluice_bin=pgsluice $BIN_DATE"
  echo "command=${CMD% } (PGSLUICE_BIN=${BIN#"$REPO"/}; $((ELAPSED / 60)) min $((ELAPSED % 60)) s)"
  echo "pg_version=$(psql -p "$PRIMARY_PORT" -Atqc 'select version()' 2>/dev/null | cut -d, -f1)"
  echo "pgbouncer_version=$(pgbouncer --version 2>/dev/null | head -n1)"
  echo "loadgen=examples/loadgen.rs (tokio-postgres, 2 worker threads, release build)"
  echo "limits=$LIMITS; pgsluice's open-files limit $SLUICE_NOFILE"
  echo "setup=\`pgsluice demo\` (primary + 2 streaming replicas, transaction mode, reads routed to replicas), pool_size $POOL_SIZE, max_client_conn $MAX_CLIENT_CONN, checkout_timeout ${CHECKOUT_TIMEOUT_S}s (default); client auth $SLUICE_AUTH for every login; pgbench scale $SCALE tables"
  printf 'notes='; (IFS=$'\x1f'; s="${NOTES[*]}"; printf '%s\n' "${s//$'\x1f'/ ;; }")
} >"$WORK/meta.txt"
mkdir -p "$(dirname "$OUT_CSV")"
cp "$RESULTS" "$OUT_CSV"
spy report --csv "$OUT_CSV" --meta "$WORK/meta.txt" --md "$OUT_MD" >/dev/null
FAILED=$(awk -F, '$3 == "pass" && $4 == "no" {print $1}' "$OUT_CSV" | tr '\n' ' ')
log "done in $((ELAPSED / 60)) min $((ELAPSED % 60)) s: wrote ${OUT_MD#"$REPO"/} and ${OUT_CSV#"$REPO"/}${FAILED:+; targets missed: $FAILED}"
