"""RunConfig.attribution_split: the reference trainer decides on one part of the validation set
and reports on the other, from one evaluation of each configuration.

Checked against an independent computation on the same model state: at every epoch the test
runs its own forward passes (each configuration through ``force_alpha``, argmax against the
labels), splits the examples with its own call to ``split_examples``, and compares: the emitted
matrix (accuracies, removal costs) and the host snapshot with the attribution examples, the
slots' decision contributions, the controller's observation and the G5 gate's measurement with
the decision examples. The selection bias itself is measured in tests/test_calibration_selection.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import numpy as np
import pytest
import torch

from karn_otel.config import CounterfactualConfig
from karn_otel.contracts import TelemetryEventType as ET
from karn_otel.counterfactual import attribute, split_examples
from karn_otel.reference.trainer import ReferenceTrainer, RunConfig, split_attribution

# Grows a seed whenever none is growing, so a short run walks the whole lifecycle (and two
# seeds are active at once by the end: a 4-configuration matrix).
FAST = RunConfig(
    epochs=12,
    warmup_epochs=1,
    min_training_epochs=1,
    blend_epochs=2,
    probation_epochs=1,
    plateau_threshold=1.0,
    attribution_split=0.5,
)


def _direct_correct(t: ReferenceTrainer, active: list[str]) -> dict[tuple[bool, ...], np.ndarray]:
    """Per-example correctness of every configuration of ``active``: plain forward passes, a
    seed "on" at its current blend (as the trainer evaluates the model as it is), "off" at 0."""
    model, x, y = t.model, t.data.x_val, t.data.y_val
    was_training = model.training
    model.eval()
    out = {}
    try:
        for config in itertools.product((False, True), repeat=len(active)):
            with torch.no_grad(), contextlib.ExitStack() as stack:
                for sid, on in zip(active, config):
                    stack.enter_context(model.slots[sid].force_alpha(model.slots[sid].alpha if on else 0.0))
                out[config] = (model(x).argmax(dim=1) == y).numpy().astype(float)
    finally:
        model.train(was_training)
    return out


class Instrumented(ReferenceTrainer):
    """The reference trainer, recording at each epoch an independent evaluation of its model
    state, the configurations it evaluated, and what its controller was shown."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.epochs: list[dict] = []
        self.configs_evaluated: list[tuple[bool, ...]] = []
        decide = self.controller.decide

        def spy(obs):
            self.epochs[-1]["obs"] = obs
            return decide(obs)

        self.controller.decide = spy

    def _local_evaluate(self, switched):
        inner = super()._local_evaluate(switched)

        def evaluate(configs):
            self.configs_evaluated.extend(configs)
            return inner(configs)

        return evaluate

    def counterfactual_pair(self, epoch):
        active = [s for s in self.slot_ids if self.model.slots[s].is_active]
        direct = _direct_correct(self, active)
        self.configs_evaluated = []
        reported, decision = super().counterfactual_pair(epoch)
        self.epochs.append(
            {"active": active, "direct": direct, "evaluated": list(self.configs_evaluated), "reported": reported}
        )
        return reported, decision


def test_the_trainer_decides_on_the_decision_half_and_reports_on_the_attribution_half(memory_collector):
    memory_collector.memory.events.clear()
    t = Instrumented(FAST)
    t.run()
    events = list(memory_collector.memory.events)
    n_val = t.data.x_val.shape[0]
    decide, attrib = split_examples(n_val, 0.5, seed=FAST.seed)  # the test's own split
    assert len(decide) + len(attrib) == n_val and abs(len(attrib) - n_val / 2) <= 1

    matrices = [e.payload for e in events if e.event_type is ET.COUNTERFACTUAL]
    hosts = [e.payload for e in events if e.event_type is ET.HOST_SNAPSHOT]
    g5 = [e for e in events if e.event_type is ET.GATE_EVALUATION and e.payload.gate == "G5"]
    assert len(matrices) == len(hosts) == len(t.epochs) == FAST.epochs
    multi = [rec for rec in t.epochs if len(rec["active"]) >= 1]
    assert len(multi) >= 3 and max(len(rec["active"]) for rec in t.epochs) >= 2, "the run attributes real seeds"
    assert g5, "a seed reached the fossilization gate: a decision on a contribution was taken"

    differ = 0
    for epoch, (rec, m, host) in enumerate(zip(t.epochs, matrices, hosts), start=1):
        active, direct = rec["active"], rec["direct"]
        # One evaluation of each configuration per epoch, although two views are computed.
        assert len(rec["evaluated"]) == len(set(rec["evaluated"])) == (1 << len(active)), epoch
        assert m.n_evaluations == (1 << len(active))
        full = (True,) * len(active)
        # Reported: every accuracy is over the attribution examples.
        for row in m.configs:
            assert row.val_accuracy == pytest.approx(direct[row.config][attrib].mean(), abs=1e-12)
        assert host.val_accuracy == pytest.approx(direct[full][attrib].mean(), abs=1e-12)
        obs = rec["obs"]
        assert obs.val_accuracy == pytest.approx(direct[full][decide].mean(), abs=1e-12), "decided on the rest"
        assert t.accuracy_history[epoch] == obs.val_accuracy
        for i, sid in enumerate(active):
            off = tuple(j != i for j in range(len(active)))
            rep = direct[full][attrib].mean() - direct[off][attrib].mean()
            dec = direct[full][decide].mean() - direct[off][decide].mean()
            assert m.marginal_contributions[sid] == pytest.approx(rep, abs=1e-12)
            view = next(v for v in obs.slots if v.slot_id == sid)
            if view.contribution is not None:  # a seed culled this epoch no longer shows one
                assert view.contribution == pytest.approx(dec, abs=1e-12), "the controller sees the decision half"
            differ += abs(rep - dec) > 1e-9
        # The G5 gate measured the decision-half contribution of this epoch.
        for e in g5:
            if e.epoch == epoch:
                sid = e.payload.slot_id
                i = active.index(sid)
                off = tuple(j != i for j in range(len(active)))
                dec = direct[full][decide].mean() - direct[off][decide].mean()
                assert e.payload.measurements["contribution"] == pytest.approx(dec, abs=1e-12)
    assert differ >= 1, "the two halves disagree somewhere, so the checks above can tell them apart"

    (ctx,) = [e.payload for e in events if e.event_type is ET.EPISODE_STARTED]
    assert ctx.hyperparameters["attribution_split"] == 0.5, "the run records which split it used"
    assert RunConfig.from_hyperparameters(ctx.hyperparameters).attribution_split == 0.5, "and replays with it"


def test_without_a_split_the_two_views_are_one_matrix():
    t = ReferenceTrainer(dataclasses.replace(FAST, attribution_split=0.0))
    slot = t.model.slots["late"]
    slot.germinate("norm", t.host_params, 0.0)
    slot.stage, slot.alpha = slot.stage.BLENDING, 1.0
    reported, decision = t.counterfactual_pair(epoch=1)
    assert reported is decision and t.decision_examples is None and t.attribution_examples is None


def test_split_attribution_matches_two_attribute_calls_with_one_evaluation():
    rng = np.random.default_rng(3)
    table = {c: (rng.random(300) < 0.6 + 0.1 * sum(c)).astype(float) for c in itertools.product((0, 1), repeat=3)}
    calls = []

    def evaluate(configs):
        calls.extend(configs)
        return [table[tuple(int(b) for b in c)] for c in configs]

    d, a = split_examples(300, 0.3, seed=2)
    for strategy in ("full_factorial", "shapley"):
        calls.clear()
        cfg = CounterfactualConfig(strategy=strategy, seed=5, shapley_samples=4)
        reported, decision = split_attribution(
            evaluate, ["x", "y", "z"], cfg, epoch=4, decision_examples=d, attribution_examples=a
        )
        assert len(calls) == len(set(calls)) == reported.n_evaluations, "each configuration evaluated once"
        ref_a = attribute(evaluate, ["x", "y", "z"], cfg, epoch=4, attribution_examples=a)
        ref_d = attribute(
            evaluate, ["x", "y", "z"], dataclasses.replace(cfg, bootstrap_samples=0), attribution_examples=d
        )
        assert reported.marginal_contributions == ref_a.marginal_contributions
        assert {s: (e.mean, e.ci_low) for s, e in reported.shapley_values.items()} == {
            s: (e.mean, e.ci_low) for s, e in ref_a.shapley_values.items()
        }
        assert decision.marginal_contributions == ref_d.marginal_contributions
        assert decision.marginal_contributions != reported.marginal_contributions


def test_attribution_split_is_validated():
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="attribution_split"):
            RunConfig(attribution_split=bad)


def test_two_ranks_split_the_gathered_validation_set_alike(tmp_path):
    """nproc=2: the split indexes the gathered (global) examples, so both ranks emit the same
    matrices and take the same decisions, and every reported accuracy is a count over the
    attribution examples of the whole validation set."""
    from karn_otel.config import KarnConfig
    from karn_otel.reference.data import load_digits_data
    from karn_otel.reference.launch import run_ranks
    from karn_otel.sinks.runlog import read_run

    cfg = dataclasses.replace(FAST, epochs=7, nproc=2, batch_size=64)
    base = KarnConfig(run_id="split-2ranks", out_dir=tmp_path, console="off", strict=True)
    result = run_ranks(cfg, base, timeout_s=240)
    assert tuple(result.exit_codes) == (0, 0), result.errors
    run_dir = tmp_path / "split-2ranks"
    logs = [read_run(run_dir), read_run(run_dir / "ranks" / "rank1")]

    def of(log, kind):
        return [
            e.payload for e in log.events if e.event_type is kind and (kind is not ET.HOST_SNAPSHOT or not e.is_reduced)
        ]

    m0, m1 = (of(log, ET.COUNTERFACTUAL) for log in logs)
    assert len(m0) == len(m1) == cfg.epochs and any(m.slot_ids for m in m0), "seeds were attributed"
    for a, b in zip(m0, m1):
        assert a.marginal_contributions == b.marginal_contributions
        assert [(r.config, r.val_accuracy) for r in a.configs] == [(r.config, r.val_accuracy) for r in b.configs]
    d0, d1 = (of(log, ET.CONTROLLER_DECISION) for log in logs)
    assert [(d.action, d.reason) for d in d0] == [(d.action, d.reason) for d in d1], "the same decisions"
    n_val = load_digits_data(cfg.seed).x_val.shape[0]
    _, attrib = split_examples(n_val, cfg.attribution_split, seed=cfg.seed)
    for m in m0:
        for r in m.configs:
            count = r.val_accuracy * len(attrib)
            assert abs(count - round(count)) < 1e-9, "an accuracy over the global attribution examples"
    hosts = of(logs[0], ET.HOST_SNAPSHOT)
    assert [h.val_accuracy for h in hosts] == [next(r for r in m.configs if all(r.config)).val_accuracy for m in m0]
    from tests.test_cli import karn

    shown = karn("inspect", str(run_dir))
    assert shown.returncode == 0 and "attribution_split=0.5" in shown.stdout, "karn inspect says which split ran"
