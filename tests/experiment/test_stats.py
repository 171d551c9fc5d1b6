"""compare's statistics against scipy and direct computation, and against simulations with a
known difference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from karn_otel.experiment import stats as ks


@pytest.fixture
def groups():
    rng = np.random.default_rng(7)
    return rng.normal(0.80, 0.02, 7), rng.normal(0.78, 0.03, 6)


def test_welch_p_equals_scipy(groups):
    a, b = groups
    res = ks.compare("acc", a, b)
    assert isinstance(res, ks.Comparison)
    assert res.welch_p == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue, abs=1e-12)
    assert res.difference == pytest.approx(a.mean() - b.mean(), abs=1e-12)


def test_cohens_d_hedges_g_and_iqm_direct(groups):
    a, b = groups
    na, nb = len(a), len(b)
    pooled = math.sqrt(((na - 1) * np.var(a, ddof=1) + (nb - 1) * np.var(b, ddof=1)) / (na + nb - 2))
    d = (a.mean() - b.mean()) / pooled
    assert ks.cohens_d(a, b) == pytest.approx(d, abs=1e-9)
    df = na + nb - 2
    j = math.gamma(df / 2) / (math.sqrt(df / 2) * math.gamma((df - 1) / 2))
    assert ks.hedges_g(a, b) == pytest.approx(d * j, abs=1e-9)
    assert ks.hedges_correction(df) == pytest.approx(1 - 3 / (4 * df - 1), abs=2e-3)  # the usual approximation
    x = np.sort(a)
    k = int(math.floor(0.25 * len(x)))
    assert ks.iqm(a) == pytest.approx(x[k : len(x) - k].mean(), abs=1e-12)


def test_bootstrap_interval_equals_scipy(groups):
    a, b = groups
    got = ks.bootstrap_difference_ci(a, b, seed=3)
    ref = sps.bootstrap(
        (a, b),
        lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis),
        n_resamples=ks.N_BOOTSTRAP,
        method="BCa",
        vectorized=True,
        rng=np.random.default_rng(3),
    ).confidence_interval
    assert got.low == pytest.approx(ref.low, abs=1e-9) and got.high == pytest.approx(ref.high, abs=1e-9)


def test_paired_and_one_sample_equal_scipy(groups):
    a, b = groups
    pairs = list(zip(a[:6], b))
    res = ks.compare("acc", a, b, pairs=pairs)
    assert res.paired_p == pytest.approx(sps.ttest_rel(a[:6], b).pvalue, abs=1e-12)
    d = a[:6] - b
    one = ks.describe("delta", d, 0.0)
    assert one.p_value == pytest.approx(sps.ttest_1samp(d, 0.0).pvalue, abs=1e-12)
    assert one.stats.mean == pytest.approx(d.mean(), abs=1e-12)


def test_known_difference_is_recovered_within_its_interval():
    """Simulated experiments with a true +2 point difference: the bootstrap interval covers it
    in about 95% of experiments, and the IQM interval covers the true IQM of a symmetric law."""
    rng = np.random.default_rng(0)
    hits = iqm_hits = 0
    n_sim = 200
    for _ in range(n_sim):
        a, b = rng.normal(0.82, 0.02, 10), rng.normal(0.80, 0.02, 10)
        res = ks.compare("acc", a, b, seed=int(rng.integers(1 << 30)))
        hits += 0.02 in res.difference_ci
        iqm_hits += 0.82 in res.a.iqm_ci
    assert 0.88 <= hits / n_sim <= 0.99, hits
    assert 0.85 <= iqm_hits / n_sim <= 1.0, iqm_hits


def test_not_enough_runs_is_said_not_computed():
    res = ks.compare("acc", [0.8], [0.7, 0.71])
    assert isinstance(res, ks.NotEnoughRuns) and "not enough runs" in res.message
    assert isinstance(ks.describe("delta", [0.1]), ks.NotEnoughRuns)


def test_no_spread_gives_point_intervals_not_nan():
    res = ks.compare("acc", [0.8, 0.8, 0.8], [0.8, 0.8])
    assert res.welch_p == 1.0 and res.cohens_d == 0.0
    assert res.difference_ci.low == res.difference_ci.high == pytest.approx(0.0, abs=1e-15)


def test_shapley_claims_are_aggregated_with_each_runs_final_verdict(tmp_path):
    from karn_otel.claims import final_verdict
    from karn_otel.contracts import ShapleyEstimate
    from karn_otel.experiment.compare import compare_runs
    from karn_otel.experiment.summary import RunSummary

    def est(mean, se):
        return ShapleyEstimate(mean, se, 30, ci_low=mean - 2 * se, ci_high=mean + 2 * se)

    runs = []
    for i, (good, null) in enumerate([(0.05, 0.001), (0.04, -0.002), (0.002, 0.0005)]):
        shap = {"early": est(good, 0.005), "mid": est(null, 0.004)}
        runs.append(
            RunSummary(f"r{i}", tmp_path, None, "morph", i, "heuristic", True, 0.9, 0.85, 1100, 1000,
                       final_shapley=shap, final_shapley_epoch=10)
        )  # fmt: skip
    res = compare_runs(runs)
    by_slot = {c.slot_id: c for c in res.slots}
    want = {s: sum(final_verdict(r.final_shapley, 10)[s].helps for r in runs) for s in ("early", "mid")}
    assert by_slot["early"].n_claimed == want["early"] == 2  # the third run's +0.2 pt is not significant
    assert by_slot["mid"].n_claimed == want["mid"] == 0
    assert by_slot["early"].n_runs == 3
    assert by_slot["early"].mean.stats.mean == pytest.approx(np.mean([0.05, 0.04, 0.002]))


def test_no_spread_is_said_not_printed_as_a_tiny_p_value():
    """Two runs whose paired deltas are both exactly 2 of 359 examples (differing only by float
    rounding) used to print 'paired p = <0.0001 (n=2)': a t-test on zero spread is undefined."""
    from karn_otel.experiment.compare import _p

    a = [0.9164345403899722, 0.8857938718662952]
    b = [x - 2 / 359 for x in a]
    res = ks.compare("final val accuracy", a, b, pairs=list(zip(a, b)))
    assert res.paired_no_spread and res.paired_p == 0.0
    assert not res.no_spread  # the groups themselves do vary
    assert _p(res.paired_p, res.paired_no_spread).startswith("n/a (no spread")
    one = ks.describe("delta", [2 / 359, 2 / 359 + 1e-17])
    assert one.no_spread and _p(one.p_value, one.no_spread).startswith("n/a")
    varied = ks.describe("delta", [0.01, 0.02, 0.04])
    assert not varied.no_spread and _p(varied.p_value, varied.no_spread)[0] in "0<"
