"""The claim rules against hand-computed cases (their error rates: tests/test_calibration.py)."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest

from karn_otel.claims import (
    FINAL_RULE,
    LIVE_RULE,
    TAIL,
    final_verdict,
    live_claim,
    live_test_level,
    lower_bound,
    one_sided_p,
    spending_weight,
)
from karn_otel.contracts import ShapleyEstimate
from karn_otel.counterfactual import student_t_ppf


def est(mean, std, df=math.inf):
    return ShapleyEstimate(mean, std, 200, "exact_enumeration", df=df)


@pytest.mark.parametrize("horizon", [None, 0, 1, 10, 100])
def test_spending_never_exceeds_alpha(horizon):
    total = sum(spending_weight(e, horizon) for e in range(200_000))
    assert total <= 1.0 + 1e-12
    assert total > 0.99, "almost all of alpha is usable"
    assert spending_weight(-1, horizon) == 0.0
    if horizon is not None:
        planned = sum(spending_weight(e, horizon) for e in range(horizon + 1))
        assert planned == pytest.approx(1 - TAIL)
        assert spending_weight(horizon + 1, horizon) == pytest.approx(TAIL / 2)


def test_live_level_and_bound_by_hand():
    # 100 planned epochs (looks 0..100), 3 slots: 0.05 * 0.95 / 101 / 3
    level = live_test_level(7, horizon=100, n_slots=3)
    assert level == pytest.approx(1.5677e-4, rel=1e-4)
    z = NormalDist().inv_cdf(1 - level)
    assert z == pytest.approx(3.6, abs=0.01)
    assert lower_bound(est(0.02, 0.005), level) == pytest.approx(0.02 - z * 0.005)
    # a t estimate uses its degrees of freedom: wider than normal
    t = student_t_ppf(1 - level, 9)
    assert lower_bound(est(0.02, 0.005, df=9), level) == pytest.approx(0.02 - t * 0.005)
    assert t > z + 1.5


def test_live_claim_needs_the_spent_level_not_the_descriptive_one():
    c = live_claim("mid", est(0.012, 0.005), 5, horizon=100, n_slots=3)  # z = 2.4: ci_low > 0 but no claim
    assert not c.helps and c.rule == LIVE_RULE and c.alpha == 0.05
    assert c.p_value == pytest.approx(1 - NormalDist().cdf(2.4))
    c = live_claim("mid", est(0.019, 0.005), 5, horizon=100, n_slots=3)  # z = 3.8 > 3.6
    assert c.helps and c.bound > 0 and c.label() == "helps (alpha-spending, 5% per run)"
    assert not live_claim("mid", est(0.019, 0.005), 5, horizon=100, n_slots=3, threshold=0.005).helps


@pytest.mark.parametrize("bad", [est(0.5, float("nan")), est(0.5, 0.0), est(float("nan"), 0.1), est(0.5, 0.1, df=0)])
def test_undefined_estimates_never_claim(bad):
    assert not live_claim("a", bad, 1, horizon=None, n_slots=1).helps
    assert not final_verdict({"a": bad}, 1)["a"].helps
    assert one_sided_p(bad) == 1.0 and math.isnan(lower_bound(bad, 0.05))


def test_final_verdict_is_holm_step_down():
    # one-sided p-values by hand: z = 3.0 -> 0.00135, 2.2 -> 0.0139, 1.8 -> 0.0359
    ests = {"a": est(0.03, 0.01), "b": est(0.022, 0.01), "c": est(0.018, 0.01)}
    v = final_verdict(ests, 100)
    # Holm at 0.05: 0.00135 <= 0.05/3, 0.0139 <= 0.05/2, 0.0359 <= 0.05/1: all three
    assert [v[s].helps for s in "abc"] == [True, True, True]
    assert [v[s].test_level for s in "abc"] == pytest.approx([0.05 / 3, 0.05 / 2, 0.05])
    assert all(c.rule == FINAL_RULE and c.epoch == 100 for c in v.values())
    # with two null slots (p = 0.5) there are 4 tests: b (z = 2.0, p = 0.0228) fails 0.05/3 and the
    # step-down stops there (it would pass 0.05 alone)
    ests = {"a": est(0.03, 0.01), "b": est(0.02, 0.01), "n": est(0.0, 0.01), "m": est(0.0, 0.01)}
    v = final_verdict(ests, 100)
    assert v["a"].helps and not v["b"].helps and not v["n"].helps and not v["m"].helps
    assert list(v) == list(ests), "in the caller's slot order"


def test_bad_alpha_raises():
    with pytest.raises(ValueError):
        live_test_level(1, horizon=1, n_slots=1, alpha=0.0)
    with pytest.raises(ValueError):
        final_verdict({}, 1, alpha=1.0)


def test_live_chain_passes_a_claims_level_to_the_next_epoch():
    from karn_otel.claims import live_claim_chain

    base = live_test_level(1, horizon=10, n_slots=3)  # the same share at every planned epoch
    z = {k: NormalDist().inv_cdf(1 - k * base) for k in (1, 2, 3)}  # 2.98, 2.76, 2.63
    # epoch 1 claimed at its own share; epochs 2 and 3 at 2x and 3x it; epoch 4 misses -> 5 restarts
    history = [(1, est(3.0, 1)), (2, est(2.8, 1)), (3, est(2.65, 1)), (4, est(2.0, 1)), (5, est(2.8, 1))]
    chain = live_claim_chain("mid", history, horizon=10, n_slots=3)
    assert [c.helps for c in chain] == [True, True, True, False, False]
    assert [c.test_level for c in chain] == pytest.approx([base, 2 * base, 3 * base, 4 * base, base])
    assert 2.8 > z[2] and 2.8 < z[1], "epoch 5 alone (z 2.8) would have needed the carried alpha"
    # a gap in the epochs (no matrix at 2) passes nothing on
    gap = live_claim_chain("mid", [(1, est(3.0, 1)), (3, est(2.8, 1))], horizon=10, n_slots=3)
    assert [c.helps for c in gap] == [True, False]
    # continuing a chain gives the same claims as computing it in one go
    tail = live_claim_chain("mid", history[2:], horizon=10, n_slots=3, after=chain[1])
    assert [c.test_level for c in tail] == pytest.approx([c.test_level for c in chain[2:]])
    with pytest.raises(ValueError):
        live_claim_chain("mid", [(2, est(1, 1)), (2, est(1, 1))], horizon=10, n_slots=3)
