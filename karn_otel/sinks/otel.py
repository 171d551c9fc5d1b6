"""OTelSink: Karn's events as OpenTelemetry traces and metrics, without ever slowing training.

What goes where
---------------
* **Resource** (fixed when the sink is built, at ``configure()``): ``service.name`` (config,
  else ``OTEL_SERVICE_NAME``, else ``karn``), ``service.instance.id`` = ``<run_id>-rank<k>``,
  ``karn.run_id``, ``karn.rank``, ``karn.world_size``, ``host.name``, merged with
  ``OTEL_RESOURCE_ATTRIBUTES`` (Karn's own keys win). The episode id is *not* a resource
  attribute: the resource is fixed before the first episode starts and a run may hold many
  episodes. Every span carries ``karn.episode_id`` instead, and the trace id is the episode id.
* **Traces** (only when an OTLP endpoint is configured). One trace per episode, its trace id
  derived from ``episode_id`` (a 32-hex uuid4 id *is* the trace id, so a run-log line finds
  its trace in Tempo; other ids are hashed to 128 bits). Spans:

  - ``karn.episode``, the root: opened at EPISODE_STARTED, ended at EPISODE_ENDED.
  - ``karn.epoch``, one per HostSnapshot, a child of the root, created when the snapshot
    arrives with explicit times (start = the previous epoch's end) and ended at once, so it is
    exported during the run. The epoch's gate evaluations, stage transitions, controller
    decisions, counterfactual passes, alerts and PPO updates are its span events.
  - ``karn.dense_window``, one per DenseTrace, with the trigger reason and window bounds as
    attributes and at most 32 of its batches as ``karn.batch`` events.

  The long-lived root is only exported when the episode ends. Meanwhile Tempo already holds
  the finished epochs: a trace lookup by episode id shows them under a missing parent
  ("root span not yet received"); once the episode ends the root arrives and the trace is
  whole. A run that stops without EPISODE_ENDED gets its root ended by ``close()`` with
  ``karn.episode.complete = false``.
* **Metrics**: one observable instrument per entry of :mod:`karn_otel.metrics_registry`.
  ``handle`` only stores the latest payloads (O(1) dict writes); the instruments' callbacks
  read them, the store and the collector when a reader collects, on the reader's thread.
  Every point carries ``run_id``, ``rank`` and ``world_size`` attributes, so they arrive as
  Prometheus labels on every series by either path.
* **Export**: OTLP over gRPC or HTTP (BatchSpanProcessor + PeriodicExportingMetricReader on
  their own threads) and, by default, a Prometheus endpoint served from this process with its
  own CollectorRegistry on ``prometheus_host:prometheus_port + LOCAL_RANK``.

Outage and shutdown
-------------------
The exporters run on background threads with short timeouts (at most 2 s, a third of
``otel_shutdown_timeout_s``); the span queue is bounded. Failed exports, lost spans and
queue overflows are counted (:meth:`OTelSink.dropped`, ``karn.telemetry.*`` metrics).
``flush`` never waits on an endpoint that has not been answering. ``close`` returns within
``otel_shutdown_timeout_s`` whatever the network does; when the last export failed, it fails
the final exports at once (counted) instead of retrying into that bound.

This module is the only one in Karn that imports opentelemetry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import socket
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, NoOpMeterProvider, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from prometheus_client import CollectorRegistry, start_http_server

from karn_otel import __version__
from karn_otel.analytics import MorphogeneticAnalytics
from karn_otel.config import KarnConfig
from karn_otel.contracts import SeedStage, Severity, TelemetryEvent, TelemetryEventType
from karn_otel.metrics_registry import METRICS, SOURCES, MetricDef

log = logging.getLogger("karn")
ET = TelemetryEventType

MAX_SPAN_QUEUE = 2048  # ended spans waiting for export; a run makes a few per epoch
MAX_EPOCH_EVENTS = 64  # span events per epoch span (the SDK's own limit is 128)
MAX_BATCH_EVENTS = 32  # batch events per dense-window span
MAX_EXPORT_TIMEOUT_S = 2.0
MAX_HEALTH_CHECKS = 32  # distinct `check` label values; more fold into "other"
_SEVERITY_LEVEL = {Severity.OK: 0, Severity.INFO: 1, Severity.WARNING: 2, Severity.CRITICAL: 3}
_PROTOCOLS = ("grpc", "http/protobuf")
_Reader = Callable[[], Iterable[tuple[Any, dict]]]  # a source: (object, labels) pairs at collection time


class OTelSink:
    """Exports a collector's events as OTel traces and metrics (see the module docstring).

    Args:
        config: reads ``service_name``, ``otlp_endpoint``, ``otlp_protocol``,
            ``prometheus_port`` (None: no Prometheus endpoint; 0: an ephemeral port),
            ``prometheus_host``, ``otel_export_interval_s`` and ``otel_shutdown_timeout_s``.
        collector: the collector this sink is added to; its ``run_id``, ``rank``,
            ``world_size``, ``store`` and accounting feed the resource and the metrics.

    Raises ``ValueError`` for an unsupported OTLP protocol and ``OSError`` when the
    Prometheus port cannot be bound.
    """

    def __init__(self, config: KarnConfig, collector: Any) -> None:
        self._config = config
        self._collector = collector
        self._common = {"run_id": collector.run_id, "rank": collector.rank, "world_size": collector.world_size}
        self._ledger = _ExportLedger()
        self._analytics = MorphogeneticAnalytics(collector.store, health=getattr(collector, "health", None))
        self._reported: set[str] = set()
        self._closed = False
        self._reset_episode_state()
        self._alerts: Counter[tuple[str, str]] = Counter()  # run-wide: counters never go back
        self._decisions: Counter[str] = Counter()

        self.resource = build_resource(config, collector.run_id, collector.rank, collector.world_size)
        self.otlp_protocol, otlp_endpoint = resolve_otlp(config)
        export_timeout_s = self._export_timeout_s = min(MAX_EXPORT_TIMEOUT_S, config.otel_shutdown_timeout_s / 3)
        self._http_server: Any = None
        self.prometheus_port: int | None = None
        readers: list[Any] = []
        if config.prometheus_port is not None:
            readers.append(self._start_prometheus(config))
        self._tracer_provider: TracerProvider | None = None
        self._traces: _EpisodeTraces | None = None
        self._metric_reader: PeriodicExportingMetricReader | None = None
        self._metric_exporter: _CountingMetricExporter | None = None
        self._span_exporter: _CountingSpanExporter | None = None
        if self.otlp_protocol is not None:
            exporter = _otlp_metric_exporter(self.otlp_protocol, otlp_endpoint, export_timeout_s)
            self._metric_exporter = _CountingMetricExporter(exporter, self._ledger)
            self._metric_reader = PeriodicExportingMetricReader(
                self._metric_exporter,
                export_interval_millis=config.otel_export_interval_s * 1000,
                export_timeout_millis=export_timeout_s * 1000,
            )
            readers.append(self._metric_reader)
            self._start_tracing(otlp_endpoint, export_timeout_s)
        self._meter_provider = MeterProvider(metric_readers=readers, resource=self.resource, shutdown_on_exit=False)
        self._register_instruments()
        self._flush_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ sink protocol

    def handle(self, event: TelemetryEvent) -> None:
        """Keep the latest payloads for the metric callbacks; spans for epochs, episodes, dense windows.

        Runs on the training thread under the collector's lock: a few dict writes per event
        (about 1 us), a small attribute dict for the per-epoch events that become span events,
        and span creation only at epoch, episode and dense-window boundaries.
        """
        if self._closed:
            return
        et, p = event.event_type, event.payload
        if et is ET.EPISODE_STARTED:
            self._reset_episode_state()
        self._latest[et] = p
        if et is ET.SLOT_SNAPSHOT:
            self._slots[p.slot_id] = p
        elif et is ET.HEALTH_ALERT:
            check = p.check if p.check in self._health or len(self._health) < MAX_HEALTH_CHECKS else "other"
            self._health[check] = p
            self._alerts[(check, p.severity.value)] += 1
        elif et is ET.CONTROLLER_DECISION:
            self._decisions[p.action.op.value] += 1
        elif et is ET.DENSE_TRACE:
            self._ledger.dense_windows += 1
        if self._traces is not None:
            self._traces.handle(event)

    def flush(self, timeout: float | None = None) -> None:
        """Start exporting everything buffered; wait only while the endpoint answers.

        The collector flushes at EPISODE_ENDED, on the training thread. While exports
        succeed this waits up to ``timeout`` s, capped at the exporters' own timeout (at
        most 2 s). Before the first successful export, and after any failed one, it returns
        at once: an unreachable collector must never stall training (``close`` is where Karn
        waits, bounded).
        """
        if self._closed or self._metric_reader is None:
            return
        thread = self._flush_thread
        if thread is None or not thread.is_alive():
            thread = threading.Thread(target=self._flush_exporters, name="karn-otel-flush", daemon=True)
            self._flush_thread = thread
            thread.start()
        if self._ledger.endpoint_answering and timeout is not None and timeout > 0:
            thread.join(min(timeout, self._export_timeout_s))

    def close(self) -> None:
        """End an open episode span, export what is left and stop; returns within ``otel_shutdown_timeout_s``."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self._config.otel_shutdown_timeout_s
        if self._traces is not None:
            self._traces.abandon_episode(time.time_ns())
        self._await_flush(deadline)
        if self._ledger.endpoint_failing:
            # The collector is down: fail the final exports at once (they are counted) rather
            # than retry into the bound. Shutting an OTLP exporter down ends its retries.
            for exporter in (self._span_exporter, self._metric_exporter):
                if exporter is not None:
                    exporter.shutdown()
        jobs: list[Callable[[], Any]] = []
        if self._tracer_provider is not None:
            jobs.append(self._tracer_provider.shutdown)
        budget_ms = self._config.otel_shutdown_timeout_s * 1000
        jobs.append(lambda: self._meter_provider.shutdown(timeout_millis=budget_ms))
        if self._http_server is not None:
            jobs.append(self._stop_prometheus)
        unfinished = _run_all_bounded(jobs, deadline)
        if unfinished:
            bound = self._config.otel_shutdown_timeout_s
            log.warning("Karn OTel sink: %d shutdown step(s) still busy at the %.1f s bound, left behind", unfinished, bound)
        self._ledger.settle_unsent()

    def dropped(self) -> dict[str, int]:
        """What this sink lost, by reason (only non-zero entries).

        ``spans_export_failed`` (the exporter gave up on them), ``spans_queue_full`` (the
        span queue overflowed; estimated), ``spans_unsent_at_shutdown`` (still queued when
        ``close`` hit its bound), ``span_events_over_limit`` (an epoch had more than
        MAX_EPOCH_EVENTS span events). Failed export calls per signal are in the
        ``karn.telemetry.export.failures`` metric.
        """
        return self._ledger.dropped()

    def queue_depth(self) -> int:
        """Ended spans not yet handed to the exporter (the BatchSpanProcessor's queue)."""
        return self._ledger.pending()

    # ------------------------------------------------------------------ construction

    def _start_prometheus(self, config: KarnConfig) -> PrometheusMetricReader:
        """Serve /metrics from this process with a private registry; the bound port lands in ``prometheus_port``."""
        registry = CollectorRegistry()  # never the global REGISTRY: two sinks must not collide
        # target_info keeps the resource; scope labels (otel_scope_*) would only add noise.
        reader = PrometheusMetricReader(scope_info_enabled=False, registry=registry)
        base = config.prometheus_port
        port = base + int(os.environ.get("LOCAL_RANK", "0")) if base else 0
        try:
            self._http_server, _ = start_http_server(port, addr=config.prometheus_host, registry=registry)
        except OSError as exc:
            raise OSError(
                f"Karn could not serve Prometheus metrics on {config.prometheus_host}:{port} ({exc}); "
                "choose another prometheus_port (each rank uses base + LOCAL_RANK), or 0 for any free port"
            ) from exc
        self.prometheus_port = self._http_server.server_port
        return reader

    def _stop_prometheus(self) -> None:
        self._http_server.shutdown()
        self._http_server.server_close()

    def _start_tracing(self, endpoint: str | None, export_timeout_s: float) -> None:
        ids = _EpisodeIdGenerator()
        # Always sample: a trace is a whole episode, and there are few of them.
        self._tracer_provider = TracerProvider(
            resource=self.resource, id_generator=ids, sampler=ALWAYS_ON, shutdown_on_exit=False
        )
        exporter = _otlp_span_exporter(self.otlp_protocol, endpoint, export_timeout_s)
        self._span_exporter = _CountingSpanExporter(exporter, self._ledger)
        self._tracer_provider.add_span_processor(
            BatchSpanProcessor(
                self._span_exporter,
                max_queue_size=MAX_SPAN_QUEUE,
                schedule_delay_millis=self._config.otel_export_interval_s * 1000,
                export_timeout_millis=export_timeout_s * 1000,
                meter_provider=NoOpMeterProvider(),
            )
        )
        tracer = self._tracer_provider.get_tracer("karn_otel", __version__)
        self._traces = _EpisodeTraces(tracer, ids, self._ledger)

    def _await_flush(self, deadline: float) -> None:
        """Let a flush in flight finish (shutting an exporter down mid-export would cancel it),
        but stop waiting as soon as an export fails: then nothing is getting through anyway."""
        thread = self._flush_thread
        limit = min(deadline, time.monotonic() + self._export_timeout_s)
        while thread is not None and thread.is_alive() and not self._ledger.endpoint_failing and time.monotonic() < limit:
            thread.join(0.02)

    def _flush_exporters(self) -> None:
        if self._tracer_provider is not None:
            self._tracer_provider.force_flush()
        if self._metric_reader is not None:
            self._metric_reader.force_flush()

    # ------------------------------------------------------------------ metrics

    def _reset_episode_state(self) -> None:
        # New objects, not .clear(): a callback on a reader thread may be iterating the old ones.
        self._latest: dict[TelemetryEventType, Any] = {}
        self._slots: dict[str, Any] = {}
        self._health: dict[str, Any] = {}

    def _register_instruments(self) -> None:
        meter = self._meter_provider.get_meter("karn_otel", __version__)
        sources = self._sources()
        missing = set(SOURCES) ^ set(sources)
        if missing:
            raise RuntimeError(f"registry sources and OTelSink readers differ: {sorted(missing)}")
        for m in METRICS:
            create = meter.create_observable_counter if m.kind == "counter" else meter.create_observable_gauge
            create(m.name, callbacks=[self._callback(m, sources[m.source])], unit=m.unit, description=m.description)

    def _callback(self, m: MetricDef, source: _Reader) -> Callable[[CallbackOptions], list[Observation]]:
        """One instrument's callback: walk ``m.field`` into each source object, one point per value."""
        path = m.field.split(".") if m.field else []
        common = self._common

        def observe(options: CallbackOptions) -> list[Observation]:
            points: list[Observation] = []
            try:
                for obj, labels in source():
                    for value, key in _values(_walk(obj, path), m.key_label is not None):
                        attrs = {**common, **labels}
                        if key is not None:
                            attrs[m.key_label] = key
                        points.append(Observation(value, attrs))
            except Exception as exc:  # a broken reader must cost one metric, not the whole scrape
                self._report_once(m.name, f"Karn metric {m.name} could not be read: {exc!r}")
                return []
            return points

        return observe

    def _sources(self) -> dict[str, _Reader]:
        """One reader per registry source: yields (object, labels) pairs at collection time."""
        latest = self._latest_of
        return {
            "host": lambda: latest(ET.HOST_SNAPSHOT),
            "slot": self._read_slots,
            "slot_stage": self._read_slot_stages,
            "counterfactual": lambda: latest(ET.COUNTERFACTUAL),
            "shapley": self._read_shapley,
            "policy": lambda: latest(ET.POLICY_SNAPSHOT),
            # A PolicySnapshot repeats the latest update's statistics; use it before any update.
            "ppo": lambda: latest(ET.PPO_UPDATE) or latest(ET.POLICY_SNAPSHOT),
            "baseline": lambda: latest(ET.HOST_BASELINE),
            "context": lambda: latest(ET.EPISODE_STARTED),
            "summary": lambda: latest(ET.EPISODE_ENDED),
            "analytics": lambda: [(self._analytics, {})],
            "health": self._read_health,
            "alerts": lambda: [(n, {"check": c, "severity": s}) for (c, s), n in _copy(self._alerts).items()],
            "decisions": lambda: [(n, {"op": op}) for op, n in _copy(self._decisions).items()],
            "collector": lambda: [(self._collector, {})],
            "dropped": self._read_dropped,
            "otel": lambda: [(self._ledger, {})],
            "queues": self._read_queues,
        }

    def _latest_of(self, et: TelemetryEventType) -> list[tuple[Any, dict]]:
        p = self._latest.get(et)
        return [] if p is None else [(p, {})]

    def _read_slots(self) -> list[tuple[Any, dict]]:
        return [(s, {"slot": sid, "blueprint": s.blueprint_id or "none"}) for sid, s in _copy(self._slots).items()]

    def _read_slot_stages(self) -> list[tuple[Any, dict]]:
        # A state set: every stage has a series, so a stage change never leaves a stale 1 behind.
        return [
            (int(s.stage is stage), {"slot": sid, "stage": stage.value})
            for sid, s in _copy(self._slots).items()
            for stage in SeedStage
        ]

    def _read_shapley(self) -> list[tuple[Any, dict]]:
        cf = self._latest.get(ET.COUNTERFACTUAL)
        if cf is None or not cf.shapley_values:
            return []
        return [(est, {"slot": sid}) for sid, est in cf.shapley_values.items()]

    def _read_health(self) -> list[tuple[Any, dict]]:
        # The monitor knows every check's state, passing ones and recoveries included; its
        # alerts are edge-triggered, so without it the latest alert per check is the best guess.
        monitor = getattr(self._collector, "health", None)
        if monitor is not None:
            return [(c, {"check": c.name}) for c in monitor.report().checks]
        return [(a, {"check": c}) for c, a in _copy(self._health).items()]

    def _read_dropped(self) -> list[tuple[Any, dict]]:
        out = []
        for key, n in self._collector.dropped().items():
            component, _, reason = key.partition(":")
            out.append((n, {"component": component, "reason": reason or "unknown"}))
        return out

    def _read_queues(self) -> list[tuple[Any, dict]]:
        return [
            (sink.queue_depth(), {"component": type(sink).__name__})
            for sink in self._collector.sinks
            if callable(getattr(sink, "queue_depth", None))
        ]

    def _report_once(self, key: str, message: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning(message)


# ---------------------------------------------------------------------- metric values


def _walk(obj: Any, path: Sequence[str]) -> Any:
    """Follow a dotted field path; a missing attribute or None anywhere gives None. Methods are called."""
    for part in path:
        if obj is None:
            return None
        obj = getattr(obj, part, None)
        if callable(obj):
            obj = obj()
    return obj


def _values(value: Any, keyed: bool) -> Iterable[tuple[float, str | None]]:
    """(number, key) pairs: one unkeyed value, or one per mapping entry / named contract field."""
    if not keyed:
        n = _number(value)
        return [] if n is None else [(n, None)]
    if isinstance(value, dict):
        items: Iterable[tuple[Any, Any]] = _copy(value).items()
    elif dataclasses.is_dataclass(value):
        items = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    else:
        return []
    return [(n, str(k)) for k, v in items if (n := _number(v)) is not None]


def _number(v: Any) -> float | int | None:
    """The value to observe, or None for no point: unmeasured (None), non-numeric or non-finite.

    The OTel SDK drops NaN and inf observations itself, with a warning per collection; a
    diverged loss shows up as the ``non_finite_loss`` health check instead.
    """
    if v is None:
        return None
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, Severity):
        return _SEVERITY_LEVEL[v]
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return None


def _copy(d: dict) -> dict:
    """Copy a dict the training thread may be inserting into (rarely raises; retry)."""
    for _ in range(3):
        try:
            return dict(d)
        except RuntimeError:
            continue
    return {}


# ---------------------------------------------------------------------- traces


def trace_id_for_episode(episode_id: str) -> int:
    """The 128-bit trace id of an episode: the id itself when it is 32 hex digits (uuid4().hex), else a hash.

    Ranks of a DDP job that share an episode id therefore share its trace: one
    ``karn.episode`` root per rank, told apart by the resource's ``service.instance.id``.
    """
    if len(episode_id) == 32:
        try:
            tid = int(episode_id, 16)
            if tid:
                return tid
        except ValueError:
            pass
    return int.from_bytes(hashlib.sha256(episode_id.encode()).digest()[:16], "big") or 1


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class _EpisodeIdGenerator(RandomIdGenerator):
    """Random ids, except the next root span's trace id, which the sink sets from the episode id."""

    def __init__(self) -> None:
        self.next_trace_id: int | None = None

    def generate_trace_id(self) -> int:
        tid, self.next_trace_id = self.next_trace_id, None
        return tid if tid is not None else super().generate_trace_id()

    def is_trace_id_random(self) -> bool:
        return False  # derived from episode ids; ratio samplers must not rely on it


class _EpisodeTraces:
    """Turns the event stream into spans. Called from ``OTelSink.handle`` on the training thread."""

    def __init__(self, tracer: trace.Tracer, ids: _EpisodeIdGenerator, ledger: "_ExportLedger") -> None:
        self._tracer = tracer
        self._ids = ids
        self._ledger = ledger
        self._episode: Any = None  # the open karn.episode span
        self._episode_ctx: Context | None = None
        self._episode_id = ""
        self._epoch_start = 0  # ns; the end of the previous epoch
        self._epoch_starts: dict[int, int] = {}  # epoch -> start ns, for dense windows (bounded)
        self._pending: list[tuple[str, dict, int]] = []  # span events of the epoch in progress
        self._slot_attrs: dict[str, Any] = {}

    def handle(self, event: TelemetryEvent) -> None:
        et = event.event_type
        if et is ET.EPISODE_STARTED:
            self._start_episode(event)
        elif self._episode is None:
            return  # events outside an episode belong to no trace
        elif et is ET.HOST_SNAPSHOT:
            self._end_epoch(event)
        elif et is ET.SLOT_SNAPSHOT:
            self._slot_attrs.update(_slot_attributes(event.payload))
        elif et is ET.DENSE_TRACE:
            self._dense_window(event)
        elif et is ET.EPISODE_ENDED:
            self._end_episode(event)
        else:
            describe = _SPAN_EVENTS.get(et)
            if describe is not None:
                self._add_event(*describe(event.payload), _ns(event.timestamp))

    def _start_episode(self, event: TelemetryEvent) -> None:
        now = _ns(event.timestamp)
        self.abandon_episode(now)
        ctx = event.payload
        self._episode_id = ctx.episode_id
        self._ids.next_trace_id = trace_id_for_episode(ctx.episode_id)
        self._episode = self._tracer.start_span(
            "karn.episode",
            context=Context(),  # an empty context: never a child of whatever the caller is tracing
            attributes=_episode_attributes(ctx),
            start_time=now,
        )
        self._episode_ctx = trace.set_span_in_context(self._episode)
        self._epoch_start = now
        self._epoch_starts = {}
        self._pending = []
        self._slot_attrs = {}

    def _end_epoch(self, event: TelemetryEvent) -> None:
        h = event.payload
        end = _ns(event.timestamp)
        attrs = {"karn.episode_id": self._episode_id, **_host_attributes(h), **self._slot_attrs}
        start = self._epoch_start
        span = self._tracer.start_span("karn.epoch", context=self._episode_ctx, attributes=attrs, start_time=start)
        for name, a, t in self._pending:
            span.add_event(name, a, t)
        self._end(span, end)
        self._epoch_starts[h.epoch] = self._epoch_start
        if len(self._epoch_starts) > 256:
            self._epoch_starts.pop(next(iter(self._epoch_starts)))
        self._epoch_start = end
        self._pending = []
        self._slot_attrs = {}

    def _dense_window(self, event: TelemetryEvent) -> None:
        d = event.payload
        end = _ns(event.timestamp)
        start = min(self._epoch_starts.get(d.window_start_epoch, self._epoch_start), end)
        attrs = {"karn.episode_id": self._episode_id, **_dense_attributes(d)}
        span = self._tracer.start_span("karn.dense_window", context=self._episode_ctx, attributes=attrs, start_time=start)
        batches = d.batch_metrics
        picked = _spread(len(batches), MAX_BATCH_EVENTS)
        # Batches carry no timestamps: the events are spread evenly over the window, in batch order.
        for j, i in enumerate(picked):
            t = start + (end - start) * (j + 1) // (len(picked) + 1)
            span.add_event("karn.batch", _batch_attributes(batches[i]), t)
        self._end(span, end)

    def _end_episode(self, event: TelemetryEvent) -> None:
        s = event.payload
        self._episode.set_attributes(
            {
                "karn.episode.complete": True,
                "karn.epochs_completed": s.epochs_completed,
                "karn.final_val_loss": s.final_val_loss,
                "karn.final_val_accuracy": s.final_val_accuracy,
                "karn.total_params": s.total_params,
                "karn.fossilized_params": s.fossilized_params,
                "karn.wall_time_s": s.wall_time_s,
                **({"karn.host_only_accuracy": s.host_only_accuracy} if s.host_only_accuracy is not None else {}),
            }
        )
        self._close_root(_ns(event.timestamp))

    def abandon_episode(self, now_ns: int) -> None:
        """End an open episode span that never got its EPISODE_ENDED (a new episode, or close())."""
        if self._episode is not None:
            self._episode.set_attribute("karn.episode.complete", False)
            self._close_root(now_ns)

    def _close_root(self, end: int) -> None:
        # Events after the last epoch (final baseline, late alerts) go on the root span.
        for name, a, t in self._pending:
            self._episode.add_event(name, a, t)
        self._end(self._episode, end)
        self._episode = None
        self._episode_ctx = None
        self._pending = []

    def _add_event(self, name: str, attrs: dict, t: int) -> None:
        if len(self._pending) >= MAX_EPOCH_EVENTS:
            self._ledger.count("span_events_over_limit")
            return
        self._pending.append((name, attrs, t))

    def _end(self, span: Any, end_ns: int) -> None:
        self._ledger.span_ended()
        span.end(end_time=end_ns)


def _spread(n: int, k: int) -> list[int]:
    """At most k indices out of range(n), evenly spaced, first and last included."""
    if n <= k:
        return list(range(n))
    return [round(j * (n - 1) / (k - 1)) for j in range(k)]


def _episode_attributes(ctx: Any) -> dict[str, Any]:
    return {
        "karn.episode_id": ctx.episode_id,
        "karn.host_architecture": ctx.host_architecture,
        "karn.host_params": ctx.host_params,
        "karn.max_epochs": ctx.max_epochs,
        "karn.base_seed": ctx.base_seed,
        "karn.git_commit": ctx.git_commit,
        "karn.task_type": ctx.task_type,
        "karn.slots": list(ctx.slot_config),
    }


def _host_attributes(h: Any) -> dict[str, Any]:
    attrs = {
        "karn.epoch": h.epoch,
        "karn.train_loss": h.train_loss,
        "karn.train_accuracy": h.train_accuracy,
        "karn.val_loss": h.val_loss,
        "karn.val_accuracy": h.val_accuracy,
        "karn.host_params": h.host_params,
        "karn.total_seed_params": h.total_seed_params,
        "karn.total_params": h.total_params,
        "karn.fossilized_params": h.fossilized_params,
        "karn.host_grad_norm": h.host_grad_norm,
    }
    if h.grad_isolation_leakage is not None:
        attrs["karn.grad_isolation_leakage"] = h.grad_isolation_leakage
    for sid, norm in h.seed_grad_norms.items():
        attrs[f"karn.seed_grad_norm.{sid}"] = norm
    return attrs


def _slot_attributes(s: Any) -> dict[str, Any]:
    prefix = f"karn.slot.{s.slot_id}."
    attrs: dict[str, Any] = {prefix + "stage": s.stage.value, prefix + "alpha": s.alpha}
    if s.seed_id is not None:
        attrs[prefix + "seed_id"] = s.seed_id
    return attrs


def _dense_attributes(d: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "karn.dense.trigger_reason": d.trigger_reason,
        "karn.dense.window_start_epoch": d.window_start_epoch,
        "karn.dense.window_end_epoch": d.window_end_epoch,
        "karn.dense.batches": len(d.batch_metrics),
        "karn.dense.batch_events": min(len(d.batch_metrics), MAX_BATCH_EVENTS),
    }
    # Per-layer statistics, capped so a large model cannot hit the SDK's attribute limit.
    budget = 64
    for prefix, values in (
        ("karn.gradient_flow.", d.gradient_flow),
        ("karn.activation_mean.", d.activation_means),
        ("karn.activation_std.", d.activation_stds),
        ("karn.dead_neurons.", d.dead_neuron_counts),
    ):
        for layer, v in list(values.items())[: max(budget, 0)]:
            attrs[prefix + layer] = v
        budget -= len(values)
    g = d.gate_evaluation_details
    if g is not None:
        attrs.update(
            {"karn.gate": g.gate, "karn.gate.slot": g.slot_id, "karn.gate.passed": g.passed, "karn.gate.reason": g.reason}
        )
    return attrs


def _batch_attributes(b: Any) -> dict[str, Any]:
    attrs = {
        "karn.epoch": b.epoch,
        "karn.batch_idx": b.batch_idx,
        "karn.loss": b.loss,
        "karn.accuracy": b.accuracy,
        "karn.host_grad_norm": b.host_grad_norm,
    }
    if b.isolation_leakage is not None:
        attrs["karn.isolation_leakage"] = b.isolation_leakage
    for sid, norm in b.seed_grad_norms.items():
        attrs[f"karn.seed_grad_norm.{sid}"] = norm
    return attrs


def _opt(attrs: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    if value is not None:
        attrs[key] = value
    return attrs


def _gate_event(g: Any) -> tuple[str, dict]:
    a = {
        "karn.gate": g.gate,
        "karn.slot": g.slot_id,
        "karn.passed": g.passed,
        "karn.reason": g.reason,
        "karn.from_stage": g.from_stage.value,
    }
    _opt(a, "karn.seed_id", g.seed_id)
    _opt(a, "karn.to_stage", g.to_stage.value if g.to_stage is not None else None)
    for k, v in list(g.measurements.items())[:16]:
        a[f"karn.measurement.{k}"] = v
    for k, v in list(g.thresholds.items())[:16]:
        a[f"karn.threshold.{k}"] = v
    return "karn.gate_evaluation", a


def _transition_event(t: Any) -> tuple[str, dict]:
    a = {
        "karn.slot": t.slot_id,
        "karn.from_stage": t.from_stage.value,
        "karn.to_stage": t.to_stage.value,
        "karn.reason": t.reason,
    }
    _opt(a, "karn.seed_id", t.seed_id)
    _opt(a, "karn.blueprint", t.blueprint_id)
    return "karn.stage_transition", a


def _decision_event(d: Any) -> tuple[str, dict]:
    a = {
        "karn.controller": d.controller,
        "karn.action": d.action.label(),
        "karn.op": d.action.op.value,
        "karn.reason": d.reason,
    }
    _opt(a, "karn.shadow_action", d.shadow_action.label() if d.shadow_action is not None else None)
    return "karn.controller_decision", a


def _counterfactual_event(cf: Any) -> tuple[str, dict]:
    a: dict[str, Any] = {
        "karn.strategy": cf.strategy,
        "karn.evaluations": cf.n_evaluations,
        "karn.elapsed_s": cf.elapsed_s,
        "karn.partial": cf.partial,
        "karn.slots": list(cf.slot_ids),
    }
    _opt(a, "karn.partial_reason", cf.partial_reason)
    for sid, v in cf.marginal_contributions.items():
        a[f"karn.removal_cost.{sid}"] = v
    for sid, est in (cf.shapley_values or {}).items():
        a[f"karn.shapley.{sid}"] = est.mean
    return "karn.counterfactual", a


def _alert_event(al: Any) -> tuple[str, dict]:
    return "karn.health_alert", {
        "karn.check": al.check,
        "karn.severity": al.severity.value,
        "karn.message": al.message,
        "karn.value": al.value,
        "karn.threshold": al.threshold,
    }


def _ppo_event(u: Any) -> tuple[str, dict]:
    return "karn.ppo_update", {
        "karn.update_index": u.update_index,
        "karn.policy_loss": u.policy_loss,
        "karn.value_loss": u.value_loss,
        "karn.kl_divergence": u.kl_divergence,
        "karn.explained_variance": u.explained_variance,
    }


def _policy_event(p: Any) -> tuple[str, dict]:
    a = {
        "karn.action": p.action.label(),
        "karn.value_estimate": p.value_estimate,
        "karn.reward": p.reward_total,
        "karn.action_masked": p.action_was_masked,
    }
    _opt(a, "karn.shadow_action", p.shadow_action.label() if p.shadow_action is not None else None)
    return "karn.policy_decision", a


def _baseline_event(b: Any) -> tuple[str, dict]:
    a = {
        "karn.initial_loss": b.initial_loss,
        "karn.initial_accuracy": b.initial_accuracy,
        "karn.checkpoint": str(b.initial_checkpoint),
    }
    _opt(a, "karn.final_host_only_loss", b.final_host_only_loss)
    _opt(a, "karn.final_host_only_accuracy", b.final_host_only_accuracy)
    return "karn.host_baseline", a


def _mode_event(m: Any) -> tuple[str, dict]:
    return "karn.mode_change", {"karn.mode": m.mode.value, "karn.reason": m.reason}


# Events that become span events on their epoch's span. BATCH_METRICS (one per batch) only
# appear inside dense windows; snapshots become span attributes; TELEMETRY_STATS is in the log.
_SPAN_EVENTS: dict[TelemetryEventType, Callable[[Any], tuple[str, dict]]] = {
    ET.GATE_EVALUATION: _gate_event,
    ET.STAGE_TRANSITION: _transition_event,
    ET.CONTROLLER_DECISION: _decision_event,
    ET.COUNTERFACTUAL: _counterfactual_event,
    ET.HEALTH_ALERT: _alert_event,
    ET.PPO_UPDATE: _ppo_event,
    ET.POLICY_SNAPSHOT: _policy_event,
    ET.HOST_BASELINE: _baseline_event,
    ET.MODE_CHANGE: _mode_event,
}


# ---------------------------------------------------------------------- export accounting


class _ExportLedger:
    """Counts what the exporters did and lost. Written from exporter threads, read anywhere."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lost: Counter[str] = Counter()
        self._failures = {"traces": 0, "metrics": 0}
        self.spans_ended = 0  # training thread only
        self.spans_handed = 0  # spans passed to the exporter (or settled at shutdown)
        self.dense_windows = 0
        self._last_export_ok: bool | None = None  # None until the first export returns

    @property
    def endpoint_answering(self) -> bool:
        return self._last_export_ok is True

    @property
    def endpoint_failing(self) -> bool:
        return self._last_export_ok is False

    @property
    def export_failures(self) -> dict[str, int]:
        with self._lock:
            return dict(self._failures)

    def span_ended(self) -> None:
        # The BatchSpanProcessor drops the oldest span when its queue is full; it does not
        # count it where we can read it, so estimate from what is still waiting.
        if self.pending() >= MAX_SPAN_QUEUE:
            self.count("spans_queue_full")
        self.spans_ended += 1

    def pending(self) -> int:
        with self._lock:
            return max(0, self.spans_ended - self.spans_handed - self._lost["spans_queue_full"])

    def handing(self, n_spans: int) -> None:
        """Spans leave the queue for the exporter (counted before the export, which may hang)."""
        with self._lock:
            self.spans_handed += n_spans

    def exported(self, signal: str, n_spans: int, ok: bool) -> None:
        with self._lock:
            if not ok:
                self._failures[signal] += 1
                if n_spans:
                    self._lost["spans_export_failed"] += n_spans
            self._last_export_ok = ok

    def count(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self._lost[reason] += n

    def settle_unsent(self) -> None:
        """After shutdown: spans still waiting were never sent."""
        left = self.pending()
        if left:
            self.count("spans_unsent_at_shutdown", left)
            with self._lock:
                self.spans_handed += left  # settled: pending() is 0 from now on

    def dropped(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in self._lost.items() if v}


class _CountingSpanExporter(SpanExporter):
    """Wraps an OTLP span exporter to count failed exports and the spans they lost."""

    def __init__(self, inner: SpanExporter, ledger: _ExportLedger) -> None:
        self._inner = inner
        self._ledger = ledger
        self._stopped = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._ledger.handing(len(spans))
        try:
            result = self._inner.export(spans)
        except Exception:  # an exporter bug must look like a failed export, not kill the worker
            result = SpanExportResult.FAILURE
        self._ledger.exported("traces", len(spans), result is SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        """Also the abort: the OTLP exporter stops retrying, and later exports fail at once."""
        if not self._stopped:
            self._stopped = True
            self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _CountingMetricExporter(MetricExporter):
    """Wraps an OTLP metric exporter to count failed exports; keeps its temporality preferences."""

    def __init__(self, inner: MetricExporter, ledger: _ExportLedger) -> None:
        super().__init__(
            preferred_temporality=getattr(inner, "_preferred_temporality", None),
            preferred_aggregation=getattr(inner, "_preferred_aggregation", None),
        )
        self._inner = inner
        self._ledger = ledger
        self._stopped = False

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        try:
            result = self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception:
            result = MetricExportResult.FAILURE
        self._ledger.exported("metrics", 0, result is MetricExportResult.SUCCESS)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Also the abort: the OTLP exporter stops retrying, and later exports fail at once."""
        if not self._stopped:
            self._stopped = True
            self._inner.shutdown(timeout_millis=timeout_millis)


# ---------------------------------------------------------------------- configuration


def build_resource(config: KarnConfig, run_id: str, rank: int, world_size: int) -> Resource:
    """The process's OTel resource: Karn's identity merged over OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME."""
    attrs: dict[str, Any] = {
        "service.instance.id": f"{run_id}-rank{rank}",
        "karn.run_id": run_id,
        "karn.rank": rank,
        "karn.world_size": world_size,
        "host.name": socket.gethostname(),
    }
    if config.service_name:
        attrs["service.name"] = config.service_name
    resource = Resource.create(attrs)
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "karn"}))
    return resource


def resolve_otlp(config: KarnConfig) -> tuple[str | None, str | None]:
    """(protocol, endpoint) for OTLP, or (None, None) when no endpoint is configured anywhere.

    The endpoint is ``config.otlp_endpoint`` (a base URL, like OTEL_EXPORTER_OTLP_ENDPOINT;
    without a scheme it is taken as ``http://``), else None so that the exporters read the
    standard OTEL_EXPORTER_OTLP_* variables themselves (signal-specific ones and headers too).
    """
    env_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not config.otlp_endpoint and not env_endpoint:
        return None, None
    protocol = config.otlp_protocol or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol not in _PROTOCOLS:
        raise ValueError(f"OTLP protocol {protocol!r} is not supported; use one of {_PROTOCOLS}")
    endpoint = config.otlp_endpoint
    if endpoint and "://" not in endpoint:
        endpoint = "http://" + endpoint  # plaintext, as OTLP collectors listen by default
    return protocol, endpoint.rstrip("/") if endpoint else None


def _otlp_span_exporter(protocol: str | None, endpoint: str | None, timeout_s: float) -> SpanExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

        return GrpcSpanExporter(endpoint=endpoint, timeout=timeout_s, meter_provider=NoOpMeterProvider())
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

    url = f"{endpoint}/v1/traces" if endpoint else None
    return HttpSpanExporter(endpoint=url, timeout=timeout_s, meter_provider=NoOpMeterProvider())


def _otlp_metric_exporter(protocol: str | None, endpoint: str | None, timeout_s: float) -> MetricExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter

        return GrpcMetricExporter(endpoint=endpoint, timeout=timeout_s, meter_provider=NoOpMeterProvider())
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter

    url = f"{endpoint}/v1/metrics" if endpoint else None
    return HttpMetricExporter(endpoint=url, timeout=timeout_s, meter_provider=NoOpMeterProvider())


def _run_all_bounded(jobs: list[Callable[[], Any]], deadline: float) -> int:
    """Run jobs in parallel daemon threads; wait until they finish or the deadline passes.

    Returns how many were still running. The SDK's shutdowns take their own timeouts, but
    not all honour them (BatchSpanProcessor waits up to 30 s), so the bound is enforced here.
    """

    def guarded(job: Callable[[], Any]) -> None:
        try:
            job()
        except Exception as exc:
            log.warning("Karn OTel sink shutdown step failed: %r", exc)

    threads = [threading.Thread(target=guarded, args=(job,), name="karn-otel-shutdown", daemon=True) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return sum(t.is_alive() for t in threads)


__all__ = ["OTelSink", "build_resource", "resolve_otlp", "trace_id_for_episode"]
