"""Full-factorial counterfactual cost: shared-prefix vs generic evaluation, in one run.

For n slots between n + 1 equal segments the generic evaluator runs (n + 1) * 2**n segment
passes and the shared-prefix walk 2**(n+1) - 1: ideal ratios 15/32 = 0.47 (3 slots) and
31/80 = 0.39 (4 slots). Measured on (a) an equal-segment host with near-free "scale" seeds
(the cost model's setting: only segment passes count), (b) the same with real "norm"
seeds (seed passes are saved less: 2**n - 1 vs n * 2**(n-1)), and (c) the reference host
(unequal segments: its first block dominates). Target for (a): within 15% of the ideal.
Timings are medians of interleaved repetitions, validation batches of 128.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from karn_otel.contracts import SeedStage  # noqa: E402
from karn_otel.reference.data import load_digits_data  # noqa: E402
from karn_otel.reference.host import HostCNN  # noqa: E402
from karn_otel.reference.slots import LifecycleConfig, SeedSlot  # noqa: E402
from karn_otel.torch.ablation import evaluate_configurations, evaluate_shared_prefix  # noqa: E402

BATCH = 128


class EqualSegmentHost(nn.Module):
    """n slots between n + 1 identical conv segments; the classifier is a negligible tail."""

    def __init__(self, n_slots: int, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 1)
        self.segs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()) for _ in range(n_slots + 1)
        )
        self.slots = nn.ModuleDict({f"s{i}": SeedSlot(f"s{i}", width, LifecycleConfig()) for i in range(n_slots)})
        self.head = nn.Linear(width, 10)

    def segments(self):
        first = lambda x: self.segs[0](self.stem(x))  # noqa: E731
        last = lambda x: self.head(self.segs[-1](x).mean(dim=(2, 3)))  # noqa: E731
        return [first, *self.segs[1:-1], last]

    def forward(self, x):
        seg = self.segments()
        x = seg[0](x)
        for i, s in enumerate(self.slots.values()):
            x = seg[i + 1](s(x))
        return x


class ScaleSeed(nn.Module):
    """A near-free seed (one multiply): the cost model counts segment passes only."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((1, c, 1, 1), 0.1))

    def forward(self, x):
        return x * self.scale


def activate(model, slot_ids, blueprint="norm"):
    host_params = sum(p.numel() for p in model.parameters())
    for sid in slot_ids:
        s = model.slots[sid]
        s.germinate("norm", host_params, 0.0)
        if blueprint == "scale":
            s.seed = ScaleSeed(s.channels)
        s.stage, s.alpha = SeedStage.FOSSILIZED, 1.0


def timed(fn, repeats=9):
    generic, shared = [], []
    for _ in range(repeats):
        for name, out in (("g", generic), ("s", shared)):
            t0 = time.perf_counter()
            fn(name)
            out.append(time.perf_counter() - t0)
    return statistics.median(generic), statistics.median(shared)


def bench(model, slot_ids, x, y, label, ideal):
    configs = list(itertools.product([True, False], repeat=len(slot_ids)))
    slots = [model.slots[s] for s in model.slots]
    branching = [s in slot_ids for s in model.slots]

    def run(which):
        if which == "g":
            return evaluate_configurations(model, model.slots, slot_ids, configs, x, y, batch_size=BATCH)
        return evaluate_shared_prefix(model, model.segments(), slots, branching, configs, x, y, batch_size=BATCH)

    run("g"), run("s")  # warm-up
    g, s = timed(run)
    ratio = s / g
    line = f"{label:<34} generic {g * 1e3:8.1f} ms  shared-prefix {s * 1e3:8.1f} ms  ratio {ratio:.3f}"
    if ideal:
        line += f"  ideal {ideal:.3f}  ({100 * (ratio / ideal - 1):+.1f}% vs ideal; target within 15%)"
    print(line)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    d = load_digits_data(0)
    x = d.x_val.repeat(4, 1, 1, 1)  # 1,436 examples
    y = d.y_val.repeat(4)
    print(f"full factorial over {x.shape[0]} validation examples, CPU, 1 thread")
    for n, ideal in ((3, 15 / 32), (4, 31 / 80)):
        for bp in ("scale", "norm"):
            m = EqualSegmentHost(n).eval()
            activate(m, list(m.slots), bp)
            label = f"equal segments, {n} slots, {bp} seeds"
            bench(m, list(m.slots), x, y, label, ideal if bp == "scale" else None)
    ref = HostCNN((4, 8, 16)).eval()
    activate(ref, list(ref.slots))
    bench(ref, list(ref.slots), x, y, "reference host (unequal), 3 slots", None)


if __name__ == "__main__":
    main()
