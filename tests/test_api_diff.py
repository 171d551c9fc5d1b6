"""`karn diff` on two runs of a plain loop names the injected difference; `karn replay`
refuses a run of a plain loop at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from karn_otel.api import init

REPO = Path(__file__).resolve().parents[1]


def _karn(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "karn_otel.cli", *args], capture_output=True, text=True, timeout=60)


def _plain_run(out: Path, lr: float = 0.1, bump_epoch: int | None = None, seed: int = 3) -> Path:
    run = init(config={"lr": lr, "epochs": 4, "seed": seed}, out_dir=out, console="off")
    for e in range(4):
        val = 1.0 / (e + 1) + (1e-9 if e == bump_epoch else 0.0)
        run.log({"train_loss": 1.0 / (e + 2), "val_loss": val, "val_accuracy": 0.5 + e / 10, "lr": lr}, epoch=e)
    run.finish()
    return run.run_dir


def test_diff_names_the_first_difference(tmp_path):
    a = _plain_run(tmp_path)
    same = _karn("diff", str(a), str(_plain_run(tmp_path)))
    assert same.returncode == 0, same.stdout + same.stderr
    assert "identical:" in same.stdout and "events compared" in same.stdout

    bumped = _karn("diff", str(a), str(_plain_run(tmp_path, bump_epoch=2)))
    assert bumped.returncode == 1
    want = f"(host_snapshot, epoch 2): payload.val_loss: A {1 / 3!r}, B {1 / 3 + 1e-9!r}"
    assert "DIFFERENT: event #" in bumped.stdout and want in bumped.stdout
    # numbered as `karn replay` numbers events: the position in the log, Karn's own records left out
    from karn_otel.replay import SKIPPED_TYPES
    from karn_otel.sinks.runlog import read_run

    events = [e for e in read_run(a).events if e.event_type not in SKIPPED_TYPES]
    k = next(i for i, e in enumerate(events, 1) if e.event_type.value == "host_snapshot" and e.epoch == 2)
    assert f"DIFFERENT: event #{k} (host_snapshot, epoch 2)" in bumped.stdout, bumped.stdout
    assert f"identical: {len(events)} events compared" in same.stdout, same.stdout

    other_lr = _karn("diff", str(a), str(_plain_run(tmp_path, lr=0.2)))
    assert other_lr.returncode == 1 and "episode 1 hyperparameters.lr: A 0.1, B 0.2" in other_lr.stdout

    missing = _karn("diff", str(a), str(tmp_path / "nope"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_replay_refuses_a_plain_loop_run_at_once(tmp_path):
    run_dir = _plain_run(tmp_path)
    t0 = time.monotonic()
    out = _karn("replay", str(run_dir))
    elapsed = time.monotonic() - t0
    assert out.returncode == 2 and "was not produced by Karn's reference system" in out.stderr
    assert elapsed < 2.0 + 1.5  # < 2 s of work; the rest is the interpreter starting on a loaded machine
