"""Run-log events as typed tables: one table per tier, columns derived from the contracts.

The run log's records are nested dataclasses; a table wants flat, typed columns. This module
derives both — the Arrow schema and the rows — from the contracts' type hints, so a new field
in :mod:`karn_otel.contracts` becomes a new column without touching an exporter:

* scalars (bool, int, float, str, enums, paths) are columns of their type; datetimes are UTC
  timestamps; ``X | None`` is a nullable column;
* a nested contract (``advantage_stats: AdvantageStats``) becomes its fields, prefixed
  (``advantage_stats_mean``);
* ``dict[str, float]`` and friends are Arrow maps (DuckDB reads them as ``MAP``); a dict of
  mixed types (hyperparameters) is a JSON string; ``dict[(a, b), float]`` is a list of
  ``{a, b, value}`` structs; ``tuple[float, ...]`` is a list;
* a collection of contracts (a matrix's configurations, its Shapley estimates, a dense trace's
  batches) is a child table of its own, one row per element, keyed by the parent's envelope.

Every row starts with the envelope: ``run_id, episode_id, epoch, timestamp, rank,
world_size, is_reduced``. NaN and ±inf stay NaN and ±inf (Parquet doubles hold them).

Imports pyarrow lazily (it is only needed by the exporters that write Arrow).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union

from karn_otel.codec import to_jsonable, type_hints
from karn_otel.contracts import (
    PAYLOAD_TYPES,
    BatchMetrics,
    CounterfactualResult,
    ShapleyEstimate,
    TelemetryEvent,
    TelemetryEventType,
)
from karn_otel.metrics_registry import METRICS

ET = TelemetryEventType

# Table names: the tiers a user asks for by name (docs/export.md lists their columns).
TABLE_OF: dict[TelemetryEventType, str] = {
    ET.EPISODE_STARTED: "episode_context",
    ET.HOST_BASELINE: "host_baseline",
    ET.SLOT_SNAPSHOT: "slot_snapshots",
    ET.HOST_SNAPSHOT: "host_snapshots",
    ET.POLICY_SNAPSHOT: "policy_snapshots",
    ET.PPO_UPDATE: "ppo_updates",
    ET.CONTROLLER_DECISION: "controller_decisions",
    ET.STAGE_TRANSITION: "stage_transitions",
    ET.GATE_EVALUATION: "gate_evaluations",
    ET.BATCH_METRICS: "batch_metrics",
    ET.DENSE_TRACE: "dense_traces",
    ET.COUNTERFACTUAL: "counterfactual_matrices",
    ET.HEALTH_ALERT: "alerts",
    ET.MODE_CHANGE: "mode_changes",
    ET.TELEMETRY_STATS: "telemetry_stats",
    ET.SCALARS: "scalars",
    ET.RANK_SUMMARY: "rank_summaries",
    ET.EPISODE_ENDED: "episode_summary",
}

# Child tables: (parent event type, parent field) -> (table name, element contract).
CHILD_TABLES: dict[tuple[TelemetryEventType, str], tuple[str, type]] = {
    (ET.COUNTERFACTUAL, "configs"): ("counterfactual_results", CounterfactualResult),
    (ET.COUNTERFACTUAL, "shapley_values"): ("shapley_estimates", ShapleyEstimate),
    (ET.DENSE_TRACE, "batch_metrics"): ("dense_trace_batches", BatchMetrics),
}

ENVELOPE_COLUMNS: tuple[str, ...] = ("run_id", "episode_id", "epoch", "timestamp", "rank", "world_size", "is_reduced")

# Registry sources of each event type, so a column gets the unit and description of the
# metric exported from the same field (one source of truth for units: metrics_registry).
_SOURCE_OF: dict[str, str] = {
    "host_snapshots": "host",
    "slot_snapshots": "slot",
    "policy_snapshots": "policy",
    "ppo_updates": "ppo",
    "host_baseline": "baseline",
    "episode_context": "context",
    "episode_summary": "summary",
    "shapley_estimates": "shapley",
}


def _column_docs() -> dict[tuple[str, str], tuple[str, str]]:
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for m in METRICS:
        if m.field and "." not in m.field:
            out.setdefault((m.source, m.field), (m.unit, m.description))
        elif m.field:
            out.setdefault((m.source, m.field.replace(".", "_")), (m.unit, m.description))
    return out


_DOCS = _column_docs()

_ENVELOPE_DOCS: dict[str, tuple[str, str]] = {
    "run_id": ("", "The run's id."),
    "episode_id": ("", "The episode's id."),
    "epoch": ("{epoch}", "Epoch the record belongs to (1-based; 0 before the first epoch)."),
    "timestamp": ("s", "When the collector accepted the record (UTC)."),
    "rank": ("", "Rank that wrote the record."),
    "world_size": ("", "Ranks in the job."),
    "is_reduced": ("", "True for job-wide (reduced across ranks) values."),
}


# ---------------------------------------------------------------------- column model


@dataclass(frozen=True)
class Column:
    """One flat column: its name, where its value sits in the payload, and its Arrow type."""

    name: str
    path: tuple[str, ...]
    kind: str  # scalar kinds: bool int float str time; or map list pairs json
    key: str = ""  # map key kind
    value: str = ""  # map/list value kind (may be "list:float" for a map of lists)
    unit: str = ""
    description: str = ""


@dataclass
class TableSpec:
    name: str
    columns: list[Column] = field(default_factory=list)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        return tp, True
    return tp, False


def _scalar_kind(tp: Any) -> str | None:
    if tp is bool:
        return "bool"
    if tp is int:
        return "int"
    if tp is float:
        return "float"
    if tp is str or tp is Path:
        return "str"
    if tp is datetime:
        return "time"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "str"
    if typing.get_origin(tp) is typing.Literal:
        return "str"
    return None


def _columns(cls: type, prefix: tuple[str, ...], table: str, skip: set[str]) -> Iterator[Column]:
    source = _SOURCE_OF.get(table, "")
    for fname, hint in type_hints(cls).items():
        if not prefix and fname in skip:
            continue
        path = prefix + (fname,)
        name = "_".join(path)
        unit, desc = _DOCS.get((source, name), ("", ""))
        tp, _ = _strip_optional(hint)
        kind = _scalar_kind(tp)
        if kind is not None:
            yield Column(name, path, kind, unit=unit, description=desc)
            continue
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            yield from _columns(tp, path, table, skip)
            continue
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is tuple:
            inner = _scalar_kind(args[0]) if args else None
            yield Column(name, path, "list", value=inner or "json", unit=unit, description=desc)
        elif origin is dict:
            k, v = args
            v_base, _ = _strip_optional(v)
            if typing.get_origin(k) is tuple:
                yield Column(name, path, "pairs", value=_scalar_kind(v_base) or "float", unit=unit, description=desc)
                continue
            key_kind, val_kind = _scalar_kind(k), _scalar_kind(v_base)
            if typing.get_origin(v_base) is tuple:
                inner = typing.get_args(v_base)[0]
                val_kind = f"list:{_scalar_kind(inner)}"
            if key_kind is None or val_kind is None:
                yield Column(name, path, "json", unit=unit, description=desc)
            else:
                yield Column(name, path, "map", key=key_kind, value=val_kind, unit=unit, description=desc)
        else:  # a union of several types: keep its JSON form
            yield Column(name, path, "json", unit=unit, description=desc)


def table_specs() -> dict[str, TableSpec]:
    """Every table Karn exports, in a stable order, with its columns."""
    specs: dict[str, TableSpec] = {}
    env = [
        Column(n, (), _ENV_KIND[n], unit=_ENVELOPE_DOCS[n][0], description=_ENVELOPE_DOCS[n][1])
        for n in ENVELOPE_COLUMNS
    ]
    for et, cls in PAYLOAD_TYPES.items():
        name = TABLE_OF[et]
        skip = {f for (e, f) in CHILD_TABLES if e is et}
        specs[name] = TableSpec(name, _merge(env, list(_columns(cls, (), name, skip))))
        for (e, f), (child, child_cls) in CHILD_TABLES.items():
            if e is et:
                extra = [Column("config_index", (), "int", description="Position of the configuration in the matrix.")]
                if f == "shapley_values":
                    extra = [Column("slot_id", (), "str", description="The slot the estimate is for.")]
                elif f == "batch_metrics":
                    extra = [
                        Column("trigger_reason", (), "str", description="Why the dense window opened."),
                        Column("window_start_epoch", (), "int", description="First epoch of the dense window."),
                    ]
                specs[child] = TableSpec(child, _merge(env + extra, list(_columns(child_cls, (), child, set()))))
    return specs


def _merge(head: list[Column], payload: list[Column]) -> list[Column]:
    """Envelope columns, then the payload's; a payload field of the same name (a batch's own
    ``epoch``) replaces the envelope's column, being the more specific of the two."""
    names = {c.name for c in payload}
    return [c for c in head if c.name not in names] + payload


_ENV_KIND = {
    "run_id": "str",
    "episode_id": "str",
    "epoch": "int",
    "timestamp": "time",
    "rank": "int",
    "world_size": "int",
    "is_reduced": "bool",
}


# ---------------------------------------------------------------------- rows


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if obj is None:
            return None
        obj = getattr(obj, part)
    return obj


def _cell(col: Column, v: Any) -> Any:
    if v is None:
        return None
    if col.kind == "time":
        if isinstance(v, datetime):
            return v if v.tzinfo else v.replace(tzinfo=timezone.utc)
        return datetime.fromtimestamp(float(v), tz=timezone.utc)
    if col.kind in ("str",):
        return v.value if isinstance(v, enum.Enum) else str(v)
    if col.kind == "map":
        return [
            (k.value if isinstance(k, enum.Enum) else k, list(x) if isinstance(x, tuple) else x) for k, x in v.items()
        ]
    if col.kind == "pairs":
        return [{"a": str(k[0]), "b": str(k[1]), "value": x} for k, x in v.items()]
    if col.kind == "list":
        if col.value == "json":
            return [json.dumps(to_jsonable(x)) for x in v]
        return [x.value if isinstance(x, enum.Enum) else x for x in v]
    if col.kind == "json":
        return json.dumps(to_jsonable(v), sort_keys=True, allow_nan=True)
    return v


def _envelope(ev: TelemetryEvent) -> dict[str, Any]:
    return {
        "run_id": ev.run_id,
        "episode_id": ev.episode_id,
        "epoch": ev.epoch,
        "timestamp": datetime.fromtimestamp(ev.timestamp, tz=timezone.utc),
        "rank": ev.rank,
        "world_size": ev.world_size,
        "is_reduced": ev.is_reduced,
    }


def rows(
    events: Iterable[TelemetryEvent], specs: dict[str, TableSpec] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """The rows of every table, keyed by table name (tables with no rows are present, empty)."""
    specs = specs or table_specs()
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in specs}
    for ev in events:
        name = TABLE_OF[ev.event_type]
        env = _envelope(ev)
        out[name].append(_row(specs[name], ev.payload, env))
        for (e, f), (child, _) in CHILD_TABLES.items():
            if e is not ev.event_type:
                continue
            items = getattr(ev.payload, f)
            if items is None:
                continue
            spec = specs[child]
            if f == "shapley_values":
                for sid, est in items.items():
                    out[child].append(_row(spec, est, {**env, "slot_id": sid}))
            elif f == "configs":
                for i, res in enumerate(items):
                    out[child].append(_row(spec, res, {**env, "config_index": i}))
            else:
                for b in items:
                    extra = {
                        "trigger_reason": ev.payload.trigger_reason,
                        "window_start_epoch": ev.payload.window_start_epoch,
                    }
                    out[child].append(_row(spec, b, {**env, **extra}))
    return out


def _row(spec: TableSpec, payload: Any, fixed: dict[str, Any]) -> dict[str, Any]:
    row = dict(fixed)
    for col in spec.columns:
        if col.path:  # a payload field (it may replace an envelope value of the same name)
            row[col.name] = _cell(col, _get(payload, col.path))
    return row


# ---------------------------------------------------------------------- arrow


def arrow_type(col: Column) -> Any:
    import pyarrow as pa

    scalar = {
        "bool": pa.bool_(),
        "int": pa.int64(),
        "float": pa.float64(),
        "str": pa.string(),
        "time": pa.timestamp("us", tz="UTC"),
        "json": pa.string(),
    }
    if col.kind in scalar:
        return scalar[col.kind]
    if col.kind == "list":
        return pa.list_(scalar[col.value])
    if col.kind == "pairs":
        return pa.list_(pa.struct([("a", pa.string()), ("b", pa.string()), ("value", scalar[col.value])]))
    # map
    value = pa.list_(scalar[col.value.split(":")[1]]) if col.value.startswith("list:") else scalar[col.value]
    return pa.map_(scalar[col.key], value)


def arrow_schema(spec: TableSpec) -> Any:
    import pyarrow as pa

    fields = []
    for col in spec.columns:
        meta = {}
        if col.unit:
            meta["unit"] = col.unit
        if col.description:
            meta["description"] = col.description
        fields.append(pa.field(col.name, arrow_type(col), nullable=True, metadata=meta or None))
    return pa.schema(fields, metadata={"karn.table": spec.name})


def arrow_table(spec: TableSpec, table_rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    schema = arrow_schema(spec)
    columns = {c.name: [r.get(c.name) for r in table_rows] for c in spec.columns}
    return pa.Table.from_pydict(columns, schema=schema)
