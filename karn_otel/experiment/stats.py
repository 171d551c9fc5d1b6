"""Cross-run statistics for `karn compare` (spec P3 #13, ExperimentAggregation).

Two groups of per-run numbers (morph runs vs their control twins, or vs a baseline set) are
compared the way a reviewer asks for, with scipy doing the statistics:

* mean and standard deviation (``ddof=1``) of each group;
* Welch's t-test p-value (``scipy.stats.ttest_ind(equal_var=False)``; no equal-variance
  assumption); when the runs are paired by seed, the paired t-test too;
* Cohen's d with the pooled standard deviation, and Hedges' g, its small-sample correction
  (the exact factor ``J = Γ(df/2) / (√(df/2) Γ((df−1)/2))``);
* a bootstrap 95% interval of the difference of means (``scipy.stats.bootstrap``, BCa);
* the interquartile mean (``scipy.stats.trim_mean(x, 0.25)``, as rliable) of each group with
  a stratified-bootstrap 95% interval (resampling runs within each stratum — one stratum per
  task; one task here).

Below :data:`MIN_RUNS` runs per group the numbers are not computed: the result says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

MIN_RUNS = 2  # a t-test needs two runs per group; 5 or more are recommended (docs/experiments.md)
CONFIDENCE = 0.95
N_BOOTSTRAP = 10_000
IQM_TRIM = 0.25


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def __contains__(self, x: float) -> bool:
        return self.low <= x <= self.high


@dataclass(frozen=True)
class GroupStats:
    n: int
    mean: float
    std: float  # ddof=1; NaN for n = 1
    iqm: float
    iqm_ci: Interval


@dataclass(frozen=True)
class Comparison:
    """Group A vs group B on one quantity (A − B)."""

    quantity: str
    a: GroupStats
    b: GroupStats
    difference: float  # mean(A) - mean(B)
    difference_ci: Interval  # bootstrap (BCa) of the difference of means
    welch_p: float
    cohens_d: float
    hedges_g: float
    paired_p: float | None = None  # paired t-test when the runs pair up by seed
    paired_n: int = 0
    # No spread within the groups (or among the paired differences): the t-tests are undefined
    # and the p-values above are conventions (1 for equal means, 0 otherwise), not evidence.
    no_spread: bool = False
    paired_no_spread: bool = False


@dataclass(frozen=True)
class NotEnoughRuns:
    quantity: str
    n_a: int
    n_b: int

    @property
    def message(self) -> str:
        return (
            f"{self.quantity}: not enough runs ({self.n_a} vs {self.n_b}; at least {MIN_RUNS} per group, "
            f"5 or more recommended) — run more seeds (karn run --seeds ...)"
        )


def _no_spread(*arrays: np.ndarray) -> bool:
    """Every array constant up to float rounding (scipy's tests are undefined or unstable there)."""
    return all(float(np.ptp(a)) <= 1e-12 * max(1.0, float(np.max(np.abs(a)))) for a in arrays)


def cohens_d(a: Sequence[float], b: Sequence[float]) -> float:
    """Standardised mean difference with the pooled standard deviation (ddof=1)."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    na, nb = len(x), len(y)
    pooled = math.sqrt(((na - 1) * x.var(ddof=1) + (nb - 1) * y.var(ddof=1)) / (na + nb - 2))
    diff = float(x.mean() - y.mean())
    if pooled == 0.0 or _no_spread(x, y):
        return 0.0 if abs(diff) <= 1e-12 * max(1.0, abs(float(x.mean()))) else math.copysign(math.inf, diff)
    return diff / pooled


def hedges_correction(df: int) -> float:
    """The exact small-sample factor J(df) of Hedges' g."""
    return float(math.exp(special.gammaln(df / 2) - special.gammaln((df - 1) / 2)) / math.sqrt(df / 2))


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float:
    return cohens_d(a, b) * hedges_correction(len(a) + len(b) - 2)


def iqm(x: Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle 50% (rliable's aggregate)."""
    return float(stats.trim_mean(np.asarray(x, float), IQM_TRIM))


def stratified_bootstrap_ci(
    strata: Sequence[Sequence[float]], n_resamples: int = N_BOOTSTRAP, seed: int = 0
) -> Interval:
    """Percentile interval of the IQM over all runs, resampling runs with replacement within
    each stratum (rliable's stratified bootstrap; a stratum is one task). Vectorised: one
    (n_resamples x n_runs) draw per stratum."""
    rng = np.random.default_rng(seed)
    draws = [np.asarray(s, float)[rng.integers(0, len(s), (n_resamples, len(s)))] for s in strata]
    values = stats.trim_mean(np.concatenate(draws, axis=1), IQM_TRIM, axis=1)
    alpha = 1 - CONFIDENCE
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return Interval(float(lo), float(hi))


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def bootstrap_difference_ci(a: Sequence[float], b: Sequence[float], seed: int = 0) -> Interval:
    x, y = np.asarray(a, float), np.asarray(b, float)
    if _no_spread(x, y):  # no spread: the interval is the point
        d = float(x.mean() - y.mean())
        return Interval(d, d)
    res = stats.bootstrap(
        (x, y),
        _mean_difference,
        n_resamples=N_BOOTSTRAP,
        confidence_level=CONFIDENCE,
        method="BCa",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return Interval(float(res.confidence_interval.low), float(res.confidence_interval.high))


def group_stats(x: Sequence[float], seed: int = 0) -> GroupStats:
    arr = np.asarray(x, float)
    return GroupStats(
        n=len(arr),
        mean=float(arr.mean()),
        std=float(arr.std(ddof=1)) if len(arr) > 1 else math.nan,
        iqm=iqm(arr),
        iqm_ci=stratified_bootstrap_ci([arr], seed=seed),
    )


def compare(
    quantity: str,
    a: Sequence[float],
    b: Sequence[float],
    pairs: Sequence[tuple[float, float]] = (),
    seed: int = 0,
) -> Comparison | NotEnoughRuns:
    """A vs B on ``quantity``; ``pairs`` (a, b) of runs that share a seed add a paired test."""
    if len(a) < MIN_RUNS or len(b) < MIN_RUNS:
        return NotEnoughRuns(quantity, len(a), len(b))
    x, y = np.asarray(a, float), np.asarray(b, float)
    if _no_spread(x, y):
        welch = 1.0 if math.isclose(x.mean(), y.mean(), rel_tol=1e-12, abs_tol=1e-15) else 0.0  # scipy: NaN
    else:
        welch = float(stats.ttest_ind(x, y, equal_var=False).pvalue)
    paired_p = None
    paired_flat = False
    if len(pairs) >= MIN_RUNS:
        pa, pb = np.asarray([p[0] for p in pairs]), np.asarray([p[1] for p in pairs])
        diffs = pa - pb
        paired_flat = _no_spread(diffs)  # the same rule as above (exact equality let rounding noise through)
        if paired_flat:
            paired_p = 1.0 if abs(float(diffs.mean())) <= 1e-12 * max(1.0, float(np.max(np.abs(pa)))) else 0.0
        else:
            paired_p = float(stats.ttest_rel(pa, pb).pvalue)
    return Comparison(
        quantity=quantity,
        a=group_stats(x, seed),
        b=group_stats(y, seed + 1),
        difference=float(x.mean() - y.mean()),
        difference_ci=bootstrap_difference_ci(x, y, seed),
        welch_p=welch,
        cohens_d=cohens_d(x, y),
        hedges_g=hedges_g(x, y),
        paired_p=paired_p,
        paired_n=len(pairs),
        no_spread=_no_spread(x, y),
        paired_no_spread=paired_flat,
    )


@dataclass(frozen=True)
class OneSample:
    """One set of per-run numbers against a null value (e.g. paired deltas against 0)."""

    quantity: str
    null: float
    stats: GroupStats
    mean_ci: Interval  # bootstrap (BCa) of the mean
    p_value: float  # one-sample t-test against ``null`` (two-sided)
    no_spread: bool = False  # every run gave the same number: p_value is a convention, not a test


def describe(quantity: str, x: Sequence[float], null: float = 0.0, seed: int = 0) -> OneSample | NotEnoughRuns:
    if len(x) < MIN_RUNS:
        return NotEnoughRuns(quantity, len(x), len(x))
    arr = np.asarray(x, float)
    if _no_spread(arr):
        m = float(arr.mean())
        ci, p = Interval(m, m), (1.0 if math.isclose(m, null, rel_tol=1e-12, abs_tol=1e-15) else 0.0)
    else:
        res = stats.bootstrap(
            (arr,),
            np.mean,
            n_resamples=N_BOOTSTRAP,
            confidence_level=CONFIDENCE,
            method="BCa",
            vectorized=True,
            rng=np.random.default_rng(seed),
        )
        ci = Interval(float(res.confidence_interval.low), float(res.confidence_interval.high))
        p = float(stats.ttest_1samp(arr, null).pvalue)
    return OneSample(quantity, null, group_stats(arr, seed), ci, p, no_spread=_no_spread(arr))
