"""Tests for karn_otel.counterfactual: Shapley math, the sampler, attribute(), calibration.

Games are built from Harsanyi dividends: ``v(S) = sum over T in S of d_T``. Every game has a
unique dividend representation, and the Shapley value and the pairwise interaction index
have closed forms in it (``phi_i = sum_{T contains i} d_T / |T|``,
``I_ij = sum_{T contains i, j} d_T / (|T| - 1)``), which gives exact expected values.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from karn_otel import codec
from karn_otel.config import CounterfactualConfig
from karn_otel.contracts import CounterfactualMatrix, ShapleyEstimate
from karn_otel.counterfactual import (
    EXACT_ALGORITHM,
    KERNEL_ALGORITHM,
    ConfigEvaluation,
    attribute,
    full_factorial_cost,
    interaction_effects,
    marginal_contributions,
    sampling_cost_bound,
    seed_helps,
    shapley_exact,
    shapley_interaction_index,
    shapley_permutation_antithetic,
    student_t_cdf,
    student_t_ppf,
)

# --------------------------------------------------------------------------- helpers


def game_from_dividends(n: int, dividends: dict[int, float]) -> np.ndarray:
    """Game values indexed by bitmask from Harsanyi dividends keyed by bitmask."""
    masks = np.arange(1 << n)
    v = np.zeros(1 << n)
    for t, d in dividends.items():
        v[(masks & t) == t] += d
    return v


def closed_form_shapley(n: int, dividends: dict[int, float]) -> np.ndarray:
    phi = np.zeros(n)
    for t, d in dividends.items():
        members = [i for i in range(n) if t >> i & 1]
        for i in members:
            phi[i] += d / len(members)
    return phi


def closed_form_sii(n: int, dividends: dict[int, float]) -> np.ndarray:
    out = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i + 1, n):
            pair = (1 << i) | (1 << j)
            out[i, j] = out[j, i] = sum(d / (bin(t).count("1") - 1) for t, d in dividends.items() if t & pair == pair)
    return out


def random_dividend_game(n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[int, float]]:
    dividends = {t: float(rng.normal()) for t in range(1, 1 << n)}
    return game_from_dividends(n, dividends), dividends


def config_of(mask: int, n: int) -> tuple[bool, ...]:
    return tuple(bool(mask >> i & 1) for i in range(n))


def mask_of(config: tuple[bool, ...]) -> int:
    return sum(1 << i for i, on in enumerate(config) if on)


def deterministic_evaluate(v: np.ndarray, n_examples: int = 1000):
    """An evaluate() whose accuracy for each configuration is v[mask] (rounded to 1/n_examples)."""

    def evaluate(configs):
        out = []
        for c in configs:
            k = int(round(v[mask_of(c)] * n_examples))
            out.append(np.r_[np.ones(k), np.zeros(n_examples - k)])
        return out

    return evaluate


game_arrays = st.integers(min_value=1, max_value=5).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.lists(st.floats(-10, 10, allow_nan=False), min_size=1 << n, max_size=1 << n).map(np.array),
    )
)


# --------------------------------------------------------------------------- exact Shapley: axioms


@settings(max_examples=60, deadline=None)
@given(game_arrays)
def test_efficiency(game):
    n, v = game
    phi = shapley_exact(v, n)
    assert phi.sum() == pytest.approx(v[-1] - v[0], abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(game_arrays, st.data())
def test_symmetry(game, data):
    n, v = game
    if n < 2:
        return
    i, j = data.draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))
    swap = np.array([_swap_bits(m, i, j) for m in range(1 << n)])
    sym = v + v[swap]  # v'(S) = v(S) + v(swap(S)): i and j are interchangeable in v'
    phi = shapley_exact(sym, n)
    assert phi[i] == pytest.approx(phi[j], abs=1e-9)


def _swap_bits(m: int, i: int, j: int) -> int:
    bi, bj = m >> i & 1, m >> j & 1
    if bi != bj:
        m ^= (1 << i) | (1 << j)
    return m


@settings(max_examples=60, deadline=None)
@given(game_arrays, st.data())
def test_null_player(game, data):
    n, v = game
    k = data.draw(st.integers(0, n - 1))
    null = v[np.arange(1 << n) & ~(1 << k)]  # v'(S) = v(S without k): k never changes the value
    phi = shapley_exact(null, n)
    assert phi[k] == pytest.approx(0.0, abs=1e-9)
    if n >= 2:
        sii = shapley_interaction_index(null, n)
        assert np.allclose(np.delete(sii[k], k), 0.0, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(game_arrays, st.floats(-3, 3), st.floats(-3, 3), st.data())
def test_linearity(game, a, b, data):
    n, v = game
    w = np.array(data.draw(st.lists(st.floats(-10, 10), min_size=1 << n, max_size=1 << n)))
    assert np.allclose(shapley_exact(a * v + b * w, n), a * shapley_exact(v, n) + b * shapley_exact(w, n), atol=1e-8)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_matches_harsanyi_closed_forms(n, seed):
    v, dividends = random_dividend_game(n, np.random.default_rng(seed))
    assert np.allclose(shapley_exact(v, n), closed_form_shapley(n, dividends), atol=1e-9)
    assert np.allclose(shapley_interaction_index(v, n), closed_form_sii(n, dividends), atol=1e-9, equal_nan=True)


def test_batched_games_match_one_at_a_time():
    rng = np.random.default_rng(3)
    v = rng.normal(size=(16, 5))
    batched = shapley_exact(v, 4)
    assert batched.shape == (4, 5)
    for k in range(5):
        assert np.allclose(batched[:, k], shapley_exact(v[:, k], 4))


# --------------------------------------------------------------------------- standard games


def test_additive_game():
    a = [0.3, -0.1, 0.05, 0.2]
    v = game_from_dividends(4, {1 << i: ai for i, ai in enumerate(a)})
    assert np.allclose(shapley_exact(v, 4), a)
    sii = shapley_interaction_index(v, 4)
    assert np.allclose(sii[~np.eye(4, dtype=bool)], 0.0)
    assert np.allclose(interaction_effects(v, 4)[~np.eye(4, dtype=bool)], 0.0)
    assert np.allclose(marginal_contributions(v, 4), a)


def test_pairwise_game():
    b = {(0, 1): 0.4, (1, 2): -0.2, (0, 3): 0.1}
    v = game_from_dividends(4, {(1 << i) | (1 << j): bij for (i, j), bij in b.items()})
    expected_phi = np.zeros(4)
    for (i, j), bij in b.items():  # a pair's synergy is split equally between its members
        expected_phi[i] += bij / 2
        expected_phi[j] += bij / 2
    assert np.allclose(shapley_exact(v, 4), expected_phi)
    sii = shapley_interaction_index(v, 4)
    for i in range(4):
        for j in range(i + 1, 4):
            assert sii[i, j] == pytest.approx(b.get((i, j), 0.0))
            # With only pairwise terms the full-configuration interaction equals the pair term.
            assert interaction_effects(v, 4)[i, j] == pytest.approx(b.get((i, j), 0.0))


@pytest.mark.parametrize("carrier", [(0,), (0, 2), (1, 2, 3), (0, 1, 2, 3, 4)])
def test_unanimity_game(carrier):
    n = 5
    t = sum(1 << i for i in carrier)
    v = game_from_dividends(n, {t: 1.0})
    phi = shapley_exact(v, n)
    for i in range(n):
        assert phi[i] == pytest.approx(1 / len(carrier) if i in carrier else 0.0)
    sii = shapley_interaction_index(v, n)
    for i in range(n):
        for j in range(i + 1, n):
            expected = 1 / (len(carrier) - 1) if i in carrier and j in carrier else 0.0
            assert sii[i, j] == pytest.approx(expected)


def _weighted_majority(quota: float, weights: list[float]) -> np.ndarray:
    n = len(weights)
    return np.array([float(sum(w for i, w in enumerate(weights) if m >> i & 1) >= quota) for m in range(1 << n)])


def test_weighted_majority_games():
    # [3; 2, 1, 1]: the big player is pivotal in 4 of 6 orders.
    v = _weighted_majority(3, [2, 1, 1])
    assert np.allclose(shapley_exact(v, 3), [2 / 3, 1 / 6, 1 / 6])
    # Dividends d{0,1} = d{0,2} = 1, d{0,1,2} = -1, so I_01 = I_02 = 1 - 1/2, I_12 = -1/2.
    sii = shapley_interaction_index(v, 3)
    assert sii[0, 1] == pytest.approx(0.5) and sii[0, 2] == pytest.approx(0.5) and sii[1, 2] == pytest.approx(-0.5)
    # [51; 49, 48, 3]: any two form a majority, so the weights do not matter.
    assert np.allclose(shapley_exact(_weighted_majority(51, [49, 48, 3]), 3), [1 / 3] * 3)
    # [4; 3, 1, 1, 1] (n = 4): the big player needs any one other; phi_0 = 3/4.
    assert np.allclose(shapley_exact(_weighted_majority(4, [3, 1, 1, 1]), 4), [3 / 4, 1 / 12, 1 / 12, 1 / 12])


def test_glove_game():
    def glove(left: set[int], right: set[int], n: int) -> np.ndarray:
        return np.array(
            [min(sum(m >> i & 1 for i in left), sum(m >> i & 1 for i in right)) for m in range(1 << n)], dtype=float
        )

    # Two left gloves, one right: the scarce right glove takes 2/3.
    v = glove({0, 1}, {2}, 3)
    assert np.allclose(shapley_exact(v, 3), [1 / 6, 1 / 6, 2 / 3])
    sii = shapley_interaction_index(v, 3)
    assert sii[0, 2] == pytest.approx(0.5) and sii[1, 2] == pytest.approx(0.5)
    assert sii[0, 1] == pytest.approx(-0.5)  # two left gloves are substitutes
    # Balanced market: everyone gets 1/2.
    assert np.allclose(shapley_exact(glove({0, 1}, {2, 3}, 4), 4), [0.5] * 4)


# --------------------------------------------------------------------------- pure-function inputs


def test_mapping_and_array_inputs_agree():
    rng = np.random.default_rng(0)
    v, _ = random_dividend_game(3, rng)
    mapping = {config_of(m, 3): float(v[m]) for m in range(8)}
    assert np.allclose(shapley_exact(mapping, 3), shapley_exact(v, 3))
    assert np.allclose(shapley_interaction_index(mapping, 3), shapley_interaction_index(v, 3), equal_nan=True)
    assert np.allclose(marginal_contributions(mapping, 3), marginal_contributions(v, 3))


def test_partial_mapping_gives_what_it_can():
    full = (True, True, True)
    ablation = {
        full: 0.9,
        (False, True, True): 0.8,
        (True, False, True): 0.85,
        (True, True, False): 0.9,
        (False, False, False): 0.5,
    }
    assert np.allclose(marginal_contributions(ablation, 3), [0.1, 0.05, 0.0])
    assert np.isnan(interaction_effects(ablation, 3)).all()  # pair-off configurations are missing
    only_full = {full: 0.9}
    assert np.isnan(marginal_contributions(only_full, 3)).all()
    with pytest.raises(ValueError, match="incomplete"):
        shapley_exact(ablation, 3)


def test_pure_function_input_errors():
    with pytest.raises(ValueError, match="length 2, expected 3"):
        shapley_exact({(True, False): 1.0}, 3)
    with pytest.raises(ValueError, match="length"):
        marginal_contributions({(True,): 1.0, (True, True): 0.5}, 2)
    with pytest.raises(ValueError, match="2\\*\\*n"):
        shapley_exact(np.zeros(7), 3)
    with pytest.raises(ValueError, match="finite"):
        shapley_exact(np.array([0.0, np.nan]), 1)
    with pytest.raises(ValueError, match="finite"):
        interaction_effects({(True, True): float("inf"), (False, True): 0.0}, 2)
    with pytest.raises(ValueError, match="n"):
        shapley_exact(np.zeros(1), 0)
    with pytest.raises(ValueError, match="n_permutations"):
        shapley_permutation_antithetic(lambda c: 0.0, 3, 1)
    with pytest.raises(ValueError, match="non-finite"):
        shapley_permutation_antithetic(lambda c: float("nan"), 3, 2)


def test_cost_model():
    assert full_factorial_cost(4) == 16
    assert sampling_cost_bound(8, 20, with_ablation_core=False) == 20 * 7 + 2
    assert sampling_cost_bound(8, 20) == 8 + 2 + 20 * 6
    assert sampling_cost_bound(3, 20) == 8  # never more than the full factorial


# --------------------------------------------------------------------------- Student t


@pytest.mark.parametrize(
    "p, df, expected",
    [
        (0.975, 1, 12.706204736),
        (0.975, 2, 4.302652730),
        (0.975, 10, 2.228138852),
        (0.975, 30, 2.042272456),
        (0.975, math.inf, 1.959963985),
        (0.995, 5, 4.032142984),
        (0.95, 199, 1.652546747),
        (0.025, 4, -2.776445105),
    ],
)
def test_student_t_quantiles(p, df, expected):
    assert student_t_ppf(p, df) == pytest.approx(expected, abs=1e-8)
    assert student_t_cdf(student_t_ppf(p, df), df) == pytest.approx(p, abs=1e-12)


def test_student_t_fractional_df_is_between_neighbours():
    assert student_t_ppf(0.975, 3) > student_t_ppf(0.975, 3.5) > student_t_ppf(0.975, 4)


# --------------------------------------------------------------------------- antithetic sampler


def test_antithetic_sampler_is_unbiased():
    # One antithetic pair per seed, 3000 seeds: the mean must match the exact value within
    # 4.5 standard errors (per player; the seeds are fixed so this is deterministic).
    n = 6
    v, _ = random_dividend_game(n, np.random.default_rng(42))
    exact = shapley_exact(v, n)
    fn = lambda c: v[mask_of(c)]  # noqa: E731
    runs = np.array([shapley_permutation_antithetic(fn, n, 2, seed)[0] for seed in range(3000)])
    se = runs.std(axis=0, ddof=1) / math.sqrt(len(runs))
    assert np.all(np.abs(runs.mean(axis=0) - exact) <= 4.5 * se)
    assert np.all(se > 0)  # the game has interactions, so single pairs do vary


def test_sampler_standard_errors_match_spread():
    n = 6
    v, _ = random_dividend_game(n, np.random.default_rng(7))
    fn = lambda c: v[mask_of(c)]  # noqa: E731
    out = [shapley_permutation_antithetic(fn, n, 20, seed) for seed in range(400)]
    means = np.array([o[0] for o in out])
    reported = np.array([o[1] for o in out]).mean(axis=0)
    assert all(o[2] == 20 for o in out)
    assert np.allclose(reported, means.std(axis=0, ddof=1), rtol=0.2)


def test_sampler_memoises_and_is_exact_on_additive_games():
    calls: list[tuple[bool, ...]] = []
    a = np.array([0.1, 0.2, -0.3, 0.4, 0.0])
    v = game_from_dividends(5, {1 << i: ai for i, ai in enumerate(a)})

    def fn(c):
        calls.append(c)
        return v[mask_of(c)]

    means, se, n_samples = shapley_permutation_antithetic(fn, 5, 21, np.random.default_rng(0))
    assert n_samples == 20  # odd counts round down to whole pairs
    assert np.allclose(means, a) and np.allclose(se, 0.0)
    assert len(calls) == len(set(calls)) <= sampling_cost_bound(5, 20, with_ablation_core=False)
    one_pair = shapley_permutation_antithetic(fn, 5, 2, 0)
    assert np.isnan(one_pair[1]).all()  # one pair: no spread to estimate an error from


# --------------------------------------------------------------------------- attribute(): strategies

# The spec's 3-slot example table ("Counterfactual Capture"), as percent.
SPEC_TABLE = {"000": 62.3, "001": 64.1, "010": 63.8, "011": 65.2, "100": 63.5, "101": 65.8, "110": 64.9, "111": 66.4}


def spec_evaluate(calls: list):
    def evaluate(configs):
        calls.append(list(configs))
        out = []
        for c in configs:
            k = round(SPEC_TABLE["".join("1" if b else "0" for b in c)] * 10)
            correct = np.r_[np.ones(k), np.zeros(1000 - k)]
            out.append(ConfigEvaluation(correct=correct, loss=1.0 - correct))
        return out

    return evaluate


def test_full_factorial_on_the_spec_table():
    calls: list = []
    m = attribute(spec_evaluate(calls), ["early", "mid", "late"], CounterfactualConfig(), epoch=7)
    assert len(calls) == 1 and len(calls[0]) == 8  # one batched call with all 2^3 configurations
    assert m.strategy == "full_factorial" and m.n_evaluations == 8 and not m.partial and m.epoch == 7
    assert [r.config for r in m.configs][:2] == [(False, False, False), (False, False, True)]
    assert m.configs[-1].val_accuracy == pytest.approx(0.664)
    assert m.configs[-1].alpha_settings == {"early": 1.0, "mid": 1.0, "late": 1.0}
    assert m.configs[0].val_loss == pytest.approx(1 - 0.623)
    # Removal cost: acc(111) - acc(011) etc., as fractions.
    assert m.marginal_contributions == pytest.approx({"early": 0.012, "mid": 0.006, "late": 0.015})
    # Inclusion-exclusion at the full configuration: 66.4 - 65.2 - 65.8 + 64.1 points.
    assert m.interaction_effects[("early", "mid")] == pytest.approx(-0.005)
    phi = {s: e.mean for s, e in m.shapley_values.items()}
    assert sum(phi.values()) == pytest.approx(0.664 - 0.623)  # efficiency
    assert all(e.algorithm == EXACT_ALGORITHM and e.n_samples == 200 for e in m.shapley_values.values())
    assert all(e.ci_low < e.mean < e.ci_high and e.std > 0 for e in m.shapley_values.values())
    assert set(m.interaction_index) == {("early", "mid"), ("early", "late"), ("mid", "late")}


def test_on_alphas_records_the_blend_an_on_slot_was_evaluated_at():
    """A caller whose "on" seed runs mid-blend says so; the matrix then records that alpha for
    every configuration where the slot is on (off stays 0.0), and nothing else changes."""
    plain = attribute(spec_evaluate([]), ["early", "mid", "late"], CounterfactualConfig(), epoch=7)
    m = attribute(spec_evaluate([]), ["early", "mid", "late"], CounterfactualConfig(), epoch=7, on_alphas={"mid": 0.4})
    for r in m.configs:
        assert r.alpha_settings == {
            "early": float(r.config[0]),
            "mid": 0.4 if r.config[1] else 0.0,
            "late": float(r.config[2]),
        }
    assert [r.val_accuracy for r in m.configs] == [r.val_accuracy for r in plain.configs]
    assert m.shapley_values == plain.shapley_values and m.marginal_contributions == plain.marginal_contributions


def test_matrix_is_a_valid_contract_and_round_trips():
    m = attribute(spec_evaluate([]), ["early", "mid", "late"], CounterfactualConfig())
    again = codec.from_json(CounterfactualMatrix, codec.to_json(m))
    assert codec.to_json(again) == codec.to_json(m)
    assert type(m.n_evaluations) is int and type(m.elapsed_s) is float
    assert all(type(b) is bool for r in m.configs for b in r.config)
    assert all(type(x) is float for x in m.marginal_contributions.values())
    assert all(type(getattr(e, f)) is float for e in m.shapley_values.values() for f in ("mean", "std", "ci_low"))


def test_plain_arrays_mean_unknown_loss_and_results_are_seeded():
    v = np.array([0.5, 0.6, 0.55, 0.7])
    ev = deterministic_evaluate(v)
    m = attribute(ev, ["a", "b"], CounterfactualConfig(seed=3))
    assert all(math.isnan(r.val_loss) for r in m.configs)
    again = attribute(ev, ["a", "b"], CounterfactualConfig(seed=3))
    assert again.shapley_values == m.shapley_values


def test_ablation_only():
    n = 4
    v, _ = random_dividend_game(n, np.random.default_rng(1))
    v = 0.5 + 0.05 * v / np.abs(v).max()
    calls: list = []

    def ev(configs):
        calls.append(configs)
        return deterministic_evaluate(v)(configs)

    m = attribute(ev, list("abcd"), CounterfactualConfig(strategy="ablation_only"))
    assert len(calls) == 1 and m.n_evaluations == n + 2
    assert m.shapley_values is None and m.interaction_index is None and m.interaction_effects == {}
    assert m.marginal_contributions == pytest.approx(
        {s: round(v[15] * 1000) / 1000 - round(v[15 ^ (1 << i)] * 1000) / 1000 for i, s in enumerate("abcd")}
    )
    # With two slots the ablation set is the whole factorial, so everything is identified.
    m2 = attribute(
        deterministic_evaluate(np.array([0.5, 0.6, 0.55, 0.7])),
        ["a", "b"],
        CounterfactualConfig(strategy="ablation_only"),
    )
    assert m2.n_evaluations == 4 and m2.shapley_values["a"].algorithm == EXACT_ALGORITHM
    assert m2.interaction_effects[("a", "b")] == pytest.approx(0.7 - 0.55 - 0.6 + 0.5)


def test_shapley_sampling_strategy():
    n = 7
    v, _ = random_dividend_game(n, np.random.default_rng(5))
    v = 0.6 + 0.1 * v / np.abs(v).max()
    requested: list = []
    calls = 0

    def ev(configs):
        nonlocal calls
        calls += 1
        requested.extend(configs)
        return deterministic_evaluate(v, 2000)(configs)

    cfg = CounterfactualConfig(shapley_samples=20)
    m = attribute(ev, [f"s{i}" for i in range(n)], cfg)
    assert m.strategy == "shapley" and not m.partial
    assert len(requested) == len(set(requested)) == m.n_evaluations  # memo: never twice
    # the budget, used up to the last pair (a unit is a coalition and its complement)
    assert sampling_cost_bound(n, 20) - 1 <= m.n_evaluations <= sampling_cost_bound(n, 20) == 7 + 2 + 20 * 5
    assert calls <= 1 + 16  # the ablation core, then at most 16 chunks
    exact = shapley_exact(np.round(v * 2000) / 2000, n)
    for i in range(n):
        est = m.shapley_values[f"s{i}"]
        assert est.algorithm == KERNEL_ALGORITHM and est.n_samples == m.n_evaluations
        assert est.ci_low <= est.mean <= est.ci_high
        assert abs(est.mean - exact[i]) < 5 * est.std
    assert set(m.marginal_contributions) == {f"s{i}" for i in range(n)}
    assert m.interaction_index is None


def test_sampling_that_covers_every_configuration_reports_exact_values():
    v = np.array([0.5, 0.6, 0.55, 0.7, 0.52, 0.61, 0.58, 0.75])
    m = attribute(deterministic_evaluate(v), list("abc"), CounterfactualConfig(strategy="shapley"))
    assert m.n_evaluations == 8
    assert all(e.algorithm == EXACT_ALGORITHM for e in m.shapley_values.values())
    assert m.interaction_index is not None


def test_auto_strategy_switches_above_the_threshold():
    # Karn's default threshold is 5 (see CounterfactualConfig): exact at n=5, sampling at n=6.
    v5 = np.full(32, 0.5)
    assert attribute(deterministic_evaluate(v5), list("abcde"), CounterfactualConfig()).strategy == "full_factorial"
    v6 = np.full(64, 0.5)
    assert attribute(deterministic_evaluate(v6), list("abcdef"), CounterfactualConfig()).strategy == "shapley"
    forced = attribute(deterministic_evaluate(v6), list("abcdef"), CounterfactualConfig(force_full_factorial=True))
    assert forced.strategy == "full_factorial" and forced.n_evaluations == 64


# --------------------------------------------------------------------------- budgets


def test_max_configurations_truncates_full_factorial_in_priority_order():
    v, _ = random_dividend_game(4, np.random.default_rng(2))
    v = 0.5 + 0.01 * v
    m = attribute(deterministic_evaluate(v), list("abcd"), CounterfactualConfig(max_configurations=5))
    assert m.partial and "max_configurations=5" in m.partial_reason and "5 of 16" in m.partial_reason
    assert m.n_evaluations == 5
    assert set(m.marginal_contributions) == set("abcd")  # full + single-offs come first
    assert m.shapley_values is None and m.interaction_index is None


def test_max_configurations_of_one_does_not_raise():
    m = attribute(deterministic_evaluate(np.full(8, 0.5)), list("abc"), CounterfactualConfig(max_configurations=1))
    assert m.partial and m.n_evaluations == 1 and m.marginal_contributions == {} and m.shapley_values is None
    assert m.configs[0].config == (True, True, True)


def test_capped_factorial_over_many_slots_does_not_enumerate_them_all():
    slots = [f"s{i}" for i in range(30)]
    cfg = CounterfactualConfig(force_full_factorial=True, max_configurations=100)
    m = attribute(lambda cs: [np.ones(5)] * len(cs), slots, cfg)  # 2**30 masks would not fit in memory
    assert m.partial and m.n_evaluations == 100 and "100 of 1073741824" in m.partial_reason


def test_max_configurations_is_the_sampling_budget():
    n = 8
    v, _ = random_dividend_game(n, np.random.default_rng(9))
    v = 0.5 + 0.02 * v / np.abs(v).max()
    slots = [f"s{i}" for i in range(n)]
    full = attribute(deterministic_evaluate(v), slots, CounterfactualConfig(shapley_samples=20, seed=1))
    capped = attribute(
        deterministic_evaluate(v), slots, CounterfactualConfig(shapley_samples=20, seed=1, max_configurations=40)
    )
    assert capped.partial and "max_configurations=40" in capped.partial_reason
    assert "sampled within 40 of the planned 130 configurations" in capped.partial_reason
    assert 39 <= capped.n_evaluations <= 40 and 129 <= full.n_evaluations <= 130
    exact = shapley_exact(v, n)
    for m in (capped, full):
        ests = [m.shapley_values[s] for s in slots]
        assert all(e.n_samples == m.n_evaluations and e.ci_low < e.mean < e.ci_high for e in ests)
    err = {
        id(m): np.sqrt(np.mean([(m.shapley_values[s].mean - exact[i]) ** 2 for i, s in enumerate(slots)]))
        for m in (capped, full)
    }
    assert err[id(full)] < err[id(capped)], "more evaluations, smaller error"


@pytest.mark.parametrize("n", [3, 6, 10])
def test_every_budget_from_n_plus_1_gives_an_estimate(n):
    """Never "no estimate": from n + 1 distinct evaluations up there are Shapley values, each
    with a finite interval (also where some coalition size is unsampled), and the intervals
    hold the exact values about as often as they claim."""
    v, _ = random_dividend_game(n, np.random.default_rng(n))
    v = 0.5 + 0.2 * v / np.abs(v).max()
    exact = shapley_exact(v, n)
    slots = [f"s{i}" for i in range(n)]
    hits = total = 0
    for budget in range(n + 1, min(1 << n, 6 * n) + 1):
        cfg = CounterfactualConfig(strategy="shapley", shapley_samples=200, max_configurations=budget, seed=budget)
        m = attribute(deterministic_evaluate(v), slots, cfg)
        assert m.n_evaluations <= budget and set(m.shapley_values) == set(slots), budget
        means = np.array([m.shapley_values[s].mean for s in slots])
        assert means.sum() == pytest.approx(exact.sum(), abs=2e-3), "efficiency (up to the examples rounding v)"
        assert all(math.isfinite(m.shapley_values[s].ci_low) for s in slots), budget
        hits += sum(m.shapley_values[s].ci_low <= x <= m.shapley_values[s].ci_high for s, x in zip(slots, exact))
        total += n
    assert hits / total >= 0.85, f"{hits} of {total} intervals hold the exact value"


def _slow(evaluate, seconds: float):
    def ev(configs):
        time.sleep(seconds)
        return evaluate(configs)

    return ev


def test_timeout_stops_full_factorial_between_chunks():
    ev = _slow(deterministic_evaluate(np.full(32, 0.5)), 0.05)
    m = attribute(ev, list("abcde"), CounterfactualConfig(strategy="full_factorial", timeout_seconds=0.02))
    assert m.partial and "timeout_seconds=0.02" in m.partial_reason
    assert m.n_evaluations == 5 + 2  # the ablation core came first, then the clock ran out
    assert set(m.marginal_contributions) == set("abcde") and m.shapley_values is None


def test_timeout_stops_sampling_and_keeps_completed_pairs():
    n = 8
    v, _ = random_dividend_game(n, np.random.default_rng(4))
    v = 0.5 + 0.02 * v / np.abs(v).max()
    ev = _slow(deterministic_evaluate(v), 0.03)
    m = attribute(ev, [f"s{i}" for i in range(n)], CounterfactualConfig(shapley_samples=40, timeout_seconds=0.15))
    assert m.partial and "timeout_seconds=0.15" in m.partial_reason and "planned configurations" in m.partial_reason
    est = next(iter(m.shapley_values.values()))
    assert n + 2 <= est.n_samples == m.n_evaluations < 250


# --------------------------------------------------------------------------- bad input


def test_bad_slot_ids():
    ev = deterministic_evaluate(np.full(4, 0.5))
    with pytest.raises(ValueError, match="at least one slot"):
        attribute(ev, [], CounterfactualConfig())
    with pytest.raises(ValueError, match="duplicate"):
        attribute(ev, ["a", "a"], CounterfactualConfig())
    with pytest.raises(ValueError, match="not one string"):
        attribute(ev, "ab", CounterfactualConfig())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda cs: [np.ones(10)] * (len(cs) - 1), "returned 3 results for 4"),
        (lambda cs: [np.ones(10) for _ in cs[:-1]] + [np.ones(11)], "11 examples, expected 10"),
        (lambda cs: [np.ones((10, 2)) for _ in cs], "1-D"),
        (lambda cs: [np.r_[np.ones(9), np.nan] for _ in cs], "non-finite"),
        (lambda cs: [np.full(10, 2.0) for _ in cs], "0/1"),
        (lambda cs: [np.array(["x"] * 10) for _ in cs], "numeric"),
        (lambda cs: [None for _ in cs], "numeric"),
        (lambda cs: [np.ones(0) for _ in cs], "no validation examples"),
        (lambda cs: [ConfigEvaluation(np.ones(10), np.ones(9)) for _ in cs], "loss of"),
    ],
)
def test_bad_evaluate_results(make, match):
    with pytest.raises(ValueError, match=match):
        attribute(make, ["a", "b"], CounterfactualConfig())


def test_example_count_must_match_across_calls():
    sizes = iter([10, 11, 11, 11, 11, 11, 11, 11, 11, 11])

    def ev(configs):
        n = next(sizes)
        return [np.ones(n) for _ in configs]

    with pytest.raises(ValueError, match="same validation examples"):
        attribute(ev, list("abcde"), CounterfactualConfig(strategy="shapley"))


def test_non_finite_loss_is_reported_not_rejected():
    def ev(configs):
        return [
            ConfigEvaluation(np.ones(4), np.array([1.0, 1.0, np.inf, 1.0]) if not any(c) else np.ones(4))
            for c in configs
        ]

    m = attribute(ev, ["a"], CounterfactualConfig())
    assert math.isinf(m.configs[0].val_loss) and m.configs[1].val_loss == 1.0


def test_module_imports_neither_torch_nor_opentelemetry():
    import ast
    from pathlib import Path

    import karn_otel.counterfactual as cf

    tree = ast.parse(Path(cf.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"torch", "opentelemetry", "scipy"}


# --------------------------------------------------------------------------- the claim gate


def test_seed_helps():
    assert seed_helps(ShapleyEstimate(0.02, 0.005, 20, ci_low=0.01, ci_high=0.03))
    assert not seed_helps(ShapleyEstimate(0.02, 0.02, 20, ci_low=-0.01, ci_high=0.05))
    assert not seed_helps(ShapleyEstimate(0.02, 0.0, 20, ci_low=0.0, ci_high=0.04))
    assert not seed_helps(ShapleyEstimate(0.02, float("nan"), 2))  # undefined interval: no claim


# --------------------------------------------------------------------------- calibration
#
# Validation accuracies are simulated from known per-configuration probabilities p(S), so
# the true Shapley value (of the expected-accuracy game p) is known. Slot "c" has no effect
# at all. Coverage is pooled over slots; counting replications (not slot-replications) as
# the sample size is conservative. For R replications at a true coverage of 0.95 the
# observed rate has SD sqrt(0.95 * 0.05 / R): 0.0044 at R = 2500, so the band 0.93-0.97 is
# +-4.5 SD and a well-calibrated interval fails it with probability < 1e-5 (the seeds are
# fixed, so the test is deterministic anyway). A null slot is claimed (ci_low > 0) with
# probability 0.025 under a calibrated two-sided 95% interval; the SD of the claim rate is
# sqrt(0.025 * 0.975 / R) = 0.003, so 5% is > 8 SD above that.


def _p_of(config: tuple[bool, ...]) -> float:
    a, b, _ = (float(x) for x in config)
    return 0.55 + 0.08 * a + 0.05 * b + 0.04 * a * b


# Dividends 0.08 (a), 0.05 (b), 0.04 (a and b): the pair's synergy is split equally.
TRUE_PHI = {"a": 0.08 + 0.02, "b": 0.05 + 0.02, "c": 0.0}
N_EXAMPLES = 400


def _calibration(replications: int, correlated: bool, seed: int) -> tuple[list[bool], int]:
    rng = np.random.default_rng(seed)
    covered: list[bool] = []
    claims = 0
    for r in range(replications):
        u = rng.random(N_EXAMPLES)  # per-example "difficulty", shared by every configuration

        def evaluate(configs, u=u):
            if correlated:  # an example flips only when the configuration's p crosses its difficulty
                return [(u < _p_of(c)).astype(float) for c in configs]
            return [(rng.random(N_EXAMPLES) < _p_of(c)).astype(float) for c in configs]

        m = attribute(evaluate, ["a", "b", "c"], CounterfactualConfig(seed=r))
        for s, truth in TRUE_PHI.items():
            est = m.shapley_values[s]
            if correlated and s == "c":
                continue  # identical predictions: the interval is [0, 0] and covers trivially
            covered.append(est.ci_low <= truth <= est.ci_high)
        claims += seed_helps(m.shapley_values["c"])
    return covered, claims


def test_exact_intervals_are_calibrated_with_independent_noise():
    covered, claims = _calibration(2500, correlated=False, seed=2024)
    coverage = float(np.mean(covered))
    assert 0.93 <= coverage <= 0.97, coverage  # measured: 0.949
    assert claims / 2500 <= 0.05, claims  # measured: 0.026


def test_exact_intervals_are_calibrated_with_common_examples():
    # Measured coverage here is about 0.942: only the ~17% of examples whose difficulty lies
    # between two configurations' p ever flip, so the per-example scores are skewed and the
    # t interval runs slightly short (the Wald-interval effect). R = 3000 (SD 0.004) keeps
    # the 0.93 edge about 3 SD away.
    covered, claims = _calibration(3000, correlated=True, seed=99)
    coverage = float(np.mean(covered))
    assert 0.93 <= coverage <= 0.97, coverage
    assert claims == 0
