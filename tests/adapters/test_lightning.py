"""The Lightning callback on a tiny digits model, 2 epochs on CPU: the epochs' numbers are
the ones Lightning computed, the hyperparameters are the module's."""

from __future__ import annotations

import pytest

pl = pytest.importorskip("pytorch_lightning", reason="pip install karn-otel[lightning]")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from karn_otel.adapters.lightning import KarnCallback  # noqa: E402
from karn_otel.contracts import TelemetryEventType as ET  # noqa: E402
from karn_otel.reference.data import load_digits_data  # noqa: E402
from karn_otel.sinks.runlog import read_run  # noqa: E402


class Digits(pl.LightningModule):
    def __init__(self, lr: float = 0.5, hidden: int = 32, scheduler: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
        )

    def training_step(self, batch, _):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        out = self.net(x)
        self.log("val_loss", F.cross_entropy(out, y))
        self.log("val_acc", (out.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def test_two_epochs_recorded_as_lightning_computed_them(tmp_path):
    torch.manual_seed(0)
    d = load_digits_data(0)
    seen = []

    class Truth(pl.Callback):
        def on_train_epoch_end(self, trainer, module):
            seen.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    cb = KarnCallback(out_dir=tmp_path, console="off")
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[cb, Truth()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=1,
    )  # fmt: skip
    model = Digits()
    trainer.fit(
        model,
        DataLoader(TensorDataset(d.x_train, d.y_train), batch_size=128),
        DataLoader(TensorDataset(d.x_val, d.y_val), batch_size=512),
    )
    rec = read_run(cb.run.run_dir)
    (ctx,) = rec.episodes.values()
    assert ctx.hyperparameters == {"lr": 0.5, "hidden": 32, "scheduler": None}
    assert ctx.host_params == sum(p.numel() for p in model.parameters()) and ctx.max_epochs == 2
    hosts = [e.payload for e in rec.events if e.event_type is ET.HOST_SNAPSHOT]
    assert [h.epoch for h in hosts] == [0, 1]
    for h, truth in zip(hosts, seen):
        assert (h.train_loss, h.val_loss, h.val_accuracy) == (truth["train_loss"], truth["val_loss"], truth["val_acc"])
    assert [e.payload.epochs_completed for e in rec.events if e.event_type is ET.EPISODE_ENDED] == [2]
