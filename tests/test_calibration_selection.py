"""Selection bias: a seed kept *because* it looked good, attributed on the same examples or not.

The controller keeps the seed that looks best of four on the examples it decides on (and
culls the others). All seeds here are null (true contribution exactly 0; they flip
predictions both ways, tests/test_calibration.py's model). Measured on the kept seeds:

* same examples for deciding and attributing: the reported contribution is biased upwards
  and its 95% interval covers the truth less often than 95%;
* a fixed decision/attribution split (:func:`karn_otel.counterfactual.split_examples`):
  no bias, nominal coverage, intervals about sqrt(2) wider.
"""

from __future__ import annotations

import numpy as np
import pytest

from karn_otel.config import CounterfactualConfig
from karn_otel.counterfactual import attribute, split_examples
from tests.test_calibration import Examples

SLOTS = ["a", "b", "c", "d"]


def _selection(reps=400, n_ex=800, seed=0):
    rng = np.random.default_rng(seed)
    decide, attrib = split_examples(n_ex, 0.5, seed=1)
    out = {"same": [], "split": []}
    for r in range(reps):
        ex = Examples(rng, n_ex, len(SLOTS), [0.0] * len(SLOTS), synergy=False)

        def evaluate(configs, ex=ex):
            return [ex.correct(c) for c in configs]

        cfg = CounterfactualConfig(strategy="full_factorial", seed=r)
        same = attribute(evaluate, SLOTS, cfg)
        split = attribute(evaluate, SLOTS, cfg, attribution_examples=attrib)
        # kept: the best-looking seed on the examples the controller saw (all of them) ...
        e = max(same.shapley_values.values(), key=lambda est: est.mean)
        out["same"].append((e.mean, e.ci_low <= 0.0 <= e.ci_high, e.ci_high - e.ci_low))
        # ... or on the decision half only, then attributed on the other half
        best = SLOTS[int(np.argmax(ex.flips()[:, decide].mean(axis=1)))]
        e = split.shapley_values[best]
        out["split"].append((e.mean, e.ci_low <= 0.0 <= e.ci_high, e.ci_high - e.ci_low))
    return {k: np.array(v, dtype=float) for k, v in out.items()}


def test_a_split_removes_the_selection_bias():
    res = _selection()
    stats = {}
    for k, rows in res.items():
        bias, cover, width = rows[:, 0].mean(), rows[:, 1].mean(), rows[:, 2].mean()
        se = rows[:, 0].std(ddof=1) / np.sqrt(len(rows))
        stats[k] = (bias, se, cover, width)
        print(
            f"\n{k}: {len(rows)} kept null seeds, mean reported contribution {100 * bias:+.3f} points (se {100 * se:.3f}),"
        )
        print(f"  95% interval covers 0 in {100 * cover:.1f}%, mean width {100 * width:.2f} points")
    bias, se, cover, width = stats["same"]
    assert bias > 5 * se and cover < 0.93, "deciding and attributing on the same examples is optimistic"
    bias_s, se_s, cover_s, width_s = stats["split"]
    assert abs(bias_s) < 3 * se_s and 0.92 <= cover_s <= 0.98, "the split's attribution is unbiased"
    assert width_s / width == pytest.approx(np.sqrt(2), rel=0.15), "the price: intervals ~sqrt(2) wider"


def test_split_examples_is_a_fixed_partition():
    d, a = split_examples(101, 0.3, seed=4)
    assert len(a) == 30 and len(d) == 71 and np.intersect1d(d, a).size == 0
    assert np.array_equal(np.sort(np.concatenate([d, a])), np.arange(101))
    d2, a2 = split_examples(101, 0.3, seed=4)
    assert np.array_equal(a, a2), "the same split every epoch"
    with pytest.raises(ValueError):
        split_examples(10, 1.0)


def test_attribution_examples_restrict_every_number():
    correct = np.array([[1, 0, 1, 1], [0, 0, 1, 1]], dtype=float)  # config (True,) and (False,)

    def evaluate(configs):
        return [correct[0] if c[0] else correct[1] for c in configs]

    m = attribute(evaluate, ["a"], CounterfactualConfig(), attribution_examples=[0, 1])
    assert m.marginal_contributions["a"] == pytest.approx(0.5)  # examples 0 and 1 only
    assert {r.config: r.val_accuracy for r in m.configs} == {(True,): 0.5, (False,): 0.0}
    with pytest.raises(ValueError):
        attribute(evaluate, ["a"], CounterfactualConfig(), attribution_examples=[7])
