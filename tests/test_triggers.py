"""DenseTriggerEngine: each DenseTraceTrigger condition opens a window on a crafted trajectory
and stays quiet on a calm one; adaptive escalation enters RESEARCH and leaves it when the
anomaly resolves; force_dense stays dense. Ends with both processors on a real collector."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from karn_otel.collector import KarnCollector
from karn_otel.config import DenseTraceTrigger, KarnConfig
from karn_otel.contracts import (
    GateEvaluationTrace,
    HealthAlert,
    ModeChange,
    OperatingMode,
    SeedStage,
    Severity,
    StageTransition,
    TelemetryEventType,
)
from karn_otel.health import HealthMonitor
from karn_otel.sinks import MemorySink
from karn_otel.triggers import ANOMALY_REASONS, DenseTriggerEngine, DenseWindow
from tests.conftest import make_context
from tests.test_collector import host
from tests.test_health import NAN, calm_hosts, ev, ppo

RESEARCH, STANDARD = OperatingMode.RESEARCH, OperatingMode.STANDARD
ET = TelemetryEventType


def gate(passed: bool, slot_id="early"):
    return GateEvaluationTrace(
        gate="G2",
        slot_id=slot_id,
        seed_id="s1",
        passed=passed,
        reason="improvement 0.01 >= 0.005" if passed else "improvement 0.001 < 0.005",
        from_stage=SeedStage.TRAINING,
        to_stage=SeedStage.BLENDING if passed else None,
        measurements={"improvement": 0.01},
        thresholds={"improvement": 0.005},
    )


def transition(slot_id="early"):
    return StageTransition(slot_id, "s1", "norm", SeedStage.TRAINING, SeedStage.BLENDING, "G2 passed")


def engine(**kw):
    trigger = kw.pop("trigger", DenseTraceTrigger())
    return DenseTriggerEngine(trigger, strict=True, **kw)


def feed(eng, items):
    """items: (payload, epoch) pairs; returns the ModeChanges of every call, flattened."""
    out = []
    for p, epoch in items:
        out.extend(eng(ev(p, epoch)))
    return out


def calm_epochs(n=5, start=1):
    """A calm episode: passing gates and healthy PPO updates, then each epoch's host snapshot."""
    items = []
    for h in calm_hosts(n, start):
        items += [(gate(True), h.epoch), (ppo(h.epoch), h.epoch), (h, h.epoch)]
    return items


# check -> the event (at epoch 6, after five calm epochs) that must open a window
ANOMALOUS = {
    "stage_transition": transition(),
    "loss_spike": host(epoch=6, train_loss=2.5),
    "accuracy_drop": host(epoch=6, val_accuracy=0.45),
    "gradient_explosion": host(epoch=6, host_grad_norm=500.0),
    "gate_failure": gate(False),
    "value_collapse": ppo(9, value_variance=1e-4, explained_variance=0.0),
    "entropy_collapse": ppo(9, entropy={"op": 0.01, "slot": 0.9}),
}
# the DenseTraceTrigger switch that disables each (boolean) condition
SWITCH = {
    "stage_transition": "stage_transition",
    "gate_failure": "gate_failure",
    "value_collapse": "value_collapse",
    "entropy_collapse": "entropy_collapse",
}


def test_reasons_are_the_bounded_set_in_trigger_order():
    assert set(ANOMALOUS) | {"force_dense"} == set(ANOMALY_REASONS)
    assert ANOMALY_REASONS[-1] == "force_dense"


def test_calm_trajectory_stays_standard():
    eng = engine()
    assert feed(eng, [(make_context(), 0)] + calm_epochs(8)) == []
    assert eng.mode is STANDARD and eng.window_reason is None and eng.window_start_epoch is None


@pytest.mark.parametrize("reason", sorted(ANOMALOUS))
def test_each_condition_opens_a_window(reason):
    eng = engine()
    feed(eng, [(make_context(), 0)] + calm_epochs(5))
    payload = ANOMALOUS[reason]
    assert eng.anomalies(ev(payload, 6)) == [reason]
    changes = eng(ev(payload, 6))
    assert changes == [ModeChange(RESEARCH, reason)]
    assert eng.mode is RESEARCH and eng.dense_active
    assert eng.window_reason == reason and eng.window_start_epoch == 6 and eng.window_reasons == (reason,)


@pytest.mark.parametrize("reason", sorted(SWITCH))
def test_disabled_conditions_stay_quiet(reason):
    eng = engine(trigger=DenseTraceTrigger(**{SWITCH[reason]: False}))
    feed(eng, calm_epochs(5))
    assert eng(ev(ANOMALOUS[reason], 6)) == []
    assert eng.mode is STANDARD


def test_trigger_multiples_come_from_the_dense_trace_trigger():
    lenient = DenseTraceTrigger(loss_spike_threshold=3.0, accuracy_drop_threshold=10.0, gradient_explosion=1000.0)
    eng = engine(trigger=lenient)
    feed(eng, calm_epochs(5))
    for payload in (ANOMALOUS["loss_spike"], ANOMALOUS["accuracy_drop"], ANOMALOUS["gradient_explosion"]):
        assert eng.anomalies(ev(payload, 6)) == []
    assert eng.anomalies(ev(host(epoch=6, train_loss=3.5), 6)) == ["loss_spike"]
    assert eng.thresholds.loss_spike_ratio == 3.0


def test_escalates_then_returns_to_standard_when_resolved():
    eng = engine()
    feed(eng, calm_epochs(3))
    changes = feed(eng, [(host(epoch=4, train_loss=5.0), 4)])
    assert changes == [ModeChange(RESEARCH, "loss_spike")]
    # A new epoch's events alone do not close the window: only its host snapshot does.
    assert feed(eng, [(gate(True), 5), (ppo(5), 5)]) == []
    assert eng.mode is RESEARCH
    # Against the rolling mean (which now includes 5.0) a loss of 1.0 is calm.
    changes = feed(eng, [(host(epoch=5, train_loss=1.0, val_accuracy=0.53), 5)])
    assert changes == [ModeChange(STANDARD, "resolved: loss_spike")]
    assert eng.mode is STANDARD and eng.window_reason is None
    assert eng.last_closed_window == DenseWindow("loss_spike", ("loss_spike",), 4, 5)


def test_event_anomaly_mid_epoch_keeps_that_epoch_open():
    eng = engine()
    feed(eng, calm_epochs(2))
    assert feed(eng, [(transition(), 3)]) == [ModeChange(RESEARCH, "stage_transition")]
    # Epoch 3's snapshot is calm, but the epoch had a transition: stay dense.
    assert feed(eng, [(host(epoch=3, train_loss=0.9, val_accuracy=0.52), 3)]) == []
    assert feed(eng, [(host(epoch=4, train_loss=0.85, val_accuracy=0.53), 4)]) == [
        ModeChange(STANDARD, "resolved: stage_transition")
    ]
    assert eng.last_closed_window.start_epoch == 3 and eng.last_closed_window.end_epoch == 4


def test_further_anomalies_extend_the_open_window_without_new_mode_changes():
    eng = engine()
    feed(eng, calm_epochs(3))
    assert feed(eng, [(gate(False), 4)]) == [ModeChange(RESEARCH, "gate_failure")]
    assert feed(eng, [(transition(), 4), (host(epoch=4, val_accuracy=0.40), 4)]) == []
    assert eng.window_reason == "gate_failure"
    assert eng.window_reasons == ("gate_failure", "stage_transition", "accuracy_drop")
    assert feed(eng, [(gate(False), 5), (host(epoch=5, val_accuracy=0.41), 5)]) == []
    assert feed(eng, [(host(epoch=6, val_accuracy=0.42), 6)]) == [
        ModeChange(STANDARD, "resolved: gate_failure, stage_transition, accuracy_drop")
    ]


def test_several_reasons_on_one_event():
    eng = engine()
    feed(eng, calm_epochs(3))
    (change,) = eng(ev(host(epoch=4, train_loss=5.0, val_accuracy=0.3, host_grad_norm=1e4), 4))
    assert change == ModeChange(RESEARCH, "loss_spike, accuracy_drop, gradient_explosion")
    assert eng.window_reason == "loss_spike"


def test_policy_collapse_keeps_the_window_open_until_a_healthy_update():
    eng = engine()
    feed(eng, calm_epochs(2))
    assert feed(eng, [(ANOMALOUS["value_collapse"], 3)]) == [ModeChange(RESEARCH, "value_collapse")]
    # Epochs without PPO updates: the critic is still collapsed as far as we know.
    assert feed(eng, [(host(epoch=3), 3), (host(epoch=4), 4), (host(epoch=5), 5)]) == []
    assert eng.mode is RESEARCH
    assert feed(eng, [(ppo(10), 6), (host(epoch=6), 6)]) == [ModeChange(STANDARD, "resolved: value_collapse")]


def test_minimum_window_length():
    eng = engine(min_window_epochs=3)
    feed(eng, calm_epochs(3))
    feed(eng, [(gate(False), 4), (host(epoch=4), 4)])
    assert feed(eng, [(host(epoch=5), 5)]) == [], "window 4..5 is 2 epochs, shorter than 3"
    assert feed(eng, [(host(epoch=6), 6)]) == [ModeChange(STANDARD, "resolved: gate_failure")]
    assert eng.last_closed_window.start_epoch == 4 and eng.last_closed_window.end_epoch == 6


def test_consecutive_clean_epochs_to_resolve():
    eng = engine(clean_epochs_to_resolve=2)
    feed(eng, calm_epochs(3))
    feed(eng, [(gate(False), 4), (host(epoch=4), 4)])
    assert feed(eng, [(host(epoch=5), 5)]) == []
    assert feed(eng, [(gate(False), 6), (host(epoch=6), 6)]) == [], "a relapse restarts the count"
    assert feed(eng, [(host(epoch=7), 7)]) == []
    assert feed(eng, [(host(epoch=8), 8)]) == [ModeChange(STANDARD, "resolved: gate_failure")]


@pytest.mark.parametrize("kind", ["force_dense", "research_mode"])
def test_force_dense_stays_research_with_one_mode_change_per_episode(kind):
    if kind == "force_dense":
        eng = engine(trigger=DenseTraceTrigger(force_dense=True))
    else:
        eng = engine(mode=RESEARCH)
    changes = feed(eng, [(make_context(), 0)])
    assert changes == [ModeChange(RESEARCH, "force_dense")]
    assert eng.window_reason == "force_dense" and eng.window_start_epoch == 0
    # Anomalies and calm epochs alike: dense stays on, nothing more is said.
    assert feed(eng, calm_epochs(3) + [(gate(False), 4), (host(epoch=4, train_loss=9.0), 4)] + calm_epochs(2, 5)) == []
    assert eng.mode is RESEARCH
    assert feed(eng, [(make_context(episode_id="ep-2"), 0)]) == [ModeChange(RESEARCH, "force_dense")]


def test_force_dense_engine_registered_mid_episode_switches_once():
    eng = engine(trigger=DenseTraceTrigger(force_dense=True))
    assert feed(eng, [(host(epoch=3), 3)]) == [ModeChange(RESEARCH, "force_dense")]
    assert feed(eng, [(host(epoch=4), 4)]) == []


def test_episode_start_resets_window_and_history():
    eng = engine()
    feed(eng, [(make_context(), 0)] + calm_epochs(3) + [(host(epoch=4, train_loss=0.01), 4)])
    feed(eng, [(gate(False), 5)])
    assert eng.mode is RESEARCH
    assert feed(eng, [(make_context(episode_id="ep-2"), 0)]) == []
    assert eng.mode is STANDARD and eng.window_reason is None and eng.last_closed_window is None
    # Against the old episode's 0.01 baseline this would be a spike; a fresh episode has none.
    assert feed(eng, [(host(epoch=1, train_loss=2.0), 1), (host(epoch=2, train_loss=1.9), 2)]) == []


def test_anomalies_is_pure():
    eng = engine()
    feed(eng, calm_epochs(3))
    spike = ev(host(epoch=4, train_loss=5.0), 4)
    assert eng.anomalies(spike) == eng.anomalies(spike) == ["loss_spike"]
    assert eng.mode is STANDARD
    assert list(eng._history.losses) == [h.train_loss for h in calm_hosts(3)]


def test_non_finite_loss_opens_a_loss_spike_window():
    eng = engine()
    assert feed(eng, [(host(epoch=1, train_loss=NAN), 1)]) == [ModeChange(RESEARCH, "loss_spike")]
    assert feed(eng, [(host(epoch=2, train_loss=1.0), 2)]) == [ModeChange(STANDARD, "resolved: loss_spike")]


def test_other_events_are_ignored_and_garbage_never_raises():
    from tests.test_collector import slot

    eng = engine()
    assert eng(ev(slot(), 1)) == []
    assert eng(ev(HealthAlert("kl_too_high", Severity.WARNING, "x", 0.2, 0.1), 1)) == []
    assert eng(ev(ModeChange(RESEARCH, "x"), 1)) == [], "its own output must not feed back"
    lenient = DenseTriggerEngine(DenseTraceTrigger())
    assert lenient("not an event") == []  # type: ignore[arg-type]
    from karn_otel.contracts import TelemetryEvent

    bogus = TelemetryEvent(ET.PPO_UPDATE, "r", "e", 1, 0.0, object())  # type: ignore[arg-type]
    assert lenient(bogus) == []


def test_invalid_configuration_raises():
    with pytest.raises(ValueError):
        DenseTriggerEngine(DenseTraceTrigger(), min_window_epochs=0)
    with pytest.raises(ValueError):
        DenseTriggerEngine(DenseTraceTrigger(), clean_epochs_to_resolve=0)
    with pytest.raises(TypeError):
        DenseTriggerEngine({"force_dense": True})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        DenseTriggerEngine(DenseTraceTrigger(), mode="research")  # type: ignore[arg-type]


numbers = st.one_of(st.floats(min_value=0.0, max_value=1e6), st.sampled_from([NAN, float("inf"), 0.0]))
step = st.one_of(
    st.tuples(st.just("host"), numbers, st.floats(0.0, 1.0), numbers),
    st.tuples(st.just("gate"), st.booleans(), st.just(0.0), st.just(0.0)),
    st.tuples(st.just("transition"), st.just(0.0), st.just(0.0), st.just(0.0)),
    st.tuples(st.just("ppo"), numbers, st.floats(-1.0, 1.0), numbers),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(step, max_size=30), st.integers(1, 3), st.integers(1, 2))
def test_mode_changes_alternate_and_match_the_engine_state(steps, min_window, clean):
    eng = engine(min_window_epochs=min_window, clean_epochs_to_resolve=clean)
    changes, epoch = [], 1
    for kind, a, b, c in steps:
        if kind == "host":
            payload = host(epoch=epoch, train_loss=a, val_accuracy=b, host_grad_norm=c)
        elif kind == "gate":
            payload = gate(a)
        elif kind == "transition":
            payload = transition()
        else:
            payload = ppo(epoch, value_variance=a, explained_variance=b, entropy={"op": c})
        got = eng(ev(payload, epoch))
        assert len(got) <= 1
        if got and got[0].mode is STANDARD:
            assert kind == "host", "windows close only when an epoch closes"
        changes += got
        if kind == "host":
            epoch += 1
    modes = [ch.mode for ch in changes]
    assert modes == [RESEARCH, STANDARD] * (len(modes) // 2) + [RESEARCH] * (len(modes) % 2)
    assert eng.mode is (modes[-1] if modes else STANDARD)
    assert all(ch.reason.split(", ")[0] in ANOMALY_REASONS for ch in changes if ch.mode is RESEARCH)


# --------------------------------------------------------------------------- integration


def test_both_processors_on_a_real_collector():
    sink = MemorySink()
    c = KarnCollector(KarnConfig(out_dir=None, console="off", strict=True), sinks=[sink])
    eng = DenseTriggerEngine(c.config.dense_trigger, strict=True)
    monitor = HealthMonitor(strict=True)
    c.add_processor(eng)
    c.add_processor(monitor)

    c.emit(make_context())
    for h in calm_hosts(3):
        c.emit(gate(True))
        c.emit(ppo(h.epoch), epoch=h.epoch)
        c.emit(h)
    assert not [e for e in sink.events if e.event_type in (ET.HEALTH_ALERT, ET.MODE_CHANGE)]

    c.emit(host(epoch=4, train_loss=5.0, grad_isolation_leakage=1e-3))  # spike + leak at epoch 4
    c.emit(ppo(4, kl_divergence=0.5))  # epoch 4 still: no epoch field, inherits the current
    c.emit(host(epoch=5, train_loss=1.0, grad_isolation_leakage=1e-3))  # calm for the trigger; leak persists
    c.emit(host(epoch=6, train_loss=0.9, grad_isolation_leakage=1e-3))

    derived = [
        (e.epoch, e.event_type, e.payload) for e in sink.events if e.event_type in (ET.HEALTH_ALERT, ET.MODE_CHANGE)
    ]
    summary = [(epoch, p.mode if et is ET.MODE_CHANGE else p.check) for epoch, et, p in derived]
    assert summary == [
        (4, RESEARCH),
        (4, "loss_spike"),
        (4, "isolation_leakage"),
        (4, "kl_too_high"),
        (5, STANDARD),
    ]
    alerts = {p.check: p for _, et, p in derived if et is ET.HEALTH_ALERT}
    assert alerts["isolation_leakage"].severity is Severity.CRITICAL
    assert alerts["loss_spike"].value > 2.0 and alerts["loss_spike"].threshold == 2.0
    assert eng.mode is STANDARD and c.view.mode is STANDARD
    assert [(ep, a.check) for ep, a in c.store.recent_alerts()] == [
        (4, "loss_spike"),
        (4, "isolation_leakage"),
        (4, "kl_too_high"),
    ]
    assert monitor.status()["isolation_leakage"] is Severity.CRITICAL, "the leak persists: status, not a re-alert"
    assert monitor.report().overall is Severity.CRITICAL
    assert c.rejected == {}
