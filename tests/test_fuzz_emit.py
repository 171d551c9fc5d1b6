"""Fuzzing the door: nothing passed to ``emit`` escapes as an exception in lenient mode, strict
mode raises only TelemetryValidationError, and whatever is accepted can be written to the run
log and read back (issue 14: 216 of 30,228 fuzzed emits used to escape; 10**400 in a float
field and lone surrogates used to be accepted and poison the run)."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from karn_otel import codec as K
from karn_otel import collector as kc
from karn_otel import contracts as C
from karn_otel.config import KarnConfig
from karn_otel.sinks import MemorySink
from karn_otel.sinks.factory import build_pipeline
from tests.conftest import canon, make_context

SLOTS = ("early", "mid", "late")
REASONS = {
    "type_error",
    "out_of_range",
    "invalid_string",
    "invalid_id",
    "malformed",
    "unknown_event_type",
    "bad_rank",
    "bad_epoch",
    "bad_timestamp",
    "schema_version",
    "no_active_episode",
    "unknown_episode",
    "epoch_regression",
    "alpha_out_of_range",
    "negative_param_count",
    "unknown_slot",
    "derived_budget",
    "reserved_event_type",
}


# ---------------------------------------------------------------------- hostile values


class Boom(Exception):
    pass


def _boom(*_: Any, **__: Any) -> Any:
    raise Boom("hostile")


class Hostile:
    """Every protocol method raises, even ``__class__``."""

    __eq__ = __hash__ = __repr__ = __str__ = __len__ = __iter__ = __float__ = __index__ = __bool__ = _boom  # type: ignore[assignment]

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        raise Boom("__class__")


class BadFloat(float):
    __repr__ = __sub__ = __add__ = __radd__ = __eq__ = __hash__ = _boom  # type: ignore[assignment]


class BadInt(int):
    __le__ = __ge__ = __lt__ = __repr__ = __index__ = __eq__ = _boom  # type: ignore[assignment]


class BadStr(str):
    __hash__ = __eq__ = __repr__ = __str__ = isascii = encode = _boom  # type: ignore[assignment]


class BadDict(dict):  # type: ignore[type-arg]
    items = keys = values = __iter__ = __len__ = _boom  # type: ignore[assignment]


class Meta(type):
    __hash__ = __eq__ = _boom  # type: ignore[assignment]


class WeirdType(metaclass=Meta):
    pass


HOSTILE = [
    Hostile(),
    BadFloat(1.5),
    BadInt(3),
    BadStr("x"),
    BadDict(a=1.0),
    10**400,
    -(10**5000),
    2**63,
    "\ud800",
    "a\udcffb",
    "../../etc",
    "/abs",
    "x" * 10_000,
    "\x1b[31mred",
    float("nan"),
    float("inf"),
    True,
    b"bytes",
    None,
    object(),
    [1.0],
    (),
]

anything = st.deferred(
    lambda: st.one_of(
        st.integers(0, len(HOSTILE) - 1).map(HOSTILE.__getitem__),
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=2**62, max_value=2**2000),
        st.floats(),
        st.text(st.characters(codec=None, exclude_categories=()), max_size=12),
        st.binary(max_size=8),
        st.lists(anything, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), anything, max_size=3),
        st.tuples(anything, anything),
    )
)


def _hinted(tp: Any) -> st.SearchStrategy[Any]:
    """Mostly well-typed values of ``tp`` (valid slot names where a slot is expected), now and
    then anything at all."""
    if tp is str:
        good: st.SearchStrategy[Any] = st.one_of(st.sampled_from(SLOTS), st.text(max_size=8))
    elif tp is Path:
        good = st.text(max_size=12).map(Path)
    else:
        try:
            good = st.from_type(tp)
        except Exception:
            good = anything
    return st.one_of(good, good, good, anything)


def _payload(cls: type) -> st.SearchStrategy[Any]:
    hints = K.type_hints(cls)
    fields = {f.name: _hinted(hints[f.name]) for f in dataclasses.fields(cls)}
    return st.fixed_dictionaries(fields).map(lambda kw: cls(**kw))


PAYLOADS = st.sampled_from(sorted(C.PAYLOAD_TYPES.values(), key=lambda c: c.__name__)).flatmap(_payload)

ENVELOPES = st.builds(
    C.TelemetryEvent,
    event_type=st.one_of(st.sampled_from(list(C.TelemetryEventType)), anything),
    run_id=st.one_of(st.just("run"), anything),
    episode_id=st.one_of(st.just("ep-1"), anything),
    epoch=st.one_of(st.integers(0, 50), anything),
    timestamp=st.one_of(st.floats(0, 2e9), anything),
    payload=st.one_of(PAYLOADS, anything),
    rank=st.one_of(st.just(0), anything),
    world_size=st.one_of(st.just(1), anything),
    is_reduced=st.one_of(st.booleans(), anything),
    schema_version=st.one_of(st.just(C.SCHEMA_VERSION), anything),
)

EMITS = st.tuples(
    st.one_of(PAYLOADS, PAYLOADS, ENVELOPES, anything),
    st.one_of(st.none(), st.none(), st.integers(0, 50), anything),  # epoch=
    st.one_of(st.just(False), st.just(False), st.booleans(), anything),  # is_reduced=
)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    database=None,
)


def _collector(strict: bool) -> tuple[kc.KarnCollector, MemorySink]:
    """The same pipeline as `configure` (health, triggers, analytics), into memory."""
    cfg = KarnConfig(out_dir=None, console="off", strict=strict, run_id="run")
    c = kc.KarnCollector(cfg)
    sink = MemorySink()
    build_pipeline(cfg, c, sinks=[sink])
    assert c.emit(make_context(slots=SLOTS))
    return c, sink


def _assert_round_trips(events: list[C.TelemetryEvent]) -> None:
    """Everything accepted can be written as a run-log line and read back exactly."""
    for ev in events:
        line = K.encode_event(ev)
        line.decode("utf-8")  # strict UTF-8
        assert canon(K.event_from_json(line)) == canon(ev), ev.event_type


@FUZZ
@given(emits=st.lists(EMITS, min_size=1, max_size=8))
def test_lenient_emit_never_raises_and_accepts_only_what_round_trips(emits):
    c, sink = _collector(strict=False)
    for event, epoch, reduced in emits:
        before = sum(c.rejected.values())
        ok = c.emit(event, epoch=epoch, is_reduced=reduced)
        assert ok is True or ok is False
        if not ok:
            assert sum(c.rejected.values()) == before + 1, "every rejection is counted"
    assert set(c.rejected) <= REASONS, set(c.rejected) - REASONS
    assert not c.sink_errors, c.sink_errors
    _assert_round_trips(sink.events)
    own = sum(e.event_type is C.TelemetryEventType.TELEMETRY_STATS for e in sink.events)
    assert len(sink.events) - own == c.accepted


@FUZZ
@given(emits=st.lists(EMITS, min_size=1, max_size=8))
def test_strict_emit_raises_only_validation_errors_naming_a_reason(emits):
    c, sink = _collector(strict=True)
    for event, epoch, reduced in emits:
        try:
            assert c.emit(event, epoch=epoch, is_reduced=reduced) is True
        except kc.TelemetryValidationError as err:
            assert err.reason in REASONS
            assert str(err)  # describing the failure did not fail
    _assert_round_trips(sink.events)


# ---------------------------------------------------------------------- named cases


def _scalars(values: Any, step: Any = 1) -> C.Scalars:
    return C.Scalars(step, values)


NAMED = [
    ("out_of_range", lambda: _scalars({"loss": 10**400}), "values['loss']"),
    ("out_of_range", lambda: _scalars({"loss": 1.0}, step=2**70), "step"),
    ("invalid_string", lambda: _scalars({"lo\ud800ss": 1.0}), "values"),
    ("type_error", lambda: _scalars({10**5000: 1.0}), "values"),
    ("type_error", lambda: _scalars({"loss": "1.0"}), "values['loss']"),
    ("type_error", lambda: _scalars({"loss": True}), "values['loss']"),
    ("malformed", lambda: _scalars({"loss": BadFloat(1.0)}), None),
    ("malformed", lambda: Hostile(), None),
    ("malformed", lambda: WeirdType(), None),
    (
        "reserved_event_type",
        lambda: C.TelemetryStats(1, {}, {}),
        None,
    ),  # Karn's accounting is not forgeable  # its class cannot even be hashed
    (
        "malformed",
        lambda: C.TelemetryEvent(C.TelemetryEventType.SCALARS, "run", "ep-1", "x", 0.0, _scalars({})),
        "epoch",
    ),
    (
        "malformed",
        lambda: C.TelemetryEvent(C.TelemetryEventType.SCALARS, "run", "ep-1", 1, 0.0, _scalars({}), rank="0"),
        "rank",
    ),
    (
        "bad_rank",
        lambda: C.TelemetryEvent(C.TelemetryEventType.SCALARS, "run", "ep-1", 1, 0.0, _scalars({}), rank=3),
        "rank",
    ),
    (
        "invalid_id",
        lambda: C.TelemetryEvent(C.TelemetryEventType.SCALARS, "../x", "ep-1", 1, 0.0, _scalars({})),
        "run_id",
    ),
    (
        "bad_timestamp",
        lambda: C.TelemetryEvent(C.TelemetryEventType.SCALARS, "run", "ep-1", 1, math.nan, _scalars({})),
        "timestamp",
    ),
    (
        "schema_version",
        lambda: C.TelemetryEvent(C.TelemetryEventType.SCALARS, "run", "ep-1", 1, 0.0, _scalars({}), schema_version=99),
        "schema_version",
    ),
    (
        "type_error",
        lambda: C.TelemetryEvent(C.TelemetryEventType.HOST_SNAPSHOT, "run", "ep-1", 1, 0.0, _scalars({})),
        None,
    ),
]


@pytest.mark.parametrize("reason, make, field", NAMED, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(NAMED)])
def test_each_hostile_input_is_rejected_with_its_reason_and_field(reason, make, field):
    c, _ = _collector(strict=False)
    assert c.emit(make()) is False
    assert c.rejected == {reason: 1}
    s, _ = _collector(strict=True)
    with pytest.raises(kc.TelemetryValidationError) as info:
        s.emit(make())
    assert info.value.reason == reason
    if field is not None:
        assert info.value.field is not None and info.value.field.startswith(field), info.value.field
    assert len(str(info.value)) < 1000, "error text is bounded"


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(epoch="3"), "type_error"),
        (dict(epoch=-1), "bad_epoch"),
        (dict(epoch=10**30), "out_of_range"),
        (dict(is_reduced="yes"), "type_error"),
        (dict(is_reduced=Hostile()), "type_error"),
    ],
)
def test_bad_emit_arguments_are_rejected(kwargs, reason):
    c, _ = _collector(strict=False)
    assert c.emit(C.ModeChange(C.OperatingMode.RESEARCH, "x"), **kwargs) is False
    assert c.rejected == {reason: 1}


def test_huge_inputs_are_handled_without_raising():
    c, sink = _collector(strict=False)
    assert c.emit(_scalars({f"m{i}": float(i) for i in range(100_000)}))
    assert c.emit(_scalars({"x" * 1_000_000: 1.0}))
    assert not c.emit(_scalars({"m": -(10**100_000)}))
    assert c.rejected == {"out_of_range": 1}
    _assert_round_trips(sink.events[-2:])


def test_finite_flag_is_set_only_when_every_float_is_finite():
    c, sink = _collector(strict=True)
    c.emit(_scalars({"a": 1.0, "b": 2}))
    c.emit(_scalars({"a": math.nan}))
    c.emit(_scalars({"a": 1e308, "b": 1e308}))  # the fast sum overflows; each value is checked
    c.emit(_scalars({"a": 1.0, "b": -math.inf}))
    flags = [getattr(e, K.FINITE_FLAG, False) for e in sink.events[-4:]]
    assert flags == [True, False, True, False]
    assert b'{"$float":"nan"}' in K.encode_lines(sink.events[-3:])


def test_every_contract_class_has_a_generated_checker():
    for cls in C.PAYLOAD_TYPES.values():
        check = K.checker(cls)
        assert check.__code__.co_filename == f"<karn checker {cls.__name__}>"
    assert typing.get_type_hints(C.Scalars)  # the hints resolve (the checkers are built from them)
