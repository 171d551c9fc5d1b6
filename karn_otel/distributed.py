"""Rank discovery, cross-rank reduction with a fixed schema, distributed counterfactuals,
rank liveness and a single-node launcher (review P0 #2: rank awareness from day one).

What goes wrong elsewhere, and what this module does instead:

* *one run per rank, N - 1 of them empty* / *rank-0 numbers shown as global*: every rank
  emits its own snapshot (``is_reduced=False``, labelled with its rank by the collector) and
  rank 0 additionally emits :func:`reduce_host_snapshot`'s result with ``is_reduced=True``.
* *values silently assigned to the wrong metric when ranks log different keys*: the
  reduction runs over a **fixed schema**, an ordered list of ``(key, reduction)`` declared
  once (torchmetrics' ``add_state(..., dist_reduce_fx=...)`` style, see :class:`EpochReducer`).
  Before any value moves, the ranks exchange a 64-bit fingerprint of their schema (a
  24-byte all_gather); if one differs every rank raises :class:`SchemaMismatchError` naming
  the rank and the first differing key. Then all values travel in one all_gather of one
  flat float64 vector. Values never travel without their schema having been agreed.
* *counterfactuals cost the same on 8 GPUs as on one*: each rank evaluates its contiguous
  shard of the validation set (:func:`shard_indices`) for every configuration and
  :func:`gather_evaluations` concatenates the per-example results in rank order, so
  :func:`~karn_otel.counterfactual.attribute` sees exactly the arrays a single process would
  have computed (:func:`distributed_attribute`).
* *a dead rank hangs everyone*: liveness is checked without collectives, through small
  heartbeat files (:class:`RankHeartbeat`, :func:`missing_ranks`, :class:`MissingRankMonitor`).

Error discipline. A check that could fail on one rank only must not raise before the
collective that the other ranks are already waiting in: they would hang. So local problems
(a malformed value, a failing local evaluation) are carried into the handshake as a flag,
every rank learns about them, and every rank raises. Only input that is the same on every
rank by construction is validated eagerly.

Rank numbers in messages are ranks *within the process group* passed as ``group`` (the
global rank for the default group).

torch is imported lazily: rank discovery, sharding and the heartbeats work (and are cheap to
import, e.g. from a metrics callback) without it. Everything that moves data uses
``torch.distributed``: gloo on CPU, NCCL on GPUs (tensors then go to the current CUDA device).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from karn_otel.config import CounterfactualConfig
from karn_otel.contracts import CounterfactualMatrix, HealthAlert, HostSnapshot, Severity
from karn_otel.counterfactual import ConfigEvaluation, Evaluate, attribute

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

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
    "EpochReducer",
    "Heartbeat",
    "MissingRankMonitor",
    "RankDisagreementError",
    "RankHeartbeat",
    "RankInfo",
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
    "reduce_host_snapshot",
    "reduce_rows",
    "schema_mismatch",
    "shard_indices",
    "spawn",
]

# =========================================================================== environment

ENV_RANK = "RANK"
"""Global rank of this process, 0 <= RANK < WORLD_SIZE (set by torchrun, ``karn run --nproc``)."""
ENV_WORLD_SIZE = "WORLD_SIZE"
"""Number of processes in the job (>= 1)."""
ENV_LOCAL_RANK = "LOCAL_RANK"
"""Rank of this process on its node; selects the GPU and the per-rank Prometheus port."""
ENV_MASTER_ADDR = "MASTER_ADDR"
"""Address of rank 0's rendezvous store; :func:`spawn` always uses 127.0.0.1."""
ENV_MASTER_PORT = "MASTER_PORT"
"""TCP port of rank 0's rendezvous store; :func:`spawn` picks a free one."""
_ENV_GLOO_IFNAME = "GLOO_SOCKET_IFNAME"  # gloo's interface; pinned to loopback by spawn()


# =========================================================================== rank discovery


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
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
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


def _initialized_dist() -> Any | None:
    """torch.distributed when a default process group exists, else None.

    Looked up in ``sys.modules`` so that a process which never imported torch pays nothing:
    if torch.distributed was never imported, no process group can exist.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
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
    dist = _initialized_dist()
    if dist is not None:
        return RankInfo(dist.get_rank(), dist.get_world_size(), local_rank)
    return RankInfo(_env_int(ENV_RANK, 0, env), _env_int(ENV_WORLD_SIZE, 1, env), local_rank)


# =========================================================================== collective helpers


def _dist_for(group: Any) -> Any | None:
    """torch.distributed when ``group`` spans more than one rank, else None (local path)."""
    dist = _initialized_dist()
    if dist is None or dist.get_world_size(group) <= 1:
        return None
    return dist


def _device(dist: Any, group: Any) -> "torch.device":
    """Where collective tensors must live: the current GPU for NCCL, else the CPU."""
    import torch

    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_rows(dist: Any, group: Any, row: np.ndarray, dtype: "torch.dtype") -> np.ndarray:
    """all_gather one equally-shaped array per rank; returns ``(world, *row.shape)`` in rank order."""
    import torch

    device = _device(dist, group)
    local = torch.as_tensor(np.ascontiguousarray(row)).to(device=device, dtype=dtype)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, local, group=group)
    return torch.stack(out).cpu().numpy()


def _all_gather_objects(dist: Any, group: Any, obj: object) -> list[object]:
    """Pickled all_gather. Only on error paths: every rank takes it together or none does."""
    out: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _fingerprint(items: object) -> int:
    """A stable signed 64-bit digest of ``repr(items)`` (fits an int64 tensor exactly)."""
    digest = hashlib.blake2b(repr(items).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


# =========================================================================== reduction schema


class Reduction(str, enum.Enum):
    """How one state is combined across ranks."""

    SUM = "sum"  # counts (examples seen)
    MAX = "max"  # gradient norms: the worst rank is the one to worry about
    MIN = "min"
    MEAN = "mean"  # sample-weighted by a SUM state declared earlier (the example count)
    SAME = "same"  # must be equal on every rank (epoch, parameter counts); checked, not averaged


@dataclass(frozen=True)
class StateSpec:
    """One entry of a reduction schema: the key, its reduction, and the weight of a MEAN."""

    key: str
    reduction: Reduction
    weight: str | None = None


class SchemaMismatchError(ValueError):
    """A rank's reduction schema differs from rank 0's; raised on every rank.

    ``rank`` is the first rank (lowest number) whose schema differs, ``key`` the first
    differing key in schema order (the key that rank has there, or rank 0's key when that
    rank's schema is shorter), ``position`` its index in the schema.
    """

    def __init__(self, message: str, *, rank: int, key: str, position: int) -> None:
        super().__init__(message)
        self.rank = rank
        self.key = key
        self.position = position


class RankDisagreementError(ValueError):
    """A :attr:`Reduction.SAME` state (epoch, a parameter count) differs between ranks."""


class DistributedReductionError(RuntimeError):
    """Another rank could not produce its values; raised on the ranks that could."""


class EpochReducer:
    """A fixed reduction schema and the one-gather-per-epoch reduction over it.

    Declare every state once, in order, with its reduction (as torchmetrics'
    ``add_state(name, default, dist_reduce_fx=...)``)::

        r = EpochReducer()
        r.add_state("n_train", "sum")                 # examples this rank saw this epoch
        r.add_state("train_loss", "mean", weight="n_train")
        r.add_state("host_grad_norm", "max")

    :meth:`reduce` then takes a mapping with exactly these keys. Across ranks it costs one
    24-byte handshake (schema fingerprint, length, ok flag) and one ``all_gather`` of a flat
    float64 vector of ``len(schema)`` values. The gather (rather than an all_reduce) lets
    one collective carry SUM, MAX and weighted MEAN states together, and every rank reduces
    the same matrix in rank order, so all ranks get bit-identical results.
    """

    def __init__(self, states: Iterable[StateSpec | tuple[str, str] | tuple[str, str, str | None]] = ()) -> None:
        self._states: list[StateSpec] = []
        for s in states:
            if isinstance(s, StateSpec):
                self.add_state(s.key, s.reduction, weight=s.weight)
            else:
                self.add_state(*s[:2], weight=s[2] if len(s) > 2 else None)

    def add_state(self, key: str, reduction: Reduction | str, *, weight: str | None = None) -> None:
        """Append one state. A MEAN needs ``weight``, the key of a SUM state declared earlier."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"state keys must be non-empty strings, got {key!r}")
        try:
            red = Reduction(reduction)
        except ValueError:
            raise ValueError(f"unknown reduction {reduction!r}; use one of {[r.value for r in Reduction]}") from None
        known = {s.key: s for s in self._states}
        if key in known:
            raise ValueError(f"state {key!r} is declared twice")
        if red is Reduction.MEAN:
            if weight is None:
                raise ValueError(f"MEAN state {key!r} needs weight= (a SUM state: the example count)")
            if weight not in known or known[weight].reduction is not Reduction.SUM:
                raise ValueError(f"weight {weight!r} of {key!r} must be a SUM state declared before it")
        elif weight is not None:
            raise ValueError(f"only MEAN states take a weight ({key!r} is {red.value})")
        self._states.append(StateSpec(key, red, weight))

    @property
    def schema(self) -> tuple[StateSpec, ...]:
        return tuple(self._states)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(s.key for s in self._states)

    def fingerprint(self) -> int:
        """Signed 64-bit digest of the ordered (key, reduction, weight) list."""
        return _fingerprint(_schema_items(self._states))

    def local_vector(self, values: Mapping[str, object]) -> tuple[np.ndarray | None, str | None]:
        """``values`` as a float64 vector in schema order, or ``(None, reason)`` if malformed.

        Weights (the SUM states MEANs use) must be finite and >= 0. Other values may be NaN
        or inf: a diverged rank must show up in the reduced numbers, not be rejected.
        """
        keys = self.keys
        missing = [k for k in keys if k not in values]
        extra = [k for k in values if k not in set(keys)]
        if missing or extra:
            return None, f"values do not match the declared schema: missing {missing}, undeclared {extra}"
        try:
            vec = np.array([float(values[k]) for k in keys], dtype=np.float64)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            return None, f"a value is not a number: {exc}"
        for s in self._states:
            if s.weight is not None:
                w = vec[keys.index(s.weight)]
                if not (math.isfinite(w) and w >= 0):
                    return None, f"weight {s.weight!r} of {s.key!r} must be finite and >= 0, got {w}"
        return vec, None

    def reduce(self, values: Mapping[str, object], *, group: Any = None) -> dict[str, float]:
        """Reduce this rank's ``values`` with every other rank's; every rank gets the result.

        Must be called collectively (every rank of ``group``, same number of times). Without
        an initialised process group (or with one rank) it reduces the single local row, so
        the same code runs in a single process. Raises, on every rank:
        :class:`SchemaMismatchError` if a rank declared a different schema,
        :class:`RankDisagreementError` if a SAME state differs, ValueError (on the rank with
        malformed values) / :class:`DistributedReductionError` (on the others).
        """
        vec, error = self.local_vector(values)
        dist = _dist_for(group)
        if dist is None:
            if error is not None:
                raise ValueError(error)
            return reduce_rows(self._states, vec[None, :])  # type: ignore[index]
        header = np.array([self.fingerprint(), len(self._states), 0 if error else 1], dtype=np.int64)
        headers = _all_gather_rows(dist, group, header, _torch_dtype("int64"))
        if np.any(headers[:, 2] == 0) or np.any(headers[:, :2] != headers[0, :2]):
            # The rare path: one more (pickled) exchange so the error can name rank and key.
            details = _all_gather_objects(dist, group, (_schema_items(self._states), error))
            raise _reduction_failure(details, dist.get_rank(group))
        rows = _all_gather_rows(dist, group, vec, _torch_dtype("float64"))  # type: ignore[arg-type]
        return reduce_rows(self._states, rows)


def _torch_dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, name)


def _schema_items(states: Sequence[StateSpec]) -> list[tuple[str, str, str | None]]:
    return [(s.key, s.reduction.value, s.weight) for s in states]


def _describe_item(item: tuple) -> str:
    key, red, weight = item
    return f"{key!r} ({red}{', weight ' + weight if weight else ''})"


def schema_mismatch(schemas: Sequence[Sequence[tuple[str, str, str | None]]]) -> SchemaMismatchError | None:
    """The :class:`SchemaMismatchError` for per-rank schemas (rank order), or None if all agree.

    Compares every rank with rank 0 and reports the lowest rank that differs. The key named
    is the first key that rank declares and rank 0 does not, else the first key rank 0
    declares and that rank lacks, else (same keys, different order or reduction) the key at
    the first differing position. Pure; every rank computes the same error.
    """
    ref = [tuple(i) for i in schemas[0]]
    for rank, schema in enumerate(schemas[1:], start=1):
        items = [tuple(i) for i in schema]
        if items == ref:
            continue
        ref_keys, their_keys = [i[0] for i in ref], [i[0] for i in items]
        only_theirs = [k for k in their_keys if k not in ref_keys]
        only_ours = [k for k in ref_keys if k not in their_keys]
        if only_theirs:
            key = only_theirs[0]
            pos = their_keys.index(key)
            what = f"rank {rank} declares {_describe_item(items[pos])}, which rank 0 does not"
        elif only_ours:
            key = only_ours[0]
            pos = ref_keys.index(key)
            what = f"rank {rank} lacks {_describe_item(ref[pos])}, which rank 0 declares"
        else:
            pos = next(i for i, (a, b) in enumerate(zip(ref, items)) if a != b)
            key = items[pos][0]
            what = f"rank {rank} has {_describe_item(items[pos])} where rank 0 has {_describe_item(ref[pos])}"
        msg = (
            f"telemetry schema of rank {rank} differs from rank 0's at key {key!r} (position {pos}): {what}"
            f" (keys only on rank {rank}: {only_theirs}; only on rank 0: {only_ours}). "
            "Nothing was reduced: every rank must declare the same states in the same order."
        )
        return SchemaMismatchError(msg, rank=rank, key=key, position=pos)
    return None


def _reduction_failure(details: Sequence[object], my_rank: int) -> Exception:
    """The exception this rank raises after a failed handshake (same kind on every rank)."""
    errors = [(r, d[1]) for r, d in enumerate(details) if d[1] is not None]  # type: ignore[index]
    if errors:
        mine = dict(errors).get(my_rank)
        if mine is not None:
            return ValueError(mine)
        r, msg = errors[0]
        return DistributedReductionError(f"rank {r} could not produce its values, nothing was reduced: {msg}")
    mismatch = schema_mismatch([d[0] for d in details])  # type: ignore[index]
    return mismatch or DistributedReductionError("schema fingerprints differ but the schemas compare equal")


def reduce_rows(states: Sequence[StateSpec], rows: np.ndarray) -> dict[str, float]:
    """Reduce a ``(ranks, len(states))`` float64 matrix (rank order) column by column.

    The stateless half of :class:`EpochReducer` (torchmetrics' ``_compute``), usable on
    simulated ranks. SUM/MAX/MIN propagate NaN (a diverged rank stays visible). MEAN is
    ``sum_r w_r x_r / sum_r w_r`` over ranks with ``w_r > 0`` (NaN when no rank saw an
    example). SAME returns the common value or raises :class:`RankDisagreementError`.
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != len(states) or rows.shape[0] < 1:
        raise ValueError(f"expected a (ranks, {len(states)}) matrix, got shape {rows.shape}")
    col = {s.key: i for i, s in enumerate(states)}
    out: dict[str, float] = {}
    for i, s in enumerate(states):
        x = rows[:, i]
        if s.reduction is Reduction.SUM:
            out[s.key] = float(np.sum(x))
        elif s.reduction is Reduction.MAX:
            out[s.key] = float(np.max(x))
        elif s.reduction is Reduction.MIN:
            out[s.key] = float(np.min(x))
        elif s.reduction is Reduction.MEAN:
            w = rows[:, col[s.weight]]  # type: ignore[index]
            used = w > 0  # a rank without examples has no mean to contribute (may be NaN)
            total = float(np.sum(w[used]))
            # Normalise the weights first: one rank's value (or equal values on equal shards)
            # then comes back bit-identical, which (w * x) / w does not guarantee.
            out[s.key] = float(np.dot(w[used] / total, x[used])) if total > 0 else float("nan")
        else:  # SAME
            same = np.all((x == x[0]) | (np.isnan(x) & np.isnan(x[0])))
            if not same:
                per_rank = ", ".join(f"rank {r} has {v:g}" for r, v in enumerate(x))
                raise RankDisagreementError(f"{s.key!r} must be equal on every rank (it is not averaged): {per_rank}")
            out[s.key] = float(x[0])
    return out


# =========================================================================== host snapshots

HOST_SNAPSHOT_STATES: tuple[StateSpec, ...] = (
    StateSpec("n_train_examples", Reduction.SUM),  # examples this rank trained on this epoch
    StateSpec("n_val_examples", Reduction.SUM),  # validation examples this rank evaluated
    StateSpec("epoch", Reduction.SAME),
    StateSpec("train_loss", Reduction.MEAN, "n_train_examples"),
    StateSpec("train_accuracy", Reduction.MEAN, "n_train_examples"),
    StateSpec("val_loss", Reduction.MEAN, "n_val_examples"),
    StateSpec("val_accuracy", Reduction.MEAN, "n_val_examples"),
    # Replicas of one model (DDP): the counts are equal by construction, summing them would
    # multiply the model's size by the world size. A difference means the ranks diverged.
    StateSpec("host_params", Reduction.SAME),
    StateSpec("total_seed_params", Reduction.SAME),
    StateSpec("total_params", Reduction.SAME),
    StateSpec("fossilized_params", Reduction.SAME),
    StateSpec("host_grad_norm", Reduction.MAX),
)
"""The fixed part of a :class:`HostSnapshot`'s reduction schema, in order. Then, only when
the snapshot has them: ``grad_isolation_leakage`` (MAX) and one ``seed_grad_norms[<slot>]``
(MAX) per slot, slots sorted by id."""

_LEAKAGE_KEY = "grad_isolation_leakage"


def _seed_key(slot_id: str) -> str:
    return f"seed_grad_norms[{slot_id}]"


def host_snapshot_reducer(seed_slots: Iterable[str], *, has_leakage: bool) -> EpochReducer:
    """The :class:`EpochReducer` for a HostSnapshot with these gradient-norm slots.

    The per-slot keys are part of the schema, so a rank that reports a slot the others do
    not (or a leakage value the others lack) fails the handshake instead of being
    reduced into another slot's number. Slots are sorted: dict order is not a disagreement.
    """
    reducer = EpochReducer(HOST_SNAPSHOT_STATES)
    if has_leakage:
        reducer.add_state(_LEAKAGE_KEY, Reduction.MAX)
    for sid in sorted(seed_slots):
        reducer.add_state(_seed_key(sid), Reduction.MAX)
    return reducer


def _host_snapshot_values(local: HostSnapshot, n_examples: object, n_val_examples: object) -> dict[str, object]:
    """The snapshot as schema values. Not converted here: the reducer reports bad values
    collectively (see the module docstring)."""
    values: dict[str, object] = {
        "n_train_examples": n_examples,
        "n_val_examples": n_val_examples,
        "epoch": local.epoch,
        "train_loss": local.train_loss,
        "train_accuracy": local.train_accuracy,
        "val_loss": local.val_loss,
        "val_accuracy": local.val_accuracy,
        "host_params": local.host_params,
        "total_seed_params": local.total_seed_params,
        "total_params": local.total_params,
        "fossilized_params": local.fossilized_params,
        "host_grad_norm": local.host_grad_norm,
    }
    if local.grad_isolation_leakage is not None:
        values[_LEAKAGE_KEY] = local.grad_isolation_leakage
    for sid, norm in local.seed_grad_norms.items():
        values[_seed_key(sid)] = norm
    return values


def reduce_host_snapshot(
    local: HostSnapshot,
    n_examples: int,
    *,
    n_val_examples: int | None = None,
    group: Any = None,
) -> HostSnapshot:
    """The job-wide HostSnapshot from every rank's own one (call on every rank, collectively).

    ``n_examples``: training examples this rank processed this epoch (the weight of
    ``train_loss`` / ``train_accuracy``). ``n_val_examples``: validation examples behind this
    rank's ``val_loss`` / ``val_accuracy`` (the shard size when validation is sharded);
    defaults to ``n_examples``, which is right whenever every rank evaluates the same set.

    Reductions (:data:`HOST_SNAPSHOT_STATES`): losses and accuracies are example-weighted
    means (so equal to a single pass over all ranks' examples), gradient norms and leakage
    are the MAX over ranks, epoch and parameter counts must agree. Every rank receives the
    result; rank 0 emits it with ``is_reduced=True`` next to its own per-rank snapshot
    (``is_reduced=False``), which every rank emits. Raises on every rank as
    :meth:`EpochReducer.reduce` does.
    """
    reducer = host_snapshot_reducer(local.seed_grad_norms, has_leakage=local.grad_isolation_leakage is not None)
    n_val = n_examples if n_val_examples is None else n_val_examples
    out = reducer.reduce(_host_snapshot_values(local, n_examples, n_val), group=group)
    return HostSnapshot(
        epoch=int(out["epoch"]),
        train_loss=out["train_loss"],
        train_accuracy=out["train_accuracy"],
        val_loss=out["val_loss"],
        val_accuracy=out["val_accuracy"],
        host_params=int(out["host_params"]),
        total_seed_params=int(out["total_seed_params"]),
        total_params=int(out["total_params"]),
        fossilized_params=int(out["fossilized_params"]),
        host_grad_norm=out["host_grad_norm"],
        seed_grad_norms={sid: out[_seed_key(sid)] for sid in local.seed_grad_norms},
        grad_isolation_leakage=out.get(_LEAKAGE_KEY),
    )


# =========================================================================== counterfactuals


class DistributedEvaluationError(RuntimeError):
    """Ranks could not combine their counterfactual evaluations; raised on every rank."""


def shard_indices(n: int, rank: int, world_size: int) -> slice:
    """The contiguous slice of ``n`` validation examples that ``rank`` evaluates.

    Shards are in rank order and differ in size by at most one (the first ``n % world_size``
    ranks get one more, as ``numpy.array_split``), so concatenating every rank's results in
    rank order restores the original example order. Works on tensors and arrays alike.
    """
    for name, v in (("n", n), ("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    RankInfo(int(rank), int(world_size))  # validates the pair
    base, extra = divmod(int(n), int(world_size))
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _local_arrays(local: Sequence[ConfigEvaluation | np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """(correct per config, loss per config or None); ValueError when malformed."""
    evals = [r if isinstance(r, ConfigEvaluation) else ConfigEvaluation(r) for r in local]
    correct = [np.asarray(e.correct, dtype=np.float64) for e in evals]
    with_loss = [e.loss is not None for e in evals]
    if any(with_loss) and not all(with_loss):
        raise ValueError("either every configuration has a per-example loss or none has")
    loss = [np.asarray(e.loss, dtype=np.float64) for e in evals] if evals and all(with_loss) else None
    for i, arr in enumerate(correct + (loss or [])):
        if arr.ndim != 1 or arr.shape[0] != correct[0].shape[0]:
            raise ValueError(
                f"result {i % len(correct)}: every configuration must have the same number of examples "
                f"on this rank ({correct[0].shape[0]}), got shape {arr.shape}"
            )
    return correct, loss


def gather_evaluations(
    local: Sequence[ConfigEvaluation | np.ndarray],
    *,
    configs: Sequence[tuple[bool, ...]] | None = None,
    group: Any = None,
) -> list[ConfigEvaluation]:
    """Concatenate every rank's per-example results, configuration by configuration, in rank order.

    ``local[i]`` is this rank's result for configuration i on its shard (see
    :func:`shard_indices`); shards may differ in size. Every rank returns the full results:
    per configuration, ``correct`` (and ``loss`` when every rank measured it) as float64
    arrays over all examples, equal to a single-process evaluation of the whole set when the
    shards are contiguous in rank order. With ``configs`` given, the ranks also verify that
    they evaluated the same configurations in the same order.

    Must be called collectively. Costs one 40-byte handshake and one all_gather of a
    ``(configs, 1 or 2, largest shard)`` float64 tensor (padded, as shards differ by one).
    Raises :class:`DistributedEvaluationError` on every rank when the ranks disagree.
    """
    return _gather_evaluations(local, configs, group, None)


def _gather_evaluations(
    local: Sequence[ConfigEvaluation | np.ndarray] | None,
    configs: Sequence[tuple[bool, ...]] | None,
    group: Any,
    local_error: str | None,
) -> list[ConfigEvaluation]:
    correct: list[np.ndarray] = []
    loss: list[np.ndarray] | None = None
    if local_error is None:
        try:
            correct, loss = _local_arrays(local or [])
        except ValueError as exc:
            local_error = str(exc)
    dist = _dist_for(group)
    if dist is None:
        if local_error is not None:
            raise DistributedEvaluationError(local_error)
        return [ConfigEvaluation(c, l) for c, l in zip(correct, loss or [None] * len(correct))]

    n_local = correct[0].shape[0] if correct else 0
    cfg_key = _fingerprint([tuple(bool(b) for b in c) for c in configs]) if configs is not None else 0
    header = np.array(
        [0 if local_error else 1, len(correct), n_local, loss is not None, cfg_key], dtype=np.int64
    )
    headers = _all_gather_rows(dist, group, header, _torch_dtype("int64"))
    agree = headers[:, [1, 3, 4]] == headers[0, [1, 3, 4]]
    if np.any(headers[:, 0] == 0) or not np.all(agree):
        summary = (local_error, len(correct), loss is not None, None if configs is None else list(configs))
        details = _all_gather_objects(dist, group, summary)
        raise DistributedEvaluationError(_describe_evaluation_mismatch(details))

    n_configs, has_loss = int(headers[0, 1]), bool(headers[0, 3])
    sizes = [int(s) for s in headers[:, 2]]
    if n_configs == 0:
        return []
    width = max(sizes)
    packed = np.full((n_configs, 1 + has_loss, width), np.nan)
    for i, c in enumerate(correct):
        packed[i, 0, :n_local] = c
        if loss is not None:
            packed[i, 1, :n_local] = loss[i]
    rows = _all_gather_rows(dist, group, packed, _torch_dtype("float64"))  # (world, configs, 1|2, width)
    out = []
    for i in range(n_configs):
        c_all = np.concatenate([rows[r, i, 0, : sizes[r]] for r in range(len(sizes))])
        l_all = np.concatenate([rows[r, i, 1, : sizes[r]] for r in range(len(sizes))]) if has_loss else None
        out.append(ConfigEvaluation(c_all, l_all))
    return out


def _describe_evaluation_mismatch(details: Sequence[Any]) -> str:
    """Why the ranks' evaluations cannot be combined; ``details[r]`` is rank r's
    ``(error, n_configs, has_loss, configs)``."""
    failed = [(r, err) for r, (err, *_rest) in enumerate(details) if err is not None]
    if failed:
        return "; ".join(f"rank {r} failed to evaluate its shard: {msg}" for r, msg in failed)
    _, n_ref, loss_ref, cfg_ref = details[0]
    for r, (_, n, has_loss, cfgs) in enumerate(details[1:], start=1):
        if n != n_ref:
            return f"rank {r} returned {n} configurations, rank 0 returned {n_ref}"
        if has_loss != loss_ref:
            return (
                f"rank {r} {'has' if has_loss else 'lacks'} per-example losses and rank 0 "
                f"{'has' if loss_ref else 'lacks'} them: every rank must measure the same things"
            )
        if cfgs != cfg_ref:
            return (
                f"rank {r} evaluated configurations {cfgs} but rank 0 evaluated {cfg_ref}: every rank must "
                "request the same configurations in the same order (same CounterfactualConfig, no time budget)"
            )
    return "ranks disagree on the evaluation layout"


def make_distributed_evaluate(local_evaluate: Evaluate, *, group: Any = None) -> Evaluate:
    """Wrap an evaluate over this rank's validation shard into one over the whole set.

    ``local_evaluate(configs)`` evaluates the configurations on this rank's shard only
    (:func:`shard_indices`); the returned ``evaluate(configs)`` does that, then gathers the
    per-example results of every rank (:func:`gather_evaluations`), so each configuration
    costs ``1 / world_size`` of a full validation pass per rank plus one all_gather.

    The returned function performs collectives, so every rank must call it the same number
    of times with the same configurations in the same order. Driving it from
    :func:`~karn_otel.counterfactual.attribute` on every rank satisfies this: ``attribute``
    is deterministic given its inputs (its permutations and bootstrap resamples come from
    ``CounterfactualConfig.seed``, its memo and budget by configuration count are pure), and
    every rank receives the same gathered arrays, so every rank requests the same
    configurations in the same order and computes the same matrix. The one exception is a
    wall-clock budget (``timeout_seconds``): each rank reads its own clock, so ranks could
    stop after different requests and the others would wait forever; use
    :func:`distributed_attribute`, which refuses it. The ranks check that they asked for the
    same configurations and raise :class:`DistributedEvaluationError` if not. A rank whose
    ``local_evaluate`` raises still takes part in the exchange (so nobody hangs) and every
    rank raises.
    """

    def evaluate(configs: list[tuple[bool, ...]]) -> list[ConfigEvaluation]:
        if _dist_for(group) is None:  # one process: nothing to coordinate, let errors propagate
            return gather_evaluations(local_evaluate(configs), configs=configs, group=group)
        try:
            local = local_evaluate(configs)
            error = None
        except Exception as exc:  # reported collectively below, then raised on every rank
            local, error = None, f"{type(exc).__name__}: {exc}"
        return _gather_evaluations(local, configs, group, error)

    return evaluate


def distributed_attribute(
    local_evaluate: Evaluate,
    slot_ids: Sequence[str],
    config: CounterfactualConfig,
    *,
    epoch: int = 0,
    group: Any = None,
) -> CounterfactualMatrix:
    """:func:`~karn_otel.counterfactual.attribute` with validation sharded over the ranks.

    Call on every rank, with the same ``slot_ids`` and ``config``; ``local_evaluate``
    evaluates this rank's shard. Every rank returns the same matrix (only ``elapsed_s``
    differs), equal to a single-process ``attribute`` over the whole validation set as long
    as the model computes each example's output independently of its batch companions
    (bit-identical on CPU in tests and benchmarks/bench_distributed_counterfactual.py; on a
    GPU, kernels chosen by batch size can change the last bits of a loss and, rarely, flip a
    near-tie prediction). Rank 0 emits it with ``is_reduced=True``.

    Raises ValueError (on every rank) when ``config.timeout_seconds`` is set: a per-rank
    clock would let ranks leave the collective sequence at different points (a hang); use
    ``max_configurations``, which every rank counts alike.
    """
    if config.timeout_seconds is not None and _dist_for(group) is not None:
        raise ValueError(
            "timeout_seconds cannot be used with distributed counterfactuals: each rank would read its "
            "own clock and the ranks could stop after different evaluations (a hang); use max_configurations"
        )
    return attribute(make_distributed_evaluate(local_evaluate, group=group), slot_ids, config, epoch=epoch)


# =========================================================================== liveness

RANK_MISSING_CHECK = "rank_missing"
"""``HealthAlert.check`` of a rank that stopped reporting (critical)."""


@dataclass(frozen=True)
class Heartbeat:
    """The last thing a rank reported: its epoch, when (unix seconds, wall clock), and whether
    it finished cleanly (a finished rank is never missing)."""

    rank: int
    epoch: int
    time: float
    pid: int = 0
    host: str = ""
    finished: bool = False


def _heartbeat_path(directory: Path, rank: int) -> Path:
    return directory / f"rank{rank}.json"


class RankHeartbeat:
    """One rank's heartbeat file ``<directory>/rank<k>.json``, rewritten by :meth:`beat`.

    No collectives: a collective would hang on exactly the failure it should detect. Each
    write goes to a temporary file renamed over the old one (atomic on POSIX), so a reader
    never sees half a file. The directory must be visible to rank 0 (the run directory on
    one node; a shared filesystem across nodes, whose clocks must then be synchronised, as
    ages compare wall-clock times written by different hosts). A beat costs a small file
    write (~0.1 ms), so beating every epoch, or every few hundred batches, is cheap.
    Constructing one records an initial beat at ``epoch`` 0, so a rank that started is
    distinguishable from one that never came up.
    """

    def __init__(self, directory: str | os.PathLike[str], rank: int, *, clock: Callable[[], float] = time.time) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be an int >= 0, got {rank!r}")
        self.directory = Path(directory)
        self.rank = rank
        self._clock = clock
        self.directory.mkdir(parents=True, exist_ok=True)
        self.beat(0)

    @property
    def path(self) -> Path:
        return _heartbeat_path(self.directory, self.rank)

    def beat(self, epoch: int, *, finished: bool = False) -> Heartbeat:
        """Record that this rank is alive at ``epoch`` now."""
        hb = Heartbeat(self.rank, int(epoch), float(self._clock()), os.getpid(), socket.gethostname(), finished)
        fd, tmp = tempfile.mkstemp(prefix=f".rank{self.rank}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(dataclasses.asdict(hb), f)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; monitoring tools may read it too
            # No fsync: readers are other processes (same page cache or NFS close-to-open),
            # and surviving a machine crash is not what a liveness file is for.
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return hb

    def finish(self, epoch: int) -> Heartbeat:
        """Mark a clean exit, so that the silence that follows is not reported as missing."""
        return self.beat(epoch, finished=True)


def read_heartbeats(directory: str | os.PathLike[str], world_size: int) -> dict[int, Heartbeat]:
    """The readable heartbeats of ranks ``0 .. world_size - 1``; absent or unreadable ones are left out."""
    out: dict[int, Heartbeat] = {}
    for rank in range(world_size):
        try:
            data = json.loads(_heartbeat_path(Path(directory), rank).read_text())
            hb = Heartbeat(**data)
        except (OSError, ValueError, TypeError):
            continue  # not written yet, or not ours: the rank counts as silent
        numbers_ok = isinstance(hb.epoch, int) and isinstance(hb.time, (int, float)) and not isinstance(hb.time, bool)
        if hb.rank == rank and numbers_ok:
            out[rank] = hb
    return out


def missing_ranks(
    directory: str | os.PathLike[str], world_size: int, timeout_s: float, *, now: float | None = None
) -> list[int]:
    """Ranks with no heartbeat newer than ``timeout_s`` seconds (sorted), finished ranks excluded.

    A rank with no (readable) heartbeat file is missing. ``now`` is unix seconds (default:
    the wall clock). Choose ``timeout_s`` above the longest gap between beats (an epoch
    with its counterfactual pass), e.g. three times the typical epoch time.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    now = time.time() if now is None else now
    beats = read_heartbeats(directory, world_size)
    return [
        r for r in range(world_size) if r not in beats or (not beats[r].finished and now - beats[r].time > timeout_s)
    ]


def missing_rank_count(
    directory: str | os.PathLike[str], world_size: int, timeout_s: float, *, now: float | None = None
) -> int:
    """Number of missing ranks: the value of the ``karn.ranks.missing`` gauge (callback-friendly)."""
    return len(missing_ranks(directory, world_size, timeout_s, now=now))


def rank_missing_alert(
    missing: Sequence[int],
    world_size: int,
    timeout_s: float,
    heartbeats: Mapping[int, Heartbeat] | None = None,
    *,
    now: float | None = None,
) -> HealthAlert | None:
    """The critical ``rank_missing`` HealthAlert naming the missing ranks (None if there are none).

    ``value`` is the number of missing ranks, ``threshold`` 0 (any missing rank fails the
    check). With ``heartbeats`` the message says each rank's last epoch and its age.
    """
    if not missing:
        return None
    now = time.time() if now is None else now
    heartbeats = heartbeats or {}
    parts = []
    for r in missing:
        hb = heartbeats.get(r)
        if hb is None:
            parts.append(f"rank {r} never reported")
        else:
            parts.append(f"rank {r} last reported epoch {hb.epoch} {now - hb.time:.1f} s ago")
    names = ", ".join(str(r) for r in missing)
    message = (
        f"rank{'s' if len(missing) > 1 else ''} {names} of {world_size} stopped reporting "
        f"(no heartbeat for over {timeout_s:g} s): " + "; ".join(parts)
    )
    return HealthAlert(RANK_MISSING_CHECK, Severity.CRITICAL, message, float(len(missing)), 0.0)


class MissingRankMonitor:
    """Rank 0's view of the heartbeats: the gauge value and edge-triggered alerts.

    :meth:`count` feeds the ``karn.ranks.missing`` gauge; :meth:`check` returns a
    ``rank_missing`` HealthAlert when a rank newly goes missing (none while the same ranks
    stay missing, a new one if a recovered rank goes missing again), like the HealthMonitor.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        world_size: int,
        timeout_s: float,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        RankInfo(0, world_size)  # validates world_size
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.directory = Path(directory)
        self.world_size = world_size
        self.timeout_s = float(timeout_s)
        self._clock = clock
        self._alerted: set[int] = set()

    def missing(self) -> list[int]:
        return missing_ranks(self.directory, self.world_size, self.timeout_s, now=self._clock())

    def count(self) -> int:
        return len(self.missing())

    def check(self) -> HealthAlert | None:
        now = self._clock()
        missing = missing_ranks(self.directory, self.world_size, self.timeout_s, now=now)
        new = [r for r in missing if r not in self._alerted]
        self._alerted = set(missing)  # recovered ranks leave the set: a relapse alerts again
        if not new:
            return None
        beats = read_heartbeats(self.directory, self.world_size)
        return rank_missing_alert(missing, self.world_size, self.timeout_s, beats, now=now)


# =========================================================================== launcher


@dataclass(frozen=True)
class SpawnResult:
    """What :func:`spawn` observed.

    ``exit_codes[k]`` is rank k's exit code (0 = success, negative = killed by that signal,
    e.g. -15 when :func:`spawn` terminated a rank left waiting for a failed peer).
    ``first_failure`` is the rank that failed first (None if none failed, and when the job
    as a whole ran past its timeout: then ``timed_out`` is True and the ranks still running
    were terminated). ``errors`` maps a rank to the traceback of the exception its
    function raised.
    """

    exit_codes: tuple[int, ...]
    first_failure: int | None
    errors: dict[int, str]
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.first_failure is None and all(c == 0 for c in self.exit_codes)

    def describe(self) -> str:
        """One line per failed rank, the first failure first (empty when :attr:`ok`)."""
        if self.ok:
            return ""
        order = [self.first_failure] if self.first_failure is not None else []
        order += [r for r, c in enumerate(self.exit_codes) if c != 0 and r not in order]
        lines = []
        for r in order:
            err = self.errors.get(r, "").strip().splitlines()
            why = f": {err[-1]}" if err else ""
            tag = " (first failure)" if r == self.first_failure else ""
            lines.append(f"rank {r} exited with code {self.exit_codes[r]}{tag}{why}")
        if self.timed_out:
            lines.append("the job exceeded its timeout and was terminated")
        return "\n".join(lines)


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it; a tiny race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def _child_main(
    fn: Callable[..., object],
    rank: int,
    nproc: int,
    port: int,
    backend: str,
    args: tuple,
    num_threads: int | None,
    collective_timeout_s: float | None,
    error_dir: str,
) -> None:
    """Entry point of one spawned rank: environment, process group, ``fn(RankInfo, *args)``."""
    os.environ.update(
        {
            ENV_RANK: str(rank),
            ENV_WORLD_SIZE: str(nproc),
            ENV_LOCAL_RANK: str(rank),
            ENV_MASTER_ADDR: "127.0.0.1",
            ENV_MASTER_PORT: str(port),
        }
    )
    loopback = _loopback_interface()
    if loopback and backend == "gloo":
        # Without this gloo binds to the interface of the host name, which may not be loopback.
        os.environ.setdefault(_ENV_GLOO_IFNAME, loopback)
    import torch
    import torch.distributed as dist

    if num_threads is not None:
        torch.set_num_threads(num_threads)  # N ranks x all cores each would oversubscribe
    code = 0
    try:
        kwargs = {"timeout": timedelta(seconds=collective_timeout_s)} if collective_timeout_s else {}
        dist.init_process_group(backend, rank=rank, world_size=nproc, **kwargs)
        fn(RankInfo(rank, nproc, rank), *args)
    except SystemExit as exc:  # fn chose its exit code
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        Path(error_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        sys.stderr.write(f"[karn rank {rank}] " + traceback.format_exc())
        code = 1
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a peer already gone must not turn success into failure
                pass
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        os._exit(code)  # skip interpreter teardown: nothing left to flush, and it can block on dead peers


def spawn(
    fn: Callable[..., object],
    nproc: int,
    args: tuple = (),
    *,
    backend: str = "gloo",
    num_threads: int | None = None,
    timeout_s: float | None = None,
    grace_s: float = 30.0,
    collective_timeout_s: float | None = None,
) -> SpawnResult:
    """Run ``fn(RankInfo, *args)`` in ``nproc`` processes on this machine, one per rank.

    For ``karn run --nproc N``. Each child is started with torch.multiprocessing's *spawn*
    method, gets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` and ``MASTER_ADDR=127.0.0.1`` with
    a free ``MASTER_PORT``, and joins a ``backend`` process group (gloo: CPU; use "nccl" with
    one GPU per local rank) before ``fn`` runs; the group is destroyed after. ``fn`` must be
    importable by name (a module-level function) and ``args`` picklable.

    ``num_threads``: torch threads per rank (default: torch's, i.e. every core, per rank).
    When a rank fails, the others get ``grace_s`` seconds to finish (they may be stuck in a
    collective waiting for it) and are then terminated. ``timeout_s`` bounds the whole job
    (seconds; None = no limit). ``collective_timeout_s`` is the process group's timeout.
    Never raises for a failing rank: the :class:`SpawnResult` names it.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    if grace_s < 0 or (timeout_s is not None and not timeout_s > 0):
        raise ValueError("grace_s must be >= 0 and timeout_s > 0 or None")
    import multiprocessing.connection as mpc

    import torch.multiprocessing as torch_mp

    ctx = torch_mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="karn-spawn-") as error_dir:
        procs = [
            ctx.Process(
                target=_child_main,
                args=(fn, r, nproc, port, backend, tuple(args), num_threads, collective_timeout_s, error_dir),
                name=f"karn-rank{r}",
            )
            for r in range(nproc)
        ]
        try:
            for p in procs:
                p.start()
            first_failure, timed_out = _supervise(procs, mpc, grace_s, timeout_s)
        except BaseException:  # Ctrl-C or a start failure: leave no orphaned ranks behind
            for p in procs:
                if p.pid is not None and p.is_alive():
                    _terminate(p)
            raise
        errors = {}
        for r in range(nproc):
            f = Path(error_dir, f"rank{r}.err")
            if f.exists():
                errors[r] = f.read_text()
    codes = tuple(int(p.exitcode) if p.exitcode is not None else -9 for p in procs)
    if first_failure is None and any(codes) and not timed_out:  # e.g. killed while the last to finish
        first_failure = next(r for r, c in enumerate(codes) if c)
    return SpawnResult(codes, first_failure, errors, timed_out)


def _supervise(procs: list, mpc: Any, grace_s: float, timeout_s: float | None) -> tuple[int | None, bool]:
    """Wait for the ranks; after the first failure give the rest ``grace_s``, then terminate them."""
    start = time.monotonic()
    deadline = start + timeout_s if timeout_s is not None else math.inf
    first_failure: int | None = None
    timed_out = False
    running = set(range(len(procs)))
    while running:
        wait_s = max(0.0, deadline - time.monotonic())
        ready = mpc.wait([procs[r].sentinel for r in running], timeout=None if math.isinf(wait_s) else wait_s)
        for r in sorted(running):
            if procs[r].sentinel in ready:
                procs[r].join()
                running.discard(r)
                if procs[r].exitcode != 0 and first_failure is None:
                    first_failure = r
                    deadline = min(deadline, time.monotonic() + grace_s)
        if running and time.monotonic() >= deadline:
            timed_out = first_failure is None
            for r in sorted(running):
                _terminate(procs[r])
            running.clear()
    return first_failure, timed_out


def _terminate(proc: Any) -> None:
    proc.terminate()
    proc.join(5.0)
    if proc.is_alive():
        proc.kill()
        proc.join()
