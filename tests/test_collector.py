"""Collector: every validation rule, in lenient and strict mode; routing; no-op; threads."""

from __future__ import annotations

import dataclasses
import logging
import threading

import pytest

import karn_otel
from karn_otel import collector as kc
from karn_otel.config import KarnConfig
from karn_otel.contracts import (
    ActionOp,
    ControllerDecision,
    FactoredAction,
    HostSnapshot,
    ModeChange,
    OperatingMode,
    SeedStage,
    SlotSnapshot,
    TelemetryEventType,
)
from karn_otel.sinks import MemorySink
from tests.conftest import make_context


def slot(slot_id="early", alpha=0.5, seed_params=10, **kw):
    base = dict(
        slot_id=slot_id,
        stage=SeedStage.BLENDING,
        epochs_in_stage=1,
        seed_id="s1",
        blueprint_id="norm",
        seed_params=seed_params,
        alpha=alpha,
        counterfactual_contribution=None,
        total_improvement=None,
        improvement_this_epoch=0.0,
        last_gate_attempted=None,
        last_gate_passed=None,
        last_gate_reason=None,
    )
    base.update(kw)
    return SlotSnapshot(**base)


def host(epoch=1, **kw):
    base = dict(
        epoch=epoch,
        train_loss=1.0,
        train_accuracy=0.5,
        val_loss=1.0,
        val_accuracy=0.5,
        host_params=100,
        total_seed_params=10,
        total_params=110,
        fossilized_params=0,
        host_grad_norm=1.0,
        seed_grad_norms={"early": 0.1},
        grad_isolation_leakage=None,
    )
    base.update(kw)
    return HostSnapshot(**base)


def make(strict: bool):
    sink = MemorySink()
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", strict=strict), sinks=[sink])
    return c, sink


# (reason, setup, bad event) — setup runs on a collector with an open episode.
BAD_EVENTS = [
    ("type_error", lambda c: None, lambda: slot(alpha="0.5")),
    ("type_error", lambda c: None, lambda: host(val_loss=None)),
    ("type_error", lambda c: None, lambda: host(seed_grad_norms={"early": "x"})),
    ("alpha_out_of_range", lambda c: None, lambda: slot(alpha=1.5)),
    ("alpha_out_of_range", lambda c: None, lambda: slot(alpha=-0.1)),
    ("alpha_out_of_range", lambda c: None, lambda: slot(alpha=float("nan"))),
    ("negative_param_count", lambda c: None, lambda: slot(seed_params=-1)),
    ("negative_param_count", lambda c: None, lambda: host(total_params=-5)),
    ("unknown_slot", lambda c: None, lambda: slot(slot_id="nowhere")),
    ("unknown_slot", lambda c: None, lambda: host(seed_grad_norms={"nowhere": 1.0})),
    ("unknown_slot", lambda c: None, lambda: ControllerDecision("h", FactoredAction(ActionOp.CULL, "nowhere"), "r")),
    ("epoch_regression", lambda c: c.emit(host(epoch=5)), lambda: host(epoch=4)),
    ("unknown_event_type", lambda c: None, lambda: {"not": "a contract"}),
]


@pytest.mark.parametrize("reason, setup, bad", BAD_EVENTS, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD_EVENTS)])
def test_lenient_rejects_counts_and_continues(reason, setup, bad, caplog):
    c, sink = make(strict=False)
    assert c.emit(make_context())
    setup(c)
    n = len(sink.events)
    with caplog.at_level(logging.WARNING, logger="karn"):
        assert c.emit(bad()) is False
        assert c.emit(bad()) is False
    assert c.rejected[reason] == 2
    assert len(sink.events) == n, "a rejected event must not reach the sinks"
    warnings = [r for r in caplog.records if reason in r.getMessage()]
    assert len(warnings) == 1, "reported once per reason"
    assert c.emit(host(epoch=9)), "training goes on: a good event is still accepted"


@pytest.mark.parametrize("reason, setup, bad", BAD_EVENTS, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD_EVENTS)])
def test_strict_raises_with_reason(reason, setup, bad):
    c, _ = make(strict=True)
    c.emit(make_context())
    setup(c)
    with pytest.raises(kc.TelemetryValidationError) as info:
        c.emit(bad())
    assert info.value.reason == reason


def test_events_before_an_episode_are_rejected():
    c, _ = make(strict=False)
    assert not c.emit(host())
    assert c.rejected["no_active_episode"] == 1


def test_stamping_and_epoch_inheritance():
    c, sink = make(strict=True)
    c.emit(make_context())
    c.emit(host(epoch=3))
    c.emit(ModeChange(OperatingMode.RESEARCH, "test"))
    ev = sink.events[-1]
    assert ev.epoch == 3, "payloads without an epoch inherit the episode's current epoch"
    assert ev.run_id == c.run_id and ev.episode_id == "ep-1"
    assert ev.rank == 0 and ev.world_size == 1 and ev.timestamp > 0
    c.emit(ModeChange(OperatingMode.STANDARD, "x"), epoch=7)
    assert sink.events[-1].epoch == 7


def test_an_explicit_epoch_on_the_per_step_path_follows_the_general_rules():
    """A Scalars with ``epoch=`` (what run.log(..., epoch=e) emits) takes the inlined per-step
    path; it must stamp, advance and reject exactly as the general path does."""
    from karn_otel.contracts import Scalars

    c, sink = make(strict=False)
    c.emit(make_context())
    c.emit(host(epoch=3))
    assert c.emit(Scalars(0, {"lr": 0.1}), epoch=5)
    assert sink.events[-1].epoch == 5, "the explicit epoch is stamped"
    c.emit(ModeChange(OperatingMode.RESEARCH, "x"))
    assert sink.events[-1].epoch == 5, "and it advanced the episode's epoch"
    n = len(sink.events)
    assert not c.emit(Scalars(1, {"lr": 0.1}), epoch=4)
    assert c.rejected["epoch_regression"] == 1
    assert not c.emit(Scalars(1, {"lr": 0.1}), epoch=-1)
    assert not c.emit(Scalars(1, {"lr": 0.1}), epoch=True)
    assert not c.emit(Scalars(1, {"lr": 0.1}), epoch=2**63)
    assert sum(c.rejected[r] for r in ("bad_epoch", "type_error", "epoch_regression", "out_of_range")) == 4
    assert len(sink.events) == n, "nothing rejected reached the sinks"
    assert c.emit(Scalars(2, {"lr": 1}), epoch=5)  # an int for a float: converted on this path too
    assert sink.events[-1].epoch == 5 and type(sink.events[-1].payload.values["lr"]) is float


def test_new_episode_resets_epochs_and_slots():
    c, _ = make(strict=True)
    c.emit(make_context())
    c.emit(host(epoch=9))
    c.emit(make_context(slots=("only",), episode_id="ep-2"))
    assert c.emit(host(epoch=1, seed_grad_norms={"only": 0.0}))
    with pytest.raises(kc.TelemetryValidationError, match="unknown_slot"):
        c.emit(slot(slot_id="early"))


def test_rank_from_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    c, sink = make(strict=True)
    c.emit(make_context())
    assert (sink.events[0].rank, sink.events[0].world_size) == (1, 2)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="outside world_size"):
        make(strict=True)


def test_unconfigured_emit_is_a_noop():
    kc.shutdown()
    assert karn_otel.get_collector() is None
    assert karn_otel.emit(host()) is False


def test_broken_sink_never_breaks_training(caplog):
    class Broken:
        def handle(self, event):
            raise OSError("disk on fire")

        def flush(self, timeout=None):
            pass

        def close(self):
            pass

    good = MemorySink()
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off"), sinks=[Broken(), good])
    assert c.emit(make_context())
    assert c.emit(host())
    assert len(good.events) == 2
    assert c.dropped() == {"Broken:error": 2}


def test_processors_emit_derived_events():
    c, sink = make(strict=True)

    def on_host(ev):
        if ev.event_type is TelemetryEventType.HOST_SNAPSHOT and ev.payload.val_loss > 10:
            yield ModeChange(OperatingMode.RESEARCH, "loss high")

    c.add_processor(on_host)
    c.emit(make_context())
    c.emit(host(epoch=1, val_loss=50.0))
    assert sink.events[-1].event_type is TelemetryEventType.MODE_CHANGE
    assert sink.events[-1].epoch == 1
    assert sink.events[-1].payload.mode is OperatingMode.RESEARCH


def test_episode_end_writes_stats_before_summary():
    from karn_otel.contracts import EpisodeSummary

    c, sink = make(strict=False)
    c.emit(make_context())
    c.emit(slot(alpha=3.0))
    c.emit(EpisodeSummary(1, 0.1, 0.9, 0.8, 100, 110, 0, 1.0))
    kinds = [e.event_type for e in sink.events]
    assert kinds[-2:] == [TelemetryEventType.TELEMETRY_STATS, TelemetryEventType.EPISODE_ENDED]
    assert sink.events[-2].payload.rejected == {"alpha_out_of_range": 1}


def test_thread_safety_counts_every_event():
    c, sink = make(strict=True)
    c.emit(make_context())
    n_threads, per_thread = 4, 500

    def worker(i):
        for k in range(per_thread):
            c.emit(slot(slot_id=("early", "mid", "late")[k % 3], alpha=(k % 10) / 10))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.accepted == 1 + n_threads * per_thread
    assert len(sink.events) == c.accepted
    assert c.store.counts()["slot_snapshot"] == n_threads * per_thread


def test_configure_replaces_and_closes_previous():
    closed = []

    class S(MemorySink):
        def close(self):
            closed.append(True)

    karn_otel.configure(KarnConfig(out_dir=None, console="off"), sinks=[S()])
    karn_otel.configure(KarnConfig(out_dir=None, console="off"), sinks=[])
    assert closed == [True]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(console="loud"), "console"),
        (dict(max_dense_traces=0), "max_dense_traces"),
        (dict(rank=2, world_size=2), "out of range"),
    ],
)
def test_invalid_configuration_raises_at_construction(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        KarnConfig(**kwargs)


def test_dataclass_payload_must_be_exact_type():
    c, _ = make(strict=True)
    c.emit(make_context())

    @dataclasses.dataclass(frozen=True)
    class Sneaky(HostSnapshot):
        pass

    with pytest.raises(kc.TelemetryValidationError, match="unknown_event_type"):
        c.emit(Sneaky(**dataclasses.asdict(host())))


def test_fast_envelope_equals_the_dataclass_constructor():
    c, sink = make(strict=True)
    c.emit(make_context())
    ev = sink.events[0]
    rebuilt = kc.TelemetryEvent(**{f: getattr(ev, f) for f in kc._EVENT_FIELDS})
    assert ev == rebuilt and hash(repr(ev)) == hash(repr(rebuilt))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.epoch = 3  # type: ignore[misc]


def test_a_failing_processor_is_counted_never_raised_in_lenient_mode():
    c, sink = make(strict=False)

    def broken(ev):
        raise ZeroDivisionError("processor bug")

    c.add_processor(broken)
    assert c.emit(make_context())
    assert c.emit(host(epoch=1)), "accepted: the event reached the store and the sinks"
    assert c.dropped().get("pipeline:error") == 2
    strict, _ = make(strict=True)
    strict.add_processor(broken)
    with pytest.raises(ZeroDivisionError):
        strict.emit(make_context())


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(file_mode=0o1777), "file_mode"),
        (dict(dir_mode="700"), "dir_mode"),
        (dict(secret_patterns="token"), "secret_patterns"),
        (dict(run_id="../up"), "run_id"),
    ],
)
def test_invalid_safety_configuration_raises(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        KarnConfig(**kwargs)
