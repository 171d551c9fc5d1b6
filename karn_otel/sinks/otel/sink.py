"""OTelSink: the sink protocol over the package's parts (see the package docstring).

The sink is given the pipeline's read-only :class:`~karn_otel.pipeline.StoreView`, never the
collector: the resource and every point's labels come from the view's run id, rank and world
size; the metrics read its accounting, health report and analytics.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader
from opentelemetry.sdk.trace import TracerProvider

from karn_otel.config import KarnConfig
from karn_otel.contracts import TelemetryEvent, TelemetryEventType
from karn_otel.distributed.export_policy import RankExportPolicy
from karn_otel.pipeline import StoreView
from karn_otel.sinks.otel import resource as otlp
from karn_otel.sinks.otel.endpoint import DEFAULT_FINAL_SCRAPE_S, PrometheusEndpoint
from karn_otel.sinks.otel.epochs import EpochMetricReader
from karn_otel.sinks.otel.lifecycle import (
    MAX_EXPORT_TIMEOUT_S,
    CountingMetricExporter,
    CountingSpanExporter,
    ExportLedger,
    ExportLifecycle,
)
from karn_otel.sinks.otel.metrics import MetricInstruments
from karn_otel.sinks.otel.traces import EpisodeTraces, start_tracing


class OTelSink:
    """Exports the pipeline's events as OTel traces and metrics (see :mod:`karn_otel.sinks.otel`).

    Args:
        config: reads ``service_name``, ``otlp_endpoint``, ``otlp_protocol``,
            ``prometheus_port`` (None: no Prometheus endpoint; 0: an ephemeral port),
            ``prometheus_host``, ``otel_export_interval_s``, ``otel_shutdown_timeout_s`` and
            ``prometheus_final_scrape_s`` (see :func:`final_scrape_s`).
        view: the pipeline's read-only view (``collector.view``); its ``run_id``, ``rank``
            and ``world_size`` feed the resource and the labels, its accounting, health
            report and analytics feed the metrics. A view without analytics or health (a
            bare ``KarnCollector``) is fine: those metrics fall back or stay empty.
        metric_exporters: more push exporters fed like the OTLP one (one point per epoch, see
            :mod:`karn_otel.sinks.otel.epochs`), e.g. a Prometheus remote-write exporter.

    Raises ``ValueError`` for an unsupported OTLP protocol and ``OSError`` when the
    Prometheus port cannot be bound.
    """

    def __init__(self, config: KarnConfig, view: StoreView, metric_exporters: Sequence[MetricExporter] = ()) -> None:
        self._config = config
        self._view = view
        self._ledger = ExportLedger()
        quiet_exporter_logs()  # the exporters' retry stream becomes one Karn line; failures stay counted
        self._metrics = MetricInstruments(
            view, self._ledger, RankExportPolicy.parse(config.export_ranks, view.world_size)
        )
        self._closed = False

        self.resource = otlp.build_resource(config, view.run_id, view.rank, view.world_size)
        self.otlp_protocol, otlp_endpoint = otlp.resolve_otlp(config)
        export_timeout_s = min(MAX_EXPORT_TIMEOUT_S, config.otel_shutdown_timeout_s / 3)
        self._lifecycle = life = ExportLifecycle(self._ledger, export_timeout_s, config.otel_shutdown_timeout_s)
        self.prometheus_port: int | None = None
        self._endpoint: PrometheusEndpoint | None = None
        self.final_scrape_s = final_scrape_s(config)
        readers: list[MetricReader] = []
        if config.prometheus_port is not None:
            self._endpoint = endpoint = PrometheusEndpoint(config.prometheus_host, config.prometheus_port)
            self.prometheus_port = endpoint.port
            life.stop_endpoint = endpoint.stop
            readers.append(endpoint.reader)
        self._tracer_provider: TracerProvider | None = None
        self._traces: EpisodeTraces | None = None
        self._epoch_readers: list[EpochMetricReader] = []
        pushers: list[CountingMetricExporter] = []
        if self.otlp_protocol is not None:
            metric_exporter = otlp.otlp_metric_exporter(self.otlp_protocol, otlp_endpoint, export_timeout_s)
            life.metric_exporter = CountingMetricExporter(metric_exporter, self._ledger)
            pushers.append(life.metric_exporter)
        pushers += [CountingMetricExporter(e, self._ledger) for e in metric_exporters]
        for exporter in pushers:
            reader = EpochMetricReader(
                exporter, self._ledger, interval_s=config.otel_export_interval_s, timeout_s=export_timeout_s
            )
            self._epoch_readers.append(reader)
            readers.append(reader)
        life.metric_readers = list(self._epoch_readers)
        if self.otlp_protocol is not None:
            span_exporter = otlp.otlp_span_exporter(self.otlp_protocol, otlp_endpoint, export_timeout_s)
            life.span_exporter = CountingSpanExporter(span_exporter, self._ledger)
            self._tracer_provider, self._traces = start_tracing(
                self.resource,
                life.span_exporter,
                self._ledger,
                interval_s=config.otel_export_interval_s,
                export_timeout_s=export_timeout_s,
            )
            life.tracer_provider = self._tracer_provider
        life.meter_provider = MeterProvider(metric_readers=readers, resource=self.resource, shutdown_on_exit=False)
        self._metrics.register(life.meter_provider)

    # ------------------------------------------------------------------ sink protocol

    def handle(self, event: TelemetryEvent) -> None:
        """Keep the latest payloads for the metric callbacks; spans for epochs, episodes, dense windows.

        Runs on the training thread under the collector's lock: a few dict writes per event
        (about 1 us), a small attribute dict for the per-epoch events that become span events,
        and span creation only at epoch, episode and dense-window boundaries.
        """
        if self._closed:
            return
        self._metrics.handle(event)
        if self._traces is not None:
            self._traces.handle(event)
        if event.event_type is TelemetryEventType.HOST_SNAPSHOT and not event.is_reduced:
            # Inside the epoch's span (just ended), so the point's exemplar links to it.
            self._metrics.record_epoch_duration(self._traces.epoch_context() if self._traces else None)
        if self._epoch_readers and event.event_type is TelemetryEventType.HOST_SNAPSHOT:
            # One data point per epoch: rank 0 of a DDP job collects after the job-wide
            # snapshot that follows its own, every other process after its own.
            if event.is_reduced or event.world_size == 1 or event.rank != 0:
                for reader in self._epoch_readers:
                    reader.epoch_ended()

    def flush(self, timeout: float | None = None) -> None:
        """Start exporting everything buffered; wait only while the endpoint answers.

        The collector flushes at EPISODE_ENDED, on the training thread. While exports
        succeed this waits up to ``timeout`` s, capped at the exporters' own timeout (at
        most 2 s). Before the first successful export, and after any failed one, it returns
        at once: an unreachable collector must never stall training (``close`` is where Karn
        waits, bounded).
        """
        if not self._closed:
            self._lifecycle.flush(timeout)

    def close(self) -> None:
        """Wait for Prometheus' final scrape, end an open episode span, export what is left and stop.

        The final scrape: when the embedded endpoint has been scraped, it stays up until one
        more scrape reads the last values (``karn_episode_complete`` included), at most
        ``final_scrape_s``. Then the export and shutdown return within ``otel_shutdown_timeout_s``.
        """
        if self._closed:
            return
        self._closed = True
        self._metrics.mark_stopped()  # an episode still open was stopped, not lost
        if self._endpoint is not None:
            port = self._endpoint.port

            def waiting(left: float) -> None:
                logging.getLogger("karn").warning(
                    "Karn keeps /metrics on port %d up until Prometheus' final scrape (at most %.0f s more; "
                    "%s=0 skips it)",
                    port,
                    left,
                    ENV_FINAL_SCRAPE_S,
                )

            self._endpoint.await_final_scrape(self.final_scrape_s, on_wait=waiting)
        deadline = time.monotonic() + self._config.otel_shutdown_timeout_s
        if self._traces is not None:
            self._traces.abandon_episode(time.time_ns())
        self._lifecycle.close(deadline)

    def linger_s(self) -> float:
        """How long ``close`` may wait for Prometheus' final scrape beyond the pipeline's
        shutdown bound: ``final_scrape_s`` once the endpoint has been scraped, else 0."""
        if self._closed or self._endpoint is None or self._endpoint.scrapes == 0:
            return 0.0
        return self.final_scrape_s

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


ENV_FINAL_SCRAPE_S = "KARN_PROMETHEUS_FINAL_SCRAPE_S"

_EXPORTER_LOGGERS = ("opentelemetry.exporter.otlp",)


class _OnceHandler(logging.Handler):
    """Takes the OTLP exporters' log records (a retry or failure line every few seconds while
    the endpoint is down) and says it once, through Karn's logger. The failures themselves are
    counted by the sink (``karn_telemetry_export_failures_total``, the run log's final stats)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.said = False
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        if self.said:
            return
        self.said = True
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record must not reach training
            msg = str(record.msg)
        logging.getLogger("karn").warning(
            "OTLP export is failing (%s); Karn keeps training and counts what it could not send "
            "(karn_telemetry_export_failures_total, karn inspect); further exporter messages are not printed",
            msg[:300],
        )


_ONCE: _OnceHandler | None = None


def quiet_exporter_logs() -> _OnceHandler:
    """Route the OTLP exporters' logs to one warning line per process (idempotent)."""
    global _ONCE
    if _ONCE is None:
        _ONCE = _OnceHandler()
        for name in _EXPORTER_LOGGERS:
            lg = logging.getLogger(name)
            lg.addHandler(_ONCE)
            lg.propagate = False  # not the root handler's stderr stream
    return _ONCE


def final_scrape_s(config: KarnConfig) -> float:
    """How long a finished process keeps its /metrics up for a final scrape (0: not at all).

    ``KarnConfig.prometheus_final_scrape_s`` when the config has it, else the environment's
    ``KARN_PROMETHEUS_FINAL_SCRAPE_S``, else two 15 s scrape intervals. Invalid values fall
    back to the default (telemetry never raises at shutdown).
    """
    value = getattr(config, "prometheus_final_scrape_s", None)
    if value is None:
        value = os.environ.get(ENV_FINAL_SCRAPE_S)
    try:
        s = float(value) if value is not None else DEFAULT_FINAL_SCRAPE_S
    except (TypeError, ValueError):
        return DEFAULT_FINAL_SCRAPE_S
    return s if s >= 0 else DEFAULT_FINAL_SCRAPE_S


__all__ = ["ENV_FINAL_SCRAPE_S", "OTelSink", "final_scrape_s"]
