"""Counterfactuals with the validation set sharded over the ranks.

*Counterfactuals cost the same on 8 GPUs as on one* is what this module prevents: each rank
evaluates its contiguous shard of the validation set (:func:`shard_indices`) for every
configuration and :func:`gather_evaluations` concatenates the per-example results in rank
order, so :func:`~karn_otel.counterfactual.attribute` sees exactly the arrays a single
process would have computed (:func:`distributed_attribute`).

Error discipline. A rank whose local evaluation fails must not raise before the collective
that the other ranks are already waiting in: they would hang. Its failure is carried into the
handshake as a flag, every rank learns about it, and every rank raises
:class:`DistributedEvaluationError`. Rank numbers in messages are ranks *within the process
group* passed as ``group``.

No torch at import: without a process group (or with one rank) everything runs locally; the
gathers are in :mod:`karn_otel.torch.collectives`, imported only when a collective is taken.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from karn_otel.config import CounterfactualConfig
from karn_otel.contracts import CounterfactualMatrix
from karn_otel.counterfactual import ConfigEvaluation, Evaluate, attribute
from karn_otel.distributed.reduction import _fingerprint
from karn_otel.ranks import RankInfo, dist_for

__all__ = [
    "DistributedEvaluationError",
    "WaitClock",
    "distributed_attribute",
    "gather_evaluations",
    "make_distributed_evaluate",
    "shard_indices",
]


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
    dist = dist_for(group)
    if dist is None:
        if local_error is not None:
            raise DistributedEvaluationError(local_error)
        return [ConfigEvaluation(c, None if loss is None else loss[i]) for i, c in enumerate(correct)]

    n_local = correct[0].shape[0] if correct else 0
    cfg_key = _fingerprint([tuple(bool(b) for b in c) for c in configs]) if configs is not None else 0
    header = np.array([0 if local_error else 1, len(correct), n_local, loss is not None, cfg_key], dtype=np.int64)
    from karn_otel.torch import collectives

    headers = collectives.all_gather_rows(header, "int64", group)
    agree = headers[:, [1, 3, 4]] == headers[0, [1, 3, 4]]
    if np.any(headers[:, 0] == 0) or not np.all(agree):
        summary = (local_error, len(correct), loss is not None, None if configs is None else list(configs))
        details = collectives.all_gather_objects(summary, group)
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
    rows = collectives.all_gather_rows(packed, "float64", group)  # (world, configs, 1|2, width)
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


class WaitClock:
    """Seconds a rank spent in the gathers of :func:`make_distributed_evaluate`: its wait for
    the other ranks (plus the transfer). A rank's own share of a pass is the rest."""

    def __init__(self) -> None:
        self.seconds = 0.0


def make_distributed_evaluate(
    local_evaluate: Evaluate, *, group: Any = None, clock: WaitClock | None = None
) -> Evaluate:
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
        if dist_for(group) is None:  # one process: nothing to coordinate, let errors propagate
            return gather_evaluations(local_evaluate(configs), configs=configs, group=group)
        try:
            local = local_evaluate(configs)
            error = None
        except Exception as exc:  # reported collectively below, then raised on every rank
            local, error = None, f"{type(exc).__name__}: {exc}"
        t0 = time.perf_counter()
        try:
            return _gather_evaluations(local, configs, group, error)
        finally:
            if clock is not None:
                clock.seconds += time.perf_counter() - t0

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
    if config.timeout_seconds is not None and dist_for(group) is not None:
        raise ValueError(
            "timeout_seconds cannot be used with distributed counterfactuals: each rank would read its "
            "own clock and the ranks could stop after different evaluations (a hang); use max_configurations"
        )
    if dist_for(group) is None:
        return attribute(make_distributed_evaluate(local_evaluate, group=group), slot_ids, config, epoch=epoch)
    clock = WaitClock()
    matrix = attribute(
        make_distributed_evaluate(local_evaluate, group=group, clock=clock), slot_ids, config, epoch=epoch
    )
    return dataclasses.replace(matrix, wait_s=clock.seconds)
