#!/usr/bin/env python3
"""Checks of docker/ that the linters cannot make (run by scripts/check-deploy).

- docker/compose.yaml: services named in depends_on exist and, when waited on
  as healthy, have a healthcheck; bind-mounted files, the build context and
  the Dockerfile exist; named volumes are declared.
- Timing: every place that stops pgsluice waits longer than its drain
  (general.shutdown_timeout, plus the preStop sleep on Kubernetes).
- docker/grafana/pgsluice-dashboard.json: panels have unique ids, do not
  overlap, use the ${datasource} variable; every PromQL expression (panel
  targets and template variables, with the variables substituted) parses:
  they are written to a rules file for `promtool check rules`.

The metric names themselves are checked against a live /metrics scrape by
tests/deploy_artifacts.rs (cargo test).

Usage: check_deploy.py PROMTOOL
"""

import json
import pathlib
import re
import subprocess
import sys
import tempfile
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
failures = []


def fail(msg):
    failures.append(msg)


def seconds(text):
    """'30s', '1m', '500ms', '1h' (pgsluice and compose durations) -> seconds."""
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(text)):
        total += float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    if total == 0 and str(text) not in ("0", "0s"):
        raise ValueError(f"not a duration: {text!r}")
    return total


def shutdown_timeout(toml_text):
    general = tomllib.loads(toml_text).get("general", {})
    return seconds(general.get("shutdown_timeout", "30s"))


def configmap_toml(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "ConfigMap":
            return doc["data"]["pgsluice.toml"]
    raise SystemExit(f"{path}: no ConfigMap with pgsluice.toml")


def check_compose():
    path = DOCKER / "compose.yaml"
    compose = yaml.safe_load(path.read_text())
    services = compose["services"]
    volumes = set((compose.get("volumes") or {}).keys())
    for name, svc in services.items():
        for dep, how in (svc.get("depends_on") or {}).items():
            if dep not in services:
                fail(f"compose: {name} depends on unknown service {dep}")
            elif how.get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
                fail(f"compose: {name} waits for {dep} to be healthy, but {dep} has no healthcheck")
        for mount in svc.get("volumes") or []:
            source = mount.split(":")[0]
            if source.startswith("."):
                if not (DOCKER / source).exists():
                    fail(f"compose: {name} mounts {source}, which does not exist")
            elif source not in volumes:
                fail(f"compose: {name} uses volume {source}, not declared under volumes:")
        build = svc.get("build")
        if build:
            context = DOCKER / build["context"]
            if not (context / build["dockerfile"]).is_file():
                fail(f"compose: {name} builds {build['dockerfile']} in {context}: not found")
    pgsluice = services["pgsluice"]
    drain = shutdown_timeout((DOCKER / "compose/pgsluice.toml").read_text())
    grace = seconds(pgsluice.get("stop_grace_period", "10s"))
    if grace <= drain:
        fail(f"compose: pgsluice stop_grace_period {grace}s <= shutdown_timeout {drain}s: "
             "docker stop would SIGKILL a drain")


def pod_spec(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "Deployment":
            return doc["spec"]["template"]["spec"]
    raise SystemExit(f"{path}: no Deployment")


def check_kubernetes():
    for shape in ("tier", "sidecar"):
        spec = pod_spec(DOCKER / f"k8s/{shape}/deployment.yaml")
        drain = shutdown_timeout(configmap_toml(DOCKER / f"k8s/{shape}/configmap.yaml"))
        containers = spec.get("containers", []) + spec.get("initContainers", [])
        pgsluice = [c for c in containers if c["name"] == "pgsluice"]
        if len(pgsluice) != 1:
            fail(f"k8s/{shape}: expected one container named pgsluice")
            continue
        pre_stop = (pgsluice[0].get("lifecycle", {}).get("preStop", {})
                    .get("sleep", {}).get("seconds", 0))
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if grace <= pre_stop + drain:
            fail(f"k8s/{shape}: terminationGracePeriodSeconds {grace} <= preStop {pre_stop}s "
                 f"+ shutdown_timeout {drain}s: the kubelet would SIGKILL a drain")
        probes = {k: pgsluice[0].get(k, {}).get("httpGet", {}).get("path")
                  for k in ("livenessProbe", "readinessProbe")}
        if probes != {"livenessProbe": "/health", "readinessProbe": "/ready"}:
            fail(f"k8s/{shape}: probes should be liveness /health, readiness /ready: {probes}")
        if shape == "tier" and pre_stop <= 0:
            fail("k8s/tier: pgsluice needs a preStop sleep so endpoints update before SIGTERM")
        if shape == "sidecar" and pgsluice[0].get("restartPolicy") != "Always":
            fail("k8s/sidecar: pgsluice should be a native sidecar (restartPolicy: Always)")


def check_systemd():
    unit = (DOCKER / "pgsluice.service").read_text()
    stop = re.search(r"^TimeoutStopSec=(\S+)", unit, re.M)
    # systemd reads a bare number as seconds.
    value = stop.group(1) if stop else "0"
    if seconds(value + "s" if value.isdigit() else value) <= 30:
        fail("pgsluice.service: TimeoutStopSec must exceed the default shutdown_timeout (30s)")


VARIABLES = {
    "$__rate_interval": "5m",
    "$__range": "1h",
    "$__interval": "1m",
    "${datasource}": "",
    "$job": ".*",
    "$instance": ".*",
    "$database": ".*",
}


def substitute(expr):
    for var, value in VARIABLES.items():
        expr = expr.replace(var, value)
    if "$" in expr:
        fail(f"dashboard: unknown variable in {expr!r}")
    return expr


def check_dashboard(promtool):
    path = DOCKER / "grafana/pgsluice-dashboard.json"
    dash = json.loads(path.read_text())
    exprs = []
    ids = set()
    cells = {}
    for panel in dash["panels"]:
        pid = panel.get("id")
        if pid in ids:
            fail(f"dashboard: panel id {pid} used twice")
        ids.add(pid)
        pos = panel["gridPos"]
        if pos["x"] + pos["w"] > 24:
            fail(f"dashboard: panel {panel['title']!r} is wider than the grid")
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                if (x, y) in cells:
                    fail(f"dashboard: {panel['title']!r} overlaps {cells[(x, y)]!r}")
                    break
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            fail(f"dashboard: panel {panel['title']!r} does not use the $datasource variable")
        refs = [t["refId"] for t in panel.get("targets", [])]
        if not refs or len(set(refs)) != len(refs):
            fail(f"dashboard: panel {panel['title']!r} has no targets or repeated refIds")
        for t in panel.get("targets", []):
            exprs.append((panel["title"], t["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["definition"])
        if not m:
            fail(f"dashboard: variable {var['name']} is not label_values(selector, label)")
            continue
        exprs.append((f"variable {var['name']}", m.group(1)))
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": substitute(e)} for i, (_, e) in enumerate(exprs)
    ]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump(rules, f)
    out = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
    pathlib.Path(f.name).unlink()
    if out.returncode != 0:
        detail = out.stdout + out.stderr
        for i, (where, e) in enumerate(exprs):
            if f"expr_{i}\"" in detail or f"expr_{i}:" in detail or f"expr_{i} " in detail:
                detail += f"\n  expr_{i} is {where}: {e}"
        fail(f"dashboard: promtool rejects a PromQL expression:\n{detail}")
        return
    print(f"check_deploy: dashboard: {len(dash['panels'])} panels, {len(exprs)} PromQL expressions parse")


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    check_compose()
    check_kubernetes()
    check_systemd()
    check_dashboard(sys.argv[1])
    for f in failures:
        print(f"check_deploy: {f}", file=sys.stderr)
    if failures:
        raise SystemExit(1)
    print("check_deploy: compose, kubernetes timing and probes, systemd unit, dashboard: ok")


if __name__ == "__main__":
    main()
