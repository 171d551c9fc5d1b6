"""The codec (karn_otel.codec): exact round trips, the old on-disk form, typed decode errors,
and a run-log writer that loses nothing under a busy producer."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from karn_otel import codec as K
from karn_otel import contracts as C
from karn_otel.sinks.runlog import RunLogSink, read_run
from tests.conftest import canon

st.register_type_strategy(Path, st.text(max_size=20).map(Path))

ALL_CONTRACTS = sorted(
    set(C.PAYLOAD_TYPES.values())
    | {
        C.FactoredAction,
        C.RewardComponentsTelemetry,
        C.AdvantageStats,
        C.RatioStats,
        C.LSTMHealth,
        C.CounterfactualResult,
        C.ShapleyEstimate,
        C.BatchMetrics,
        C.GateEvaluationTrace,
    },
    key=lambda c: c.__name__,
)

event_strategy = st.sampled_from(sorted(C.PAYLOAD_TYPES.items(), key=lambda kv: kv[0].value)).flatmap(
    lambda kv: st.builds(
        C.TelemetryEvent,
        event_type=st.just(kv[0]),
        payload=st.from_type(kv[1]),
        run_id=st.text(max_size=10),
        episode_id=st.text(max_size=10),
        epoch=st.integers(0, 10**6),
        timestamp=st.floats(),  # NaN and inf included: the envelope's floats are tagged too
        rank=st.integers(0, 7),
        world_size=st.integers(1, 8),
        is_reduced=st.booleans(),
    )
)

SETTINGS = settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)


# ------------------------------------------------------------------ the encoder before msgspec
# A copy of the first, hand-written encoder (contracts.to_jsonable + json.dumps), the format
# of every run log written so far: the codec must keep reading it.


def _old_float(x: float) -> Any:
    if math.isfinite(x):
        return float(x)
    return {"$float": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


def old_to_jsonable(obj: Any) -> Any:
    if isinstance(obj, enum.Enum):
        return obj.value
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return _old_float(obj)
    if dataclasses.is_dataclass(obj):
        return {f.name: old_to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: old_to_jsonable(v) for k, v in obj.items()}
        return [[old_to_jsonable(k), old_to_jsonable(v)] for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [old_to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    raise TypeError(type(obj))


def old_dumps(obj: Any) -> str:
    return json.dumps(old_to_jsonable(obj), separators=(",", ":"), allow_nan=False)


# Lines written by that encoder (karn 0.x, before the codec moved to msgspec), verbatim.
OLD_LINES = [
    '{"event_type":"host_snapshot","run_id":"run-1","episode_id":"ep-1","epoch":2,"timestamp":1767268800.25,"payload":{"epoch":2,"train_loss":{"$float":"nan"},"train_accuracy":0.5,"val_loss":{"$float":"inf"},"val_accuracy":0.25,"host_params":10,"total_seed_params":2,"total_params":12,"fossilized_params":0,"host_grad_norm":{"$float":"-inf"},"seed_grad_norms":{"early":{"$float":"nan"},"mid":1e-05},"grad_isolation_leakage":null},"rank":0,"world_size":1,"is_reduced":false,"schema_version":1}',
    '{"event_type":"counterfactual","run_id":"run-1","episode_id":"ep-1","epoch":2,"timestamp":1767268800.25,"payload":{"epoch":2,"slot_ids":["a","b"],"configs":[{"config":[true,false],"alpha_settings":{"a":1.0},"val_loss":0.5,"val_accuracy":0.75,"per_class_accuracy":[[3,0.5],[7,{"$float":"nan"}]]}],"marginal_contributions":{"a":0.1},"interaction_effects":[[["a","b"],-0.02]],"shapley_values":{"a":{"mean":0.1,"std":0.2,"n_samples":3,"algorithm":"permutation_antithetic","ci_low":{"$float":"nan"},"ci_high":{"$float":"nan"},"confidence":0.95}},"strategy":"full_factorial","interaction_index":null,"n_evaluations":0,"partial":false,"partial_reason":null,"elapsed_s":0.0},"rank":0,"world_size":1,"is_reduced":false,"schema_version":1}',
    '{"event_type":"episode_started","run_id":"run-1","episode_id":"ep-1","epoch":2,"timestamp":1767268800.25,"payload":{"episode_id":"ep-1","timestamp":"2026-01-01T12:00:00.123456","git_commit":"abc","base_seed":0,"torch_seed":1,"numpy_seed":2,"host_architecture":"cnn","host_params":1000,"slot_config":{"early":8},"max_epochs":10,"task_type":"classification","hyperparameters":{"lr":0.01,"bs":64,"amp":true,"opt":"adam","wd":{"$float":"inf"}},"software":{"python":"3.11"}},"rank":0,"world_size":1,"is_reduced":false,"schema_version":1}',
    '{"event_type":"host_baseline","run_id":"run-1","episode_id":"ep-1","epoch":2,"timestamp":1767268800.25,"payload":{"initial_loss":2.3,"initial_accuracy":0.1,"initial_checkpoint":"/ck/ep0-initial.pt","checkpoint_retention_policy":"keep_last","final_host_only_loss":null,"final_host_only_accuracy":null},"rank":0,"world_size":1,"is_reduced":false,"schema_version":1}',
    '{"event_type":"policy_snapshot","run_id":"run-1","episode_id":"ep-1","epoch":2,"timestamp":1767268800.25,"payload":{"observation_vector":[0.1,{"$float":"nan"}],"action":{"op":"GERMINATE","slot":"early","blueprint":"conv","blend":null},"action_log_probs":{"op":-0.5},"action_was_masked":false,"value_estimate":0.3,"advantage":null,"reward_total":1.0,"reward_components":{"accuracy_gain":0.1,"parameter_cost":0.0,"lifecycle_bonus":0.0,"invalid_action_penalty":0.0},"kl_divergence":null,"explained_variance":null,"per_head_kl":{},"advantage_stats":null,"ratio_stats":null,"lstm_health":{"hidden_mean":0,"hidden_std":1,"cell_mean":0,"cell_std":1,"saturation_fraction":0.5},"entropy":{},"shadow_action":{"op":"WAIT","slot":null,"blueprint":null,"blend":null}},"rank":0,"world_size":1,"is_reduced":false,"schema_version":1}',
    '{"event_type":"scalars","run_id":"run-1","episode_id":"ep-1","epoch":2,"timestamp":1767268800.25,"payload":{"step":7,"values":{"loss":0.5,"lr":3,"gn":{"$float":"-inf"}}},"rank":0,"world_size":1,"is_reduced":false,"schema_version":1}',
]

# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("cls", ALL_CONTRACTS, ids=lambda c: c.__name__)
@SETTINGS
@given(data=st.data())
def test_every_contract_round_trips_exactly(cls, data):
    obj = data.draw(st.from_type(cls))
    text = K.to_json(obj)
    assert json.loads(text) == json.loads(old_dumps(obj)) or _has_nan(obj)  # same on-disk form
    back = K.from_json(cls, text)
    assert canon(back) == canon(obj)
    assert canon(K.from_json(cls, old_dumps(obj))) == canon(obj), "the old encoder's output decodes"
    assert canon(K.from_jsonable(cls, K.to_jsonable(obj))) == canon(obj)


def _has_nan(obj: Any) -> bool:
    return "nan" in old_dumps(obj)  # NaN != NaN, so json.loads equality can't hold


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(event_strategy)
def test_envelope_round_trips_exactly(event):
    line = K.event_to_json(event)
    assert "\n" not in line
    json.loads(line)  # strict JSON: no NaN tokens
    assert canon(K.event_from_json(line)) == canon(event)
    assert canon(K.event_from_json(line.encode())) == canon(event)
    assert canon(K.event_from_json(old_dumps(event))) == canon(event), "the old encoder's output decodes"
    assert canon(K.event_from_dict(json.loads(line))) == canon(event)


@SETTINGS
@given(st.lists(event_strategy, max_size=8))
def test_batch_encoding_is_the_lines_of_its_events(events):
    buf = K.encode_lines(events)
    assert buf == b"".join(K.encode_event(e) + b"\n" for e in events)
    # As the collector hands them over: the finite ones flagged (the per-line fallback skips
    # their non-finite scan), the same bytes.
    for e in events:
        if not K._may_be_nonfinite(e):
            e.__dict__[K.FINITE_FLAG] = True
    assert K.encode_lines(events) == buf
    assert [canon(K.event_from_json(line)) for line in buf.splitlines()] == [canon(e) for e in events]


@pytest.mark.parametrize("line", OLD_LINES, ids=lambda s: json.loads(s)["event_type"])
def test_lines_of_the_old_encoder_decode(line):
    event = K.event_from_json(line)
    again = json.loads(K.event_to_json(event))
    assert _holds(again, json.loads(line)), "every old field reads back with its value"
    assert canon(K.event_from_json(K.event_to_json(event))) == canon(event)


def _holds(new: Any, old: Any) -> bool:
    """``new`` has every field of ``old`` with the same value (fields added since may be extra)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return all(k in new and _holds(new[k], v) for k, v in old.items())
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(_holds(a, b) for a, b in zip(new, old))
    return isinstance(new, bool) is isinstance(old, bool) and new == old  # 3 reads back as 3.0 in a float field


def test_old_lines_decode_to_the_right_values():
    host, cf, ctx, base, pol, sc = (K.event_from_json(line).payload for line in OLD_LINES)
    assert math.isnan(host.train_loss) and host.val_loss == math.inf and host.host_grad_norm == -math.inf
    assert math.isnan(host.seed_grad_norms["early"]) and host.grad_isolation_leakage is None
    assert cf.interaction_effects == {("a", "b"): -0.02} and cf.configs[0].per_class_accuracy[3] == 0.5
    assert math.isnan(cf.configs[0].per_class_accuracy[7]) and math.isnan(cf.shapley_values["a"].ci_low)
    assert ctx.timestamp == datetime(2026, 1, 1, 12, 0, 0, 123456) and ctx.hyperparameters["wd"] == math.inf
    assert [type(ctx.hyperparameters[k]) for k in ("lr", "bs", "amp", "opt")] == [float, int, bool, str]
    assert base.initial_checkpoint == Path("/ck/ep0-initial.pt")
    assert pol.action.op is C.ActionOp.GERMINATE and math.isnan(pol.observation_vector[1])
    assert sc.values["lr"] == 3.0 and type(sc.values["lr"]) is float and sc.values["gn"] == -math.inf


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(event_strategy)
def test_the_c_tagging_path_writes_the_bytes_of_the_reference_encoder(event):
    """An envelope with NaN/inf floats is encoded by msgspec's builtins plus one tagging walk
    (fast); its bytes are those of the pure-Python reference, to_jsonable."""
    if type(event.payload) in K._PY_ENCODED:  # non-string dict keys: the reference path itself
        return
    assert K._encode_tagged(event) == K._JSON.encode(K.to_jsonable(event))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(event_strategy)
def test_every_line_encode_event_writes_is_the_reference_encoders(event):
    """Whichever path encode_event takes (plain C, the flat patch, the tagging walk), the
    bytes are those of the pure-Python reference."""
    assert K.encode_event(event) == K._JSON.encode(K.to_jsonable(event))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 0.25, -0.0, 1e308]), min_size=6, max_size=6),
    st.text(max_size=40),
)
def test_the_flat_patch_tags_each_non_finite_field_of_a_host_snapshot(vals, text):
    """The per-epoch case (a plain loop's unknown fields are NaN) takes the flat patch; any
    mix of NaN/inf fields and any string in the envelope gives the reference bytes."""
    snap = C.HostSnapshot(3, vals[0], vals[1], vals[2], vals[3], 1, 0, 1, 0, vals[4], {}, vals[5])
    for run_id in (text, '"train_loss":null', 'x\\"val_loss":null'):
        ev = C.TelemetryEvent(C.TelemetryEventType.HOST_SNAPSHOT, run_id, "e", 3, 1.5, snap)
        line = K._JSON.encode(ev)
        want = K._JSON.encode(K.to_jsonable(ev))
        patched = K._patch_flat(ev, line)
        assert patched == want, "the flat patch is exact"
        assert K.encode_event(ev) == want
    # Not flat (a non-empty dict of floats): the patch declines and the general path decides.
    deep = C.HostSnapshot(3, math.nan, 0.1, 0.2, 0.3, 1, 0, 1, 0, 0.5, {"early": math.nan}, None)
    ev = C.TelemetryEvent(C.TelemetryEventType.HOST_SNAPSHOT, "r", "e", 3, 1.5, deep)
    assert K._patch_flat(ev, K._JSON.encode(ev)) is None
    assert K.encode_event(ev) == K._JSON.encode(K.to_jsonable(ev))


def test_non_finite_floats_are_tagged_in_fast_and_slow_paths():
    vals = {"a": float("nan"), "b": float("inf"), "c": float("-inf"), "d": 1.5}
    ev = C.TelemetryEvent(C.TelemetryEventType.SCALARS, "r", "e", 0, 1.0, C.Scalars(1, vals))
    ok = C.TelemetryEvent(C.TelemetryEventType.SCALARS, "r", "e", 0, 1.0, C.Scalars(2, {"d": 1.5}))
    for line in (K.event_to_json(ev), K.encode_lines([ok, ev, ok]).splitlines()[1].decode()):
        data = json.loads(line)
        assert data["payload"]["values"] == {
            "a": {"$float": "nan"},
            "b": {"$float": "inf"},
            "c": {"$float": "-inf"},
            "d": 1.5,
        }
        assert "null" not in line
    # A genuine None next to finite floats keeps the fast path's output (null is None).
    snap = C.BatchMetrics(1, 2, 0.5, 0.5, 1.0, {}, None)
    assert json.loads(K.to_json(snap))["isolation_leakage"] is None


def test_numpy_and_str_subclass_values_encode_as_plain_values():
    np = pytest.importorskip("numpy")

    class Version(str):
        pass

    s = C.Scalars(1, {"x": np.float64(0.25), "y": np.float64("nan")})
    assert json.loads(K.to_json(s)) == {"step": 1, "values": {"x": 0.25, "y": {"$float": "nan"}}}
    ctx_sw = {"torch": Version("2.5")}
    assert json.loads(
        K.encode_event(C.TelemetryEvent(C.TelemetryEventType.SCALARS, "r", "e", 0, 1.0, C.Scalars(0, {})))
    )["payload"] == {"step": 0, "values": {}}
    assert json.loads(K._JSON.encode(ctx_sw)) == {"torch": "2.5"}


def test_non_finite_floats_are_tagged_never_null():
    snap = C.HostSnapshot(
        epoch=3,
        train_loss=float("nan"),
        train_accuracy=0.1,
        val_loss=float("inf"),
        val_accuracy=0.0,
        host_params=10,
        total_seed_params=0,
        total_params=10,
        fossilized_params=0,
        host_grad_norm=float("-inf"),
        seed_grad_norms={"early": float("nan")},
        grad_isolation_leakage=None,
    )
    data = json.loads(K.to_json(snap))
    assert data["train_loss"] == {"$float": "nan"}
    assert data["val_loss"] == {"$float": "inf"}
    assert data["host_grad_norm"] == {"$float": "-inf"}
    assert data["grad_isolation_leakage"] is None
    back = K.from_json(C.HostSnapshot, K.to_json(snap))
    assert math.isnan(back.train_loss) and back.val_loss == math.inf and back.host_grad_norm == -math.inf


def test_non_string_dict_keys_survive():
    m = C.CounterfactualMatrix(
        epoch=1,
        slot_ids=("a", "b"),
        configs=(),
        marginal_contributions={"a": 0.1},
        interaction_effects={("a", "b"): -0.02},
        shapley_values=None,
    )
    back = K.from_json(C.CounterfactualMatrix, K.to_json(m))
    assert back.interaction_effects == {("a", "b"): -0.02}
    r = C.CounterfactualResult((True,), {"a": 1.0}, 0.5, 0.9, per_class_accuracy={3: 0.5})
    assert K.from_json(C.CounterfactualResult, K.to_json(r)).per_class_accuracy == {3: 0.5}


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("{", "not JSON"),
        ('{"event_type": "nope"}', "unknown event_type"),
        ('{"event_type": "mode_change", "schema_version": 99, "payload": {}}', "schema_version 99"),
        (
            '{"event_type": "mode_change", "schema_version": 1, "payload": {"mode": "turbo", "reason": "x"}}',
            "Invalid enum value 'turbo' - at `$.payload.mode`",
        ),
        (
            '{"event_type": "mode_change", "schema_version": 1, "payload": {"mode": "research"}}',
            "missing required field `reason`",
        ),
    ],
)
def test_decode_errors_are_specific(line, fragment):
    with pytest.raises(K.ContractDecodeError, match=re.escape(fragment)):
        K.event_from_json(line)


# ------------------------------------------------------------------ errors


def _line(**payload_changes: Any) -> str:
    ev = C.TelemetryEvent(
        C.TelemetryEventType.HOST_SNAPSHOT,
        "r",
        "e",
        1,
        1.0,
        C.HostSnapshot(1, 0.5, 0.5, 0.5, 0.5, 10, 0, 10, 0, 1.0, {"a": 1.0}, None),
    )
    data = json.loads(K.event_to_json(ev))
    data["payload"].update(payload_changes)
    return json.dumps(data)


def test_unknown_schema_version_is_rejected_clearly():
    data = json.loads(_line())
    for version, fragment in (
        (2, "schema_version 2 is not supported (this Karn reads 1; a newer Karn"),
        (0, "schema_version 0 is not supported"),
        ("1", "schema_version '1'"),
    ):
        data["schema_version"] = version
        with pytest.raises(K.ContractDecodeError, match=re.escape(fragment)):
            K.event_from_json(json.dumps(data))
    del data["schema_version"]
    with pytest.raises(K.ContractDecodeError, match="schema_version None"):
        K.event_from_json(json.dumps(data))


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("epoch", "3", "Expected `int`, got `str` - at `$.payload.epoch`"),
        ("train_loss", "x", "Expected `float`, got `str` - at `$.payload.train_loss`"),
        ("train_loss", {"$float": "nope"}, "Expected `float`, got `object` - at `$.payload.train_loss`"),
        ("seed_grad_norms", {"a": "1"}, "at `$.payload.seed_grad_norms"),
        ("grad_isolation_leakage", [1], "at `$.payload.grad_isolation_leakage`"),
        ("host_params", True, "Expected `int`, got `bool` - at `$.payload.host_params`"),
    ],
)
def test_wrong_types_are_decode_errors_naming_the_field(field, value, fragment):
    with pytest.raises(K.ContractDecodeError, match=re.escape(fragment)):
        K.event_from_json(_line(**{field: value}))


def test_envelope_errors_name_the_field():
    data = json.loads(_line())
    data["epoch"] = "one"
    with pytest.raises(K.ContractDecodeError, match=re.escape("at `$.epoch`")):
        K.event_from_json(json.dumps(data))
    with pytest.raises(K.ContractDecodeError, match="not JSON"):
        K.event_from_json(_line()[:40])
    with pytest.raises(K.ContractDecodeError, match="not a JSON object"):
        K.event_from_json("[1, 2]")


@SETTINGS
@given(event_strategy, st.data())
def test_any_wrong_type_is_a_decode_error_never_a_crash(event, data):
    raw = json.loads(K.event_to_json(event))
    if not raw["payload"]:
        return
    name = data.draw(st.sampled_from(sorted(raw["payload"])))
    raw["payload"][name] = data.draw(st.sampled_from([[["x"]], {"no": "such"}, "text?", -1.5e300]))
    try:
        K.event_from_json(json.dumps(raw))
    except K.ContractDecodeError as exc:
        assert name in str(exc) or "payload" in str(exc)


def test_old_names_stay_importable_from_contracts():
    from karn_otel.contracts import ContractDecodeError, event_from_json, to_jsonable  # noqa: F401

    assert C.to_json is K.to_json and C.ContractDecodeError is K.ContractDecodeError
    with pytest.raises(AttributeError):
        C.no_such_name  # noqa: B018


# ------------------------------------------------------------------ the run-log writer


def test_writer_loses_nothing_under_a_busy_producer(tmp_path):
    """A bounded burst (20,000 events) from a producer busy in pure Python: 0 drops, all on disk."""
    sink = RunLogSink(tmp_path, "r")
    n = 20_000
    done = threading.Event()
    values = {f"v{i}": i * 0.5 for i in range(20)}
    values["nan"] = float("nan")
    t0 = time.perf_counter()
    for s in range(n):
        sink.handle(C.TelemetryEvent(C.TelemetryEventType.SCALARS, "r", "e", 0, 1.0, C.Scalars(s, values)))
        if s % 64 == 0:
            x = 0
            for i in range(500):  # training work holding the GIL
                x += i
    done.set()
    sink.close()
    assert time.perf_counter() - t0 < 60
    assert sink.dropped() == {}
    rec = read_run(tmp_path / "r")
    assert rec.skipped == []
    assert [e.payload.step for e in rec.events] == list(range(n))
    assert math.isnan(rec.events[-1].payload.values["nan"])


def test_flush_fsyncs_and_waits_for_everything_handled(tmp_path, monkeypatch):
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    sink = RunLogSink(tmp_path, "r", wake_batch=10**9)
    for s in range(3000):
        sink.handle(C.TelemetryEvent(C.TelemetryEventType.SCALARS, "r", "e", 0, 1.0, C.Scalars(s, {})))
    sink.flush(timeout=30)
    assert synced, "flush fsyncs"
    assert (tmp_path / "r" / "events.jsonl").read_bytes().count(b"\n") == 3000
    sink.close()


def test_an_unencodable_event_is_dropped_alone(tmp_path):
    sink = RunLogSink(tmp_path, "r", wake_batch=10**9)
    good = C.TelemetryEvent(C.TelemetryEventType.SCALARS, "r", "e", 0, 1.0, C.Scalars(1, {"a": 1.0}))
    bad = dataclasses.replace(good, payload=C.Scalars(2, {"a": object()}))  # type: ignore[dict-item]
    for ev in (good, bad, good):
        sink.handle(ev)
    sink.close()
    assert sink.dropped() == {"encode_error": 1}
    assert len(read_run(tmp_path / "r").events) == 2


# ------------------------------------------------------------------ the door's checkers


@pytest.mark.parametrize(
    "value, reason",
    [
        ("ep-1", None),
        ("a" * 128, None),
        ("a" * 129, "invalid_id"),
        ("", "invalid_id"),
        ("a/b", "invalid_id"),
        ("a\\b", "invalid_id"),
        ("..", "invalid_id"),
        ("x..y", "invalid_id"),
        (".", "invalid_id"),
        ("a\x1bb", "invalid_id"),
        ("a\u202eb", "invalid_id"),  # a bidi override is not printable
        ("\ud800", "invalid_id"),
        (5, "type_error"),
    ],
)
def test_id_rule(value, reason):
    p = K.id_problem(value)
    assert (p.reason if p else None) == reason


def test_checkers_name_the_field_and_never_fail_to_describe():
    p = K.check_object(C.Scalars(1, {"a": 1.0, "b": 10**5000}))
    assert p is not None and p.reason == "out_of_range" and p.where == ".values['b']"
    assert "<int of" in p.detail and len(p.detail) < 100
    assert K.check_types(C.Scalars(1, {"a": "x"})) == "values['a']: expected float, got str"
    assert K.check_object(C.Scalars(1, {"a": float("nan")})) is K.MAYBE_NONFINITE
    # an int is a valid float, reported as not yet canonical; canonical_floats converts it
    ints = C.Scalars(1, {"a": 1.0, "b": 2})
    assert K.check_object(ints) is K.MAYBE_NONFINITE
    assert K.check_object(K.canonical_floats(ints)) is None
    assert K.check_object(C.Scalars(2**63, {})).reason == "out_of_range"  # type: ignore[union-attr]
    assert K.check_object(C.Scalars(True, {})).reason == "type_error"  # type: ignore[union-attr]


def test_safe_repr_and_printable_are_bounded_and_escaped():
    assert K.safe_repr(10**5000).startswith("<int of")
    assert K.safe_repr("x" * 1000).endswith("(+940 chars)")

    class Evil:
        def __repr__(self):
            raise RuntimeError

    assert K.safe_repr(Evil()) == "<Evil>"
    assert K.printable("a\x1b[31mb\u202ec\ud800\n") == "a\\x1b[31mb\\u202ec\\ud800\\n"
    assert len(K.printable("y" * 10_000, 50)) == 53


def test_canonical_floats_turns_ints_in_float_places_into_floats_and_nothing_else():
    hs = C.HostSnapshot(4, 2, 0.5, 1, 1, 1674, 0, 1674, 0, 0, {"mid": 3}, 0)
    out = K.canonical_floats(hs)
    assert canon(out) == canon(C.HostSnapshot(4, 2.0, 0.5, 1.0, 1.0, 1674, 0, 1674, 0, 0.0, {"mid": 3.0}, 0.0))
    # the int fields stay ints (epoch, parameter counts); an object with nothing to convert is returned as is
    assert type(out.epoch) is int and type(out.host_params) is int
    finite = C.HostSnapshot(4, 2.0, 0.5, 1.0, 1.0, 1674, 0, 1674, 0, 0.0, {}, None)
    assert K.canonical_floats(finite) is finite
    # nested: a sequence of floats, a dict of floats, an Optional float inside a nested contract
    res = C.CounterfactualResult((True, False), {"early": 1}, 1, 0.5, {3: 1})
    assert canon(K.canonical_floats(res)) == canon(
        C.CounterfactualResult((True, False), {"early": 1.0}, 1.0, 0.5, {3: 1.0})
    )


def test_an_int_given_for_a_float_is_stored_as_the_run_log_reads_it_back(tmp_path):
    """What sinks and the store see is exactly what a replay of the run log gives back (the
    fuzz test's round trip, type for type): an int in a float place arrives as a float."""
    from karn_otel import collector as kc
    from karn_otel.config import KarnConfig
    from karn_otel.sinks import MemorySink
    from tests.conftest import make_context

    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", strict=True, run_id="run"))
    mem = MemorySink()
    c.add_sink(mem)
    c.emit(make_context())
    c.emit(C.BatchMetrics(0, 0, 0.0, 0.0, 0, {}, None))  # the fuzz test's find: host_grad_norm=0
    c.emit(C.Scalars(1, {"loss": 1, "lr": 0.1}))  # the per-step path
    c.emit(C.HostSnapshot(1, 2, float("nan"), 1, 1, 10, 0, 10, 0, 0, {}, None))  # the general path, with a NaN
    for ev in mem.events[1:]:
        assert canon(K.event_from_json(K.encode_event(ev))) == canon(ev), ev.event_type
    assert type(mem.events[1].payload.host_grad_norm) is float
    assert (
        mem.events[2].payload.values == {"loss": 1.0, "lr": 0.1} and type(mem.events[2].payload.values["loss"]) is float
    )
    assert getattr(mem.events[2], K.FINITE_FLAG) is True  # converted, then proven finite
    assert type(mem.events[3].payload.train_loss) is float and math.isnan(mem.events[3].payload.train_accuracy)
