"""Device-side per-batch training metrics: no host-device sync per batch.

Each batch appends one small vector (loss, correct, n, host grad norm, per-slot seed grad
norms, cumulative isolation leakage) to a list of device tensors. ``materialize()`` stacks
them and moves the epoch *sums* to the host in one ``tolist()`` — the only sync. The
stacked per-batch matrix stays on the device, so a dense trace opened by an anomaly in
this epoch can still include this epoch's batches (``batch_metrics``) without having paid
for them in advance.
"""

from __future__ import annotations

import torch

from karn_otel.contracts import BatchMetrics

# Column layout of the per-batch vector: [loss*n, correct, n, leakage (cumulative), host grad
# norm, one grad norm per slot].
_LOSS, _CORRECT, _N, _LEAK, _HOST, _SEEDS = 0, 1, 2, 3, 4, 5


class EpochAccumulator:
    """Per-batch metric vectors of one epoch, kept on the device."""

    def __init__(self, slot_ids: list[str], device: torch.device | str = "cpu") -> None:
        self.slot_ids = list(slot_ids)
        self.device = torch.device(device)
        self._rows: list[torch.Tensor] = []
        self._matrix: torch.Tensor | None = None
        self._group_key: tuple[int, ...] | None = None
        self._group_index = torch.zeros(0, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def update(
        self,
        loss: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        host_params: list[torch.nn.Parameter],
        seed_params: dict[str, list[torch.nn.Parameter]],
        leak_meter: torch.Tensor | None = None,
    ) -> None:
        """Append this batch's vector. A fixed, small number of device ops (one fused norm
        over every gradient, grouped by index_add), whatever the number of parameters."""
        n = targets.shape[0]
        dt = torch.float64
        grads, groups = [], []
        for p in host_params:
            if p.grad is not None:
                grads.append(p.grad)
                groups.append(0)
        for i, sid in enumerate(self.slot_ids):
            for p in seed_params.get(sid, ()):
                if p.grad is not None:
                    grads.append(p.grad)
                    groups.append(i + 1)
        group_norms = torch.zeros(1 + len(self.slot_ids), dtype=dt, device=self.device)
        if grads:
            key = tuple(groups)
            if key != self._group_key:  # the layout changes at most once per epoch
                self._group_index = torch.cat(
                    [torch.full((1,), g, dtype=torch.long, device=self.device) for g in groups]
                )  # fill kernels: no host-to-device copy
                self._group_key = key
            sq = torch.stack(torch._foreach_norm(grads)).to(dt).square()
            group_norms.index_add_(0, self._group_index, sq).sqrt_()
        head = torch.stack(
            [
                loss.detach().to(dt) * n,
                (logits.argmax(dim=1) == targets).sum().to(dt),
                torch.full((), float(n), dtype=dt, device=self.device),  # a fill kernel, not a copy
                leak_meter.to(dt) if leak_meter is not None else torch.zeros((), dtype=dt, device=self.device),
            ]
        )
        self._rows.append(torch.cat([head, group_norms]))

    def matrix(self) -> torch.Tensor:
        """(batches, columns) device tensor of this epoch's per-batch vectors."""
        if self._matrix is None:
            width = _SEEDS + len(self.slot_ids)
            self._matrix = (
                torch.stack(self._rows)
                if self._rows
                else torch.zeros((0, width), dtype=torch.float64, device=self.device)
            )
        return self._matrix

    def materialize(self) -> dict:
        """One sync: epoch means of loss, accuracy, host and per-slot gradient norms, and the
        total isolation leakage (L2 norm of all gradient that crossed isolation boundaries)."""
        m = self.matrix()
        sums = torch.cat([m.sum(dim=0), m[-1:, _LEAK] if m.shape[0] else m.new_zeros(1)]).tolist()
        batches = max(m.shape[0], 1)
        n = max(sums[_N], 1.0)
        return {
            "loss": sums[_LOSS] / n,
            "accuracy": sums[_CORRECT] / n,
            "host_grad_norm": sums[_HOST] / batches,
            "seed_grad_norms": {sid: sums[_SEEDS + i] / batches for i, sid in enumerate(self.slot_ids)},
            "leakage": max(sums[-1], 0.0) ** 0.5,
            "examples": int(sums[_N]),
        }

    def batch_metrics(self, epoch: int, seeded: set[str], isolated: bool) -> list[BatchMetrics]:
        """This epoch's BatchMetrics (one sync). Called only when a dense trace needs them."""
        m = self.matrix()
        if m.shape[0] == 0:
            return []
        leak_cum = m[:, _LEAK]
        leak = torch.diff(leak_cum, prepend=leak_cum.new_zeros(1)).clamp_min(0).sqrt()
        rows = torch.cat([m, leak[:, None]], dim=1).tolist()
        out = []
        for b, r in enumerate(rows):
            n = max(r[_N], 1.0)
            out.append(
                BatchMetrics(
                    epoch=epoch,
                    batch_idx=b,
                    loss=r[_LOSS] / n,
                    accuracy=r[_CORRECT] / n,
                    host_grad_norm=r[_HOST],
                    seed_grad_norms={sid: r[_SEEDS + i] for i, sid in enumerate(self.slot_ids) if sid in seeded},
                    isolation_leakage=r[-1] if isolated else None,
                )
            )
        return out
