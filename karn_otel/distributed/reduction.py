"""Cross-rank reduction over a fixed schema: :class:`EpochReducer` and the HostSnapshot reduction.

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

Error discipline. A check that could fail on one rank only must not raise before the
collective that the other ranks are already waiting in: they would hang. So local problems
(a malformed value) are carried into the handshake as a flag, every rank learns about them,
and every rank raises. Only input that is the same on every rank by construction is
validated eagerly. Rank numbers in messages are ranks *within the process group* passed as
``group`` (the global rank for the default group).

numpy only: without a process group (or with one rank) the local row is reduced in place;
the gathers themselves are in :mod:`karn_otel.torch.collectives`, imported only when a
collective is taken.
"""

from __future__ import annotations

import enum
import hashlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from karn_otel.contracts import MAX_NAMED_UNHEALTHY, HostSnapshot, RankHealthSummary, RankSpread, Severity
from karn_otel.ranks import dist_for

__all__ = [
    "HOST_SNAPSHOT_STATES",
    "DistributedReductionError",
    "EpochReducer",
    "RankDisagreementError",
    "Reduction",
    "SchemaMismatchError",
    "StateSpec",
    "host_snapshot_reducer",
    "rank_health_summary",
    "rank_spread",
    "reduce_epoch",
    "reduce_host_snapshot",
    "reduce_rows",
    "schema_mismatch",
]


def _fingerprint(items: object) -> int:
    """A stable signed 64-bit digest of ``repr(items)`` (fits an int64 tensor exactly)."""
    digest = hashlib.blake2b(repr(items).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


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
        return reduce_rows(self._states, self.gather(values, group=group))

    def gather(self, values: Mapping[str, object], *, group: Any = None) -> np.ndarray:
        """Every rank's ``values`` as a ``(ranks, len(schema))`` float64 matrix in rank order.

        The collective half of :meth:`reduce` (same handshake, same errors): for callers that
        need the per-rank rows themselves (the spread across ranks, :func:`reduce_epoch`).
        """
        vec, error = self.local_vector(values)
        dist = dist_for(group)
        if dist is None:
            if error is not None:
                raise ValueError(error)
            return vec[None, :]  # type: ignore[index]
        from karn_otel.torch import collectives

        header = np.array([self.fingerprint(), len(self._states), 0 if error else 1], dtype=np.int64)
        headers = collectives.all_gather_rows(header, "int64", group)
        if np.any(headers[:, 2] == 0) or np.any(headers[:, :2] != headers[0, :2]):
            # The rare path: one more (pickled) exchange so the error can name rank and key.
            details = collectives.all_gather_objects((_schema_items(self._states), error), group)
            raise _reduction_failure(details, dist.get_rank(group))
        rows: np.ndarray = collectives.all_gather_rows(vec, "float64", group)  # type: ignore[arg-type]
        return rows


def _schema_items(states: Sequence[StateSpec]) -> list[tuple[str, str, str | None]]:
    return [(s.key, s.reduction.value, s.weight) for s in states]


def _describe_item(item: tuple[str | None, ...]) -> str:
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
        return SchemaMismatchError(msg, rank=rank, key=str(key), position=pos)
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
    return _snapshot_from(out, local)


def _snapshot_from(out: Mapping[str, float], local: HostSnapshot) -> HostSnapshot:
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


# =========================================================================== the spread across ranks

_BUSY_KEY = "rank.busy_s"
_HEALTH_KEY = "rank.health_level"
_HEALTH_LEVEL = {Severity.OK: 0, Severity.INFO: 1, Severity.WARNING: 2, Severity.CRITICAL: 3}
_UNHEALTHY_LEVEL = _HEALTH_LEVEL[Severity.WARNING]


def rank_spread(x: np.ndarray) -> RankSpread:
    """min / unweighted mean / max of one value per rank, with the ranks at the extremes.

    NaN propagates into min, mean and max (a diverged rank stays visible), and a NaN rank
    counts as the largest for ``max_rank`` and is skipped for ``min_rank`` (unless all are
    NaN): the rank to look at is the diverged one.
    """
    x = np.asarray(x, dtype=np.float64)
    nan = np.isnan(x)
    ranked = np.where(nan, np.inf, x)
    max_rank = int(np.argmax(nan)) if nan.any() else int(np.argmax(ranked))
    min_rank = int(np.argmin(ranked)) if not nan.all() else 0
    return RankSpread(float(np.min(x)), float(np.mean(x)), float(np.max(x)), min_rank, max_rank)


def rank_health_summary(rows: np.ndarray, keys: Sequence[str], *, wait_s: float = 0.0) -> RankHealthSummary:
    """The :class:`RankHealthSummary` of a gathered ``(ranks, keys)`` matrix (rank order)
    holding ``epoch``, ``train_loss``, ``host_grad_norm`` and the two ``rank.*`` states."""
    col = {k: i for i, k in enumerate(keys)}
    levels = rows[:, col[_HEALTH_KEY]]
    bad = [r for r in range(rows.shape[0]) if levels[r] >= _UNHEALTHY_LEVEL]
    bad.sort(key=lambda r: (-levels[r], r))
    return RankHealthSummary(
        epoch=int(rows[0, col["epoch"]]),
        world_size=int(rows.shape[0]),
        train_loss=rank_spread(rows[:, col["train_loss"]]),
        host_grad_norm=rank_spread(rows[:, col["host_grad_norm"]]),
        busy_s=rank_spread(rows[:, col[_BUSY_KEY]]),
        n_unhealthy=len(bad),
        n_critical=int(np.sum(levels >= _HEALTH_LEVEL[Severity.CRITICAL])),
        unhealthy_ranks=tuple(bad[:MAX_NAMED_UNHEALTHY]),
        wait_s=wait_s,
    )


def reduce_epoch(
    local: HostSnapshot,
    n_examples: int,
    *,
    busy_s: float,
    health: Severity | None,
    n_val_examples: int | None = None,
    group: Any = None,
) -> tuple[HostSnapshot, RankHealthSummary]:
    """:func:`reduce_host_snapshot` plus the spread across ranks, in the same one gather.

    Each rank adds two values to its row: its wall time for the epoch up to this call
    less its waits for other ranks in Karn's own collectives (``busy_s``:
    the straggler has the largest) and its own health (its HealthMonitor's overall severity; None
    counts as OK). Every rank receives both results; the job-wide snapshot and the summary
    are rank 0's to emit (``is_reduced=True``), and every rank may emit the summary for the
    trace (its :attr:`RankHealthSummary.wait_s`, this rank's time in the collective).
    """
    reducer = host_snapshot_reducer(local.seed_grad_norms, has_leakage=local.grad_isolation_leakage is not None)
    reducer.add_state(_BUSY_KEY, Reduction.MAX)
    reducer.add_state(_HEALTH_KEY, Reduction.MAX)
    n_val = n_examples if n_val_examples is None else n_val_examples
    values = _host_snapshot_values(local, n_examples, n_val)
    values[_BUSY_KEY] = busy_s
    values[_HEALTH_KEY] = _HEALTH_LEVEL.get(health, 0) if health is not None else 0
    t0 = time.perf_counter()
    rows = reducer.gather(values, group=group)
    wait_s = time.perf_counter() - t0
    snapshot = _snapshot_from(reduce_rows(reducer.schema, rows), local)
    return snapshot, rank_health_summary(rows, reducer.keys, wait_s=wait_s)
