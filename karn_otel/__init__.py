"""Karn: research telemetry for morphogenetic training, exported through OpenTelemetry.

Instrumented code calls :func:`emit` with a contract from :mod:`karn_otel.contracts`;
with nothing configured that is a near-free no-op. :func:`configure` installs a collector
that validates, stamps and routes events to the store and the sinks (run log, console,
OpenTelemetry).
"""

from karn_otel._version import __version__
from karn_otel.api import Run, init
from karn_otel.collector import (
    KarnCollector,
    TelemetryValidationError,
    configure,
    emit,
    get_collector,
    shutdown,
)
from karn_otel.config import CounterfactualConfig, DenseTraceTrigger, KarnConfig

__all__ = [
    "CounterfactualConfig",
    "DenseTraceTrigger",
    "KarnCollector",
    "KarnConfig",
    "Run",
    "TelemetryValidationError",
    "configure",
    "emit",
    "get_collector",
    "init",
    "shutdown",
    "__version__",
]
