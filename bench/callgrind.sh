#!/usr/bin/env bash
# Instructions per transaction, pgsluice vs pgbouncer, counted by valgrind's callgrind.
# Instruction counts do not depend on what else the machine is doing, so this is the
# steadiest comparison this shared 2-core box allows. See bench/README.md.
#
# usage: bench/callgrind.sh [--out FILE] [--doc FILE]
#   --out FILE   markdown section to write (default bench/results/callgrind.md)
#   --doc FILE   also put the section into FILE between callgrind markers (or append)
# environment: PGSLUICE_BIN (default <repo>/target/release/pgsluice), BENCH_KEEP_WORK=1
#
# What it does: starts `pgsluice demo` for its PostgreSQL primary + 2 streaming replicas and
# pgbench scale-10 tables; runs a second pgsluice (transaction mode, pool_size 20, reads routed
# to the replicas, as shipped) and pgbouncer 1.18 (transaction mode, default_pool_size 20, in
# front of the primary) each under `valgrind --tool=callgrind`; for each, pgbench -S -c 16 -j 2
# in simple and extended mode, -t 200 and then -t 1200 per client with the counters zeroed
# before and dumped after each run. Instructions per transaction = (Ir(1200) - Ir(200)) /
# (16 x 1000): logins and start-up cancel out. pgbouncer takes its clients with auth_type
# trust: with a plaintext auth_file it runs PBKDF2 for every client login, whose cost varied
# by more than the 16,000 transactions' (a first run gave a negative difference); pgsluice's
# SCRAM logins reuse the derived secret. User-space instructions only: syscalls are counted
# by the kernel, not here (compare them with strace -c).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"

OUT=$BENCH_DIR/results/callgrind.md
DOC=''
while [ $# -gt 0 ]; do
  case $1 in
    --out) [ $# -ge 2 ] || die "--out needs a value"; OUT=$2; shift 2 ;;
    --doc) [ $# -ge 2 ] || die "--doc needs a value"; DOC=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done

BIN=${PGSLUICE_BIN:-$REPO/target/release/pgsluice}
[ -x "$BIN" ] || die "$BIN is missing: cargo build --release"
command -v valgrind >/dev/null || die "valgrind not found (apt-get install -y valgrind)"
command -v callgrind_control >/dev/null || die "callgrind_control not found"
command -v pgbouncer >/dev/null || die "pgbouncer not found (apt-get install -y pgbouncer)"
command -v pgbench >/dev/null || die "pgbench not found"
ensure_pg_user

WORK=$(mktemp -d /tmp/pgsluice-callgrind.XXXXXX)
chmod 755 "$WORK"
DEMO_PID=''
VG_PID=''
cleanup() {
  [ -n "$VG_PID" ] && stop_pid "$VG_PID" TERM 20
  [ -n "$DEMO_PID" ] && stop_pid "$DEMO_PID" TERM 60
  if [ "${BENCH_KEEP_WORK:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

DEMO_PORT=$(free_port)
log "starting $BIN demo --port $DEMO_PORT"
setsid "$BIN" demo --port "$DEMO_PORT" --max-connections 300 >"$WORK/demo.out" 2>"$WORK/demo.err" &
DEMO_PID=$!
for _ in $(seq 1 1200); do
  grep -q '^replica: ' "$WORK/demo.out" 2>/dev/null && [ "$(grep -c '^replica: ' "$WORK/demo.out")" -ge 2 ] && break
  alive "$DEMO_PID" || { cat "$WORK/demo.err" >&2; die "the demo exited"; }
  sleep 0.1
done
PRIMARY=$(sed -n 's/^primary: //p' "$WORK/demo.out")
[ -n "$PRIMARY" ] || die "no primary line from the demo"
REPLICAS=$(sed -n 's/^replica: \(.*\)/"\1"/p' "$WORK/demo.out" | paste -sd, -)
export PGPASSWORD=app PGSSLMODE=disable
log "pgbench -i -s 10 (through the demo)"
pgbench -i -q -s 10 -h 127.0.0.1 -p "$DEMO_PORT" -U app app >"$WORK/init.log" 2>&1 || { cat "$WORK/init.log" >&2; die "pgbench -i failed"; }

# measure NAME PORT USER CMD... -> prints "simple extended" instructions per transaction
measure() {
  local name=$1 port=$2 user=$3; shift 3
  local dir=$WORK/$name
  mkdir -p "$dir"
  [ "$user" = root ] || give_to_pg "$dir"
  local run=()
  [ "$user" = root ] || run=(runuser -u "$user" --)
  (cd / && exec setsid "${run[@]}" valgrind --tool=callgrind --compress-strings=no --compress-pos=no \
    --callgrind-out-file="$dir/cg.out" "$@" </dev/null >"$dir/valgrind.log" 2>&1) &
  local launcher=$! i
  VG_PID=''
  for ((i = 0; i < 600; i++)); do
    VG_PID=$(pgrep -f "valgrind.bin --tool=callgrind .*--callgrind-out-file=$dir/cg.out" | head -1 || true)
    [ -n "$VG_PID" ] && port_open "$port" && break
    alive "$launcher" || { cat "$dir/valgrind.log" >&2; die "$name under valgrind exited during start-up"; }
    sleep 0.1
  done
  port_open "$port" || die "$name did not listen on $port under valgrind"
  # 32 clients for 4 s: every pool opens its 20 server connections now, not during a
  # measured run (a server login costs millions of instructions of SCRAM).
  pgbench -n -S -c 32 -j 2 -T 4 -h 127.0.0.1 -p "$port" -U app app >/dev/null 2>&1 || true
  local mode t n=0 t0 t1
  : >"$dir/durations"
  # The first dump is pgsluice idle for 5 s: what it does on its own per second (the
  # replica monitor's probes, pool upkeep) is subtracted from each run by its length.
  for step in idle:5 simple:50 simple:200 simple:1200 extended:200 extended:1200; do
    mode=${step%%:*} t=${step##*:}
    "${run[@]}" callgrind_control -z "$VG_PID" >/dev/null
    t0=$(date +%s.%N)
    if [ "$mode" = idle ]; then
      sleep "$t"
    else
      pgbench -n -S -M "$mode" -c 16 -j 2 -t "$t" -h 127.0.0.1 -p "$port" -U app app >"$dir/pgbench-$mode-$t.log" 2>&1 ||
        { cat "$dir/pgbench-$mode-$t.log" >&2; die "$name: pgbench -M $mode -t $t failed"; }
      grep -q 'number of failed transactions: 0 ' "$dir/pgbench-$mode-$t.log" || die "$name: pgbench -M $mode -t $t reported failed transactions"
      sleep 0.5
    fi
    t1=$(date +%s.%N)
    "${run[@]}" callgrind_control -d "$mode-$t" "$VG_PID" >/dev/null
    n=$((n + 1))
    echo "$t0 $t1" >>"$dir/durations"
    for ((i = 0; i < 100; i++)); do [ -s "$dir/cg.out.$n" ] && break; sleep 0.1; done
    [ -s "$dir/cg.out.$n" ] || die "$name: callgrind wrote no dump $n"
  done
  stop_pid "$VG_PID" TERM 20
  VG_PID=''
  # dumps: 1 = idle, 2 = warm-up, 3/4 = simple 200/1200, 5/6 = extended 200/1200;
  # prints simple and extended per transaction, then the idle rate (instructions/s)
  python3 - "$dir" <<'PY'
import re, sys
d = sys.argv[1]
spans = [tuple(map(float, l.split())) for l in open(f"{d}/durations")]
def ir(n):
    return int(re.search(r"^summary: (\d+)", open(f"{d}/cg.out.{n}").read(), re.M).group(1))
def secs(n):
    return spans[n - 1][1] - spans[n - 1][0]
rate = ir(1) / secs(1)
def net(n):
    return ir(n) - rate * secs(n)
print(round((net(4) - net(3)) / 16000), round((net(6) - net(5)) / 16000), f"{round(rate):,}")
PY
}

SLUICE_PORT=$(free_port)
cat >"$WORK/pgsluice.toml" <<EOF
[general]
listen_addr = "127.0.0.1:$SLUICE_PORT"
pool_mode = "transaction"
pool_size = 20
max_pool_size = 20
[databases.app]
primary = "$PRIMARY"
replicas = [$REPLICAS]
[users.app]
password = "app"
EOF
log "pgsluice under callgrind"
read -r S_SIMPLE S_EXT S_IDLE < <(measure pgsluice "$SLUICE_PORT" root "$BIN" -c "$WORK/pgsluice.toml")

BOUNCER_PORT=$(free_port)
mkdir -p "$WORK/pgbouncer-cfg"
printf '"app" "app"\n' >"$WORK/pgbouncer-cfg/users.txt"
cat >"$WORK/pgbouncer-cfg/pgbouncer.ini" <<EOF
[databases]
app = host=127.0.0.1 port=${PRIMARY##*:} dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/pgbouncer-cfg/users.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = 2000
log_connections = 0
log_disconnections = 0
EOF
give_to_pg "$WORK/pgbouncer-cfg"
log "pgbouncer under callgrind"
read -r B_SIMPLE B_EXT B_IDLE < <(measure pgbouncer "$BOUNCER_PORT" "$PG_USER" pgbouncer "$WORK/pgbouncer-cfg/pgbouncer.ini")

TOP=$(python3 - "$WORK/pgsluice" <<'PY'
import collections, sys
d = sys.argv[1]
def selfcost(path):
    cost = collections.Counter(); fn = None; skip = False
    for line in open(path, errors="replace"):
        if line.startswith("fn="):
            fn = line[3:].strip()
        elif line.startswith("calls="):
            skip = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()
            if len(parts) >= 2 and fn is not None:
                if skip:
                    skip = False
                else:
                    cost[fn] += int(parts[1])
    return cost
a, b = selfcost(f"{d}/cg.out.5"), selfcost(f"{d}/cg.out.6")
per = {k: (b[k] - a.get(k, 0)) / 16000 for k in b}
total = sum(per.values())
for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:15]:
    name = k.replace("|", "\\|")
    if len(name) > 110:
        name = name[:107] + "..."
    print(f"| {v:,.0f} | {100 * v / total:.1f}% | `{name}` |")
PY
)

COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
mkdir -p "$(dirname "$OUT")"
{
  echo "## Instructions per transaction (callgrind)"
  echo
  echo "Written by \`bench/callgrind.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), pgsluice commit $COMMIT, $(pgbouncer --version 2>/dev/null | head -1), $(valgrind --version)."
  echo "User-space instructions per pgbench transaction of \`pgbench -S -c 16 -j 2\` (one point select), counted by \`valgrind --tool=callgrind\`: (Ir after \`-t 1200\` − Ir after \`-t 200\`) / 16,000, so client logins and start-up cancel out. What each pooler does on its own (measured first, idle for 5 s: pgsluice ${S_IDLE} instructions/s, mostly the replica monitor's probes; pgbouncer ${B_IDLE}/s) is subtracted from each run by its length, so the count does not depend on how fast the runs went under valgrind. A 4-s warm-up with 32 clients opens the server connections first; one opened during a run still costs a pgsluice SCRAM login (~50,000 instructions with the derived keys kept, see docs/performance.md). It leaves out the kernel: per transaction both poolers make 2 \`sendto\` and 2 \`recvfrom\` calls here (\`strace -c\`), which cost more CPU than the instructions below. pgsluice: transaction mode, reads routed to 2 replicas, \`worker_threads = 1\` (the default); pgbouncer: transaction mode in front of the primary, clients by \`auth_type = trust\` (its per-login PBKDF2 made the difference noisy; logins cancel out either way)."
  echo
  echo "| pooler | \`-M simple\` instructions/tx | \`-M extended\` instructions/tx |"
  echo "|---|---:|---:|"
  echo "| pgbouncer | ${B_SIMPLE} | ${B_EXT} |"
  echo "| pgsluice | ${S_SIMPLE} | ${S_EXT} |"
  echo "| pgsluice / pgbouncer | $(python3 -c "print(f'{$S_SIMPLE/$B_SIMPLE:.2f}×')") | $(python3 -c "print(f'{$S_EXT/$B_EXT:.2f}×')") |"
  echo
  echo "Where pgsluice's instructions go (\`-M extended\`, self cost per transaction, top 15; idle background not subtracted here):"
  echo
  echo "| instructions/tx | share | function |"
  echo "|---:|---:|---|"
  echo "$TOP"
} >"$OUT"
log "wrote ${OUT#"$REPO"/}: pgsluice $S_SIMPLE / $S_EXT, pgbouncer $B_SIMPLE / $B_EXT instructions per transaction"

if [ -n "$DOC" ]; then
  python3 - "$DOC" "$OUT" <<'PY'
import sys
doc_path, section_path = sys.argv[1], sys.argv[2]
begin, end = "<!-- bench/callgrind.sh: begin -->", "<!-- bench/callgrind.sh: end -->"
section = open(section_path).read().rstrip("\n")
try:
    doc = open(doc_path).read()
except FileNotFoundError:
    doc = ""
block = f"{begin}\n{section}\n{end}\n"
if begin in doc and end in doc:
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc = head + block + tail.lstrip("\n")
else:
    doc = doc.rstrip("\n") + "\n\n" + block
open(doc_path, "w").write(doc)
PY
  log "put the section into ${DOC#"$REPO"/}"
fi
