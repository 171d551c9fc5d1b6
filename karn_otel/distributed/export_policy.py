"""Which ranks export their own series: ``all``, ``reduced`` or ``sampled:K``.

At 1,000 ranks, every rank exporting ~100 series is 100k series per run. The policy bounds
that by K instead of the world size, without losing what matters:

* ``all`` — every rank exports its per-rank series (the default up to :data:`ALL_UP_TO` ranks);
* ``reduced`` — only the job-wide values, exported by rank 0 (``scope="job"``); every rank still
  writes its own run log and raises its own health events;
* ``sampled:K`` — the job-wide values plus the per-rank series of K ranks chosen
  deterministically from the run id (the same K for the whole run, and on every rank without
  a collective), **plus any rank whose own health is bad** (it starts exporting when it turns
  unhealthy, and keeps exporting for the rest of the run, so a short spike is not lost).

``KarnConfig.export_ranks`` or ``KARN_EXPORT_RANKS`` selects it; ``auto`` (the default) is
``all`` up to :data:`ALL_UP_TO` ranks and ``sampled:`` :data:`DEFAULT_SAMPLE` beyond.
Torch-free, no I/O: a pure decision per (run, rank).
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from typing import Literal

__all__ = ["ALL_UP_TO", "DEFAULT_SAMPLE", "ENV_EXPORT_RANKS", "RankExportPolicy", "sampled_ranks"]

ENV_EXPORT_RANKS = "KARN_EXPORT_RANKS"
ALL_UP_TO = 64  # auto: every rank exports up to this world size
DEFAULT_SAMPLE = 8  # auto beyond it: sampled:8


@functools.lru_cache(maxsize=16)
def sampled_ranks(run_id: str, world_size: int, k: int) -> frozenset[int]:
    """K ranks of ``0 .. world_size - 1``, chosen by hashing each rank with the run id: the same
    set on every rank (no collective), a different set per run (no rank is always watched)."""
    if k >= world_size:
        return frozenset(range(world_size))
    keyed = sorted(range(world_size), key=lambda r: hashlib.sha256(f"{run_id}:{r}".encode()).digest())
    return frozenset(keyed[:k])


@dataclass(frozen=True)
class RankExportPolicy:
    kind: Literal["all", "reduced", "sampled"]
    k: int = 0

    @classmethod
    def parse(cls, text: str | None, world_size: int) -> RankExportPolicy:
        """``all`` / ``reduced`` / ``sampled:K`` / ``auto`` (None = ``KARN_EXPORT_RANKS`` or auto)."""
        text = (text if text is not None else os.environ.get(ENV_EXPORT_RANKS, "auto")).strip().lower()
        if text == "auto":
            return cls("all") if world_size <= ALL_UP_TO else cls("sampled", DEFAULT_SAMPLE)
        if text in ("all", "reduced"):
            return cls(text)  # type: ignore[arg-type]
        if text.startswith("sampled:"):
            try:
                k = int(text.split(":", 1)[1])
            except ValueError:
                k = -1
            if k >= 0:
                return cls("sampled", k)
        raise ValueError(f"export_ranks must be all, reduced, sampled:K (K >= 0) or auto, got {text!r}")

    def exports_rank_series(self, run_id: str, rank: int, world_size: int, unhealthy: bool = False) -> bool:
        """Whether ``rank`` exports its own (per-rank) series now."""
        if self.kind == "all" or world_size == 1:
            return True
        if self.kind == "reduced":
            return False
        return unhealthy or rank in sampled_ranks(run_id, world_size, self.k)

    def exports_job_series(self, rank: int) -> bool:
        """The job-wide (reduced) series: rank 0's, whatever the policy."""
        return rank == 0

    def max_rank_series_sets(self, world_size: int, unhealthy: int = 0) -> int:
        """How many ranks export per-rank series at most (with ``unhealthy`` ranks in a bad state)."""
        if self.kind == "all" or world_size == 1:
            return world_size
        if self.kind == "reduced":
            return 0
        return min(world_size, self.k + unhealthy)

    def describe(self) -> str:
        return f"sampled:{self.k}" if self.kind == "sampled" else self.kind
