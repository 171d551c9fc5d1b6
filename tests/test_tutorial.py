"""docs/tutorial.md cannot rot: every Python block runs as written, each one records a
finished run, and `karn inspect` reads the first one."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from karn_otel.contracts import TelemetryEventType as ET
from karn_otel.sinks.runlog import read_run

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "docs" / "tutorial.md"
BLOCKS = re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(), flags=re.S)


def test_the_tutorial_has_its_three_steps():
    assert len(BLOCKS) == 4
    assert 'task="classification"' in BLOCKS[0] and 'task="rl"' in BLOCKS[1]
    assert "SummaryWriter" in BLOCKS[2] and "slots=" in BLOCKS[3]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_python_block_runs_and_records_a_finished_run(index, tmp_path, monkeypatch, capsys):
    code = BLOCKS[index]
    if "import gymnasium" in code and importlib.util.find_spec("gymnasium") is None:
        pytest.skip("gymnasium is not installed (pip install karn-otel[rl])")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KARN_OUT_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("KARN_CONSOLE", "off")
    exec(compile(code, f"docs/tutorial.md block {index + 1}", "exec"), {"__name__": "__main__"})  # as written
    stdout = capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    rec = read_run(run_dir)
    types = [e.event_type for e in rec.events]
    assert types[0] is ET.EPISODE_STARTED and types[-1] is ET.EPISODE_ENDED
    (stats,) = [e.payload for e in rec.events if e.event_type is ET.TELEMETRY_STATS]
    assert stats.rejected == {} and stats.dropped == {}  # the tutorial's own calls are all valid
    if index == 0:
        hosts = [e.payload for e in rec.events if e.event_type is ET.HOST_SNAPSHOT]
        assert len(hosts) == 5 and hosts[-1].val_accuracy > 0.8  # it learns
        out = subprocess.run(
            [sys.executable, "-m", "karn_otel.cli", "inspect", str(run_dir)], capture_output=True, text=True, timeout=60
        )
        assert "checkpoint=None" in out.stdout and "finished: 5 epochs" in out.stdout
    if index == 1:
        assert [e.payload.update_index for e in rec.events if e.event_type is ET.PPO_UPDATE] == list(range(8))
        assert not [e for e in rec.events if e.event_type is ET.HOST_SNAPSHOT]
        assert float(stdout.split()[-1]) > 0
    if index == 3:
        slots = [e.payload for e in rec.events if e.event_type is ET.SLOT_SNAPSHOT]
        assert [s.stage.value for s in slots] == ["DORMANT"] * 2 + ["BLENDING"] * 4
        assert [s.alpha for s in slots] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0]
