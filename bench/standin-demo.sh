#!/usr/bin/env bash
# Stand-in for `pgsluice demo`, used only to prove bench/run.sh end to end (run.sh --standin).
#
#   bench/standin-demo.sh demo --port PORT [--max-connections N]
#
# Same contract as `pgsluice demo`: starts a throwaway PostgreSQL 15 primary + 2 streaming
# replicas (temp dir, as user postgres), and a *pgbouncer* (instead of pgsluice) on PORT in
# transaction mode in front of the primary; prints
#   pgsluice: postgres://app:app@127.0.0.1:PORT/app
#   primary: 127.0.0.1:PPORT
#   replica: 127.0.0.1:R1PORT
#   replica: 127.0.0.1:R2PORT
# and cleans everything up on SIGTERM / Ctrl-C. Honours PGSLUICE_GENERAL__POOL_SIZE and
# PGSLUICE_GENERAL__MAX_CLIENT_CONN. Extra for the harness: writes the pooler's pid to
# $STANDIN_POOLER_PIDFILE if set (the stand-in's own pid is a shell, not the pooler).
# STANDIN_AUTH picks the client auth_type of the stand-in pooler (default scram-sha-256).
# BENCH_APP_SCRAM_SECRET (set by run.sh): app's password as a SCRAM secret (of "app"), used
# for the role and, with scram-sha-256, in the stand-in pgbouncer's auth_file.
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

[ "${1:-}" = demo ] && shift
PORT='' MAXCONN=200
while [ $# -gt 0 ]; do
  case $1 in
    --port) PORT=$2; shift 2 ;;
    --max-connections) MAXCONN=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) die "standin-demo: unknown argument $1" ;;
  esac
done
[ -n "$PORT" ] || die "standin-demo: --port is required"
POOL=${PGSLUICE_GENERAL__POOL_SIZE:-20}
MAXCLIENT=${PGSLUICE_GENERAL__MAX_CLIENT_CONN:-20000}
AUTH=${STANDIN_AUTH:-scram-sha-256}

TMP=$(mktemp -d /tmp/sluice-standin.XXXXXX)
chmod 755 "$TMP"
POOLER_PID=''
NODES=()

cleanup() {
  set +e
  trap - EXIT
  trap '' INT TERM # finish cleaning up even if signalled again
  [ -n "$POOLER_PID" ] && stop_pid "$POOLER_PID" TERM 10
  local i
  for ((i = ${#NODES[@]} - 1; i >= 0; i--)); do
    as_pg "$PGBIN/pg_ctl" -D "${NODES[$i]}" -m fast -w -t 30 stop </dev/null >>"$TMP/pg_ctl.log" 2>&1
  done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

ensure_pg_user
read -r PPORT R1PORT R2PORT < <(py freeport 3)

start_node() { # DIR
  as_pg "$PGBIN/pg_ctl" -D "$1" -l "$1.log" -w -t 60 start </dev/null >>"$TMP/pg_ctl.log" 2>&1 ||
    { cat "$1.log" >&2; die "standin-demo: PostgreSQL in $1 did not start"; }
  NODES+=("$1")
}

give_to_pg "$TMP"
log "standin-demo: initdb in $TMP"
as_pg "$PGBIN/initdb" -D "$TMP/p" -U postgres -E UTF8 --locale=C --no-sync \
  --auth-local=trust --auth-host=scram-sha-256 </dev/null >"$TMP/initdb.log" 2>&1 ||
  { cat "$TMP/initdb.log" >&2; die "standin-demo: initdb failed"; }
cat >>"$TMP/p/postgresql.conf" <<EOF
port = $PPORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$TMP'
max_connections = $MAXCONN
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
password_encryption = 'scram-sha-256'
EOF
cat >"$TMP/p/pg_hba.conf" <<EOF
local all all trust
host replication postgres 127.0.0.1/32 trust
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
EOF
log "standin-demo: starting the primary on $PPORT"
start_node "$TMP/p"
as_pg "$PGBIN/psql" -h "$TMP" -p "$PPORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -q \
  -c "CREATE ROLE app LOGIN PASSWORD '${BENCH_APP_SCRAM_SECRET:-app}'" -c "CREATE DATABASE app OWNER app" \
  -c "GRANT pg_checkpoint TO app" >/dev/null

for r in 1 2; do
  rport=$([ $r = 1 ] && echo "$R1PORT" || echo "$R2PORT")
  log "standin-demo: base backup for replica $r (port $rport)"
  as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PPORT" -U postgres -D "$TMP/r$r" \
    -R -X stream -C -S "replica$r" --checkpoint=fast --no-sync </dev/null >>"$TMP/basebackup.log" 2>&1 ||
    { cat "$TMP/basebackup.log" >&2; die "standin-demo: pg_basebackup failed"; }
  cat >>"$TMP/r$r/postgresql.conf" <<EOF
port = $rport
recovery_init_sync_method = syncfs
EOF
  start_node "$TMP/r$r"
done
log "standin-demo: starting pgbouncer on $PORT"

AUTH_FILE_PW=app
[ "$AUTH" = scram-sha-256 ] && [ -n "${BENCH_APP_SCRAM_SECRET:-}" ] && AUTH_FILE_PW=$BENCH_APP_SCRAM_SECRET
# The pgsluice-primary target sends `options=-c pgsluice.route=primary`,
# which pgbouncer refuses unless told to ignore it.
PGBOUNCER_IGNORE_STARTUP=extra_float_digits,options \
  start_pgbouncer "$TMP/bouncer" standin "$PORT" "$PPORT" "$AUTH" "$POOL" "$MAXCLIENT" "$AUTH_FILE_PW"
POOLER_PID=$STARTED_PGBOUNCER_PID
[ -n "${STANDIN_POOLER_PIDFILE:-}" ] && echo "$POOLER_PID" >"$STANDIN_POOLER_PIDFILE"

echo "pgsluice: postgres://app:app@127.0.0.1:$PORT/app"
echo "primary: 127.0.0.1:$PPORT"
echo "replica: 127.0.0.1:$R1PORT"
echo "replica: 127.0.0.1:$R2PORT"
echo "standin-demo: ready (pooler pid $POOLER_PID, data in $TMP)" >&2

while alive "$POOLER_PID"; do sleep 1; done
die "standin-demo: the pooler exited"
