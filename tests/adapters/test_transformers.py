"""The transformers TrainerCallback on a tiny model, 2 epochs on CPU: each epoch's numbers
are the ones the Trainer logged."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers", reason="pip install karn-otel[transformers]")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from karn_otel.adapters.transformers import KarnTrainerCallback  # noqa: E402
from karn_otel.contracts import TelemetryEventType as ET  # noqa: E402
from karn_otel.reference.data import load_digits_data  # noqa: E402
from karn_otel.sinks.runlog import read_run  # noqa: E402


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _rows(x, y):
    return [{"x": xi.reshape(-1), "labels": int(yi)} for xi, yi in zip(x, y)]


def test_two_epochs_recorded_as_the_trainer_logged_them(tmp_path):
    torch.manual_seed(0)
    d = load_digits_data(0)
    seen = []

    class Truth(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs))

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), num_train_epochs=2, eval_strategy="epoch", logging_strategy="epoch",
        save_strategy="no", report_to=[], use_cpu=True, per_device_train_batch_size=128,
        per_device_eval_batch_size=512, learning_rate=0.05, disable_tqdm=True, seed=3, hub_token="hf_secret",
    )  # fmt: skip
    cb = KarnTrainerCallback(out_dir=tmp_path / "runs", console="off")
    trainer = transformers.Trainer(
        model=TinyNet(),
        args=args,
        train_dataset=_rows(d.x_train, d.y_train),
        eval_dataset=_rows(d.x_val, d.y_val),
        compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, 1) == p.label_ids).mean())},
        callbacks=[cb, Truth()],
    )
    trainer.train()
    rec = read_run(cb.run.run_dir)
    (ctx,) = rec.episodes.values()
    assert ctx.max_epochs == 2 and ctx.base_seed == 3 and ctx.hyperparameters["learning_rate"] == 0.05
    assert ctx.hyperparameters["hub_token"] == "[redacted]"
    assert "hf_secret" not in (cb.run.run_dir / "events.jsonl").read_text()
    train_logs = [s for s in seen if "loss" in s]
    eval_logs = [s for s in seen if "eval_loss" in s]
    hosts = [e.payload for e in rec.events if e.event_type is ET.HOST_SNAPSHOT]
    assert [h.epoch for h in hosts] == [0, 1] and len(eval_logs) == 2
    for h, tr, ev in zip(hosts, train_logs, eval_logs):
        assert (h.train_loss, h.val_loss, h.val_accuracy) == (tr["loss"], ev["eval_loss"], ev["eval_accuracy"])
    assert [e.payload.epochs_completed for e in rec.events if e.event_type is ET.EPISODE_ENDED] == [2]
