"""The embedded Prometheus pull endpoint: ``/metrics`` served from the training process.

Each sink serves its own private ``CollectorRegistry`` (never the global one, so two sinks
cannot collide) on ``prometheus_host:prometheus_port + LOCAL_RANK``, so every rank of a
multi-process job on one host gets its own port; ``prometheus_port = 0`` takes any free one.
The ``target_info`` series carries the resource; scope labels (``otel_scope_*``) are off.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry, start_http_server


class PrometheusEndpoint:
    """A running ``/metrics`` server and the metric reader that feeds it.

    Raises ``OSError`` (with advice) when the port cannot be bound.
    """

    def __init__(self, host: str, base_port: int) -> None:
        registry = CollectorRegistry()  # never the global REGISTRY: two sinks must not collide
        # target_info keeps the resource; scope labels (otel_scope_*) would only add noise.
        self.reader = PrometheusMetricReader(scope_info_enabled=False, registry=registry)
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

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


__all__ = ["PrometheusEndpoint"]
