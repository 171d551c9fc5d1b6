"""The pipeline: one-way routing, derived events after their cause, one evaluation of shared checks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from karn_otel.collector import KarnCollector
from karn_otel.config import DenseTraceTrigger, KarnConfig
from karn_otel.contracts import HealthAlert, ModeChange, OperatingMode, Severity, TelemetryEventType
from karn_otel.health import HealthMonitor
from karn_otel.pipeline import MAX_DERIVED_PER_EVENT, StoreView
from karn_otel.sinks import MemorySink
from karn_otel.sinks.factory import build_pipeline
from karn_otel.triggers import DenseTriggerEngine
from tests.conftest import make_context
from tests.test_collector import host
from tests.test_health import ev

ET = TelemetryEventType


def test_derived_events_follow_their_cause_without_recursion():
    sink = MemorySink()
    c = KarnCollector(KarnConfig(out_dir=None, console="off", strict=True), sinks=[sink])
    depth = []

    def alert_on_host(e):
        if e.event_type is ET.HOST_SNAPSHOT:
            return [HealthAlert("loss_spike", Severity.WARNING, "spike", 3.0, 2.0)]
        return []

    def mode_on_alert(e):
        import inspect

        depth.append(len(inspect.stack()))
        if e.event_type is ET.HEALTH_ALERT:
            return [ModeChange(OperatingMode.RESEARCH, "alert")]
        return []

    c.add_processor(alert_on_host)
    c.add_processor(mode_on_alert)
    c.emit(make_context())
    c.emit(host(epoch=1))
    types = [e.event_type for e in sink.events]
    assert types == [ET.EPISODE_STARTED, ET.HOST_SNAPSHOT, ET.HEALTH_ALERT, ET.MODE_CHANGE]
    assert all(e.epoch == 1 for e in sink.events[1:])
    assert len(set(depth)) == 1, "every processor call at the same stack depth: no re-entry into emit"


def test_a_runaway_processor_is_bounded_and_counted():
    sink = MemorySink()
    c = KarnCollector(KarnConfig(out_dir=None, console="off"), sinks=[sink])
    c.add_processor(lambda e: [ModeChange(OperatingMode.RESEARCH, "again")])  # derives from its own output
    c.emit(make_context())
    assert sum(e.event_type is ET.MODE_CHANGE for e in sink.events) == MAX_DERIVED_PER_EVENT
    assert c.rejected["derived_budget"] >= 1


def test_sinks_get_a_read_only_view_with_cached_health():
    c = KarnCollector(KarnConfig(out_dir=None, console="off", strict=True))
    build_pipeline(c.config, c, sinks=[])
    view = c.view
    assert isinstance(view, StoreView)
    assert not hasattr(view, "add") and not hasattr(view, "emit")
    calls = []
    health = c.pipeline.health
    original = health.report
    health.report = lambda: calls.append(1) or original()  # type: ignore[method-assign]
    c.emit(make_context())
    for _ in range(20):  # one scrape: many readers
        view.health_report()
        view.analytics.training_health()
    assert len(calls) == 1
    c.emit(host(epoch=1))
    view.health_report()
    assert len(calls) == 2, "a new accepted event invalidates the cached report"


def test_mode_has_one_owner():
    c = KarnCollector(KarnConfig(out_dir=None, console="off", strict=True))
    build_pipeline(c.config, c, sinks=[])
    eng = c.pipeline.mode_owner
    assert isinstance(eng, DenseTriggerEngine)
    c.emit(make_context())
    for e in range(1, 6):
        c.emit(host(epoch=e, train_loss=1.0))
    c.emit(host(epoch=6, train_loss=10.0))
    assert eng.mode is OperatingMode.RESEARCH and c.view.mode is OperatingMode.RESEARCH
    assert not hasattr(c.store, "mode"), "the store records events; it does not own the mode"


losses = st.lists(st.floats(0.01, 20.0), min_size=2, max_size=12)
accs = st.lists(st.floats(0.0, 1.0), min_size=2, max_size=12)
norms = st.lists(st.floats(0.01, 1e4), min_size=2, max_size=12)


@settings(max_examples=60, deadline=None)
@given(losses, accs, norms, st.floats(1.1, 5.0), st.floats(0.5, 20.0), st.floats(1.5, 200.0))
def test_shared_evaluation_equals_the_engines_own(ls, acs, gs, spike, drop, explode):
    """With the monitor's findings the engine decides exactly as it does with its own history."""
    trigger = DenseTraceTrigger(loss_spike_threshold=spike, accuracy_drop_threshold=drop, gradient_explosion=explode)
    alone = DenseTriggerEngine(trigger, strict=True)
    monitor = HealthMonitor(strict=True)
    shared = DenseTriggerEngine(trigger, strict=True, health=monitor)
    n = min(len(ls), len(acs), len(gs))
    for i in range(n):
        e = ev(host(epoch=i + 1, train_loss=ls[i], val_accuracy=acs[i], host_grad_norm=gs[i]), i + 1)
        monitor(e)
        assert shared.anomalies(e) == alone.anomalies(e)
        assert shared(e) == alone(e)
        assert shared.mode is alone.mode


def test_a_malformed_envelope_is_rejected_not_raised():
    from karn_otel.contracts import TelemetryEvent

    sink = MemorySink()
    c = KarnCollector(KarnConfig(out_dir=None, console="off"), sinks=[sink])
    c.emit(make_context())
    bad = TelemetryEvent(ET.HOST_SNAPSHOT, c.run_id, "ep-1", "one", 0.0, host(epoch=1), rank="0")  # type: ignore[arg-type]
    assert c.emit(bad) is False
    assert c.rejected["malformed"] == 1
    assert c.emit(host(epoch=1)), "the collector keeps working"
