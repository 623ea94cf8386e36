#!/usr/bin/env python3
"""Helpers for bench/run.sh (python3 standard library only).

Subcommands:
  freeport [N]                    print N distinct free TCP ports on 127.0.0.1
  authprobe HOST PORT USER DB     print the client auth method a server asks for
  ticks PID                       print utime+stime (clock ticks) of PID from /proc/PID/stat
  ticks-split PID                 print "utime stime" (clock ticks, user and kernel) of PID
  scram-secret PASSWORD           print a SCRAM-SHA-256 secret (random salt, 4096 iterations)
  record ...                      parse one pgbench run (or the concurrent halves of a split
                                  run: --out/--rc repeated), append a CSV row, print a summary
  report --csv F --meta F --md F [--png F] [--micro F]
                                  write the markdown report (also printed to stdout), with
                                  the chart (--png, default: the .md path with .png) and the
                                  micro-benchmark fragment (--micro, if the file exists)
  chart --csv F --png F           draw tps and p99 per workload (gnuplot) into a PNG
  micro-report --criterion DIR --since EPOCH --md F
                                  criterion results newer than EPOCH as a markdown fragment
"""

import argparse
import base64
import csv
import glob
import hashlib
import hmac
import math
import os
import re
import socket
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

CSV_FIELDS = [
    "round", "workload", "target", "position", "status", "tps", "transactions",
    "failed_tx", "lat_avg_ms", "p50_ms", "p99_ms", "conn_ms", "pooler_cpu_s",
    "pooler_us_per_tx", "pooler_rss_kb", "clients", "duration_s", "started_at",
    # Added later (older CSVs lack them; the report shows "—"): the pooler's CPU split into
    # user time (utime, its own code) and kernel time (stime, mostly its socket syscalls).
    "pooler_user_s", "pooler_sys_s", "pooler_user_us_per_tx", "pooler_sys_us_per_tx",
]

# Order and description of the workloads (ids shared with run.sh).
WORKLOADS = [
    ("select-simple", "-S -M simple -c 16", "read-only point selects, simple protocol, 16 clients"),
    ("select-extended", "-S -M extended -c 16", "read-only point selects, extended protocol, 16 clients"),
    ("tpcb", "-c 16", "TPC-B-like read/write transactions (pgbench default script), 16 clients"),
    ("select-500", "-S -c 500", "read-only point selects, 500 clients (more clients than pool size 20)"),
    ("select-connect", "-S -C -c 32", "a new connection for every transaction, 32 clients"),
    ("select-connect-md5", "-S -C -c 32",
     "as select-connect, as a user every target asks for md5: pgbench's own SCRAM key derivation "
     "(PBKDF2, 4096 rounds a login) no longer sets the pace"),
    ("select-prepared", "-S -M prepared -c 16",
     "read-only point selects, named prepared statements, 16 clients "
     "(pgbouncer 1.18 cannot do this in transaction mode: its runs fail)"),
]
TARGETS = ["direct", "pgbouncer", "pgsluice", "pgsluice-primary", "direct-replicas"]
# direct-replicas: the same pgbench args split in two halves run concurrently straight against
# each of the two replicas (select-only workloads): the ceiling for pgsluice's routed reads.


# ---------------------------------------------------------------- small tools

def cmd_freeport(args):
    n = int(args[0]) if args else 1
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        print(" ".join(str(s.getsockname()[1]) for s in socks))
    finally:
        for s in socks:
            s.close()


def _recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return buf


def cmd_authprobe(args):
    """Send a StartupMessage and report which authentication the server asks for."""
    host, port, user, db = args[0], int(args[1]), args[2], args[3]
    params = b"user\0" + user.encode() + b"\0database\0" + db.encode() + b"\0\0"
    body = struct.pack("!I", 196608) + params
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(struct.pack("!I", len(body) + 4) + body)
        kind = _recv_exact(s, 1)
        length = struct.unpack("!I", _recv_exact(s, 4))[0]
        payload = _recv_exact(s, length - 4)
    if kind == b"E":
        print("error:" + payload.replace(b"\0", b" ").decode(errors="replace").strip())
        return 1
    if kind != b"R":
        print("unknown:message-" + kind.decode(errors="replace"))
        return 1
    code = struct.unpack("!I", payload[:4])[0]
    if code == 0:
        print("trust")
    elif code == 3:
        print("plain")
    elif code == 5:
        print("md5")
    elif code == 10:
        mechs = [m for m in payload[4:].split(b"\0") if m]
        print("scram-sha-256" if b"SCRAM-SHA-256" in mechs else "sasl:" + ",".join(m.decode() for m in mechs))
    else:
        print("unknown:%d" % code)
    return 0


def read_ticks_split(pid):
    """(utime, stime) of PID in clock ticks: user-space and kernel CPU time."""
    with open("/proc/%s/stat" % pid) as f:
        data = f.read()
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); utime is field 14, stime field 15.
    return int(rest[11]), int(rest[12])


def read_ticks(pid):
    utime, stime = read_ticks_split(pid)
    return utime + stime


def cmd_scram_secret(args):
    """SCRAM-SHA-256 secret in PostgreSQL's pg_authid format (ASCII passwords only)."""
    password = args[0].encode()
    salt, iterations = os.urandom(16), 4096
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda b: base64.b64encode(b).decode()
    print("SCRAM-SHA-256$%d:%s$%s:%s" % (iterations, b64(salt), b64(stored_key), b64(server_key)))


def cmd_ticks(args):
    print(read_ticks(args[0]))


def cmd_ticks_split(args):
    print("%d %d" % read_ticks_split(args[0]))


# ---------------------------------------------------------------- pgbench parsing

def parse_pgbench(text):
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("number of transactions actually processed:"):
            out["transactions"] = int(line.split(":")[1].split()[0].split("/")[0])
        elif line.startswith("number of failed transactions:"):
            out["failed_tx"] = int(line.split(":")[1].split()[0])
        elif line.startswith("latency average ="):
            out["lat_avg_ms"] = float(line.split("=")[1].split()[0])
        elif line.startswith("initial connection time ="):
            out["conn_ms"] = float(line.split("=")[1].split()[0])
        elif line.startswith("average connection time ="):
            out["conn_ms"] = float(line.split("=")[1].split()[0])
        elif line.startswith("tps ="):
            out["tps"] = float(line.split("=")[1].split()[0])
    return out


def latency_percentiles(prefix):
    """p50/p99 in ms from pgbench -l per-transaction logs (field 3 = latency in us)."""
    lat = []
    for path in glob.glob(glob.escape(prefix) + "*"):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    lat.append(int(parts[2]))
    if not lat:
        return None, None, 0
    lat.sort()

    def rank(p):
        return lat[max(0, math.ceil(p * len(lat)) - 1)] / 1000.0

    return rank(0.50), rank(0.99), len(lat)


def fmt(v, nd=3):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return ("%." + str(nd) + "f") % v
    return str(v)


def run_status(rc, r):
    """Status of one pgbench process from its exit code and parsed output."""
    tx = r.get("transactions")
    if rc == 124 or rc == 137:
        return "failed:timeout"
    if rc != 0:
        return "failed:rc=%d" % rc
    if tx == 0:
        return "failed:no-transactions"
    if tx is None or "tps" not in r:
        return "failed:unparsed"
    if r.get("failed_tx", 0) > 0:
        return "failed:%d-failed-tx" % r["failed_tx"]
    return "ok"


def combine_halves(parts):
    """One result from pgbench processes that ran concurrently with the same -T (a split run):
    transactions, failures and tps add up; average latency and connection time are the means
    weighted by each half's transactions."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    txs = [p.get("transactions") for p in parts]
    if all(t is not None for t in txs):
        out["transactions"] = sum(txs)
    if any("failed_tx" in p for p in parts):
        out["failed_tx"] = sum(p.get("failed_tx", 0) for p in parts)
    if all("tps" in p for p in parts):
        out["tps"] = sum(p["tps"] for p in parts)
    for key in ("lat_avg_ms", "conn_ms"):
        pairs = [(p[key], p.get("transactions") or 0) for p in parts if key in p]
        if len(pairs) == len(parts):
            weight = sum(w for _v, w in pairs)
            out[key] = (sum(v * w for v, w in pairs) / weight if weight
                        else sum(v for v, _w in pairs) / len(pairs))
    return out


def cmd_record(argv):
    ap = argparse.ArgumentParser(prog="bench.py record")
    ap.add_argument("--csv", required=True)
    ap.add_argument("--round", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--position", required=True)
    ap.add_argument("--rc", type=int, action="append", required=True,
                    help="pgbench exit code; repeat, in the order of --out, for a split run")
    ap.add_argument("--out", action="append", required=True,
                    help="pgbench stdout+stderr; repeat for the concurrent halves of a split run")
    ap.add_argument("--log-prefix", default="")
    ap.add_argument("--connect-mode", type=int, default=0)
    ap.add_argument("--ticks-before", default="", help="utime+stime ticks (without the split)")
    ap.add_argument("--ticks-after", default="")
    ap.add_argument("--cpu-before", default="", help='"utime stime" ticks (bench.py ticks-split)')
    ap.add_argument("--cpu-after", default="")
    ap.add_argument("--clk-tck", type=int, default=100)
    ap.add_argument("--rss-kb", default="")
    ap.add_argument("--clients", default="")
    ap.add_argument("--duration", default="")
    ap.add_argument("--started-at", default="")
    a = ap.parse_args(argv)
    if len(a.rc) != len(a.out):
        ap.error("give one --rc per --out (got %d and %d)" % (len(a.rc), len(a.out)))

    texts, parts, statuses = [], [], []
    for rc, path in zip(a.rc, a.out):
        with open(path, errors="replace") as f:
            texts.append(f.read())
        parts.append(parse_pgbench(texts[-1]))
        statuses.append(run_status(rc, parts[-1]))
    r = combine_halves(parts)
    tx = r.get("transactions")
    bad = [(i, st) for i, st in enumerate(statuses) if st != "ok"]
    status = "ok"
    if bad:
        i, status = bad[0]
        if len(statuses) > 1:
            status += "(half-%d)" % (i + 1)

    p50 = p99 = None
    if a.log_prefix and not a.connect_mode and status == "ok":
        p50, p99, _ = latency_percentiles(a.log_prefix)

    def per_tx(cpu):
        return cpu * 1e6 / tx if cpu is not None and status == "ok" and tx else None

    cpu_s = user_s = sys_s = None
    if a.cpu_before.strip() and a.cpu_after.strip():
        (ub, sb), (ua, sa) = ([int(x) for x in v.split()] for v in (a.cpu_before, a.cpu_after))
        user_s, sys_s = (ua - ub) / a.clk_tck, (sa - sb) / a.clk_tck
        cpu_s = user_s + sys_s
    elif a.ticks_before != "" and a.ticks_after != "":
        cpu_s = (int(a.ticks_after) - int(a.ticks_before)) / a.clk_tck

    row = {
        "round": a.round, "workload": a.workload, "target": a.target, "position": a.position,
        "status": status,
        "tps": fmt(r.get("tps") if status == "ok" else None, 1),
        "transactions": tx if tx is not None else "",
        "failed_tx": r.get("failed_tx", ""),
        "lat_avg_ms": fmt(r.get("lat_avg_ms")),
        "p50_ms": fmt(p50), "p99_ms": fmt(p99),
        "conn_ms": fmt(r.get("conn_ms")),
        "pooler_cpu_s": fmt(cpu_s, 2), "pooler_us_per_tx": fmt(per_tx(cpu_s), 1),
        "pooler_rss_kb": a.rss_kb, "clients": a.clients, "duration_s": a.duration,
        "started_at": a.started_at,
        "pooler_user_s": fmt(user_s, 2), "pooler_sys_s": fmt(sys_s, 2),
        "pooler_user_us_per_tx": fmt(per_tx(user_s), 2),
        "pooler_sys_us_per_tx": fmt(per_tx(sys_s), 2),
    }
    new = not os.path.exists(a.csv) or os.path.getsize(a.csv) == 0
    with open(a.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)

    summary = "round %s %-16s %-9s %s tps=%s" % (a.round, a.workload, a.target, status, row["tps"] or "-")
    if row["p99_ms"]:
        summary += " p99=%sms" % row["p99_ms"]
    if a.connect_mode and row["conn_ms"]:
        summary += " conn=%sms" % row["conn_ms"]
    if row["pooler_us_per_tx"]:
        summary += " pooler=%sus/tx" % row["pooler_us_per_tx"]
        if row["pooler_user_us_per_tx"]:
            summary += " (user %s + sys %s)" % (row["pooler_user_us_per_tx"], row["pooler_sys_us_per_tx"])
    print(summary)
    for i, (st, text) in enumerate(zip(statuses, texts)):
        if st != "ok":
            tail = "\n".join(text.strip().splitlines()[-8:])
            which = " of half %d" % (i + 1) if len(texts) > 1 else ""
            print("  pgbench output%s (tail):\n    %s" % (which, tail.replace("\n", "\n    ")), file=sys.stderr)
    return 0


# ---------------------------------------------------------------- report

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def f1(v, nd=0, suffix=""):
    if v is None:
        return "—"
    return ("{:,.%df}" % nd).format(v) + suffix


def read_meta(path):
    meta = {}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if "=" in line:
                k, v = line.split("=", 1)
                meta[k] = v
    return meta


def cmd_report(argv):
    ap = argparse.ArgumentParser(prog="bench.py report")
    ap.add_argument("--csv", required=True)
    ap.add_argument("--meta", required=True)
    ap.add_argument("--md", required=True)
    ap.add_argument("--png", default="", help="chart path (default: the --md path with .png)")
    ap.add_argument("--micro", default="", help="markdown fragment of bench/micro.sh, if it ran")
    a = ap.parse_args(argv)
    meta = read_meta(a.meta)
    png = a.png or os.path.splitext(a.md)[0] + ".png"
    with open(a.csv, newline="") as f:
        rows = list(csv.DictReader(f))

    by = {}
    for r in rows:
        by.setdefault((r["workload"], r["target"]), []).append(r)
    rounds = sorted({int(r["round"]) for r in rows})

    def get(wl, tgt, rnd, field):
        for r in by.get((wl, tgt), []):
            if int(r["round"]) == rnd and r["status"] == "ok":
                return num(r.get(field))
        return None

    L = []
    L.append("# pgsluice end-to-end benchmarks")
    L.append("")
    if meta.get("standin") == "1":
        L.append("> **Stand-in run.** The `pgsluice` column below is a *second pgbouncer* started by "
                 "`bench/standin-demo.sh`, used to prove the harness before the pgsluice `demo` "
                 "subcommand existed. These are not pgsluice numbers.")
        L.append("")
    L.append("Generated by `bench/run.sh` on %s (run took %s)." % (meta.get("date", "?"), meta.get("elapsed", "?")))
    L.append("Raw per-run results: `%s`." % meta.get("csv_rel", a.csv))
    L.append("What limits these numbers on this machine, and what a transaction and an idle client "
             "cost pgsluice: [performance.md](performance.md).")
    L.append("")
    L.append("## Machine")
    L.append("")
    L.append("| | |")
    L.append("|---|---|")
    for k, label in [("cpu", "CPU"), ("nproc", "cores (nproc)"), ("mem", "memory"), ("kernel", "kernel"), ("load", "load average"),
                     ("os", "OS"), ("pg_version", "PostgreSQL"), ("pgbench_version", "pgbench"),
                     ("pgbouncer_version", "pgbouncer"), ("commit", "pgsluice commit"),
                     ("pgsluice_bin", "pgsluice binary")]:
        if meta.get(k):
            L.append("| %s | %s |" % (label, meta[k].replace("|", "\\|")))
    L.append("")
    L.append("## Settings")
    L.append("")
    for line in meta.get("settings", "").split(" ;; "):
        if line:
            L.append("- " + line)
    L.append("")

    L.append("## Summary (medians over %d round%s)" % (len(rounds), "" if len(rounds) == 1 else "s"))
    L.append("")
    L.append("Ratios are computed per round (same round, back-to-back runs) and the median of those "
             "per-round ratios is shown; >1 means pgsluice is faster. `n` = rounds in which all "
             "compared runs succeeded.")
    L.append("")
    L.append("| workload | pgbench | direct tps | pgbouncer tps | pgsluice tps | pgsluice / pgbouncer | pgsluice / direct | pgbouncer / direct |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|")
    lat_lines = []
    cpu_lines = []
    route_lines = []
    for wl, args, _desc in WORKLOADS:
        if not any((wl, t) in by for t in TARGETS):
            continue
        tps = {t: med([get(wl, t, rn, "tps") for rn in rounds]) for t in TARGETS}

        def ratio(a_t, b_t):
            vals = []
            for rn in rounds:
                x, y = get(wl, a_t, rn, "tps"), get(wl, b_t, rn, "tps")
                if x is not None and y:
                    vals.append(x / y)
            if not vals:
                return "—"
            return "%.2f× (n=%d; %s)" % (statistics.median(vals), len(vals),
                                          ", ".join("%.2f" % v for v in vals))

        def tps_cell(t):
            ok = sum(1 for r in by.get((wl, t), []) if r["status"] == "ok")
            total = len(by.get((wl, t), []))
            cell = f1(tps[t])
            if total and ok < total:
                cell += " (%d/%d failed)" % (total - ok, total)
            return cell

        L.append("| %s | `%s` | %s | %s | %s | %s | %s | %s |" % (
            wl, args, tps_cell("direct"), tps_cell("pgbouncer"), tps_cell("pgsluice"),
            ratio("pgsluice", "pgbouncer"), ratio("pgsluice", "direct"), ratio("pgbouncer", "direct")))

        if (wl, "pgsluice-primary") in by:
            if (wl, "direct-replicas") in by:
                replicas = (tps_cell("direct-replicas"), ratio("pgsluice", "direct-replicas"))
            elif "-S" in args.split():
                replicas = ("not run", "—")
            else:
                replicas = ("n/a (writes)", "—")
            route_lines.append("| %s | `%s` | %s | %s | %s | %s | %s | %s |" % (
                (wl, args, tps_cell("pgsluice"), tps_cell("pgsluice-primary"))
                + replicas + (ratio("pgsluice", "pgsluice-primary"), ratio("pgsluice-primary", "pgbouncer"))))

        connect = "-C" in args.split()
        if connect:
            conn = {t: med([get(wl, t, rn, "conn_ms") for rn in rounds]) for t in TARGETS}
            lat_lines.append("| %s | n/a (`-C`: tps only) | — | — | %s | %s | %s |" % (
                wl, f1(conn["direct"], 3), f1(conn["pgbouncer"], 3), f1(conn["pgsluice"], 3)))
        else:
            p99 = {t: med([get(wl, t, rn, "p99_ms") for rn in rounds]) for t in TARGETS}
            lat_lines.append("| %s | %s | %s | %s | — | — | — |" % (
                wl, f1(p99["direct"], 3), f1(p99["pgbouncer"], 3), f1(p99["pgsluice"], 3)))
        poolers = ("pgbouncer", "pgsluice")
        cpu = {t: med([get(wl, t, rn, "pooler_us_per_tx") for rn in rounds]) for t in poolers}
        user = {t: med([get(wl, t, rn, "pooler_user_us_per_tx") for rn in rounds]) for t in poolers}
        kern = {t: med([get(wl, t, rn, "pooler_sys_us_per_tx") for rn in rounds]) for t in poolers}
        rss = {t: med([get(wl, t, rn, "pooler_rss_kb") for rn in rounds]) for t in poolers}
        cr = "—"
        if cpu["pgbouncer"] and cpu["pgsluice"] is not None:
            cr = "%.2f×" % (cpu["pgsluice"] / cpu["pgbouncer"])
        cpu_lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            wl, f1(user["pgbouncer"], 1), f1(kern["pgbouncer"], 1), f1(cpu["pgbouncer"], 1),
            f1(user["pgsluice"], 1), f1(kern["pgsluice"], 1), f1(cpu["pgsluice"], 1), cr,
            f1(rss["pgbouncer"], 0), f1(rss["pgsluice"], 0)))

    L.append("")
    why = write_chart(rows, png, chart_title(rows, meta))
    if why is None:
        rel = os.path.relpath(os.path.abspath(png), os.path.dirname(os.path.abspath(a.md)))
        L.append("![tps and p99 per workload for direct, pgbouncer and pgsluice](%s)" % rel)
        L.append("")
        L.append("The chart shows the medians of the tables on this page: tps (top) and p99 latency "
                 "(bottom) per workload, one bar per target; `pgsluice, primary only` is the same "
                 "process with reads kept on the primary and `direct, 2 replicas` is pgbench split "
                 "straight to the two replicas (select-only workloads; see below). A missing bar is a target whose "
                 "runs all failed (`failed`) or, for p99, a `-C` workload (`n/a`). It is drawn by "
                 "`bench/bench.py` with gnuplot; `bench/bench.py chart --csv %s --png FILE` redraws it." %
                 meta.get("csv_rel", a.csv))
    else:
        L.append("(No chart: %s.)" % why)
    if route_lines:
        L.append("")
        L.append("### Read routing: 2 replicas vs primary only")
        L.append("")
        L.append("`pgsluice` routes reads to the two replicas (the shipped default); `pgsluice-primary` is the "
                 "same process with every statement on the primary (startup option "
                 "`-c pgsluice.route=primary`), like for like with pgbouncer. All three PostgreSQL nodes "
                 "share the same %s cores, so spreading reads cannot add CPU here: the ratio shows the "
                 "routing overhead and balance, not the capacity a real replica tier adds." % meta.get("nproc", "?"))
        L.append("")
        L.append("`direct-replicas` is the ceiling for the routed reads on this box: the same pgbench args "
                 "split in two halves (`-c N/2 -j 1` each, same `-T` and `-M`) run at the same time "
                 "straight against each replica, tps summed, p99 from both halves' `-l` logs, failed if "
                 "either half fails; select-only workloads only (TPC-B writes cannot run on a replica). "
                 "`pgsluice / direct-replicas` (median of per-round ratios) is the share of that ceiling "
                 "pgsluice's routed reads reach: 1.00× would mean routing through pgsluice costs nothing "
                 "over clients that each connect to one replica themselves (the ceiling is itself below "
                 "`direct` on the primary, since two PostgreSQL instances on the same cores do less than one).")
        L.append("")
        L.append("| workload | pgbench | pgsluice (routed) tps | pgsluice primary-only tps | direct-replicas tps | pgsluice / direct-replicas | routed / primary-only | primary-only / pgbouncer |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|")
        L.extend(route_lines)
    L.append("")
    L.append("### Latency")
    L.append("")
    L.append("p99 = 99th percentile of per-transaction latency from the `pgbench -l` logs (median over "
             "rounds). For `-C` runs pgbench's per-transaction latency is not comparable, so only tps "
             "(above) and pgbench's average connection time are shown.")
    L.append("")
    L.append("| workload | p99 ms direct | p99 ms pgbouncer | p99 ms pgsluice | connect ms direct | connect ms pgbouncer | connect ms pgsluice |")
    L.append("|---|---:|---:|---:|---:|---:|---:|")
    L.extend(lat_lines)
    L.append("")
    L.append("### Pooler CPU per transaction")
    L.append("")
    L.append("CPU time of the pooler process over the pgbench run, divided by the transactions pgbench "
             "reported (median over rounds; lower is better): user = utime, sys = stime "
             "(`/proc/PID/stat` fields 14 and 15), total = utime+stime. "
             "On this shared %s-core box this is the steadiest figure: pgbench, PostgreSQL and the "
             "pooler compete for the same cores. RSS = pooler resident memory sampled mid-run." % meta.get("nproc", "?"))
    L.append("")
    L.append("| workload | pgbouncer user µs/tx | pgbouncer sys µs/tx | pgbouncer total µs/tx "
             "| pgsluice user µs/tx | pgsluice sys µs/tx | pgsluice total µs/tx "
             "| pgsluice / pgbouncer (total) | pgbouncer RSS kB | pgsluice RSS kB |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    L.extend(cpu_lines)
    L.append("")
    L.append("The split shows where the time goes: sys (kernel) time is mostly the socket system calls "
             "that both poolers make for every transaction (reading from and writing to the client and "
             "server sockets, and waiting for them), so it follows the number of syscalls and bytes; user "
             "time is the pooler's own code (parsing, routing, pool bookkeeping), where a difference is the "
             "cost of the implementation itself. (\"—\": no successful run, or a CSV from before the split, "
             "which has the total only.)")
    L.append("")
    L.append("## Micro-benchmarks")
    L.append("")
    L.append("Criterion benches in `benches/`, run by `bench/micro.sh` (a stage of `bench/run.sh` unless "
             "`--no-micro`): the cost of pgsluice's own pieces without PostgreSQL. `codec`: framing and "
             "scanning server output, startup parsing, message builders, session-state prefilter; "
             "`classify`: the read/write classifier and its cache; `shard`: shard placement; `relay`: "
             "pgsluice's real client session on loopback TCP between a raw client and a *scripted "
             "PostgreSQL peer* (it answers a fixed script and runs no SQL), compared with the same client "
             "straight to the peer; `pool`: pool checkout and release with 1, 16 and 256 tasks sharing "
             "20 real connections (to the scripted peer) on a 2-thread runtime. See `bench/README.md`.")
    L.append("")
    micro = ""
    if a.micro and os.path.exists(a.micro):
        with open(a.micro) as f:
            micro = f.read().strip()
    L.append(micro or "(Not run in this run: `--no-micro`, `--standin`, or `bench/micro.sh` failed.)")
    L.append("")
    L.append("## Raw per-round numbers")
    L.append("")
    L.append("`pos` = position of the run within its round's workload group (targets are rotated per round).")
    L.append("")
    L.append("| round | workload | target | pos | status | tps | p99 ms | conn ms | pooler µs/tx | user µs/tx | sys µs/tx | pooler CPU s | RSS kB |")
    L.append("|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    order = {w[0]: i for i, w in enumerate(WORKLOADS)}
    for r in sorted(rows, key=lambda r: (int(r["round"]), order.get(r["workload"], 99), int(r["position"]))):
        L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["round"], r["workload"], r["target"], r["position"], r["status"], r["tps"] or "—",
            r["p99_ms"] or "—", r["conn_ms"] or "—", r["pooler_us_per_tx"] or "—",
            r.get("pooler_user_us_per_tx") or "—", r.get("pooler_sys_us_per_tx") or "—",
            r["pooler_cpu_s"] or "—", r["pooler_rss_kb"] or "—"))
    L.append("")
    notes = meta.get("notes", "")
    if notes:
        L.append("## Notes")
        L.append("")
        for n in notes.split(" ;; "):
            if n:
                L.append("- " + n)
        L.append("")
    text = "\n".join(L)
    os.makedirs(os.path.dirname(os.path.abspath(a.md)), exist_ok=True)
    with open(a.md, "w") as f:
        f.write(text)
    print(text)
    return 0

# ---------------------------------------------------------------- chart

CHART_TARGETS = [  # (target, legend, colour)
    ("direct", "direct", "#8c8c8c"),
    ("direct-replicas", "direct, 2 replicas", "#c7c7c7"),
    ("pgbouncer", "pgbouncer", "#1f77b4"),
    ("pgsluice", "pgsluice", "#d62728"),
    ("pgsluice-primary", "pgsluice, primary only", "#f4a582"),
]


def chart_series(rows):
    """Per workload and target: median tps and p99 over rounds (None when no run succeeded),
    and whether the target ran that workload at all."""
    out = []
    for wl, args, _desc in WORKLOADS:
        runs = {t: [r for r in rows if r["workload"] == wl and r["target"] == t] for t, _l, _c in CHART_TARGETS}
        if not any(runs.values()):
            continue
        connect = "-C" in args.split()
        cell = {}
        for t, _l, _c in CHART_TARGETS:
            ok = [r for r in runs[t] if r["status"] == "ok"]
            cell[t] = {
                "ran": bool(runs[t]),
                "tps": med([num(r["tps"]) for r in ok]),
                "p99": None if connect else med([num(r["p99_ms"]) for r in ok]),
                "connect": connect,
            }
        out.append((wl, cell))
    return out


def write_chart(rows, png, title):
    """Draws two panels (tps, p99) of grouped bars per workload with gnuplot.
    Returns None on success, else why no chart was drawn."""
    gnuplot = shutil.which("gnuplot")
    if gnuplot is None:
        return "gnuplot is not installed (Debian: apt-get install -y gnuplot-nox)"
    series = chart_series(rows)
    if not series:
        return "no results to draw"
    targets = [t for t in CHART_TARGETS if any(c[t[0]]["ran"] for _wl, c in series)]
    n = len(targets)
    gap = 1

    def table(metric, fmt_value):
        lines = []
        for wl, cell in series:
            vals, ys, labels = [], [], []
            for t, _l, _c in targets:
                c = cell[t]
                v = c[metric]
                vals.append("?" if v is None else "%g" % v)
                ys.append("0" if v is None else "%g" % v)
                if v is not None:
                    labels.append(fmt_value(v))
                elif not c["ran"]:
                    labels.append("")
                elif metric == "p99" and c["connect"]:
                    labels.append("n/a (-C)")
                else:
                    labels.append("failed")
            lines.append("\t".join([wl] + vals + ys + labels))
        return "\n".join(lines) + "\n"

    def panel(datafile, ylabel, panel_title):
        bars = []
        labels = []
        for j, (_t, legend, colour) in enumerate(targets):
            first = "'%s' using %d:xtic(1)" % (datafile, 2 + j) if j == 0 else "'' using %d" % (2 + j)
            bars.append("%s title '%s' lc rgb '%s'" % (first, legend, colour))
            off = (j - (n - 1) / 2.0) / (n + gap)
            labels.append("'%s' using ($0%+.4f):%d:%d with labels rotate by 90 left offset 0,0.4 "
                          "font ',8' notitle" % (datafile, off, 2 + n + j, 2 + 2 * n + j))
        return "\n".join([
            "set title '%s' offset 0,-0.5" % panel_title,
            "set ylabel '%s'" % ylabel,
            "plot " + ", \\\n     ".join(bars + labels),
        ])

    with tempfile.TemporaryDirectory(prefix="pgsluice-chart.") as tmp:
        tps_dat = os.path.join(tmp, "tps.dat")
        p99_dat = os.path.join(tmp, "p99.dat")
        with open(tps_dat, "w") as f:
            f.write(table("tps", lambda v: "{:,.0f}".format(v)))
        with open(p99_dat, "w") as f:
            f.write(table("p99", lambda v: "%.2f" % v))
        script = "\n".join([
            "set terminal pngcairo size 1400,1000 font 'sans,11'",
            "set output '%s'" % png.replace("'", "''"),
            "set datafile separator '\\t'",
            "set datafile missing '?'",
            "set style data histograms",
            "set style histogram clustered gap %d" % gap,
            "set style fill solid 0.9 border rgb '#404040'",
            "set boxwidth 1",
            "set grid ytics lc rgb '#dddddd'",
            "set key at screen 0.5,0.945 center top horizontal noenhanced samplen 2 width 2",
            "set tmargin 5",
            "set xtics noenhanced nomirror scale 0",
            "set xrange [-0.6:%g]" % (len(series) - 0.4),
            "set ytics nomirror",
            "set border 3",
            "set offsets 0,0,graph 0.18,0",
            "set yrange [0:*]",
            "set format y \"%.0f\"",
            "set multiplot layout 2,1 title '%s' noenhanced" % title.replace("'", "''"),
            panel(tps_dat, "transactions/s", "Throughput (tps, higher is better)"),
            "set format y \"%g\"",
            "unset key",
            panel(p99_dat, "ms", "p99 latency (ms, lower is better; -C runs: not comparable, not drawn)"),
            "unset multiplot",
            "",
        ])
        script_path = os.path.join(tmp, "chart.gp")
        with open(script_path, "w") as f:
            f.write(script)
        os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
        r = subprocess.run([gnuplot, script_path], capture_output=True, text=True)
        if r.returncode != 0:
            return "gnuplot failed: " + (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]
    return None


def chart_title(rows, meta):
    rounds = len({r["round"] for r in rows})
    t = "pgbench through direct / pgbouncer / pgsluice: medians over %d round%s" % (rounds, "" if rounds == 1 else "s")
    if meta.get("date"):
        t += ", " + meta["date"]
    if meta.get("commit"):
        t += ", pgsluice " + meta["commit"]
    return t


def cmd_chart(argv):
    ap = argparse.ArgumentParser(prog="bench.py chart")
    ap.add_argument("--csv", required=True)
    ap.add_argument("--png", required=True)
    ap.add_argument("--meta", default="")
    a = ap.parse_args(argv)
    with open(a.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    meta = read_meta(a.meta) if a.meta else {}
    why = write_chart(rows, a.png, chart_title(rows, meta))
    if why:
        print("no chart: " + why, file=sys.stderr)
        return 1
    print("wrote " + a.png)
    return 0


# ---------------------------------------------------------------- micro-benchmarks

def fmt_ns(ns):
    if ns is None:
        return "—"
    if ns < 1e3:
        return "%.1f ns" % ns
    if ns < 1e6:
        return "%.2f µs" % (ns / 1e3)
    if ns < 1e9:
        return "%.2f ms" % (ns / 1e6)
    return "%.2f s" % (ns / 1e9)


def fmt_rate(per_s, unit):
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_s >= scale:
            return "%.2f %s%s/s" % (per_s / scale, prefix, unit)
    return "%.1f %s/s" % (per_s, unit)


def micro_rows(criterion_dir, since):
    """(full id, median ns, low ns, high ns, throughput) per criterion benchmark whose result
    was written at or after `since`, in the order they ran."""
    found = []
    for bench_json in glob.glob(os.path.join(glob.escape(criterion_dir), "**", "new", "benchmark.json"), recursive=True):
        est_json = os.path.join(os.path.dirname(bench_json), "estimates.json")
        if not os.path.exists(est_json):
            continue
        mtime = os.path.getmtime(est_json)
        if mtime < since:
            continue
        with open(bench_json) as f:
            bench = json.load(f)
        with open(est_json) as f:
            est = json.load(f)
        median = est["median"]
        found.append((mtime, bench.get("full_id") or bench.get("title") or bench_json,
                      median["point_estimate"], median["confidence_interval"]["lower_bound"],
                      median["confidence_interval"]["upper_bound"], bench.get("throughput")))
    found.sort(key=lambda r: r[0])
    return [r[1:] for r in found]


def micro_table(rows):
    L = ["| bench | median | 95% CI of median | per message / op | throughput |",
         "|---|---:|---:|---:|---:|"]
    for full_id, ns, lo, hi, tp in rows:
        per, rate = "—", "—"
        msgs = re.search(r"(\d+)_msgs", full_id)
        if tp and "Elements" in tp and tp["Elements"]:
            n = tp["Elements"]
            unit = "msg" if msgs else "op"
            per = fmt_ns(ns / n) + (" per %s" % unit)
            rate = fmt_rate(n * 1e9 / ns, unit)
        elif tp and "Bytes" in tp and tp["Bytes"]:
            rate = "%.1f MiB/s" % (tp["Bytes"] * 1e9 / ns / 1048576)
            if msgs:
                per = fmt_ns(ns / int(msgs.group(1))) + " per msg"
        else:
            per = fmt_ns(ns) + " per op"
            rate = fmt_rate(1e9 / ns, "op")
        L.append("| `%s` | %s | %s – %s | %s | %s |" % (full_id, fmt_ns(ns), fmt_ns(lo), fmt_ns(hi), per, rate))
    return L


def relay_overhead(rows):
    """pgsluice − direct per request, for relay cases measured both ways."""
    by = {r[0]: r[1] for r in rows}
    L = []
    for full_id, ns, _lo, _hi, _tp in rows:
        if "/pgsluice" not in full_id or not full_id.startswith("relay/"):
            continue
        direct = by.get(full_id.replace("/pgsluice", "/direct"))
        if direct is None:
            continue
        case = full_id.replace("/pgsluice", "")
        msgs = re.search(r"(\d+)_msgs", full_id)
        per_msg = fmt_ns((ns - direct) / int(msgs.group(1))) if msgs else "—"
        L.append("| `%s` | %s | %s | %s | %s |" % (case, fmt_ns(direct), fmt_ns(ns), fmt_ns(ns - direct), per_msg))
    if not L:
        return []
    return ["", "Relay cost per request (`relay/…`: the same client straight to the scripted peer, "
            "then through pgsluice; the difference is what pgsluice adds, all on one thread):", "",
            "| case | direct | through pgsluice | pgsluice adds | per message |",
            "|---|---:|---:|---:|---:|"] + L


def cmd_micro_report(argv):
    ap = argparse.ArgumentParser(prog="bench.py micro-report")
    ap.add_argument("--criterion", required=True, help="criterion's output dir (<target>/criterion)")
    ap.add_argument("--since", type=float, required=True, help="only results written at or after this epoch")
    ap.add_argument("--md", required=True)
    ap.add_argument("--command", default="bench/micro.sh")
    ap.add_argument("--commit", default="")
    a = ap.parse_args(argv)
    rows = micro_rows(a.criterion, a.since)
    if not rows:
        print("no criterion results newer than the run start in " + a.criterion, file=sys.stderr)
        return 1
    L = ["Generated by `%s` on %s%s: criterion, release build, one run on the same shared "
         "2-core machine (expect ±10–20%% between runs, more for the fastest cases). Median time per "
         "iteration with the 95%% confidence interval of the median; per-message cost divides it by "
         "the messages in the case's name (`…/N_msgs`), per-op cost by the operations per "
         "iteration." % (a.command, time.strftime("%Y-%m-%d %H:%M %Z"),
                         (" at pgsluice " + a.commit) if a.commit else ""),
         ""]
    L += micro_table(rows)
    L += relay_overhead(rows)
    text = "\n".join(L) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(a.md)), exist_ok=True)
    with open(a.md, "w") as f:
        f.write(text)
    print(text)
    return 0


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, rest = sys.argv[1], sys.argv[2:]
    fn = {"freeport": cmd_freeport, "authprobe": cmd_authprobe, "ticks": cmd_ticks, "ticks-split": cmd_ticks_split, "scram-secret": cmd_scram_secret,
          "record": cmd_record, "report": cmd_report, "chart": cmd_chart,
          "micro-report": cmd_micro_report}.get(cmd)
    if fn is None:
        print("unknown subcommand: " + cmd, file=sys.stderr)
        return 2
    return fn(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
