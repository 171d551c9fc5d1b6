"""Export accounting and bounded shutdown: what the exporters did and lost, and a flush and a
close that never hold training or the process exit hostage to the network.

* :class:`ExportLedger` counts spans ended, handed to the exporter and lost (by reason), and
  failed export calls per signal; it is written from exporter threads and read anywhere.
* :class:`CountingSpanExporter` and :class:`CountingMetricExporter` wrap the OTLP exporters to
  feed the ledger; their ``shutdown`` is also the abort (the OTLP exporter stops retrying).
* :class:`ExportLifecycle` runs ``flush`` (returns at once unless the endpoint has been
  answering) and ``close`` (returns within ``otel_shutdown_timeout_s`` whatever the network
  does; when the last export failed, it fails the final exports at once, counted, instead of
  retrying into that bound).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger("karn")

MAX_SPAN_QUEUE = 2048  # ended spans waiting for export; a run makes a few per epoch
MAX_EXPORT_TIMEOUT_S = 2.0


class ExportLedger:
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


class CountingSpanExporter(SpanExporter):
    """Wraps an OTLP span exporter to count failed exports and the spans they lost."""

    def __init__(self, inner: SpanExporter, ledger: ExportLedger) -> None:
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


class CountingMetricExporter(MetricExporter):
    """Wraps an OTLP metric exporter to count failed exports; keeps its temporality preferences."""

    def __init__(self, inner: MetricExporter, ledger: ExportLedger) -> None:
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


class ExportLifecycle:
    """Flush and shutdown of the sink's providers, exporters and endpoint, both bounded.

    The sink fills in what it built (``tracer_provider``, ``metric_readers``, the counting
    exporters, ``meter_provider``, ``stop_endpoint``) before the first event arrives.
    """

    def __init__(self, ledger: ExportLedger, export_timeout_s: float, shutdown_timeout_s: float) -> None:
        self.ledger = ledger
        self.export_timeout_s = export_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.tracer_provider: TracerProvider | None = None
        self.meter_provider: MeterProvider | None = None
        self.metric_readers: list[MetricReader] = []  # the push readers (OTLP, remote write)
        self.span_exporter: CountingSpanExporter | None = None
        self.metric_exporter: CountingMetricExporter | None = None
        self.stop_endpoint: Callable[[], None] | None = None
        self._flush_thread: threading.Thread | None = None

    def flush(self, timeout: float | None) -> None:
        """Start exporting everything buffered; wait only while the endpoint answers.

        While exports succeed this waits up to ``timeout`` s, capped at the exporters' own
        timeout (at most 2 s). Before the first successful export, and after any failed one,
        it returns at once: an unreachable collector must never stall training.
        """
        if not self.metric_readers and self.tracer_provider is None:
            return
        thread = self._flush_thread
        if thread is None or not thread.is_alive():
            thread = threading.Thread(target=self._flush_exporters, name="karn-otel-flush", daemon=True)
            self._flush_thread = thread
            thread.start()
        if self.ledger.endpoint_answering and timeout is not None and timeout > 0:
            thread.join(min(timeout, self.export_timeout_s))

    def close(self, deadline: float) -> None:
        """Export what is left and stop everything by ``deadline`` (``time.monotonic()``)."""
        self._await_flush(deadline)
        if self.ledger.endpoint_failing:
            # The collector is down: fail the final exports at once (they are counted) rather
            # than retry into the bound. Shutting an OTLP exporter down ends its retries.
            for exporter in (self.span_exporter, self.metric_exporter):
                if exporter is not None:
                    exporter.shutdown()
        jobs: list[Callable[[], Any]] = []
        if self.tracer_provider is not None:
            jobs.append(self.tracer_provider.shutdown)
        meter_provider = self.meter_provider
        if meter_provider is not None:
            budget_ms = self.shutdown_timeout_s * 1000
            jobs.append(lambda: meter_provider.shutdown(timeout_millis=budget_ms))
        if self.stop_endpoint is not None:
            jobs.append(self.stop_endpoint)
        unfinished = run_all_bounded(jobs, deadline)
        if unfinished:
            bound = self.shutdown_timeout_s
            log.warning(
                "Karn OTel sink: %d shutdown step(s) still busy at the %.1f s bound, left behind", unfinished, bound
            )
        self.ledger.settle_unsent()

    def _await_flush(self, deadline: float) -> None:
        """Let a flush in flight finish (shutting an exporter down mid-export would cancel it),
        but stop waiting as soon as an export fails: then nothing is getting through anyway."""
        thread = self._flush_thread
        limit = min(deadline, time.monotonic() + self.export_timeout_s)
        while (
            thread is not None and thread.is_alive() and not self.ledger.endpoint_failing and time.monotonic() < limit
        ):
            thread.join(0.02)

    def _flush_exporters(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush()
        for reader in self.metric_readers:
            reader.force_flush(self.export_timeout_s * 1000)


def run_all_bounded(jobs: list[Callable[[], Any]], deadline: float) -> int:
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


__all__ = [
    "MAX_EXPORT_TIMEOUT_S",
    "MAX_SPAN_QUEUE",
    "CountingMetricExporter",
    "CountingSpanExporter",
    "ExportLedger",
    "ExportLifecycle",
    "run_all_bounded",
]
