"""The reference system: deterministic, a real lifecycle, measured isolation, honest baselines."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from karn_otel.contracts import SeedStage
from karn_otel.contracts import TelemetryEventType as ET
from karn_otel.reference.host import HostCNN
from karn_otel.reference.slots import BLUEPRINTS, LifecycleConfig, build_seed, count_params
from karn_otel.reference.trainer import ReferenceTrainer, RunConfig, run_episode
from karn_otel.replay import compare_events

# Grows a seed whenever none is growing, so a short run walks the whole lifecycle.
FAST = RunConfig(
    epochs=12, warmup_epochs=1, min_training_epochs=1, blend_epochs=2, probation_epochs=1, plateau_threshold=1.0
)


def _events(memory_collector, cfg=FAST):
    memory_collector.memory.events.clear()
    run_episode(cfg)
    return list(memory_collector.memory.events)


def test_full_lifecycle_is_reported(memory_collector):
    events = _events(memory_collector)
    transitions = [(e.payload.from_stage, e.payload.to_stage) for e in events if e.event_type is ET.STAGE_TRANSITION]
    path = [SeedStage.DORMANT, SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.PROBATIONARY]
    for a, b in zip(path, path[1:]):
        assert (a, b) in transitions, f"missing {a.value} -> {b.value}"
    assert any(b in (SeedStage.FOSSILIZED, SeedStage.CULLED) for _, b in transitions)
    gates = {e.payload.gate for e in events if e.event_type is ET.GATE_EVALUATION}
    assert {"G0", "G1", "G2", "G3", "G4"} <= gates
    assert all(e.payload.reason for e in events if e.event_type is ET.GATE_EVALUATION)
    hosts = [e.payload for e in events if e.event_type is ET.HOST_SNAPSHOT]
    assert [h.epoch for h in hosts] == list(range(1, FAST.epochs + 1))
    assert memory_collector.rejected == {}, "the reference system emits only valid events"


def test_deterministic_on_cpu(memory_collector):
    a = _events(memory_collector)
    b = _events(memory_collector)
    assert compare_events(a, b).identical


def test_different_seed_differs(memory_collector):
    a = _events(memory_collector)
    b = _events(memory_collector, dataclasses.replace(FAST, seed=1))
    report = compare_events(a, b)
    assert not report.identical and "payload" in report.first_difference


def test_isolation_blocks_and_meters_host_gradient():
    lc = LifecycleConfig()
    model = HostCNN((4, 8, 16), lc)
    slot = model.slots["mid"]
    slot.germinate("conv_light", model.host_params, 0.0)
    slot.stage = SeedStage.TRAINING
    x = torch.randn(8, 1, 8, 8)
    model(x).sum().backward()
    assert slot.leak_meter.item() == 0.0, "nothing leaks through an isolated seed"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in slot.seed.parameters()), "the seed still learns"
    # Host output is untouched by an isolated seed.
    with slot.force_alpha(0.0):
        ref = model(x)
    assert torch.equal(model(x), ref)

    leaky = HostCNN((4, 8, 16), dataclasses.replace(lc, leak=0.5))
    leaky.load_state_dict(model.state_dict(), strict=False)
    s2 = leaky.slots["mid"]
    s2.germinate("conv_light", leaky.host_params, 0.0)
    s2.stage = SeedStage.TRAINING
    s2.seed.load_state_dict(slot.seed.state_dict())
    torch.nn.init.normal_(s2.seed.pw.weight)  # a seed with non-zero output gradient path
    leaky(x).sum().backward()
    assert s2.leak_meter.item() > 0, "a leaking isolation boundary is measured"


def test_counterfactual_restores_training_state():
    t = ReferenceTrainer(FAST)
    slot = t.model.slots["late"]
    slot.germinate("norm", t.host_params, 0.0)
    slot.stage, slot.alpha = SeedStage.BLENDING, 0.5
    t.model.train()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    cf = t.counterfactual(epoch=1)
    assert t.model.training, "training mode restored"
    assert slot._forced_alpha is None and slot.alpha == 0.5
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert cf.slot_ids == ("late",) and len(cf.configs) == 2


@pytest.mark.parametrize("bp", BLUEPRINTS)
def test_blueprints_start_silent_and_preserve_shape(bp):
    seed = build_seed(bp, 8)
    x = torch.randn(2, 8, 4, 4)
    out = seed(x)
    assert out.shape == x.shape and torch.count_nonzero(out) == 0
    assert count_params(seed) > 0


def test_host_baseline_reports_host_only_accuracy(memory_collector):
    events = _events(memory_collector)
    baselines = [e.payload for e in events if e.event_type is ET.HOST_BASELINE]
    assert baselines[0].final_host_only_accuracy is None
    end = baselines[-1]
    assert end.final_host_only_accuracy is not None and 0 <= end.final_host_only_accuracy <= 1
    summary = events[-1].payload
    assert events[-1].event_type is ET.EPISODE_ENDED
    assert summary.host_only_accuracy == end.final_host_only_accuracy


@pytest.mark.parametrize(
    "policy, kept", [("keep_all", [True, True]), ("keep_last", [False, True]), ("delete_after_run", [False, False])]
)
def test_the_trainer_applies_its_checkpoint_retention(memory_collector, tmp_path, policy, kept):
    """The trainer deletes the checkpoints it wrote, by policy, once the run is over."""
    from karn_otel.reference.trainer import run_reference

    cfg = dataclasses.replace(FAST, epochs=1, episodes=2, controller="none", checkpoint_retention=policy)
    run_reference(cfg, checkpoint_dir=tmp_path)
    names = [f"ep{k:03d}" for k in range(2)]
    baselines = [e.payload for e in memory_collector.memory.events if e.event_type is ET.HOST_BASELINE]
    paths = [b.initial_checkpoint for b in baselines if b.final_host_only_accuracy is None]
    assert [p.name[:5] for p in paths] == names
    assert [p.exists() for p in paths] == kept
    assert len(list(tmp_path.glob("*.pt"))) == sum(kept)


def test_a_blending_seed_is_recorded_at_the_alpha_it_was_evaluated_at(memory_collector):
    """The counterfactual pass evaluates an "on" seed as the model runs it, mid-blend included;
    the matrix used to record alpha 1.0 for it. The all-on row's alpha is now the seed's alpha
    at the pass: the previous epoch's SlotSnapshot (the pass runs before the epoch advances it)."""
    events = _events(memory_collector)
    slot_alpha: dict[tuple[int, str], float] = {
        (e.epoch, e.payload.slot_id): e.payload.alpha for e in events if e.event_type is ET.SLOT_SNAPSHOT
    }
    seen_partial = False
    for e in events:
        if e.event_type is not ET.COUNTERFACTUAL or not e.payload.slot_ids:
            continue
        on = next(r for r in e.payload.configs if all(r.config))
        for sid, a in on.alpha_settings.items():
            assert 0.0 < a <= 1.0
            if (e.epoch - 1, sid) in slot_alpha:
                assert a == pytest.approx(slot_alpha[(e.epoch - 1, sid)]), (e.epoch, sid)
            seen_partial = seen_partial or a < 1.0
        off = next(r for r in e.payload.configs if not any(r.config))
        assert set(off.alpha_settings.values()) == {0.0}
    assert seen_partial, "a blending seed was evaluated mid-blend (FAST blends over 2 epochs)"


class _CullsAtTheEnd:
    """Germinates a seed at once and culls it at the final epoch: the case where the last
    epoch's matrix measured a model the run does not end with."""

    name = "scripted"

    def decide(self, obs):
        from karn_otel.contracts import ActionOp, FactoredAction

        if obs.epoch == 1:
            return FactoredAction(ActionOp.GERMINATE, "mid", "conv_light"), "germinate"
        if obs.epoch == obs.max_epochs:
            return FactoredAction(ActionOp.CULL, "mid"), "cull at the end"
        return FactoredAction(ActionOp.WAIT), "wait"


def test_a_seed_culled_at_the_last_epoch_is_not_in_the_final_numbers(memory_collector, capsys):
    """The summary (and the console's episode-end line) describe the model the run ends with:
    after a cull at the final epoch its accuracy is the host's, its parameters the host's, and
    the final verdict says the seed is gone."""
    from karn_otel.reference.trainer import ReferenceTrainer

    cfg = dataclasses.replace(FAST, epochs=8)
    memory_collector.memory.events.clear()
    ReferenceTrainer(cfg, controller=_CullsAtTheEnd()).run()
    events = list(memory_collector.memory.events)
    (last_cf,) = [e.payload for e in events if e.event_type is ET.COUNTERFACTUAL and e.epoch == 8]
    assert last_cf.slot_ids == ("mid",), "the seed was active when the last matrix was measured"
    on = next(r for r in last_cf.configs if r.config == (True,))
    off = next(r for r in last_cf.configs if r.config == (False,))
    assert on.val_accuracy != off.val_accuracy, "the seed changed the model's predictions"
    (summary,) = [e.payload for e in events if e.event_type is ET.EPISODE_ENDED]
    assert summary.final_val_accuracy == off.val_accuracy, "the final model is the host alone"
    assert summary.total_params == summary.host_params, "a culled seed's parameters are gone"
    (last_host,) = [e.payload for e in events if e.event_type is ET.HOST_SNAPSHOT and e.epoch == 8]
    assert last_host.val_accuracy == on.val_accuracy, "the epoch's own snapshot keeps what was measured then"


class _AsksTheImpossible:
    name = "scripted"

    def decide(self, obs):
        from karn_otel.contracts import ActionOp, FactoredAction

        if obs.epoch == 1:
            return FactoredAction(ActionOp.GERMINATE, "mid", "conv_light"), "germinate"
        if obs.epoch == 2:
            return FactoredAction(ActionOp.FOSSILIZE, "early"), "fossilize an empty slot"
        return FactoredAction(ActionOp.WAIT), "wait"


def test_a_refused_action_is_recorded_as_not_applied(memory_collector):
    """What the console shows as the epoch's action must say when nothing happened: the
    decision records whether it took effect."""
    cfg = dataclasses.replace(FAST, epochs=3)
    memory_collector.memory.events.clear()
    ReferenceTrainer(cfg, controller=_AsksTheImpossible()).run()
    decisions = [(e.epoch, e.payload) for e in memory_collector.memory.events if e.event_type is ET.CONTROLLER_DECISION]
    assert [(ep, d.action.op.value, d.applied) for ep, d in decisions] == [
        (1, "GERMINATE", True),
        (2, "FOSSILIZE", False),
        (3, "WAIT", None),
    ], decisions


def test_replay_of_a_log_from_before_applied_was_recorded_is_not_a_difference(memory_collector):
    """Logs written before ControllerDecision.applied existed read it as None: replay does not
    call that a difference, but does call a changed value one."""
    cfg = dataclasses.replace(FAST, epochs=3)
    memory_collector.memory.events.clear()
    ReferenceTrainer(cfg, controller=_AsksTheImpossible()).run()
    events = list(memory_collector.memory.events)
    old = [
        dataclasses.replace(e, payload=dataclasses.replace(e.payload, applied=None))
        if e.event_type is ET.CONTROLLER_DECISION
        else e
        for e in events
    ]
    assert compare_events(old, events).first_difference is None
    flipped = [
        dataclasses.replace(e, payload=dataclasses.replace(e.payload, applied=not e.payload.applied))
        if e.event_type is ET.CONTROLLER_DECISION and e.payload.applied is not None
        else e
        for e in events
    ]
    assert "applied" in (compare_events(flipped, events).first_difference or "")
