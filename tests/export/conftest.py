"""Run directories for the exporter tests: real `karn run` output, and a synthetic run with
non-finite values (a real run rarely has one) written through the real collector and run log."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from karn_otel import collector as kc
from karn_otel.config import KarnConfig
from karn_otel.contracts import (
    EpisodeSummary,
    HostSnapshot,
    SeedStage,
    SlotSnapshot,
)
from tests.conftest import make_context


@pytest.fixture(scope="session")
def experiment_dir(tmp_path_factory) -> Path:
    """Two 5-epoch `karn run`s (seeds 0 and 1, PPO controller) under one parent: an experiment."""
    exp = tmp_path_factory.mktemp("experiment")
    for seed in (0, 1):
        subprocess.run(
            [sys.executable, "-m", "karn_otel.cli", "run", "--epochs", "5", "--seed", str(seed), "--out", str(exp),
             "--no-live", "--controller", "ppo", "--episodes", "1"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    runs = sorted(p for p in exp.iterdir() if p.is_dir())
    assert len(runs) == 2, runs
    return exp


@pytest.fixture(scope="session")
def nonfinite_run(tmp_path_factory) -> Path:
    """A run whose records hold NaN, +inf and -inf in float fields and maps."""
    out = tmp_path_factory.mktemp("nonfinite")
    c = kc.configure(KarnConfig(out_dir=out, console="off", strict=True, run_id="nonfinite-run"), processors=False)
    c.emit(make_context(slots=("early",)))
    for epoch, loss in enumerate([2.0, math.nan, math.inf], start=1):
        c.emit(
            SlotSnapshot("early", SeedStage.TRAINING, epoch, "s1", "conv", 10, 0.5, math.nan if epoch == 1 else 0.01,
                         None, -math.inf if epoch == 3 else 0.0, None, None, None),
            epoch=epoch,
        )  # fmt: skip
        c.emit(
            HostSnapshot(epoch, loss, 0.5, 1.5, 0.25 * epoch, 1000, 10, 1010, 0, 1.0, {"early": math.nan}, None),
            epoch=epoch,
        )
    c.emit(EpisodeSummary(3, math.inf, 0.75, None, 1000, 1010, 0, 1.0), epoch=3)
    kc.shutdown()
    return out / "nonfinite-run"
