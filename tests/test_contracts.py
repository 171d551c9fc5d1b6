"""Contracts: exact JSON round trip of every dataclass (NaN and +-inf included)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from karn_otel import codec as K
from karn_otel import contracts as C
from tests.conftest import canon

st.register_type_strategy(Path, st.text(max_size=20).map(Path))

ALL_CONTRACTS = sorted(set(C.PAYLOAD_TYPES.values()) | {
    C.FactoredAction, C.RewardComponentsTelemetry, C.AdvantageStats, C.RatioStats, C.LSTMHealth,
    C.CounterfactualResult, C.ShapleyEstimate, C.BatchMetrics, C.GateEvaluationTrace,
}, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", ALL_CONTRACTS, ids=lambda c: c.__name__)
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_every_contract_round_trips_exactly(cls, data):
    obj = data.draw(st.from_type(cls))
    text = K.to_json(obj)
    json.loads(text)  # strict JSON: parseable without NaN extensions
    back = K.from_json(cls, text)
    assert canon(back) == canon(obj)


event_strategy = st.sampled_from(sorted(C.PAYLOAD_TYPES.items(), key=lambda kv: kv[0].value)).flatmap(
    lambda kv: st.builds(
        C.TelemetryEvent,
        event_type=st.just(kv[0]),
        payload=st.from_type(kv[1]),
        run_id=st.text(max_size=10),
        episode_id=st.text(max_size=10),
        epoch=st.integers(0, 10**6),
        timestamp=st.floats(allow_nan=False, allow_infinity=False),
        rank=st.integers(0, 7),
        world_size=st.integers(1, 8),
        is_reduced=st.booleans(),
    )
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(event_strategy)
def test_envelope_round_trips_exactly(event):
    line = K.event_to_json(event)
    assert "\n" not in line
    assert canon(K.event_from_json(line)) == canon(event)


def test_non_finite_floats_are_tagged_never_null():
    snap = C.HostSnapshot(
        epoch=3, train_loss=float("nan"), train_accuracy=0.1, val_loss=float("inf"), val_accuracy=0.0,
        host_params=10, total_seed_params=0, total_params=10, fossilized_params=0,
        host_grad_norm=float("-inf"), seed_grad_norms={"early": float("nan")}, grad_isolation_leakage=None,
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
        epoch=1, slot_ids=("a", "b"), configs=(), marginal_contributions={"a": 0.1},
        interaction_effects={("a", "b"): -0.02}, shapley_values=None,
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
        ('{"event_type": "mode_change", "schema_version": 1, "payload": {"mode": "turbo", "reason": "x"}}', "Invalid enum value 'turbo' - at `$.payload.mode`"),
        ('{"event_type": "mode_change", "schema_version": 1, "payload": {"mode": "research"}}', "missing required field `reason`"),
    ],
)
def test_decode_errors_are_specific(line, fragment):
    with pytest.raises(K.ContractDecodeError, match=re.escape(fragment)):
        K.event_from_json(line)


def test_contracts_are_frozen():
    a = C.FactoredAction(C.ActionOp.WAIT)
    with pytest.raises(Exception):
        a.op = C.ActionOp.CULL  # type: ignore[misc]
