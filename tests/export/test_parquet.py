"""Parquet export read back with DuckDB: values equal the run log's, NaN and ±inf included."""

from __future__ import annotations

import math

import duckdb
import pyarrow.parquet as pq
import pytest

from karn_otel.contracts import CounterfactualMatrix, HostSnapshot, PPOUpdateStats, SlotSnapshot
from karn_otel.export import export, run_dirs_in
from karn_otel.export.tables import table_specs
from karn_otel.sinks.runlog import read_run


def q(sql: str) -> list[tuple]:
    return duckdb.connect().execute(sql).fetchall()


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return a == b


def test_host_snapshots_round_trip_through_duckdb(experiment_dir, tmp_path):
    export("parquet", experiment_dir, tmp_path)
    got = q(
        f"SELECT run_id, epoch, train_loss, val_accuracy, host_grad_norm, total_params "
        f"FROM '{tmp_path}/host_snapshots/*.parquet' ORDER BY run_id, timestamp"
    )
    want = []
    for run_dir in run_dirs_in(experiment_dir):
        run = read_run(run_dir)
        for ev in run.events:
            p = ev.payload
            if isinstance(p, HostSnapshot):
                want.append((run.run_id, ev.epoch, p.train_loss, p.val_accuracy, p.host_grad_norm, p.total_params))
    want.sort(key=lambda r: r[0])  # stable: events are already in time order within a run
    assert len(want) == 10
    assert got == want


def test_final_accuracy_per_run_across_an_experiment(experiment_dir, tmp_path):
    export("parquet", experiment_dir, tmp_path)
    got = dict(q(f"SELECT run_id, final_val_accuracy FROM '{tmp_path}/episode_summary/*.parquet' ORDER BY run_id"))
    want = {}
    for run_dir in run_dirs_in(experiment_dir):
        run = read_run(run_dir)
        want[run.run_id] = [
            ev.payload.final_val_accuracy for ev in run.events if ev.event_type.value == "episode_ended"
        ][-1]
    assert got == want and len(got) == 2


def test_nested_and_mapped_fields(experiment_dir, tmp_path):
    export("parquet", experiment_dir, tmp_path)
    run = read_run(run_dirs_in(experiment_dir)[0])
    name = run.run_id
    updates = [ev.payload for ev in run.events if isinstance(ev.payload, PPOUpdateStats)]
    assert updates, "the PPO run made no update"
    rows = q(
        f"SELECT entropy, advantage_stats_mean, ratio_stats_per_head_clip_rates FROM "
        f"'{tmp_path}/ppo_updates/{name}.parquet' ORDER BY update_index"
    )
    for (entropy, adv_mean, clip), u in zip(rows, updates, strict=True):
        assert entropy == u.entropy
        assert same(adv_mean, u.advantage_stats.mean)
        assert clip == u.ratio_stats.per_head_clip_rates
    slots = [(ev.epoch, ev.payload) for ev in run.events if isinstance(ev.payload, SlotSnapshot)]
    got = q(
        f"SELECT epoch, slot_id, stage, counterfactual_contribution FROM '{tmp_path}/slot_snapshots/{name}.parquet' ORDER BY timestamp"
    )
    assert [(e, s.slot_id, s.stage.value) for e, s in slots] == [r[:3] for r in got]
    assert all(same(r[3], s.counterfactual_contribution) for r, (_, s) in zip(got, slots))
    matrices = [ev.payload for ev in run.events if isinstance(ev.payload, CounterfactualMatrix)]
    n_configs = q(f"SELECT count(*) FROM '{tmp_path}/counterfactual_results/{name}.parquet'")[0][0]
    assert n_configs == sum(len(m.configs) for m in matrices)


def test_nan_and_infinities_survive(nonfinite_run, tmp_path):
    export("parquet", nonfinite_run, tmp_path)
    host = q(
        f"SELECT epoch, train_loss, seed_grad_norms['early'] FROM '{tmp_path}/host_snapshots/nonfinite-run.parquet' ORDER BY epoch"
    )
    assert host[0][1] == 2.0 and math.isnan(host[1][1]) and host[2][1] == math.inf
    assert all(math.isnan(r[2]) for r in host)
    slot = q(
        f"SELECT counterfactual_contribution, improvement_this_epoch, total_improvement "
        f"FROM '{tmp_path}/slot_snapshots/nonfinite-run.parquet' ORDER BY epoch"
    )
    assert math.isnan(slot[0][0]) and slot[2][1] == -math.inf and slot[0][2] is None  # None stays NULL
    (final_loss,) = q(f"SELECT final_val_loss FROM '{tmp_path}/episode_summary/nonfinite-run.parquet'")[0]
    assert final_loss == math.inf


def test_columns_are_typed_and_carry_units(experiment_dir, tmp_path):
    export("parquet", experiment_dir, tmp_path)
    name = read_run(run_dirs_in(experiment_dir)[0]).run_id
    schema = pq.read_schema(tmp_path / "host_snapshots" / f"{name}.parquet")
    assert str(schema.field("val_accuracy").type) == "double"
    assert str(schema.field("epoch").type) == "int64"
    assert str(schema.field("timestamp").type) == "timestamp[us, tz=UTC]"
    assert schema.field("total_params").metadata[b"unit"] == b"{parameter}"
    assert b"Validation accuracy" in schema.field("val_accuracy").metadata[b"description"]


@pytest.mark.parametrize("table", sorted(table_specs()))
def test_docs_list_every_table(table):
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "export.md").read_text()
    assert f"`{table}`" in doc


def test_a_duckdb_query_across_the_experiment_matches_karn_compare(experiment_dir, tmp_path):
    """The same number two ways: DuckDB over the Parquet tables, and `karn compare --json`."""
    import json
    import subprocess
    import sys

    export("parquet", experiment_dir, tmp_path)
    (mean_delta,) = q(
        f"SELECT avg(final_val_accuracy - host_only_accuracy) FROM "
        f"(SELECT run_id, last(final_val_accuracy ORDER BY timestamp) AS final_val_accuracy, "
        f"last(host_only_accuracy ORDER BY timestamp) AS host_only_accuracy "
        f"FROM '{tmp_path}/episode_summary/*.parquet' GROUP BY run_id)"
    )[0]
    p = subprocess.run(
        [sys.executable, "-m", "karn_otel.cli", "compare", str(experiment_dir), "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = {r["quantity"]: r for r in json.loads(p.stdout)["results"]}
    removal = rows["accuracy delta vs host-only removal (not causal)"]
    assert removal["stats"]["n"] == 2
    assert removal["stats"]["mean"] == pytest.approx(mean_delta, abs=1e-12)
