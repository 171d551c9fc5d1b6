"""Shapley sampling error vs budget: antithetic pairs + memo against plain permutation sampling.

Run: ``python benchmarks/bench_shapley_sampling.py`` (about 10 s, numpy only).

The game has 8 players and interactions of every order: ``v(S) = sum over T in S of d_T``
with a random Harsanyi dividend ``d_T`` on each of the 255 non-empty subsets. Two games:

* "decaying": ``d_T ~ N(0, 1) * 0.5**(|T|-1)``, higher-order synergies weaker (the usual case);
* "flat": ``d_T ~ N(0, 1)`` on every subset, as hostile to sampling as it gets.

For every replication the antithetic sampler (``karn_otel.counterfactual.
shapley_permutation_antithetic``, m permutations = m/2 pairs, memoised) is run first and the
number D of distinct configurations it evaluated is recorded. The plain sampler (independent
uniform permutations) then gets the same budget: with the memo it takes permutations while
its distinct count stays <= D; without a memo every permutation costs n - 1 fresh
evaluations (the empty and full coalitions are counted once), so it gets (D - 2) // (n - 1)
permutations. RMSE is over players and replications, against the exact values.

Why antithetic pairs help: in a permutation and its reverse every pair {i, j} appears in
both orders, so the pairwise dividend is split exactly; only third- and higher-order terms
are left to sampling noise.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from karn_otel.counterfactual import shapley_exact, shapley_permutation_antithetic  # noqa: E402

N_PLAYERS = 8
BUDGETS = (2, 4, 8, 16, 32)  # antithetic permutations (pairs x 2); sets D for each replication
REPLICATIONS = 1000


def random_game(n: int, rng: np.random.Generator, decay: float) -> np.ndarray:
    """Game values indexed by bitmask from random dividends on all non-empty subsets."""
    masks = np.arange(1 << n)
    sizes = np.array([bin(m).count("1") for m in masks])
    v = np.zeros(1 << n)
    for t in range(1, 1 << n):
        v[(masks & t) == t] += rng.normal() * decay ** (sizes[t] - 1)
    return v


def plain_with_memo(v: np.ndarray, n: int, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Independent permutations, memoised, while the distinct-evaluation count stays <= budget."""
    seen = {0, (1 << n) - 1}
    total = np.zeros(n)
    used = 0
    while True:
        perm = rng.permutation(n)
        prefixes = np.cumsum([1 << int(p) for p in perm])
        new = {int(m) for m in prefixes} - seen
        if len(seen) + len(new) > budget:
            break
        seen |= new
        prev = v[0]
        for player, m in zip(perm, prefixes, strict=True):
            total[player] += v[m] - prev
            prev = v[m]
        used += 1
    return total / used if used else np.zeros(n)


def plain_without_memo(v: np.ndarray, n: int, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Independent permutations, every prefix paid for: (budget - 2) // (n - 1) of them."""
    k = max(1, (budget - 2) // (n - 1))
    total = np.zeros(n)
    for _ in range(k):
        perm = rng.permutation(n)
        prev, m = v[0], 0
        for player in perm:
            m |= 1 << int(player)
            total[player] += v[m] - prev
            prev = v[m]
    return total / k


def run(name: str, v: np.ndarray) -> None:
    n = N_PLAYERS
    exact = shapley_exact(v, n)
    print(f"\n{name} game: exact Shapley values {np.round(exact, 3).tolist()} (sd across players {exact.std():.3f})")
    print(
        f"{'perms':>5} {'mean D':>7} {'antithetic+memo':>16} {'plain+memo':>11} {'plain, no memo':>15}"
        f" {'ratio memo':>11} {'ratio no memo':>14}"
    )
    for m in BUDGETS:
        err_anti, err_memo, err_naive, d_anti = [], [], [], []
        for rep in range(REPLICATIONS):
            calls: list[int] = []

            def value_fn(config: tuple[bool, ...], calls: list[int] = calls) -> float:
                mask = sum(1 << i for i, on in enumerate(config) if on)
                calls.append(mask)
                return float(v[mask])

            est, _, _ = shapley_permutation_antithetic(value_fn, n, m, np.random.default_rng(rep))
            budget = len(set(calls) | {0, (1 << n) - 1})
            rng = np.random.default_rng(10_000 + rep)
            err_anti.append(est - exact)
            err_memo.append(plain_with_memo(v, n, budget, rng) - exact)
            err_naive.append(plain_without_memo(v, n, budget, rng) - exact)
            d_anti.append(budget)
        rmse = [float(np.sqrt(np.mean(np.square(e)))) for e in (err_anti, err_memo, err_naive)]
        print(
            f"{m:>5} {np.mean(d_anti):>7.1f} {rmse[0]:>16.4f} {rmse[1]:>11.4f} {rmse[2]:>15.4f}"
            f" {rmse[1] / rmse[0]:>11.2f} {rmse[2] / rmse[0]:>14.2f}"
        )


def main() -> None:
    started = time.perf_counter()
    rng = np.random.default_rng(20251214)
    print(
        f"Shapley sampling RMSE at equal distinct evaluations D (n = {N_PLAYERS}, 2**n = {1 << N_PLAYERS},"
        f" {REPLICATIONS} replications per row; ratio = plain RMSE / antithetic RMSE, > 1 favours antithetic)"
    )
    run("decaying", random_game(N_PLAYERS, rng, decay=0.5))
    run("flat", random_game(N_PLAYERS, rng, decay=1.0))
    print(f"\nelapsed {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
