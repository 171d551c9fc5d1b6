"""A Hugging Face ``transformers`` TrainerCallback that records a ``Trainer`` run into Karn.

::

    from karn_otel.adapters.transformers import KarnTrainerCallback
    trainer = Trainer(model, args, ..., callbacks=[KarnTrainerCallback()])

At ``train`` start it opens a run with :func:`karn_otel.init`: the ``TrainingArguments`` as
hyperparameters (``hub_token`` and other secret-looking names redacted at the collector's
door), the model's parameter count, ``seed`` and ``num_train_epochs``. Every training log
(``loss``, ``grad_norm``, ``learning_rate``, ...) is recorded as Scalars at
``state.global_step``; every evaluation closes an epoch: ``eval_loss`` -> ``val_loss``,
``eval_accuracy`` -> ``val_accuracy``, the latest training ``loss`` -> ``train_loss``,
``grad_norm`` -> the host gradient norm, the other metrics as Scalars. ``train`` ending
writes the summary. Optional extra: ``pip install karn-otel[transformers]``.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from karn_otel.api import Run, init

__all__ = ["KarnTrainerCallback"]

_EVAL_NAMES = {"eval_loss": "val_loss", "eval_accuracy": "val_accuracy", "eval_acc": "val_accuracy"}


class KarnTrainerCallback(TrainerCallback):  # type: ignore[misc]
    """Records ``Trainer.train`` into a Karn run; ``init_kwargs`` go to :func:`karn_otel.init`."""

    def __init__(self, task: str = "classification", **init_kwargs: Any) -> None:
        self.task = task
        self.init_kwargs = init_kwargs
        self.run: Run | None = None
        self._train_loss: float | None = None
        self._grad_norm: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.run is not None:
            return
        kw = dict(self.init_kwargs)
        epochs = getattr(args, "num_train_epochs", None)
        if isinstance(epochs, (int, float)) and float(epochs).is_integer() and getattr(args, "max_steps", -1) <= 0:
            kw.setdefault("max_epochs", int(epochs))
        try:
            config = args.to_dict()
        except Exception:  # noqa: BLE001 (an odd args object: recorded without hyperparameters)
            config = {}
        self.run = init(config=config, model=model, task=self.task, **kw)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if self.run is None or not logs:
            return
        logs = {k: v for k, v in dict(logs).items() if k != "epoch"}
        if not any(k.startswith("eval_") for k in logs):
            if "loss" in logs:
                self._train_loss = logs["loss"]
            if "grad_norm" in logs:
                self._grad_norm = logs["grad_norm"]
            self.run.log(logs, step=state.global_step)
            return
        epoch = max(0, math.ceil((state.epoch or 0) - 1e-9) - 1)  # evaluation after epoch k (1-based)
        values = {_EVAL_NAMES.get(k, k): v for k, v in logs.items()}
        if self._train_loss is not None:
            values.setdefault("train_loss", self._train_loss)
        if self._grad_norm is not None:
            values.setdefault("grad_norm", self._grad_norm)
        self.run.log(values, epoch=epoch)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is not None:
            self.run.finish()
