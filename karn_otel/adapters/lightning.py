"""A PyTorch Lightning callback that records a ``Trainer.fit`` into Karn.

::

    from karn_otel.adapters.lightning import KarnCallback
    trainer = Trainer(max_epochs=10, callbacks=[KarnCallback(task="classification")])

At ``fit`` start it opens a run with :func:`karn_otel.init` (the module's
``hparams`` as hyperparameters, the module's parameter count, ``max_epochs``); at the end
of every training epoch (after validation) it logs ``trainer.callback_metrics`` with
``epoch=trainer.current_epoch``: what the module ``self.log``-ged, so ``train_loss``,
``val_loss``, ``val_acc``/``val_accuracy`` fill the epoch's HostSnapshot (a Lightning
``_epoch`` suffix is dropped for those names) and the rest goes to Scalars. The sanity check
is not recorded. ``fit`` ending writes the summary; an exception ends the run without one.
Reading the metrics is one ``.item()`` per metric per epoch. Optional extra:
``pip install karn-otel[lightning]`` (``lightning`` or ``pytorch-lightning``).
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl

from karn_otel.api import HOST_NAMES, Run, init

__all__ = ["KarnCallback"]


class KarnCallback(pl.Callback):  # type: ignore[misc]
    """Records ``fit`` into a Karn run; ``init_kwargs`` go to :func:`karn_otel.init`."""

    def __init__(self, task: str = "classification", **init_kwargs: Any) -> None:
        super().__init__()
        self.task = task
        self.init_kwargs = init_kwargs
        self.run: Run | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_rank != 0 or self.run is not None:
            return
        hparams = dict(getattr(pl_module, "hparams", {}) or {})
        kwargs = dict(self.init_kwargs)
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            kwargs.setdefault("max_epochs", trainer.max_epochs)
        self.run = init(config=hparams, model=pl_module, task=self.task, **kwargs)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.run is None or trainer.sanity_checking:
            return
        values = {}
        for name, v in trainer.callback_metrics.items():
            short = name[: -len("_epoch")] if name.endswith("_epoch") else name
            values[short if short in HOST_NAMES and short not in trainer.callback_metrics else name] = v
        self.run.log(values, epoch=trainer.current_epoch)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.run is not None:
            self.run.finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.run is not None:
            self.run.finish(summary=False)  # `karn inspect`: not finished
