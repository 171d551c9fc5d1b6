"""Rank export policies: deterministic sampling, unhealthy ranks always in, and the series
budget at 1,000 ranks."""

from __future__ import annotations

import pytest

from karn_otel.distributed.export_policy import ALL_UP_TO, RankExportPolicy, sampled_ranks


def test_parse():
    assert RankExportPolicy.parse("all", 4) == RankExportPolicy("all")
    assert RankExportPolicy.parse("reduced", 4) == RankExportPolicy("reduced")
    assert RankExportPolicy.parse("sampled:3", 4) == RankExportPolicy("sampled", 3)
    assert RankExportPolicy.parse("auto", ALL_UP_TO).kind == "all"
    assert RankExportPolicy.parse("auto", ALL_UP_TO + 1).kind == "sampled"
    for bad in ("some", "sampled:", "sampled:-1", "sampled:x"):
        with pytest.raises(ValueError):
            RankExportPolicy.parse(bad, 4)


def test_env(monkeypatch):
    monkeypatch.setenv("KARN_EXPORT_RANKS", "reduced")
    assert RankExportPolicy.parse(None, 8).kind == "reduced"


def test_sampling_is_deterministic_per_run_and_the_same_on_every_rank():
    a = sampled_ranks("run-a", 1000, 8)
    assert len(a) == 8 and a == sampled_ranks("run-a", 1000, 8)
    assert a != sampled_ranks("run-b", 1000, 8)  # another run watches other ranks
    policy = RankExportPolicy("sampled", 8)
    decided = {r for r in range(1000) if policy.exports_rank_series("run-a", r, 1000)}
    assert decided == a
    assert sampled_ranks("r", 5, 8) == frozenset(range(5))


def test_an_unhealthy_rank_always_exports():
    policy = RankExportPolicy("sampled", 2)
    outside = next(r for r in range(100) if r not in sampled_ranks("run", 100, 2))
    assert not policy.exports_rank_series("run", outside, 100)
    assert policy.exports_rank_series("run", outside, 100, unhealthy=True)
    assert not RankExportPolicy("reduced").exports_rank_series("run", outside, 100, unhealthy=True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("all", 1000), ("reduced", 0), ("sampled:8", 8), ("auto", 8)],
)
def test_series_budget_at_1000_ranks(text, expected):
    """Per-rank series sets exported by a 1,000-rank job: bounded by K, not by the world size."""
    world = 1000
    policy = RankExportPolicy.parse(text, world)
    exporting = sum(policy.exports_rank_series("run-x", r, world) for r in range(world))
    assert exporting == expected == policy.max_rank_series_sets(world)
    assert sum(policy.exports_job_series(r) for r in range(world)) == 1  # the job-wide set: rank 0's
    # with 3 unhealthy ranks outside the sample, sampled:8 exports at most 11 sets
    if policy.kind == "sampled":
        sick = [r for r in range(world) if r not in sampled_ranks("run-x", world, 8)][:3]
        n = sum(policy.exports_rank_series("run-x", r, world, unhealthy=r in sick) for r in range(world))
        assert n == 11 == policy.max_rank_series_sets(world, unhealthy=3)
