"""The one codec: validation of emitted contracts, and encode/decode of every contract and
of the :class:`TelemetryEvent` envelope (the lines of ``events.jsonl``).

Built on msgspec: encoding and typed decoding run in C. The on-disk form is unchanged from
the first hand-written encoder, so old run logs still decode:

* strict JSON, one envelope per line, fields in dataclass order;
* a non-finite float is the tagged object ``{"$float": "nan"}`` / ``"inf"`` / ``"-inf"``
  (plain JSON has no NaN; jq and DuckDB read the tagged form);
* a dict whose keys are not strings is a list of ``[key, value]`` pairs;
* enums are their values, paths and datetimes strings (ISO 8601).

msgspec writes a non-finite float as ``null``, so the fast path is guarded: a batch whose
JSON has no ``null`` cannot hold one; where it has, one msgpack encoding (C, float64 bits
kept) tells whether any float is non-finite. Only then, and for the two counterfactual
contracts with non-string dict keys, the Python encoder :func:`to_jsonable` runs.
Decoding is typed (msgspec validates every field); a tagged float or a pair-list dict in a
line sends just that payload through a small fix-up before the same typed conversion.

``check_types(obj)`` checks a contract instance against its type hints, with one checker per
class built once and cached (the cattrs pattern: a dispatch table per type).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
import re
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Union

import msgspec

from karn_otel.contracts import (
    PAYLOAD_TYPES,
    SCHEMA_VERSION,
    TelemetryEvent,
    TelemetryEventType,
)

__all__ = [
    "ContractDecodeError",
    "check_types",
    "decode_payload",
    "encode_event",
    "encode_lines",
    "event_from_dict",
    "event_from_json",
    "event_to_dict",
    "event_to_json",
    "from_json",
    "from_jsonable",
    "to_json",
    "to_jsonable",
    "type_hints",
]


class ContractDecodeError(ValueError):
    """A JSON document does not match the contract it claims to be."""


_HINTS: dict[type, dict[str, Any]] = {}


def type_hints(cls: type) -> dict[str, Any]:
    """Resolved field type hints of a contract class (cached)."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = hints
    return hints


# --------------------------------------------------------------------------- types needing care

_FLOAT_TAG = "$float"
_NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _is_union(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin is Union or origin is types.UnionType


_PAIRS_MEMO: dict[Any, bool] = {}


def _has_pair_dicts(tp: Any) -> bool:
    """Does ``tp`` contain (at any depth) a dict whose keys are not strings?"""
    memo = _PAIRS_MEMO.get(tp)
    if memo is not None:
        return memo
    _PAIRS_MEMO[tp] = False  # recursion guard
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        out = any(_has_pair_dicts(h) for h in type_hints(tp).values())
    elif origin is dict:
        out = (bool(args) and args[0] is not str) or any(_has_pair_dicts(a) for a in args)
    elif origin in (list, tuple) or _is_union(tp):
        out = any(_has_pair_dicts(a) for a in args if a is not Ellipsis)
    else:
        out = False
    _PAIRS_MEMO[tp] = out
    return out


# Payload classes msgspec cannot encode in today's on-disk form (non-str dict keys).
_PY_ENCODED: frozenset[type] = frozenset(c for c in PAYLOAD_TYPES.values() if _has_pair_dicts(c))


# --------------------------------------------------------------------------- encoding


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (str, Path)):  # str subclasses (torch's TorchVersion), paths
        return str(obj)
    if isinstance(obj, float):  # numpy.float64 and other float subclasses
        return float(obj)
    if isinstance(obj, int):
        return int(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__} as Karn JSON")


_JSON = msgspec.json.Encoder(enc_hook=_enc_hook)
_MSGPACK = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
# msgpack writes every float as 0xcb + big-endian float64; exponent bits all ones = NaN/inf.
# (A match inside other bytes is a false positive, which only costs the slow path.)
_NONFINITE_BITS = re.compile(rb"\xcb[\x7f\xff][\xf0-\xff]")


def _may_be_nonfinite(obj: Any) -> bool:
    try:
        packed = _MSGPACK.encode(obj)
    except (
        OverflowError,
        TypeError,
    ):  # ints beyond 64 bits: msgpack can't say, assume yes
        return True
    return _NONFINITE_BITS.search(packed) is not None


def _encode_float(x: float) -> Any:
    if math.isfinite(x):
        return float(x)
    return {_FLOAT_TAG: "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


def to_jsonable(obj: Any) -> Any:
    """Convert a contract (or any value inside one) to plain JSON types, in the on-disk form.

    The slow path of the encoder (Python); :func:`encode_event` uses it only where needed.
    """
    tp = type(obj)
    if tp is float:
        return obj if obj - obj == 0 else _encode_float(obj)  # x - x is NaN exactly for NaN/inf
    if obj is None or tp is str or tp is bool or tp is int:
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return _encode_float(float(obj))
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: to_jsonable(v) for k, v in obj.items()}
        return [[to_jsonable(k), to_jsonable(v)] for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    raise TypeError(f"cannot encode {type(obj).__name__} as Karn JSON")


def _needs_python(obj: Any, line: bytes) -> bool:
    return b"null" in line and _may_be_nonfinite(obj)


def _encode_slow(obj: Any) -> bytes:
    return _JSON.encode(to_jsonable(obj))


def encode_event(event: TelemetryEvent) -> bytes:
    """One line of ``events.jsonl`` as UTF-8 bytes, without the newline."""
    if type(event.payload) in _PY_ENCODED:
        return _encode_slow(event)
    line = _JSON.encode(event)
    return _encode_slow(event) if _needs_python(event, line) else line


_payload_of = operator.attrgetter("payload")


def encode_lines(events: Sequence[TelemetryEvent]) -> bytes:
    """Newline-delimited JSON for a batch of envelopes (each line ends with ``\\n``).

    One C call for the whole batch in the common case; raises like :func:`encode_event`
    when an event cannot be encoded (callers wanting per-event errors retry one by one).
    """
    if _PY_ENCODED.isdisjoint(map(type, map(_payload_of, events))):  # C-level loop
        buf = _JSON.encode_lines(events)
        if b"null" not in buf or not _may_be_nonfinite(events):
            return buf
    return b"".join([encode_event(e) + b"\n" for e in events])


def event_to_dict(event: TelemetryEvent) -> dict[str, Any]:
    out: dict[str, Any] = to_jsonable(event)
    return out


def event_to_json(event: TelemetryEvent) -> str:
    """One line of ``events.jsonl`` (strict JSON: no NaN tokens)."""
    return encode_event(event).decode()


def to_json(obj: Any) -> str:
    if dataclasses.is_dataclass(obj) and not _has_pair_dicts(type(obj)):
        line = _JSON.encode(obj)
        if not _needs_python(obj, line):
            return line.decode()
    return _encode_slow(obj).decode()


# --------------------------------------------------------------------------- decoding


def _dec_hook(tp: Any, obj: Any) -> Any:
    if tp is Path and isinstance(obj, str):
        return Path(obj)
    raise NotImplementedError


def _untag(data: Any) -> Any:
    """Replace every ``{"$float": "nan"|"inf"|"-inf"}`` in decoded JSON by the float."""
    if isinstance(data, dict):
        if len(data) == 1 and _FLOAT_TAG in data:
            tag = data[_FLOAT_TAG]
            if isinstance(tag, str) and tag in _NONFINITE:
                return _NONFINITE[tag]
        return {k: _untag(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_untag(v) for v in data]
    return data


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


_Fixer = Callable[[Any], Any]
_FIXERS: dict[Any, _Fixer | None] = {}


def _fixer(tp: Any) -> _Fixer | None:
    """A function turning pair lists back into dicts inside decoded JSON of type ``tp``;
    None where ``tp`` holds no non-str-keyed dict (nothing to fix)."""
    if tp in _FIXERS:
        return _FIXERS[tp]
    fix: _Fixer | None = None
    if _has_pair_dicts(tp):
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            plan = [(n, f) for n, h in type_hints(tp).items() if (f := _fixer(h)) is not None]

            def fix_obj(d: Any) -> Any:
                if not isinstance(d, dict):
                    return d
                d = dict(d)
                for name, f in plan:
                    if name in d:
                        d[name] = f(d[name])
                return d

            fix = fix_obj
        elif origin is dict:
            vfix = _fixer(args[1]) or (lambda v: v)

            def fix_dict(d: Any) -> Any:
                if isinstance(d, list) and all(isinstance(p, list) and len(p) == 2 for p in d):
                    return {_hashable(k): vfix(v) for k, v in d}
                if isinstance(d, dict):
                    return {k: vfix(v) for k, v in d.items()}
                return d

            fix = fix_dict
        elif origin in (list, tuple):
            item = _fixer(args[0]) or (lambda v: v)
            fix = lambda d: [item(v) for v in d] if isinstance(d, list) else d
        elif _is_union(tp):
            members = [f for a in typing.get_args(tp) if (f := _fixer(a)) is not None]
            only = members[0]  # contracts hold at most one such member per union (X | None)
            fix = lambda d: None if d is None else only(d)
    _FIXERS[tp] = fix
    return fix


def _error(where: str, exc: msgspec.ValidationError) -> ContractDecodeError:
    msg = str(exc)
    if "- at `$" in msg:  # msgspec names the field: "Expected `int`, got `str` - at `$.step`"
        return ContractDecodeError(msg.replace("- at `$", f"- at `{where}"))
    return ContractDecodeError(f"{msg} - at `{where}`")


def from_jsonable(tp: Any, data: Any, where: str = "$") -> Any:
    """Decode ``data`` (plain JSON types, today's on-disk form) as type ``tp`` (typed, validated)."""
    data = _untag(data)
    fix = _fixer(tp)
    if fix is not None:
        data = fix(data)
    try:
        return msgspec.convert(data, tp, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise _error(where, exc) from None


_DECODERS: dict[Any, msgspec.json.Decoder[Any]] = {}


def _tagged(raw: Any) -> bool:
    if isinstance(raw, str):
        return '"$float"' in raw
    return b'"$float"' in (raw if isinstance(raw, bytes) else memoryview(raw).tobytes())


def decode_payload(tp: Any, raw: Any, where: str = "$", tagged: bool | None = None) -> Any:
    """Typed decode of one JSON document (str, bytes or msgspec.Raw) as ``tp``; C speed when
    the text holds no tagged float and ``tp`` no non-str-keyed dict."""
    if (_tagged(raw) if tagged is None else tagged) or _has_pair_dicts(tp):
        try:
            data = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise ContractDecodeError(f"not JSON: {exc}") from None
        return from_jsonable(tp, data, where)
    dec = _DECODERS.get(tp)
    if dec is None:
        dec = _DECODERS[tp] = msgspec.json.Decoder(tp, dec_hook=_dec_hook)
    try:
        return dec.decode(raw)
    except msgspec.ValidationError as exc:
        raise _error(where, exc) from None
    except msgspec.DecodeError as exc:
        raise ContractDecodeError(f"not JSON: {exc}") from None


class _EnvelopeHead(msgspec.Struct):
    event_type: str
    run_id: str
    episode_id: str
    epoch: int
    timestamp: float
    rank: int = 0
    world_size: int = 1
    is_reduced: bool = False
    schema_version: Any = None


class _EnvelopeLine(_EnvelopeHead):
    payload: msgspec.Raw = msgspec.Raw(b"null")


_LINE = msgspec.json.Decoder(_EnvelopeLine)
_EVENT_TYPES = {et.value: et for et in TelemetryEventType}


def _check_head(event_type: Any, version: Any) -> TelemetryEventType:
    et = _EVENT_TYPES.get(event_type) if isinstance(event_type, str) else None
    if et is None:
        raise ContractDecodeError(f"unknown event_type {event_type!r}")
    if version != SCHEMA_VERSION or type(version) is not int:
        raise ContractDecodeError(
            f"schema_version {version!r} is not supported (this Karn reads {SCHEMA_VERSION}; "
            "a newer Karn wrote this run log)"
            if isinstance(version, int) and version > SCHEMA_VERSION
            else f"schema_version {version!r} is not supported (this Karn reads {SCHEMA_VERSION})"
        )
    return et


def _event(head: _EnvelopeHead, et: TelemetryEventType, payload: Any) -> TelemetryEvent:
    return TelemetryEvent(
        event_type=et,
        run_id=head.run_id,
        episode_id=head.episode_id,
        epoch=head.epoch,
        timestamp=head.timestamp,
        payload=payload,
        rank=head.rank,
        world_size=head.world_size,
        is_reduced=head.is_reduced,
        schema_version=head.schema_version,
    )


def event_from_dict(data: dict[str, Any]) -> TelemetryEvent:
    """Decode one envelope (plain JSON types); the payload class is chosen by ``event_type``."""
    if not isinstance(data, dict):
        raise ContractDecodeError("event is not a JSON object")
    et = _check_head(data.get("event_type"), data.get("schema_version"))
    payload = from_jsonable(PAYLOAD_TYPES[et], data.get("payload"), "$.payload")
    head = from_jsonable(_EnvelopeHead, {k: v for k, v in data.items() if k != "payload"})
    return _event(head, et, payload)


def event_from_json(line: str | bytes) -> TelemetryEvent:
    """Decode one line of ``events.jsonl``; any mismatch is a ContractDecodeError."""
    try:
        env = _LINE.decode(line)
    except msgspec.ValidationError:
        # Not the expected shape: decode untyped for the precise error (schema first).
        try:
            data = msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            raise ContractDecodeError(f"not JSON: {exc}") from None
        return event_from_dict(data)
    except msgspec.DecodeError as exc:
        raise ContractDecodeError(f"not JSON: {exc}") from None
    et = _check_head(env.event_type, env.schema_version)
    tagged = ('"$float"' in line) if isinstance(line, str) else (b'"$float"' in line)
    return _event(env, et, decode_payload(PAYLOAD_TYPES[et], env.payload, "$.payload", tagged))


def from_json(cls: type, text: str | bytes) -> Any:
    return decode_payload(cls, text)


def read_lines(lines: Iterable[str | bytes]) -> list[TelemetryEvent]:
    """Decode several lines (no error recovery; see sinks.runlog.read_events for that)."""
    return [event_from_json(line) for line in lines]


# --------------------------------------------------------------------------- validation

# Per-class type checkers, built once from the type hints. Each returns None when the value
# conforms, or a short "field: expected X, got Y" description.
_Checker = Callable[[Any], str | None]
_CHECKERS: dict[type, _Checker] = {}


def check_types(obj: Any) -> str | None:
    """Check a contract instance against its type hints (recursively)."""
    checker = _CHECKERS.get(type(obj))
    if checker is None:
        checker = _dataclass_checker(type(obj))
    return checker(obj)


def _dataclass_checker(cls: type) -> _Checker:
    hints = type_hints(cls)
    fields = [(f.name, _checker_for(hints[f.name])) for f in dataclasses.fields(cls)]

    def check(obj: Any) -> str | None:
        if type(obj) is not cls:
            return f": expected {cls.__name__}, got {type(obj).__name__}"
        for name, chk in fields:
            problem = chk(getattr(obj, name))
            if problem is not None:
                return f"{name}{problem}"
        return None

    _CHECKERS[cls] = check
    return check


def _describe(v: Any) -> str:
    return type(v).__name__


def _check_float(v: Any) -> str | None:
    t = type(v)
    if t is float or t is int or (isinstance(v, (float, int)) and not isinstance(v, bool)):
        return None
    return f": expected float, got {_describe(v)}"


_is_str = str.__instancecheck__  # bound: isinstance(x, str), called from C by map()
_is_float = float.__instancecheck__


def _check_str_float_dict(v: Any) -> str | None:
    if type(v) is not dict:
        return f": expected dict, got {_describe(v)}"
    # Fast path: all keys str and all values exactly float (one C-level pass each).
    if all(map(_is_str, v)) and all(map(_is_float, v.values())):
        return None
    for k, x in v.items():
        if type(k) is not str or (type(x) is not float and _check_float(x) is not None):
            if type(k) is not str:
                return f"[{k!r}]: expected str, got {_describe(k)}"
            return f"[{k!r}]: expected float, got {_describe(x)}"
    return None


def _checker_for(tp: Any) -> _Checker:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return lambda v: None
    if tp is float:
        return _check_float
    if tp is int:
        return lambda v: (
            None if isinstance(v, int) and not isinstance(v, bool) else f": expected int, got {_describe(v)}"
        )
    if tp is bool:
        return lambda v: None if isinstance(v, bool) else f": expected bool, got {_describe(v)}"
    if tp is str:
        return lambda v: None if isinstance(v, str) else f": expected str, got {_describe(v)}"
    if tp is type(None):
        return lambda v: None if v is None else f": expected None, got {_describe(v)}"
    if tp in (Path, datetime) or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return lambda v: None if isinstance(v, tp) else f": expected {tp.__name__}, got {_describe(v)}"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return lambda v: check_types(v) if type(v) is tp else f": expected {tp.__name__}, got {_describe(v)}"
    if origin is Literal:
        return lambda v: None if v in args else f": expected one of {args}, got {v!r}"
    if origin is Union or origin is types.UnionType:
        members = [_checker_for(a) for a in args]

        def check_union(v: Any) -> str | None:
            for m in members:
                if m(v) is None:
                    return None
            return f": expected {tp}, got {_describe(v)}"

        return check_union
    if origin in (list, tuple):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            items = [_checker_for(a) for a in args]

            def check_fixed(v: Any) -> str | None:
                if not isinstance(v, tuple) or len(v) != len(items):
                    return f": expected tuple of {len(items)}, got {_describe(v)}"
                for i, (c, x) in enumerate(zip(items, v)):
                    p = c(x)
                    if p:
                        return f"[{i}]{p}"
                return None

            return check_fixed
        item = _checker_for(args[0]) if args else (lambda v: None)
        container = origin

        def check_seq(v: Any) -> str | None:
            if not isinstance(v, container):
                return f": expected {container.__name__}, got {_describe(v)}"
            for i, x in enumerate(v):
                p = item(x)
                if p:
                    return f"[{i}]{p}"
            return None

        return check_seq
    if origin is dict and args == (str, float):
        return _check_str_float_dict  # the common case (per-slot and per-head values), kept fast
    if origin is dict:
        kc, vc = (_checker_for(args[0]), _checker_for(args[1])) if args else (lambda v: None, lambda v: None)

        def check_dict(v: Any) -> str | None:
            if not isinstance(v, dict):
                return f": expected dict, got {_describe(v)}"
            for k, x in v.items():
                p = kc(k) or vc(x)
                if p:
                    return f"[{k!r}]{p}"
            return None

        return check_dict
    raise TypeError(f"no checker for {tp!r}")
