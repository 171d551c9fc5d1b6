"""Rank discovery: where this process sits in the job (review P0 #2: rank awareness from day one).

The collector calls :func:`discover` when it is built, so this module stays as cheap as a
module can be: it imports no torch, numpy or OpenTelemetry. ``torch.distributed`` is only
consulted when this process already imported it (looked up in ``sys.modules``): a process
that never imported torch cannot have a process group.
"""

from __future__ import annotations

import numbers
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ENV_LOCAL_RANK",
    "ENV_RANK",
    "ENV_WORLD_SIZE",
    "RankInfo",
    "discover",
]

ENV_RANK = "RANK"
"""Global rank of this process, 0 <= RANK < WORLD_SIZE (set by torchrun, ``karn run --nproc``)."""
ENV_WORLD_SIZE = "WORLD_SIZE"
"""Number of processes in the job (>= 1)."""
ENV_LOCAL_RANK = "LOCAL_RANK"
"""Rank of this process on its node; selects the GPU and the per-rank Prometheus port."""


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job.

    ``rank`` is the global rank (0 <= rank < world_size), ``local_rank`` the rank on this
    node (0 <= local_rank < world_size; it picks the GPU and the Prometheus port offset).
    """

    rank: int
    world_size: int
    local_rank: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "world_size", "local_rank"):
            v = getattr(self, name)
            # numbers.Integral covers numpy integers without importing numpy.
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"{name} must be an int, got {v!r}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size} (0 <= rank < world_size)")
        if not 0 <= self.local_rank < self.world_size:
            raise ValueError(f"local_rank {self.local_rank} is outside world_size {self.world_size}")

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that emits reduced events and watches the heartbeats."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int, env: Mapping[str, str]) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def initialized_dist() -> Any | None:
    """torch.distributed when a default process group exists, else None.

    Looked up in ``sys.modules`` so that a process which never imported torch pays nothing:
    if torch.distributed was never imported, no process group can exist.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def dist_for(group: Any) -> Any | None:
    """torch.distributed when ``group`` spans more than one rank, else None (the local path).

    The one question cross-rank code asks before it decides whether to take a collective;
    answered without importing torch.
    """
    dist = initialized_dist()
    if dist is None or dist.get_world_size(group) <= 1:
        return None
    return dist


def discover(env: Mapping[str, str] | None = None) -> RankInfo:
    """This process's :class:`RankInfo`.

    From ``torch.distributed`` when a process group is initialised (its rank and world size
    are authoritative; ``LOCAL_RANK`` still comes from the environment), else from the
    launcher's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (defaults 0 / 1 / 0). ``env``
    replaces ``os.environ`` (tests). Raises ValueError for a non-integer or out-of-range value.
    """
    env = os.environ if env is None else env
    local_rank = _env_int(ENV_LOCAL_RANK, 0, env)
    dist = initialized_dist()
    if dist is not None:
        return RankInfo(dist.get_rank(), dist.get_world_size(), local_rank)
    return RankInfo(_env_int(ENV_RANK, 0, env), _env_int(ENV_WORLD_SIZE, 1, env), local_rank)
