"""The offline W&B export, made with networking off (a fresh network namespace: loopback only,
and down), read back with an independent reader of the run file: one history row per epoch
with the run log's values."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from karn_otel.contracts import EpisodeSummary, HostSnapshot, Scalars
from karn_otel.export import run_dirs_in
from karn_otel.sinks.runlog import read_run
from tests.export import wandb_log

pytest.importorskip("wandb", reason="the W&B export is an optional extra: pip install 'karn-otel[wandb]'")


def _no_network_cmd() -> list[str]:
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None or subprocess.run([unshare, "--net", "true"]).returncode != 0:
        pytest.skip("needs root and unshare(1) to run the export with networking off")
    return [unshare, "--net"]


@pytest.fixture(scope="module")
def exported(experiment_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wandb")
    cmd = [*_no_network_cmd(), sys.executable, "-m", "karn_otel.cli", "export", str(experiment_dir), "--to", "wandb",
           "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "wandb sync" in p.stdout
    return out


def test_one_offline_run_per_karn_run_with_every_epoch(exported, experiment_dir):
    for run_dir in run_dirs_in(experiment_dir):
        rec = read_run(run_dir)
        files = list((exported / "wandb").glob(f"offline-run-*-{rec.run_id}/run-{rec.run_id}.wandb"))
        assert len(files) == 1, files
        rows = [r for r in wandb_log.history(files[0]) if "host/val_accuracy" in r]
        snaps = [e.payload for e in rec.events if isinstance(e.payload, HostSnapshot)]
        assert [r["epoch"] for r in rows] == [s.epoch for s in snaps]
        assert [r["host/val_accuracy"] for r in rows] == [s.val_accuracy for s in snaps]
        assert [r["host/train_loss"] for r in rows] == [s.train_loss for s in snaps]
        assert [r["_step"] for r in rows] == list(range(1, len(snaps) + 1))
        cfg = wandb_log.config(files[0])
        assert cfg["controller"] == "ppo" and cfg["karn/git_commit"]
        summary = wandb_log.summary(files[0])
        final = [e.payload for e in rec.events if isinstance(e.payload, EpisodeSummary)][-1]
        assert summary["final_val_accuracy"] == final.final_val_accuracy
        assert any(k.startswith("figures/") for k in summary)  # the report's figures went along


def test_control_accuracy_and_redaction(tmp_path):
    """A morph run of an experiment carries its twin's accuracy; secret-looking
    hyperparameters never reach W&B."""
    from karn_otel import collector as kc
    from karn_otel.config import KarnConfig
    from karn_otel.contracts import EpisodeContext
    from karn_otel.export import export
    from tests.conftest import make_context

    c = kc.configure(KarnConfig(out_dir=tmp_path / "runs", console="off", run_id="wb-run"), processors=False)
    ctx = make_context(slots=("early",))
    c.emit(EpisodeContext(**{**ctx.__dict__, "hyperparameters": {"lr": 0.1, "api_key": "sk-live-123"}}))
    c.emit(Scalars(1, {"control_val_accuracy": 0.5}), epoch=1)
    c.emit(HostSnapshot(1, 2.0, 0.5, 1.5, 0.6, 1000, 0, 1000, 0, 1.0, {}, None), epoch=1)
    kc.shutdown()
    _no_network_cmd()
    export("wandb", tmp_path / "runs" / "wb-run", tmp_path / "out")
    (f,) = (tmp_path / "out" / "wandb").glob("offline-run-*/run-wb-run.wandb")
    row = wandb_log.history(f)[0]
    assert row["scalars/control_val_accuracy"] == 0.5 and row["host/val_accuracy"] == 0.6
    cfg = wandb_log.config(f)
    assert cfg["lr"] == 0.1 and cfg["api_key"] == "[redacted]"
    assert b"sk-live-123" not in f.read_bytes()
