"""A finished run is not a missing one, with a real Prometheus scraping less often than Karn's
shutdown bound.

The shipped Prometheus scrapes every 15 s; Karn's shutdown returns within 5 s. A script that
calls ``shutdown()`` and exits must still leave ``karn_episode_complete = 1`` in Prometheus,
or KarnRankMissing pages for a run that ended cleanly. tests/sinks/test_otel.py checks the
mechanism with HTTP GETs; this test checks what Prometheus stores and what the alert's
expression then says, at an 8 s scrape interval (longer than the bound, shorter than the
shipped one, to keep the test under half a minute).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.stack.conftest import REPO, STACK, free_port, prometheus_config_for_tests, stop_process, wait_until

pytestmark = pytest.mark.stack

INTERVAL_S = 8

_SCRIPT = """
import sys
import karn_otel
from karn_otel.config import KarnConfig
from karn_otel.contracts import EpisodeSummary
from tests.conftest import make_context
karn_otel.configure(KarnConfig(out_dir=sys.argv[1], console="off", prometheus_port=int(sys.argv[2])))
karn_otel.emit(make_context())
print("ready", flush=True)
sys.stdin.readline()  # Prometheus has scraped the open episode: finish and exit at once
karn_otel.emit(EpisodeSummary(3, 1.0, 0.5, 0.4, 1000, 1000, 0, 2.0))
karn_otel.shutdown()
print("shutdown returned", flush=True)
"""


def test_a_run_that_exits_after_shutdown_is_stored_complete_and_not_missing(start_prometheus, tmp_path):
    port = free_port()
    cfg = prometheus_config_for_tests(
        STACK / "prometheus" / "rules" / "karn-alerts.yml", [f"127.0.0.1:{port}"], "127.0.0.1:9"
    )
    cfg["global"].update(scrape_interval=f"{INTERVAL_S}s", scrape_timeout="2s", evaluation_interval=f"{INTERVAL_S}s")
    cfg.pop("alerting", None)  # the alert's expression is queried directly below
    child = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(tmp_path), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        prom = start_prometheus(cfg)
        wait_until(lambda: prom.query("karn_episode_complete"), 3 * INTERVAL_S, "Prometheus' first scrape of the run")
        assert float(prom.query("karn_episode_complete")[0]["value"][1]) == 0, "the episode is open"
        t0 = time.monotonic()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(INTERVAL_S + 10) == 0, child.stderr.read()
        took = time.monotonic() - t0
        assert took > 5.0 or INTERVAL_S <= 5, "the scrape came after the shutdown bound (what is tested)"
        assert "left behind" not in child.stderr.read()
        # What Prometheus stored last for the run, after its endpoint went away: complete.
        last = wait_until(
            lambda: prom.query("last_over_time(karn_episode_complete[5m])"), 2 * INTERVAL_S, "the stored series"
        )
        assert [float(r["value"][1]) for r in last] == [1.0], last
        # KarnRankMissing's expression (its `for:` aside) finds nothing to page.
        missing = next(r["expr"] for g in _alert_rules() for r in g["rules"] if r.get("alert") == "KarnRankMissing")
        time.sleep(INTERVAL_S + 1)  # one more scrape: the target is down, its series stale
        assert prom.query("up")[0]["value"][1] == "0", "the endpoint is gone"
        assert prom.query(missing) == [], "a run that finished is not reported missing"
    finally:
        stop_process(child)


def _alert_rules() -> list[dict]:
    import yaml

    return yaml.safe_load((STACK / "prometheus" / "rules" / "karn-alerts.yml").read_text())["groups"]
