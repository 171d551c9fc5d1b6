"""Every epoch reaches the backend: a metric reader that collects at each epoch boundary.

A periodic reader (every ``otel_export_interval_s``) reads Karn's last-value gauges at its own
pace, so epochs shorter than the interval are never exported: a 20-epoch run left a handful
of points. :class:`EpochMetricReader` collects when the sink tells it an epoch ended
(:meth:`EpochMetricReader.epoch_ended`, a non-blocking signal from the training thread) and
also every interval for what changes between epochs (Karn's own counters, PPO updates). Each
collection is stamped with its time, so each epoch's values are one data point at the epoch's
end. Collecting and exporting run on two threads of the reader, never the training thread, so
a slow backend never delays a collection; epochs shorter than one collection (about a
millisecond) are merged into the latest and counted (``metric_epochs_merged``).

Exactly one point per epoch for the per-epoch series: the metrics of :data:`EPOCH_SOURCES`
(HostSnapshot, SlotSnapshot, CounterfactualMatrix: they only change at an epoch boundary) are
left out of the periodic and final collections. Collections wait in a bounded queue
(:data:`MAX_PENDING_COLLECTIONS`, memory bounded); when the backend is slower than the epochs the
oldest is dropped and counted (``metric_collections_dropped``).

The Collector turns each point into a remote-write sample (``prometheusremotewrite`` into
Prometheus' remote-write receiver), so Prometheus holds every epoch. The embedded pull
endpoint is a separate reader and stays sampled by the scrape.
"""

from __future__ import annotations

import logging
import threading
import time
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
        # Two threads: collecting (fast, at each epoch boundary) never waits behind an export
        # (network, up to its timeout), which only fills the bounded queue.
        self._collector = threading.Thread(target=self._collect_loop, name="karn-otel-epoch-collect", daemon=True)
        self._exporter_thread = threading.Thread(target=self._export_loop, name="karn-otel-epoch-export", daemon=True)
        self._collector.start()
        self._exporter_thread.start()

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

    def _collect_loop(self) -> None:
        next_tick = time.monotonic() + self._interval_s
        while True:
            with self._cv:
                while not (self._stopped or self._epochs_requested):
                    left = next_tick - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)  # other notifications (exports) just loop back here
                if self._stopped:
                    return
                epochs, self._epochs_requested = self._epochs_requested, 0
            next_tick = time.monotonic() + self._interval_s
            if epochs > 1:
                # Epochs that ended faster than one collection: only the latest one's values exist.
                self._ledger.count("metric_epochs_merged", epochs - 1)
            self._collect_now(epoch=epochs > 0)  # the values of the latest epoch, or the interval's

    def _export_loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stopped:
                    self._cv.wait()
                if not self._pending:
                    return  # stopped, nothing left
                data = self._pending.popleft()
                self._exporting = True
            try:
                self._exporter.export(data, timeout_millis=self._timeout_ms)
            except Exception as exc:
                log.warning("Karn metric export failed: %r", exc)
            with self._cv:
                self._exporting = False
                self._cv.notify_all()

    # ------------------------------------------------------------------ MetricReader

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Collect now (between epochs) and wait, at most ``timeout_millis``, until everything is exported."""
        self._collect_now(epoch=False)
        with self._cv:
            self._cv.notify_all()
            return self._cv.wait_for(lambda: not self._pending and not self._exporting, timeout_millis / 1000)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """A last collection, export what is pending (bounded by the caller), stop the threads and the exporter."""
        self.force_flush(timeout_millis)
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self._collector.join(timeout_millis / 1000)
        self._exporter_thread.join(timeout_millis / 1000)
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
