"""Selection bias: a seed kept *because* it looked good, attributed on the same examples or not.

The controller keeps the seed that looks best of four on the examples it decides on (and
culls the others). All seeds here are null (true contribution exactly 0; they flip
predictions both ways, tests/test_calibration.py's model). Measured on the kept seeds:

* same examples for deciding and attributing: the reported contribution is biased upwards
  and its 95% interval covers the truth less often than 95%;
* a fixed decision/attribution split (:func:`karn_otel.counterfactual.split_examples`):
  no bias, nominal coverage, intervals about sqrt(2) wider.

The second half does the same with the reference system's own controller: the reference
trainer (its loop, lifecycle gates, heuristic controller and ``RunConfig.attribution_split``)
on a simulated network with known truth (:func:`simulated_trainer`). The full table is
``python benchmarks/bench_selection_bias.py`` (docs/counterfactual-validity.md, "Selection").
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from karn_otel.config import CounterfactualConfig
from karn_otel.counterfactual import attribute, split_examples
from tests.test_calibration import P_OWN, REDRAW, A, B, Examples, fix_rate

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


# --------------------------------------------------------------------------------------------
# The reference system's own controller, on a simulated network with known (null) seeds.
#
# SimulatedTrainer is the reference trainer (karn_otel/reference/trainer.py) with the network
# replaced: its run loop, the lifecycle gates (karn_otel/reference/slots.py), the heuristic
# controller and the decision/attribution split are the real ones. Only training and the
# per-example validation results are simulated, with the calibration model above: the host
# gets an example right with probability A; each seed slot owns P_OWN of the examples
# (disjoint), and every seed grown in it breaks a correct prediction with probability B and
# fixes a wrong one with probability fix_rate(effect) (effect 0: a null seed, true contribution
# exactly 0, flipping predictions both ways), with its own random draws; each
# epoch REDRAW of the examples change state (a host that keeps training, correlated epochs).
# The heuristic fossilizes a seed whose removal cost, read at the end of probation, is > 0
# (G5 checks the same) and culls it otherwise: the kept seeds are selected on that number.


def simulated_trainer(cfg, world_seed: int, effect: float = 0.0):
    """A ReferenceTrainer on the simulated network (torch is imported only when this is called)."""
    from karn_otel.contracts import ActionOp, SeedStage
    from karn_otel.counterfactual import ConfigEvaluation
    from karn_otel.reference.trainer import ReferenceTrainer

    class _Sim(ReferenceTrainer):
        def __init__(self, cfg, world_seed):
            super().__init__(cfg)
            self.world = np.random.default_rng(world_seed)
            n = self.data.x_val.shape[0]
            self.n = n
            self.owner = self.world.choice(len(self.slot_ids) + 1, size=n, p=[P_OWN] * 3 + [1 - 3 * P_OWN])
            self.c0 = self.world.random(n) < A
            self.seed_u: dict[str, np.ndarray] = {}
            self.decided: list[dict] = []
            self._pair = None

        def _flips(self, sid):
            slot = self.model.slots[sid]
            u = self.seed_u.setdefault(slot.seed_id, self.world.random(self.n))
            mine = self.owner == self.slot_ids.index(sid)
            return mine * np.where(self.c0, -1.0 * (u < B), 1.0 * (u < fix_rate(effect)))

        def _local_evaluate(self, switched):
            fixed_on = [s for s in self.slot_ids if self.model.slots[s].is_active and s not in switched]

            def evaluate(configs):
                out = []
                for config in configs:
                    on = fixed_on + [s for s, b in zip(switched, config) if b]
                    correct = self.c0.astype(float) + sum((self._flips(s) for s in on), np.zeros(self.n))
                    out.append(ConfigEvaluation(correct, np.where(correct > 0, 0.3, 2.0)))
                return out

            return evaluate

        def train_epoch(self, epoch):
            redraw = self.world.random(self.n) < REDRAW
            self.c0[redraw] = self.world.random(int(redraw.sum())) < A
            for u in self.seed_u.values():
                u[redraw] = self.world.random(int(redraw.sum()))
            return {
                "loss": 0.5,
                "accuracy": A,
                "host_grad_norm": 1.0,
                "seed_grad_norms": dict.fromkeys(self.slot_ids, 1.0),
                "leakage": None,
                "started_at": 0.0,
                "examples": 1,
            }

        def counterfactual_pair(self, epoch):
            self._pair = super().counterfactual_pair(epoch)
            return self._pair

        def apply(self, action, val_acc):
            slot = self.model.slots[action.slot] if action.slot in self.slot_ids else None
            at_probation = slot is not None and slot.stage is SeedStage.PROBATIONARY
            super().apply(action, val_acc)
            if at_probation and action.op in (ActionOp.FOSSILIZE, ActionOp.CULL):
                reported, decision = self._pair
                e = reported.shapley_values[action.slot]
                self.decided.append(
                    {
                        "kept": slot.stage is SeedStage.FOSSILIZED,
                        "reported": reported.marginal_contributions[action.slot],
                        "decided_on": decision.marginal_contributions[action.slot],
                        "shapley": (e.mean, e.ci_low, e.ci_high),
                    }
                )

    return _Sim(cfg, world_seed)


def reference_selection(
    episodes: int, split: float, effect: float = 0.0, epochs: int = 24, seed0: int = 0
) -> tuple[np.ndarray, int]:
    """``(rows, decided)``: rows ``(reported removal cost, Shapley mean, ci_low, ci_high)`` of
    every seed the reference heuristic kept (fossilized) at the end of its probation, and how
    many seeds it decided on, over ``episodes`` simulated episodes with every seed's true
    contribution ``effect`` and ``RunConfig.attribution_split = split`` (0: decide and report on
    the same examples). The same simulated worlds for every ``split``."""
    from karn_otel.reference.trainer import RunConfig

    cfg = RunConfig(
        epochs=epochs,
        warmup_epochs=1,
        min_training_epochs=1,
        blend_epochs=2,
        probation_epochs=1,
        plateau_threshold=1.0,
        attribution_split=split,
    )
    rows, decided = [], 0
    for k in range(episodes):
        t = simulated_trainer(dataclasses.replace(cfg, seed=seed0 + k), world_seed=10_000 + k, effect=effect)
        t.run()
        rows += [(d["reported"], *d["shapley"]) for d in t.decided if d["kept"]]
        decided += len(t.decided)
    return np.array(rows, dtype=float).reshape(-1, 4), decided


def selection_table(
    res: dict[str, np.ndarray], truth: float = 0.0
) -> dict[str, tuple[float, float, float, float, float]]:
    """Per arm: (bias, its se, coverage of the truth, share with ci_low > 0, mean width), fractions."""
    out = {}
    for k, rows in res.items():
        rep, low, high = rows[:, 0], rows[:, 2], rows[:, 3]
        out[k] = (
            rep.mean() - truth,
            rep.std(ddof=1) / np.sqrt(len(rep)),
            float(np.mean((low <= truth) & (truth <= high))),
            float(np.mean(low > 0)),
            float(np.mean(high - low)),
        )
    return out


def test_the_reference_controllers_selection_bias_and_the_split():
    """The reference heuristic's kept seeds, all null: reported optimistically when decided
    and attributed on the same examples, without bias under attribution_split=0.5."""
    res = {"same": reference_selection(40, 0.0)[0], "split 0.5": reference_selection(40, 0.5)[0]}
    stats = selection_table(res)
    for k, (bias, se, cover, claim, width) in stats.items():
        print(
            f"\n{k}: {len(res[k])} kept null seeds, reported removal cost {100 * bias:+.3f} points (se {100 * se:.3f}); "
            f"95% interval covers 0 in {100 * cover:.1f}%, ci_low > 0 in {100 * claim:.1f}%, width {100 * width:.2f}"
        )
    bias, se, *_ = stats["same"]
    assert len(res["same"]) >= 60 and bias > 5 * se, "kept for looking good on the reported examples: optimistic"
    bias_s, se_s, cover_s, _, width_s = stats["split 0.5"]
    assert len(res["split 0.5"]) >= 60 and abs(bias_s) < 3 * se_s, "decided on the other half: unbiased"
    assert cover_s >= 0.9
    assert width_s / stats["same"][4] == pytest.approx(np.sqrt(2), rel=0.2), "the price: ~sqrt(2) wider"
