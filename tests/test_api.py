"""karn_otel.init / Run.log / Run.finish on a plain loop, checked against what the loop
itself computed and against `karn inspect`'s output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from karn_otel.api import init
from karn_otel.collector import TelemetryValidationError, get_collector
from karn_otel.contracts import TelemetryEventType as ET
from karn_otel.sinks.runlog import read_run

REPO = Path(__file__).resolve().parents[1]
KARN = [sys.executable, "-m", "karn_otel.cli"]

# The pytorch/examples-style digits loop; lines marked "# +karn" are all Karn adds.
SCRIPT = """
import argparse, json, sys
import torch
import torch.nn.functional as F
import karn_otel  # +karn
from karn_otel.reference.data import load_digits_data

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=4)
p.add_argument("--lr", type=float, default=0.5)
p.add_argument("--seed", type=int, default=7)
p.add_argument("--resume", default=None)
p.add_argument("--wandb_api_key", default="sk-live-123")
p.add_argument("--no-finish", action="store_true")
args = p.parse_args()
torch.manual_seed(args.seed)
data = load_digits_data(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
opt = torch.optim.SGD(model.parameters(), lr=args.lr)
run = karn_otel.init(config=args, model=model, task="classification")  # +karn
truth = []
for epoch in range(args.epochs):
    model.train()
    for i in range(0, len(data.y_train), 128):
        loss = F.cross_entropy(model(data.x_train[i:i + 128]), data.y_train[i:i + 128])
        opt.zero_grad(); loss.backward(); opt.step()
    model.eval()
    with torch.no_grad():
        train_loss = F.cross_entropy(model(data.x_train), data.y_train)
        out = model(data.x_val)
        val_loss = F.cross_entropy(out, data.y_val)
        val_acc = (out.argmax(1) == data.y_val).float().mean()
    truth.append([train_loss.item(), val_loss.item(), val_acc.item()])
    run.log({"train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc,  # +karn
             "lr": opt.param_groups[0]["lr"], "note": "not a number"}, epoch=epoch)  # +karn
if not args.no_finish:
    run.finish()  # +karn
json.dump({"truth": truth, "run_dir": str(run.run_dir), "seed": torch.initial_seed()}, open(sys.argv[0] + ".json", "w"))
"""


def _git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True, env=env).stdout


def _run_script(tmp_path: Path, *args: str) -> dict:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "KARN_OUT_DIR": str(tmp_path / "runs"), "KARN_CONSOLE": "off", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(Path(str(script) + ".json").read_text())
    out["stderr"] = proc.stderr
    return out


def test_the_plain_loop_needs_at_most_10_added_lines():
    assert sum("# +karn" in line for line in SCRIPT.splitlines()) <= 10


def test_a_plain_digits_loop_records_a_run_inspect_reads(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "README").write_text("x\n")
    _git(tmp_path, "add", "README")
    _git(tmp_path, "commit", "-q", "-m", "init")
    commit = _git(tmp_path, "rev-parse", "HEAD").strip()
    (tmp_path / "README").write_text("changed\n")  # a dirty tree

    res = _run_script(tmp_path)
    run_dir = Path(res["run_dir"])
    assert run_dir.parent == tmp_path / "runs"  # KARN_OUT_DIR honoured

    rec = read_run(run_dir)
    (ctx,) = rec.episodes.values()
    assert ctx.git_commit == commit
    assert ctx.software["git_dirty"] == "true"
    assert ctx.software["torch"] == torch.__version__
    assert ctx.software["numpy"] == np.__version__
    assert ctx.software["python"] == ".".join(map(str, sys.version_info[:3]))
    assert ctx.software["cuda"] and ctx.software["host"]
    assert ctx.base_seed == 7 and ctx.torch_seed == res["seed"] == 7
    assert ctx.numpy_seed == -1 and "numpy_seed" in ctx.unknown_fields  # never seeded: not invented
    assert ctx.host_params == 64 * 32 + 32 + 32 * 10 + 10 and ctx.host_architecture == "Sequential"
    assert ctx.max_epochs == 4 and ctx.task_type == "classification"
    hp = ctx.hyperparameters
    assert "resume" in hp and hp["resume"] is None  # None kept
    assert hp["wandb_api_key"] == "[redacted]"
    assert "sk-live-123" not in (run_dir / "events.jsonl").read_text()
    assert hp["lr"] == 0.5 and hp["epochs"] == 4

    hosts = [e.payload for e in rec.events if e.event_type is ET.HOST_SNAPSHOT]
    assert [h.epoch for h in hosts] == [0, 1, 2, 3]
    for h, (tl, vl, va) in zip(hosts, res["truth"]):
        assert (h.train_loss, h.val_loss, h.val_accuracy) == (tl, vl, va)  # the loop's own numbers, exactly
        assert math.isnan(h.train_accuracy) and math.isnan(h.host_grad_norm)  # not computed: not invented
    scalars = [e.payload for e in rec.events if e.event_type is ET.SCALARS]
    assert [s.values for s in scalars] == [{"lr": 0.5}] * 4  # the mistyped "note" rejected, the rest kept
    (stats,) = [e.payload for e in rec.events if e.event_type is ET.TELEMETRY_STATS]
    assert stats.rejected == {"type_error": 4}
    (summary,) = [e.payload for e in rec.events if e.event_type is ET.EPISODE_ENDED]
    assert summary.epochs_completed == 4 and summary.final_val_accuracy == res["truth"][-1][2]
    assert res["stderr"].count("rejected 'note'") == 1  # each distinct message once

    out = subprocess.run([*KARN, "inspect", str(run_dir)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert f"git {commit[:12]}" in out.stdout and "seed 7" in out.stdout
    assert "finished: 4 epochs" in out.stdout and "interrupted" not in out.stdout
    assert "rejected in this episode: type_error 4" in out.stdout
    assert "resume=None" in out.stdout and "sk-live" not in out.stdout


def test_a_script_that_never_calls_finish_is_finished_at_exit(tmp_path):
    res = _run_script(tmp_path, "--no-finish", "--epochs", "2")
    rec = read_run(res["run_dir"])
    assert [e.payload.epochs_completed for e in rec.events if e.event_type is ET.EPISODE_ENDED] == [2]
    assert rec.accounting is None or not any(
        "missing" in line and " 0 missing" not in line for line in rec.accounting.lines()
    )
    (ctx,) = rec.episodes.values()
    assert ctx.git_commit == "unknown" and "git_commit" in ctx.unknown_fields  # not a repository


# ---------------------------------------------------------------------- in-process behaviour


@pytest.fixture
def run_factory(tmp_path):
    runs = []

    def make(**kw):
        kw.setdefault("out_dir", tmp_path)
        kw.setdefault("console", "off")
        r = init(**kw)
        runs.append(r)
        return r

    yield make
    for r in runs:
        r.finish()


def _events(run, et):
    return [e.payload for e in read_run(run.run_dir).events if e.event_type is et]


def test_numpy_and_tensor_scalars_are_accepted(run_factory):
    run = run_factory(config={"lr": np.float32(0.25), "bs": np.int64(32), "t": torch.tensor(3)})
    assert run.log(
        {"a": np.float32(1.5), "b": np.int64(2), "c": torch.tensor(0.5), "d": torch.tensor([4.0]), "e": True}, step=3
    )
    run.finish()
    assert run.context.hyperparameters == {"lr": 0.25, "bs": 32, "t": 3}
    (s,) = _events(run, ET.SCALARS)
    assert s.step == 3 and s.values == {"a": 1.5, "b": 2.0, "c": 0.5, "d": 4.0, "e": 1.0}


def test_bad_values_are_rejected_counted_and_never_raise(run_factory):
    run = run_factory()

    class Hostile:
        def __float__(self):
            raise RuntimeError("boom")

    assert not run.log({"x": None, "y": [1, 2], "z": Hostile(), "ok": 1.0}, epoch=0)
    assert not run.log("not a dict", epoch=0)
    assert not run.log({"ok": 2.0}, epoch="one")  # the bad epoch ignored, the value kept
    assert not run.log({"ok": 3.0}, epoch=-1)
    run.log({"ok": 4.0}, epoch=2)
    assert not run.log({"ok": 5.0}, epoch=1)  # epochs must not decrease
    run.finish()
    assert not run.log({"late": 1.0})
    rejected = get_collector() is None and run.collector.stats().rejected
    assert rejected == {"type_error": 4, "bad_epoch": 2, "epoch_regression": 1, "after_finish": 1}
    assert [s.values for s in _events(run, ET.SCALARS)] == [{"ok": 1.0}, {"ok": 2.0}, {"ok": 3.0}, {"ok": 4.0}]


def test_strict_mode_raises_the_validation_error(run_factory):
    run = run_factory(strict=True)
    with pytest.raises(TelemetryValidationError, match="not a number"):
        run.log({"x": "abc"})


def test_an_accuracy_given_as_a_percentage_is_reported_and_not_taken_as_one(run_factory, caplog):
    run = run_factory()
    run.log({"train_loss": 0.5, "val_loss": 0.6, "val_accuracy": 91.0}, epoch=0)
    run.finish()
    (h,) = _events(run, ET.HOST_SNAPSHOT)
    assert math.isnan(h.val_accuracy)
    assert [s.values for s in _events(run, ET.SCALARS)] == [{"val_accuracy": 91.0}]
    assert "not a fraction in [0, 1]" in caplog.text
    assert not [a for a in _events(run, ET.HEALTH_ALERT) if a.check == "accuracy_drop"]


def test_host_values_split_over_calls_make_one_snapshot_and_leftovers_are_kept(run_factory):
    run = run_factory(task="classification")
    run.log({"train_loss": 1.0}, epoch=0)
    run.log({"val_loss": 1.2, "val_acc": 0.5, "grad_norm": 3.0}, epoch=0)
    run.log({"train_loss": 0.9}, epoch=1)  # epoch 1 never gets a val_loss
    run.finish()
    (h,) = _events(run, ET.HOST_SNAPSHOT)
    assert (h.epoch, h.train_loss, h.val_loss, h.val_accuracy, h.host_grad_norm) == (0, 1.0, 1.2, 0.5, 3.0)
    assert [s.values for s in _events(run, ET.SCALARS)] == [{"train_loss": 0.9}]


def test_hyperparameters_from_dataclasses_and_odd_objects(run_factory):
    @dataclasses.dataclass
    class Optim:
        lr: float = 0.1
        betas: tuple = (0.9, 0.99)

    @dataclasses.dataclass
    class Cfg:
        optim: Optim = dataclasses.field(default_factory=Optim)
        out: Path = Path("/tmp/x")
        note: object = None
        big: int = 10**30

    run = run_factory(config=Cfg())
    assert run.context.hyperparameters == {
        "optim.lr": 0.1,
        "optim.betas": "(0.9, 0.99)",
        "out": "/tmp/x",
        "note": None,
        "big": str(10**30),
    }
    odd = run_factory(config=object(), model=object(), seed="seven")
    assert odd.context is not None and odd.context.hyperparameters == {}  # opened all the same
    assert {"host_params", "base_seed"} <= set(odd.context.unknown_fields)
    assert len(odd.problems) == 3


def test_a_namespace_and_a_context_manager_that_fails(tmp_path):
    ns = argparse.Namespace(lr=0.1, resume=None)
    with pytest.raises(RuntimeError), init(config=ns, out_dir=tmp_path, console="off") as run:
        run.log({"train_loss": 1.0, "val_loss": 1.0}, epoch=0)
        raise RuntimeError("the loop crashed")
    rec = read_run(run.run_dir)
    assert not [e for e in rec.events if e.event_type is ET.EPISODE_ENDED]  # inspect: interrupted
    assert [e.payload.epoch for e in rec.events if e.event_type is ET.HOST_SNAPSHOT] == [0]


def test_a_busy_prometheus_port_from_the_environment_falls_back_to_a_free_one(tmp_path, monkeypatch, caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv("KARN_PROMETHEUS_PORT", str(port))
        monkeypatch.setenv("KARN_OUT_DIR", str(tmp_path))
        monkeypatch.setenv("KARN_CONSOLE", "off")
        run = init(config={"lr": 0.1})
        try:
            assert f"127.0.0.1:{port} is in use" in caplog.text
            (served,) = [s.prometheus_port for s in run.collector.sinks if getattr(s, "prometheus_port", None)]
            assert served != port
            run.log({"train_loss": 0.25, "val_loss": 0.5, "val_accuracy": 0.75}, epoch=0)
            body = urllib.request.urlopen(f"http://127.0.0.1:{served}/metrics", timeout=10).read().decode()
            assert run.run_id in body
            lines = [ln for ln in body.splitlines() if ln.startswith("karn_host_val_accuracy{")]
            assert len(lines) == 1 and run.run_id in lines[0] and float(lines[0].rsplit(" ", 1)[1]) == 0.75
        finally:
            # The endpoint waits (bounded) for a last scrape before closing: give it one.
            scraper = threading.Timer(0.3, lambda: urllib.request.urlopen(f"http://127.0.0.1:{served}/metrics").read())
            scraper.start()
            run.finish()
            scraper.join()
    assert run.run_dir.parent == tmp_path


def test_init_does_not_import_torch():
    code = textwrap.dedent(
        """
        import sys, tempfile, karn_otel.api as api
        run = api.init(config={"a": 1}, out_dir=tempfile.mkdtemp(), console="off")
        run.log({"x": 1.0}, step=0); run.finish()
        print("torch" in sys.modules, run.context.torch_seed, run.context.software["torch"] != "")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.stdout.split() == ["False", "-1", "True"], out.stderr


def test_the_standard_otel_variables_are_honoured(tmp_path, monkeypatch):
    from tests.otlp_receiver import OTLPReceiver

    with OTLPReceiver("http/protobuf") as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "my-plain-loop")
        run = init(config={"lr": 0.1}, out_dir=tmp_path, console="off")
        for e in range(2):
            run.log({"train_loss": 1.0 - e / 4, "val_loss": 1.0, "val_accuracy": 0.5 + e / 10}, epoch=e)
        run.finish()
        spans = rx.wait_for(lambda: [s for s in rx.spans() if s.resource.get("service.name") == "my-plain-loop"])
        assert "karn.episode" in {s.name for s in spans}
        points = rx.wait_for(lambda: [p for p in rx.metric_points() if p.name == "karn.host.val_accuracy"])
        assert points and points[-1].value == 0.6


def test_a_second_init_finishes_the_first_run(run_factory, caplog):
    first = run_factory()
    first.log({"test_accuracy": 87.5}, step=0)  # any accuracy-like name is checked for plausibility
    second = run_factory()
    assert "finishing it first" in caplog.text and "test_accuracy=87.5 is not a fraction" in caplog.text
    assert [e.event_type for e in read_run(first.run_dir).events][-1] is ET.EPISODE_ENDED
    assert second.log({"x": 1.0}, step=0)


def test_per_step_device_tensors_are_read_back_once_per_sync_every_calls(run_factory, monkeypatch):
    """No accelerator here: CPU tensors stand in for device ones (``_defer_cpu``), and every
    read-back (``item``, ``tolist``, ``float``) is counted."""
    reads = {"item": 0, "tolist": 0, "float": 0}
    for name in reads:
        attr = "__float__" if name == "float" else name
        orig = getattr(torch.Tensor, attr)

        def counted(self, *a, _orig=orig, _name=name, **k):
            reads[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, attr, counted)
    run = run_factory(sync_every=100)
    run._defer_cpu = True
    losses = [torch.tensor(1.0 / (i + 1)) for i in range(250)]
    for i, t in enumerate(losses):
        run.log({"loss": t, "lr": 0.1}, step=i)
        if i == 149:
            run.log({"train_loss": torch.tensor(0.5), "val_loss": torch.tensor(0.25)}, epoch=0)
    run.finish()
    # 100 steps, the queued 50 before the epoch record, the epoch record's 2 tensors, the last 100.
    assert reads == {"item": 0, "tolist": 4, "float": 0} and run.syncs == 4
    events = [e for e in read_run(run.run_dir).events if e.event_type in (ET.SCALARS, ET.HOST_SNAPSHOT)]
    steps = [e.payload.step for e in events if e.event_type is ET.SCALARS]
    assert steps == list(range(250))  # call order kept, the epoch record in its place
    assert [e.event_type for e in events].index(ET.HOST_SNAPSHOT) == 150
    recorded = [e.payload.values["loss"] for e in events if e.event_type is ET.SCALARS]
    assert recorded == [t.item() for t in losses]


def test_a_lone_surrogate_is_escaped_not_a_rejected_context(run_factory):
    run = run_factory(config={"lr": 0.1, "bad\ud800": "x\udcff"}, architecture="Net\ud800")
    assert run.context.hyperparameters == {"lr": 0.1, "bad\\ud800": "x\\udcff"}
    assert run.context.host_architecture == "Net\\ud800"


def test_a_rejected_context_still_opens_the_run_and_says_so(run_factory, caplog, monkeypatch):
    from karn_otel.collector import KarnCollector
    from karn_otel.contracts import EpisodeContext

    real, calls = KarnCollector.emit, []

    def reject_first_context(self, event, **kw):  # whatever made it fail: the run must still open
        calls.append(type(event))
        if isinstance(event, EpisodeContext) and calls.count(EpisodeContext) == 1:
            self.pipeline.rejected["type_error"] += 1
            return False
        return real(self, event, **kw)

    monkeypatch.setattr(KarnCollector, "emit", reject_first_context)
    run = run_factory(config={"lr": 0.1})
    assert run.context is not None and run.context.hyperparameters == {}
    assert "the episode context was rejected" in caplog.text
    assert run.log({"train_loss": 1.0, "val_loss": 2.0}, epoch=0)
    run.finish()
    rec = read_run(run.run_dir)
    assert [e.event_type for e in rec.events][:1] == [ET.EPISODE_STARTED]
    assert [e.payload.val_loss for e in rec.events if e.event_type is ET.HOST_SNAPSHOT] == [2.0]
    (stats,) = [e.payload for e in rec.events if e.event_type is ET.TELEMETRY_STATS]
    assert stats.rejected == {"type_error": 1}  # in the run's accounting: `karn inspect` shows it


def test_what_a_loop_without_a_model_or_seed_cannot_know_is_shown_as_unknown(tmp_path, capsys):
    """Placeholders are not numbers: the episode-end line and `karn inspect` say "unknown" for
    a run opened without a model or a seed, instead of "0 params" and "seed -1"."""
    from karn_otel.cli import _inspect_lines

    run = init(config={"lr": 0.1}, out_dir=tmp_path, console="plain")
    run.log({"train_loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.75}, epoch=0)
    run.finish()
    said = capsys.readouterr().out
    (line,) = [ln for ln in said.splitlines() if "episode done" in ln]
    assert "params unknown" in line and "0 params" not in line and "fossilized" not in line, line
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    shown = "\n".join(_inspect_lines(read_run(run_dir)))
    assert "seed unknown" in shown and "params unknown" in shown and "seed -1" not in shown, shown
    assert "max epochs unknown" in shown


def test_a_processor_that_fails_internally_is_counted_where_the_user_looks(tmp_path, monkeypatch, caplog):
    """An internal error in the health checks skips that event for them and never reaches the
    loop; the run's accounting (what `karn inspect` prints) counts every skipped event, and
    the log says it once."""
    import karn_otel.health as health
    import karn_otel.triggers as triggers
    from karn_otel.cli import _inspect_lines

    def broken(*_a, **_k):
        raise ZeroDivisionError("a bug in a check")

    monkeypatch.setattr(health, "host_findings", broken)
    monkeypatch.setattr(triggers, "host_findings", broken)  # its own binding (standalone evaluation)
    run = init(config={"lr": 0.1}, out_dir=tmp_path, console="off")
    with caplog.at_level("WARNING", logger="karn"):
        for e in range(3):
            assert run.log({"train_loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.75}, epoch=e)
    run.finish()
    said = [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]
    assert len(said) == 2, said  # once per processor: the monitor and the dense triggers' own check
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rec = read_run(run_dir)
    assert len([e for e in rec.events if e.event_type is ET.HOST_SNAPSHOT]) == 3, "the events themselves are kept"
    (stats,) = [e.payload for e in rec.events if e.event_type is ET.TELEMETRY_STATS]
    assert stats.dropped.get("HealthMonitor:error") == 3, stats.dropped
    assert stats.dropped.get("DenseTriggerEngine:error") == 3, stats.dropped
    shown = "\n".join(_inspect_lines(rec))
    assert "HealthMonitor:error 3" in shown, shown
