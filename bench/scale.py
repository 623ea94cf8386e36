#!/usr/bin/env python3
"""Helpers for bench/scale.sh (python3 standard library only).

Subcommands:
  event FILE EVENT                   print the last JSON line of FILE whose "event" is EVENT
  field FILE EVENT KEY               print one field of that line (empty if missing)
  record --csv F --stage S --run R [--jsonl FILE] [--ticks] [KEY=VALUE ...]
                                     append rows (stage,run,key,value) to the CSV: the fields of
                                     FILE's ready/done/summary events, per-second ticks with
                                     --ticks, and the KEY=VALUE pairs
  waitmax BEFORE AFTER               highest pgsluice_client_wait_seconds bucket bound whose
                                     count grew between two /metrics scrapes (seconds)
  judge --csv F                      compute each stage's verdict rows (appended to the CSV)
  report --csv F --meta F --md F     write the markdown fragment
  splice --doc F --section F         put the section into F between scale markers (or append)
"""

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys

FIELDS = ["stage", "run", "key", "value"]
BEGIN = "<!-- bench/scale.sh: begin -->"
END = "<!-- bench/scale.sh: end -->"


def events(path, name):
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if obj.get("event") == name:
                    out.append(obj)
    except OSError:
        pass
    return out


def cmd_event(a):
    ev = events(a[0], a[1])
    if not ev:
        return 1
    print(json.dumps(ev[-1]))
    return 0


def cmd_field(a):
    ev = events(a[0], a[1])
    v = ev[-1].get(a[2]) if ev else None
    print("" if v is None else v)
    return 0


def flat(prefix, obj):
    for k, v in obj.items():
        if k in ("event", "tps_timeline", "error_samples"):
            continue
        if isinstance(v, dict):
            for k2, v2 in v.items():
                yield "%s%s.%s" % (prefix, k, k2), v2
        else:
            yield prefix + k, "" if v is None else v


def cmd_record(argv):
    p = argparse.ArgumentParser(prog="scale.py record")
    p.add_argument("--csv", required=True)
    p.add_argument("--stage", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--jsonl")
    p.add_argument("--ticks", action="store_true")
    p.add_argument("--prefix", default="", help="prefix for the keys read from --jsonl (ticks: tick.T.PREFIXkey)")
    p.add_argument("kv", nargs="*")
    a = p.parse_args(argv)
    rows = []
    if a.jsonl:
        for name in ("ready", "done", "summary"):
            ev = events(a.jsonl, name)
            if ev:
                rows += [(a.prefix + name + "." + k, v) for k, v in flat("", ev[-1])]
                for i, s in enumerate(ev[-1].get("error_samples") or []):
                    rows.append(("%s%s.error_sample.%d" % (a.prefix, name, i), s))
        if a.ticks:
            for t in events(a.jsonl, "tick"):
                for k in ("target", "connected", "tps", "p50_ms", "p99_ms", "max_ms", "logins", "login_max_ms", "errors"):
                    rows.append(("tick.%d.%s%s" % (t["t"], a.prefix.replace(".", "_"), k), "" if t.get(k) is None else t[k]))
    for kv in a.kv:
        k, _, v = kv.partition("=")
        rows.append((k, v))
    new = not os.path.exists(a.csv) or os.path.getsize(a.csv) == 0
    with open(a.csv, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(FIELDS)
        for k, v in rows:
            w.writerow([a.stage, a.run, k, v])
    return 0


def metric_buckets(path):
    out = {}
    rx = re.compile(r'^pgsluice_client_wait_seconds_bucket\{(.*)\}\s+([0-9.eE+]+)')
    with open(path) as f:
        for line in f:
            m = rx.match(line)
            if not m:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            le = labels.get("le", "")
            key = (tuple(sorted((k, v) for k, v in labels.items() if k != "le")), le)
            out[key] = out.get(key, 0) + float(m.group(2))
    return out


def cmd_waitmax(a):
    before, after = metric_buckets(a[0]), metric_buckets(a[1])
    if not after:
        print("")
        return 0
    # Per label set: the smallest bound whose cumulative count covers all new samples.
    worst = 0.0
    groups = {}
    for (lab, le), n in after.items():
        groups.setdefault(lab, []).append((float("inf") if le == "+Inf" else float(le), n - before.get((lab, le), 0)))
    for lab, bs in groups.items():
        bs.sort()
        total = bs[-1][1]
        if total <= 0:
            continue
        for bound, n in bs:
            if n >= total:
                worst = max(worst, bound)
                break
    print("inf" if math.isinf(worst) else worst)
    return 0


# ---------------------------------------------------------------- reading the CSV

def load(path):
    data = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            data.setdefault(r["stage"], {}).setdefault(r["run"], {})[r["key"]] = r["value"]
    return data


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def fmt(v, nd=0, suffix=""):
    x = num(v)
    if x is None:
        return "—" if v in (None, "") else str(v)
    if nd == 0:
        return "{:,}".format(int(round(x))) + suffix
    return ("{:,.%df}" % nd).format(x) + suffix


def ticks(run):
    out = {}
    for k, v in run.items():
        m = re.match(r"tick\.(\d+)\.(\w+)$", k)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = v
    return dict(sorted(out.items()))


def errs(run, prefixes=("summary", "done", "ready")):
    for p in prefixes:
        if p + ".errors" in run:
            return run[p + ".errors"]
    return None


def err_codes(run):
    codes = {}
    for k, v in run.items():
        m = re.match(r"(?:burst\.)?(summary|done|ready)\.errors_by_code\.(.+)$", k)
        if m:
            codes[m.group(2)] = max(codes.get(m.group(2), 0), int(float(v)))
    return ", ".join("%s ×%d" % kv for kv in sorted(codes.items())) or "none"


def cmd_judge(argv):
    p = argparse.ArgumentParser(prog="scale.py judge")
    p.add_argument("--csv", required=True)
    a = p.parse_args(argv)
    d = load(a.csv)
    rows = []
    if "clients50k" in d:
        s = d["clients50k"]
        base = [num(s[r].get("summary.tps")) for r in ("baseline-before", "baseline-after") if r in s]
        base = [b for b in base if b]
        held = num(s.get("with-idle", {}).get("summary.tps"))
        if base and held:
            ratio = held / statistics.mean(base)
            errors = sum(num(errs(s[r])) or 0 for r in s if r != "verdict")
            verified = num(s.get("idle", {}).get("verified"))
            want = num(s.get("idle", {}).get("idle_clients"))
            ok = ratio >= 0.9 and errors == 0 and verified == want
            rows += [("clients50k", "verdict", "tps_ratio", "%.3f" % ratio),
                     ("clients50k", "verdict", "errors", int(errors)),
                     ("clients50k", "verdict", "pass", "yes" if ok else "no")]
    if "spike" in d and "spike" in d["spike"]:
        r = d["spike"]["spike"]
        t = ticks(r)
        for v in t.values():
            v["total_tps"] = (num(v.get("tps")) or 0) + (num(v.get("burst_tps")) or 0)
        up, down = num(r.get("up_s")), num(r.get("down_s"))
        pre = [num(v.get("total_tps")) for k, v in t.items() if up and up - 7 < k <= up]
        pre = [x for x in pre if x is not None]
        ref = statistics.median(pre) if pre else None
        rec = None
        if ref and down:
            for k, v in t.items():
                if k > down and v["total_tps"] >= 0.9 * ref:
                    rec = k - down
                    break
        timeout = num(r.get("checkout_timeout_s")) or 30
        maxw = max(num(r.get("summary.max_ms")) or 0, num(r.get("burst.summary.max_ms")) or 0) / 1000
        nerr = (num(errs(r)) or 0) + (num(r.get("burst.summary.errors")) or 0)
        ok = (nerr == 0 and maxw < timeout and rec is not None and rec <= 5)
        rows += [("spike", "verdict", "pre_spike_tps_median", "" if ref is None else int(ref)),
                 ("spike", "verdict", "recovery_s", "" if rec is None else rec),
                 ("spike", "verdict", "max_wait_s", "%.3f" % maxw),
                 ("spike", "verdict", "errors", int(nerr)),
                 ("spike", "verdict", "pass", "yes" if ok else "no")]
    if "soak" in d and "soak" in d["soak"]:
        r = d["soak"]["soak"]
        samples = sorted((int(k), num(v)) for k, v in d["soak"].get("rss", {}).items())
        ref_t = num(r.get("reference_s")) or 120
        ref = next((v for t, v in samples if t >= ref_t), None)
        end = samples[-1][1] if samples else None
        if ref and end:
            growth = (end - ref) / ref
            ok = abs(growth) <= 0.05 and num(errs(r)) == 0
            rows += [("soak", "verdict", "rss_reference_kb", int(ref)),
                     ("soak", "verdict", "rss_end_kb", int(end)),
                     ("soak", "verdict", "rss_min_kb", int(min(v for _, v in samples))),
                     ("soak", "verdict", "rss_max_kb", int(max(v for _, v in samples))),
                     ("soak", "verdict", "rss_change_pct", "%.2f" % (100 * growth)),
                     ("soak", "verdict", "pass", "yes" if ok else "no")]
    with open(a.csv, "a", newline="") as f:
        w = csv.writer(f)
        for row in rows:
            w.writerow(row)
    return 0


# ---------------------------------------------------------------- report

def read_meta(path):
    meta = {}
    with open(path) as f:
        for line in f:
            k, _, v = line.rstrip("\n").partition("=")
            meta[k] = v
    return meta


def stage_meta(d, stage):
    m = d.get(stage, {}).get("meta", {})
    if not m:
        return ""
    return "Measured %s at commit %s (pgsluice %s): `%s`." % (m.get("date"), m.get("commit"), m.get("pgsluice_bin"), m.get("command"))


def verdict(v):
    return {"yes": "**pass**", "no": "**fail**"}.get(v.get("pass"), "—")


def summary(d):
    """One row per issue-7 target: what was asked, what was measured, and the verdict."""
    rows = []
    im = d.get("idle-memory", {})
    if "pgsluice" in im and "pgbouncer" in im:
        a, b = num(im["pgsluice"].get("kb_per_client")), num(im["pgbouncer"].get("kb_per_client"))
        ok = a is not None and b is not None and a <= b
        floor = im.get("tokio-floor", {}).get("kb_per_client")
        floor = "; a tokio task per client alone: %s kB" % fmt(num(floor), 2) if floor else ""
        rows.append(("RSS per idle client", "≤ pgbouncer's", "pgsluice %s kB, pgbouncer %s kB (%s clients each)%s" % (
            fmt(a, 2), fmt(b, 2), fmt(im["pgsluice"].get("clients")), floor), "**pass**" if ok else "**fail**"))
    iw = d.get("idle-worked", {})
    if "pgsluice" in iw and "pgbouncer" in iw:
        a, b = num(iw["pgsluice"].get("kb_per_client")), num(iw["pgbouncer"].get("kb_per_client"))
        ok = a is not None and b is not None and a <= b
        rows.append(("RSS per idle client that has run one query", "≤ pgbouncer's",
                     "pgsluice %s kB, pgbouncer %s kB (%s clients each)" % (fmt(a, 2), fmt(b, 2), fmt(iw["pgsluice"].get("clients"))),
                     "**pass**" if ok else "**fail**"))
    c = d.get("clients50k", {})
    if c.get("verdict"):
        idle = c.get("idle", {})
        reduced = bool(idle.get("reduced_reason"))
        rows.append(("%s concurrent clients, 1 pgsluice" % fmt(idle.get("requested_total")),
                     "tps of the active clients ≥ 0.90 × without idle ones; 0 errors",
                     "held %s (%s active): ratio %s, errors %s%s" % (
                         fmt(idle.get("total")), fmt(idle.get("active_clients")), c["verdict"].get("tps_ratio"),
                         c["verdict"].get("errors"), "; size reduced by the open-files limit" if reduced else ""),
                     ("not reached (%s at the reduced size)" % verdict(c["verdict"]).strip("*")) if reduced else verdict(c["verdict"])))
    sp = d.get("spike", {})
    if sp.get("verdict") and "spike" in sp:
        v, r = sp["verdict"], sp["spike"]
        rows.append(("spike %s → %s → %s clients" % (r.get("base_clients"),
                                                     fmt((num(r.get("base_clients")) or 0) + (num(r.get("burst_clients")) or 0)),
                                                     r.get("base_clients")),
                     "0 errors; waits < checkout_timeout; tps back within 5 s",
                     "errors %s, longest wait %s s, back after %s s" % (v.get("errors"), v.get("max_wait_s"), v.get("recovery_s") or "never"),
                     verdict(v)))
    so = d.get("soak", {})
    if so.get("verdict") and "soak" in so:
        v, r = so["verdict"], so["soak"]
        rows.append(("soak (%s min)" % r.get("minutes"), "RSS at end within ±5%% of RSS at %s s; 0 errors" % r.get("reference_s"),
                     "RSS %s%%, errors %s" % (v.get("rss_change_pct"), fmt(errs(r))),
                     verdict(v) + ("" if r.get("minutes") == "30" else " (the target is 30 min)")))
    if not rows:
        return []
    out = ["| target (issue 7) | asks | measured | result |", "|---|---|---|---|"]
    out += ["| %s | %s | %s | %s |" % row for row in rows]
    return out + [""]


def idle_section(d, stage, title, targets, text):
    """One idle-client memory stage: heading, provenance, what was measured, one row per target."""
    out = ["### " + title, "", stage_meta(d, stage), "", text, "",
           "| pooler | idle clients | server-side sockets seen | RSS before | RSS with clients | **per idle client** | per client 3 s after login | RSS after close | login ramp | errors |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for tgt in targets:
        r = d[stage].get(tgt)
        if not r:
            continue
        out.append("| %s | %s | %s | %s kB | %s kB | **%s kB** | %s kB | %s kB | %s s (%s logins/s) | %s |" % (
            tgt, fmt(r.get("clients")), fmt(r.get("established")), fmt(r.get("rss_before_kb")),
            fmt(r.get("rss_held_kb")), fmt(r.get("kb_per_client"), 2), fmt(r.get("kb_per_client_fresh"), 2),
            fmt(r.get("rss_after_close_kb")),
            fmt(r.get("ready.ramp_s"), 1), fmt(r.get("ready.logins_per_s")), err_codes(r)))
    return out + [""]


def cmd_report(argv):
    p = argparse.ArgumentParser(prog="scale.py report")
    p.add_argument("--csv", required=True)
    p.add_argument("--meta", required=True)
    p.add_argument("--md", required=True)
    a = p.parse_args(argv)
    d = load(a.csv)
    m = read_meta(a.meta)
    L = []
    L.append("## Scale: idle-client memory, many clients, spike, soak")
    L.append("")
    L.append("Written by `bench/scale.sh` on %s (%s, %s cores, %s, %s), commit %s, %s. One machine, "
             "shared with other work: read the ratios, not the absolute tps." %
             (m.get("date"), m.get("cpu"), m.get("nproc"), m.get("mem"), m.get("kernel"), m.get("commit"), m.get("pgsluice_bin")))
    L.append("")
    L.append("- Report written by: `%s`; each stage below names the run that measured it." % m.get("command"))
    L.append("- Versions: %s; %s; %s." % (m.get("pg_version"), m.get("pgbouncer_version"), m.get("loadgen")))
    L.append("- Limits seen: %s." % m.get("limits"))
    L.append("- Setup: %s." % m.get("setup"))
    for n in filter(None, m.get("notes", "").split(" ;; ")):
        L.append("- Note: %s" % n)
    L.append("")
    L += summary(d)

    if "idle-memory" in d:
        s = d["idle-memory"]
        L += idle_section(d, "idle-memory", "RSS per idle client", ("pgsluice", "pgbouncer", "tokio-floor"),
                 "RSS of the pooler process after a short warm-up, then with N logged-in idle clients "
                 "(SCRAM logins by `loadgen idle`, all verified with `SELECT 1` before they close): "
                 "3 s after the last login, and again " + fmt(s.get("pgsluice", {}).get("settle_s"))
                 + " s later (**per idle client**; pgsluice parks a client idle for "
                 "`park_idle_clients_after`, 5 s by default, within twice that: its task and socket "
                 "registration are freed, see docs/performance.md); then after they closed. Same loadgen, same N, same run for both poolers. `tokio-floor` is "
                 "not a pooler: `examples/idle_floor.rs` answers a trust login and keeps each socket in a task of "
                 "its own, as an idle pgsluice session does, and nothing else: what any server with a tokio task "
                 "per client needs at least (see docs/performance.md).")

    if "idle-worked" in d:
        L += idle_section(d, "idle-worked", "RSS per idle client that has run one query", ("pgsluice", "pgbouncer"),
                 "As above, but each client runs one simple-Query `SELECT 1` right after its login "
                 "(`loadgen idle --query-first simple`), then idles; measured on a second pgsluice and a second "
                 "pgbouncer started for this stage, so that memory the first stage's clients freed cannot hide "
                 "this one's. A pgsluice session that has run a request keeps its task (~2 kB) until it is "
                 "parked, `park_idle_clients_after` (5 s by default) to twice that after its query; once "
                 "parked, jemalloc gives the task's pages back within ~1 s (with glibc's malloc they stayed: "
                 "1.7–2.4 kB per client, docs/performance.md).")

    if "clients50k" in d:
        s = d["clients50k"]
        v = s.get("verdict", {})
        idle = s.get("idle", {})
        L.append("### Many concurrent clients on one pgsluice")
        L.append("")
        L.append(stage_meta(d, "clients50k"))
        L.append("")
        L.append("Active clients run `SELECT abalance FROM pgbench_accounts WHERE aid = $1`-style point selects "
                 "(simple protocol, like `pgbench -S`) for the same time without, with, and again without "
                 "the idle clients held open; ratio = with / mean(without).")
        L.append("")
        L.append("- Requested: %s concurrent clients; **held: %s** (%s idle + %s active) from %s source addresses; %s" % (
            fmt(idle.get("requested_total")), fmt(idle.get("total")), fmt(idle.get("idle_clients")),
            fmt(idle.get("active_clients")), idle.get("sources", "?"), idle.get("reduced_reason") or "not reduced."))
        L.append("- Idle clients: %s logged in in %s s (%s logins/s at concurrency %s), %s verified with `SELECT 1` at the end, "
                 "%s closed while idle; pgsluice RSS %s kB → %s kB with them (%s kB per client); established sockets on the pgsluice port during the active run: %s." % (
                     fmt(idle.get("opened")), fmt(idle.get("ramp_s"), 1), fmt(idle.get("logins_per_s")),
                     idle.get("concurrency", "?"), fmt(idle.get("verified")), fmt(idle.get("closed_while_idle")),
                     fmt(idle.get("rss_before_kb")), fmt(idle.get("rss_held_kb")), fmt(idle.get("kb_per_client"), 2),
                     fmt(idle.get("established"))))
        if "idle-memory" in d:
            L.append("- The idle-memory stage ran first in the same process and the allocator may have kept some of its "
                     "clients' freed memory, so this RSS delta can understate the cost per client: use the idle-memory table.")
        L.append("")
        L.append("| run | active clients | idle clients | tps | p50 ms | p99 ms | max ms | errors |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for run in ("baseline-before", "with-idle", "baseline-after"):
            r = s.get(run)
            if not r:
                continue
            L.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                run, fmt(r.get("active_clients")), fmt(r.get("idle_clients")), fmt(r.get("summary.tps")),
                fmt(r.get("summary.p50_ms"), 2), fmt(r.get("summary.p99_ms"), 2), fmt(r.get("summary.max_ms"), 1),
                err_codes(r)))
        L.append("")
        if v:
            L.append("**Result:** with/without = %s (target ≥ 0.90), errors %s: **%s**%s." % (
                v.get("tps_ratio"), v.get("errors"), "pass" if v.get("pass") == "yes" else "fail",
                " at the reduced size" if idle.get("reduced_reason") else ""))
            L.append("")

    if "spike" in d and "spike" in d["spike"]:
        r = d["spike"]["spike"]
        v = d["spike"].get("verdict", {})
        L.append("### Spike")
        L.append("")
        L.append(stage_meta(d, "spike"))
        L.append("")
        L.append("Two load generators: %s clients connected throughout (`loadgen active --clients %s`), and a burst "
                 "(`loadgen active --schedule %s`) whose %s clients all start logging in (SCRAM) at second %s and leave at "
                 "second %s; a separate process at `nice -n 10`, so its client-side PBKDF2 work neither stalls the steady clients' runtime nor takes the pooler's CPU first. "
                 "Wait = time from sending a query to its answer (includes pgsluice's checkout wait); pgsluice's own "
                 "`client_wait_seconds` histogram put the longest checkout wait at ≤ %s s. Pooler CPU = the demo "
                 "process's utime+stime per second (200%% = both cores); run-queue %% = how much of that second its main thread "
                 "(the runtime's only thread by default) was runnable but waiting for a core (`/proc/PID/schedstat`)." % (
                     r.get("base_clients"), r.get("base_clients"), r.get("burst_schedule"), r.get("burst_clients"),
                     r.get("up_s"), r.get("down_s"), r.get("metrics_wait_max_s") or "?"))
        L.append("")
        L.append("| clients | transactions | tps | logins | login p99 / max ms | query wait p99 ms | **max wait ms** | errors |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for lab, p in (("steady %s" % r.get("base_clients"), ""), ("burst %s" % r.get("burst_clients"), "burst.")):
            L.append("| %s | %s | %s | %s | %s / %s | %s | **%s** | %s |" % (
                lab, fmt(r.get(p + "summary.tx")), fmt(r.get(p + "summary.tps")), fmt(r.get(p + "summary.logins")),
                fmt(r.get(p + "summary.login_p99_ms"), 1), fmt(r.get(p + "summary.login_max_ms"), 1),
                fmt(r.get(p + "summary.p99_ms"), 1), fmt(r.get(p + "summary.max_ms"), 1),
                fmt(r.get(p + "summary.errors"))))
        L.append("")
        L.append("Listen queue overflows during the stage (system-wide TcpExt counters; pgsluice listens with a "
                 "backlog of 4096 since 9f5e98f (1024 before), net.core.somaxconn caps it): ListenOverflows +%s, SyncookiesSent +%s. Dropped SYNs "
                 "are retried by the client's kernel after 1 s, 3 s, …, which shows up as login time, not as errors." % (
                     r.get("listen_overflows", "?"), r.get("syncookies_sent", "?")))
        L.append("")
        if v:
            L.append("**Result:** errors %s; longest wait %s s (checkout_timeout %s s); pre-spike median tps %s, back to ≥ 90%% "
                     "of it %s s after the drop (target ≤ 5 s): **%s**." % (
                         v.get("errors"), v.get("max_wait_s"), r.get("checkout_timeout_s"), fmt(v.get("pre_spike_tps_median")),
                         v.get("recovery_s") or "never", "pass" if v.get("pass") == "yes" else "fail"))
            L.append("")
        L.append("| second | clients asked | logged in | tps steady | tps burst | p99 ms steady / burst | max ms steady / burst | logins | pooler CPU % | pooler run-queue % | errors (cumulative) |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t, x in ticks(r).items():
            L.append("| %d | %s | %s | %s | %s | %s / %s | %s / %s | %s | %s | %s | %s |" % (
                t, fmt((num(x.get("target")) or 0) + (num(x.get("burst_target")) or 0)),
                fmt((num(x.get("connected")) or 0) + (num(x.get("burst_connected")) or 0)),
                fmt(x.get("tps")), fmt(x.get("burst_tps")), fmt(x.get("p99_ms"), 1), fmt(x.get("burst_p99_ms"), 1),
                fmt(x.get("max_ms"), 1), fmt(x.get("burst_max_ms"), 1),
                fmt((num(x.get("logins")) or 0) + (num(x.get("burst_logins")) or 0)), fmt(x.get("pooler_cpu_pct")),
                fmt(x.get("pooler_runq_pct")),
                fmt((num(x.get("errors")) or 0) + (num(x.get("burst_errors")) or 0))))
        L.append("")

    if "soak" in d and "soak" in d["soak"]:
        r = d["soak"]["soak"]
        v = d["soak"].get("verdict", {})
        rss = sorted((int(k), num(x)) for k, x in d["soak"].get("rss", {}).items())
        L.append("### Soak")
        L.append("")
        L.append(stage_meta(d, "soak"))
        L.append("")
        L.append("%s min of %s clients, %s%% TPC-B-like write transactions and the rest point selects, every client "
                 "logging out and in again after ~%s transactions; pgsluice RSS sampled every %s s." % (
                     r.get("minutes"), r.get("clients"), r.get("write_pct"), r.get("reconnect_after"), r.get("sample_s")))
        L.append("")
        L.append("- Transactions %s (%s tps), logins %s, p99 %s ms, max %s ms, errors: %s." % (
            fmt(r.get("summary.tx")), fmt(r.get("summary.tps")), fmt(r.get("summary.logins")),
            fmt(r.get("summary.p99_ms"), 1), fmt(r.get("summary.max_ms"), 1), err_codes(r)))
        if v:
            L.append("- RSS at %s s (reference) %s kB, at the end %s kB: **%s%%** (target within ±5%%; min %s, max %s kB): **%s**." % (
                r.get("reference_s"), fmt(v.get("rss_reference_kb")), fmt(v.get("rss_end_kb")), v.get("rss_change_pct"),
                fmt(v.get("rss_min_kb")), fmt(v.get("rss_max_kb")), "pass" if v.get("pass") == "yes" else "fail"))
        if rss:
            step = max(1, len(rss) // 12)
            pick = rss[::step]
            if pick[-1] != rss[-1]:
                pick.append(rss[-1])
            L.append("- RSS over time (s: kB): " + ", ".join("%d: %s" % (t, fmt(x)) for t, x in pick) + ".")
        L.append("")

    text = "\n".join(L) + "\n"
    with open(a.md, "w") as f:
        f.write(text)
    sys.stdout.write(text)
    return 0


def cmd_splice(argv):
    p = argparse.ArgumentParser(prog="scale.py splice")
    p.add_argument("--doc", required=True)
    p.add_argument("--section", required=True)
    a = p.parse_args(argv)
    with open(a.section) as f:
        section = f.read().rstrip("\n")
    try:
        with open(a.doc) as f:
            doc = f.read()
    except FileNotFoundError:
        doc = ""
    block = "%s\n%s\n%s\n" % (BEGIN, section, END)
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        doc = head + block + tail.lstrip("\n")
    else:
        doc = doc.rstrip("\n") + "\n\n" + block
    with open(a.doc, "w") as f:
        f.write(doc)
    return 0


def main():
    if len(sys.argv) < 2:
        sys.stderr.write(__doc__)
        return 2
    cmd, rest = sys.argv[1], sys.argv[2:]
    table = {"event": cmd_event, "field": cmd_field, "record": cmd_record, "waitmax": cmd_waitmax,
             "judge": cmd_judge, "report": cmd_report, "splice": cmd_splice}
    if cmd not in table:
        sys.stderr.write(__doc__)
        return 2
    return table[cmd](rest) or 0


if __name__ == "__main__":
    sys.exit(main())
