#!/usr/bin/env bash
# End-to-end benchmark: pgbench directly against PostgreSQL vs through pgbouncer vs through
# pgsluice (and, for the select-only workloads, split directly over the two replicas),
# interleaved over several rounds. See bench/README.md.
#
# usage: bench/run.sh [--rounds N] [--duration SECS] [--quick] [--standin] [--no-micro]
#                     [--no-scale] [--soak-minutes N] [--no-callgrind]
#   --rounds N        rounds of all workloads x all targets (default 3)
#   --duration SECS   pgbench -T per run (default 15)
#   --quick           smoke test: 1 round, 5 s; writes bench/results/quick.{md,csv}
#   --standin         harness self-test: a second pgbouncer (bench/standin-demo.sh) plays
#                     pgsluice; writes bench/results/standin.{md,csv}
#   --no-micro        skip the criterion micro-benchmarks (bench/micro.sh), run after the
#                     pgbench runs and included in the report (not with --standin)
#   --no-scale        skip the scale stages (bench/scale.sh: idle-client memory, 50,000
#                     clients, spike, soak), which otherwise run after the pgbench rounds
#   --soak-minutes N  soak length passed to bench/scale.sh (default 30)
#   --no-callgrind    skip the last stage: instructions per transaction of pgsluice and
#                     pgbouncer under callgrind (bench/callgrind.sh, about 5 min)
# Other runs write docs/benchmarks.md (with its chart, docs/benchmarks.png) and
# bench/results/latest.csv; --quick/--standin draw bench/results/{quick,standin}.png.
# environment:
#   PGSLUICE_BIN           pgsluice binary (default: <repo>/target/release/pgsluice)
#   BENCH_PGBOUNCER_AUTH   force pgbouncer's client auth_type (default: whatever pgsluice asks for)
#   BENCH_PGBOUNCER_PLAINTEXT_AUTH_FILE=1  with SCRAM, plaintext password in pgbouncer's auth_file
#   BENCH_KEEP_WORK=1      keep the temp dir (pgbench output, pooler logs) for debugging
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

ROUNDS=3
DURATION=15
STANDIN=0
MICRO=1
RUN_SCALE=1
RUN_CALLGRIND=1
SCALE_ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) [ $# -ge 2 ] || die "--rounds needs a value"; ROUNDS=$2; shift 2 ;;
    --rounds=*) ROUNDS=${1#*=}; shift ;;
    --duration) [ $# -ge 2 ] || die "--duration needs a value"; DURATION=$2; shift 2 ;;
    --duration=*) DURATION=${1#*=}; shift ;;
    --quick) ROUNDS=1; DURATION=5; shift ;;
    --standin) STANDIN=1; shift ;;
    --no-micro) MICRO=0; shift ;;
    --no-scale) RUN_SCALE=0; shift ;;
    --no-callgrind) RUN_CALLGRIND=0; shift ;;
    --soak-minutes) [ $# -ge 2 ] || die "--soak-minutes needs a value"; SCALE_ARGS+=(--soak-minutes "$2"); shift 2 ;;
    --soak-minutes=*) SCALE_ARGS+=(--soak-minutes "${1#*=}"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer (got '$ROUNDS')"
[[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "--duration must be a positive integer (got '$DURATION')"

# ------------------------------------------------------------------ fixed settings
SCALE=10
JOBS=2
POOL_SIZE=20
MAX_CLIENT_CONN=20000
PG_MAX_CONNECTIONS=700
# pgsluice = the product as shipped (reads routed to the 2 replicas);
# pgsluice-primary = the same process, every statement on the primary
# (startup option pgsluice.route=primary): like for like with pgbouncer and direct.
# direct-replicas (added below once the demo printed its two replicas) = the select-only
# workloads split in two concurrent halves straight to the two replicas: the ceiling for
# pgsluice's routed reads.
TARGETS=(direct pgbouncer pgsluice pgsluice-primary)
WORKLOAD_IDS=(select-simple select-extended tpcb select-500 select-connect select-connect-md5 select-prepared)
declare -A WL_ARGS=(
  [select-simple]="-S -M simple -c 16"
  [select-extended]="-S -M extended -c 16"
  [tpcb]="-c 16"
  [select-500]="-S -c 500"
  [select-connect]="-S -C -c 32"
  [select-connect-md5]="-S -C -c 32"
  [select-prepared]="-S -M prepared -c 16"
)
# select-connect-md5 = select-connect as user app_md5, whom every target (PostgreSQL, both
# poolers) asks for md5: with SCRAM, pgbench's own key derivation (PBKDF2, 4096 rounds for
# every login) sets the pace of a login per transaction, whatever it connects to; with md5 the
# cost of the login itself does. The role and the rules are set up below (setup_md5).
MD5_USER=app_md5
declare -A WL_USER=([select-connect-md5]=$MD5_USER)
# drop_workload ID: leaves a workload out of this run.
drop_workload() {
  local w kept=()
  for w in "${WORKLOAD_IDS[@]}"; do [ "$w" = "$1" ] || kept+=("$w"); done
  WORKLOAD_IDS=("${kept[@]}")
}
export PGSLUICE_GENERAL__POOL_SIZE=$POOL_SIZE
export PGSLUICE_GENERAL__MAX_POOL_SIZE=$POOL_SIZE
export PGSLUICE_GENERAL__MAX_CLIENT_CONN=$MAX_CLIENT_CONN
# libpq defaults for every psql/pgbench below: TCP on loopback, no TLS (same for all targets).
export PGHOST=127.0.0.1 PGUSER=app PGPASSWORD=app PGDATABASE=app PGSSLMODE=disable PGCONNECT_TIMEOUT=15
unset PGSERVICE PGOPTIONS

QUICK=0
[ "$ROUNDS" = 1 ] && [ "$DURATION" = 5 ] && QUICK=1
if [ "$STANDIN" = 1 ]; then
  OUT_MD=$BENCH_DIR/results/standin.md
  OUT_CSV=$BENCH_DIR/results/standin.csv
elif [ "$QUICK" = 1 ]; then # a smoke test does not replace the published numbers
  OUT_MD=$BENCH_DIR/results/quick.md
  OUT_CSV=$BENCH_DIR/results/quick.csv
else
  OUT_MD=$REPO/docs/benchmarks.md
  OUT_CSV=$BENCH_DIR/results/latest.csv
fi

START_EPOCH=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "none (no commit yet)")
if git -C "$REPO" rev-parse HEAD >/dev/null 2>&1 && [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  COMMIT="$COMMIT (working tree has uncommitted changes)"
fi
WORK=$(mktemp -d /tmp/pgsluice-bench.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/logs" "$WORK/out"
DEMO_PID='' BOUNCER_PID='' PGBENCH_PID='' PGBENCH_PID2='' SAMPLER_PID=''
NOTES=()

# ------------------------------------------------------------------ cleanup
stop_demo() {
  local pid=$DEMO_PID i left
  DEMO_PID=''
  log "stopping the demo (SIGTERM to pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 600; i++)); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then
    log "warning: demo pid $pid still running 60 s after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  # The demo was started in its own session: anything left in it was started by it.
  left=$(ps -o pid= -s "$pid" 2>/dev/null | tr -s ' \n' ' ' || true)
  if [ -n "${left// /}" ]; then
    log "warning: the demo left processes behind (pids:$left); terminating them"
    for p in $left; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 3
    for p in $left; do alive "$p" && kill -KILL "$p" 2>/dev/null || true; done
  fi
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT
  trap '' INT TERM # finish cleaning up even if signalled again
  if [ -n "$PGBENCH_PID" ]; then stop_pid "$PGBENCH_PID" TERM 5; wait "$PGBENCH_PID" 2>/dev/null; fi
  if [ -n "$PGBENCH_PID2" ]; then stop_pid "$PGBENCH_PID2" TERM 5; wait "$PGBENCH_PID2" 2>/dev/null; fi
  if [ -n "$SAMPLER_PID" ]; then kill "$SAMPLER_PID" 2>/dev/null; wait "$SAMPLER_PID" 2>/dev/null; fi
  if [ -n "$BOUNCER_PID" ]; then log "stopping pgbouncer (pid $BOUNCER_PID)"; stop_pid "$BOUNCER_PID" TERM 10; fi
  [ -n "$DEMO_PID" ] && stop_demo
  if [ "$rc" -ne 0 ] && [ -s "$WORK/results.csv" ]; then
    mkdir -p "$BENCH_DIR/results" && cp "$WORK/results.csv" "$BENCH_DIR/results/partial.csv" &&
      log "the results so far are in bench/results/partial.csv"
  fi
  if [ "$rc" -ne 0 ] && [ -s "$WORK/demo.err" ]; then
    log "last lines of the demo's stderr:"
    tail -n 20 "$WORK/demo.err" >&2
  fi
  if [ "${BENCH_KEEP_WORK:-0}" = 1 ]; then
    log "keeping $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ------------------------------------------------------------------ 1. prerequisites
command -v python3 >/dev/null || die "python3 not found"
command -v pgbench >/dev/null || die "pgbench not found (Debian: apt-get install -y postgresql-15)"
command -v psql >/dev/null || die "psql not found (Debian: apt-get install -y postgresql-client-15)"
[ -x "$PGBIN/postgres" ] || die "PostgreSQL 15 server binaries not found in $PGBIN (apt-get install -y postgresql-15)"
if ! command -v pgbouncer >/dev/null; then
  [ "$(id -u)" -eq 0 ] || die "pgbouncer not found and not root: apt-get install -y pgbouncer"
  log "pgbouncer not found: installing it with apt-get"
  apt-get update -qq >"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log" >&2; die "apt-get update failed"; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >>"$WORK/apt.log" 2>&1 ||
    { tail -n 30 "$WORK/apt.log" >&2; die "apt-get install pgbouncer failed"; }
  command -v pgbouncer >/dev/null || die "pgbouncer still not on PATH after installing it"
fi
ensure_pg_user

DEMO_ENV=()
if [ "$STANDIN" = 1 ]; then
  DEMO_CMD=("$BENCH_DIR/standin-demo.sh" demo)
  BIN_INFO="not used (stand-in run)"
  # The stand-in pooler knows user app only.
  drop_workload select-connect-md5
  export STANDIN_POOLER_PIDFILE="$WORK/standin-pooler.pid"
  BENCH_APP_SCRAM_SECRET=$(py scram-secret app)
  export BENCH_APP_SCRAM_SECRET
else
  BIN=${PGSLUICE_BIN:-$REPO/target/release/pgsluice}
  if [ ! -x "$BIN" ]; then
    command -v cargo >/dev/null || die "$BIN is missing and cargo is not on PATH to build it"
    log "$BIN is missing: building it with cargo build --release"
    (cd "$REPO" && cargo build --release) || die "cargo build --release failed"
    [ -x "$BIN" ] || die "cargo build --release did not produce $BIN"
  fi
  "$BIN" demo --help >/dev/null 2>&1 ||
    die "$BIN has no working 'demo' subcommand ('$BIN demo --help' failed); rebuild it"
  DEMO_CMD=("$BIN" demo)
  BIN_INFO="$BIN, built $(date -d "@$(stat -c %Y "$BIN")" '+%Y-%m-%d %H:%M:%S %Z')"
fi

# Many client connections (500 clients, -C) need more than 1024 descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log "open-files limit for pgbench: $(ulimit -n)"

# ------------------------------------------------------------------ 2. start targets
read -r SLUICE_PORT < <(py freeport 1)
log "starting: ${DEMO_CMD[*]} --port $SLUICE_PORT --max-connections $PG_MAX_CONNECTIONS"
# setsid: own session, so a Ctrl-C reaches only us and the demo gets one clean SIGTERM.
if [ "$STANDIN" = 0 ]; then
  # The demo's pgsluice gets user app_md5 too, logged in by md5 (every other login as before:
  # the demo's default auth_type), and keeps app as the replica monitor's user. Only the demo
  # process gets these (not the later stages, which start pgsluice processes of their own).
  printf 'host all %s all md5\nhost all all all %s\n' "$MD5_USER" "${PGSLUICE_GENERAL__AUTH_TYPE:-scram-sha-256}" \
    >"$WORK/pgsluice-hba.conf"
  DEMO_ENV=("PGSLUICE_USERS__${MD5_USER^^}__PASSWORD=app" "PGSLUICE_GENERAL__HBA_FILE=$WORK/pgsluice-hba.conf"
    "PGSLUICE_ROUTING__MONITOR_USER=app")
fi
setsid env "${DEMO_ENV[@]}" "${DEMO_CMD[@]}" --port "$SLUICE_PORT" --max-connections "$PG_MAX_CONNECTIONS" \
  </dev/null >"$WORK/demo.out" 2>"$WORK/demo.err" &
DEMO_PID=$!

for ((i = 0; i < 1800; i++)); do
  nrep=$(grep -c '^replica: ' "$WORK/demo.out" 2>/dev/null) || nrep=0
  [ "$nrep" -ge 2 ] && break
  alive "$DEMO_PID" || { cat "$WORK/demo.out" >&2; die "the demo exited before it was ready (stderr above/below)"; }
  sleep 0.1
done
nrep=$(grep -c '^replica: ' "$WORK/demo.out" 2>/dev/null) || nrep=0
[ "$nrep" -ge 2 ] ||
  { cat "$WORK/demo.out" >&2; die "the demo did not print its endpoint lines within 180 s"; }
log "demo ready after $(( $(date +%s) - START_EPOCH )) s:"
sed 's/^/    /' "$WORK/demo.out" >&2

SLUICE_URL=$(sed -n 's/^pgsluice: //p' "$WORK/demo.out" | head -n1)
PRIMARY=$(sed -n 's/^primary: //p' "$WORK/demo.out" | head -n1)
[[ $SLUICE_URL =~ @([^:/@]+):([0-9]+)/ ]] || die "cannot parse the pgsluice line: '$SLUICE_URL'"
SLUICE_HOST=${BASH_REMATCH[1]} SLUICE_PORT_SEEN=${BASH_REMATCH[2]}
[[ $PRIMARY =~ ^([^:]+):([0-9]+)$ ]] || die "cannot parse the primary line: '$PRIMARY'"
PRIMARY_HOST=${BASH_REMATCH[1]} PRIMARY_PORT=${BASH_REMATCH[2]}
for h in "$SLUICE_HOST" "$PRIMARY_HOST"; do
  [ "$h" = 127.0.0.1 ] || die "refusing to benchmark a non-loopback address: $h"
done
[ "$SLUICE_PORT_SEEN" = "$SLUICE_PORT" ] || log "warning: demo reports port $SLUICE_PORT_SEEN, asked for $SLUICE_PORT"
SLUICE_PORT=$SLUICE_PORT_SEEN

# The replicas, for the direct-replicas target and for waiting until they have replayed the
# primary's WAL (all of them). Without exactly two loopback replica lines, direct-replicas is
# skipped.
REPLICA_PORTS=()
while read -r line; do
  if [[ $line =~ ^127\.0\.0\.1:([0-9]+)$ ]]; then
    REPLICA_PORTS+=("${BASH_REMATCH[1]}")
  else
    log "warning: ignoring replica line '$line' (not 127.0.0.1:PORT)"
  fi
done < <(sed -n 's/^replica: //p' "$WORK/demo.out")
if [ "${#REPLICA_PORTS[@]}" -eq 2 ]; then
  TARGETS+=(direct-replicas)
else
  NOTES+=("direct-replicas was skipped: the demo did not print two replica lines of the form \`replica: 127.0.0.1:PORT\` (found ${#REPLICA_PORTS[@]}).")
  log "warning: ${#REPLICA_PORTS[@]} usable replica line(s): direct-replicas is skipped"
fi

if [ "$STANDIN" = 1 ]; then
  [ -s "$STANDIN_POOLER_PIDFILE" ] || die "stand-in did not write its pooler pid"
  SLUICE_PID=$(cat "$STANDIN_POOLER_PIDFILE")
  NOTES+=("Stand-in run: pooler CPU of the 'pgsluice' column is the stand-in pgbouncer's pid, not the demo shell's.")
else
  SLUICE_PID=$DEMO_PID
fi

psql -p "$PRIMARY_PORT" -Atqc 'select 1' >/dev/null 2>"$WORK/psql.err" ||
  { cat "$WORK/psql.err" >&2; die "cannot connect to the primary 127.0.0.1:$PRIMARY_PORT as app/app"; }
psql -p "$SLUICE_PORT" -Atqc 'select 1' >/dev/null 2>"$WORK/psql.err" ||
  { cat "$WORK/psql.err" >&2; die "cannot run 'select 1' through pgsluice on 127.0.0.1:$SLUICE_PORT"; }

# pgbouncer gets the same client authentication method pgsluice asks clients for, so that
# connection-heavy runs (-C) compare like with like.
SLUICE_AUTH=$(py authprobe 127.0.0.1 "$SLUICE_PORT" app app || true)
if [ -n "${BENCH_PGBOUNCER_AUTH:-}" ]; then
  BOUNCER_AUTH=$BENCH_PGBOUNCER_AUTH
else
  case $SLUICE_AUTH in
    trust|plain|md5|scram-sha-256) BOUNCER_AUTH=$SLUICE_AUTH ;;
    *) BOUNCER_AUTH=scram-sha-256
       NOTES+=("pgsluice's client auth method could not be classified ('$SLUICE_AUTH'); pgbouncer used scram-sha-256.") ;;
  esac
fi
PRIMARY_AUTH=$(py authprobe 127.0.0.1 "$PRIMARY_PORT" app app || true)
log "client auth asked for: pgsluice $SLUICE_AUTH, primary (direct) $PRIMARY_AUTH; pgbouncer auth_type: $BOUNCER_AUTH"
if [ "$PRIMARY_AUTH" != "$BOUNCER_AUTH" ]; then
  NOTES+=("Client authentication differs: the poolers ask pgbench for '$BOUNCER_AUTH' (pgsluice asks for '$SLUICE_AUTH'), PostgreSQL itself (direct) for '$PRIMARY_AUTH'. In \`-C\` runs, which log in for every transaction, the ratios against direct include that difference; pgsluice vs pgbouncer do not.")
fi

# With SCRAM, pgbouncer is set up as in production: its auth_file holds app's SCRAM secret,
# identical to the server's (pgbouncer then verifies clients with a few HMACs and logs in to
# the server with the client's SCRAM keys). app cannot read its secret from pg_authid, so the
# harness sets app's password to a secret of the same password "app" that it made itself.
# BENCH_PGBOUNCER_PLAINTEXT_AUTH_FILE=1: plaintext auth_file instead (PBKDF2 per client login).
AUTH_FILE_PW=app
AUTH_FILE_DESC="plaintext password"
if [ "$BOUNCER_AUTH" = scram-sha-256 ] && [ "${BENCH_PGBOUNCER_PLAINTEXT_AUTH_FILE:-0}" != 1 ]; then
  AUTH_FILE_PW=${BENCH_APP_SCRAM_SECRET:-$(py scram-secret app)}
  psql -p "$PRIMARY_PORT" -v ON_ERROR_STOP=1 -Atqc "ALTER ROLE app PASSWORD '$AUTH_FILE_PW'" >/dev/null 2>"$WORK/psql.err" ||
    { cat "$WORK/psql.err" >&2; die "could not set app's password to a SCRAM secret (set BENCH_PGBOUNCER_PLAINTEXT_AUTH_FILE=1 to skip)"; }
  for p in "$PRIMARY_PORT" "$SLUICE_PORT"; do
    psql -p "$p" -Atqc 'select 1' >/dev/null 2>"$WORK/psql.err" ||
      { cat "$WORK/psql.err" >&2; die "login on port $p failed after re-setting app's password (same password, new salt)"; }
  done
  AUTH_FILE_DESC="SCRAM secret identical to the server's (the harness re-sets app's password \"app\" with its own salt; clients verified without PBKDF2, server logins by SCRAM pass-through)"
fi
read -r BOUNCER_PORT < <(py freeport 1)
BOUNCER_AUTH_DESC="auth_type=$BOUNCER_AUTH"
if [[ " ${WORKLOAD_IDS[*]} " == *" select-connect-md5 "* ]]; then
  # app as before, app_md5 by md5 with its md5 hash in the auth_file: per-user methods need
  # pgbouncer's auth_type=hba.
  case $BOUNCER_AUTH in plain) app_method=password ;; *) app_method=$BOUNCER_AUTH ;; esac
  export PGBOUNCER_HBA="host all $MD5_USER 127.0.0.1/32 md5
host all all 127.0.0.1/32 $app_method"
  export PGBOUNCER_EXTRA_USERS="\"$MD5_USER\" \"md5$(printf '%s' "app$MD5_USER" | md5sum | cut -d' ' -f1)\""
  BOUNCER_AUTH_DESC="auth_type=hba (auth_hba_file: $app_method for app, md5 for $MD5_USER)"
fi
start_pgbouncer "$WORK/pgbouncer" pgbouncer "$BOUNCER_PORT" "$PRIMARY_PORT" "$BOUNCER_AUTH" "$POOL_SIZE" "$MAX_CLIENT_CONN" "$AUTH_FILE_PW"
BOUNCER_PID=$STARTED_PGBOUNCER_PID
unset PGBOUNCER_HBA PGBOUNCER_EXTRA_USERS
log "pgbouncer pid $BOUNCER_PID on 127.0.0.1:$BOUNCER_PORT (open files: $(awk '/Max open files/ {print $4}' "/proc/$BOUNCER_PID/limits"))"
psql -p "$BOUNCER_PORT" -Atqc 'select 1' >/dev/null 2>"$WORK/psql.err" ||
  { cat "$WORK/psql.err" "$WORK/pgbouncer/pgbouncer.log" >&2; die "cannot run 'select 1' through pgbouncer"; }

# ------------------------------------------------------------------ 3. data + runs
log "pgbench -i -s $SCALE (through the primary)"
pgbench -i -s "$SCALE" -q -p "$PRIMARY_PORT" >"$WORK/init.log" 2>&1 ||
  { tail -n 20 "$WORK/init.log" >&2; die "pgbench -i failed"; }

# wait_replicas: wait until every replica has replayed the primary's WAL up to its current
# flush position, so that runs on the replicas (direct-replicas, routed reads) see the data
# and no replay of the preparation's VACUUM runs during (and conflicts with) their queries.
# A replica still behind after 120 s is logged and noted once; the run goes on.
REPLICA_WAIT_NOTED=0
wait_replicas() {
  [ "${#REPLICA_PORTS[@]}" -gt 0 ] || return 0
  local lsn port ok i
  lsn=$(psql -p "$PRIMARY_PORT" -Atqc 'select pg_current_wal_flush_lsn()' 2>"$WORK/psql.err") ||
    { cat "$WORK/psql.err" >&2; die "cannot read the primary's WAL position (pg_current_wal_flush_lsn)"; }
  for port in "${REPLICA_PORTS[@]}"; do
    ok=''
    for ((i = 0; i < 1200; i++)); do
      ok=$(psql -p "$port" -Atqc "select coalesce(pg_last_wal_replay_lsn() >= '$lsn'::pg_lsn, false)" 2>/dev/null) || ok=''
      [ "$ok" = t ] && break
      sleep 0.1
    done
    if [ "$ok" != t ]; then
      log "warning: replica 127.0.0.1:$port has not replayed the primary's WAL up to $lsn after 120 s"
      if [ "$REPLICA_WAIT_NOTED" = 0 ]; then
        REPLICA_WAIT_NOTED=1
        NOTES+=("A replica (127.0.0.1:$port) had not replayed the primary's WAL up to $lsn 120 s after a run's preparation; that run went ahead anyway (see the log for others).")
      fi
    fi
  done
}
wait_replicas

# setup_md5: user app_md5 for select-connect-md5 on the throwaway demo cluster: a role with an
# md5-hashed password "app" that may read every table, let in by md5 on every node. The
# harness runs as root beside that cluster: it puts the rule at the top of each node's
# pg_hba.conf and reloads the node; the superuser creates the role through a trust rule on the
# primary that exists only for that moment. Returns non-zero (the caller drops the workload)
# when any step fails.
setup_md5() {
  local root d dirs=() i rc=0 port
  root=$(grep -ho 'cluster is up root=[^ ]*' "$WORK/demo.err" "$WORK/demo.out" 2>/dev/null | head -n1 | sed 's/.*root=//')
  [ -n "$root" ] && [ -f "$root/node0/pg_hba.conf" ] || { log "md5 setup: no cluster root in the demo's log"; return 1; }
  for d in "$root"/node*; do [ -f "$d/pg_hba.conf" ] && [ -s "$d/postmaster.pid" ] && dirs+=("$d"); done
  for d in "${dirs[@]}"; do
    cp "$d/pg_hba.conf" "$WORK/hba.${d##*/}"
    {
      echo "host all $MD5_USER 127.0.0.1/32 md5"
      [ "$d" = "$root/node0" ] && echo "host app postgres 127.0.0.1/32 trust"
      cat "$WORK/hba.${d##*/}"
    } >"$d/pg_hba.conf"
    kill -HUP "$(head -n1 "$d/postmaster.pid")" || return 1
  done
  for ((i = 0; i < 100; i++)); do
    psql -U postgres -p "$PRIMARY_PORT" -Atqc 'select 1' >/dev/null 2>&1 && break
    sleep 0.1
  done
  psql -U postgres -p "$PRIMARY_PORT" -v ON_ERROR_STOP=1 -q -c "SET password_encryption = 'md5'" \
    -c "CREATE ROLE $MD5_USER LOGIN PASSWORD 'app'" -c "GRANT SELECT ON ALL TABLES IN SCHEMA public TO $MD5_USER" \
    >/dev/null 2>"$WORK/md5.err" || rc=$?
  # The trust rule goes again, whatever happened.
  { echo "host all $MD5_USER 127.0.0.1/32 md5"; cat "$WORK/hba.node0"; } >"$root/node0/pg_hba.conf"
  kill -HUP "$(head -n1 "$root/node0/postmaster.pid")" || return 1
  [ "$rc" = 0 ] || { log "md5 setup: creating $MD5_USER failed: $(head -n1 "$WORK/md5.err")"; return 1; }
  wait_replicas
  for port in "$PRIMARY_PORT" "${REPLICA_PORTS[@]}" "$SLUICE_PORT" "$BOUNCER_PORT"; do
    for ((i = 0; i < 50; i++)); do
      [ "$(py authprobe 127.0.0.1 "$port" "$MD5_USER" app 2>/dev/null)" = md5 ] && break
      sleep 0.1
    done
    [ "$(py authprobe 127.0.0.1 "$port" "$MD5_USER" app 2>/dev/null)" = md5 ] ||
      { log "md5 setup: 127.0.0.1:$port does not ask $MD5_USER for md5"; return 1; }
    PGUSER=$MD5_USER psql -p "$port" -Atqc 'select count(*) from pgbench_branches' >/dev/null 2>"$WORK/md5.err" ||
      { log "md5 setup: $MD5_USER cannot read pgbench_branches on 127.0.0.1:$port: $(head -n1 "$WORK/md5.err")"; return 1; }
  done
}
if [[ " ${WORKLOAD_IDS[*]} " == *" select-connect-md5 "* ]] && ! setup_md5; then
  drop_workload select-connect-md5
  NOTES+=("select-connect-md5 was left out: its md5 user could not be set up (see the log).")
fi

CHECKPOINT_OK=1
if ! psql -p "$PRIMARY_PORT" -Atqc 'CHECKPOINT' >/dev/null 2>"$WORK/psql.err"; then
  CHECKPOINT_OK=0
  NOTES+=("CHECKPOINT was skipped before every run: user app may not run it ($(head -n1 "$WORK/psql.err"))")
  log "warning: CHECKPOINT not permitted for app; preparation is VACUUM/TRUNCATE only"
fi

prepare() {
  local cmds=(-c 'TRUNCATE pgbench_history' -c 'VACUUM pgbench_branches, pgbench_tellers, pgbench_accounts')
  [ "$CHECKPOINT_OK" = 1 ] && cmds+=(-c 'CHECKPOINT')
  psql -p "$PRIMARY_PORT" -v ON_ERROR_STOP=1 -q "${cmds[@]}" >/dev/null 2>"$WORK/prep.err" ||
    { cat "$WORK/prep.err" >&2; die "preparation (VACUUM/CHECKPOINT) failed"; }
  wait_replicas
  sleep 1
}

target_port() { # (direct-replicas has two: run_split uses REPLICA_PORTS)
  case $1 in direct) echo "$PRIMARY_PORT" ;; pgbouncer) echo "$BOUNCER_PORT" ;; pgsluice|pgsluice-primary) echo "$SLUICE_PORT" ;; esac
}
target_options() { # libpq PGOPTIONS for a target
  case $1 in pgsluice-primary) echo "-c pgsluice.route=primary" ;; *) echo "" ;; esac
}
target_pid() {
  case $1 in direct|direct-replicas) echo '' ;; pgbouncer) echo "$BOUNCER_PID" ;; pgsluice|pgsluice-primary) echo "$SLUICE_PID" ;; esac
}
# workload_targets WORKLOAD -> the targets that run it, in TARGETS order: direct-replicas only
# for select-only workloads (-S); TPC-B's writes cannot run on a replica.
workload_targets() {
  local t
  for t in "${TARGETS[@]}"; do
    if [ "$t" = direct-replicas ] && [[ " ${WL_ARGS[$1]} " != *" -S "* ]]; then continue; fi
    printf '%s\n' "$t"
  done
}

# halve_clients HALF ARGS... -> HALF_ARGS = ARGS with `-c N` replaced by half 1 (the larger
# half when N is odd) or half 2 of N.
halve_clients() {
  local half=$1 n
  shift
  HALF_ARGS=()
  while [ $# -gt 0 ]; do
    if [ "$1" = -c ] && [ $# -ge 2 ]; then
      n=$2
      if [ "$half" = 1 ]; then n=$(( (n + 1) / 2 )); else n=$(( n / 2 )); fi
      [ "$n" -ge 1 ] || die "direct-replicas splits -c between two replicas: -c $2 is too few"
      HALF_ARGS+=(-c "$n")
      shift 2
    else
      HALF_ARGS+=("$1")
      shift
    fi
  done
}

# run_split OUT LOGPREFIX ARGS... : the direct-replicas target. Two pgbench processes at the
# same time, one per replica, each with half of ARGS' clients and -j 1 (ARGS carries -T and
# -M); LOGPREFIX (may be empty: no -l) is shared, so the -l logs of both halves (one file per
# process) are merged by the report. Outputs in OUT.1 and OUT.2; exit codes in SPLIT_RC1/2.
run_split() {
  local out=$1 prefix=$2 a1 a2 logargs=()
  shift 2
  [ -n "$prefix" ] && logargs=(-l --log-prefix="$prefix")
  halve_clients 1 "$@"; a1=("${HALF_ARGS[@]}")
  halve_clients 2 "$@"; a2=("${HALF_ARGS[@]}")
  timeout -k 10 $((DURATION + 90)) pgbench -n -j 1 -p "${REPLICA_PORTS[0]}" "${logargs[@]}" "${a1[@]}" >"$out.1" 2>&1 &
  PGBENCH_PID=$!
  timeout -k 10 $((DURATION + 90)) pgbench -n -j 1 -p "${REPLICA_PORTS[1]}" "${logargs[@]}" "${a2[@]}" >"$out.2" 2>&1 &
  PGBENCH_PID2=$!
  SPLIT_RC1=0 SPLIT_RC2=0
  wait "$PGBENCH_PID" || SPLIT_RC1=$?
  PGBENCH_PID=''
  wait "$PGBENCH_PID2" || SPLIT_RC2=$?
  PGBENCH_PID2=''
}

CLK_TCK=$(getconf CLK_TCK)
RESULTS="$WORK/results.csv"

run_one() { # ROUND WORKLOAD TARGET POSITION
  local round=$1 wl=$2 tgt=$3 pos=$4 port pid args conn=0 prefix out rc=0 user=${WL_USER[$2]:-app}
  local tb='' ta='' rss='' started clients io
  port=$(target_port "$tgt")
  pid=$(target_pid "$tgt")
  read -ra args <<<"${WL_ARGS[$wl]}"
  [[ " ${WL_ARGS[$wl]} " == *" -C "* ]] && conn=1
  clients=$(sed -n 's/.*-c \([0-9]*\).*/\1/p' <<<"${WL_ARGS[$wl]}")
  prefix="$WORK/logs/r${round}-${wl}-${tgt}"
  out="$WORK/out/r${round}-${wl}-${tgt}.txt"
  prepare
  if [ -n "$pid" ]; then
    tb=$(py ticks-split "$pid" 2>/dev/null) || die "$tgt (pid $pid) is no longer running (before $wl, round $round)"
    ( sleep "$(( (DURATION + 1) / 2 ))"; awk '/^VmRSS/ {print $2}' "/proc/$pid/status" >"$prefix-rss" 2>/dev/null ) &
    SAMPLER_PID=$!
  fi
  started=$(date -Is)
  if [ "$tgt" = direct-replicas ]; then
    PGUSER=$user run_split "$out" "$prefix" -T "$DURATION" "${args[@]}"
    io=(--rc "$SPLIT_RC1" --out "$out.1" --rc "$SPLIT_RC2" --out "$out.2")
  else
    PGUSER=$user PGOPTIONS=$(target_options "$tgt") timeout -k 10 $((DURATION + 90)) \
      pgbench -n -T "$DURATION" -j "$JOBS" -p "$port" -l --log-prefix="$prefix" "${args[@]}" >"$out" 2>&1 &
    PGBENCH_PID=$!
    wait "$PGBENCH_PID" || rc=$?
    PGBENCH_PID=''
    io=(--rc "$rc" --out "$out")
  fi
  if [ -n "$pid" ]; then
    ta=$(py ticks-split "$pid" 2>/dev/null) || ta=""
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=''
    rss=$(cat "$prefix-rss" 2>/dev/null || true)
  fi
  py record --csv "$RESULTS" --round "$round" --workload "$wl" --target "$tgt" --position "$pos" \
    "${io[@]}" --log-prefix "$prefix." --connect-mode "$conn" \
    --cpu-before "$tb" --cpu-after "$ta" --clk-tck "$CLK_TCK" --rss-kb "$rss" \
    --clients "$clients" --duration "$DURATION" --started-at "$started" >&2
  rm -f "$prefix".* "$prefix-rss"
  if [ -n "$pid" ] && ! alive "$pid"; then
    die "$tgt (pid $pid) died during the run ($wl, round $round)"
  fi
}

WARMUP=$(( DURATION < 5 ? DURATION : 3 ))
log "warm-up: ${WARMUP}s of -S -c 16 per target (not recorded)"
for tgt in "${TARGETS[@]}"; do
  if [ "$tgt" = direct-replicas ]; then
    run_split "$WORK/warmup-$tgt.txt" '' -S -c 16 -T "$WARMUP"
    if [ "$SPLIT_RC1" != 0 ] || [ "$SPLIT_RC2" != 0 ]; then
      log "warning: warm-up on the replicas failed:"
      tail -n 5 "$WORK/warmup-$tgt.txt.1" "$WORK/warmup-$tgt.txt.2" >&2
      NOTES+=("The warm-up run on the replicas (direct-replicas) failed.")
    fi
  elif ! PGOPTIONS=$(target_options "$tgt") pgbench -n -S -c 16 -j "$JOBS" -T "$WARMUP" -p "$(target_port "$tgt")" >"$WORK/warmup-$tgt.txt" 2>&1; then
    log "warning: warm-up through $tgt failed:"
    tail -n 5 "$WORK/warmup-$tgt.txt" >&2
    NOTES+=("The warm-up run through $tgt failed.")
  fi
done

TOTAL=0
for wl in "${WORKLOAD_IDS[@]}"; do
  TOTAL=$(( TOTAL + ROUNDS * $(workload_targets "$wl" | wc -l) ))
done
log "running $TOTAL runs of ${DURATION}s (≈ $(( TOTAL * (DURATION + 4) / 60 )) min)"
n=0
for ((round = 1; round <= ROUNDS; round++)); do
  for wl in "${WORKLOAD_IDS[@]}"; do
    mapfile -t wl_targets < <(workload_targets "$wl")
    for ((k = 0; k < ${#wl_targets[@]}; k++)); do
      tgt=${wl_targets[$(( (k + round - 1) % ${#wl_targets[@]} ))]}
      n=$((n + 1))
      log "[$n/$TOTAL] round $round, $wl (${WL_ARGS[$wl]}), $tgt"
      run_one "$round" "$wl" "$tgt" "$((k + 1))"
    done
  done
done

# ------------------------------------------------------------------ 5. report
ELAPSED=$(( $(date +%s) - START_EPOCH ))
PREP="TRUNCATE pgbench_history; VACUUM pgbench_branches, pgbench_tellers, pgbench_accounts"
[ "$CHECKPOINT_OK" = 1 ] && PREP="$PREP; CHECKPOINT"
SETTINGS=(
  "pgbench scale $SCALE (\`pgbench -i -s $SCALE\` once, through the primary); every run: \`pgbench -n -T $DURATION -j $JOBS -l <workload args>\` (no -P progress), PGSSLMODE=disable, TCP 127.0.0.1, user app/app"
  "$ROUNDS round(s); in each round, each workload runs against every target back to back (${TARGETS[*]}; direct-replicas only for the select-only workloads), the target order rotated by one every round; a ${WARMUP}s unrecorded \`-S -c 16\` warm-up per target before round 1"
  "before every run, for every target, via the primary: $PREP; then a wait until every replica has replayed the primary's WAL up to its flush position (\`pg_last_wal_replay_lsn()\` ≥ \`pg_current_wal_flush_lsn()\`); then 1 s pause"
  "PostgreSQL: \`${DEMO_CMD[*]} --port PORT --max-connections $PG_MAX_CONNECTIONS\` (primary + 2 streaming replicas); direct = pgbench to the primary"
  "pgsluice: transaction mode (demo default), PGSLUICE_GENERAL__POOL_SIZE=$POOL_SIZE, PGSLUICE_GENERAL__MAX_POOL_SIZE=$POOL_SIZE, PGSLUICE_GENERAL__MAX_CLIENT_CONN=$MAX_CLIENT_CONN; pooler process = the \`demo\` process; client auth it asks for: $SLUICE_AUTH"
  "pgbouncer: pool_mode=transaction, default_pool_size=$POOL_SIZE, reserve_pool_size=0, max_client_conn=$MAX_CLIENT_CONN, $BOUNCER_AUTH_DESC, auth_file with a $AUTH_FILE_DESC, log_connections=0, log_disconnections=0, listen_backlog=4096, TLS off, run as user $PG_USER with ulimit -n 65536, against the same primary"
  "workloads: $(for w in "${WORKLOAD_IDS[@]}"; do printf '%s = `%s`; ' "$w" "${WL_ARGS[$w]}"; done | sed 's/; $//')"
  "p99 from the per-transaction \`-l\` logs (nearest rank); \`-C\` runs: tps and pgbench's average connection time only"
)
if [[ " ${WORKLOAD_IDS[*]} " == *" select-connect-md5 "* ]]; then
  SETTINGS+=("select-connect-md5: as select-connect, as user $MD5_USER, whom every target asks for md5: a PostgreSQL role with an md5-hashed password (\`SET password_encryption = 'md5'\`) and a \`host all $MD5_USER 127.0.0.1/32 md5\` rule on every node; in pgsluice a \`[users.$MD5_USER]\` with its password and an hba_file rule \`md5\` for it (\`PGSLUICE_GENERAL__HBA_FILE\`; every other user as before; \`routing.monitor_user = app\`); in pgbouncer its md5 hash in the auth_file and an auth_hba_file rule \`md5\`")
fi
if [ "${#REPLICA_PORTS[@]}" -eq 2 ]; then
  SETTINGS+=("direct-replicas (select-only workloads, those with \`-S\`): the workload's pgbench args split in two halves run at the same time, one straight to each replica (127.0.0.1:${REPLICA_PORTS[0]} and :${REPLICA_PORTS[1]}; \`-c N/2 -j 1\` each, same \`-T\` and \`-M\`): tps = sum of both, p99 from both halves' \`-l\` logs together, average connection time weighted by transactions, failed if either half fails")
fi
NOTES+=("The pgbouncer and pgsluice poolers share the 2 cores with pgbench and PostgreSQL; compare per-round ratios and µs/tx rather than absolute tps.")
join() { local IFS=$'\x1f'; local s="$*"; printf '%s' "${s//$'\x1f'/ ;; }"; }
{
  echo "date=$(date '+%Y-%m-%d %H:%M:%S %Z')"
  echo "elapsed=$((ELAPSED / 60)) min $((ELAPSED % 60)) s"
  echo "standin=$STANDIN"
  echo "csv_rel=${OUT_CSV#"$REPO"/}"
  echo "cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  echo "nproc=$(nproc)"
  echo "mem=$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "kernel=$(uname -sr)"
  echo "load=$LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end (1/5/15-min load averages; the start values include whatever ran just before; the harness itself keeps ~2-4 busy)"
  echo "os=$(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-?}")"
  echo "pg_version=$(psql -p "$PRIMARY_PORT" -Atqc 'select version()' 2>/dev/null | cut -d, -f1)"
  echo "pgbench_version=$(pgbench --version)"
  echo "pgbouncer_version=$(pgbouncer --version | head -n1)"
  echo "commit=$COMMIT"
  echo "pgsluice_bin=$BIN_INFO"
  echo "settings=$(join "${SETTINGS[@]}")"
  echo "notes=$(join "${NOTES[@]}")"
} >"$WORK/meta.txt"

mkdir -p "$(dirname "$OUT_CSV")" "$(dirname "$OUT_MD")"
cp "$RESULTS" "$OUT_CSV"
# Micro-benchmarks (criterion, no PostgreSQL): after the pgbench runs, so a failure here
# loses none of them; the report includes the fragment.
MICRO_MD=''
if [ "$MICRO" = 1 ] && [ "$STANDIN" = 0 ]; then
  log "micro-benchmarks: bench/micro.sh (cargo bench, release)"
  if "$BENCH_DIR/micro.sh" --out "$BENCH_DIR/results/micro.md"; then
    MICRO_MD=$BENCH_DIR/results/micro.md
  else
    log "warning: bench/micro.sh failed; the report says so"
  fi
fi
# The chart needs gnuplot: install it like pgbouncer (the report says so if it is missing).
if ! command -v gnuplot >/dev/null && [ "$(id -u)" -eq 0 ]; then
  log "gnuplot not found: installing gnuplot-nox with apt-get (for the chart)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gnuplot-nox; } \
    >"$WORK/apt-gnuplot.log" 2>&1 || { tail -n 10 "$WORK/apt-gnuplot.log" >&2; log "warning: could not install gnuplot-nox: no chart"; }
fi
py report --csv "$OUT_CSV" --meta "$WORK/meta.txt" --md "$OUT_MD" --micro "$MICRO_MD"
FAILED=$(awk -F, 'NR > 1 && $5 != "ok"' "$OUT_CSV" | wc -l)
log "done in $((ELAPSED / 60)) min $((ELAPSED % 60)) s: wrote ${OUT_MD#"$REPO"/} and ${OUT_CSV#"$REPO"/}; failed runs: $FAILED"

# ------------------------------------------------------------------ 6. scale stages
# bench/scale.sh starts its own demo and pgbouncer: stop this run's first, then put its
# report (bench/results/scale*.md) into this report as a section.
if [ "$RUN_SCALE" = 1 ] && [ "$STANDIN" = 0 ]; then
  [ -n "$BOUNCER_PID" ] && { stop_pid "$BOUNCER_PID" TERM 10; BOUNCER_PID=''; }
  [ -n "$DEMO_PID" ] && stop_demo
  [ "$QUICK" = 1 ] && SCALE_ARGS+=(--quick)
  SCALE_MD=$BENCH_DIR/results/scale.md
  [ "$QUICK" = 1 ] && SCALE_MD=$BENCH_DIR/results/scale-quick.md
  log "scale stages: bench/scale.sh ${SCALE_ARGS[*]}"
  PGSLUICE_BIN=$BIN "$BENCH_DIR/scale.sh" "${SCALE_ARGS[@]}" || die "bench/scale.sh failed"
  python3 "$BENCH_DIR/scale.py" splice --doc "$OUT_MD" --section "$SCALE_MD"
  log "added ${SCALE_MD#"$REPO"/} to ${OUT_MD#"$REPO"/}"
fi

# ------------------------------------------------------------------ 7. callgrind
# Instructions per transaction for both poolers (bench/callgrind.sh starts its own demo and
# pgbouncer under valgrind): machine load does not change the counts.
if [ "$RUN_CALLGRIND" = 1 ] && [ "$STANDIN" = 0 ]; then
  [ -n "$BOUNCER_PID" ] && { stop_pid "$BOUNCER_PID" TERM 10; BOUNCER_PID=''; }
  [ -n "$DEMO_PID" ] && stop_demo
  CG_MD=$BENCH_DIR/results/callgrind.md
  [ "$QUICK" = 1 ] && CG_MD=$BENCH_DIR/results/callgrind-quick.md
  log "callgrind: bench/callgrind.sh"
  PGSLUICE_BIN=$BIN "$BENCH_DIR/callgrind.sh" --out "$CG_MD" --doc "$OUT_MD" || die "bench/callgrind.sh failed"
fi
