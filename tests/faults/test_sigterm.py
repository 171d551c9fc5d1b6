"""SIGTERM of ``karn run`` takes Ctrl-C's path: the run log is flushed and closed (final
accounting in run.json, nothing missing), exit status 143, one line saying so, no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from karn_otel.sinks.runlog import read_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, status, words", [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_signal_mid_run_flushes_and_exits_cleanly(tmp_path, sig, status, words):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "karn_otel.cli", "run", "--epochs", "400", "--no-live", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
        # A suite started in the background by a shell without job control (`.ci/run &`)
        # inherits SIGINT ignored, and so would the child (Python keeps an ignored SIGINT):
        # it then ran all its epochs and exited 0. Ctrl-C is what is under test: restore it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        for line in proc.stdout:
            if line.startswith("[karn] epoch 2"):
                break
        else:
            pytest.fail("no epoch line: " + proc.stderr.read())
        assert proc.poll() is None, "the run ended before the signal"
        t0 = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, err
    assert words in err and "Traceback" not in err
    assert took < 5.0, f"exit took {took:.1f} s"
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    closed = json.loads((run_dir / "run.json").read_text()).get("closed")
    assert closed is not None, "the run log was closed with its final accounting"
    rec = read_run(run_dir)
    acc = rec.accounting
    assert acc.source == "closed" and acc.missing == 0 and acc.emitted == len(rec.events) > 10
    assert not rec.skipped
    hosts = [e.epoch for e in rec.events if e.event_type.value == "host_snapshot"]
    assert hosts[:2] == [1, 2], "the epoch printed just before the signal is on disk"
