"""Builds the sinks a KarnConfig asks for. Kept apart so the collector imports no sink."""

from __future__ import annotations

import os
from typing import Any

from karn_otel.config import KarnConfig


def default_sinks(config: KarnConfig, collector: Any) -> list[Any]:
    sinks: list[Any] = []
    if config.out_dir is not None:
        from karn_otel.sinks.runlog import RunLogSink

        sinks.append(RunLogSink(config.out_dir, collector.run_id, max_queue=config.runlog_queue_size))
    if config.console != "off":
        from karn_otel.sinks.console import ConsoleSink

        live = {"auto": None, "live": True, "plain": False}[config.console]
        sinks.append(ConsoleSink(collector.store, collector.stats, live=live, refresh_hz=config.console_refresh_hz))
    if config.prometheus_port is not None or config.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from karn_otel.sinks.otel import OTelSink

        sinks.append(OTelSink(config, collector))
    return sinks
