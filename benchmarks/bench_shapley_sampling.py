"""Karn's Shapley sampler against shapiq's approximators at equal budgets of distinct evaluations.

Run: ``python benchmarks/bench_shapley_sampling.py [--reps 100] [--n 6 8 10 12] [--quick]``
(numpy + shapiq, the test extra; about 8 minutes at the defaults on one core; ``--quick``:
10 games per cell, n = 6, 8, 10, under a minute). The RMSEs use ``--reps`` games per cell and
the coverage of Karn's intervals ``--cover-reps`` (100, at least ``--reps``). Both default to
100 games: at 30 a ratio's 95% interval over the games spans about 0.3 (one cell read 1.06
[0.93, 1.22] at 30 games and 0.96 [0.88, 1.03] at 100), and a calibrated 95% interval's
per-cell coverage has a standard error of about 0.015-0.025 (the players of a game share one
fit), so it would fall below 0.93 in some cells by chance.

For every game family, number of players n and budget (2n, 4n, 8n, 16n distinct
evaluations, below 2**n), each replication draws a game, computes its exact Shapley values
(:func:`karn_otel.counterfactual.shapley_exact`), and asks each estimator for the Shapley
values within the budget:

* **karn**: ``attribute(strategy="shapley", max_configurations=budget)``, the code path a
  user runs (paired, size-stratified kernel design with the ablation core; the estimate is a
  variance-weighted mix of the regression-adjusted kernel regression and the stratified
  estimator, :func:`karn_otel.counterfactual.shapley_sampled_estimate`);
* shapiq 1.4's **KernelSHAP** (pairing trick on), **SVARM**, **StratifiedSamplingSV** and
  **PermutationSamplingSV**, each with ``budget``; the game is wrapped to count the distinct
  coalitions each one evaluates (never more than the budget).

The error is the relative RMSE ``sqrt(mean over replications of |est - exact|^2 / |exact|^2)``;
``ratio`` = karn's / the best shapiq approximator's in that cell (<= 1.0: Karn at least as
accurate). Games (values indexed by bitmask; ``v(empty) = 0`` up to a constant):

* ``additive_noise``: ``v(S) = sum_{i in S} w_i + 0.2 eps(S)``, w, eps ~ N(0, 1);
* ``decaying``: a Harsanyi dividend on every subset T, ``N(0, 1) * 0.5**(|T| - 1)``;
* ``sparse_high_order``: 8 unanimity games on random subsets of size 3..n, N(0, 1) weights;
* ``soum``: a sum of 30 unanimity models on random subsets of size 1..n, U(-1, 1) weights
  (shapiq's SOUM benchmark family).

Karn's ``evaluate`` must return accuracies in [0, 1], so each game is mapped affinely into
[0.05, 0.95] for it (relative errors do not change under that map).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from karn_otel.config import CounterfactualConfig  # noqa: E402
from karn_otel.counterfactual import attribute, shapley_exact  # noqa: E402

FAMILIES = ("additive_noise", "decaying", "sparse_high_order", "soum")
SHAPIQ = ("KernelSHAP", "SVARM", "StratifiedSamplingSV", "PermutationSamplingSV")


def _unanimity(v: np.ndarray, masks: np.ndarray, n: int, size: int, weight: float, rng: np.random.Generator) -> None:
    t = int(sum(1 << int(i) for i in rng.choice(n, size, replace=False)))
    v[(masks & t) == t] += weight


def make_game(family: str, n: int, rng: np.random.Generator) -> np.ndarray:
    masks = np.arange(1 << n)
    v = np.zeros(1 << n)
    if family == "additive_noise":
        w = rng.normal(size=n)
        v = ((masks[:, None] >> np.arange(n)) & 1) @ w + 0.2 * rng.normal(size=1 << n)
        v[0] = 0.0
    elif family == "decaying":
        sizes = np.array([bin(m).count("1") for m in masks])
        for t in range(1, 1 << n):
            v[(masks & t) == t] += rng.normal() * 0.5 ** (sizes[t] - 1)
    elif family == "sparse_high_order":
        for _ in range(8):
            _unanimity(v, masks, n, int(rng.integers(3, n + 1)), rng.normal(), rng)
    elif family == "soum":
        for _ in range(30):
            _unanimity(v, masks, n, int(rng.integers(1, n + 1)), rng.uniform(-1, 1), rng)
    else:
        raise ValueError(family)
    return v


def karn_estimate(v: np.ndarray, n: int, budget: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    lo, hi = v.min(), v.max()
    scale = 0.9 / (hi - lo) if hi > lo else 1.0
    acc = 0.05 + (v - lo) * scale  # into [0.05, 0.95]
    weights = 1 << np.arange(n)

    def evaluate(configs: list[tuple[bool, ...]]) -> list[np.ndarray]:
        return [np.array([acc[int(np.dot(np.asarray(c, dtype=np.int64), weights))]]) for c in configs]

    cfg = CounterfactualConfig(
        strategy="shapley", shapley_samples=10_000, max_configurations=budget, bootstrap_samples=0, seed=seed
    )
    m = attribute(evaluate, [f"p{i}" for i in range(n)], cfg)
    assert m.shapley_values is not None and m.n_evaluations <= budget
    est = [m.shapley_values[f"p{i}"] for i in range(n)]
    interval = np.array([[e.ci_low, e.ci_high] for e in est]) / scale  # (n, 2); NaN: no interval
    return np.array([e.mean for e in est]) / scale, interval, m.n_evaluations


def ratio_interval(sq: dict[str, list[float]], n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% paired bootstrap interval of the ratio: the games are resampled, the same ones for
    every estimator, and the best shapiq approximator is re-chosen in each resample."""
    errors = {k: np.asarray(e) for k, e in sq.items()}
    idx = rng.integers(0, len(errors["karn"]), size=(n_boot, len(errors["karn"])))
    best = np.min([errors[k][idx].mean(axis=1) for k in SHAPIQ], axis=0)
    ratios = np.sqrt(errors["karn"][idx].mean(axis=1) / best)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def shapiq_estimate(name: str, v: np.ndarray, n: int, budget: int, seed: int) -> tuple[np.ndarray, int]:
    import shapiq.approximator as approx

    weights = 1 << np.arange(n)
    seen: set[int] = set()

    def game(coalitions: np.ndarray) -> np.ndarray:
        c = np.asarray(coalitions, dtype=bool)
        idx = np.atleast_1d(c.reshape(-1, n) @ weights)
        seen.update(int(i) for i in idx)
        return v[idx]

    if name == "KernelSHAP":
        a = approx.KernelSHAP(n, pairing_trick=True, random_state=seed)
    else:
        a = getattr(approx, name)(n, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        iv = a.approximate(budget, game)
    est = np.array([iv[(i,)] for i in range(n)], dtype=float)
    est = np.where(np.isfinite(est), est, 0.0)  # a NaN estimate counts as 0 (a large error)
    assert len(seen) <= budget, (name, len(seen), budget)
    return est, len(seen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=None, help="games per cell for the RMSE (100; 10 with --quick)")
    p.add_argument("--n", type=int, nargs="+", default=None, help="players (6 8 10 12; 6 8 10 with --quick)")
    p.add_argument("--quick", action="store_true", help="10 games per cell, n = 6 8 10")
    p.add_argument("--mult", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples for the ratio's interval")
    p.add_argument(
        "--cover-reps", type=int, default=None, help="games per cell for the coverage (100; 30 with --quick)"
    )
    p.add_argument("--seed-offset", type=int, default=0, help="another set of games and designs (0: the default set)")
    args = p.parse_args()
    if args.reps is None:
        args.reps = 10 if args.quick else 100
    if args.cover_reps is None:
        args.cover_reps = max(args.reps, 30 if args.quick else 100)
    if args.n is None:
        args.n = [6, 8, 10] if args.quick else [6, 8, 10, 12]
    started = time.perf_counter()
    print(f"relative RMSE over {args.reps} games per cell; ratio = karn / best shapiq (<= 1.0: karn at least as good)")
    print(
        "[lo, hi]: 95% paired bootstrap interval of the ratio over the games (containing 1.0: a tie at this"
        " many games); cover: share of karn's 95% intervals (sampling error) that contain the exact value"
        f" over {args.cover_reps} games ('-': no interval in this cell), se: its standard error over the games"
    )
    print(
        f"{'family':<18} {'n':>3} {'budget':>6} {'karn':>8} "
        + " ".join(f"{s[:10]:>10}" for s in SHAPIQ)
        + f" {'best':>10} {'ratio':>6} {'[lo, hi]':>13} {'cover':>6} {'se':>5}"
    )
    boot_rng = np.random.default_rng(12345)
    ratios: list[float] = []
    verdicts: list[str] = []
    hits = total = 0
    cell_cover: list[tuple[int, float, float]] = []  # (budget multiple, coverage, its se) per cell
    by_family: dict[str, list[float]] = {}
    for family in args.families:
        for n in args.n:
            for mult in args.mult:
                budget = mult * n
                if budget >= 1 << n:
                    continue
                sq: dict[str, list[float]] = {name: [] for name in ("karn",) + SHAPIQ}
                cell_hits = cell_total = 0
                game_cover: list[float] = []  # per game: share of its players covered
                for r in range(max(args.reps, args.cover_reps)):
                    rng = np.random.default_rng(1_000_003 * r + 7919 * n + FAMILIES.index(family) + args.seed_offset)
                    v = make_game(family, n, rng)
                    exact = shapley_exact(v, n)
                    norm2 = float(np.sum(exact**2)) or 1.0
                    est, interval, _ = karn_estimate(v, n, budget, seed=r + args.seed_offset)
                    finite = np.isfinite(interval).all(axis=1)
                    inside = (interval[:, 0] <= exact) & (exact <= interval[:, 1])
                    if r < args.cover_reps:
                        cell_hits += int(np.sum(inside & finite))
                        cell_total += int(np.sum(finite))
                        if finite.all():
                            game_cover.append(float(inside.mean()))
                    if r >= args.reps:  # a coverage-only game
                        continue
                    sq["karn"].append(np.sum((est - exact) ** 2) / norm2)
                    for name in SHAPIQ:
                        est, _ = shapiq_estimate(name, v, n, budget, seed=r + args.seed_offset)
                        sq[name].append(np.sum((est - exact) ** 2) / norm2)
                rmse = {k: math.sqrt(float(np.mean(e))) for k, e in sq.items()}
                best = min(SHAPIQ, key=lambda k: rmse[k])
                ratio = rmse["karn"] / rmse[best]
                lo, hi = ratio_interval(sq, args.boot, boot_rng)
                ratios.append(ratio)
                verdicts.append("win" if hi < 1.0 else "loss" if lo > 1.0 else "tie")
                by_family.setdefault(family, []).append(ratio)
                hits, total = hits + cell_hits, total + cell_total
                cover_se = (
                    float(np.std(game_cover, ddof=1) / math.sqrt(len(game_cover))) if len(game_cover) > 1 else 0.0
                )
                if cell_total:
                    cell_cover.append((mult, cell_hits / cell_total, cover_se))
                cover = f"{cell_hits / cell_total:>6.3f}" if cell_total else f"{'-':>6}"
                if len(game_cover) > 1:  # the game is the independent unit (its players share one fit)
                    cover += f" {cover_se:>5.3f}"
                print(
                    f"{family:<18} {n:>3} {budget:>6} {rmse['karn']:>8.4f} "
                    + " ".join(f"{min(rmse[s], 9999.0):>10.4f}" for s in SHAPIQ)
                    + f" {best[:10]:>10} {ratio:>6.2f} [{lo:>5.2f}, {hi:>5.2f}] {cover}",
                    flush=True,
                )
    print()
    for family, fr in by_family.items():
        f = np.array(fr)
        print(
            f"{family:<18} ratio median {np.median(f):.2f}, max {f.max():.2f}, cells <= 1.0: {(f <= 1.0).sum()} / {len(f)}"
        )
    r = np.array(ratios)
    print(
        f"{len(r)} cells: ratio median {np.median(r):.2f}, max {r.max():.2f}, cells <= 1.0: {(r <= 1.0).sum()}"
        f"; elapsed {time.perf_counter() - started:.0f} s"
    )
    print(
        f"paired bootstrap: karn better (interval below 1.0) in {verdicts.count('win')}, tie in"
        f" {verdicts.count('tie')}, worse (interval above 1.0) in {verdicts.count('loss')} cells"
    )
    if total:
        print(f"coverage of karn's 95% intervals where given: {hits / total:.3f} ({hits} of {total} player-games)")
        cc = np.array([c for _, c, _ in cell_cover])
        ce = np.array([e for _, _, e in cell_cover])
        print(
            f"per cell ({len(cc)} cells with intervals): coverage min {cc.min():.3f}, max {cc.max():.3f},"
            f" cells below 0.93: {(cc < 0.93).sum()} (of which below by more than 1.96 se: {(cc + 1.96 * ce < 0.93).sum()}),"
            f" above 0.97: {(cc > 0.97).sum()}"
        )
        for mult in sorted({m for m, _, _ in cell_cover}):
            cm = np.array([c for m, c, _ in cell_cover if m == mult])
            print(f"  budget {mult:>2}n: {len(cm)} cells, coverage min {cm.min():.3f}, median {np.median(cm):.3f}")


if __name__ == "__main__":
    main()
