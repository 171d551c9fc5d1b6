"""Contracts: the dataclasses themselves (their encoding is tested in tests/test_codec.py)."""

from __future__ import annotations

import dataclasses

import pytest

from karn_otel import contracts as C


def test_every_event_type_has_a_payload_class():
    assert set(C.PAYLOAD_TYPES) == set(C.TelemetryEventType)
    assert all(dataclasses.is_dataclass(cls) for cls in C.PAYLOAD_TYPES.values())
    assert {C.EVENT_TYPE_OF[cls] for cls in C.PAYLOAD_TYPES.values()} == set(C.TelemetryEventType)


def test_contracts_are_frozen():
    a = C.FactoredAction(C.ActionOp.WAIT)
    with pytest.raises(Exception):
        a.op = C.ActionOp.CULL  # type: ignore[misc]
