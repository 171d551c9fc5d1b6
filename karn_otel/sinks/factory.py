"""Builds what a KarnConfig asks for: the processors (health, dense triggers) and the sinks.

This is the composition root; kept apart so the collector imports no sink or analytics.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from karn_otel.config import KarnConfig


def default_sinks(config: KarnConfig, collector: Any) -> list[Any]:
    sinks: list[Any] = []
    if config.out_dir is not None:
        from karn_otel.sinks.runlog import RunLogSink

        # Rank 0 owns the run directory; rank k > 0 logs under <run dir>/ranks/rank<k>/.
        run_dir = Path(config.out_dir) / collector.run_id
        if collector.rank > 0:
            run_dir = run_dir / "ranks" / f"rank{collector.rank}"
        sinks.append(RunLogSink(config.out_dir, collector.run_id, max_queue=config.runlog_queue_size, run_dir=run_dir))
    if config.console != "off":
        from karn_otel.sinks.console import ConsoleSink

        from karn_otel.analytics import MorphogeneticAnalytics, ReferenceCurve

        curve = ReferenceCurve.load(config.reference_curve) if config.reference_curve else None
        analytics = MorphogeneticAnalytics(collector.store, health=collector.health, reference_curve=curve)
        live = {"auto": None, "live": True, "plain": False}[config.console]
        sinks.append(
            ConsoleSink(
                collector.store, collector.stats, live=live, refresh_hz=config.console_refresh_hz, analytics=analytics
            )
        )
    if config.prometheus_port is not None or config.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from karn_otel.sinks.otel import OTelSink

        sinks.append(OTelSink(config, collector))
    return sinks


def default_processors(config: KarnConfig, collector: Any) -> None:
    """Attach the health monitor and the dense-trace trigger engine (both processors).

    They observe accepted events and return derived ones (HealthAlert, ModeChange), which
    the collector emits; the collector keeps a reference for analytics (training_health).
    """
    from karn_otel.health import HealthMonitor
    from karn_otel.triggers import DenseTriggerEngine

    collector.health = HealthMonitor(head_sizes=config.policy_head_sizes, strict=config.strict)
    collector.triggers = DenseTriggerEngine(
        config.dense_trigger, mode=config.mode, head_sizes=config.policy_head_sizes, strict=config.strict
    )
    collector.add_processor(collector.health)
    collector.add_processor(collector.triggers)
