"""OTLP: replay a run's traces and metric points into an OTLP endpoint (the Collector, after
an outage), from its run log.

* **Traces** go through the live path's own code (:func:`karn_otel.sinks.otel.traces.start_tracing`
  and :class:`~karn_otel.sinks.otel.traces.EpisodeTraces`) fed with the recorded events, so the
  spans, their attributes, events, statuses and times are the live run's. Trace ids come from
  the episode ids and span ids from (instance, trace, position) — not random — so the replayed
  ids are the ids the live run sent, and sending twice is idempotent in Tempo.
* **Metric points**: every epoch-level sample of the OpenMetrics export
  (:func:`karn_otel.export.openmetrics.collect`, the live path's names and labels), each as a
  data point stamped with its record's time — gauges as gauges, the alert and decision counters
  as cumulative sums — sent as one OTLP metrics request per batch.

The endpoint and protocol are ``--endpoint``/``--protocol``, else the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_PROTOCOL`` (and the signal-specific and
header variables, read by the OTel exporters). An endpoint that does not accept a batch is an
:class:`~karn_otel.export.ExportError` (one line, non-zero exit), with what was sent before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from karn_otel.export import ExportError, ExportOptions, ExportReport
from karn_otel.sinks.runlog import RunRecord

BATCH = 512


@dataclass(frozen=True)
class OtlpTarget:
    endpoint: str | None = None
    protocol: str | None = None
    timeout_s: float = 10.0
    service_name: str | None = None


def _resource(run: RunRecord, target: OtlpTarget) -> Any:
    from karn_otel.config import KarnConfig
    from karn_otel.sinks.otel.resource import build_resource

    first = next((ev for ev in run.events if not ev.is_reduced), run.events[0])
    return build_resource(
        KarnConfig(out_dir=None, service_name=target.service_name), run.run_id, first.rank, first.world_size
    )


def replay_spans(run: RunRecord, resource: Any) -> list[Any]:
    """The spans the live OTel sink made of this run's events (ids included)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from karn_otel.sinks.otel.lifecycle import ExportLedger
    from karn_otel.sinks.otel.traces import start_tracing

    memory = InMemorySpanExporter()
    provider, traces = start_tracing(resource, memory, ExportLedger(), interval_s=3600.0, export_timeout_s=30.0)
    try:
        for ev in run.events:
            traces.handle(ev)
        if run.events:
            traces.abandon_episode(int(run.events[-1].timestamp * 1e9))  # an episode left open, as close() does
        provider.force_flush(30_000)
        return list(memory.get_finished_spans())
    finally:
        provider.shutdown()


def metrics_data(run: RunRecord, resource: Any) -> tuple[Any, int]:
    """One OTLP ``MetricsData`` holding every epoch-level sample of the run at its own time."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Gauge,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
        Sum,
    )
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from karn_otel import __version__
    from karn_otel.export.openmetrics import collect

    fam = collect(run.events)
    start_ns = int(min((ev.timestamp for ev in run.events), default=0.0) * 1e9)
    metrics = []
    n = 0
    for m, series in fam.samples.items():
        points = []
        for labels, samples in series.items():
            attrs = dict(labels)
            for ts, value in sorted(samples):
                points.append(
                    NumberDataPoint(
                        attributes=attrs,
                        start_time_unix_nano=start_ns,
                        time_unix_nano=int(ts * 1e9),
                        value=int(value) if m.kind == "counter" else value,
                    )
                )
        n += len(points)
        data: Any = (
            Sum(points, AggregationTemporality.CUMULATIVE, is_monotonic=True) if m.kind == "counter" else Gauge(points)
        )
        metrics.append(Metric(m.name, m.description, m.unit, data))
    scope = InstrumentationScope("karn_otel", __version__)
    return MetricsData([ResourceMetrics(resource, [ScopeMetrics(scope, metrics, "")], "")]), n


def export(
    runs: Sequence[RunRecord], out: Path | None, options: ExportOptions, target: OtlpTarget | None = None
) -> ExportReport:
    from opentelemetry.sdk.metrics.export import MetricExportResult
    from opentelemetry.sdk.trace.export import SpanExportResult

    from karn_otel.config import KarnConfig
    from karn_otel.sinks.otel.resource import otlp_metric_exporter, otlp_span_exporter, resolve_otlp

    target = target or OtlpTarget()
    try:
        protocol, endpoint = resolve_otlp(
            KarnConfig(out_dir=None, otlp_endpoint=target.endpoint, otlp_protocol=target.protocol)
        )  # type: ignore[arg-type]
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if protocol is None:
        raise ExportError("no OTLP endpoint: pass --endpoint URL or set OTEL_EXPORTER_OTLP_ENDPOINT")
    where = endpoint or "the OTEL_EXPORTER_OTLP_* endpoint"
    report = ExportReport()
    spans_out = otlp_span_exporter(protocol, endpoint, target.timeout_s)
    metrics_out = otlp_metric_exporter(protocol, endpoint, target.timeout_s)
    sent_spans = sent_points = 0
    try:
        for run in runs:
            resource = _resource(run, target)
            spans = replay_spans(run, resource)
            for i in range(0, len(spans), BATCH):
                if spans_out.export(spans[i : i + BATCH]) is not SpanExportResult.SUCCESS:
                    raise ExportError(
                        f"{where} ({protocol}) did not accept spans of run {run.run_id} "
                        f"(sent before: {sent_spans} spans, {sent_points} metric points)"
                    )
                sent_spans += len(spans[i : i + BATCH])
            data, n = metrics_data(run, resource)
            if n and metrics_out.export(data, timeout_millis=target.timeout_s * 1000) is not MetricExportResult.SUCCESS:
                raise ExportError(
                    f"{where} ({protocol}) did not accept the metric points of run {run.run_id} "
                    f"(sent before: {sent_spans} spans, {sent_points} metric points)"
                )
            sent_points += n
            report.written[Path(run.run_id)] = len(spans) + n
            options.progress(f"{run.run_id}: {len(spans)} spans, {n} metric points -> {where}")
    finally:
        for exporter in (spans_out, metrics_out):
            try:
                exporter.shutdown()
            except Exception:  # noqa: BLE001 - a dead endpoint must not turn into a traceback here
                pass
    report.notes.append(f"sent {sent_spans} spans and {sent_points} metric points to {where} ({protocol})")
    return report
