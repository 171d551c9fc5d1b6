"""Counterfactual attribution: which seed slots does validation accuracy depend on?

Karn switches seed slots on and off (alpha 1.0 or 0.0), re-runs validation, and attributes
the accuracy of the full configuration to the slots (spec "Counterfactual Capture", review
items P0 #3, P1 #4, P1 #5, P3 #15). What the numbers mean, and what they do not, is written
up in ``docs/counterfactual-validity.md``: in short, they measure *removal cost* at this
epoch, not what a slot contributed to training.

Conventions
-----------
* A **configuration** is a tuple of bools, one per slot in ``slot_ids`` order:
  ``(True, False, True)`` = first slot on, second off, third on.
* Internally a configuration is also a **bitmask**: bit ``i`` set means slot ``i`` is on,
  so ``(True, False, True)`` is ``0b101 = 5``. Arrays of game values are indexed by it.
* Accuracy is a fraction in [0, 1]; every attribution (removal cost, interaction, Shapley
  value) is a difference of accuracies, so it is a fraction in [-1, 1] (0.012 = 1.2 points).

Layout
------
The stateless math comes first and works on any cooperative game ``v(S)``:
:func:`shapley_exact`, :func:`shapley_interaction_index`, :func:`mobius_dividends`,
:func:`marginal_contributions`, :func:`interaction_effects` (the removal interaction),
the sampler's :func:`kernel_shap_design`, :func:`kernel_shap_solve`,
:func:`shapley_stratified_solve`, :func:`shapley_regression_adjusted` and their mix
:func:`shapley_sampled_estimate`, the reference
:func:`shapley_permutation_antithetic`, and the Student-t quantile :func:`student_t_ppf`.
The orchestration, :func:`attribute`, decides which configurations to evaluate, calls the
user's ``evaluate`` (memoised, batched, under the budgets), and fills a
:class:`~karn_otel.contracts.CounterfactualMatrix`. Claims ("seed X helps") are not made
here: :mod:`karn_otel.claims` makes them with a per-run false-claim rate <= 5%;
:func:`seed_helps` is only the descriptive per-epoch check.

Cost model (distinct validation passes per call, n active slots, m = shapley_samples)
-----------------------------------------------------------------------------------
* ``full_factorial``: ``2**n``. Exact Shapley values, Shapley interaction indices, Moebius
  dividends and removal interactions, each with a bootstrap interval.
* ``ablation_only``: ``n + 2`` (all on, all off, each slot off alone). Removal costs only;
  pairwise interactions only where the pair's configurations happen to exist (n <= 2).
* ``shapley``: a budget of ``min(2**n, n + 2 + m*(n-2))`` distinct configurations, or
  ``max_configurations`` when that is smaller (the run is then marked partial), spent by the
  paired kernel design (:func:`kernel_shap_design`): the ablation core first (it is part of
  the estimate), then whole border strata, then paired units; the estimate is
  :func:`shapley_sampled_estimate`. The budget is used to within
  one configuration (a unit is a coalition and its complement). The permutation sampler
  this replaces used the same number as an upper bound and fewer on average (99 of 256
  configurations at n = 8, m = 20, against 130 now); ``benchmarks/bench_shapley_sampling.py``
  compares the estimators at equal budgets.

The spec's ``full_factorial_max_seeds = 4`` is raised to 5 in Karn's default: at n = 5 the
sampling budget (``7 + 3m``) already exceeds the 32 configurations of the full factorial.
When a sampling budget covers all ``2**n`` configurations, :func:`attribute` reports the
exact values.

Uncertainty
-----------
Every configuration is evaluated on the same validation examples (common random numbers),
so differences between configurations are much less noisy than the accuracies themselves.
Two noise sources are reported, both in :class:`~karn_otel.contracts.ShapleyEstimate`:

* validation-set noise, by a bootstrap over examples (``bootstrap_samples`` resamples; one
  set of resampled indices is applied to every configuration, which keeps the correlation
  between configurations); for exact enumeration it is the only uncertainty. Every
  estimator here is linear in the game values, so each resample goes through the same map;
* sampling noise of the ``shapley`` strategy: the error of its (linear) estimate under an
  additive game plus independent noise, with the residual mean square of the additive fit
  as the noise variance and the coalitions not evaluated counted in (t with ``m - n - 1``
  degrees of freedom for m configurations; :func:`_residual_noise_se`), the part a
  delete-one-unit jackknife sees shrunk where that jackknife, on the fit's residual against
  random probe residuals, shows the residual to be structure the design cancels rather than
  noise (:func:`_jackknife_structure_ratio`). It exists at every
  budget from n + 1 up, including those where some coalition size is unsampled; at exactly
  n + 1 (no residual degree of freedom) it is the range the Shapley value can take with
  every unevaluated accuracy in [0, 1].

For sampling the two variances are added (the sources are independent; the sum is slightly
conservative) and the interval uses a Student-t quantile with Welch-Satterthwaite degrees of
freedom (``ShapleyEstimate.df``). Neither covers training-seed variance: see the validity
document.

This module imports numpy and the standard library only (no torch, no opentelemetry).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from karn_otel.config import CounterfactualConfig
from karn_otel.contracts import CounterfactualMatrix, CounterfactualResult, ShapleyEstimate

__all__ = [
    "EXACT_ALGORITHM",
    "KERNEL_ALGORITHM",
    "SAMPLING_ALGORITHM",
    "ConfigEvaluation",
    "Evaluate",
    "attribute",
    "full_factorial_cost",
    "interaction_effects",
    "kernel_shap_design",
    "kernel_shap_solve",
    "marginal_contributions",
    "mobius_dividends",
    "sampling_cost_bound",
    "seed_helps",
    "shapley_exact",
    "shapley_interaction_index",
    "shapley_permutation_antithetic",
    "shapley_regression_adjusted",
    "shapley_regression_observed",
    "shapley_sampled_estimate",
    "shapley_stratified_solve",
    "split_examples",
    "student_t_cdf",
    "student_t_ppf",
    "with_on_alphas",
]

EXACT_ALGORITHM = "exact_enumeration"
"""``ShapleyEstimate.algorithm`` when the value was computed from all ``2**n`` configurations."""

SAMPLING_ALGORITHM = "permutation_antithetic"
"""``ShapleyEstimate.algorithm`` of :func:`shapley_permutation_antithetic` (kept as a reference)."""

KERNEL_ALGORITHM = "kernel_shap_paired"
"""``ShapleyEstimate.algorithm`` of the shapley strategy: the paired, size-stratified kernel design
(:func:`kernel_shap_design`) and the variance-weighted mix of the regression-adjusted kernel
regression and the stratified estimator (:func:`shapley_sampled_estimate`); ``n_samples`` =
configurations used."""


# =========================================================================== data types


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is elementwise
class ConfigEvaluation:
    """The validation result of one configuration, per example.

    ``correct`` has shape ``(n_examples,)`` with 1.0 for a correct prediction and 0.0 for a
    wrong one (fractions in [0, 1] are accepted, e.g. token-level accuracy per sequence).
    ``loss`` is the per-example loss in the model's own units, or None when not measured.
    """

    correct: np.ndarray
    loss: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "correct", np.asarray(self.correct))
        if self.loss is not None:
            object.__setattr__(self, "loss", np.asarray(self.loss))


Evaluate = Callable[[list[tuple[bool, ...]]], Sequence[ConfigEvaluation | np.ndarray]]
"""``evaluate(configs)`` returns one result per configuration, in order, all on the same
validation examples. A plain array means per-example correctness with the loss unknown."""


# =========================================================================== game values


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (the number of players/slots) must be an int >= 1, got {n!r}")
    return int(n)


def _config_to_mask(config: Sequence[bool], n: int) -> int:
    if len(config) != n:
        raise ValueError(f"configuration {tuple(config)!r} has length {len(config)}, expected {n}")
    return sum(1 << i for i, on in enumerate(config) if on)


def _mask_to_config(mask: int, n: int) -> tuple[bool, ...]:
    return tuple(bool((mask >> i) & 1) for i in range(n))


FloatArray = npt.NDArray[np.float64]
"""A float64 array: game values, Shapley estimates, bootstrap accuracies."""
IntArray = npt.NDArray[np.int64]
"""An int64 array: bitmasks, popcounts, permutations."""


def _bit_rows(masks: Sequence[int] | IntArray, n: int) -> FloatArray:
    """The coalitions as 0/1 rows, shape ``(len(masks), n)``: column i is 1 where slot i is on."""
    m = np.asarray(masks, dtype=np.int64)
    return np.asarray((m[:, None] >> np.arange(n)) & 1, dtype=float)


def _shapley_weights(n: int) -> FloatArray:
    """``w[s] = s! (n-s-1)! / n! = 1 / (n C(n-1, s))`` for s = 0..n-1: the Shapley weight of a
    marginal contribution to a coalition of size s."""
    return np.array([1.0 / (n * math.comb(n - 1, s)) for s in range(n)])


def _popcount(masks: IntArray) -> IntArray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(masks).astype(np.int64)
    counts = np.zeros_like(masks)
    m = masks.copy()
    while np.any(m):
        counts += m & 1
        m >>= 1
    return counts


GameValues = Mapping[tuple[bool, ...], float] | np.ndarray
"""A game ``v``: a mapping from configuration tuples to values, or an array indexed by bitmask
(shape ``(2**n,)``, or ``(2**n, k)`` to evaluate k games at once, e.g. bootstrap replicates)."""


def _dense_values(values: GameValues, n: int) -> FloatArray:
    """All ``2**n`` values as a float array indexed by bitmask; ValueError if any is missing."""
    n = _check_n(n)
    if isinstance(values, Mapping):
        table = np.full(1 << n, np.nan)
        for config, value in values.items():
            table[_config_to_mask(config, n)] = float(value)
        missing = int(np.isnan(table).sum())
        if missing:
            raise ValueError(f"the game is incomplete: {missing} of {1 << n} configurations have no value")
    else:
        table = np.asarray(values, dtype=float)
        if table.ndim == 0 or table.shape[0] != 1 << n:
            raise ValueError(
                f"a value array for n={n} must have first dimension 2**n={1 << n}, got shape {table.shape}"
            )
    if not np.all(np.isfinite(table)):
        raise ValueError("game values must be finite")
    return table


def _value_getter(values: GameValues, n: int) -> Callable[[int], float | None]:
    """Look up a (scalar) value by bitmask; None when the configuration was not evaluated.

    A mapping is not densified, so a 30-slot ablation (32 configurations) stays cheap.
    """
    n = _check_n(n)
    if isinstance(values, Mapping):
        by_mask: dict[int, float] = {}
        for config, value in values.items():
            v = float(value)
            if not math.isfinite(v):
                raise ValueError(f"game value of {tuple(config)!r} is not finite: {v}")
            by_mask[_config_to_mask(config, n)] = v
        return by_mask.get
    table = _dense_values(values, n)
    if table.ndim != 1:
        raise ValueError(f"expected one game (shape ({1 << n},)), got shape {table.shape}")
    return lambda mask: float(table[mask])


def shapley_exact(values: GameValues, n: int) -> FloatArray:
    """Exact Shapley values by enumerating all ``2**n`` coalitions.

    ``phi_i = sum over S not containing i of |S|! (n-|S|-1)! / n! * (v(S + i) - v(S))``.
    Returns shape ``(n,)`` (or ``(n, k)`` for a ``(2**n, k)`` array of k games), in the
    units of ``v``. Efficiency holds: ``phi.sum() == v(all on) - v(all off)``.
    Cost O(n 2**n). Raises ValueError if a configuration is missing or a value not finite.
    """
    n = _check_n(n)
    table = _dense_values(values, n)
    masks = np.arange(1 << n, dtype=np.int64)
    sizes = _popcount(masks)
    weight = _shapley_weights(n)
    phi = np.empty((n,) + table.shape[1:])
    for i in range(n):
        bit = 1 << i
        without = masks[(masks & bit) == 0]
        phi[i] = np.tensordot(weight[sizes[without]], table[without | bit] - table[without], axes=1)
    return phi


def shapley_interaction_index(values: GameValues, n: int) -> FloatArray:
    """Exact pairwise Shapley interaction index (Grabisch & Roubens 1999), shape ``(n, n)``.

    ``I_ij = sum over S in N minus {i, j} of |S|! (n-|S|-2)! / (n-1)! * D_ij(S)`` with
    ``D_ij(S) = v(S+i+j) - v(S+i) - v(S+j) + v(S)``: the Shapley-weighted average synergy of
    i and j over all contexts (> 0: they help more together; < 0: they are redundant). This
    is the pairwise decomposition that review P3 #15 (SHAP-IQ) asks for. Symmetric; the
    diagonal is NaN (not defined for i == j). For n = 1 the single entry is NaN.
    In Harsanyi dividends d_T: ``I_ij = sum over T containing i and j of d_T / (|T| - 1)``.
    """
    n = _check_n(n)
    table = _dense_values(values, n)
    out = np.full((n, n) + table.shape[1:], np.nan)
    if n < 2:
        return out
    masks = np.arange(1 << n, dtype=np.int64)
    sizes = _popcount(masks)
    weight = np.array([1.0 / ((n - 1) * math.comb(n - 2, s)) for s in range(n - 1)])
    for i in range(n):
        for j in range(i + 1, n):
            bi, bj = 1 << i, 1 << j
            rest = masks[(masks & (bi | bj)) == 0]
            delta = table[rest | bi | bj] - table[rest | bi] - table[rest | bj] + table[rest]
            out[i, j] = out[j, i] = np.tensordot(weight[sizes[rest]], delta, axes=1)
    return out


def marginal_contributions(values: GameValues, n: int) -> FloatArray:
    """Removal cost of each player: ``v(all on) - v(all on except i)``, shape ``(n,)``.

    This is the spec's "marginal contribution" as Karn measures it (review P0 #3: removal
    cost, not causal contribution). Needs only the full configuration and the n single-off
    configurations, so it works on an ablation-only mapping. NaN where a needed
    configuration is missing.
    """
    n = _check_n(n)
    get = _value_getter(values, n)
    full = (1 << n) - 1
    v_full = get(full)
    out = np.full(n, np.nan)
    for i in range(n):
        v_off = get(full ^ (1 << i))
        if v_full is not None and v_off is not None:
            out[i] = v_full - v_off
    return out


def mobius_dividends(values: GameValues, n: int) -> FloatArray:
    """Pairwise Moebius (Harsanyi) dividend, other slots off, shape ``(n, n)`` (or ``(n, n, k)``).

    ``m_ij = v({i, j}) - v({i}) - v({j}) + v({})``: does switching on i and j together, on
    the bare host, gain more (> 0, synergy) or less (< 0, redundancy) than switching each
    on alone? This is the spec's "does Early+Mid together exceed Early + Mid separately?".
    On the spec's 3-slot table early-mid is -0.1 points. Symmetric; NaN on the diagonal and
    where a needed configuration is missing (4 configurations per pair are needed).
    """
    n = _check_n(n)
    if isinstance(values, Mapping):
        get = _value_getter(values, n)
        out = np.full((n, n), np.nan)
        for i in range(n):
            for j in range(i + 1, n):
                vals = [get(m) for m in ((1 << i) | (1 << j), 1 << i, 1 << j, 0)]
                if all(v is not None for v in vals):
                    a, b, c, d = (float(v) for v in vals if v is not None)
                    out[i, j] = out[j, i] = a - b - c + d
        return out
    table = _dense_values(values, n)
    out = np.full((n, n) + table.shape[1:], np.nan)
    for i in range(n):
        for j in range(i + 1, n):
            bi, bj = 1 << i, 1 << j
            out[i, j] = out[j, i] = table[bi | bj] - table[bi] - table[bj] + table[0]
    return out


def interaction_effects(values: GameValues, n: int) -> FloatArray:
    """Pairwise *removal* interaction (co-Moebius, other slots on), shape ``(n, n)``.

    ``E_ij = v(N) - v(N-i) - v(N-j) + v(N-i-j)`` (inclusion-exclusion with all other slots
    on, review P1 #5). E > 0: i's removal cost is larger while j is on (they work together
    in the full network), and so switching both off costs *less* than the two single removal
    costs added (removal cost of the pair = single costs - E). It is not the spec's "together
    vs separately" question (that is :func:`mobius_dividends`, other slots off) and for
    n >= 3 the two can differ in sign (spec table, early-mid: -0.5 here, -0.1 Moebius).
    Symmetric; NaN on the diagonal and wherever a needed configuration is missing (an
    ablation-only run has the pair-off configuration only when n = 2).
    """
    n = _check_n(n)
    get = _value_getter(values, n)
    full = (1 << n) - 1
    out = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i + 1, n):
            a, b, c, d = get(full), get(full ^ (1 << i)), get(full ^ (1 << j)), get(full ^ (1 << i) ^ (1 << j))
            if a is not None and b is not None and c is not None and d is not None:
                out[i, j] = out[j, i] = a - b - c + d
    return out


# =========================================================================== permutation sampling


def _draw_antithetic_permutations(n: int, n_pairs: int, rng: np.random.Generator) -> IntArray:
    """Shape ``(2 * n_pairs, n)``: row 2k is a uniform permutation, row 2k + 1 its reverse.

    Each row is marginally uniform, so averaging over rows is unbiased; a permutation and its
    reverse put every player early in one and late in the other, which makes their marginal
    contributions negatively correlated in typical (diminishing-returns) games.
    """
    perms = np.empty((2 * n_pairs, n), dtype=np.int64)
    for k in range(n_pairs):
        p = rng.permutation(n)
        perms[2 * k] = p
        perms[2 * k + 1] = p[::-1]
    return perms


def _prefix_masks(perm: IntArray) -> list[int]:
    """The n + 1 coalitions a permutation walks through: empty, {p0}, {p0, p1}, ..., all."""
    masks = [0]
    for player in perm:
        masks.append(masks[-1] | (1 << int(player)))
    return masks


def _permutation_marginals(perms: IntArray, value_of: Callable[[int], FloatArray | float]) -> FloatArray:
    """Marginal contribution of every player in every permutation: ``(n_perms, n, *value shape)``."""
    n_perms, n = perms.shape
    first = np.asarray(value_of(0), dtype=float)
    out = np.empty((n_perms, n) + first.shape)
    for r, perm in enumerate(perms):
        prefix = _prefix_masks(perm)
        prev = first
        for step, player in enumerate(perm):
            cur = np.asarray(value_of(prefix[step + 1]), dtype=float)
            out[r, int(player)] = cur - prev
            prev = cur
    return out


def shapley_permutation_antithetic(
    value_fn: Callable[[tuple[bool, ...]], float],
    n: int,
    n_permutations: int,
    rng: np.random.Generator | int | None = None,
) -> tuple[FloatArray, FloatArray, int]:
    """Monte Carlo Shapley values by permutation sampling with antithetic pairs.

    ``value_fn(config)`` returns the game value of a configuration (a tuple of n bools); it
    is called at most once per distinct configuration (memoised here). ``n_permutations``
    counts permutations, an antithetic pair counting as two; an odd number is rounded down
    to whole pairs (minimum one pair). ``rng`` is a numpy Generator or a seed.

    Returns ``(means, std_errors, n_samples)``: the estimates (shape ``(n,)``, units of v),
    their standard errors over the antithetic pair means (NaN with a single pair), and the
    number of permutations used. The estimator is unbiased for the exact Shapley value.
    """
    n = _check_n(n)
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, (int, np.integer)) or n_permutations < 2:
        raise ValueError(f"n_permutations must be an int >= 2 (one antithetic pair), got {n_permutations!r}")
    n_pairs = int(n_permutations) // 2
    rng = np.random.default_rng(rng)
    memo: dict[int, float] = {}

    def value_of(mask: int) -> float:
        if mask not in memo:
            v = float(value_fn(_mask_to_config(mask, n)))
            if not math.isfinite(v):
                raise ValueError(f"value_fn returned a non-finite value {v} for {_mask_to_config(mask, n)}")
            memo[mask] = v
        return memo[mask]

    perms = _draw_antithetic_permutations(n, n_pairs, rng)
    marginals = _permutation_marginals(perms, value_of)
    means, std_errors = _pair_mean_and_se(marginals)
    return means, std_errors, 2 * n_pairs


def _pair_mean_and_se(marginals: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Mean and standard error over antithetic pairs of ``marginals`` (rows 2k, 2k+1 paired).

    The pair mean is the sampling unit: the two halves of a pair are dependent by design,
    so treating them as independent would understate the error.
    """
    pair_means = 0.5 * (marginals[0::2] + marginals[1::2])
    n_pairs = pair_means.shape[0]
    means = pair_means.mean(axis=0)
    if n_pairs < 2:
        return means, np.full(means.shape, np.nan)
    return means, pair_means.std(axis=0, ddof=1) / math.sqrt(n_pairs)


# =========================================================================== paired kernel regression


def _kernel_mass(n: int, k: int) -> float:
    """Shapley-kernel mass of the coalitions of size k (0 < k < n): ``(n - 1) / (k (n - k))``."""
    return (n - 1) / (k * (n - k))


def _windows(n: int, k: int, rng: np.random.Generator) -> list[int]:
    """Size-k coalitions as the cyclic windows of one random permutation, in random order.

    The ``n / gcd(n, k)`` windows starting at 0, k, 2k, ... contain every player equally often
    (a balanced design): the additive part of the game is then fitted from balanced rows.
    """
    perm = rng.permutation(n)
    g = math.gcd(n, k)
    out = [sum(1 << int(perm[(j * k + q) % n]) for q in range(k)) for j in range(n // g)]
    rng.shuffle(out)
    return out


def kernel_shap_design(n: int, budget: int, rng: np.random.Generator) -> tuple[list[int], list[tuple[int, ...]]]:
    """The coalitions the paired kernel estimator evaluates within ``budget`` distinct ones.

    Returns ``(masks, units)``: the bitmasks in evaluation (priority) order, and the random
    sampling units among them. The order is: all on, all off, each slot off alone (the
    ablation core: removal costs, the efficiency constraint, and the whole size n-1 stratum),
    then whole strata of coalition sizes ``(k, n - k)`` from the border inwards while the
    kernel-proportional share of the remaining budget would cover a stratum completely (the
    "border trick"), then the rest of the budget split over the other strata in proportion to
    their kernel mass, in *units*: a coalition and its complement (paired sampling; a size-1
    coalition alone, its complement being in the core), drawn without replacement as balanced
    cyclic windows of random permutations. Deterministic given ``rng``.
    """
    n = _check_n(n)
    full = (1 << n) - 1
    if budget >= 1 << n:
        return list(range(full, -1, -1)), []
    core = list(dict.fromkeys([full, 0] + [full ^ (1 << i) for i in range(n)]))
    chosen: dict[int, None] = dict.fromkeys(core[: max(budget, 0)])
    units: list[tuple[int, ...]] = []
    core_complete = len(chosen) == len(core)
    remaining = budget - len(chosen)
    if n < 3 or remaining <= 0:
        return list(chosen), units

    def pair_mass(k: int) -> float:
        return _kernel_mass(n, k) + (_kernel_mass(n, n - k) if n - k != k else 0.0)

    def stratum(k: int) -> list[int]:
        sizes = {k, n - k}
        return [
            sum(1 << i for i in c)
            for s in sorted(sizes)
            for c in itertools.combinations(range(n), s)
            if s != n - 1 or not core_complete
        ]

    def cost(k: int) -> int:
        total = math.comb(n, k) + (math.comb(n, n - k) if n - k != k else 0)
        return total - (n if k == 1 and core_complete else 0)

    open_strata = list(range(1, n // 2 + 1))
    completed = True
    while completed and open_strata:
        completed = False
        total = sum(pair_mass(k) for k in open_strata)
        for k in open_strata:
            c = cost(k)
            if c <= remaining and remaining * pair_mass(k) / total >= c:
                chosen.update(dict.fromkeys(stratum(k)))
                remaining = budget - len(chosen)
                open_strata.remove(k)
                completed = True
                break
    if not open_strata or remaining <= 0:
        return list(chosen), units

    unit_cost = {k: 1 if (k == 1 and core_complete) else 2 for k in open_strata}
    capacity = {k: math.comb(n, k) // 2 if k == n - k else math.comb(n, k) for k in open_strata}
    total = sum(pair_mass(k) for k in open_strata)
    share = {k: pair_mass(k) / total * remaining for k in open_strata}
    alloc = dict.fromkeys(open_strata, 0)
    left = remaining
    # Deterministic (stratified) allocation when every open stratum can get two units;
    # otherwise each unit's stratum is drawn with probability proportional to its share, so
    # that no stratum is left out by design (its omission would be a bias no interval shows).
    stratified = left >= sum(2 * unit_cost[k] for k in open_strata)
    if stratified:  # two units in every open size first: each one is then sampled (and has an error)
        for k in open_strata:
            alloc[k] = min(2, capacity[k])
            left -= alloc[k] * unit_cost[k]
    elif 1 in open_strata and unit_cost[1] == 1:
        # Too small a budget to sample every size: the singletons first. They have the largest
        # kernel mass, cost one evaluation each (the complement is in the core), and against the
        # core's removal costs they are what tells an additive game from a high-order one
        # (:func:`_additivity_weight`).
        alloc[1] = min(capacity[1], left)
        left -= alloc[1]
    while True:
        fits = [k for k in open_strata if alloc[k] < capacity[k] and unit_cost[k] <= left]
        if not fits:
            break
        if stratified:  # largest deficit first: a kernel-proportional allocation
            k = max(fits, key=lambda s: (share[s] - alloc[s] * unit_cost[s], -s))
        else:
            p = np.array([share[s] / unit_cost[s] for s in fits])
            k = fits[int(rng.choice(len(fits), p=p / p.sum()))]
        alloc[k] += 1
        left -= unit_cost[k]
    for k in open_strata:
        seen: set[int] = set()
        pool: list[int] = []
        tries = 0
        while len(seen) < alloc[k]:
            tries += 1
            if tries < 20 * alloc[k] + 50:
                if not pool:
                    pool = _windows(n, k, rng)
                t = pool.pop()
            else:  # a nearly exhausted stratum: plain draws finish it
                t = sum(1 << int(i) for i in rng.choice(n, size=k, replace=False))
            key = min(t, full ^ t)
            if key in seen:
                continue
            seen.add(key)
            unit = (t,) if unit_cost[k] == 1 else (t, full ^ t)
            units.append(unit)
            chosen.update(dict.fromkeys(unit))
    return list(chosen), units


def kernel_shap_solve(n: int, masks: Sequence[int], values: FloatArray) -> FloatArray:
    """Shapley values of the additive game closest to ``v`` in the Shapley-kernel norm.

    ``values`` has shape ``(len(masks), k)`` (k games, e.g. bootstrap replicates). The
    coalitions of each size s are weighted by ``kernel mass(s) / (number present of size s)``
    (a complete stratum gets the exact kernel weight; a sampled one the stratified estimate of
    it) and the least-squares fit is constrained to ``sum(phi) = v(all on) - v(all off)``
    (efficiency). With all ``2**n`` coalitions this is the exact Shapley value (Charnes et al.
    1988; Lundberg & Lee 2017). Needs the all-on and all-off coalitions; returns ``(n, k)``.
    """
    full = (1 << n) - 1
    index = {int(m): r for r, m in enumerate(masks)}
    if full not in index or 0 not in index:
        raise ValueError("the kernel estimator needs the all-on and all-off configurations")
    rows = np.array([m for m in index if 0 < m < full], dtype=np.int64)
    v0, v_full = values[index[0]], values[index[full]]
    gap = v_full - v0
    if rows.size == 0:
        return np.broadcast_to(gap / n, (n,) + gap.shape).copy()
    sizes = _popcount(rows)
    counts = np.bincount(sizes, minlength=n + 1)
    mass = np.array([0.0] + [_kernel_mass(n, s) for s in range(1, n)] + [0.0])
    w = mass[sizes] / counts[sizes]
    z = _bit_rows(rows, n)
    b = values[[index[int(m)] for m in rows]] - v0
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n] = z.T @ (z * w[:, None])
    kkt[:n, n] = kkt[n, :n] = 1.0
    rhs = np.vstack([z.T @ (w[:, None] * b), gap[None, :]])
    sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    return np.asarray(sol[:n], dtype=float)


def shapley_stratified_solve(n: int, masks: Sequence[int], values: FloatArray) -> FloatArray:
    """Stratified (SVARM-style) Shapley estimate from the coalitions present.

    The Shapley value is ``phi_i = (u(N) + sum_{k=1}^{n-1} (mean_k^+(i) - mean_k^-(i))) / n``
    with ``u = v - v(all off)`` and ``mean_k^+(i)`` (``mean_k^-(i)``) the mean of u over the
    coalitions of size k that contain (do not contain) i (Kolpaczki et al. 2024). Each mean is
    taken over the coalitions present; a cell with none counts as ``u = 0``, the prior that
    suits games whose value sits in high-order interactions. The result is shifted equally
    over the players so that efficiency holds exactly. ``values`` has shape
    ``(len(masks), k)``; returns ``(n, k)``. Needs the all-on and all-off coalitions.
    """
    full = (1 << n) - 1
    index = {int(m): r for r, m in enumerate(masks)}
    if full not in index or 0 not in index:
        raise ValueError("the stratified estimator needs the all-on and all-off configurations")
    v0 = values[index[0]]
    gap = values[index[full]] - v0
    phi = np.broadcast_to(gap / n, (n,) + gap.shape).copy()
    rows = np.array([m for m in index if 0 < m < full], dtype=np.int64)
    if rows.size:
        sizes = _popcount(rows)
        z = _bit_rows(rows, n)
        b = values[[index[int(m)] for m in rows]] - v0
        for k in np.unique(sizes):
            sel = sizes == k
            zk, bk = z[sel], b[sel]
            c_in = zk.sum(axis=0)[:, None]
            c_out = float(sel.sum()) - c_in
            s_in = zk.T @ bk
            s_out = bk.sum(axis=0)[None, :] - s_in
            mean_in = np.divide(s_in, c_in, out=np.zeros_like(s_in), where=c_in > 0)
            mean_out = np.divide(s_out, c_out, out=np.zeros_like(s_out), where=c_out > 0)
            phi += (mean_in - mean_out) / n
    return np.asarray(phi + (gap - phi.sum(axis=0))[None, :] / n, dtype=float)


def _additive_fit(n: int, masks: Sequence[int], values: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Least-squares additive game ``f(S) = c + sum_{i in S} w_i`` through the coalitions present.

    Unweighted (every evaluation carries the same noise) and with a free intercept. Returns
    ``(w (n, k), residual v - f (len(masks), k), z)`` with z the coalitions' 0/1 rows.
    """
    z = _bit_rows(list(masks), n)
    design = np.hstack([np.ones((len(z), 1)), z])
    beta = np.linalg.lstsq(design, values, rcond=None)[0]
    return np.asarray(beta[1:], dtype=float), np.asarray(values - design @ beta, dtype=float), z


def _shapley_coefficients(n: int, z: FloatArray) -> FloatArray:
    """``(n, len(z))``: the weight of ``v(T)`` in ``phi_i`` for each coalition row T of z:
    ``p(|T| - 1)`` if i is in T, else ``-p(|T|)``, with ``p(s) = s! (n - s - 1)! / n!``."""
    p = np.append(_shapley_weights(n), 0.0)
    size = z.sum(axis=1).astype(np.int64)
    with_i = np.where(size > 0, p[np.maximum(size - 1, 0)], 0.0)
    return np.asarray((z * with_i[:, None] - (1.0 - z) * p[size][:, None]).T, dtype=float)


def _three_estimators(n: int, masks: Sequence[int], values: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``(A, B, R)`` of the same coalitions with one stratified pass (it is linear in the values:
    the residual's estimate is an extra block of columns).

    With f the least-squares additive game (:func:`_additive_fit`) and r = v - f:
    ``A = phi(f) + stratified(r)`` (:func:`shapley_regression_adjusted`), ``B = stratified(v)``
    (:func:`shapley_stratified_solve`) and ``R = phi(f) + sum_T c_i(T) r(T)`` over the coalitions
    present, c the exact Shapley weights (:func:`shapley_regression_observed`). Each is
    efficient and exact with all ``2**n`` coalitions.
    """
    w, resid, z = _additive_fit(n, masks, values)
    k = values.shape[1]
    both = shapley_stratified_solve(n, masks, np.hstack([values, resid]))
    a = w + both[:, k:]
    r = w + _shapley_coefficients(n, z) @ resid
    return np.asarray(a, dtype=float), np.asarray(both[:, :k], dtype=float), np.asarray(r, dtype=float)


def shapley_regression_adjusted(n: int, masks: Sequence[int], values: FloatArray) -> FloatArray:
    """Additive regression plus the stratified estimate of what it leaves out.

    ``phi = phi(f) + stratified(v - f)`` with f the least-squares additive game through the
    coalitions present (every evaluation weighted alike, free intercept): the Shapley value is
    linear, f's is exact (its slopes), and the residual, small when the game is nearly
    additive, is estimated by :func:`shapley_stratified_solve` (regression-adjusted Monte
    Carlo; unbiased whatever the fit). A cell with no coalition then counts as the additive
    prediction. ``values`` has shape ``(len(masks), k)``; returns ``(n, k)``; efficiency holds
    exactly. Needs the all-on and all-off coalitions.
    """
    return _three_estimators(n, masks, values)[0]


def shapley_regression_observed(n: int, masks: Sequence[int], values: FloatArray) -> FloatArray:
    """Additive regression plus the residuals where they were observed, at their exact weight.

    ``phi_i = w_i + sum_T c_i(T) (v(T) - f(T))`` over the coalitions T present, with f the
    least-squares additive game (as in :func:`shapley_regression_adjusted`) and ``c_i(T)`` the
    exact Shapley weight of ``v(T)`` in ``phi_i``; an unobserved coalition's residual counts as
    0. Under an additive game with independent evaluation noise this is the best linear
    unbiased predictor of the Shapley value (the unobserved noise is unpredictable); where the
    residual is structured (interactions), it is biased towards the additive fit. Efficient
    (the weights of a coalition sum to 0 over the players, except all on and all off) and
    exact with all ``2**n`` coalitions. Same shapes as :func:`shapley_regression_adjusted`.
    """
    return _three_estimators(n, masks, values)[2]


def _sizes_covered(n: int, masks: Sequence[int], units: Sequence[tuple[int, ...]]) -> bool:
    """Whether every coalition size (pair k, n - k) is complete or has a sampled unit."""
    present = np.bincount(_popcount(np.asarray(list(masks), dtype=np.int64)), minlength=n + 1)
    sampled = {min(bin(u[0]).count("1"), n - bin(u[0]).count("1")) for u in units}
    for k in range(1, n // 2 + 1):
        have = present[k] + (present[n - k] if n - k != k else 0)
        total = math.comb(n, k) + (math.comb(n, n - k) if n - k != k else 0)
        if have < total and k not in sampled:
            return False
    return True


def _additivity_weight(
    n: int, masks: Sequence[int], values: FloatArray, units: Sequence[tuple[int, ...]], default: float
) -> float:
    """The mixing weight while some size is unsampled: how additive the game looks.

    On the smaller coalition S of each sampled unit, the additive model predicts ``u(S) = x(S)
    = sum_{i in S} removal cost(i)`` and the stratified estimator's prior ``u(S) = 0`` (right
    when the value sits in high-order interactions, whose small coalitions are worth nothing).
    The weight of the regression is ``SSE(zero) / (SSE(zero) + SSE(additive))`` over those
    coalitions, ``sum u**2 / (sum u**2 + sum (u - x)**2)``; ``default`` without such units.
    """
    index = {int(m): r for r, m in enumerate(masks)}
    full = (1 << n) - 1
    v0 = values[index[0]]
    removal = np.array(
        [values[index[full]] - values[index[full ^ (1 << i)]] if full ^ (1 << i) in index else 0.0 for i in range(n)]
    )
    xs, ys = [], []
    for unit in units:
        small = min(unit, key=lambda m: bin(m).count("1"))
        if 2 * bin(small).count("1") <= n:
            xs.append(float(_bit_rows([small], n)[0] @ removal))
            ys.append(float(values[index[small]] - v0))
    x, y = np.array(xs), np.array(ys)
    sse_zero, sse_additive = float(y @ y), float((y - x) @ (y - x))
    if x.size == 0 or sse_zero + sse_additive <= 0.0:
        return default
    return sse_zero / (sse_zero + sse_additive)


ADDITIVITY_EXPONENT = 0.3
"""While some coalition size is unsampled the mixing weight of the regression is at least
``additivity weight ** 0.3`` (:func:`_additivity_weight`): the weight separates the game families
(near 1 on nearly additive games, 0.03-0.3 with pairwise interactions, near 0 in high-order
ones) but the best mix is not proportional to it (about 1, 0.5 and 0.1-0.3 for them)."""


def _box_quadratic(c: FloatArray, g: FloatArray) -> FloatArray:
    """``argmin_{b in [0, 1]^2} b @ g @ b - 2 b @ c`` for a positive semi-definite 2x2 g."""
    candidates = [np.array([x, y]) for x in (0.0, 1.0) for y in (0.0, 1.0)]
    if abs(np.linalg.det(g)) > 1e-12 * max(float(np.abs(g).max()), 1e-300):
        candidates.append(np.linalg.solve(g, c))
    for j in range(2):  # one coordinate on the boundary, the other at its best
        o = 1 - j
        for fixed in (0.0, 1.0):
            if g[o, o] > 0:
                b = np.zeros(2)
                b[j], b[o] = fixed, (c[o] - g[o, j] * fixed) / g[o, o]
                candidates.append(b)
    best, value = np.zeros(2), 0.0
    for b in candidates:
        b = np.clip(b, 0.0, 1.0)
        obj = float(b @ g @ b - 2.0 * b @ c)
        if obj < value:
            best, value = b, obj
    return best


STRUCTURE_QUANTILE = 0.25
"""The F quantile that turns the structure ratio kappa into the interval's shrink factor
(:func:`_residual_noise_se`): ``min(1, kappa / F_0.25)``, kappa's 75% upper confidence bound
under the noise model."""

STRUCTURE_PROBES = 8
"""Random residuals (Rademacher vectors through the additive fit's residual-maker) that the
delete-one-unit jackknife carries beside the observed values, to measure its variance under the
noise model (:func:`_jackknife_structure_ratio`)."""


def f_ppf(p: float, df1: float, df2: float) -> float:
    """Quantile of the F distribution with ``(df1, df2)`` degrees of freedom (bisection on the
    regularized incomplete beta, relative error < 1e-8)."""
    if not 0.0 < p < 1.0 or not (df1 > 0 and df2 > 0):
        raise ValueError(f"need 0 < p < 1 and positive df, got {p}, {df1}, {df2}")

    def cdf(x: float) -> float:
        return _betainc(0.5 * df1, 0.5 * df2, df1 * x / (df1 * x + df2))

    lo, hi = 1e-12, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2.0 * hi
    while hi / lo - 1.0 > 1e-8:
        mid = math.sqrt(lo * hi)
        if cdf(mid) < p:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def _structure_columns(n: int, masks: Sequence[int], values: FloatArray) -> FloatArray:
    """``(m, 1 + STRUCTURE_PROBES)``: the additive fit's residual ``(I - H) v`` of column 0 of
    ``values`` and :data:`STRUCTURE_PROBES` probe residuals ``(I - H) xi_j``, xi_j Rademacher
    vectors drawn from a generator seeded by the coalitions (so the interval is a function of
    the data, and designs that put like coalitions in like rows do not share one draw's error),
    H the hat matrix of the least-squares additive fit (:func:`_additive_fit`)."""
    m = len(masks)
    design = np.hstack([np.ones((m, 1)), _bit_rows(masks, n)])
    xi = np.random.default_rng([n, *(int(mk) for mk in masks)]).choice([-1.0, 1.0], size=(m, STRUCTURE_PROBES))
    x = np.hstack([values[:, :1], xi])
    return np.asarray(x - design @ (np.linalg.pinv(design) @ x), dtype=float)


def _jackknife_structure_ratio(dev: FloatArray, r: FloatArray, dof: int) -> tuple[float, float, float]:
    """``(kappa, df_kappa, df_noise)``: how much less the estimate varies over the delete-one-unit
    jackknife on this game's residual than on independent noise (:func:`_residual_noise_se`).

    ``dev`` ``(p, n, 1 + k)``: the p jackknife replicates' deviations from their mean of the
    estimate applied to the additive fit's residual ``r = (I - H) v`` (column 0) and to k probe
    residuals ``(I - H) xi_j``, xi_j independent Rademacher vectors (H the fit's hat matrix).
    With M the jackknife's quadratic form (``J(x) = x' M x``, the jackknife variance, summed
    over the players, of the estimate applied to x), column 0 gives ``J(r)`` exactly, and the
    probes ``T = mean_j J((I - H) xi_j)``, whose expectation ``tr(M (I - H))`` is what J(r) would
    be for a residual of independent unit-variance noise, and ``Q = mean_{j<l} (xi_j' (I - H)
    M (I - H) xi_l)**2``, an unbiased estimate of that form's squared Frobenius norm.
    ``kappa = (J(r) / T) / (r' r / dof)``: about 1 when r is noise, small when the design
    cancels a structured r; under the noise model it is roughly F-distributed with
    ``df_kappa = T**2 / Q`` (Satterthwaite) and ``df_noise = 1 / (1 / dof + 1 / (k df_kappa))``
    (r's mean square and T both in the denominator) degrees of freedom. NaN (and 0, 0) when
    there is nothing to compare.
    """
    p, k = dev.shape[0], dev.shape[2] - 1
    g = dev.reshape(-1, k + 1)
    gram = ((p - 1) / p) * (g.T @ g)  # x_a' M x_b for the columns a, b: r, then the probes
    trace = float(np.mean(np.diag(gram)[1:])) if k else 0.0
    pairs = gram[1:, 1:][np.triu_indices(k, 1)]
    trace2 = float(np.mean(pairs**2)) if pairs.size else 0.0
    s2 = float(r @ r) / dof if dof > 0 else 0.0
    if trace <= 0.0 or trace2 <= 0.0 or s2 <= 0.0:
        return math.nan, 0.0, 0.0
    df_kappa = trace * trace / trace2
    return float(gram[0, 0]) / trace / s2, df_kappa, 1.0 / (1.0 / dof + 1.0 / (k * df_kappa))


def _residual_noise_se(
    n: int,
    masks: Sequence[int],
    values: FloatArray,
    b1: float,
    b2: float,
    estimate: FloatArray,
    validation_noise: bool,
    bounds: tuple[float, float] | None,
    structure: tuple[float, float, float] | None = None,
) -> tuple[FloatArray, float]:
    """``(se (n,), df)`` of column 0 of :func:`shapley_sampled_estimate` at the weights ``(b1, b2)``.

    The model: ``v = f + e`` with f additive and e independent across coalitions with one
    variance ``s**2`` (a structured, non-additive part of the game is treated as such noise).
    The estimate is linear in the values, ``L v``, with L (n x m) the weights of the mix
    (``_three_estimators`` applied to the identity), and L reproduces an additive game except
    for B's part, so its error is ``b1 (L_B f - phi(f)) + sum_obs (L - c)(T) e(T) -
    sum_unobs c(T) e(T)`` with c the exact Shapley weights; its variance is ``s**2 (|L_i -
    c_i|**2 over the coalitions present + |c_i|**2 over the absent ones) + bias_i**2``, with
    s**2 the residual mean square of the least-squares additive fit (``m - n - 1`` degrees of
    freedom, the t's df) and the bias at the fitted additive game. The absent coalitions'
    term is what makes it honest when a coalition size is unsampled. With
    ``validation_noise`` the columns 1.. are bootstrap replicates of column 0: the part of the
    residual sum of squares that they reproduce is validation noise, already in the
    bootstrap's share of the interval, and is subtracted. With no residual degrees of freedom
    (``m = n + 1``) the error is bounded instead: every absent value lies in ``bounds``, and
    ``se`` is the largest distance from the estimate to that range over 1.959964 (so the 95%
    interval, df infinite, contains the whole range); NaN without ``bounds``.

    ``structure = (kappa, df_kappa, df_noise)`` (:func:`_jackknife_structure_ratio`) corrects
    the noise model where the residual is structure rather than noise: the design (balanced
    windows, paired complements) then cancels much of the error that independent noise would
    leave. kappa is the delete-one-unit jackknife's variance of the estimate on the residual
    over what the same jackknife gives on independent noise of the residual's mean square
    (about 1 under the noise model, roughly F with ``(df_kappa, df_noise)`` degrees of
    freedom). The part of the variance the jackknife sees (the evaluated coalitions and the
    absent ones of the sizes with some coalition evaluated) is multiplied by ``min(1, kappa /
    F_q(df_kappa, df_noise))`` with q = :data:`STRUCTURE_QUANTILE` (kappa's upper confidence
    bound under the noise model, so an additive game's interval is shrunk only where kappa is
    low by chance), and where it shrinks the t's df is at most ``df_kappa``; the absent
    coalitions of sizes with none evaluated, and the bias, are not shrunk.
    """
    m = len(masks)
    z = _bit_rows(list(masks), n)
    c = _shapley_coefficients(n, z)
    p = _shapley_weights(n)
    sizes = np.arange(n)
    total = 2.0 * float(np.sum(np.array([math.comb(n - 1, int(s)) for s in sizes]) * p**2))
    absent = np.maximum(total - np.sum(c**2, axis=1), 0.0)
    dof = m - n - 1
    if dof <= 0:
        if bounds is None:
            return np.full(n, np.nan), 0.0
        lo, hi = bounds
        # phi_i = sum_T c_i(T) v(T): the observed part plus, per absent coalition, c * [lo, hi].
        size = z.sum(axis=1).astype(np.int64)
        pos = np.zeros(n)
        neg = np.zeros(n)
        for s in range(n + 1):  # the absent coalitions of size s with and without player i
            count_with = np.full(n, math.comb(n - 1, s - 1) if s >= 1 else 0) - z[size == s].sum(axis=0)
            count_without = np.full(n, math.comb(n - 1, s) if s <= n - 1 else 0) - (1 - z[size == s]).sum(axis=0)
            pos += count_with * (p[s - 1] if s >= 1 else 0.0)
            neg += count_without * (p[s] if s <= n - 1 else 0.0)
        known = c @ values[:, 0]
        low = known + lo * pos - hi * neg
        high = known + hi * pos - lo * neg
        half = np.maximum(np.abs(estimate - low), np.abs(high - estimate))
        return half / 1.959964, math.inf
    design = np.hstack([np.ones((m, 1)), z])
    coef = np.linalg.pinv(design)
    proj = design @ coef
    # the maps (n, m) of A, B and R: _three_estimators applied to the identity, with the additive
    # fit as pinv(design) (the same least-squares solution; LAPACK's gelsd with m right-hand
    # sides took 5-50 ms at n = 12, m = 200, most of the whole estimate's time)
    eye = np.eye(m)
    both = shapley_stratified_solve(n, masks, np.hstack([eye, eye - proj]))
    la, lb, lr = coef[1:] + both[:, m:], both[:, :m], coef[1:] + c @ (eye - proj)
    lin = la - b1 * (la - lb) - b2 * (la - lr)
    resid = values - proj @ values
    rss = float(resid[:, 0] @ resid[:, 0])
    if validation_noise and values.shape[1] > 2:
        spread = resid[:, 1:] - resid[:, :1]
        rss = max(0.0, rss - float(np.mean(np.sum(spread**2, axis=0))))
    s2 = rss / dof
    beta = coef @ values[:, 0]
    bias = b1 * (lb @ (design @ beta) - beta[1:])
    shrink, df = 1.0, float(dof)
    if structure is not None and math.isfinite(structure[0]) and structure[1] > 0 and structure[2] > 0:
        kappa, df_kappa, df_noise = structure
        shrink = min(1.0, kappa / f_ppf(STRUCTURE_QUANTILE, df_kappa, df_noise))
        if shrink < 1.0:
            df = min(df, df_kappa)
    # the absent coalitions of the sizes with none evaluated: an extrapolation no resampling sees
    unseen = np.bincount(z.sum(axis=1).astype(np.int64), minlength=n + 1) == 0
    blind = np.zeros(n)
    for k in (int(x) for x in np.flatnonzero(unseen)):
        blind += (math.comb(n - 1, k - 1) * p[k - 1] ** 2 if k >= 1 else 0.0) + (
            math.comb(n - 1, k) * p[k] ** 2 if k <= n - 1 else 0.0
        )
    seen = np.sum((lin - c) ** 2, axis=1) + absent - blind
    var = s2 * (shrink * seen + blind) + bias**2
    return np.sqrt(var), df


def shapley_sampled_estimate(
    n: int,
    masks: Sequence[int],
    values: FloatArray,
    units: Sequence[tuple[int, ...]],
    *,
    validation_noise: bool = False,
    bounds: tuple[float, float] | None = (0.0, 1.0),
) -> tuple[FloatArray, FloatArray, float, float]:
    """The shapley strategy's estimate: the regression-adjusted estimator, corrected towards two others.

    ``A`` = :func:`shapley_regression_adjusted` (unbiased; best on nearly additive games),
    ``B`` = :func:`shapley_stratified_solve` (unbiased; best when the value is in high-order
    interactions) and ``R`` = :func:`shapley_regression_observed` (A without the extrapolation of
    the residual over unobserved coalitions: biased where the residual is structured, less noisy
    where it is noise). The estimate is ``A - b1 (A - B) - b2 (A - R)`` with ``(b1, b2)`` in
    ``[0, 1]**2`` minimising the estimated mean squared error ``var(A) - 2 b.c + b' G b``: the
    covariances c and G come from a delete-one-unit jackknife over the random units (pooled over
    the players), except that ``E|A - R|**2`` is the larger of its jackknife variance and the
    observed ``|A - R|**2`` (A - R has a mean, R's bias, which no resampling shows). So b1 is
    the variance-weighted mix of A and B, and b2 > 0 only when the gap between A and R is no
    larger than A's own noise explains. While some coalition size is neither complete nor
    sampled, the error is mostly extrapolation, which the jackknife does not see: the weight
    of A, ``alpha = 1 - b1``, is then at least :func:`_additivity_weight` ``** 0.3``
    (:data:`ADDITIVITY_EXPONENT`), and b2 is re-fitted for it; below two units, ``alpha`` is
    that and b2 = 0. The same weights are applied to every column of ``values`` (bootstrap
    replicates), so the map stays linear. Efficiency holds exactly.

    Returns ``(estimate (n, k), se (n,), df, alpha)``: ``se`` and its t degrees of freedom
    ``df`` are :func:`_residual_noise_se` (the additive-plus-noise model's error of this
    linear estimate, counting the coalitions not evaluated, so also at budgets where some
    coalition size is unsampled; the jackknife alone covered 88-100% per benchmark cell at
    3n-4n and could not see that extrapolation at all), with the part the jackknife sees
    shrunk by its structure ratio (:func:`_jackknife_structure_ratio`: the same jackknife pass
    carries the additive fit's residual and :data:`STRUCTURE_PROBES` probe residuals beside the
    observed values, :func:`_structure_columns`). ``validation_noise``: the columns
    1.. are bootstrap replicates (their share is subtracted from the residual variance);
    ``bounds``: the range of a value, for the bound used when no residual degree of freedom
    is left (``len(masks) = n + 1``).
    """
    a_est, b_est, r_est = _three_estimators(n, masks, values)
    masks = list(masks)
    p = len(units)
    if p < 2:
        alpha = _additivity_weight(n, masks, values[:, 0], units, 1.0) ** ADDITIVITY_EXPONENT
        b1, b2 = 1.0 - alpha, 0.0
    else:
        # beside the observed values, the jackknife carries the additive fit's residual and
        # STRUCTURE_PROBES probe residuals (for _jackknife_structure_ratio); the map is linear
        # and column by column, so the observed values' replicates are unchanged (to rounding)
        resid = _structure_columns(n, masks, values)
        col = np.hstack([values[:, :1], resid])
        reps = np.empty((3, p, n, col.shape[1]))
        for u, unit in enumerate(units):
            drop = set(unit)
            keep = [r for r, m in enumerate(masks) if m not in drop]
            reps[0, u], reps[1, u], reps[2, u] = _three_estimators(n, [masks[r] for r in keep], col[keep])
        full_dev = reps - reps.mean(axis=1, keepdims=True)
        dev = full_dev[..., 0]
        scale = (p - 1) / p
        d_ab, d_ar = dev[0] - dev[1], dev[0] - dev[2]
        c = scale * np.array([np.sum(dev[0] * d_ab), np.sum(dev[0] * d_ar)])
        g = scale * np.array([[np.sum(d_ab * d_ab), np.sum(d_ab * d_ar)], [np.sum(d_ab * d_ar), np.sum(d_ar * d_ar)]])
        gap = a_est[:, 0] - r_est[:, 0]
        g[1, 1] = max(g[1, 1], float(gap @ gap))
        b1, b2 = (float(x) for x in _box_quadratic(c, g))
        if not _sizes_covered(n, masks, units):  # the jackknife cannot see the extrapolation over an unsampled size
            floor = _additivity_weight(n, masks, values[:, 0], units, 0.0) ** ADDITIVITY_EXPONENT
            b1 = min(b1, 1.0 - floor)
            b2 = min(1.0, max(0.0, (c[1] - g[1, 0] * b1) / g[1, 1])) if g[1, 1] > 0 else 0.0
    est = a_est - b1 * (a_est - b_est) - b2 * (a_est - r_est)
    structure = None
    if p >= 2:
        mix = full_dev[0] - b1 * (full_dev[0] - full_dev[1]) - b2 * (full_dev[0] - full_dev[2])
        structure = _jackknife_structure_ratio(mix[..., 1:], resid[:, 0], len(masks) - n - 1)
    se, df = _residual_noise_se(n, masks, values, b1, b2, est[:, 0], validation_noise, bounds, structure)
    return est, se, df, 1.0 - b1


def with_on_alphas(matrix: CounterfactualMatrix, alphas: Mapping[str, float]) -> CounterfactualMatrix:
    """``matrix`` with each configuration's ``alpha_settings`` saying the alpha an "on" slot
    actually ran at (``alphas``; off stays 0.0). :func:`attribute` records 1.0 for "on"; an
    ``evaluate`` that leaves a blending seed at its current alpha (the reference system's)
    passes the real values here, so the record says what was measured."""
    known = {s: float(a) for s, a in alphas.items() if s in matrix.slot_ids}
    if not known:
        return matrix
    configs = tuple(
        dataclasses.replace(
            r, alpha_settings={s: (known.get(s, a) if a > 0.0 else a) for s, a in r.alpha_settings.items()}
        )
        for r in matrix.configs
    )
    return dataclasses.replace(matrix, configs=configs)


def split_examples(n_examples: int, attribution_fraction: float = 0.5, seed: int = 0) -> tuple[IntArray, IntArray]:
    """A fixed random split of the validation examples: ``(decision, attribution)`` indices.

    The controller decides on the first part; :func:`attribute` attributes on the second
    (``attribution_examples=``). The same seed gives the same split every epoch, so no
    example ever moves between the parts. Attribution on a fraction f of the examples widens
    the intervals by about ``1 / sqrt(f)`` (x1.41 at one half): the price of an unbiased
    interval for a seed that was kept *because* it looked good.
    """
    if not 0.0 < attribution_fraction < 1.0:
        raise ValueError(f"attribution_fraction must be in (0, 1), got {attribution_fraction}")
    if n_examples < 2:
        raise ValueError(f"splitting needs at least 2 examples, got {n_examples}")
    perm = np.random.default_rng(seed).permutation(n_examples).astype(np.int64)
    k = min(n_examples - 1, max(1, round(attribution_fraction * n_examples)))
    return np.sort(perm[k:]), np.sort(perm[:k])


def full_factorial_cost(n: int) -> int:
    """Distinct validation passes of the full factorial strategy: ``2**n``."""
    return 1 << _check_n(n)


def sampling_cost_bound(n: int, n_permutations: int, *, with_ablation_core: bool = True) -> int:
    """Upper bound on distinct validation passes of permutation sampling with the memo.

    Without the core: ``min(2**n, m*(n-1) + 2)``; :func:`attribute` also evaluates the
    ablation core (for removal costs), giving ``min(2**n, n + 2 + m*(n-2))`` for n >= 2.
    The bound counts m rounded down to whole antithetic pairs, as the sampler does.
    """
    n = _check_n(n)
    m = 2 * (max(int(n_permutations), 2) // 2)
    if with_ablation_core:
        core = n + 2 if n >= 2 else 2
        return min(1 << n, core + m * max(n - 2, 0))
    return min(1 << n, m * (n - 1) + 2)


# =========================================================================== Student t


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta (modified Lentz method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    # The continued fraction converges fast only for x < (a+1)/(a+b+2); use the symmetry
    # I_x(a, b) = 1 - I_{1-x}(b, a) on the other side.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom (``inf`` = normal)."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if df > 1e7:  # indistinguishable from the normal, and the beta form loses precision
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    tail = 0.5 * _betainc(0.5 * df, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def _student_t_pdf(t: float, df: float) -> float:
    if df > 1e7:
        return math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
    log_c = math.lgamma(0.5 * (df + 1.0)) - math.lgamma(0.5 * df) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - 0.5 * (df + 1.0) * math.log1p(t * t / df))


@functools.lru_cache(maxsize=256)  # attribute() asks for the same (p, df) for every slot
def student_t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t: the t with ``student_t_cdf(t, df) == p`` (|error| < 1e-9).

    ``df`` may be fractional (Welch-Satterthwaite) or ``inf`` (standard normal). Newton's
    method on the CDF, safeguarded by a bracket so it cannot diverge in the heavy tails.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    x = 0.5 * (lo + hi)
    for _ in range(100):
        f = student_t_cdf(x, df) - p
        if f < 0:
            lo = x
        else:
            hi = x
        pdf = _student_t_pdf(x, df)
        step = f / pdf if pdf > 0 else math.inf
        nxt = x - step
        if not lo < nxt < hi:  # Newton left the bracket: bisect instead
            nxt = 0.5 * (lo + hi)
        if abs(nxt - x) < 1e-13 * max(1.0, abs(x)) or hi - lo < 1e-13 * max(1.0, hi):
            return nxt
        x = nxt
    return x


# =========================================================================== orchestration


def seed_helps(est: ShapleyEstimate) -> bool:
    """Descriptive check: does this epoch's interval lie above 0 (``ci_low > 0``)?

    Not a claim rule. With a 95% two-sided interval a slot with zero true effect passes about
    2.5% of the time at *one* look, but checked every epoch for every seed it passes in most
    runs (61% of 100-epoch runs with 3 null seeds, docs/counterfactual-validity.md). Claims
    ("seed X helps", the console's star) come from :mod:`karn_otel.claims`. False when the
    interval is undefined (NaN).
    """
    return bool(est.ci_low > 0.0)  # NaN > 0 is False


class _BudgetedMemo:
    """Evaluates configurations at most once each, in batches, within the budgets.

    The budgets are checked between ``evaluate`` calls, never inside one: a call that has
    started always completes and its results are kept.
    """

    def __init__(
        self,
        evaluate: Evaluate,
        n: int,
        config: CounterfactualConfig,
        started: float,
        examples: npt.ArrayLike | None = None,
    ) -> None:
        self._examples = None if examples is None else np.asarray(examples)
        if self._examples is not None and self._examples.dtype != bool:
            self._examples = self._examples.astype(np.int64)
        self._evaluate = evaluate
        self._n = n
        self._max = config.max_configurations
        self._timeout = config.timeout_seconds
        self._started = started
        self.correct: dict[int, FloatArray] = {}  # bitmask -> per-example correctness
        self.loss: dict[int, FloatArray | None] = {}
        self.n_examples: int | None = None
        self.stopped_by: str | None = None  # "max_configurations" | "timeout_seconds"

    def __len__(self) -> int:
        return len(self.correct)

    def request(self, masks: Sequence[int], *, all_or_nothing: bool = False) -> bool:
        """Make sure ``masks`` are evaluated; return True when all of them are available.

        With ``all_or_nothing`` nothing is evaluated unless everything fits the
        configuration budget (a half-evaluated permutation pair is of no use); otherwise as
        many as fit are evaluated, in the given (priority) order.
        """
        new = list(dict.fromkeys(m for m in masks if m not in self.correct))
        if not new:
            return True
        if self.stopped_by is not None:
            return False
        if self._timeout is not None and time.monotonic() - self._started >= self._timeout:
            self.stopped_by = "timeout_seconds"
            return False
        truncated = False
        if self._max is not None and len(self.correct) + len(new) > self._max:
            room = self._max - len(self.correct)
            if all_or_nothing or room <= 0:
                self.stopped_by = "max_configurations"
                return False
            new, truncated = new[:room], True
        configs = [_mask_to_config(m, self._n) for m in new]
        results = self._evaluate(configs)
        if isinstance(results, (str, bytes)) or not isinstance(results, Sequence):
            results = list(results)  # a generator, or a numpy array of rows
        if len(results) != len(configs):
            raise ValueError(f"evaluate() returned {len(results)} results for {len(configs)} configurations")
        for mask, config, result in zip(new, configs, results, strict=True):
            self._store(mask, config, result)
        if truncated:
            self.stopped_by = "max_configurations"
            return False
        return True

    def _store(self, mask: int, config: tuple[bool, ...], result: ConfigEvaluation | np.ndarray) -> None:
        if isinstance(result, ConfigEvaluation):
            correct, loss = result.correct, result.loss
        else:
            correct, loss = result, None
        correct = _as_example_array(correct, f"correctness of {config}")
        if np.any((correct < 0.0) | (correct > 1.0)):
            raise ValueError(f"correctness of {config} must be 0/1 (or a fraction in [0, 1]) per example")
        if self.n_examples is None:
            if correct.shape[0] == 0:
                raise ValueError("evaluate() returned no validation examples")
            self.n_examples = correct.shape[0]
        elif correct.shape[0] != self.n_examples:
            raise ValueError(
                f"correctness of {config} has {correct.shape[0]} examples, expected {self.n_examples}: "
                "every configuration must be evaluated on the same validation examples"
            )
        if loss is not None:
            # A non-finite loss is kept: it is reported (val_loss), never used for attribution,
            # and "this ablation diverged" is worth recording rather than rejecting.
            loss = _as_example_array(loss, f"loss of {config}", allow_nonfinite=True)
            if loss.shape[0] != self.n_examples:
                raise ValueError(f"loss of {config} has {loss.shape[0]} examples, expected {self.n_examples}")
        if self._examples is not None:
            try:
                correct = correct[self._examples]
                loss = None if loss is None else loss[self._examples]
            except IndexError as e:
                raise ValueError(
                    f"attribution_examples do not fit {self.n_examples} validation examples: {e}"
                ) from None
            if correct.shape[0] == 0:
                raise ValueError("attribution_examples selects no validation example")
        self.correct[mask] = correct
        self.loss[mask] = loss


def _as_example_array(x: object, what: str, *, allow_nonfinite: bool = False) -> FloatArray:
    arr = np.asarray(x)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{what} must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D (one value per validation example), got shape {arr.shape}")
    arr = arr.astype(float)
    if not allow_nonfinite and not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains non-finite values")
    return arr


def _check_slot_ids(slot_ids: Sequence[str]) -> tuple[str, ...]:
    if isinstance(slot_ids, str):
        raise ValueError("slot_ids must be a sequence of slot id strings, not one string")
    slots = tuple(slot_ids)
    if not slots:
        raise ValueError("attribute() needs at least one slot")
    for s in slots:
        if not isinstance(s, str) or not s:
            raise ValueError(f"slot ids must be non-empty strings, got {s!r}")
    dupes = sorted({s for s in slots if slots.count(s) > 1})
    if dupes:
        raise ValueError(f"duplicate slot ids: {dupes}")
    return slots


def _bootstrap_accuracies(correct: FloatArray, n_boot: int, rng: np.random.Generator) -> FloatArray:
    """Accuracy of every configuration under ``n_boot`` resamples of the validation examples.

    ``correct`` is ``(n_configs, n_examples)``; returns ``(n_configs, n_boot)``. Resample b
    draws one set of example indices and applies it to every configuration (as counts, so
    the work is one matrix product per chunk).
    """
    n_configs, n_examples = correct.shape
    out = np.empty((n_configs, n_boot))
    chunk = max(1, min(n_boot, 4_000_000 // max(n_examples, 1)))  # bound the counts matrix
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        rows = stop - start
        idx = rng.integers(0, n_examples, size=(rows, n_examples))
        # One bincount over all rows: offset row r's indices by r * n_examples.
        flat = (idx + (np.arange(rows) * n_examples)[:, None]).ravel()
        counts = np.bincount(flat, minlength=rows * n_examples).reshape(rows, n_examples).astype(float)
        if correct.size * rows < 20_000_000:
            # Small products: numpy's own loop. Multithreaded BLAS can be 100x slower here
            # on a busy machine (thread start-up and spinning for microseconds of work).
            out[:, start:stop] = np.einsum("ce,be->cb", correct, counts, optimize=False) / n_examples
        else:
            out[:, start:stop] = correct @ counts.T / n_examples
    return out


def _estimate(
    mean: float, se_a: float, df_a: float, se_b: float, df_b: float, algorithm: str, n_samples: int, confidence: float
) -> ShapleyEstimate:
    """A ShapleyEstimate whose variance is ``se_a**2 + se_b**2`` (independent sources).

    The t degrees of freedom come from Welch-Satterthwaite; a source with a NaN error or
    df <= 0 makes the interval undefined (NaN), which :func:`seed_helps` reads as "no claim".
    """
    if not (math.isfinite(se_a) and math.isfinite(se_b)) or df_a <= 0 or df_b <= 0:
        return ShapleyEstimate(
            float(mean), float("nan"), n_samples, algorithm, float("nan"), float("nan"), confidence, float("nan")
        )
    var = se_a**2 + se_b**2
    std = math.sqrt(var)
    denom = se_a**4 / df_a + se_b**4 / df_b
    if se_a == 0.0 or se_b == 0.0:  # one source: its own df (the formula would round it)
        df = df_b if se_a == 0.0 else df_a
    else:
        df = var**2 / denom if denom > 0 else math.inf
    half = student_t_ppf(0.5 + confidence / 2.0, df) * std if std > 0 else 0.0
    low, high = float(mean - half), float(mean + half)
    return ShapleyEstimate(float(mean), float(std), n_samples, algorithm, low, high, confidence, float(df))


def attribute(
    evaluate: Evaluate,
    slot_ids: Sequence[str],
    config: CounterfactualConfig,
    *,
    epoch: int = 0,
    attribution_examples: npt.ArrayLike | None = None,
    on_alphas: Mapping[str, float] | None = None,
) -> CounterfactualMatrix:
    """Run the counterfactual pass for one epoch and return the attribution matrix.

    ``on_alphas`` (slot -> blend alpha): the alpha ``evaluate`` runs an "on" slot at, when it
    is not 1.0 (a seed mid-blend); every configuration's ``alpha_settings`` then records it
    (:func:`with_on_alphas`). Without it an "on" slot is recorded at 1.0.

    ``attribution_examples`` (indices, or a boolean mask over the validation examples)
    restricts every accuracy, attribution and interval to those examples: pass the
    attribution half of :func:`split_examples` when the controller decides (gates, culls)
    on the other half, so that a seed kept for looking good is not reported with an
    optimistic interval (docs/counterfactual-validity.md, "Selection").

    ``evaluate(configs)`` gets a list of configurations (tuples of bools in ``slot_ids``
    order; True = slot on, False = slot off at alpha 0.0) and returns, per configuration and in
    order, the per-example correctness on the validation set (a :class:`ConfigEvaluation`, or
    a plain array when the loss is not measured). Every configuration must be evaluated on
    the same examples. Each configuration is requested at most once; requests are batched
    (full factorial: a single call with all ``2**n`` unless a timeout is set, then the
    ablation core first and the rest in up to 16 chunks; sampling: one call per antithetic
    pair).

    The strategy is ``config.effective_strategy(len(slot_ids))`` (see the module docstring
    for costs). The result holds:

    * ``configs``: one :class:`CounterfactualResult` per evaluated configuration, ordered
      as in the spec's table (all off first); accuracy as a fraction, loss NaN if unknown;
    * ``marginal_contributions``: removal cost ``acc(all on) - acc(slot off)`` per slot;
    * ``interaction_effects``: inclusion-exclusion relative to the full configuration
      (:func:`interaction_effects`) for each pair ``(slot_a, slot_b)`` in slot order;
    * ``shapley_values``: exact (``"exact_enumeration"``, ``n_samples`` = bootstrap
      resamples) when all ``2**n`` configurations were evaluated, sampled
      (``"permutation_antithetic"``, ``n_samples`` = permutations) under the shapley
      strategy, else None (an ablation-only run with n >= 3 cannot identify them);
    * ``interaction_index``: the exact pairwise Shapley interaction index, full matrix only.

    Slots and pairs whose configurations were not evaluated are left out of the dicts.
    Budgets never raise: when ``max_configurations`` or ``timeout_seconds`` stops the work
    the matrix holds what was computed, with ``partial=True`` and the reason. Bad input
    (no slots, duplicate ids, malformed ``evaluate`` results) raises ValueError.
    """
    started = time.monotonic()
    slots = _check_slot_ids(slot_ids)
    n = len(slots)
    strategy = config.effective_strategy(n)
    memo = _BudgetedMemo(evaluate, n, config, started, attribution_examples)
    full = (1 << n) - 1
    # Priority order: with a configuration cap, these still give every removal cost.
    core = list(dict.fromkeys([full] + [full ^ (1 << i) for i in range(n)] + [0]))

    units: list[tuple[int, ...]] = []
    seq = np.random.SeedSequence(config.seed)
    perm_rng, boot_rng = (np.random.default_rng(s) for s in seq.spawn(2))

    if strategy == "full_factorial":
        in_core = set(core)
        # Under a cap, list only one more than fits (the memo needs to see the overflow to
        # report it): a forced factorial over 30 slots must not build 2**30 masks first.
        wanted = (1 << n) if config.max_configurations is None else min(1 << n, config.max_configurations + 1)
        rest_all = (m for m in range(full, -1, -1) if m not in in_core)
        rest = list(itertools.islice(rest_all, max(0, wanted - len(core))))
        if config.timeout_seconds is None:
            memo.request(core + rest)
        else:  # chunk so the timeout can stop a long (e.g. 2**10) factorial between calls
            size = max(1, math.ceil(len(rest) / 16))
            chunks = [core] + [rest[k : k + size] for k in range(0, len(rest), size)]
            for chunk in chunks:
                if not memo.request(chunk):
                    break
        progress = f"{len(memo)} of {1 << n} configurations evaluated"
    elif strategy == "ablation_only":
        memo.request(core)
        progress = f"{len(memo)} of {len(core)} ablation configurations evaluated"
    elif strategy == "shapley":
        planned = sampling_cost_bound(n, config.shapley_samples)
        budget = planned if config.max_configurations is None else min(planned, config.max_configurations)
        # The whole design is drawn up front within the budget (so the cap never cuts a unit in
        # half); the ablation core goes first, the rest in up to 16 calls so that a timeout
        # can stop the work between them.
        design, units = kernel_shap_design(n, budget, perm_rng)
        head, rest = design[: n + 2], design[n + 2 :]
        size = max(1, math.ceil(len(rest) / 16))
        for chunk in [head] + [rest[k : k + size] for k in range(0, len(rest), size)]:
            if chunk and not memo.request(chunk):
                break
        progress = f"{len(memo)} of {len(design)} planned configurations evaluated"
        if budget < planned and memo.stopped_by is None:
            memo.stopped_by = "max_configurations"
            progress = f"sampled within {budget} of the planned {planned} configurations"
    else:  # CounterfactualConfig validates the strategy; this guards a future addition
        raise ValueError(f"unknown counterfactual strategy {strategy!r}")

    partial_reason = None
    if memo.stopped_by == "max_configurations":
        partial_reason = f"max_configurations={config.max_configurations} reached: {progress}"
    elif memo.stopped_by == "timeout_seconds":
        partial_reason = (
            f"timeout_seconds={config.timeout_seconds} exceeded after {time.monotonic() - started:.3f} s: {progress}"
        )

    matrix = _build_matrix(memo, slots, config, strategy, epoch, units, boot_rng, started, partial_reason)
    return with_on_alphas(matrix, on_alphas) if on_alphas else matrix


def _build_matrix(
    memo: _BudgetedMemo,
    slots: tuple[str, ...],
    config: CounterfactualConfig,
    strategy: str,
    epoch: int,
    units: list[tuple[int, ...]],
    boot_rng: np.random.Generator,
    started: float,
    partial_reason: str | None,
) -> CounterfactualMatrix:
    n = len(slots)
    # Tuple order puts all-off first and all-on last, the first slot varying slowest: the
    # spec's table (000, 001, ..., 111 read as early-mid-late).
    masks = sorted(memo.correct, key=lambda m: _mask_to_config(m, n))
    results = []
    accuracy: dict[tuple[bool, ...], float] = {}
    for m in masks:
        cfg = _mask_to_config(m, n)
        acc = float(memo.correct[m].mean())
        loss = memo.loss[m]
        accuracy[cfg] = acc
        results.append(
            CounterfactualResult(
                config=cfg,
                alpha_settings={s: 1.0 if on else 0.0 for s, on in zip(slots, cfg, strict=True)},
                val_loss=float(loss.mean()) if loss is not None else float("nan"),
                val_accuracy=acc,
            )
        )

    removal = marginal_contributions(accuracy, n) if accuracy else np.full(n, np.nan)
    marginal = {s: float(removal[i]) for i, s in enumerate(slots) if not math.isnan(removal[i])}
    effects = interaction_effects(accuracy, n) if accuracy else np.full((n, n), np.nan)
    interactions = {
        (slots[i], slots[j]): float(effects[i, j])
        for i in range(n)
        for j in range(i + 1, n)
        if not math.isnan(effects[i, j])
    }

    shapley: dict[str, ShapleyEstimate] | None = None
    index: dict[tuple[str, str], float] | None = None
    synergy: dict[tuple[str, str], float] | None = None
    pair_ci: dict[str, tuple[dict[tuple[str, str], float], ...]] = {}
    n_boot = config.bootstrap_samples
    if memo.correct:
        order = list(memo.correct)
        row_of = {m: r for r, m in enumerate(order)}
        correct = np.stack([memo.correct[m] for m in order])
        # Column 0: the observed accuracies; columns 1..B: bootstrap replicates.
        observed = correct.mean(axis=1, keepdims=True)
        values = np.concatenate([observed, _bootstrap_accuracies(correct, n_boot, boot_rng)], axis=1)
        boot_df = n_boot - 1 if n_boot >= 2 else 0

        if len(order) == 1 << n:
            table = np.empty((1 << n, values.shape[1]))
            table[order] = values
            phi = shapley_exact(table, n)
            shapley = {}
            for i, s in enumerate(slots):
                se_boot = float(phi[i, 1:].std(ddof=1)) if n_boot >= 2 else float("nan")
                # Exact enumeration has no sampling error: the bootstrap is the only source.
                shapley[s] = _estimate(
                    phi[i, 0], 0.0, math.inf, se_boot, boot_df, EXACT_ALGORITHM, n_boot, config.confidence
                )
            sii = shapley_interaction_index(table, n)
            index = {(slots[i], slots[j]): float(sii[i, j, 0]) for i in range(n) for j in range(i + 1, n)}
            pair_ci["interaction_index"] = _pair_intervals(sii, slots, n_boot, config.confidence)
            pair_ci["synergy"] = _pair_intervals(mobius_dividends(table, n), slots, n_boot, config.confidence)
            synergy = {k: float(v) for k, v in pair_ci["synergy"][0].items()}
            co = _co_mobius_table(table, n)
            pair_ci["removal_interaction"] = _pair_intervals(co, slots, n_boot, config.confidence)
        elif strategy == "shapley" and 0 in row_of and (1 << n) - 1 in row_of:
            done = [u for u in units if all(m in row_of for m in u)]
            # (n, 1+B): the mixing weight comes from the observed column, so the map is linear in v
            est, se_sampling, df_sampling, _ = shapley_sampled_estimate(
                n, order, values, done, validation_noise=n_boot >= 2
            )
            shapley = {}
            for i, s in enumerate(slots):
                se_boot = float(est[i, 1:].std(ddof=1)) if n_boot >= 2 else 0.0
                df_boot = boot_df if n_boot >= 2 else math.inf  # no bootstrap: sampling noise only
                shapley[s] = _estimate(
                    est[i, 0],
                    float(se_sampling[i]),
                    df_sampling,
                    se_boot,
                    df_boot,
                    KERNEL_ALGORITHM,
                    len(order),
                    config.confidence,
                )

    return CounterfactualMatrix(
        epoch=int(epoch),
        slot_ids=slots,
        configs=tuple(results),
        marginal_contributions=marginal,
        interaction_effects=interactions,
        shapley_values=shapley,
        strategy=strategy,
        interaction_index=index,
        n_evaluations=len(memo),
        partial=partial_reason is not None,
        partial_reason=partial_reason,
        elapsed_s=time.monotonic() - started,
        synergy_dividends=synergy,
        synergy_ci_low=pair_ci["synergy"][1] if "synergy" in pair_ci else None,
        synergy_ci_high=pair_ci["synergy"][2] if "synergy" in pair_ci else None,
        interaction_index_ci_low=pair_ci["interaction_index"][1] if "interaction_index" in pair_ci else None,
        interaction_index_ci_high=pair_ci["interaction_index"][2] if "interaction_index" in pair_ci else None,
        removal_interaction_ci_low=pair_ci["removal_interaction"][1] if "removal_interaction" in pair_ci else None,
        removal_interaction_ci_high=pair_ci["removal_interaction"][2] if "removal_interaction" in pair_ci else None,
    )


def _co_mobius_table(table: FloatArray, n: int) -> FloatArray:
    """:func:`interaction_effects` on a dense ``(2**n, k)`` table: shape ``(n, n, k)``."""
    full = (1 << n) - 1
    out = np.full((n, n) + table.shape[1:], np.nan)
    for i in range(n):
        for j in range(i + 1, n):
            bi, bj = 1 << i, 1 << j
            out[i, j] = out[j, i] = table[full] - table[full ^ bi] - table[full ^ bj] + table[full ^ bi ^ bj]
    return out


def _pair_intervals(
    mat: FloatArray, slots: tuple[str, ...], n_boot: int, confidence: float
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """Point values (column 0) and bootstrap t intervals (columns 1..B) of a pair matrix.

    The interval is ``point +- t((1 + confidence) / 2, B - 1) * sd(bootstrap)``, as for the
    exact Shapley values; NaN with fewer than 2 resamples.
    """
    n = len(slots)
    point: dict[tuple[str, str], float] = {}
    low: dict[tuple[str, str], float] = {}
    high: dict[tuple[str, str], float] = {}
    q = student_t_ppf(0.5 + confidence / 2.0, n_boot - 1) if n_boot >= 2 else float("nan")
    for i in range(n):
        for j in range(i + 1, n):
            key = (slots[i], slots[j])
            point[key] = float(mat[i, j, 0])
            sd = float(mat[i, j, 1:].std(ddof=1)) if n_boot >= 2 else float("nan")
            low[key], high[key] = point[key] - q * sd, point[key] + q * sd
    return point, low, high
