"""The only part of Karn that touches tensors and modules.

Everything here keeps values on the device and leaves materialisation (the one host-device
sync) to an explicit flush, so the per-batch path never blocks on the accelerator.
"""

from __future__ import annotations

import torch


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm over the gradients of ``params`` as a 0-d device tensor (0 when none have one)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        device = params[0].device if params else "cpu"
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
