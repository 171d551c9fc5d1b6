"""Counterfactual cost with the validation set sharded over 1 vs 2 ranks (gloo, CPU, 127.0.0.1).

The reference host (HostCNN, 3 slots with seeds fossilized at alpha 1) runs a full-factorial
counterfactual pass (8 configurations, shared-prefix evaluator) over the digits validation
set repeated ``--repeat`` times. With N ranks each rank evaluates 1/N of the examples for
every configuration, the per-example results are gathered (one all_gather per evaluate
call) and every rank runs the attribution math (including the 200-resample bootstrap) on
the whole set. Ideal speed-up of the evaluation part: N; the gather and the math are not
divided: every rank repeats the math so that every rank holds the matrix its lifecycle
decisions need, without a broadcast. One torch thread per rank, so N ranks use N cores;
when other jobs hold a core, the ranks' evaluations and their copies of the math compete
for what is left, which shows up as a longer "gather + attribution math" for 2 ranks.

Measured in one 2-rank job, as interleaved pairs: rank 0 alone on the whole set (plain
``attribute``, the 1-rank case) then both ranks on their shards (``distributed_attribute``),
so both halves of a pair meet the same machine load (this machine is shared). Reported:
medians on rank 0's clock of the whole call, split into the time inside the evaluation and
the rest (gather, bootstrap, Shapley), the range of per-pair ratios, and whether the two
matrices are equal (they must be, bit for bit, apart from elapsed_s).

    .venv/bin/python benchmarks/bench_distributed_counterfactual.py [--repeat 16] [--reps 9]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from karn_otel.codec import to_jsonable  # noqa: E402
from karn_otel.config import CounterfactualConfig  # noqa: E402
from karn_otel.contracts import SeedStage  # noqa: E402
from karn_otel.counterfactual import ConfigEvaluation, attribute  # noqa: E402
from karn_otel.distributed.evaluation import distributed_attribute, gather_evaluations, shard_indices  # noqa: E402
from karn_otel.distributed.launch import spawn  # noqa: E402
from karn_otel.ranks import RankInfo  # noqa: E402

SLOTS = ("early", "mid", "late")
CF = CounterfactualConfig(strategy="full_factorial", seed=0)


def _model_and_data(repeat: int):
    """The same seeded model on every rank (as DDP would broadcast it) and the whole set."""
    import torch

    from karn_otel.reference.data import load_digits_data
    from karn_otel.reference.host import HostCNN

    torch.manual_seed(0)
    model = HostCNN((4, 8, 16)).eval()
    host_params = model.host_params
    for sid in SLOTS:  # activated as in bench_counterfactual.py
        slot = model.slots[sid]
        slot.germinate("norm", host_params, 0.0)
        slot.stage, slot.alpha = SeedStage.FOSSILIZED, 1.0
    d = load_digits_data(0)
    return model, d.x_val.repeat(repeat, 1, 1, 1), d.y_val.repeat(repeat)


def bench_rank(info: RankInfo, repeat: int, reps: int, out_path: str) -> None:
    """One rank's share; rank 0 writes the timings and whether the matrices agree to ``out_path``.

    Each repetition first times rank 0 alone on the whole set (plain ``attribute``; rank 1
    waits in a barrier, blocked, not spinning), then both ranks on their shards
    (``distributed_attribute``): the two measurements of a pair meet the same machine load.
    """
    import torch
    import torch.distributed as dist

    from karn_otel.torch.ablation import evaluate_shared_prefix

    torch.set_num_threads(1)
    model, x, y = _model_and_data(repeat)
    sl = shard_indices(x.shape[0], info.rank, info.world_size)
    slots = [model.slots[s] for s in SLOTS]
    spent = [0.0]  # seconds inside the evaluation, to split attribute's time

    def evaluator(xs, ys):
        def evaluate(configs):
            t0 = time.perf_counter()
            segments = model.segments()
            results = evaluate_shared_prefix(model, segments, slots, [True] * 3, configs, xs, ys, batch_size=512)
            spent[0] += time.perf_counter() - t0
            return [ConfigEvaluation(c, l) for c, l in results]

        return evaluate

    whole, shard = evaluator(x, y), evaluator(x[sl], y[sl])

    def timed(run):
        spent[0] = 0.0
        t0 = time.perf_counter()
        matrix = run()
        return matrix, time.perf_counter() - t0, spent[0]

    single = distributed = None
    times: dict[str, list[float]] = {k: [] for k in ("single_s", "single_eval_s", "dist_s", "dist_eval_s", "gather_s")}
    all_configs = [tuple(bool((m >> i) & 1) for i in range(3)) for m in range(8)]
    shard_results = shard(all_configs)
    for rep in range(reps + 1):  # repetition 0 warms up (caches, gloo connections)
        dist.barrier()
        if info.is_main:
            single, total, inside = timed(lambda: attribute(whole, SLOTS, CF, epoch=1))
            if rep:
                times["single_s"].append(total)
                times["single_eval_s"].append(inside)
        dist.barrier()
        distributed, total, inside = timed(lambda: distributed_attribute(shard, SLOTS, CF, epoch=1))
        dist.barrier()
        t0 = time.perf_counter()
        gather_evaluations(shard_results, configs=all_configs)  # the gather alone, for scale
        if rep:
            times["dist_s"].append(total)
            times["dist_eval_s"].append(inside)
            times["gather_s"].append(time.perf_counter() - t0)
    # The slower rank sets the pace of the gather: collect every rank's evaluation times.
    per_rank: list = [None] * info.world_size
    dist.all_gather_object(per_rank, times["dist_eval_s"])
    if info.is_main:
        result = {k: statistics.median(v) for k, v in times.items()}
        result["slowest_eval_s"] = statistics.median(max(ts) for ts in zip(*per_rank))
        result["pair_ratios"] = [a / b for a, b in zip(times["single_s"], times["dist_s"])]
        result.update(n_examples=int(x.shape[0]), shard=len(range(*sl.indices(x.shape[0]))))
        same = to_jsonable(dataclasses.replace(single, elapsed_s=0.0)) == to_jsonable(
            dataclasses.replace(distributed, elapsed_s=0.0)
        )
        result["identical"] = same
        Path(out_path).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=16, help="copies of the 359-example digits validation set")
    ap.add_argument("--reps", type=int, default=9, help="timed repetition pairs (medians reported)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp, "result.json"))
        run = spawn(bench_rank, 2, (args.repeat, args.reps, out), num_threads=1, timeout_s=600)
        if not run.ok:
            sys.exit(f"the 2-rank job failed:\n{run.describe()}")
        r = json.loads(Path(out).read_text())
    print(f"full factorial, 3 slots (8 configurations), {r['n_examples']} validation examples, 1 thread per rank")
    rows = (("1 rank ", r["n_examples"], "single"), ("2 ranks", r["shard"], "dist"))
    for label, n, key in rows:
        total, inside = r[f"{key}_s"], r[f"{key}_eval_s"]
        print(
            f"  {label} ({n:>5} examples each): attribute {total * 1e3:7.1f} ms"
            f"  (evaluation {inside * 1e3:6.1f} ms, gather + attribution math {(total - inside) * 1e3:5.1f} ms)"
        )
    print(
        f"          slowest rank's evaluation {r['slowest_eval_s'] * 1e3:6.1f} ms (the gather waits for it);"
        f" the gather alone {r['gather_s'] * 1e3:4.1f} ms"
    )
    ratios = sorted(r["pair_ratios"])
    print(
        f"  speed-up 1 -> 2 ranks: attribute x{r['single_s'] / r['dist_s']:.2f}"
        f" (per-pair ratios {ratios[0]:.2f} .. {ratios[-1]:.2f}),"
        f" evaluation x{r['single_eval_s'] / r['dist_eval_s']:.2f}; ideal x2.00"
    )
    print(f"  matrices identical (marginals, Shapley means and intervals): {r['identical']}")


if __name__ == "__main__":
    main()
