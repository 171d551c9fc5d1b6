"""The one codec: validation of emitted contracts, and (to come) encode/decode of the run log.

``check_types(obj)`` checks a contract instance against its type hints, with one checker per
class built once and cached (the cattrs pattern: a dispatch table per type).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Literal, Union

from karn_otel.contracts import type_hints

# Per-class type checkers, built once from the type hints. Each returns None when the value
# conforms, or a short "field: expected X, got Y" description.
_Checker = Callable[[Any], Union[str, None]]
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


def _check_str_float_dict(v: Any) -> str | None:
    if type(v) is not dict:
        return f": expected dict, got {_describe(v)}"
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
        return lambda v: None if isinstance(v, int) and not isinstance(v, bool) else f": expected int, got {_describe(v)}"
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


