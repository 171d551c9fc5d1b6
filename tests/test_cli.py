"""`karn run` / `inspect` / `replay` as a user runs them: real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KARN = [sys.executable, "-m", "karn_otel.cli"]


def karn(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([*KARN, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    r = karn("run", "--epochs", "3", "--no-live", "--out", str(out))
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("[karn] epoch")]
    assert len(lines) == 3, r.stdout
    assert "Traceback" not in r.stderr
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    return d


def test_run_writes_a_complete_run_dir(run_dir):
    assert (run_dir / "run.json").is_file()
    events = [json.loads(l) for l in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[0]["event_type"] == "episode_started"
    assert events[-1]["event_type"] == "episode_ended"
    assert sum(e["event_type"] == "host_snapshot" for e in events) == 3
    assert list((run_dir / "checkpoints").glob("*-initial.pt"))


def test_inspect(run_dir):
    r = karn("inspect", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "host cnn_3block" in r.stdout
    assert "last epoch 3:" in r.stdout
    assert "host_snapshot 3" in r.stdout
    assert "rejected in this episode: none" in r.stdout
    assert "lines skipped: 0" in r.stdout


def test_replay_is_identical(run_dir):
    r = karn("replay", str(run_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "identical:" in r.stdout and "initial checkpoint identical" in r.stdout


def test_replay_names_the_first_tampered_value(run_dir, tmp_path):
    import shutil

    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    path = copy / "events.jsonl"
    lines = path.read_text().splitlines()
    i = next(i for i, l in enumerate(lines) if '"host_snapshot"' in l and '"epoch":2' in l)
    ev = json.loads(lines[i])
    ev["payload"]["val_loss"] += 1e-9
    lines[i] = json.dumps(ev, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    from karn_otel.sinks.runlog_format import reseal

    reseal(path)  # a hand edit fails its block's checksum; re-seal it so the edit is a value difference
    r = karn("replay", str(copy))
    assert r.returncode == 1
    assert "DIFFERENT" in r.stdout and "host_snapshot, epoch 2" in r.stdout and "payload.val_loss" in r.stdout


@pytest.mark.parametrize("cmd", ["inspect", "replay"])
def test_missing_or_corrupt_run_dir_is_one_line(cmd, tmp_path):
    r = karn(cmd, str(tmp_path / "nope"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "no such run directory" in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "events.jsonl").write_text("not json at all\n")
    r = karn(cmd, str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no readable events" in r.stderr


def test_torn_run_dir_still_inspects(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "torn"
    shutil.copytree(run_dir, copy)
    with open(copy / "events.jsonl", "a") as f:
        f.write('{"event_type":"host_snap')
    r = karn("inspect", str(copy))
    assert r.returncode == 0
    assert "lines skipped: 1" in r.stdout and "torn last line" in r.stdout


def test_bad_arguments_fail_cleanly(tmp_path):
    r = karn("run", "--epochs", "0", "--out", str(tmp_path))
    assert r.returncode == 2 and "epochs must be >= 1" in r.stderr and "Traceback" not in r.stderr


def test_attribution_split_reaches_the_run(tmp_path):
    r = karn("run", "--epochs", "1", "--attribution-split", "1.5", "--out", str(tmp_path))
    assert r.returncode == 2 and "attribution_split must be in [0, 1)" in r.stderr and "Traceback" not in r.stderr
    r = karn("run", "--epochs", "1", "--attribution-split", "0.5", "--no-live", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    (d,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert "attribution_split=0.5" in karn("inspect", str(d)).stdout


def test_calibrate_writes_a_curve_that_run_uses(tmp_path):
    r = karn("calibrate", "--epochs", "2", "--multipliers", "0.5,1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "reference_curve.json").read_text())
    assert len(data["points"]) == 2 and data["points"][0][0] < data["points"][1][0]
    # each size's accuracy after every epoch, the last one the point's own
    assert [len(c) for c in data["by_epoch"]] == [2, 2]
    assert [c[-1] for c in data["by_epoch"]] == [a for _, a in data["points"]]
    bad = karn("calibrate", "--multipliers", "x", "--out", str(tmp_path))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_injected_loss_spike_raises_an_alert_and_a_dense_window(tmp_path):
    r = karn("run", "--epochs", "12", "--no-live", "--inject-loss-spike", "9", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "[karn] ALERT warning loss_spike" in r.stdout
    (d,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    events = [json.loads(l) for l in (d / "events.jsonl").read_text().splitlines()]
    modes = [(e["epoch"], e["payload"]["mode"]) for e in events if e["event_type"] == "mode_change"]
    assert (9, "research") in modes and any(m == "standard" and ep > 9 for ep, m in modes), modes
    traces = [e["payload"] for e in events if e["event_type"] == "dense_trace"]
    assert any(t["window_start_epoch"] <= 9 <= t["window_end_epoch"] for t in traces)
    alerts = [e["payload"]["check"] for e in events if e["event_type"] == "health_alert"]
    assert "loss_spike" in alerts


def test_inspect_shows_each_episode_its_own_rejections(tmp_path):
    """Karn's accounting record at each episode end holds the run's totals so far; inspect
    shows each episode its own share: a rejection in episode 1 is not shown again under 2."""
    import karn_otel
    from karn_otel.cli import _inspect_lines
    from karn_otel.config import KarnConfig
    from karn_otel.contracts import EpisodeSummary, Scalars
    from karn_otel.sinks.runlog import read_run
    from tests.conftest import make_context

    c = karn_otel.configure(KarnConfig(out_dir=tmp_path, console="off"))
    for k, bad in ((1, 1), (2, 0), (3, 2)):
        c.emit(make_context(episode_id=f"ep-{k}"))
        for _ in range(bad):
            assert not c.emit(Scalars(0, {"x": "not a number"}))  # type: ignore[dict-item]
        c.emit(EpisodeSummary(1, 1.0, 0.5, 0.4, 100, 100, 0, 1.0))
    karn_otel.shutdown()
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    shown = [ln for ln in _inspect_lines(read_run(run_dir)) if "rejected in this episode" in ln]
    assert [ln.split(";")[0].strip() for ln in shown] == [
        "rejected in this episode: type_error 1",
        "rejected in this episode: none",
        "rejected in this episode: type_error 2",
    ], shown


def test_replay_of_a_multi_episode_run_compares_the_retained_checkpoint(tmp_path):
    """keep_last retains only the last episode's initial checkpoint; replay must compare that
    one (it paired the list by position and said none was retained)."""
    r = karn("run", "--controller", "ppo", "--episodes", "2", "--epochs", "2", "--no-live", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    (d,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(list((d / "checkpoints").glob("ep*-initial.pt"))) == 1
    r = karn("replay", str(d))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "initial checkpoint identical (1 retained)" in r.stdout, r.stdout
