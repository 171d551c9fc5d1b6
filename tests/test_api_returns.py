"""The return checks' error rates over simulated RL runs: what `return_regression` claims
(the run lost most of what it had learned) is checked against runs where it is true and
runs where it is not."""

from __future__ import annotations

import numpy as np

from karn_otel.health import ReturnMonitor


def _fires(returns) -> bool:
    m = ReturnMonitor()
    return any(a.check == "return_regression" for r in returns for a in m._edges(m._return(float(r))))


def _rate(make, n, seed):
    rng = np.random.default_rng(seed)
    return float(np.mean([_fires(make(rng)) for _ in range(n)]))


def _learn(rng):
    return np.linspace(20, 200, 150) + rng.normal(0, 30, 150)


def test_false_alarms_are_rare_on_flat_and_plateaued_runs():
    # A random CartPole policy's returns are roughly geometric (mean ~22, spread ~ the mean).
    assert _rate(lambda rng: rng.geometric(1 / 22, 300), 200, 0) <= 0.02
    assert _rate(lambda rng: rng.normal(100, 50, 1000), 100, 1) <= 0.02
    assert _rate(lambda rng: np.concatenate([_learn(rng), rng.normal(200, 60, 600)]), 100, 2) <= 0.02


def test_a_collapse_of_the_learned_gain_is_caught():
    assert _rate(lambda rng: np.concatenate([_learn(rng), rng.normal(40, 20, 60)]), 100, 3) >= 0.95
    assert _rate(lambda rng: np.concatenate([_learn(rng), rng.normal(90, 30, 60)]), 100, 4) >= 0.95
