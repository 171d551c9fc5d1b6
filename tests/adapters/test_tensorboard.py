"""The SummaryWriter shim and the PPO helper on their own: what is recorded, what is not,
and that nothing raises into the loop."""

from __future__ import annotations

import numpy as np
import torch

from karn_otel.adapters.ppo import PPOLogger
from karn_otel.adapters.tensorboard import SummaryWriter, _parse_table
from karn_otel.contracts import TelemetryEventType as ET
from karn_otel.sinks.runlog import read_run


def _writer(tmp_path, **kw):
    return SummaryWriter(str(tmp_path / "tb"), karn={"out_dir": tmp_path, "console": "off"}, **kw)


def test_scalars_hparams_and_ignored_calls(tmp_path, caplog):
    w = _writer(tmp_path, task="classification")
    w.add_hparams({"lr": 0.1, "opt": "sgd", "wd": None}, {})
    w.add_scalar("loss/train", np.float32(0.5), 0)
    w.add_scalar("loss/train", torch.tensor(0.25), 0)  # the same tag twice in a step: both kept
    w.add_scalars("acc", {"train": 0.75, "val": 0.5}, 1)
    w.add_histogram("weights", np.zeros(3), 1)
    w.add_image("img", np.zeros((3, 2, 2)), 1)
    w.add_scalar("bad", "x", 2)
    w.add_text("notes", "free text")
    w.close()
    w.add_scalar("after", 1.0, 3)  # after close: ignored, never raised
    rec = read_run(w.karn_run.run_dir)
    (ctx,) = rec.episodes.values()
    assert ctx.hyperparameters == {"lr": 0.1, "opt": "sgd", "wd": None} and ctx.task_type == "classification"
    scalars = [(e.payload.step, e.payload.values) for e in rec.events if e.event_type is ET.SCALARS]
    assert scalars == [(0, {"loss/train": 0.5}), (0, {"loss/train": 0.25}), (1, {"acc/train": 0.75, "acc/val": 0.5})]
    (stats,) = [e.payload for e in rec.events if e.event_type is ET.TELEMETRY_STATS]
    assert stats.rejected == {"type_error": 1}
    assert "add_histogram is accepted and not recorded" in caplog.text
    assert [e for e in rec.events if e.event_type is ET.EPISODE_ENDED]


def test_the_task_is_guessed_from_what_is_logged(tmp_path):
    w = _writer(tmp_path)
    w.add_scalar("charts/SPS", 100, 1)
    w.close()
    assert w.karn_run.task == "unknown"
    w = _writer(tmp_path)
    w.add_scalar("losses/approx_kl", 0.01, 1)
    w.close()
    assert w.karn_run.task == "rl"


def test_cleanrl_hyperparameter_table_is_read_back_typed():
    text = "|param|value|\n|-|-|\n|exp_name|ppo|\n|seed|1|\n|lr|0.00025|\n|cuda|True|\n|target_kl|None|\n|x|a|b|"
    assert _parse_table(text) == {"exp_name": "ppo", "seed": 1, "lr": 0.00025, "cuda": True, "target_kl": None}


def test_a_ppo_minibatch_of_the_wrong_shape_is_skipped_and_counted(tmp_path):
    from karn_otel.api import init

    run = init(task="rl", out_dir=tmp_path, console="off")
    ppo = PPOLogger(run, heads=("action",))
    z = torch.zeros(8)
    assert not ppo.update(new_logp=z, old_logp=z, advantages=torch.zeros(7), values=z, returns=z, entropy=z)
    assert ppo.emit() is None  # nothing to report
    assert ppo.update(new_logp=z, old_logp=z, advantages=z + 1, values=z, returns=z + 1, entropy=z + 0.5)
    stats = ppo.emit()
    run.finish()
    assert stats.kl_divergence == 0.0 and stats.entropy == {"action": 0.5} and ppo.skipped == 1
    assert run.collector.stats().rejected == {"ppo_minibatch": 1}
