"""Parquet: one file per table per run, typed columns with units in the column metadata.

Layout (``out`` is a directory)::

    out/host_snapshots/<run_id>.parquet
    out/slot_snapshots/<run_id>.parquet
    ...

so one glob reads a table across an experiment's runs, e.g. in DuckDB::

    SELECT run_id, max(val_accuracy) FROM 'out/host_snapshots/*.parquet' GROUP BY run_id;

Only tables with rows are written. Columns, units and descriptions come from the contracts
and the metric registry (:mod:`karn_otel.export.tables`); docs/export.md lists them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from karn_otel.export import ExportError, ExportOptions, ExportReport, safe_name
from karn_otel.export.tables import arrow_table, rows, table_specs
from karn_otel.sinks.runlog import RunRecord


def export(runs: Sequence[RunRecord], out: Path, options: ExportOptions) -> ExportReport:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ExportError("the Parquet export needs pyarrow: pip install 'karn-otel[export]'") from None

    report = ExportReport()
    specs = table_specs()
    for run in runs:
        tables = rows(run.events, specs)
        name = safe_name(run.run_id)
        for table, table_rows in tables.items():
            if not table_rows:
                continue
            path = out / table / f"{name}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(arrow_table(specs[table], table_rows), path)
            report.written[path] = len(table_rows)
        options.progress(
            f"{run.run_id}: {sum(len(r) for r in tables.values()):,} rows in {sum(1 for r in tables.values() if r)} tables"
        )
    return report
