"""The stack for real: Karn processes scraped by a real Prometheus that evaluates the real alert
rules and sends to a real Alertmanager, which delivers to a webhook on loopback.

Karn processes, each with its embedded /metrics endpoint (the `karn` scrape job of
stack/prometheus/prometheus.yml, pointed at their loopback ports):

* the *driver* (tests/stack/karn_driver.py): the reference system with the heuristic controller,
  a short lifecycle so seeds germinate and get attributed, and the labels shuffled for one epoch
  in the middle of the run (a real one-epoch loss spike that recovers); then, on command, faults
  (a failing sink, a rejected event) and a rank that dies mid-episode;
* ``karn run --controller ppo --episodes 2 --inject-entropy-collapse-episodes 1``: the user's
  command, with a real PPO controller whose policy collapses in episode 1 and recovers in episode 2;
* ``karn run --epochs 40``: a clean run that exits by itself (after the final scrape);
* ``karn run --nproc 2 --epochs 40``: a DDP job whose rank 1 is SIGKILLed mid-episode.

Intervals: Prometheus scrapes and evaluates every 1 s instead of the shipped 15 s, and every
duration of the committed rules is scaled by the same 1/15 (``for: 1m`` -> 4 s, ``[5m]`` -> 20 s;
tests/stack/conftest.py checks that nothing else differs), so the rules behave as shipped, 15
times faster. Alertmanager's config is the committed one with second-scale grouping and the
webhook URL on loopback.

The tests share one set of processes (module scope) and run in file order: the driver is killed
after the tests that read it.
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
from tests.stack.conftest import (
    REPO,
    STACK,
    TEST_INTERVAL_S,
    TIME_SCALE,
    Prometheus,
    alertmanager_config_for_tests,
    free_port,
    prometheus_config_for_tests,
    rules_for_tests,
    scale_duration,
    stop_process,
    two_free_ports,
    wait_until,
)

pytestmark = pytest.mark.stack

DRIVER = Path(__file__).with_name("karn_driver.py")
DASHBOARDS = REPO / "dashboards"
RULES = STACK / "prometheus" / "rules" / "karn-alerts.yml"
DRIVER_EPOCHS = 12  # ends with an isolated seed (leakage measured) and attributed ones
SPIKE_EPOCH = 9  # one epoch of shuffled labels, 3 before the end: the run recovers from it
PPO_EPOCHS = 3
PPO_EPISODES = 2  # the policy collapses in episode 1 and recovers in episode 2
CLEAN_EPOCHS = 40
PROCESS_TIMEOUT_S = 240  # the Karn processes exit by themselves after this, whatever happens here
HOLD_S = 300 * TIME_SCALE  # stack_rules.HOLD (5m), scaled: how long a health alert holds after its event

# Panels whose query legitimately returns nothing while the run is healthy and complete, and why.
# Everything else must return data for one of the two runs.
EXPECTED_EMPTY = {
    (
        "karn-ranks",
        "Missing ranks",
    ): "only while a rank is gone; test_rank_killed_mid_episode checks it returns data then",
}
# Queries that return nothing for the single-rank runs, and why (checked elsewhere).
EXPECTED_EMPTY_EXPRS = {
    'scope="job"': "job-wide series exist only in a DDP job; test_ddp_rank_killed_is_the_only_rank_missing checks them",
    "karn_control_": "a control twin exists only with karn run --control; tests/experiment checks the morph run records "
    "it and tests/sinks/test_otel.py scrapes karn_control_* from such a run",
}
NOT_A_RUN_ALERT = {"KarnWatchdog"}  # always firing, and about the stack, not a run

# Grafana's built-in variables, as Grafana would substitute them for a 1 h dashboard.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}


class KarnProcess:
    """A Karn subprocess whose stdout lines are collected on a thread."""

    def __init__(self, name: str, cmd: list[str], log: Path) -> None:
        self.name = name
        self.lines: queue.Queue[str] = queue.Queue()
        self.all_lines: list[str] = []
        env = karn_env()
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
        self.clean_port = free_port()
        self.ddp_base = two_free_ports()
        self.report_path = tmp / "driver-health.json"
        # Alertmanager and Prometheus first (their fixtures stop them), then the Karn processes.
        self.am = start_alertmanager(alertmanager_config_for_tests(webhook.url))
        rules = rules_for_tests(RULES, tmp / "karn-alerts.yml")
        self.prom: Prometheus = start_prometheus(
            prometheus_config_for_tests(
                rules,
                [f"127.0.0.1:{p}" for p in (driver_port, ppo_port, self.clean_port, self.ddp_base, self.ddp_base + 1)],
                self.am.url.split("//")[1],
            ),
            # Prometheus resends a firing alert every --rules.alert.resend-delay (1m shipped), scaled
            # like the rest: an alert evaluated before Alertmanager was discovered (the watchdog, at
            # start) is dropped once and resent then.
            f"--rules.alert.resend-delay={scale_duration('1m')}",
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
                    str(SPIKE_EPOCH),
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
                    "--inject-entropy-collapse-episodes",
                    "1",
                    "--episodes",
                    str(PPO_EPISODES),
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
            # The clean run trains beside the others and exits by itself (after its final scrape).
            self.clean = self._spawn(
                "karn run (clean)",
                [sys.executable, "-m", "karn_otel.cli", "run", "--epochs", str(CLEAN_EPOCHS), "--no-live"]
                + ["--out", str(tmp / "clean-runs"), "--prometheus-port", str(self.clean_port)],
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
        for run_id in (self.driver_run_id, self.ppo_run_id):
            wait_until(
                lambda: self.prom.query(f'karn_episode_complete{{run_id="{run_id}"}} == 1'),
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


def rfc3339(text: str) -> float:
    """Alertmanager's timestamps (nanoseconds, Z) as Unix seconds."""
    from datetime import datetime

    head, _, frac = text.rstrip("Z").partition(".")
    base = datetime.fromisoformat(head + "+00:00").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def raised_checks(run_dir: Path) -> list[tuple[int, str]]:
    """(epoch, check) of every non-ok HealthAlert in a run log: what the run's HealthMonitor raised."""
    return [
        (e.epoch, e.payload.check)
        for e in read_run(run_dir).events
        if e.event_type is ET.HEALTH_ALERT and e.payload.severity.value != "ok"
    ]


def delivered_checks(webhook, run_id: str) -> set[str]:
    return {a["labels"]["check"] for a in webhook.alerts(run_id=run_id) if "check" in a["labels"]}


def test_one_epoch_loss_spike_is_delivered_and_resolves(live):
    """Epoch 9 of 12 has its labels shuffled: a real loss spike that lasts one epoch.

    The HealthMonitor raises loss_spike for that epoch only; KarnLossSpike reaches the webhook
    with the run and rank labels, then resolves by itself once the hold has passed. Every health
    alert delivered for the run is a check the monitor raised (nothing Prometheus made up).
    """
    live.ready()
    raised = raised_checks(live.driver_run_dir)
    assert (SPIKE_EPOCH, "loss_spike") in raised, raised
    assert live.report["failing"] == [] or "loss_spike" not in live.report["failing"], "the spike lasted one epoch"
    spike = wait_until(
        lambda: live.webhook.alerts(alertname="KarnLossSpike", run_id=live.driver_run_id, status="firing"),
        30,
        "KarnLossSpike at the webhook",
    )[0]
    assert spike["labels"]["rank"] == "0" and spike["labels"]["world_size"] == "1"
    # Within two scrape/evaluation intervals of the HealthMonitor's alert (startsAt is the evaluation
    # that first saw it; the run log stamps the alert event), plus at most one scrape's own duration
    # (scrape_timeout, 1 s here) on a loaded machine.
    [raised_at] = [
        e.timestamp
        for e in read_run(live.driver_run_dir).events
        if e.event_type is ET.HEALTH_ALERT and e.payload.check == "loss_spike"
    ]
    lag = rfc3339(spike["startsAt"]) - raised_at
    assert 0 <= lag <= 3 * TEST_INTERVAL_S + 0.25, f"KarnLossSpike active {lag:.2f} s after the alert event"
    print(f"KarnLossSpike active {lag:.2f} s after the HealthMonitor raised it (intervals of {TEST_INTERVAL_S:g} s)")
    assert spike["labels"]["check"] == "loss_spike" and spike["labels"]["severity"] == "warning"
    assert spike["annotations"]["runbook_url"] == "docs/alerts.md#karnlossspike"
    assert live.driver_run_id in spike["annotations"]["explore"]
    assert "Latest value: " in spike["annotations"]["description"]
    assert delivered_checks(live.webhook, live.driver_run_id) <= {c for _, c in raised}
    wait_until(
        lambda: live.webhook.alerts(alertname="KarnLossSpike", run_id=live.driver_run_id, status="resolved"),
        HOLD_S + 30,
        "KarnLossSpike to resolve by itself",
    )


def test_entropy_collapse_that_recovers_is_delivered_and_resolves(live):
    """`karn run --controller ppo --episodes 2 --inject-entropy-collapse-episodes 1`."""
    live.ready()
    raised = raised_checks(live.ppo_run_dir)
    assert "entropy_collapse" in {c for _, c in raised}
    updates = [e.payload for e in read_run(live.ppo_run_dir).events if e.event_type is ET.PPO_UPDATE]
    assert min(updates[-1].entropy.values()) > 0.5, "episode 2's policy has recovered"
    delivered = wait_until(
        lambda: live.webhook.alerts(alertname="KarnEntropyCollapse", run_id=live.ppo_run_id, status="firing"),
        30,
        "KarnEntropyCollapse at the webhook",
    )
    alert = delivered[0]
    assert alert["labels"]["rank"] == "0"
    assert alert["labels"]["severity"] == "warning"
    assert alert["labels"]["check"] == "entropy_collapse"
    assert live.ppo_run_id in alert["annotations"]["summary"] and "rank 0" in alert["annotations"]["summary"]
    payload = next(p for p in live.webhook.payloads if alert in p["alerts"])
    assert payload["groupLabels"] == {"alertname": "KarnEntropyCollapse", "run_id": live.ppo_run_id}
    assert delivered_checks(live.webhook, live.ppo_run_id) <= {c for _, c in raised}
    wait_until(
        lambda: live.webhook.alerts(alertname="KarnEntropyCollapse", run_id=live.ppo_run_id, status="resolved"),
        HOLD_S + 30,
        "KarnEntropyCollapse to resolve once the policy recovered",
    )


def test_watchdog_is_delivered(live):
    live.ready()
    [w, *_] = wait_until(lambda: live.webhook.alerts(alertname="KarnWatchdog"), 20, "the watchdog")
    assert w["labels"]["severity"] == "none" and "run_id" not in w["labels"]


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
    """Each panel's PromQL, variables substituted, returns series for the driver's or the PPO run
    (at some time during the runs, as a dashboard scrolled back would show it)."""
    live.inject_faults()  # so that Karn's drop/reject counters and an alert exist too
    wait_until(lambda: live.prom.query('ALERTS{alertstate="firing"}'), 20, "a firing alert (the ALERTS panels)")
    queries = dashboard_queries()
    assert len(queries) > 60
    empty = []
    end = time.time()
    for uid, title, expr, _instant in queries:

        def has_data(run_id: str) -> bool:
            q = substitute(expr, run_id=run_id, rank="0")
            # An instant panel shows the value at the dashboard's time: some time during the runs
            # (a one-epoch alert has resolved by now).
            return bool(live.prom.query_range(q, live.t0, end))

        if any(has_data(run_id) for run_id in (live.driver_run_id, live.ppo_run_id)):
            continue
        if (uid, title) not in EXPECTED_EMPTY and not any(f in expr for f in EXPECTED_EMPTY_EXPRS):
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


# --------------------------------------------------------------------------- finished is not missing


def karn_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OTEL_EXPORTER_OTLP_ENDPOINT", "KARN_PROMETHEUS_FINAL_SCRAPE_S")
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def only_run_dir(parent: Path) -> Path:
    runs = [p for p in parent.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def quiet_for(prom: Prometheus, run_id: str, seconds: float) -> None:
    """No alert of the run pending or firing at any evaluation over ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not karn_alerts(prom, run_id), karn_alerts(prom, run_id)
        time.sleep(0.25)


def test_clean_run_delivers_no_alert_at_all(live):
    """`karn run --epochs 40 --prometheus-port P`: Prometheus sees epoch 40 and the completion, and no
    alert (KarnRankMissing included) is pending, firing or delivered while the run trains or after it exits."""
    live.ready()
    out = live.tmp / "clean-runs"
    live.clean.expect(r"^events: \d+ accepted", timeout=PROCESS_TIMEOUT_S)
    assert live.clean.proc.wait(timeout=60) == 0, "\n".join(live.clean.all_lines[-20:])
    run_dir = only_run_dir(out)
    run_id = run_dir.name
    assert raised_checks(run_dir) == [], "a clean run: its HealthMonitor raised nothing"
    sel = f'run_id="{run_id}"'
    # The final scrape happened before the endpoint stopped: the end of the run is in Prometheus.
    assert live.prom.value(f"last_over_time(karn_host_epoch{{{sel}}}[10m])") == CLEAN_EPOCHS
    assert live.prom.value(f"last_over_time(karn_episode_complete{{{sel}}}[10m])") == 1
    wait_until(lambda: not live.prom.query(f"karn_episode_complete{{{sel}}}"), 20, "the run's series to go stale")
    # Three evaluation intervals, and KarnRankMissing's for: (4 s scaled) on top.
    quiet_for(live.prom, run_id, 3 * TEST_INTERVAL_S + 60 * TIME_SCALE + 2)
    assert not live.prom.query(f"count_over_time(ALERTS{{{sel}}}[10m])"), "never pending, never firing"
    assert not live.webhook.alerts(run_id=run_id)


def test_ddp_rank_killed_is_the_only_rank_missing(live):
    """`karn run --nproc 2 --epochs 40`, rank 1 SIGKILLed mid-episode: KarnRankMissing for rank 1 only.

    Rank 0 stops too (its peer is gone) but shuts Karn down on the way out (karn_episode_stopped 1,
    read by the final scrape): the rank that took the job down is the one paged.
    """
    live.ready()
    out = live.tmp / "ddp-runs"
    log = open(live.tmp / "ddp.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "karn_otel.cli", "run", "--nproc", "2", "--epochs", str(CLEAN_EPOCHS), "--no-live"]
        + ["--out", str(out), "--prometheus-port", str(live.ddp_base)],
        cwd=REPO,
        env=karn_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def both_ranks_training():
            res = live.prom.query('karn_host_epoch{world_size="2", rank!=""} >= 3')
            return res if {r["metric"]["rank"] for r in res} == {"0", "1"} else None

        run_id = wait_until(both_ranks_training, 120, "both ranks at epoch 3 in Prometheus")[0]["metric"]["run_id"]
        # Per-rank means per-rank: the job-wide values are their own series, with no rank label.
        [job] = live.prom.query(f'karn_host_train_loss{{run_id="{run_id}", scope="job"}}')
        assert "rank" not in job["metric"]
        ranked = {
            r["metric"]["rank"] for r in live.prom.query(f'karn_host_train_loss{{run_id="{run_id}", rank=~".+"}}')
        }
        assert ranked == {"0", "1"}
        heartbeat = json.loads((out / run_id / "heartbeats" / "rank1.json").read_text())
        os.kill(heartbeat["pid"], 9)  # SIGKILL rank 1: no goodbye
        firing = wait_until(
            lambda: live.prom.firing(alertname="KarnRankMissing", run_id=run_id), 60, "KarnRankMissing for rank 1"
        )
        assert [a["labels"]["rank"] for a in firing] == ["1"]
        assert firing[0]["labels"]["world_size"] == "2"
        delivered = wait_until(
            lambda: live.webhook.alerts(alertname="KarnRankMissing", run_id=run_id), 20, "KarnRankMissing delivered"
        )
        assert {a["labels"]["rank"] for a in delivered} == {"1"}
        proc.wait(timeout=120)  # the launcher ends the job
        assert proc.returncode != 0
        sel = f'run_id="{run_id}", rank="0"'
        wait_until(lambda: not live.prom.query(f"karn_episode_complete{{{sel}}}"), 60, "rank 0's series to go stale")
        assert live.prom.value(f"last_over_time(karn_episode_stopped{{{sel}}}[10m])") == 1, "rank 0 said goodbye"
        deadline = time.monotonic() + 3 * TEST_INTERVAL_S + 60 * TIME_SCALE + 2
        while time.monotonic() < deadline:
            ranks = {a["labels"]["rank"] for a in live.prom.alerts() if a["labels"].get("run_id") == run_id}
            assert ranks <= {"1"}, ranks
            time.sleep(0.25)
        assert {a["labels"]["rank"] for a in live.webhook.alerts(run_id=run_id)} == {"1"}
    finally:
        stop_process(proc)
        log.close()


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
