"""The embedded Prometheus pull endpoint: ``/metrics`` served from the training process.

Each sink serves its own private ``CollectorRegistry`` (never the global one, so two sinks
cannot collide) on ``prometheus_host:prometheus_port + LOCAL_RANK``, so every rank of a
multi-process job on one host gets its own port; ``prometheus_port = 0`` takes any free one.
The ``target_info`` series carries the resource; scope labels (``otel_scope_*``) are off.

Finished is not missing: at shutdown the endpoint stays up until Prometheus has scraped it
once more (so the last values and ``karn_episode_complete 1`` are stored), at most
``final_scrape_s`` (default :data:`DEFAULT_FINAL_SCRAPE_S`, two 15 s scrape intervals; 0
disables). An endpoint nobody has scraped is stopped at once. What it cannot show: values
between two scrapes (a scrape reads the latest epoch only; the OTLP path keeps every epoch).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry, start_http_server

DEFAULT_FINAL_SCRAPE_S = 30.0
"""How long a finished process keeps /metrics up for Prometheus' final scrape: two 15 s intervals."""


class _ScrapeCounter:
    """A collector that yields nothing and counts the scrapes of its registry."""

    def __init__(self) -> None:
        self.scrapes = 0
        self.changed = threading.Condition()

    def collect(self) -> Iterator[Any]:
        with self.changed:
            self.scrapes += 1
            self.changed.notify_all()
        return iter(())


class PrometheusEndpoint:
    """A running ``/metrics`` server and the metric reader that feeds it.

    Raises ``OSError`` (with advice) when the port cannot be bound.
    """

    def __init__(self, host: str, base_port: int) -> None:
        registry = CollectorRegistry()  # never the global REGISTRY: two sinks must not collide
        # target_info keeps the resource; scope labels (otel_scope_*) would only add noise.
        self.reader = PrometheusMetricReader(scope_info_enabled=False, registry=registry)
        self._scrapes = _ScrapeCounter()
        registry.register(self._scrapes)  # type: ignore[arg-type]
        self._scrapes.scrapes = 0  # register() collects once to learn the names
        port = base_port + int(os.environ.get("LOCAL_RANK", "0")) if base_port else 0
        try:
            self._server: Any
            self._server, _ = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise OSError(
                f"Karn could not serve Prometheus metrics on {host}:{port} ({exc}); "
                "choose another prometheus_port (each rank uses base + LOCAL_RANK), or 0 for any free port"
            ) from exc
        self.port: int = self._server.server_port

    @property
    def scrapes(self) -> int:
        """How many times /metrics was read."""
        return self._scrapes.scrapes

    def await_final_scrape(
        self, timeout_s: float, on_wait: Callable[[float], None] | None = None, quiet_s: float = 1.0
    ) -> bool:
        """Wait (at most ``timeout_s``) for one more scrape; at once when nobody ever scraped.

        ``on_wait(seconds_left)`` is called once if no scrape has come after ``quiet_s`` (to
        say why the process has not exited yet). Returns True when a scrape came (or none was
        expected).
        """
        seen = self.scrapes
        if seen == 0 or timeout_s <= 0:
            return seen == 0
        first = min(quiet_s, timeout_s)
        if self._scraped_since(seen, first) or first >= timeout_s:
            return self.scrapes != seen
        if on_wait is not None:
            on_wait(timeout_s - first)
        return self._scraped_since(seen, timeout_s - first)

    def _scraped_since(self, seen: int, timeout_s: float) -> bool:
        c = self._scrapes
        with c.changed:
            return c.changed.wait_for(lambda: c.scrapes != seen, timeout_s)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


__all__ = ["DEFAULT_FINAL_SCRAPE_S", "PrometheusEndpoint"]
