"""Fixtures that run the real Prometheus and Alertmanager binaries on loopback for the stack tests.

Each service gets a free 127.0.0.1 port and its own temporary directory, is waited on until
``/-/ready`` answers, and is terminated (then killed) when the session ends. Without the
Debian binaries (``scripts/install-system-deps.sh`` installs them; CI does) the tests that need
them are skipped with that reason; nothing else is ever skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "stack"
INSTALL_HINT = "scripts/install-system-deps.sh installs it (Debian package {pkg})"


def binary(*names: str) -> str | None:
    for n in names:
        path = shutil.which(n)
        if path:
            return path
    return None


PROMETHEUS = binary("prometheus")
PROMTOOL = binary("promtool")
ALERTMANAGER = binary("prometheus-alertmanager", "alertmanager")
AMTOOL = binary("amtool")


def require(path: str | None, name: str, pkg: str) -> str:
    """The binary's path, or skip the test: the only reason a stack test may skip."""
    if path is None:
        pytest.skip(f"{name} not installed; " + INSTALL_HINT.format(pkg=pkg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_free_ports() -> int:
    """A base port whose successor is free too (rank k listens on base + k)."""
    for _ in range(50):
        base = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise RuntimeError("no two consecutive free ports")


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a child process, then kill it if it does not exit within 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll until ``predicate()`` is truthy and return it; fail the test with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - a service still starting answers with errors
            last_exc = exc
        time.sleep(interval)
    pytest.fail(
        f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else "")
    )


@dataclass
class Service:
    """A started binary: its process, base URL and log file."""

    name: str
    proc: subprocess.Popen
    url: str
    log: Path

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.proc)


def start_service(name: str, cmd: list[str], url: str, workdir: Path, timeout: float = 30.0) -> Service:
    """Start ``cmd``, wait until ``url/-/ready`` answers 200; on failure show the service's log."""
    log = workdir / f"{name}.log"
    out = open(log, "wb")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    out.close()
    svc = Service(name, proc, url, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} at start:\n{svc.log_tail()}")
        try:
            http_get(url + "/-/ready", timeout=1.0)
            return svc
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    svc.stop()
    raise RuntimeError(f"{name} not ready after {timeout:.0f} s:\n{svc.log_tail()}")


# --------------------------------------------------------------------------- Prometheus


class Prometheus(Service):
    """A running Prometheus with a small client for its HTTP API."""

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        body = json.loads(http_get(url))
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus API {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query; raises (with Prometheus' message) when the expression is invalid."""
        try:
            data = self.api("query", query=expr)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"query failed: {expr}\n{exc.read().decode(errors='replace')}") from None
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> list[dict]:
        """Range query, as a Grafana time-series panel runs it."""
        try:
            data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"query failed: {expr}\n{exc.read().decode(errors='replace')}") from None
        return data["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: expected one series, got {result}"
        return float(result[0]["value"][1])

    def alerts(self) -> list[dict]:
        """Every pending and firing alert (``/api/v1/alerts``)."""
        return self.api("alerts")["alerts"]

    def firing(self, **labels: str) -> list[dict]:
        return [
            a
            for a in self.alerts()
            if a["state"] == "firing" and all(a["labels"].get(k) == v for k, v in labels.items())
        ]

    def label_values(self, label: str, match: str) -> list[str]:
        return self.api(f"label/{label}/values", **{"match[]": match})


@pytest.fixture(scope="session")
def start_prometheus(tmp_path_factory):
    """``start_prometheus(config: dict, *flags) -> Prometheus`` on a free loopback port; all are stopped at the end."""
    binary_path = require(PROMETHEUS, "prometheus", "prometheus")
    started: list[Service] = []

    def start(config: dict, *flags: str) -> Prometheus:
        workdir = tmp_path_factory.mktemp("prometheus")
        cfg_path = workdir / "prometheus.yml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port()
        cmd = [
            binary_path,
            f"--config.file={cfg_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            *flags,
        ]
        svc = start_service("prometheus", cmd, f"http://127.0.0.1:{port}", workdir)
        prom = Prometheus(svc.name, svc.proc, svc.url, svc.log)
        started.append(prom)
        return prom

    yield start
    for svc in started:
        svc.stop()


@pytest.fixture(scope="session")
def start_alertmanager(tmp_path_factory):
    """``start_alertmanager(config: dict) -> Service`` on a free loopback port, clustering off."""
    binary_path = require(ALERTMANAGER, "prometheus-alertmanager", "prometheus-alertmanager")
    started: list[Service] = []

    def start(config: dict) -> Service:
        workdir = tmp_path_factory.mktemp("alertmanager")
        cfg_path = workdir / "alertmanager.yml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port()
        cmd = [
            binary_path,
            f"--config.file={cfg_path}",
            f"--storage.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # empty: no gossip, no extra port
            "--log.level=warn",
        ]
        svc = start_service("alertmanager", cmd, f"http://127.0.0.1:{port}", workdir)
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.stop()


# --------------------------------------------------------------------------- webhook


@dataclass
class Webhook:
    """An Alertmanager webhook receiver on loopback that keeps every payload it gets."""

    url: str
    payloads: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def alerts(self, status: str | None = None, **labels: str) -> list[dict]:
        """Every alert delivered so far whose labels include ``labels`` (and, if given, with that status)."""
        with self.lock:
            return [
                a
                for p in self.payloads
                for a in p.get("alerts", [])
                if all(a.get("labels", {}).get(k) == v for k, v in labels.items())
                and (status is None or a.get("status") == status)
            ]


@pytest.fixture(scope="session")
def webhook():
    hook = Webhook(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with hook.lock:
                hook.payloads.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hook.url = f"http://127.0.0.1:{server.server_port}/karn-alerts"
    thread = threading.Thread(target=server.serve_forever, name="alert-webhook", daemon=True)
    thread.start()
    yield hook
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------- configs for tests


SHIPPED_INTERVAL_S = 15.0  # stack/prometheus/prometheus.yml: scrape_interval, evaluation_interval
TEST_INTERVAL_S = 1.0
TIME_SCALE = TEST_INTERVAL_S / SHIPPED_INTERVAL_S
"""The tests run Prometheus at 1 s intervals instead of the shipped 15 s, and scale every duration
of the committed rules by the same factor (``for: 1m`` -> 4 s, ``[5m]`` -> 20 s): the rules behave
exactly as shipped, 15 times faster."""

_DURATION = re.compile(r"(\d+)(ms|s|m|h)")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def scale_duration(text: str, factor: float = TIME_SCALE) -> str:
    """``"5m"`` -> ``"20s"`` at factor 1/15: a Prometheus duration, scaled, in whole milliseconds."""
    m = _DURATION.fullmatch(text)
    if not m:
        raise ValueError(f"not a simple Prometheus duration: {text!r}")
    ms = round(int(m.group(1)) * _SECONDS[m.group(2)] * factor * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _scale_expr(expr: str, factor: float) -> str:
    """Every range ``[d]`` and ``offset d`` of a PromQL expression, scaled."""
    expr = re.sub(r"\[(\d+(?:ms|s|m|h))\]", lambda m: f"[{scale_duration(m.group(1), factor)}]", expr)
    return re.sub(r"offset (\d+(?:ms|s|m|h))", lambda m: f"offset {scale_duration(m.group(1), factor)}", expr)


def rules_for_tests(src: Path, dest: Path, factor: float = TIME_SCALE) -> Path:
    """A copy of the real rules file with every duration (``for:``, ranges, offsets) scaled by ``factor``.

    Checked: nothing else differs (scaling back the copy's durations gives the original rules).
    """
    original = yaml.safe_load(src.read_text())
    copy = yaml.safe_load(src.read_text())
    for group in copy["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = scale_duration(rule["for"], factor)
            rule["expr"] = _scale_expr(rule["expr"], factor)

    def durations_as_ms(doc: dict, factor: float) -> dict:
        def ms(text: str) -> str:
            return _DURATION.sub(lambda m: f"<{round(int(m.group(1)) * _SECONDS[m.group(2)] * factor * 1000)}ms>", text)

        return {
            **doc,
            "groups": [
                {**g, "rules": [{**r, "for": ms(r.get("for", "0s")), "expr": ms(r["expr"])} for r in g["rules"]]}
                for g in doc["groups"]
            ],
        }

    assert durations_as_ms(copy, 1) == durations_as_ms(original, factor), "only the durations may differ"
    dest.write_text(yaml.safe_dump(copy, sort_keys=False))
    return dest


def prometheus_config_for_tests(rules: Path, karn_targets: list[str], alertmanager: str) -> dict:
    """stack/prometheus/prometheus.yml, pointed at loopback: 1 s intervals, the given Karn targets, this Alertmanager."""
    cfg = yaml.safe_load((STACK / "prometheus" / "prometheus.yml").read_text())
    cfg["global"] = {
        **cfg.get("global", {}),
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "1s",
    }
    # As shipped (rules/*.yml): the alert rules given (durations scaled) and the recording rules.
    cfg["rule_files"] = [str(rules), str(STACK / "prometheus" / "rules" / "karn-recording.yml")]
    cfg["alerting"]["alertmanagers"] = [{"static_configs": [{"targets": [alertmanager]}]}]
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    karn = jobs["karn"]
    karn["static_configs"] = [{"targets": karn_targets}]
    cfg["scrape_configs"] = [karn]  # no collector here: Karn's embedded endpoints are the real thing
    return cfg


def alertmanager_config_for_tests(webhook_url: str) -> dict:
    """stack/alertmanager/alertmanager.yml with the webhook on loopback and second-scale grouping."""
    cfg = yaml.safe_load((STACK / "alertmanager" / "alertmanager.yml").read_text())

    def fast(route: dict) -> None:
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = "1s"
        if "repeat_interval" in route:
            route["repeat_interval"] = "1m"
        for child in route.get("routes", []):
            fast(child)

    cfg["route"].update(group_wait="1s", group_interval="1s", repeat_interval="1m")
    fast(cfg["route"])
    for receiver in cfg["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook_url
    return cfg
