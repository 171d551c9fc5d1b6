"""Counterfactual evaluators: run the validation set under on/off seed configurations.

``evaluate_configurations`` is the generic evaluator: one full validation pass per
configuration, each switched-off slot under ``force_alpha(0.0)``. Every configuration sees
the same examples in the same order (common random numbers), the model runs in eval mode
under ``no_grad``, and its training mode is restored afterwards.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import contextlib

import numpy as np
import torch
import torch.nn.functional as F


class Ablatable(Protocol):
    def force_alpha(self, value: float) -> contextlib.AbstractContextManager[None]: ...


@torch.no_grad()
def evaluate_configurations(
    model: torch.nn.Module,
    slots: Mapping[str, Ablatable],
    slot_ids: Sequence[str],
    configs: Sequence[tuple[bool, ...]],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1024,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per configuration: (per-example correctness 0/1, per-example loss) as numpy arrays."""
    was_training = model.training
    model.eval()
    out: list[tuple[np.ndarray, np.ndarray]] = []
    try:
        for config in configs:
            if len(config) != len(slot_ids):
                raise ValueError(f"configuration {config} has {len(config)} entries for {len(slot_ids)} slots")
            with contextlib.ExitStack() as stack:
                for sid, on in zip(slot_ids, config):
                    if not on:
                        stack.enter_context(slots[sid].force_alpha(0.0))
                correct, losses = [], []
                for start in range(0, x.shape[0], batch_size):
                    logits = model(x[start : start + batch_size])
                    yb = y[start : start + batch_size]
                    correct.append(logits.argmax(dim=1) == yb)
                    losses.append(F.cross_entropy(logits, yb, reduction="none"))
                out.append((torch.cat(correct).cpu().numpy().astype(np.float64), torch.cat(losses).cpu().numpy()))
    finally:
        model.train(was_training)
    return out
