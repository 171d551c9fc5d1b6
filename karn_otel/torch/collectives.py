"""Every torch.distributed call Karn makes: gathers, the process group's life, the spawn context.

The cross-rank logic in :mod:`karn_otel.distributed` decides *whether* to take a collective
without torch (:func:`karn_otel.ranks.dist_for`) and imports this module only when it does,
so that heartbeats, sharding and single-process reductions never import torch.

Collective tensors live where the backend needs them: the current CUDA device for NCCL,
the CPU otherwise (gloo). Arrays go in and come back as numpy arrays, in rank order.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "all_gather_objects",
    "all_gather_rows",
    "destroy_process_group",
    "device_for",
    "init_process_group",
    "spawn_context",
    "torch_dtype",
]


def device_for(group: Any = None) -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named like its numpy counterpart ("int64", "float64")."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def all_gather_rows(row: np.ndarray, dtype: str, group: Any = None) -> np.ndarray:
    """all_gather one equally-shaped array per rank as ``dtype``; returns ``(world, *row.shape)`` in rank order."""
    device = device_for(group)
    local = torch.as_tensor(np.ascontiguousarray(row)).to(device=device, dtype=torch_dtype(dtype))
    out = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, local, group=group)
    return torch.stack(out).cpu().numpy()


def all_gather_objects(obj: object, group: Any = None) -> list[object]:
    """Pickled all_gather. Only on error paths: every rank takes it together or none does."""
    out: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def init_process_group(
    backend: str,
    rank: int,
    world_size: int,
    *,
    timeout_s: float | None = None,
    num_threads: int | None = None,
    store_path: str | None = None,
) -> None:
    """Join the default process group.

    The rendezvous is a ``FileStore`` at ``store_path`` when given (single node: no TCP
    listener at all — torch's TCPStore server listens on every interface, whatever
    MASTER_ADDR says), else MASTER_ADDR / MASTER_PORT (multi-node; docs/reliability.md).
    ``num_threads`` sets torch's intra-op threads first (N ranks x all cores each would
    oversubscribe); ``timeout_s`` is the group's collective timeout (None: torch's default).
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    kwargs: dict[str, Any] = {"rank": rank, "world_size": world_size}
    if timeout_s:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    if store_path is not None:
        kwargs["store"] = dist.FileStore(store_path, world_size)
    dist.init_process_group(backend, **kwargs)


def destroy_process_group() -> None:
    """Leave the default process group if there is one; a peer already gone is not an error."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone must not turn success into failure
            pass


def spawn_context() -> Any:
    """torch.multiprocessing's *spawn* context (tensors in arguments travel by shared memory)."""
    import torch.multiprocessing as torch_mp

    return torch_mp.get_context("spawn")
