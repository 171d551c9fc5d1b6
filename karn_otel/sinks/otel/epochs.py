"""Every epoch reaches the backend: a metric reader that collects at each epoch boundary.

A periodic reader (every ``otel_export_interval_s``) reads Karn's last-value gauges at its own
pace, so epochs shorter than the interval are never exported: a 20-epoch run left a handful
of points. :class:`EpochMetricReader` collects when the sink tells it an epoch ended
(:meth:`EpochMetricReader.epoch_ended`, a non-blocking signal from the training thread) and
also every interval for what changes between epochs (Karn's own counters, PPO updates). Each
collection is stamped with its time, so each epoch's values are one data point at the epoch's
end, and the export (network) runs on the reader's own thread, never the training thread.

Exactly one point per epoch for the per-epoch series: the metrics of :data:`EPOCH_SOURCES`
(HostSnapshot, SlotSnapshot, CounterfactualMatrix: they only change at an epoch boundary) are
left out of the periodic and final collections. Collections wait in a bounded queue
(:data:`MAX_PENDING_COLLECTIONS`); when the backend is slower than the epochs the oldest is
dropped and counted (``metric_collections_dropped``).

The Collector turns each point into a remote-write sample (``prometheusremotewrite`` into
Prometheus' remote-write receiver), so Prometheus holds every epoch. The embedded pull
endpoint is a separate reader and stays sampled by the scrape.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricReader,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)

from karn_otel.metrics_registry import METRICS
from karn_otel.sinks.otel.lifecycle import ExportLedger

log = logging.getLogger("karn")

EPOCH_SOURCES = frozenset({"host", "slot", "slot_stage", "counterfactual", "shapley"})
"""Registry sources whose values change only at an epoch boundary."""
EPOCH_METRICS = frozenset(m.name for m in METRICS if m.source in EPOCH_SOURCES)
MAX_PENDING_COLLECTIONS = 256


class EpochMetricReader(MetricReader):
    """Collects at every epoch boundary and every ``interval_s``; exports on its own thread."""

    def __init__(self, exporter: MetricExporter, ledger: ExportLedger, *, interval_s: float, timeout_s: float) -> None:
        super().__init__(
            preferred_temporality=getattr(exporter, "_preferred_temporality", None),
            preferred_aggregation=getattr(exporter, "_preferred_aggregation", None),
        )
        self._exporter = exporter
        self._ledger = ledger
        self._interval_s = interval_s
        self._timeout_ms = timeout_s * 1000
        self._cv = threading.Condition()
        self._collect_lock = threading.Lock()
        self._pending: deque[MetricsData] = deque()
        self._epochs_requested = 0  # epoch boundaries signalled, not yet collected
        self._exporting = False
        self._stopped = False
        self._next_is_epoch = False
        self._thread = threading.Thread(target=self._run, name="karn-otel-epoch-metrics", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ training thread

    def epoch_ended(self) -> None:
        """An epoch's snapshot was handled: collect it as soon as possible (never blocks)."""
        with self._cv:
            self._epochs_requested += 1
            self._cv.notify_all()

    # ------------------------------------------------------------------ reader thread

    def _collect_now(self, epoch: bool) -> None:
        with self._collect_lock:
            self._next_is_epoch = epoch
            try:
                self.collect(timeout_millis=self._timeout_ms)
            except Exception as exc:  # a broken callback must not kill the reader
                log.warning("Karn metric collection failed: %r", exc)

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        data = metrics_data if self._next_is_epoch else _without_epoch_metrics(metrics_data)
        with self._cv:
            if len(self._pending) >= MAX_PENDING_COLLECTIONS:
                self._pending.popleft()
                self._ledger.count("metric_collections_dropped")
            self._pending.append(data)
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                if not (self._stopped or self._epochs_requested or self._pending):
                    self._cv.wait(self._interval_s)
                if self._stopped:
                    return
                epochs, self._epochs_requested = self._epochs_requested, 0
            if epochs:
                self._collect_now(epoch=True)  # one collection: the values of the latest epoch
            elif not self._pending:
                self._collect_now(epoch=False)  # the interval passed without an epoch
            self._export_pending()

    def _export_pending(self) -> None:
        while True:
            with self._cv:
                if not self._pending:
                    self._exporting = False
                    self._cv.notify_all()
                    return
                data = self._pending.popleft()
                self._exporting = True
            try:
                self._exporter.export(data, timeout_millis=self._timeout_ms)
            except Exception as exc:
                log.warning("Karn metric export failed: %r", exc)

    # ------------------------------------------------------------------ MetricReader

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Collect now (between epochs) and wait, at most ``timeout_millis``, until everything is exported."""
        self._collect_now(epoch=False)
        with self._cv:
            self._cv.notify_all()
            return self._cv.wait_for(lambda: not self._pending and not self._exporting, timeout_millis / 1000)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """A last collection, export what is pending (bounded by the caller), stop the thread and the exporter."""
        self.force_flush(timeout_millis)
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self._thread.join(timeout_millis / 1000)
        self._exporter.shutdown(timeout_millis=timeout_millis)


def _without_epoch_metrics(data: MetricsData) -> MetricsData:
    """The collection without the per-epoch series (they get exactly one point per epoch)."""
    return MetricsData(
        [
            ResourceMetrics(
                rm.resource,
                [
                    ScopeMetrics(sm.scope, [m for m in sm.metrics if m.name not in EPOCH_METRICS], sm.schema_url)
                    for sm in rm.scope_metrics
                ],
                rm.schema_url,
            )
            for rm in data.resource_metrics
        ]
    )


__all__ = ["EPOCH_METRICS", "EPOCH_SOURCES", "MAX_PENDING_COLLECTIONS", "EpochMetricReader"]
