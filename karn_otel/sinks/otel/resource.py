"""Who is exporting and where to: the OTel resource, the OTLP endpoint, the OTLP exporters.

* :func:`build_resource` (fixed when the sink is built, at ``configure()``): ``service.name``
  (config, else ``OTEL_SERVICE_NAME``, else ``karn``), ``service.version`` (Karn's), ``service.instance.id`` =
  ``<run_id>-rank<k>``, ``karn.run_id``, ``karn.rank``, ``karn.world_size``, ``host.name``,
  merged with ``OTEL_RESOURCE_ATTRIBUTES`` (Karn's own keys win). The episode id is *not* a
  resource attribute: the resource is fixed before the first episode starts and a run may
  hold many episodes (every span carries ``karn.episode_id`` instead).
* :func:`resolve_otlp`: the protocol and base endpoint, from the config or the standard
  ``OTEL_EXPORTER_OTLP_*`` variables.
* :func:`otlp_span_exporter`, :func:`otlp_metric_exporter`: the OTLP exporters, gRPC or
  HTTP, with Karn's short timeout and no self-instrumentation.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter

from karn_otel import __version__
from karn_otel.config import KarnConfig
from karn_otel.distributed import placement

PROTOCOLS = ("grpc", "http/protobuf")


def build_resource(config: KarnConfig, run_id: str, rank: int, world_size: int) -> Resource:
    """The process's OTel resource: Karn's identity merged over OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME."""
    attrs: dict[str, Any] = {
        "service.instance.id": f"{run_id}-rank{rank}",
        "karn.run_id": run_id,
        "karn.rank": rank,
        "karn.world_size": world_size,
        "host.name": socket.gethostname(),
        "service.version": __version__,
    }
    if config.service_name:
        attrs["service.name"] = config.service_name
    # Where the rank runs (SLURM, Kubernetes, torchrun, the stated dp/tp/pp layout); Karn's own keys win.
    attrs = {**placement.detect(), **attrs}
    resource = Resource.create(attrs)
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "karn"}))
    return resource


def resolve_otlp(config: KarnConfig) -> tuple[str | None, str | None]:
    """(protocol, endpoint) for OTLP, or (None, None) when no endpoint is configured anywhere.

    The endpoint is ``config.otlp_endpoint`` (a base URL, like OTEL_EXPORTER_OTLP_ENDPOINT;
    without a scheme it is taken as ``http://``), else None so that the exporters read the
    standard OTEL_EXPORTER_OTLP_* variables themselves (signal-specific ones and headers too).
    Raises ``ValueError`` for an unsupported protocol.
    """
    env_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not config.otlp_endpoint and not env_endpoint:
        return None, None
    protocol = config.otlp_protocol or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol not in PROTOCOLS:
        raise ValueError(f"OTLP protocol {protocol!r} is not supported; use one of {PROTOCOLS}")
    endpoint = config.otlp_endpoint
    if endpoint and "://" not in endpoint:
        endpoint = "http://" + endpoint  # plaintext, as OTLP collectors listen by default
    return protocol, endpoint.rstrip("/") if endpoint else None


def otlp_span_exporter(protocol: str | None, endpoint: str | None, timeout_s: float) -> SpanExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter(endpoint=endpoint, timeout=timeout_s, meter_provider=NoOpMeterProvider())
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    url = f"{endpoint}/v1/traces" if endpoint else None
    return HttpSpanExporter(endpoint=url, timeout=timeout_s, meter_provider=NoOpMeterProvider())


def otlp_metric_exporter(protocol: str | None, endpoint: str | None, timeout_s: float) -> MetricExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        return GrpcMetricExporter(endpoint=endpoint, timeout=timeout_s, meter_provider=NoOpMeterProvider())
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )

    url = f"{endpoint}/v1/metrics" if endpoint else None
    return HttpMetricExporter(endpoint=url, timeout=timeout_s, meter_provider=NoOpMeterProvider())


__all__ = ["PROTOCOLS", "build_resource", "otlp_metric_exporter", "otlp_span_exporter", "resolve_otlp"]
