"""Pairwise interactions, named: Moebius dividend (others off), Shapley interaction index, and
the removal (co-Moebius, others on) interaction, against closed forms and shapiq's exact values."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from karn_otel.config import CounterfactualConfig
from karn_otel.counterfactual import (
    attribute,
    interaction_effects,
    mobius_dividends,
    shapley_interaction_index,
)


def game(n, fn):
    """Dense game table indexed by bitmask from ``fn(frozenset of players)``."""
    return np.array([fn(frozenset(i for i in range(n) if (m >> i) & 1)) for m in range(1 << n)], dtype=float)


@pytest.mark.parametrize("n", [3, 4, 5])
@pytest.mark.parametrize("t_size", [2, 3, 4])
def test_unanimity_games(n, t_size):
    if t_size > n:
        pytest.skip("T larger than N")
    T = frozenset(range(1, 1 + t_size)) if t_size < n else frozenset(range(n))
    v = game(n, lambda S: float(T <= S))
    mob, sii, co = mobius_dividends(v, n), shapley_interaction_index(v, n), interaction_effects(v, n)
    for i, j in itertools.combinations(range(n), 2):
        inside = {i, j} <= T
        assert mob[i, j] == (1.0 if inside and len(T) == 2 else 0.0), "dividend of the pair alone"
        assert sii[i, j] == pytest.approx(1.0 / (len(T) - 1) if inside else 0.0, abs=1e-14)
        assert co[i, j] == (1.0 if inside else 0.0), "with everyone else on, the pair completes T"


def test_glove_game_signs_differ_by_question():
    """Left gloves 0, 1 and one right glove 2; v = pairs that can be made."""
    v = game(3, lambda S: float(min(len(S & {0, 1}), len(S & {2}))))
    mob, sii, co = mobius_dividends(v, 3), shapley_interaction_index(v, 3), interaction_effects(v, 3)
    # complements: a left and the right glove make a pair only together
    assert mob[0, 2] == 1.0 and sii[0, 2] == pytest.approx(0.5) and co[0, 2] == 0.0
    # substitutes: two left gloves. On the bare host they do nothing (Moebius 0), on average
    # they are redundant (SII -1/2), and with the right glove on each replaces the other (-1).
    assert mob[0, 1] == 0.0 and sii[0, 1] == pytest.approx(-0.5) and co[0, 1] == -1.0


def test_pure_synergy_game():
    """v = 1 only when all three are on: no pair synergy on the bare host, full synergy in N."""
    v = game(3, lambda S: float(len(S) == 3))
    mob, sii, co = mobius_dividends(v, 3), shapley_interaction_index(v, 3), interaction_effects(v, 3)
    for i, j in itertools.combinations(range(3), 2):
        assert mob[i, j] == 0.0 and sii[i, j] == pytest.approx(0.5) and co[i, j] == 1.0


def test_spec_table_early_mid():
    """The spec's 3-slot table (early, mid, late): the three answers for early-mid."""
    acc = {"000": 62.3, "001": 64.1, "010": 63.8, "011": 65.2, "100": 63.5, "101": 65.8, "110": 64.9, "111": 66.4}
    values = {tuple(c == "1" for c in k): a for k, a in acc.items()}
    mob, sii, co = mobius_dividends(values, 3), shapley_interaction_index(values, 3), interaction_effects(values, 3)
    assert mob[0, 1] == pytest.approx(-0.1) and co[0, 1] == pytest.approx(-0.5) and sii[0, 1] == pytest.approx(-0.3)


def test_against_shapiq_exact_computer_on_random_games():
    exact = pytest.importorskip("shapiq.game_theory.exact")
    rng = np.random.default_rng(7)
    for n in (3, 5, 7):
        for _ in range(3):
            v = rng.normal(size=1 << n)
            weights = 1 << np.arange(n)

            def fn(coalitions, v=v, weights=weights):
                return v[np.asarray(coalitions, dtype=bool) @ weights]

            ec = exact.ExactComputer(fn, n_players=n)
            ours = {
                "Moebius": mobius_dividends(v, n),
                "SII": shapley_interaction_index(v, n),
                "Co-Moebius": interaction_effects(v, n),
            }
            for index, mat in ours.items():
                theirs = ec(index=index, order=2)
                for i, j in itertools.combinations(range(n), 2):
                    assert mat[i, j] == pytest.approx(theirs[(i, j)], abs=1e-12), (index, n, i, j)


def test_attribute_reports_every_interaction_with_an_interval():
    """Example-level data with one synergistic pair; the bootstrap intervals cover the truth."""
    rng = np.random.default_rng(3)
    n_ex = 2000
    base = rng.random(n_ex) < 0.6
    # examples 'fixed' only when a and b are both on (a pure pair synergy of +5 points)
    pair_fix = (~base) & (rng.random(n_ex) < 0.125)

    def evaluate(configs):
        return [np.where(pair_fix & c[0] & c[1], True, base).astype(float) for c in configs]

    m = attribute(evaluate, ["a", "b", "c"], CounterfactualConfig(strategy="full_factorial", seed=1))
    ab, ac = ("a", "b"), ("a", "c")
    gain = pair_fix.mean()
    assert m.synergy_dividends[ab] == pytest.approx(gain) and m.interaction_index[ab] == pytest.approx(gain)
    assert m.interaction_effects[ab] == pytest.approx(gain), "removal interaction (others on)"
    for lo, hi in (
        (m.synergy_ci_low, m.synergy_ci_high),
        (m.interaction_index_ci_low, m.interaction_index_ci_high),
        (m.removal_interaction_ci_low, m.removal_interaction_ci_high),
    ):
        assert lo[ab] < gain < hi[ab] and lo[ab] > 0, "the synergy is resolved"
        assert lo[ac] == hi[ac] == 0.0, "no discordant example for a-c: a zero-width interval at 0"
    # an ablation-only run has no Moebius dividends (the pair-on configurations are missing)
    m = attribute(evaluate, ["a", "b", "c"], CounterfactualConfig(strategy="ablation_only"))
    assert m.synergy_dividends is None and m.synergy_ci_low is None
