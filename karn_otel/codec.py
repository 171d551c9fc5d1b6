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
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from itertools import repeat
from pathlib import Path
from typing import Any, Literal, Union
from zoneinfo import ZoneInfo

import msgspec

from karn_otel.contracts import (
    PAYLOAD_TYPES,
    SCHEMA_VERSION,
    TelemetryEvent,
    TelemetryEventType,
)

__all__ = [
    "FINITE_FLAG",
    "ID_MAX_LEN",
    "MAYBE_NONFINITE",
    "ContractDecodeError",
    "Problem",
    "check_float",
    "check_int",
    "check_object",
    "check_str",
    "canonical_floats",
    "check_types",
    "checker",
    "decode_payload",
    "encode_event",
    "encode_lines",
    "event_from_dict",
    "event_from_json",
    "event_to_dict",
    "event_to_json",
    "from_json",
    "from_jsonable",
    "id_problem",
    "printable",
    "safe_repr",
    "to_json",
    "to_jsonable",
    "type_hints",
    "type_name",
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


def _tag_nonfinite(x: Any) -> Any:
    """Plain JSON types (msgspec's builtins) with every NaN/inf float replaced by its tag."""
    tp = type(x)
    if tp is float:
        return x if x - x == 0 else _encode_float(x)
    if tp is dict:
        return {k: _tag_nonfinite(v) for k, v in x.items()}
    if tp is list or tp is tuple:  # to_builtins keeps tuples
        return [_tag_nonfinite(v) for v in x]
    return x


def _encode_tagged(obj: Any) -> bytes:
    """The on-disk form of an object with non-finite floats and only string dict keys: msgspec
    converts it to builtins in C, one Python walk tags the non-finite floats (about 5 us for an
    envelope, against about 100 us for :func:`to_jsonable`; the same bytes, tested)."""
    return _JSON.encode(_tag_nonfinite(msgspec.to_builtins(obj, enc_hook=_enc_hook)))


def encode_event(event: TelemetryEvent) -> bytes:
    """One line of ``events.jsonl`` as UTF-8 bytes, without the newline."""
    if type(event.payload) in _PY_ENCODED:
        return _encode_slow(event)
    line = _JSON.encode(event)
    return _retag(event, line) if b"null" in line else line


_NONFINITE_JSON = {k: _JSON.encode({_FLOAT_TAG: k}) for k in ("nan", "inf", "-inf")}
_FLAT_LEAVES = (str, int, bool, type(None))


def _patch_flat(event: TelemetryEvent, line: bytes) -> bytes | None:
    """The on-disk line of an envelope whose payload is flat (every field a number, string,
    enum, None or an empty container), patched in place: msgspec wrote each non-finite float
    field as ``"name":null``, which becomes ``"name":{"$float":"nan"}``. A field's pattern
    must occur exactly once in the line (the field itself is one occurrence), else None: the
    general path decides. The common per-epoch case, a HostSnapshot whose unknown fields
    are NaN, then costs a few microseconds instead of a walk of the whole envelope (tested
    byte for byte against it)."""
    if type(event) is not TelemetryEvent:
        return None
    ts = event.timestamp  # the envelope's one float field; a non-finite one: the general path
    if type(ts) is not float or ts - ts != 0:
        return None
    fields = getattr(event.payload, "__dict__", None)
    if type(fields) is not dict:
        return None
    tagged: list[tuple[str, float]] = []
    for name, v in fields.items():
        tp = type(v)
        if tp is float:
            if v - v != 0:
                tagged.append((name, v))
        elif tp is dict or tp is list or tp is tuple:
            if v:
                return None
        elif not (tp in _FLAT_LEAVES or isinstance(v, enum.Enum)):
            return None
    for name, v in tagged:
        key = _FIELD_KEYS.get(name) or _FIELD_KEYS.setdefault(name, _JSON.encode(name) + b":")
        if line.count(key + b"null") != 1:
            return None
        line = line.replace(key + b"null", key + _NONFINITE_JSON[_encode_float(v)[_FLOAT_TAG]])
    return line


_FIELD_KEYS: dict[str, bytes] = {}  # '"name":' per contract field name (a bounded set)


_payload_of = operator.attrgetter("payload")


def encode_lines(events: Sequence[TelemetryEvent]) -> bytes:
    """Newline-delimited JSON for a batch of envelopes (each line ends with ``\\n``).

    One C call for the whole batch in the common case; raises like :func:`encode_event`
    when an event cannot be encoded (callers wanting per-event errors retry one by one).
    """
    finite = list(map(getattr, events, repeat(FINITE_FLAG), repeat(False)))  # C-level loops
    if not _PY_ENCODED.isdisjoint(map(type, map(_payload_of, events))):
        return b"".join([(_encode_finite(e) if ok else encode_event(e)) + b"\n" for e, ok in zip(events, finite)])
    buf = _JSON.encode_lines(events)
    if all(finite) or b"null" not in buf:
        return buf  # validated at the door with every float finite, or no null to tag: the usual case
    # One C call for the batch, then only the lines of events not known to be finite that
    # hold a null are looked at again, exactly as encode_event would (a plain loop's batch is
    # mostly Scalars around one HostSnapshot with NaN fields: one line is patched). JSON
    # escapes a newline inside a string, so the batch splits into its events' lines.
    lines = buf.split(b"\n")
    for i, ok in enumerate(finite):
        if not ok and b"null" in lines[i]:
            lines[i] = _retag(events[i], lines[i])
    return b"\n".join(lines)


def _retag(event: TelemetryEvent, line: bytes) -> bytes:
    """``line`` (msgspec's, with a null) as encode_event writes it: NaN/inf tagged."""
    patched = _patch_flat(event, line)
    if patched is not None:
        return patched
    return _encode_tagged(event) if _may_be_nonfinite(event) else line


def _encode_finite(event: TelemetryEvent) -> bytes:
    """:func:`encode_event` of an envelope whose floats validation proved finite."""
    return _encode_slow(event) if type(event.payload) in _PY_ENCODED else _JSON.encode(event)


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
    if tp is Path:
        if isinstance(obj, str):
            return Path(obj)
        # msgspec turns a TypeError/ValueError from the hook into a ValidationError at the field
        raise TypeError(f"Expected `str`, got `{type(obj).__name__}`")
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
#
# The door of the pipeline. ``check_object(obj)`` checks a contract instance against its type
# hints and against what every consumer downstream can represent:
#
# * numbers: bool is not an int; an int in a float field must fit a float (10**400 does not),
#   an int field must fit 64 bits (OTel, Prometheus, DuckDB, jq all stop there);
# * strings: valid UTF-8 scalar values (no lone surrogates: they cannot be written as UTF-8);
# * ids (``*_id`` fields, slot names, FactoredAction.slot/blueprint): 1..ID_MAX_LEN printable
#   characters, no path separator, no ``..`` — run, episode and slot ids become file names.
#
# One checker per class, generated once from the type hints (the cattrs pattern: a dispatch
# table built once per type), with the common leaves (float, int, str, bool, dict[str, float])
# inlined; nested types get small closures. A checker returns None (valid, every float
# finite), MAYBE_NONFINITE (valid; some float may be NaN or inf) or a Problem naming the
# field. Describing a failure cannot fail: values are shown through _safe_repr (bounded, no
# repr of a 10**5000 int, no user __repr__ called).

ID_MAX_LEN = 128
"""Longest run, episode or slot id accepted (characters)."""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_FLOAT_MAX = sys.float_info.max

FINITE_FLAG = "_karn_finite"
"""Set (True) in an envelope's ``__dict__`` by the collector when validation proved every float
of the event finite; the batch encoder then skips its non-finite scan. Not a dataclass field:
equality, repr and encoding ignore it."""


class Problem(typing.NamedTuple):
    """Why a value was rejected: ``reason`` is a bounded counter key, ``where`` the path below
    the checked object (".alpha", ".values['loss']", "[3]"), ``detail`` what is wrong."""

    reason: str
    where: str
    detail: str

    def describe(self, root: str = "") -> str:
        where = self.where[1:] if not root and self.where.startswith(".") else self.where
        return f"{root}{where}: {self.detail}"


MAYBE_NONFINITE = Problem("ok", "", "valid; may hold a non-finite float")
"""The checker result for a valid value that may hold NaN or inf, or an int where a float is
expected (compared by identity); the collector then converts such ints (:func:`canonical_floats`)."""

_Result = Problem | None
_Check = Callable[[Any], _Result]
_NF = MAYBE_NONFINITE


def _at(r: Problem, where: str) -> Problem:
    return Problem(r.reason, where + r.where, r.detail)


def _clean(s: str, limit: int = 60) -> str:
    """``s`` bounded and with every non-printable character escaped (safe for a terminal)."""
    if len(s) > limit:
        s = s[:limit] + "..."
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in s)


def printable(s: str, limit: int = 200) -> str:
    """``s`` safe to print on a terminal: control, format (bidi) and surrogate characters
    escaped as ``\\x1b``/``\\u202e``/``\\ud800``, at most ``limit`` characters (then "...")."""
    if not isinstance(s, str):
        s = safe_repr(s)
    return _clean(str.__str__(s), limit)


def type_name(v: Any) -> str:
    """The name of ``v``'s type, bounded and printable (never raises)."""
    try:
        name = type(v).__name__
        return _clean(name) if type(name) is str else "?"
    except Exception:
        return "?"


def safe_repr(v: Any, limit: int = 60) -> str:
    """A short description of ``v`` for an error message; never raises, never calls user code."""
    try:
        t = type(v)
        if t is str:
            s = str.__repr__(v[:limit])
            return s if len(v) <= limit else f"{s}...(+{len(v) - limit} chars)"
        if t is int:
            return int.__repr__(v) if v.bit_length() <= 64 else f"<int of {v.bit_length()} bits>"
        if t is float:
            return float.__repr__(v)
        if v is None or v is True or v is False:
            return str(v)
        if t is tuple and len(v) <= 4:
            return "(" + ", ".join(safe_repr(x, 20) for x in v) + ")"
        return f"<{type_name(v)}>"
    except Exception:
        return "<?>"


def _expected(what: str, v: Any) -> Problem:
    return Problem("type_error", "", f"expected {what}, got {type_name(v)}")


def _c_any(v: Any) -> _Result:
    return None


def _c_none(v: Any) -> _Result:
    return None if v is None else _expected("None", v)


def _c_bool(v: Any) -> _Result:
    return None if v is True or v is False else _expected("bool", v)


def _c_float(v: Any) -> _Result:
    if type(v) is float:
        return None if v - v == 0.0 else _NF
    if isinstance(v, float):  # numpy.float64 and other float subclasses
        return None if math.isfinite(v) else _NF
    if isinstance(v, int) and not isinstance(v, bool):
        x = int.__index__(v)  # an exact int (no user __le__ for an int subclass)
        if -_FLOAT_MAX <= x <= _FLOAT_MAX:
            return _NF  # valid, but not yet a float: the collector converts it (canonical_floats)
        return Problem("out_of_range", "", f"{safe_repr(x)} does not fit a float")
    return _expected("float", v)


def _c_int(v: Any) -> _Result:
    if type(v) is int and INT64_MIN <= v <= INT64_MAX:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        x = int.__index__(v)
        if INT64_MIN <= x <= INT64_MAX:
            return None
        return Problem("out_of_range", "", f"{safe_repr(x)} is outside the 64-bit integer range")
    return _expected("int", v)


def _bad_utf8(v: str) -> Problem | None:
    if str.isascii(v):
        return None
    try:
        str.encode(v, "utf-8")
    except UnicodeEncodeError as exc:
        return Problem("invalid_string", "", f"not valid UTF-8: lone surrogate at index {exc.start}")
    return None


def _c_str(v: Any) -> _Result:
    if type(v) is str and v.isascii():
        return None
    if not isinstance(v, str):
        return _expected("str", v)
    return _bad_utf8(v)


def id_problem(v: Any) -> Problem | None:
    """Why ``v`` is not a valid id (run, episode, slot, seed or blueprint), or None."""
    if not isinstance(v, str):
        return _expected("str", v)
    bad = _bad_utf8(v)
    if bad is not None:
        return Problem("invalid_id", "", bad.detail)
    if not v:
        return Problem("invalid_id", "", "empty id")
    if len(v) > ID_MAX_LEN:
        return Problem("invalid_id", "", f"id of {len(v)} characters (at most {ID_MAX_LEN})")
    if not str.isprintable(v):
        i = next(i for i, c in enumerate(v) if not c.isprintable())
        return Problem("invalid_id", "", f"{safe_repr(v)}: control or non-printable character at index {i}")
    if "/" in v or "\\" in v:
        return Problem("invalid_id", "", f"{safe_repr(v)}: path separator in an id")
    if ".." in v or v == ".":
        return Problem("invalid_id", "", f"{safe_repr(v)}: '.' or '..' in an id")
    return None


def _c_path(v: Any) -> _Result:
    if not isinstance(v, Path):
        return _expected("Path", v)
    s = Path.__str__(v)
    return _bad_utf8(s) if type(s) is str else _expected("Path", v)


def _c_datetime(v: Any) -> _Result:
    if not isinstance(v, datetime):
        return _expected("datetime", v)
    tz = v.tzinfo
    if tz is not None and type(tz) is not timezone and type(tz) is not ZoneInfo:
        return Problem("type_error", "", f"datetime with an unsupported tzinfo {type_name(tz)}")
    return None


_is_float = float.__instancecheck__  # bound: isinstance(x, float), called from C by map()


def _c_str_float_dict(v: Any) -> _Result:
    """dict[str, float], the per-step shape: three C-level passes in the common case."""
    if type(v) is dict:
        try:
            ascii_keys = "".join(v).isascii()  # TypeError unless every key is a str
        except TypeError:
            ascii_keys = False
        if ascii_keys and all(map(_is_float, v.values())):
            s = sum(v.values(), 0.0)  # finite sum => every value finite
            return None if s - s == 0.0 else _dict_items(v, _c_str, _c_float)
    return _dict_items(v, _c_str, _c_float)


def _dict_items(v: Any, kc: _Check, vc: _Check) -> _Result:
    if not isinstance(v, dict):
        return _expected("dict", v)
    nf = False
    for k, x in dict.items(v):
        r = kc(k)
        if r is not None and r is not _NF:
            return _at(r, f"[{safe_repr(k)}] (key)")
        r = vc(x)
        if r is not None:
            if r is _NF:
                nf = True
            else:
                return _at(r, f"[{safe_repr(k)}]")
    return _NF if nf else None


def _union(tp: Any, members: list[_Check]) -> _Check:
    what = " | ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp))

    def check(v: Any) -> _Result:
        best: Problem | None = None
        for m in members:
            r = m(v)
            if r is None or r is _NF:
                return r
            if best is None or (best.reason == "type_error" and r.reason != "type_error"):
                best = r  # the most specific complaint (out_of_range beats "not a str")
        if best is not None and best.reason != "type_error":
            return best
        return _expected(what, v)

    return check


def _checker_for(tp: Any, ident: bool = False) -> _Check:
    """A checker for values of type ``tp`` (``ident``: strings in it are ids)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return _c_any
    if tp is float:
        return _c_float
    if tp is int:
        return _c_int
    if tp is bool:
        return _c_bool
    if tp is str:
        return id_problem if ident else _c_str
    if tp is type(None):
        return _c_none
    if tp is Path:
        return _c_path
    if tp is datetime:
        return _c_datetime
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        name = tp.__name__
        return lambda v: None if type(v) is tp else _expected(name, v)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        cls = tp
        return lambda v: check_object(v) if type(v) is cls else _expected(cls.__name__, v)
    if origin is Literal:
        choices = frozenset(args)
        return lambda v: (
            None if type(v) is str and v in choices else Problem("type_error", "", f"expected one of {sorted(choices)}")
        )
    if origin is Union or origin is types.UnionType:
        members = [_checker_for(a, ident) for a in args]
        if len(args) == 2 and type(None) in args:  # Optional[X]
            inner = members[0] if args[1] is type(None) else members[1]
            return lambda v: None if v is None else inner(v)
        return _union(tp, members)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        items = [_checker_for(a, ident) for a in args]
        return _fixed_tuple(items)
    if origin in (list, tuple):
        item = _checker_for(args[0], ident) if args else _c_any
        return _sequence(origin, item)
    if origin is dict:
        if args == (str, float) and not ident:
            return _c_str_float_dict
        kc, vc = (_checker_for(args[0], ident), _checker_for(args[1])) if args else (_c_any, _c_any)
        return lambda v: _dict_items(v, kc, vc)
    raise TypeError(f"no checker for {tp!r}")


def _fixed_tuple(items: list[_Check]) -> _Check:
    def check(v: Any) -> _Result:
        if not isinstance(v, tuple) or tuple.__len__(v) != len(items):
            return Problem("type_error", "", f"expected a tuple of {len(items)}, got {type_name(v)}")
        nf = False
        for i, (c, x) in enumerate(zip(items, v)):
            r = c(x)
            if r is not None:
                if r is not _NF:
                    return _at(r, f"[{i}]")
                nf = True
        return _NF if nf else None

    return check


def _sequence(container: Any, item: _Check) -> _Check:
    floats = item is _c_float

    def check(v: Any) -> _Result:
        if not isinstance(v, container):
            return _expected(container.__name__, v)
        seq: Any = v
        if floats and type(seq) is container and all(map(_is_float, seq)):
            s = sum(seq, 0.0)
            if s - s == 0.0:
                return None
        nf = False
        for i, x in enumerate(seq):
            r = item(x)
            if r is not None:
                if r is not _NF:
                    return _at(r, f"[{i}]")
                nf = True
        return _NF if nf else None

    return check


# Fields whose strings are ids (they become file names or metric labels), by field name.
# Every ``*_id`` field (run, episode, slot, seed, blueprint, experiment) plus the two that hold
# slot ids; FactoredAction names a slot and a blueprint.
_ID_FIELDS = frozenset({"slot_ids", "slot_config"})
_ID_FIELDS_OF: dict[str, frozenset[str]] = {"FactoredAction": frozenset({"slot", "blueprint"})}

# Inlined leaves of the generated checkers: (type, source) with {v} the value, {w} the path.
_INLINE: dict[Any, str] = {
    float: (
        "if type({v}) is float:\n"
        "    if {v} - {v} != 0.0: nf = True\n"
        "else:\n"
        "    r = _c_float({v})\n"
        "    if r is not None:\n"
        "        if r is not _NF: return _at(r, {w})\n"
        "        nf = True\n"
    ),
    int: (
        "if type({v}) is not int or not (INT64_MIN <= {v} <= INT64_MAX):\n"
        "    r = _c_int({v})\n"
        "    if r is not None: return _at(r, {w})\n"
    ),
    str: (
        "if type({v}) is not str or not {v}.isascii():\n    r = _c_str({v})\n    if r is not None: return _at(r, {w})\n"
    ),
    bool: "if {v} is not True and {v} is not False: return _at(_expected('bool', {v}), {w})\n",
    # dict[str, float], the per-step shape (see _c_str_float_dict), without a call.
    dict[str, float]: (
        "ok = False\n"
        "if type({v}) is dict:\n"
        "    try:\n"
        "        ok = ''.join({v}).isascii() and all(map(_is_float, {v}.values()))\n"
        "    except TypeError:\n"
        "        pass\n"
        "if ok:\n"
        "    s = sum({v}.values(), 0.0)\n"
        "    ok = s - s == 0.0\n"
        "if not ok:\n"
        "    r = _c_str_float_dict({v})\n"
        "    if r is not None:\n"
        "        if r is not _NF: return _at(r, {w})\n"
        "        nf = True\n"
    ),
}


def _generate(cls: type) -> _Check:
    """Compile the checker of one contract class (see the section comment)."""
    hints = type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    ids = _ID_FIELDS | _ID_FIELDS_OF.get(cls.__name__, frozenset())
    ns: dict[str, Any] = {
        "_c_float": _c_float,
        "_c_int": _c_int,
        "_c_str": _c_str,
        "_c_str_float_dict": _c_str_float_dict,
        "_is_float": _is_float,
        "_at": _at,
        "_expected": _expected,
        "_NF": _NF,
        "INT64_MIN": INT64_MIN,
        "INT64_MAX": INT64_MAX,
        "Problem": Problem,
        "_missing": _missing,
        "_FIELDS": tuple(names),
    }
    body: list[str] = []
    for i, name in enumerate(names):
        tp, ident = hints[name], name in ids or name.endswith("_id")
        v, w = f"v{i}", repr("." + name)
        body.append(f"{v} = obj.{name}\n")
        optional = typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if optional else [tp]
        leaf = inner[0] if len(inner) == 1 else None
        if leaf in _INLINE and not (ident and leaf in (str, dict[str, float])):
            src = _INLINE[leaf].format(v=v, w=w)
            if optional:
                src = f"if {v} is not None:\n" + "".join("    " + line + "\n" for line in src.splitlines())
            body.append(src)
        else:
            ns[f"_c{i}"] = _checker_for(tp, ident)
            body.append(f"r = _c{i}({v})\nif r is not None:\n    if r is not _NF: return _at(r, {w})\n    nf = True\n")
    src = (
        "def check(obj):\n    nf = False\n    try:\n"
        + "".join("        " + line + "\n" for line in "".join(body).splitlines())
        + "    except AttributeError:\n        missing = _missing(obj, _FIELDS)\n"
        + "        if missing is None: raise\n        return missing\n"
        + "    return _NF if nf else None\n"
    )
    exec(compile(src, f"<karn checker {cls.__name__}>", "exec"), ns)  # noqa: S102 (source built above)
    check: _Check = ns["check"]
    return check


def _missing(obj: Any, fields: tuple[str, ...]) -> Problem | None:
    d = getattr(obj, "__dict__", None)
    if not isinstance(d, dict):
        return Problem("type_error", "", "instance without fields")
    for name in fields:
        if name not in d:
            return Problem("type_error", "." + name, "field is missing")
    return None


_CHECKERS: dict[type, _Check] = {}


def checker(cls: type) -> _Check:
    """The (cached) checker of contract class ``cls``; the caller checks ``type(obj) is cls``."""
    check = _CHECKERS.get(cls)
    if check is None:
        check = _CHECKERS[cls] = _generate(cls)
    return check


def check_object(obj: Any) -> _Result:
    """Check a contract instance: None (valid, floats finite), MAYBE_NONFINITE (valid) or a Problem."""
    check = _CHECKERS.get(type(obj))
    if check is None:
        cls = type(obj)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return _expected("a Karn contract", obj)
        check = checker(cls)
    return check(obj)


# --------------------------------------------------------------------------- canonical floats
# An int is a valid float (validation accepts it, like W&B and TensorBoard), but the run log
# reads every float field back as a float: the collector converts such ints when it accepts a
# payload, so what sinks and the store see is exactly what a replay of the log gives back.
# Validation reports them like a possibly non-finite float (MAYBE_NONFINITE), so the
# conversion runs only for payloads that were not proven to hold finite floats only.

_Conv = Callable[[Any], Any]


def _int_to_float(v: Any) -> Any:
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


def _float_converter(tp: Any) -> _Conv | None:
    """``v -> v`` with the ints in ``tp``'s float places as floats (``v`` itself when nothing
    changes), or None when ``tp`` holds no float."""
    if tp is float:
        return _int_to_float
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        plan = _FLOAT_PLANS.get(tp)
        if plan is None:
            plan = _FLOAT_PLANS[tp] = _float_plan(tp)
        return canonical_floats if plan else None
    args = typing.get_args(tp)
    if _is_union(tp):
        members = [a for a in args if a is not type(None)]
        if int in members:
            return None  # an int is a member: it stays an int
        convs = [c for c in map(_float_converter, members) if c is not None]
        if len(convs) != 1:
            return None
        conv = convs[0]
        return lambda v: v if v is None else conv(v)
    origin = typing.get_origin(tp)
    if origin is dict and len(args) == 2:
        vc = _float_converter(args[1])
        if vc is None:
            return None

        def dict_conv(v: Any) -> Any:
            if type(v) is not dict:
                return v
            new = {k: vc(x) for k, x in v.items()}
            return new if any(new[k] is not x for k, x in v.items()) else v

        return dict_conv
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # the contracts' only sequences
        ec = _float_converter(args[0])
        if ec is None:
            return None

        def seq_conv(v: Any) -> Any:
            if type(v) is not tuple:
                return v
            new = tuple(ec(x) for x in v)
            return new if any(a is not b for a, b in zip(new, v)) else v

        return seq_conv
    return None  # other shapes hold no float in any contract (a new one that does needs a branch here)


def _float_plan(cls: type) -> tuple[tuple[str, _Conv], ...]:
    _FLOAT_PLANS[cls] = ()  # recursion guard (a contract holding its own type)
    hints = type_hints(cls)
    plan = []
    for f in dataclasses.fields(cls):
        conv = _float_converter(hints[f.name])
        if conv is not None:
            plan.append((f.name, conv))
    return tuple(plan)


_FLOAT_PLANS: dict[type, tuple[tuple[str, _Conv], ...]] = {}


def canonical_floats(obj: Any) -> Any:
    """A validated contract with every int in a float-typed place as a float (nested contracts,
    dict values, sequences included): the form its run-log line decodes to. ``obj`` itself
    when there is nothing to convert."""
    cls = type(obj)
    plan = _FLOAT_PLANS.get(cls)
    if plan is None:
        plan = _FLOAT_PLANS[cls] = _float_plan(cls)
    changes = {}
    for name, conv in plan:
        v = getattr(obj, name)
        if type(v) is float or v is None or (type(v) is dict and not v):
            continue  # nothing to convert (the usual case: a NaN float made the check ask)
        nv = conv(v)
        if nv is not v:
            changes[name] = nv
    return dataclasses.replace(obj, **changes) if changes else obj


# The leaf checkers, for envelope fields and call arguments (same results as inside contracts).
check_float = _c_float
check_int = _c_int
check_str = _c_str


def check_types(obj: Any) -> str | None:
    """Check a contract instance against its type hints (recursively): None when it conforms,
    else "field: what is wrong" (e.g. ``"values['loss']: expected float, got str"``)."""
    r = check_object(obj)
    return None if r is None or r is _NF else r.describe()
