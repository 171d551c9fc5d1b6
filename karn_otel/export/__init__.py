"""Exporters: the run log into the tools researchers already use, after the run.

``karn export RUN_OR_EXPERIMENT_DIR --to FORMAT`` reads run logs (never the live process) and
writes one format. Each format is one module with one function::

    export(runs: Sequence[RunRecord], out: Path, options: ExportOptions) -> ExportReport

* ``parquet``     — one Parquet file per table per run (DuckDB, Polars, pandas);
* ``openmetrics`` — an OpenMetrics text stream, every epoch at its own time, for
  ``promtool tsdb create-blocks-from openmetrics`` (backfill into Prometheus);
* ``otlp``        — the run's traces and metric points replayed into an OTLP endpoint (the
  Collector after an outage), with the live run's ids;
* ``wandb``       — an offline W&B run per Karn run, for ``wandb sync`` (optional extra).

docs/export.md says which tool to use for what, and lists every column.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from karn_otel.sinks.runlog import EVENTS_FILE, RunDirError, RunRecord, read_run

__all__ = ["FORMATS", "ExportError", "ExportOptions", "ExportReport", "export", "run_dirs_in", "safe_name"]

FORMATS: tuple[str, ...] = ("parquet", "openmetrics", "otlp", "wandb")


class ExportError(Exception):
    """An export cannot run (a missing optional package, an unreachable endpoint). One line for the user."""


@dataclass(frozen=True)
class ExportOptions:
    progress: Callable[[str], None] = lambda _msg: None


@dataclass
class ExportReport:
    """What an exporter wrote: files and how many rows/samples went into each."""

    written: dict[Path, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.written.values())


def run_dirs_in(path: Path | str) -> list[Path]:
    """The run directories under ``path``: itself when it is one, else its run-dir children
    (an experiment directory). Raises :class:`RunDirError` with a one-line message."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: no such directory")
    if (path / EVENTS_FILE).is_file():
        return [path]
    runs = sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink() and (p / EVENTS_FILE).is_file())
    if not runs:
        raise RunDirError(
            f"{path}: neither a run directory nor an experiment directory (no {EVENTS_FILE} in it or below)"
        )
    return runs


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(run_id: str) -> str:
    """A file name for a run id read from an untrusted run dir: never a path, never hidden."""
    name = _UNSAFE.sub("_", run_id)[:128].lstrip(".")
    return name or "run"


def export(
    fmt: str, source: Path | str, out: Path | str | None, options: ExportOptions | None = None, **kwargs: object
) -> ExportReport:
    """Export every run under ``source`` to ``out`` in format ``fmt``."""
    options = options or ExportOptions()
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    runs: Sequence[RunRecord] = [read_run(p) for p in run_dirs_in(source)]
    options.progress(f"read {len(runs)} run(s), {sum(len(r.events) for r in runs):,} events")
    if fmt == "parquet":
        from karn_otel.export import parquet

        return parquet.export(runs, Path(out), options)
    if fmt == "otlp":
        from karn_otel.export import otlp

        return otlp.export(runs, None, options, otlp.OtlpTarget(**kwargs))  # type: ignore[arg-type]
    assert out is not None, "this format writes files: out is required"
    if fmt == "wandb":
        from karn_otel.export import wandb

        return wandb.export(runs, Path(out), options)
    from karn_otel.export import openmetrics

    return openmetrics.export(runs, Path(out), options)
