# shellcheck shell=bash
# Shared helpers for bench/run.sh and bench/standin-demo.sh (sourced, not executed).

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
BENCH_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH_PY="$BENCH_LIB_DIR/bench.py"
PG_USER=${BENCH_PG_USER:-postgres}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }

py() { python3 "$BENCH_PY" "$@"; }

# Run a command as the unprivileged PostgreSQL user (from /, so it can always chdir).
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    (cd / && runuser -u "$PG_USER" -- "$@")
  else
    (cd / && "$@")
  fi
}

ensure_pg_user() {
  [ "$(id -u)" -eq 0 ] || return 0
  if ! id "$PG_USER" >/dev/null 2>&1; then
    log "creating system user $PG_USER"
    useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash "$PG_USER"
  fi
}

# Own a directory by the PostgreSQL user (no-op when not root).
give_to_pg() {
  [ "$(id -u)" -eq 0 ] || return 0
  chown -R "$PG_USER": "$@"
}

# port_open PORT -> 0 if something accepts TCP connections on 127.0.0.1:PORT
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_port PORT SECONDS [PID] -> waits until the port accepts; fails early if PID died
wait_port() {
  local port=$1 secs=$2 pid=${3:-} i
  for ((i = 0; i < secs * 10; i++)); do
    port_open "$port" && return 0
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    sleep 0.1
  done
  return 1
}

# alive PID -> process exists and is not a zombie
alive() {
  local pid=$1 st
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  st=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ "$st" != Z ]
}

# stop_pid PID SIGNAL GRACE_SECONDS -> send SIGNAL, wait, then SIGKILL
stop_pid() {
  local pid=$1 sig=$2 grace=$3 i
  alive "$pid" || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    alive "$pid" || return 0
    sleep 0.1
  done
  log "pid $pid did not stop after SIG$sig within ${grace}s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  sleep 0.2
}

# start_pgbouncer DIR NAME LISTEN_PORT PG_PORT AUTH_TYPE POOL_SIZE MAX_CLIENT_CONN [AUTH_FILE_PASSWORD]
# Writes DIR/NAME.ini and DIR/users.txt, starts pgbouncer as $PG_USER with a raised
# open-files limit, in transaction mode against 127.0.0.1:PG_PORT database "app" for user
# "app". AUTH_FILE_PASSWORD (default: the plaintext "app") is what goes into the auth_file:
# a SCRAM secret identical to the server's lets pgbouncer verify clients with a few HMACs and
# log in to the server with the client's SCRAM keys; with a plaintext password pgbouncer runs
# PBKDF2 (4096 rounds) for every client connection.
# PGBOUNCER_IGNORE_STARTUP (default extra_float_digits) is its ignore_startup_parameters.
# PGBOUNCER_EXTRA_USERS: more auth_file lines (`"user" "secret"`, one per line).
# PGBOUNCER_HBA: pg_hba-style rules; when set, they go to DIR/NAME.hba and pgbouncer runs with
# auth_type = hba (AUTH_TYPE is then not used), so that users can log in by different methods.
# Sets STARTED_PGBOUNCER_PID (call it directly, not in $(...)).
start_pgbouncer() {
  local dir=$1 name=$2 port=$3 pgport=$4 auth=$5 pool=$6 maxconn=$7 secret=${8:-app}
  local ini="$dir/$name.ini" pidfile="$dir/$name.pid" i pid limit hba_line=''
  mkdir -p "$dir"
  command -v pgbouncer >/dev/null || die "pgbouncer not found"
  printf '"app" "%s"\n' "$secret" >"$dir/users.txt"
  [ -n "${PGBOUNCER_EXTRA_USERS:-}" ] && printf '%s\n' "$PGBOUNCER_EXTRA_USERS" >>"$dir/users.txt"
  if [ -n "${PGBOUNCER_HBA:-}" ]; then
    printf '%s\n' "$PGBOUNCER_HBA" >"$dir/$name.hba"
    auth=hba
    hba_line="auth_hba_file = $dir/$name.hba"
  fi
  cat >"$ini" <<EOF
[databases]
app = host=127.0.0.1 port=$pgport dbname=app

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = $auth
auth_file = $dir/users.txt
$hba_line
pool_mode = transaction
default_pool_size = $pool
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = $maxconn
max_db_connections = 0
listen_backlog = 4096
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
stats_period = 600
server_tls_sslmode = disable
client_tls_sslmode = disable
ignore_startup_parameters = ${PGBOUNCER_IGNORE_STARTUP:-extra_float_digits}
pidfile = $pidfile
logfile = $dir/$name.log
EOF
  give_to_pg "$dir"
  rm -f "$pidfile"
  # runuser goes through PAM and resets the soft open-files limit to 1024: raise it inside
# (to 65536, or to the hard limit where that is lower).
  # setsid: keep it out of the terminal's process group (Ctrl-C is handled by our trap).
  if [ "$(id -u)" -eq 0 ]; then
    (cd / && exec setsid runuser -u "$PG_USER" -- bash -c 'ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec pgbouncer "$1"' _ "$ini" \
      </dev/null >>"$dir/$name.stdout" 2>&1) &
  else
    (cd / && exec setsid bash -c 'ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec pgbouncer "$1"' _ "$ini" \
      </dev/null >>"$dir/$name.stdout" 2>&1) &
  fi
  local launcher=$!
  for ((i = 0; i < 150; i++)); do
    if [ -s "$pidfile" ] && port_open "$port"; then break; fi
    if ! alive "$launcher" && [ ! -s "$pidfile" ]; then
      cat "$dir/$name.stdout" "$dir/$name.log" >&2 2>/dev/null || true
      die "pgbouncer ($name) exited during startup"
    fi
    sleep 0.1
  done
  [ -s "$pidfile" ] && port_open "$port" || { cat "$dir/$name.log" >&2 2>/dev/null || true; die "pgbouncer ($name) did not start listening on $port"; }
  pid=$(cat "$pidfile")
  limit=$(awk '/Max open files/ {print $4}' "/proc/$pid/limits" 2>/dev/null || echo '?')
  if [ "$limit" != '?' ] && [ "$limit" -lt 20000 ] 2>/dev/null; then
    log "warning: pgbouncer ($name) open-files limit is only $limit"
  fi
  STARTED_PGBOUNCER_PID=$pid
}
