"""Cross-rank logic, one job per module; nothing here imports torch at import time.

* :mod:`~karn_otel.distributed.reduction`: the fixed reduction schema (:class:`EpochReducer`)
  the job-wide HostSnapshot (:func:`reduce_host_snapshot`), and with it the spread across
  ranks (:func:`reduce_epoch`, a :class:`~karn_otel.contracts.RankHealthSummary`);
* :mod:`~karn_otel.distributed.evaluation`: counterfactuals over sharded validation
  (:func:`shard_indices`, :func:`gather_evaluations`, :func:`distributed_attribute`);
* :mod:`~karn_otel.distributed.liveness`: heartbeat files, missing ranks, rank 0's watcher;
* :mod:`~karn_otel.distributed.launch`: the single-node launcher (:func:`spawn`);
* :mod:`~karn_otel.distributed.episode`: one episode id (and so one trace) per job
  (:func:`shared_episode_id`).

Rank discovery is :mod:`karn_otel.ranks` (re-exported here); every torch.distributed call is
in :mod:`karn_otel.torch.collectives`, imported only when a collective is actually taken.
"""

from karn_otel.distributed.episode import shared_episode_id
from karn_otel.distributed.evaluation import (
    DistributedEvaluationError,
    WaitClock,
    distributed_attribute,
    gather_evaluations,
    make_distributed_evaluate,
    shard_indices,
)
from karn_otel.distributed.launch import ENV_MASTER_ADDR, ENV_MASTER_PORT, SpawnResult, spawn
from karn_otel.distributed.liveness import (
    RANK_MISSING_CHECK,
    Heartbeat,
    MissingRankMonitor,
    RankHeartbeat,
    RankWatch,
    missing_rank_count,
    missing_ranks,
    rank_missing_alert,
    read_heartbeats,
)
from karn_otel.distributed.reduction import (
    HOST_SNAPSHOT_STATES,
    DistributedReductionError,
    EpochReducer,
    RankDisagreementError,
    Reduction,
    SchemaMismatchError,
    StateSpec,
    host_snapshot_reducer,
    rank_health_summary,
    rank_spread,
    reduce_epoch,
    reduce_host_snapshot,
    reduce_rows,
    schema_mismatch,
)
from karn_otel.ranks import ENV_LOCAL_RANK, ENV_RANK, ENV_WORLD_SIZE, RankInfo, discover

__all__ = [
    "ENV_LOCAL_RANK",
    "ENV_MASTER_ADDR",
    "ENV_MASTER_PORT",
    "ENV_RANK",
    "ENV_WORLD_SIZE",
    "HOST_SNAPSHOT_STATES",
    "RANK_MISSING_CHECK",
    "DistributedEvaluationError",
    "DistributedReductionError",
    "WaitClock",
    "EpochReducer",
    "Heartbeat",
    "MissingRankMonitor",
    "RankDisagreementError",
    "RankHeartbeat",
    "RankInfo",
    "RankWatch",
    "Reduction",
    "SchemaMismatchError",
    "SpawnResult",
    "StateSpec",
    "discover",
    "distributed_attribute",
    "gather_evaluations",
    "host_snapshot_reducer",
    "make_distributed_evaluate",
    "missing_rank_count",
    "missing_ranks",
    "rank_missing_alert",
    "read_heartbeats",
    "rank_health_summary",
    "rank_spread",
    "reduce_epoch",
    "reduce_host_snapshot",
    "reduce_rows",
    "schema_mismatch",
    "shard_indices",
    "shared_episode_id",
    "spawn",
]
