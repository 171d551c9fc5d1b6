"""The composition root: builds what a KarnConfig asks for and wires it into a pipeline.

Processors (health monitor, dense triggers), the analytics the sinks display, and the sinks
(run log, console, OTel) are built here and nowhere else; each gets the pipeline's read-only
view, never the collector. Order matters: the health monitor runs before the trigger engine,
which reuses its evaluation of the shared checks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from karn_otel.config import KarnConfig
from karn_otel.pipeline import Sink

if TYPE_CHECKING:
    from karn_otel.collector import KarnCollector


def build_pipeline(
    config: KarnConfig, collector: KarnCollector, *, sinks: Iterable[Sink] | None = None, processors: bool = True
) -> None:
    """Attach processors, analytics and sinks to ``collector``'s pipeline."""
    pipeline = collector.pipeline
    pipeline.shutdown_timeout_s = config.shutdown_timeout_s
    if processors:
        from karn_otel.health import HealthMonitor
        from karn_otel.triggers import DenseTriggerEngine

        health = HealthMonitor(head_sizes=config.policy_head_sizes, strict=config.strict)
        triggers = DenseTriggerEngine(
            config.dense_trigger,
            mode=config.mode,
            head_sizes=config.policy_head_sizes,
            strict=config.strict,
            health=health,
        )
        pipeline.health = health
        pipeline.mode_owner = triggers
        pipeline.add_processor(health)
        pipeline.add_processor(triggers)
    from karn_otel.analytics import MorphogeneticAnalytics, ReferenceCurve

    curve = ReferenceCurve.load(config.reference_curve) if config.reference_curve else None
    pipeline.analytics = MorphogeneticAnalytics(
        collector.store, health=pipeline.view if pipeline.health is not None else None, reference_curve=curve
    )
    for sink in default_sinks(config, collector) if sinks is None else sinks:
        pipeline.add_sink(sink)


def default_sinks(config: KarnConfig, collector: KarnCollector) -> list[Sink]:
    sinks: list[Sink] = []
    view = collector.view
    if config.out_dir is not None:
        from karn_otel.sinks.runlog import RunLogSink

        # Rank 0 owns the run directory; rank k > 0 logs under <run dir>/ranks/rank<k>/.
        run_dir = Path(config.out_dir) / collector.run_id
        if collector.rank > 0:
            run_dir = run_dir / "ranks" / f"rank{collector.rank}"
        sinks.append(
            RunLogSink(
                config.out_dir,
                collector.run_id,
                max_queue=config.runlog_queue_size,
                run_dir=run_dir,
                flush_interval_s=config.runlog_flush_interval_s,
                backpressure=config.runlog_backpressure,
                block_timeout_s=config.runlog_block_timeout_s,
                shutdown_timeout_s=config.shutdown_timeout_s,
                file_mode=config.file_mode,
                dir_mode=config.dir_mode,
            )
        )
    if config.console != "off":
        from karn_otel.sinks.console import ConsoleSink

        live = {"auto": None, "live": True, "plain": False}[config.console]
        sinks.append(ConsoleSink(view, live=live, refresh_hz=config.console_refresh_hz))
    if config.prometheus_port is not None or config.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from karn_otel.sinks.otel import OTelSink

        sinks.append(OTelSink(config, view))
    return sinks
