"""Running the reference system on one process or several (``karn run --nproc N``).

Every rank trains under DDP (gloo on CPU), evaluates its shard of the validation set, and
reports through its own Karn collector: rank 0 writes the run directory (its per-rank
snapshots plus the reduced ones, ``is_reduced=True``); rank k > 0 writes
``<run dir>/ranks/rank<k>/``. Every rank serves its own Prometheus endpoint (base port +
local rank) with its rank label. Ranks heartbeat into ``<run dir>/heartbeats/`` (an epoch
beat, and a pulse every ``heartbeat_timeout_s / 6`` from a thread); rank 0 watches them and
raises a ``rank_missing`` health alert naming a rank whose pulse stopped, and the launcher
ends the job when one stays silent for ``heartbeat_timeout_s`` (a hung rank never leaves the
others waiting forever; collectives also time out after ``collective_timeout_s``).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

import karn_otel
from karn_otel.config import KarnConfig
from karn_otel.distributed.launch import SpawnResult, spawn
from karn_otel.distributed.liveness import RankWatch
from karn_otel.ranks import RankInfo
from karn_otel.reference.trainer import RunConfig, run_reference


def rank_config(base: KarnConfig, info: RankInfo) -> KarnConfig:
    """A rank's Karn configuration: its rank, and the live console on rank 0 only."""
    return dataclasses.replace(
        base,
        rank=info.rank,
        world_size=info.world_size,
        console=base.console if info.rank == 0 else "off",
    )


def _rank_main(info: RankInfo, cfg: RunConfig, base: KarnConfig, serve_after: float = 0.0) -> None:
    # DDP's note about a 36-element conv weight's gradient layout is noise at this size.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    collector = karn_otel.configure(rank_config(base, info))
    run_dir = Path(base.out_dir or ".") / collector.run_id
    heartbeats = run_dir / "heartbeats"
    watch = RankWatch(heartbeats, info.world_size, cfg.heartbeat_timeout_s).start() if info.rank == 0 else None
    try:
        run_reference(cfg, checkpoint_dir=run_dir / "checkpoints" if info.rank == 0 else None, heartbeat_dir=heartbeats)
        if serve_after > 0 and base.prometheus_port is not None:
            time.sleep(serve_after)  # keep this rank's /metrics up for a last scrape
    finally:
        if watch is not None:
            watch.stop()
        karn_otel.shutdown()


def run_ranks(
    cfg: RunConfig, base: KarnConfig, timeout_s: float | None = None, serve_after: float = 0.0
) -> SpawnResult:
    """Train on ``cfg.nproc`` ranks; ``base.run_id`` must be set (all ranks share it).
    ``serve_after``: seconds each rank keeps its Prometheus endpoint up after training."""
    if base.run_id is None:
        raise ValueError("run_ranks needs base.run_id: every rank reports under the same run")
    heartbeats = Path(base.out_dir or ".") / base.run_id / "heartbeats"
    return spawn(
        _rank_main,
        cfg.nproc,
        (cfg, base, serve_after),
        num_threads=cfg.num_threads,
        timeout_s=timeout_s,
        collective_timeout_s=cfg.collective_timeout_s,
        watch=(heartbeats, cfg.heartbeat_timeout_s),
    )


__all__ = ["RankWatch", "rank_config", "run_ranks"]
