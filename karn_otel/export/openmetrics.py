"""OpenMetrics: every epoch-level metric of a run, each sample at its own epoch's time.

The live path exposes last-value gauges that a scrape samples; a 15 s scrape of a run whose
epochs take 2 s keeps a handful of its epochs. This exporter writes, from the run log, one
sample per record — every epoch, at the time the collector accepted it — with the metric
names and labels of the live path (:mod:`karn_otel.metrics_registry`), so::

    karn export RUN --to openmetrics --out run.om
    promtool tsdb create-blocks-from openmetrics run.om DATA_DIR

backfills a Prometheus with the whole run.

What comes from where (the registry's sources):

* ``host``, ``slot``, ``slot_stage``, ``counterfactual``, ``shapley``, ``policy``, ``ppo``,
  ``baseline``, ``context``, ``summary``: one sample per record of that kind (``ppo`` before
  the first update reads the policy snapshot's copies, as the live path does);
* ``alerts`` and ``decisions``: counters, cumulative per label set, with a 0 sample at the
  episode's start so ``increase()`` sees the first one;
* ``analytics``, ``health``, ``collector``, ``dropped``, ``otel``, ``queues``: the live process's
  own state, not in the run log — not exported (the run log's TelemetryStats are in Parquet).

Values the live path drops are dropped here too: ``None`` (not measured) and non-finite floats.
Labels: ``run_id``, ``rank``, ``world_size`` on every series; job-wide (reduced) records carry
``scope="job"`` and no ``rank`` label (they describe no rank), as on the live path.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from karn_otel.contracts import (
    CounterfactualMatrix,
    SeedStage,
    SlotSnapshot,
    TelemetryEvent,
    TelemetryEventType,
)
from karn_otel.export import ExportOptions, ExportReport
from karn_otel.metrics_registry import METRICS, MetricDef
from karn_otel.sinks.otel.metrics import _values as live_values
from karn_otel.sinks.otel.metrics import _walk as live_walk
from karn_otel.sinks.runlog import RunRecord

ET = TelemetryEventType

# The registry sources a run log can answer, and the record type each reads.
_RECORD_SOURCES: dict[str, TelemetryEventType] = {
    "host": ET.HOST_SNAPSHOT,
    "slot": ET.SLOT_SNAPSHOT,
    "slot_stage": ET.SLOT_SNAPSHOT,
    "counterfactual": ET.COUNTERFACTUAL,
    "shapley": ET.COUNTERFACTUAL,
    "policy": ET.POLICY_SNAPSHOT,
    "ppo": ET.PPO_UPDATE,
    "baseline": ET.HOST_BASELINE,
    "context": ET.EPISODE_STARTED,
    "summary": ET.EPISODE_ENDED,
}
EXPORTED_SOURCES: frozenset[str] = frozenset(_RECORD_SOURCES) | {"alerts", "decisions"}

Labels = tuple[tuple[str, str], ...]


def _values(m: MetricDef, obj: Any) -> Iterator[tuple[float, str | None]]:
    """(value, key) pairs of ``m`` in ``obj``: the live instruments' own extraction, so a value
    the live path drops (None, non-finite) is dropped here too."""
    for n, key in live_values(live_walk(obj, m.field.split(".") if m.field else []), m.key_label is not None):
        yield float(n), key


def _objects(source: str, ev: TelemetryEvent) -> Iterator[tuple[Any, dict[str, str]]]:
    """The (object, source labels) pairs one record gives a source (as the live readers do)."""
    p = ev.payload
    if source == "slot":
        assert isinstance(p, SlotSnapshot)
        yield p, {"slot": p.slot_id, "blueprint": p.blueprint_id or "none"}
    elif source == "slot_stage":
        assert isinstance(p, SlotSnapshot)
        for stage in SeedStage:
            yield int(p.stage is stage), {"slot": p.slot_id, "stage": stage.value}
    elif source == "shapley":
        assert isinstance(p, CounterfactualMatrix)
        for sid, est in (p.shapley_values or {}).items():
            yield est, {"slot": sid}
    else:
        yield p, {}


def _scope_labels(ev: TelemetryEvent) -> dict[str, str]:
    if ev.is_reduced:  # job-wide: its own series, never a rank's (as the live path)
        return {"run_id": ev.run_id, "world_size": str(ev.world_size), "scope": "job"}
    return {"run_id": ev.run_id, "rank": str(ev.rank), "world_size": str(ev.world_size)}


class _Families:
    """Samples grouped by family then series, as OpenMetrics requires."""

    def __init__(self) -> None:
        self.samples: dict[MetricDef, dict[Labels, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))

    def add(self, m: MetricDef, labels: dict[str, str], ts: float, value: float) -> None:
        self.samples[m][tuple(sorted(labels.items()))].append((ts, value))


def collect(events: Sequence[TelemetryEvent]) -> _Families:
    """Every sample the run log gives, grouped by metric and label set."""
    fam = _Families()
    by_source: dict[TelemetryEventType, list[MetricDef]] = defaultdict(list)
    for m in METRICS:
        et = _RECORD_SOURCES.get(m.source)
        if et is not None:
            by_source[et].append(m)
    ppo_metrics = [m for m in METRICS if m.source == "ppo"]
    seen_update: set[tuple[str, int]] = set()
    alerts: dict[Labels, float] = {}
    decisions: dict[Labels, float] = {}
    alerts_m = next(m for m in METRICS if m.source == "alerts")
    decisions_m = next(m for m in METRICS if m.source == "decisions")
    starts: dict[tuple[str, str, int], float] = {}
    for ev in sorted(events, key=lambda e: e.timestamp):
        base = _scope_labels(ev)
        key = (ev.run_id, ev.episode_id, ev.rank)
        starts.setdefault(key, ev.timestamp)
        et = ev.event_type
        if et is ET.PPO_UPDATE:
            seen_update.add((ev.run_id, ev.rank))
        metrics = list(by_source.get(et, ()))
        if et is ET.POLICY_SNAPSHOT and (ev.run_id, ev.rank) not in seen_update:
            metrics += ppo_metrics  # before the first update the live path reads the snapshot's copies
        for m in metrics:
            for obj, src_labels in _objects(m.source, ev):
                for value, k in _values(m, obj):
                    labels = {**base, **src_labels}
                    if k is not None and m.key_label:
                        labels[m.key_label] = k
                    fam.add(m, labels, ev.timestamp, value)
        if et is ET.HEALTH_ALERT or et is ET.CONTROLLER_DECISION:
            p: Any = ev.payload
            if et is ET.HEALTH_ALERT:
                m, store, extra = alerts_m, alerts, {"check": p.check, "severity": p.severity.value}
            else:
                m, store, extra = decisions_m, decisions, {"op": p.action.op.value}
            labels = {**base, **extra}
            lk = tuple(sorted(labels.items()))
            if lk not in store:
                store[lk] = 0.0
                fam.add(m, labels, starts[key], 0.0)  # the series exists from the start at 0
            store[lk] += 1
            fam.add(m, labels, ev.timestamp, store[lk])
    return fam


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _fmt(x: float) -> str:
    return repr(int(x)) if x.is_integer() and abs(x) < 2**53 else repr(x)


def write(fam: _Families, f: TextIO) -> int:
    """Write an OpenMetrics text stream; returns the number of samples."""
    n = 0
    for m in METRICS:  # registry order: stable output
        series = fam.samples.get(m)
        if not series:
            continue
        family = m.prometheus_name.removesuffix("_total") if m.kind == "counter" else m.prometheus_name
        f.write(f"# TYPE {family} {'counter' if m.kind == 'counter' else 'gauge'}\n")
        f.write(f"# HELP {family} {_escape_help(m.description)}\n")
        sample = f"{family}_total" if m.kind == "counter" else family
        for labels, points in series.items():
            lab = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            at: dict[float, float] = {}
            for ts, value in points:  # one sample per series per timestamp: the later record wins
                at[round(ts, 3)] = value
            for ts, value in sorted(at.items()):
                f.write(f"{sample}{{{lab}}} {_fmt(value)} {ts:.3f}\n")
                n += 1
    f.write("# EOF\n")
    return n


def export(runs: Sequence[RunRecord], out: Path, options: ExportOptions) -> ExportReport:
    report = ExportReport()
    events = [ev for run in runs for ev in run.events]
    fam = collect(events)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        n = write(fam, f)
    report.written[out] = n
    report.notes.append(
        f"backfill: promtool tsdb create-blocks-from openmetrics {out} DATA_DIR  ({len(fam.samples)} metrics, {n:,} samples)"
    )
    options.progress(f"{n:,} samples of {len(fam.samples)} metrics")
    return report
