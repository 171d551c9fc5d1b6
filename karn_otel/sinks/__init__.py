"""Output backends. A sink is anything with ``handle(event)``, ``flush()`` and ``close()``.

``handle`` runs on the emitting (training) thread under the collector's lock, so it must be
cheap and must not block: enqueue and return. Slow work (disk, network, rendering) belongs
on the sink's own thread. A sink may expose ``dropped() -> dict[str, int]`` so the
collector can report what it lost.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from karn_otel.contracts import TelemetryEvent


@runtime_checkable
class Sink(Protocol):
    def handle(self, event: TelemetryEvent) -> None: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self) -> None: ...


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
