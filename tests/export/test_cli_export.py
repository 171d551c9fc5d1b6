"""`karn export` as a user runs it: output, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
import sys


def karn(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "karn_otel.cli", *args], capture_output=True, text=True, timeout=120)


def test_export_parquet_and_openmetrics(experiment_dir, tmp_path):
    p = karn("export", str(experiment_dir), "--to", "parquet", "--out", str(tmp_path / "pq"))
    assert p.returncode == 0, p.stderr
    assert "wrote" in p.stdout and (tmp_path / "pq" / "host_snapshots").is_dir()
    assert len(list((tmp_path / "pq" / "host_snapshots").glob("*.parquet"))) == 2
    p = karn("export", str(experiment_dir), "--to", "openmetrics", "--out", str(tmp_path / "x.om"), "-q")
    assert p.returncode == 0 and p.stderr == ""
    assert "promtool tsdb create-blocks-from openmetrics" in p.stdout


def test_errors_are_one_line(tmp_path):
    p = karn("export", str(tmp_path / "missing"), "--to", "parquet")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("karn export: error:")
    (tmp_path / "empty").mkdir()
    p = karn("export", str(tmp_path / "empty"), "--to", "openmetrics")
    assert p.returncode == 2 and "neither a run directory nor an experiment" in p.stderr
