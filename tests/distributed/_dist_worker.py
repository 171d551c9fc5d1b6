"""Rank functions for the tests in tests/distributed/, run in spawned processes (2 ranks, gloo).

They live in a module of their own because the spawn start method imports the function by
name in every child. Each rank writes what it observed to ``<out_dir>/rank<k>.json``; the
test process asserts on those files. The per-rank inputs are functions of the rank only, so
the test recomputes them for its single-process reference.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from karn_otel.codec import to_jsonable
from karn_otel.config import CounterfactualConfig
from karn_otel.contracts import HostSnapshot, Severity
from karn_otel.counterfactual import ConfigEvaluation
from karn_otel.distributed.evaluation import DistributedEvaluationError, distributed_attribute, shard_indices
from karn_otel.distributed.liveness import MissingRankMonitor, RankHeartbeat
from karn_otel.distributed.reduction import (
    EpochReducer,
    RankDisagreementError,
    SchemaMismatchError,
    reduce_epoch,
    reduce_host_snapshot,
)
from karn_otel.ranks import RankInfo

N_VAL = 101  # odd: the two shards differ in size (51 / 50), which exercises the padding
TRAIN_SIZES = (37, 63)
VAL_SIZES = (20, 31)
SLOTS3 = ("early", "mid", "late")
SLOTS4 = ("a", "b", "c", "d")
CF_FULL = CounterfactualConfig(strategy="full_factorial", bootstrap_samples=40, seed=7)
GENERIC_STATES = (("n", "sum"), ("batches", "sum"), ("loss", "mean", "n"), ("grad_max", "max"), ("grad_min", "min"))
CF_SAMPLED = CounterfactualConfig(strategy="shapley", shapley_samples=4, bootstrap_samples=40, seed=11)


# --------------------------------------------------------------------------- known per-rank data


def rank_data(rank: int) -> dict[str, np.ndarray | dict[str, float] | float]:
    """Per-example training and validation results of one rank, and its gradient norms."""
    rng = np.random.default_rng(100 + rank)
    n, nv = TRAIN_SIZES[rank], VAL_SIZES[rank]
    return {
        "train_loss": rng.gamma(2.0, 0.5, n),
        "train_correct": (rng.random(n) < 0.6 + 0.1 * rank).astype(float),
        "val_loss": rng.gamma(2.0, 0.4, nv),
        "val_correct": (rng.random(nv) < 0.7).astype(float),
        "host_grad_norm": float(rng.uniform(0.5, 2.0)),
        "seed_grad_norms": {"early": float(rng.uniform(0, 1)), "mid": float(rng.uniform(0, 1))},
        "leakage": float(rng.uniform(0, 1e-7)),
    }


def local_snapshot(rank: int, *, epoch: int = 3, extra_slot: bool = False) -> HostSnapshot:
    d = rank_data(rank)
    norms = dict(d["seed_grad_norms"])  # type: ignore[arg-type]
    if extra_slot:
        norms["late"] = 0.25
    return HostSnapshot(
        epoch=epoch,
        train_loss=float(np.mean(d["train_loss"])),
        train_accuracy=float(np.mean(d["train_correct"])),
        val_loss=float(np.mean(d["val_loss"])),
        val_accuracy=float(np.mean(d["val_correct"])),
        host_params=1000,
        total_seed_params=60,
        total_params=1060,
        fossilized_params=20,
        host_grad_norm=d["host_grad_norm"],  # type: ignore[arg-type]
        seed_grad_norms=norms,
        grad_isolation_leakage=d["leakage"],  # type: ignore[arg-type]
    )


def synthetic_evaluate(configs, sl: slice = slice(None)) -> list[ConfigEvaluation]:
    """Deterministic per-example (correct, loss) per configuration over N_VAL examples.

    Each configuration's arrays come from an RNG seeded by the configuration itself, so any
    process computes the same arrays; ``sl`` picks a shard of them.
    """
    out = []
    for cfg in configs:
        mask = sum(1 << i for i, on in enumerate(cfg) if on)
        rng = np.random.default_rng(1000 + mask)
        p = 0.4 + 0.1 * sum(cfg) + (0.05 if cfg[0] and cfg[-1] else 0.0)  # main effects + a synergy
        correct = (rng.random(N_VAL) < p).astype(float)
        loss = rng.gamma(2.0, 0.5, N_VAL).astype(np.float32)
        out.append(ConfigEvaluation(correct[sl], loss[sl]))
    return out


_HOST: list = []  # the reference host, built once per process


def host_evaluate(configs, sl: slice = slice(None)) -> list[ConfigEvaluation]:
    """The reference host (3 seeds fossilized at alpha 1) on N_VAL random 8x8 images, per
    configuration, through the shared-prefix evaluator: a real torch model, same weights in
    every process (seeded init, as DDP would broadcast them)."""
    import torch

    from karn_otel.contracts import SeedStage
    from karn_otel.reference.host import HostCNN
    from karn_otel.torch.ablation import evaluate_shared_prefix

    if not _HOST:
        gen = torch.Generator().manual_seed(5)
        torch.manual_seed(0)
        model = HostCNN((4, 8, 16)).eval()
        for sid, blueprint in zip(SLOTS3, ("conv_light", "norm", "conv_light")):
            model.slots[sid].germinate(blueprint, model.host_params, 0.0)
            model.slots[sid].stage, model.slots[sid].alpha = SeedStage.FOSSILIZED, 1.0
            with torch.no_grad():  # seeds start as the identity; make them matter
                for p in model.slots[sid].seed.parameters():
                    p.add_(torch.randn(p.shape, generator=gen))
        x = torch.rand(N_VAL, 1, 8, 8, generator=gen)
        y = torch.randint(0, 10, (N_VAL,), generator=gen)
        _HOST.extend([model, x, y])
    model, x, y = _HOST
    slots = [model.slots[s] for s in SLOTS3]
    results = evaluate_shared_prefix(model, model.segments(), slots, [True] * 3, configs, x[sl], y[sl])
    return [ConfigEvaluation(c, l) for c, l in results]


def matrix_json(m) -> dict:
    """A counterfactual matrix as JSON, without the fields that legitimately differ (timings;
    ``wait_s`` is set, and below ``elapsed_s``, on every rank of a distributed pass)."""
    assert m.wait_s is None or 0.0 <= m.wait_s <= m.elapsed_s, (m.wait_s, m.elapsed_s)
    return to_jsonable(dataclasses.replace(m, elapsed_s=0.0, wait_s=None))


# --------------------------------------------------------------------------- scenarios


def _error(exc: Exception) -> dict:
    return {"type": type(exc).__name__, "message": str(exc), **{k: getattr(exc, k, None) for k in ("rank", "key")}}


def scenario(info: RankInfo, out_dir: str) -> None:
    """The happy paths and the collective error paths, in one process group."""
    rank = info.rank
    result: dict = {"info": dataclasses.asdict(info)}

    snap = local_snapshot(rank)
    result["reduced"] = to_jsonable(reduce_host_snapshot(snap, TRAIN_SIZES[rank], n_val_examples=VAL_SIZES[rank]))

    # The snapshot plus the spread across ranks in the same gather. Rank 1 is the straggler
    # (it arrives 0.3 s late, so rank 0 waits) and the unhealthy one.
    if rank == 1:
        time.sleep(0.3)
    reduced, summary = reduce_epoch(
        snap,
        TRAIN_SIZES[rank],
        n_val_examples=VAL_SIZES[rank],
        busy_s=1.0 + 0.5 * rank,
        health=Severity.WARNING if rank == 1 else Severity.OK,
    )
    result["epoch_reduced"] = to_jsonable(reduced)
    result["epoch_summary"] = to_jsonable(summary)

    # A generic schema with every reduction kind, counts included.
    d = rank_data(rank)
    reducer = EpochReducer(GENERIC_STATES)
    result["generic"] = reducer.reduce(
        {
            "n": TRAIN_SIZES[rank],
            "batches": 1 + rank,
            "loss": float(np.mean(d["train_loss"])),
            "grad_max": d["host_grad_norm"],
            "grad_min": d["host_grad_norm"],
        }
    )

    sl = shard_indices(N_VAL, rank, info.world_size)
    seen: list[int] = []

    def local_evaluate(configs):
        results = synthetic_evaluate(configs, sl)
        seen.extend(r.correct.shape[0] for r in results)
        return results

    result["cf_full"] = matrix_json(distributed_attribute(local_evaluate, SLOTS3, CF_FULL, epoch=3))
    result["cf_sampled"] = matrix_json(distributed_attribute(local_evaluate, SLOTS4, CF_SAMPLED, epoch=3))
    result["shard_sizes_seen"] = sorted(set(seen))
    result["cf_host"] = matrix_json(
        distributed_attribute(lambda configs: host_evaluate(configs, sl), SLOTS3, CF_FULL, epoch=3)
    )

    # Rank 1 reports a slot rank 0 does not have: both ranks must raise, naming rank 1 and the key.
    try:
        reduce_host_snapshot(local_snapshot(rank, extra_slot=rank == 1), TRAIN_SIZES[rank])
        result["schema_mismatch"] = None
    except SchemaMismatchError as exc:
        result["schema_mismatch"] = _error(exc)

    # Ranks at different epochs: a SAME state, reported on both ranks.
    try:
        reduce_host_snapshot(local_snapshot(rank, epoch=3 + rank), TRAIN_SIZES[rank])
        result["disagreement"] = None
    except RankDisagreementError as exc:
        result["disagreement"] = _error(exc)

    # Rank 1's local evaluation fails: rank 0 must not hang, both must raise.
    def failing_evaluate(configs):
        if rank == 1:
            raise RuntimeError("shard evaluation failed on purpose")
        return synthetic_evaluate(configs, sl)

    try:
        distributed_attribute(failing_evaluate, SLOTS3, CF_FULL)
        result["eval_failure"] = None
    except DistributedEvaluationError as exc:
        result["eval_failure"] = _error(exc)

    # A wall-clock budget would let the ranks stop at different evaluations: refused on every rank.
    try:
        distributed_attribute(local_evaluate, SLOTS3, dataclasses.replace(CF_FULL, timeout_seconds=60.0))
        result["timeout_refused"] = None
    except ValueError as exc:
        result["timeout_refused"] = _error(exc)

    # After all those errors the ranks are still in step: a normal reduction works.
    result["after_errors"] = to_jsonable(reduce_host_snapshot(snap, TRAIN_SIZES[rank], n_val_examples=VAL_SIZES[rank]))

    hb = RankHeartbeat(Path(out_dir) / "heartbeats", rank)
    hb.finish(3)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def dies_after_heartbeat(info: RankInfo, out_dir: str) -> None:
    """Rank 1 beats once and dies; rank 0 keeps beating until its monitor reports rank 1,
    then hangs (the launcher must end it)."""
    import torch.distributed as dist

    hb = RankHeartbeat(Path(out_dir) / "heartbeats", info.rank)
    hb.beat(1)
    dist.barrier()  # both ranks have beaten before either goes on
    if info.rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    monitor = MissingRankMonitor(Path(out_dir) / "heartbeats", info.world_size, timeout_s=0.5)
    alert = None
    deadline = time.monotonic() + 30.0
    epoch = 1
    while alert is None and time.monotonic() < deadline:
        epoch += 1
        hb.beat(epoch)
        alert = monitor.check()
        time.sleep(0.1)
    report = {"alert": to_jsonable(alert), "missing": monitor.missing(), "count": monitor.count()}
    Path(out_dir, "rank0.json").write_text(json.dumps(report))
    # Stand in for a collective that never returns (gloo notices a dead peer, NCCL may not):
    # spawn() must terminate this rank after its grace period.
    time.sleep(600)


def sleeps(info: RankInfo) -> None:
    """A job that never finishes on its own."""
    time.sleep(600)
