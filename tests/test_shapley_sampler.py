"""The shapley strategy's sampler: the stratified and regression-adjusted estimators, their
variance-weighted mix (``shapley_sampled_estimate``) and the honesty of its intervals.

The games are the benchmark's families (benchmarks/bench_shapley_sampling.py), with known
exact Shapley values; no validation noise here, so the interval is the sampling error alone.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from karn_otel.counterfactual import (
    kernel_shap_design,
    kernel_shap_solve,
    shapley_exact,
    shapley_regression_adjusted,
    shapley_sampled_estimate,
    shapley_stratified_solve,
    student_t_ppf,
)

_spec = importlib.util.spec_from_file_location(
    "bench_shapley_sampling", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_shapley_sampling.py"
)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _game(family: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    v = bench.make_game(family, n, rng)
    return v, shapley_exact(v, n)


@pytest.mark.parametrize("solve", [shapley_stratified_solve, shapley_regression_adjusted])
@pytest.mark.parametrize("family", bench.FAMILIES)
def test_exact_with_every_coalition(solve, family):
    n = 6
    v, exact = _game(family, n, 3)
    masks = list(range(1 << n))[::-1]
    est = solve(n, masks, v[masks][:, None])[:, 0]
    np.testing.assert_allclose(est, exact, atol=1e-10)


@pytest.mark.parametrize("family", bench.FAMILIES)
def test_efficiency_and_linearity_on_a_sampled_design(family):
    n, budget = 8, 40
    v, _ = _game(family, n, 5)
    masks, units = kernel_shap_design(n, budget, np.random.default_rng(1))
    other = np.random.default_rng(2).normal(size=1 << n)
    values = np.stack([v[masks], other[masks], v[masks] + 2.0 * other[masks]], axis=1)
    est, se, p, alpha = shapley_sampled_estimate(n, masks, values, units)
    assert 0.0 <= alpha <= 1.0 and p == len(units) >= 2
    gap = values[masks.index((1 << n) - 1)] - values[masks.index(0)]
    np.testing.assert_allclose(est.sum(axis=0), gap, atol=1e-10)  # efficiency, every column
    # one alpha (from column 0) for every column: the map is linear, as the bootstrap needs
    np.testing.assert_allclose(est[:, 2], est[:, 0] + 2.0 * est[:, 1], atol=1e-10)
    single = shapley_sampled_estimate(n, masks, values[:, :1], units)
    np.testing.assert_allclose(single[0][:, 0], est[:, 0], atol=1e-12)
    assert np.all(np.isfinite(se) & (se >= 0))


def _rel_rmse(estimator, family: str, n: int, budget: int, games: int) -> float:
    err = []
    for g in range(games):
        v, exact = _game(family, n, 100 + g)
        masks, units = kernel_shap_design(n, budget, np.random.default_rng(g))
        est = estimator(n, masks, v[masks][:, None], units)[:, 0]
        err.append(np.sum((est - exact) ** 2) / np.sum(exact**2))
    return math.sqrt(float(np.mean(err)))


def _kernel(n, masks, values, units):
    return kernel_shap_solve(n, masks, values)


def _mix(n, masks, values, units):
    return shapley_sampled_estimate(n, masks, values, units)[0]


def test_the_mix_beats_the_regression_on_high_order_games():
    # measured: 0.37 against 0.62 (n = 8, 4n)
    mix, kernel = (_rel_rmse(f, "sparse_high_order", 8, 32, 30) for f in (_mix, _kernel))
    assert mix < 0.8 * kernel, (mix, kernel)


def test_the_mix_keeps_the_regression_on_nearly_additive_games():
    mix, kernel = (_rel_rmse(f, "additive_noise", 8, 64, 30) for f in (_mix, _kernel))
    assert mix < 1.05 * kernel, (mix, kernel)


@pytest.mark.parametrize("family", bench.FAMILIES)
@pytest.mark.parametrize("mult", [4, 8])
def test_sampling_intervals_cover(family, mult):
    """95% intervals of the sampling error alone (no validation noise), 100 games x 8 players.

    Measured over 200 games (mix / the kernel regression's own jackknife before): 4n 0.92 /
    0.92 additive, 0.93 / 0.92 decaying, 0.99 / 0.95 sparse, 0.97 / 0.94 SOUM; 8n 0.96-0.99.
    """
    n, games = 8, 100
    hits = total = 0
    for g in range(games):
        v, exact = _game(family, n, 10_000 + 97 * g + n)
        masks, units = kernel_shap_design(n, mult * n, np.random.default_rng(g))
        est, se, p, _ = shapley_sampled_estimate(n, masks, v[masks][:, None], units)
        assert np.all(np.isfinite(se)), "every size is sampled from 4n on"
        q = student_t_ppf(0.975, p - 1)
        hits += int(np.sum(np.abs(est[:, 0] - exact) <= q * se))
        total += n
    coverage = hits / total
    assert coverage >= 0.90, coverage  # the 8 players of a game are correlated: SE ~0.01


def test_no_interval_while_a_size_is_unsampled():
    n = 10
    v, _ = _game("soum", n, 1)
    masks, units = kernel_shap_design(n, 2 * n, np.random.default_rng(0))
    est, se, _, _ = shapley_sampled_estimate(n, masks, v[masks][:, None], units)
    assert np.all(np.isfinite(est)) and np.all(np.isnan(se))


@pytest.mark.parametrize("n,budget", [(6, 20), (9, 60), (12, 150)])
def test_the_one_pass_estimators_equal_the_public_ones(n, budget):
    """The sampler solves its three estimators with one stratified pass (linearity); the same
    numbers as each estimator's definition computed on its own."""
    import karn_otel.counterfactual as cf

    masks, _ = cf.kernel_shap_design(n, budget, np.random.default_rng(n))
    values = np.random.default_rng(budget).uniform(size=(len(masks), 4))
    a, b, r = cf._three_estimators(n, masks, values)
    np.testing.assert_allclose(a, cf.shapley_regression_adjusted(n, masks, values), rtol=0, atol=1e-12)
    np.testing.assert_allclose(b, cf.shapley_stratified_solve(n, masks, values), rtol=0, atol=1e-12)
    np.testing.assert_allclose(r, cf.shapley_regression_observed(n, masks, values), rtol=0, atol=1e-12)
    # The definitions, independently: f the least-squares additive game through the coalitions
    # present, A = phi(f) + stratified(v - f), R = phi(f) + the exact Shapley value of the game
    # that is v - f where observed and 0 elsewhere.
    z = np.array([[(m >> i) & 1 for i in range(n)] for m in masks], dtype=float)
    design = np.hstack([np.ones((len(masks), 1)), z])
    beta = np.linalg.lstsq(design, values, rcond=None)[0]
    resid = values - design @ beta
    np.testing.assert_allclose(a, beta[1:] + cf.shapley_stratified_solve(n, masks, resid), rtol=0, atol=1e-10)
    table = np.zeros((1 << n, values.shape[1]))
    table[list(masks)] = resid
    np.testing.assert_allclose(r, beta[1:] + cf.shapley_exact(table, n), rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [3, 5, 7])
def test_the_observed_residual_estimator_is_exact_with_every_coalition_and_efficient(n):
    """shapley_regression_observed: the exact Shapley values when every coalition is present,
    and efficiency (sum = v(all on) - v(all off)) from a sample."""
    import karn_otel.counterfactual as cf

    rng = np.random.default_rng(n)
    v = rng.normal(size=(1 << n, 3))
    every = list(range(1 << n))
    np.testing.assert_allclose(cf.shapley_regression_observed(n, every, v), shapley_exact(v, n), atol=1e-10)
    masks, _ = cf.kernel_shap_design(n, 3 * n, rng)
    est = cf.shapley_regression_observed(n, masks, v[masks])
    np.testing.assert_allclose(est.sum(axis=0), v[(1 << n) - 1] - v[0], atol=1e-10)
