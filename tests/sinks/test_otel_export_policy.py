"""Rank export policies on the real OTel sink, scraped as Prometheus scrapes it: a rank outside
the policy exposes none of its own series; rank 0 keeps the job-wide ones; a sampled-out rank
whose health turns bad starts exporting. Resource attributes from the scheduler's environment."""

from __future__ import annotations

import pytest

from karn_otel import collector as kc
from karn_otel.config import KarnConfig
from karn_otel.contracts import HostSnapshot
from karn_otel.distributed.export_policy import sampled_ranks
from karn_otel.sinks.factory import build_pipeline
from karn_otel.sinks.otel import OTelSink
from karn_otel.sinks.otel import sink as otel_sink_module
from tests.conftest import make_context
from tests.sinks.test_otel import scrape

WORLD = 8


@pytest.fixture(autouse=True)
def _no_final_scrape(monkeypatch):
    monkeypatch.setenv(otel_sink_module.ENV_FINAL_SCRAPE_S, "0")


def _rank(rank: int, policy: str, loss: float = 1.0, reduced: bool = False) -> dict:
    c = kc.KarnCollector(
        KarnConfig(out_dir=None, console="off", prometheus_port=0, rank=rank, world_size=WORLD, run_id="pol-run",
                   export_ranks=policy)
    )  # fmt: skip
    sink = OTelSink(c.config, c.view)
    build_pipeline(c.config, c, sinks=[sink], processors=True)
    try:
        c.emit(make_context())
        for e in range(1, 6):
            h = HostSnapshot(e, loss if e == 5 else 1.0, 0.5, 1.0, 0.5, 100, 0, 100, 0, 1.0, {}, None)
            c.emit(h)
            if reduced:
                c.emit(h, is_reduced=True)
        return scrape(sink.prometheus_port)
    finally:
        c.close()


def _own(scraped: dict) -> list:
    return [(n, lb) for n, ss in scraped.items() if n != "target_info" for lb, _ in ss if lb.get("rank")]


def _job(scraped: dict) -> list:
    return [(n, lb) for n, ss in scraped.items() for lb, _ in ss if lb.get("scope") == "job"]


def test_reduced_rank0_exports_only_job_wide_series():
    s = _rank(0, "reduced", reduced=True)
    assert _own(s) == [] and _job(s), "rank 0 under 'reduced': the job's series, none of its own"
    assert {lb["world_size"] for _, lb in _job(s)} == {str(WORLD)}
    s = _rank(3, "reduced")
    assert _own(s) == [] and _job(s) == []


def test_sampled_ranks_export_and_the_others_do_not():
    chosen = sampled_ranks("pol-run", WORLD, 2)
    inside, outside = min(chosen), min(set(range(1, WORLD)) - chosen)
    assert _own(_rank(inside, "sampled:2"))
    assert _own(_rank(outside, "sampled:2")) == []


def test_a_sampled_out_rank_exports_once_its_health_is_bad():
    chosen = sampled_ranks("pol-run", WORLD, 1)
    outside = min(set(range(1, WORLD)) - chosen)
    s = _rank(outside, "sampled:1", loss=50.0)  # a loss spike at epoch 5: the health monitor warns
    own = _own(s)
    assert own and all(lb["rank"] == str(outside) for _, lb in own)
    assert any(n == "karn_health_status" for n, _ in own)


def test_all_is_the_default_below_the_threshold():
    assert _own(_rank(5, None))


def test_placement_reaches_the_resource(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("KARN_TP_RANK", "1")
    monkeypatch.setenv("KARN_TP_SIZE", "2")
    s = _rank(3, "all")
    (info,) = [lb for lb, _ in s["target_info"]]
    assert info["slurm_job_id"] == "777" and info["slurm_task_id"] == "3" and info["karn_dl_tp_size"] == "2"
    assert info["service_instance_id"] == "pol-run-rank3"
