#!/usr/bin/env bash
# Criterion micro-benchmarks (benches/*.rs) in a release build, summarised as a markdown
# fragment. See bench/README.md.
#
# usage: bench/micro.sh [--out FILE] [BENCH...]
#   BENCH...     bench targets to run (default: every benches/*.rs)
#   --out FILE   where to write the fragment (default: bench/results/micro.md)
# The fragment is a table (bench, median, per-message or per-op cost, throughput) built from
# criterion's <target dir>/criterion/**/new/estimates.json written by this run; bench/run.sh
# includes it in its report as "Micro-benchmarks". cargo's output goes to
# <target dir>/micro-bench.log. Honours CARGO_TARGET_DIR.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "micro.sh: $*" >&2; exit 1; }

OUT=$BENCH_DIR/results/micro.md
BENCHES=()
while [ $# -gt 0 ]; do
  case $1 in
    --out) [ $# -ge 2 ] || die "--out needs a value"; OUT=$2; shift 2 ;;
    --out=*) OUT=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option: $1" ;;
    *) BENCHES+=("$1"); shift ;;
  esac
done
command -v cargo >/dev/null || die "cargo not found"
command -v python3 >/dev/null || die "python3 not found"

TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$REPO/$TARGET_DIR ;; esac
# Each benches/*.rs by name (`--benches` would also build the library's and binaries' test
# harnesses in release mode, for no benchmark).
if [ ${#BENCHES[@]} -eq 0 ]; then
  for f in "$REPO"/benches/*.rs; do BENCHES+=("$(basename "$f" .rs)"); done
fi
SELECT=()
for b in "${BENCHES[@]}"; do
  [ -f "$REPO/benches/$b.rs" ] || die "no bench named '$b' (benches/$b.rs)"
  SELECT+=(--bench "$b")
done

mkdir -p "$(dirname "$OUT")" "$TARGET_DIR"
LOG=$TARGET_DIR/micro-bench.log
# Criterion's results written from now on are this run's (older ones stay for comparison).
SINCE=$(date +%s)
echo "micro.sh: cargo bench ${SELECT[*]} (release build; cargo's output in $LOG)" >&2
if ! (cd "$REPO" && cargo bench --quiet "${SELECT[@]}") >"$LOG" 2>&1; then
  tail -n 30 "$LOG" >&2
  die "cargo bench failed (full output: $LOG)"
fi
COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || true)
if [ -n "$COMMIT" ] && [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  COMMIT="$COMMIT (with uncommitted changes)"
fi
python3 "$BENCH_DIR/bench.py" micro-report --criterion "$TARGET_DIR/criterion" --since "$SINCE" \
  --md "$OUT" --commit "$COMMIT" >/dev/null
echo "micro.sh: wrote ${OUT#"$REPO"/}" >&2
