"""Output backends. A sink is anything with ``handle(event)``, ``flush()`` and ``close()``
(the :class:`~karn_otel.pipeline.Sink` protocol, defined beside its consumer, the pipeline).

``handle`` runs on the emitting (training) thread under the collector's lock, so it must be
cheap and must not block: enqueue and return. Slow work (disk, network, rendering) belongs
on the sink's own thread. A sink may expose ``dropped() -> dict[str, int]`` and
``queue_depth() -> int``; the pipeline sums them into Karn's accounting. Sinks read state
through the read-only :class:`~karn_otel.pipeline.StoreView` they are built with.
"""

from __future__ import annotations

from karn_otel.contracts import TelemetryEvent
from karn_otel.pipeline import Sink


class MemorySink:
    """Keeps every event in a list. For tests and for `karn replay`."""

    def __init__(self) -> None:
        self.events: list[TelemetryEvent] = []

    def handle(self, event: TelemetryEvent) -> None:
        self.events.append(event)

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass


__all__ = ["Sink", "MemorySink"]
