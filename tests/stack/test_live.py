"""The stack for real: Karn processes scraped by a real Prometheus that evaluates the real alert
rules and sends to a real Alertmanager, which delivers to a webhook on loopback.

Two Karn processes run side by side, each with its embedded /metrics endpoint (the `karn` scrape
job of stack/prometheus/prometheus.yml, pointed at their loopback ports):

* the *driver* (tests/stack/karn_driver.py): the reference system with the heuristic controller,
  a short lifecycle so seeds germinate and get attributed, and the labels shuffled in its last
  epoch (a real loss spike and accuracy drop that the run ends with); then, on command, faults
  (a failing sink, a rejected event) and a rank that dies mid-episode;
* ``karn run --controller ppo --inject-entropy-collapse --prometheus-port P --serve-after ...``:
  the user's command, with a real PPO controller whose policy has collapsed.

The rules file is the committed one with every ``for:`` shortened to 1 s (checked: nothing else
differs); Alertmanager's config is the committed one with second-scale grouping and the webhook
URL on loopback.

The tests share one set of processes (module scope) and run in file order: the last one kills
the driver.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from karn_otel.contracts import TelemetryEventType as ET
from karn_otel.sinks.runlog import read_run
from karn_otel.stack_rules import alert_name
from tests.stack.conftest import (
    REPO,
    STACK,
    Prometheus,
    alertmanager_config_for_tests,
    free_port,
    prometheus_config_for_tests,
    rules_for_tests,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.stack

DRIVER = Path(__file__).with_name("karn_driver.py")
DASHBOARDS = REPO / "dashboards"
RULES = STACK / "prometheus" / "rules" / "karn-alerts.yml"
DRIVER_EPOCHS = 12  # ends with an isolated seed (leakage measured) and attributed ones
PPO_EPOCHS = 4
PROCESS_TIMEOUT_S = 240  # both Karn processes exit by themselves after this, whatever happens here

# Panels whose query legitimately returns nothing while the run is healthy and complete, and why.
# Everything else must return data for one of the two runs.
EXPECTED_EMPTY = {
    (
        "karn-ranks",
        "Missing ranks",
    ): "only while a rank is gone; test_rank_killed_mid_episode checks it returns data then",
}

# Grafana's built-in variables, as Grafana would substitute them for a 1 h dashboard.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}


class KarnProcess:
    """A Karn subprocess whose stdout lines are collected on a thread."""

    def __init__(self, name: str, cmd: list[str], log: Path) -> None:
        self.name = name
        self.lines: queue.Queue[str] = queue.Queue()
        self.all_lines: list[str] = []
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OTEL_EXPORTER_OTLP_ENDPOINT")
        }
        env["PYTHONUNBUFFERED"] = "1"
        self.stderr = open(log, "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )
        threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True).start()
        self.log = log

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.all_lines.append(line.rstrip("\n"))
            self.lines.put(line.rstrip("\n"))

    def expect(self, pattern: str, timeout: float) -> re.Match:
        """The next stdout line matching ``pattern``; fails with the process' output on timeout or exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            m = re.search(pattern, line)
            if m:
                return m
        pytest.fail(
            f"{self.name}: no line matching {pattern!r} (exit code {self.proc.poll()})\nstdout:\n"
            + "\n".join(self.all_lines[-20:])
            + "\nstderr:\n"
            + self.log.read_text(errors="replace")[-3000:]
        )

    def send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        self.expect(rf'"event": "done", "cmd": "{cmd}"', timeout=30)

    def stop(self) -> None:
        stop_process(self.proc)
        self.stderr.close()


class LiveStack:
    """The running processes, and the steps the tests take them through (each at most once)."""

    def __init__(self, tmp: Path, start_prometheus, start_alertmanager, webhook) -> None:
        self.tmp = tmp
        self.t0 = time.time()
        self.webhook = webhook
        self.driver_run_id = f"stack-driver-{os.getpid()}"
        driver_port, ppo_port = free_port(), free_port()
        self.report_path = tmp / "driver-health.json"
        # Alertmanager and Prometheus first (their fixtures stop them), then the Karn processes.
        self.am = start_alertmanager(alertmanager_config_for_tests(webhook.url))
        rules = rules_for_tests(RULES, tmp / "karn-alerts.yml")
        self.prom: Prometheus = start_prometheus(
            prometheus_config_for_tests(
                rules, [f"127.0.0.1:{driver_port}", f"127.0.0.1:{ppo_port}"], self.am.url.split("//")[1]
            )
        )
        self.processes: list[KarnProcess] = []
        try:
            self.driver = self._spawn(
                "driver",
                [
                    sys.executable,
                    str(DRIVER),
                    "--out",
                    str(tmp / "runs"),
                    "--run-id",
                    self.driver_run_id,
                    "--port",
                    str(driver_port),
                    "--epochs",
                    str(DRIVER_EPOCHS),
                    "--report",
                    str(self.report_path),
                    "--timeout",
                    str(PROCESS_TIMEOUT_S),
                    "--inject-loss-spike-epoch",
                    str(DRIVER_EPOCHS),
                ],
            )
            self.ppo = self._spawn(
                "karn run (ppo)",
                [
                    sys.executable,
                    "-m",
                    "karn_otel.cli",
                    "run",
                    "--controller",
                    "ppo",
                    "--inject-entropy-collapse",
                    "--epochs",
                    str(PPO_EPOCHS),
                    "--no-live",
                    "--out",
                    str(tmp / "ppo-runs"),
                    "--prometheus-port",
                    str(ppo_port),
                    "--serve-after",
                    str(PROCESS_TIMEOUT_S),
                ],
            )
            self.ppo.expect(r"metrics: http://127\.0\.0\.1:(\d+)/metrics", timeout=60)
            self.driver.expect(r'"event": "port"', timeout=60)
        except BaseException:
            self.close()
            raise
        self.faults_injected = False
        self.killed = False
        self._ready = False

    def _spawn(self, name: str, cmd: list[str]) -> KarnProcess:
        proc = KarnProcess(name, cmd, self.tmp / f"{name.split()[0]}.stderr")
        self.processes.append(proc)
        return proc

    def ready(self) -> None:
        """Both runs trained, and Prometheus holds their final values."""
        if self._ready:
            return
        self.driver.expect(r'"event": "ready"', timeout=120)
        self.ppo.expect(r"training done; serving metrics", timeout=120)
        runs = sorted(p for p in (self.tmp / "ppo-runs").iterdir() if p.is_dir())
        assert len(runs) == 1, runs
        self.ppo_run_dir = runs[0]
        self.ppo_run_id = self.ppo_run_dir.name
        self.driver_run_dir = self.tmp / "runs" / self.driver_run_id
        self.report = json.loads(self.report_path.read_text())
        for run_id, epochs in ((self.driver_run_id, DRIVER_EPOCHS), (self.ppo_run_id, PPO_EPOCHS)):
            wait_until(
                lambda: self.prom.query(f'karn_episode_epochs_completed{{run_id="{run_id}"}} == {epochs}'),
                30,
                f"Prometheus to scrape the end of run {run_id}",
            )
        # A few rule evaluations (every 1 s) over the final values.
        time.sleep(3)
        self._ready = True

    def inject_faults(self) -> None:
        self.ready()
        if not self.faults_injected:
            assert not self.killed
            self.driver.send("faults")
            self.faults_injected = True
            wait_until(
                lambda: self.prom.query(f'karn_telemetry_events_dropped_total{{run_id="{self.driver_run_id}"}}'),
                20,
                "the dropped-events counter in Prometheus",
            )

    def kill_driver_mid_episode(self) -> None:
        self.ready()
        if self.killed:
            return
        self.driver.send("midepisode")
        wait_until(
            lambda: self.prom.query(f'karn_host_epoch{{run_id="{self.driver_run_id}"}} == 1'),
            20,
            "Prometheus to see the driver's new episode",
        )
        self.driver.proc.kill()  # SIGKILL: no goodbye, as in a crash or an OOM kill
        self.driver.proc.wait(timeout=10)
        self.ppo.stop()  # the PPO run finished its episode: a clean exit, never "missing"
        self.killed = True

    def close(self) -> None:
        for p in self.processes:
            p.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory, start_prometheus, start_alertmanager, webhook):
    stack = LiveStack(tmp_path_factory.mktemp("live"), start_prometheus, start_alertmanager, webhook)
    try:
        yield stack
    finally:
        stack.close()


def karn_alerts(prom: Prometheus, run_id: str, state: str | None = None) -> list[dict]:
    return [a for a in prom.alerts() if a["labels"].get("run_id") == run_id and (state is None or a["state"] == state)]


# --------------------------------------------------------------------------- alerts


def test_health_alerts_agree_with_the_runs_health_monitor(live):
    """Prometheus fires exactly the health alerts whose checks the run's own HealthMonitor fails.

    The driver's run ends with its labels shuffled for one epoch: a real loss spike and accuracy
    drop, judged by the monitor over its epoch history, exported as karn_health_status and
    turned into KarnLossSpike / KarnAccuracyDrop by the rules. Nothing else may fire.
    """
    live.ready()
    expected = live.report["failing"]
    assert "loss_spike" in expected, expected

    def firing_checks() -> list[str]:
        return sorted(
            {
                a["labels"]["check"]
                for a in karn_alerts(live.prom, live.driver_run_id, "firing")
                if "check" in a["labels"]
            }
        )

    wait_until(lambda: firing_checks() == expected, 20, f"Prometheus to fire {expected}")
    time.sleep(2)  # and nothing more, over a couple of evaluations
    assert firing_checks() == expected
    if not live.faults_injected:  # no other Karn alert either (pending or firing)
        assert {a["labels"]["alertname"] for a in karn_alerts(live.prom, live.driver_run_id)} == {
            alert_name(c) for c in expected
        }
    spike = wait_until(
        lambda: live.webhook.alerts(alertname="KarnLossSpike", run_id=live.driver_run_id),
        20,
        "KarnLossSpike at the webhook",
    )[0]
    assert spike["labels"]["check"] == "loss_spike" and spike["labels"]["severity"] == "warning"
    assert "Latest value: " in spike["annotations"]["description"]


def test_entropy_collapse_is_delivered_by_alertmanager(live):
    """`karn run --controller ppo --inject-entropy-collapse`: KarnEntropyCollapse reaches the webhook."""
    live.ready()
    delivered = wait_until(
        lambda: live.webhook.alerts(alertname="KarnEntropyCollapse", run_id=live.ppo_run_id),
        30,
        "KarnEntropyCollapse at the webhook",
    )
    alert = delivered[0]
    assert alert["status"] == "firing"
    assert alert["labels"]["rank"] == "0"
    assert alert["labels"]["severity"] == "warning"
    assert alert["labels"]["check"] == "entropy_collapse"
    assert live.ppo_run_id in alert["annotations"]["summary"] and "rank 0" in alert["annotations"]["summary"]
    assert "Latest value: " in alert["annotations"]["description"]
    payload = next(p for p in live.webhook.payloads if alert in p["alerts"])
    assert payload["groupLabels"] == {"alertname": "KarnEntropyCollapse", "run_id": live.ppo_run_id}

    # Every health alert Prometheus fires for the run is a check its HealthMonitor raised.
    events = read_run(live.ppo_run_dir).events
    raised = {e.payload.check for e in events if e.event_type is ET.HEALTH_ALERT and e.payload.severity.value != "ok"}
    firing = {a["labels"]["check"] for a in karn_alerts(live.prom, live.ppo_run_id, "firing") if "check" in a["labels"]}
    assert "entropy_collapse" in firing
    assert firing <= raised, f"Prometheus fires {firing - raised} that the run's HealthMonitor never raised"


def test_telemetry_dropping_fires_when_a_sink_fails(live):
    live.inject_faults()
    wait_until(
        lambda: live.prom.firing(alertname="KarnTelemetryDropping", run_id=live.driver_run_id),
        20,
        "KarnTelemetryDropping firing in Prometheus",
    )
    delivered = wait_until(
        lambda: live.webhook.alerts(alertname="KarnTelemetryDropping", run_id=live.driver_run_id),
        20,
        "KarnTelemetryDropping at the webhook",
    )
    assert delivered[0]["labels"]["rank"] == "0"
    assert (
        live.prom.value(
            f'karn_telemetry_events_dropped_total{{run_id="{live.driver_run_id}", component="FailingSink"}}'
        )
        >= 1
    )
    assert (
        live.prom.value(f'karn_telemetry_events_rejected_total{{run_id="{live.driver_run_id}", reason="unknown_slot"}}')
        == 1
    )


# --------------------------------------------------------------------------- dashboards


def dashboard_queries() -> list[tuple[str, str, str, bool]]:
    """(dashboard uid, panel title, PromQL, instant?) for every Prometheus target of every panel."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                ds = target.get("datasource") or panel.get("datasource") or {}
                if ds.get("type") == "prometheus" and target.get("expr"):
                    out.append((board["uid"], panel["title"], target["expr"], bool(target.get("instant"))))
    return out


def substitute(expr: str, **variables: str) -> str:
    values = {**BUILTINS, **variables}

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise AssertionError(f"unknown dashboard variable ${name} in {expr}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def test_every_dashboard_query_returns_data(live):
    """Each panel's PromQL, variables substituted, returns series for the driver's or the PPO run."""
    live.inject_faults()  # so that Karn's drop/reject counters and an alert exist too
    wait_until(lambda: live.prom.query('ALERTS{alertstate="firing"}'), 20, "a firing alert (the ALERTS panels)")
    queries = dashboard_queries()
    assert len(queries) > 60
    empty = []
    end = time.time()
    for uid, title, expr, instant in queries:

        def has_data(run_id: str) -> bool:
            q = substitute(expr, run_id=run_id, rank="0")
            return bool(live.prom.query(q) if instant else live.prom.query_range(q, live.t0, end))

        if any(has_data(run_id) for run_id in (live.driver_run_id, live.ppo_run_id)):
            continue
        if (uid, title) not in EXPECTED_EMPTY:
            empty.append(f"{uid} / {title}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_dashboard_variables_list_the_runs_and_ranks(live):
    live.ready()
    for path in sorted(DASHBOARDS.glob("*.json")):
        variables = {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}
        for name in ("run_id", "rank"):
            query = variables[name]["query"]["query"]
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
            assert m and m.group(2) == name, query
            values = live.prom.label_values(name, substitute(m.group(1), run_id=live.driver_run_id))
            assert (live.driver_run_id if name == "run_id" else "0") in values, (path.name, name, values)


# --------------------------------------------------------------------------- parity with the run log


def test_prometheus_holds_the_run_logs_last_values(live):
    """Shadow validation, metric consistency: the last values Prometheus holds are the run log's."""
    live.ready()
    assert not live.killed, "runs before the driver is killed (file order)"
    events = read_run(live.driver_run_dir).events
    host = [e.payload for e in events if e.event_type is ET.HOST_SNAPSHOT][-1]
    slots = {e.payload.slot_id: e.payload for e in events if e.event_type is ET.SLOT_SNAPSHOT}
    cf = [e.payload for e in events if e.event_type is ET.COUNTERFACTUAL][-1]
    sel = f'run_id="{live.driver_run_id}", rank="0"'

    def v(expr: str) -> float:
        return live.prom.value(expr)

    assert v(f"karn_host_epoch{{{sel}}}") == host.epoch == DRIVER_EPOCHS
    assert v(f"karn_host_val_accuracy{{{sel}}}") == pytest.approx(host.val_accuracy, rel=1e-12)
    assert v(f"karn_host_val_loss{{{sel}}}") == pytest.approx(host.val_loss, rel=1e-12)
    assert v(f"karn_host_train_loss{{{sel}}}") == pytest.approx(host.train_loss, rel=1e-12)
    assert v(f"karn_host_total_params{{{sel}}}") == host.total_params
    assert v(f"karn_host_grad_norm{{{sel}}}") == pytest.approx(host.host_grad_norm, rel=1e-12)
    for sid, s in slots.items():
        assert v(f'karn_slot_alpha{{{sel}, slot="{sid}"}}') == pytest.approx(s.alpha, rel=1e-12), sid
        assert v(f'karn_slot_stage{{{sel}, slot="{sid}", stage="{s.stage.value}"}}') == 1, sid
    assert cf.shapley_values, "the driver's run must end with attributed seeds"
    for sid, est in cf.shapley_values.items():
        assert v(f'karn_counterfactual_shapley_mean{{{sel}, slot="{sid}"}}') == pytest.approx(
            est.mean, rel=1e-12, abs=1e-15
        )
        assert v(f'karn_counterfactual_shapley_ci_low{{{sel}, slot="{sid}"}}') == pytest.approx(
            est.ci_low, rel=1e-12, abs=1e-15
        )

    # The PPO run: its last update's statistics.
    ppo = [e.payload for e in read_run(live.ppo_run_dir).events if e.event_type is ET.PPO_UPDATE][-1]
    psel = f'run_id="{live.ppo_run_id}", rank="0"'
    assert v(f"karn_ppo_update_index{{{psel}}}") == ppo.update_index
    assert v(f"karn_ppo_kl_divergence{{{psel}}}") == pytest.approx(ppo.kl_divergence, rel=1e-12, abs=1e-15)
    for head, h in ppo.entropy.items():
        if h == h:  # NaN entropies (no sample for the head) are not exported
            assert v(f'karn_ppo_entropy{{{psel}, head="{head}"}}') == pytest.approx(h, rel=1e-12, abs=1e-15), head


# --------------------------------------------------------------------------- a rank dies


def test_rank_killed_mid_episode_is_reported_missing(live):
    """SIGKILL the driver in its second episode: KarnRankMissing fires for it, and not for the run that ended cleanly."""
    live.kill_driver_mid_episode()
    alert = wait_until(
        lambda: live.prom.firing(alertname="KarnRankMissing", run_id=live.driver_run_id),
        30,
        "KarnRankMissing for the killed rank",
    )[0]
    assert alert["labels"]["rank"] == "0" and alert["labels"]["world_size"] == "1"
    assert wait_until(
        lambda: live.webhook.alerts(alertname="KarnRankMissing", run_id=live.driver_run_id),
        20,
        "KarnRankMissing at the webhook",
    )
    # The PPO run stopped too, after completing its episode: gone, but not missing.
    wait_until(
        lambda: not live.prom.query(f'karn_telemetry_events_accepted_total{{run_id="{live.ppo_run_id}"}}'),
        20,
        "the PPO run's series to go stale",
    )
    time.sleep(3)  # several evaluations
    assert not [
        a
        for a in live.prom.alerts()
        if a["labels"]["alertname"] == "KarnRankMissing" and a["labels"].get("run_id") == live.ppo_run_id
    ]
    # The ranks dashboard's "Missing ranks" panel now has data.
    [expr] = [e for uid, title, e, _ in dashboard_queries() if (uid, title) == ("karn-ranks", "Missing ranks")]
    missing = live.prom.query(substitute(expr, run_id=live.driver_run_id, rank="0"))
    assert [m["metric"]["rank"] for m in missing] == ["0"]
