"""Device-side accumulation of per-batch training metrics: no host-device sync per batch.

Every per-batch quantity is added into a tensor on the model's device; ``materialize()``
moves them to the host in one ``tolist()`` call at the end of the epoch (the flush).
"""

from __future__ import annotations

import torch

from karn_otel.torch import grad_norm


class EpochAccumulator:
    """Sums of loss, correct predictions and gradient norms over an epoch's batches."""

    def __init__(self, slot_ids: list[str], device: torch.device | str = "cpu") -> None:
        self.slot_ids = list(slot_ids)
        # index: 0 loss*n, 1 correct, 2 n, 3 host grad norm sum, 4 batches, 5.. per-slot grad norm sums
        self._sums = torch.zeros(5 + len(self.slot_ids), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(
        self,
        loss: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        host_params: list[torch.nn.Parameter],
        seed_params: dict[str, list[torch.nn.Parameter]],
    ) -> None:
        n = targets.shape[0]
        parts = [
            loss.detach().double() * n,
            (logits.argmax(dim=1) == targets).sum().double(),
            torch.full((), float(n), dtype=torch.float64, device=self._sums.device),  # a fill, not a copy
            grad_norm(host_params).double(),
            torch.ones((), dtype=torch.float64, device=self._sums.device),
        ]
        for sid in self.slot_ids:
            parts.append(grad_norm(seed_params.get(sid, [])).double())
        self._sums += torch.stack(parts)

    def materialize(self) -> dict[str, float | dict[str, float]]:
        """One sync: epoch means of loss, accuracy, host and per-slot gradient norms."""
        v = self._sums.tolist()
        n, batches = max(v[2], 1.0), max(v[4], 1.0)
        return {
            "loss": v[0] / n,
            "accuracy": v[1] / n,
            "host_grad_norm": v[3] / batches,
            "seed_grad_norms": {sid: v[5 + i] / batches for i, sid in enumerate(self.slot_ids)},
        }
