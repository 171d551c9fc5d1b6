"""A real Prometheus scrapes both ranks of `karn run --nproc 2` and sees distinct rank labels."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.stack.conftest import REPO, Prometheus, stop_process, two_free_ports, wait_until

pytestmark = pytest.mark.stack


def test_prometheus_scrapes_every_rank(start_prometheus, tmp_path):
    base = two_free_ports()
    targets = [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
    prom: Prometheus = start_prometheus(
        {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "karn", "honor_labels": True, "static_configs": [{"targets": targets}]}],
        }
    )
    cmd = [
        sys.executable,
        "-m",
        "karn_otel.cli",
        "run",
        "--nproc",
        "2",
        "--epochs",
        "4",
        "--no-live",
        "--out",
        str(tmp_path),
        "--prometheus-port",
        str(base),
        "--serve-after",
        "60",
    ]
    log = open(tmp_path / "karn-run.log", "w")  # a file, not a pipe nobody drains
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:

        def both_ranks():
            res = prom.query('karn_host_epoch{world_size="2", rank!=""}')
            ranks = {r["metric"]["rank"] for r in res if float(r["value"][1]) >= 4}
            return ranks if ranks == {"0", "1"} else None

        ranks = wait_until(both_ranks, timeout=120, what="both ranks' epoch 4 in Prometheus")
        assert ranks == {"0", "1"}
        runs = {r["metric"]["run_id"] for r in prom.query("karn_host_epoch")}
        assert len(runs) == 1, "both ranks report under one run id"
        up = {r["metric"]["instance"]: r["value"][1] for r in prom.query('up{job="karn"}')}
        assert up == {t: "1" for t in targets}
    finally:
        stop_process(proc)
        log.close()
