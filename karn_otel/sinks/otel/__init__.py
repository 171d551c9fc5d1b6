"""OTelSink: Karn's events as OpenTelemetry traces and metrics, without ever slowing training.

The sink is built by the composition root (:func:`karn_otel.sinks.factory.build_pipeline`)
as ``OTelSink(config, view)``: it reads the pipeline's read-only
:class:`~karn_otel.pipeline.StoreView`, never the collector.

What goes where
---------------
* ``resource.py``: the **resource** (``service.name``, ``service.instance.id`` =
  ``<run_id>-rank<k>``, ``karn.run_id``, ``karn.rank``, ``karn.world_size``, ``host.name``,
  merged with ``OTEL_RESOURCE_ATTRIBUTES``), the OTLP endpoint and protocol, the OTLP
  exporters (gRPC or HTTP).
* ``traces.py``: **traces** (only when an OTLP endpoint is configured), one per episode, its
  trace id derived from ``episode_id`` (which every rank of a DDP job shares):
  ``karn.episode`` root, one ``karn.epoch`` child per rank's own epoch with the epoch's events
  as span events (status ERROR for a non-finite loss or a critical alert), timed
  ``karn.counterfactual`` children, rank 0's ``karn.reduction`` (the job-wide snapshot),
  ``karn.dense_window`` spans with bounded batch events; an abandoned episode's root is ERROR.
* ``metrics.py``: **metrics**, one observable instrument per entry of
  :mod:`karn_otel.metrics_registry`. ``handle`` only stores the latest payloads (O(1) dict
  writes); the instruments' callbacks read them and the view when a reader collects, on the
  reader's thread. Every point carries ``run_id``, ``rank`` and ``world_size`` (the job-wide
  host values: ``scope="job"`` and no rank); every counter's known label sets start at 0;
  ``karn.episode.complete`` / ``karn.episode.stopped`` tell a finished rank from a lost one.
* ``epochs.py``: the push readers (OTLP, extra exporters such as remote write) collect at
  every epoch boundary, so each epoch is one data point, and export on their own threads.
* ``endpoint.py``: the embedded **Prometheus** endpoint, served from this process with its
  own CollectorRegistry on ``prometheus_host:prometheus_port + LOCAL_RANK``; sampled by the
  scrape; at shutdown it waits (bounded) for a final scrape.
* ``lifecycle.py``: **outage and shutdown**. The exporters run on background threads with
  short timeouts (at most 2 s, a third of ``otel_shutdown_timeout_s``); the span queue is
  bounded. Failed exports, lost spans and queue overflows are counted
  (:meth:`OTelSink.dropped`, ``karn.telemetry.*`` metrics). ``flush`` never waits on an
  endpoint that has not been answering. ``close`` returns within ``otel_shutdown_timeout_s``
  whatever the network does; when the last export failed, it fails the final exports at once
  (counted) instead of retrying into that bound.
* ``sink.py``: :class:`OTelSink` itself, the sink protocol over those parts.

This package is the only place in Karn that imports opentelemetry.
"""

from __future__ import annotations

from karn_otel.sinks.otel.lifecycle import MAX_EXPORT_TIMEOUT_S, MAX_SPAN_QUEUE
from karn_otel.sinks.otel.resource import build_resource, resolve_otlp
from karn_otel.sinks.otel.sink import OTelSink
from karn_otel.sinks.otel.traces import (
    MAX_BATCH_EVENTS,
    MAX_EPOCH_EVENTS,
    trace_id_for_episode,
)

__all__ = [
    "MAX_BATCH_EVENTS",
    "MAX_EPOCH_EVENTS",
    "MAX_EXPORT_TIMEOUT_S",
    "MAX_SPAN_QUEUE",
    "OTelSink",
    "build_resource",
    "resolve_otlp",
    "trace_id_for_episode",
]
