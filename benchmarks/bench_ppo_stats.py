"""One PPO update's statistics: Karn's accumulator (one sync) vs the CleanRL pattern (.item() per stat).

For every device available (CPU always, CUDA when present) and two workloads,

  * ``stats``: only the statistics of ``--minibatches`` minibatches;
  * ``stats+step``: each minibatch also runs a small policy forward/backward/Adam step, so
    the device has queued work when a sync arrives — the situation of a real update;

it prints the wall time per update of both patterns, the ratio karn/cleanrl (< 1: Karn is
faster) and how many host syncs each made (counted by patching the Tensor methods that move
a value to the host). Runs are interleaved (A B A B ...) and the median of per-pair ratios is
reported, because shared machines are noisy.

The CleanRL pattern reads every statistic with ``.item()`` per minibatch (as CleanRL does for
``clipfracs``) and averages on the host; the explained variance is computed once at the end
from ``.cpu().numpy()`` copies, as in CleanRL.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from karn_otel.torch.ppo import PPOStatsAccumulator  # noqa: E402

HEADS = ("op", "slot", "blueprint", "blend")
CLIP_EPS, ADV_CLIP = 0.2, 10.0
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


def make_minibatches(n: int, size: int, device: torch.device, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        old = -torch.rand(size, len(HEADS), generator=g) * 2
        mask = torch.rand(size, len(HEADS), generator=g) > 0.3
        v = torch.randn(size, generator=g)
        mb = dict(
            new_logp=old + 0.2 * torch.randn(size, len(HEADS), generator=g),
            old_logp=old,
            advantages=torch.randn(size, generator=g),
            values=v,
            returns=v + 0.5 * torch.randn(size, generator=g),
            entropy=torch.rand(size, len(HEADS), generator=g),
            head_mask=mask,
            policy_loss=torch.randn((), generator=g),
            value_loss=torch.rand((), generator=g),
            hidden=torch.tanh(torch.randn(size, 64, generator=g)),
            cell=torch.randn(size, 64, generator=g),
        )
        out.append({k: t.to(device) for k, t in mb.items()})
    return out


class PolicyStep:
    """A small actor-critic step per minibatch: the work a real update queues on the device."""

    def __init__(self, device: torch.device, size: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 256),
            torch.nn.Tanh(),
            torch.nn.Linear(256, 256),
            torch.nn.Tanh(),
            torch.nn.Linear(256, 16),
        ).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-4, fused=True)
        self.x = torch.randn(size, 64, generator=g).to(device)

    def __call__(self) -> None:
        loss = self.net(self.x).pow(2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def karn_update(mbs: list[dict], step: PolicyStep | None) -> object:
    acc = PPOStatsAccumulator(HEADS, CLIP_EPS, ADV_CLIP, mbs[0]["values"].device)
    for mb in mbs:
        if step is not None:
            step()
        acc.update(**mb)
    return acc.compute(0)


def cleanrl_update(mbs: list[dict], step: PolicyStep | None) -> dict:
    logs: dict[str, list[float]] = {}

    def log(name: str, t: torch.Tensor) -> None:
        logs.setdefault(name, []).append(t.item())  # the hot-path habit STYLE.md warns about

    for mb in mbs:
        if step is not None:
            step()
        with torch.no_grad():
            m = mb["head_mask"]
            logratio_h = torch.where(m, mb["new_logp"] - mb["old_logp"], 0.0)
            logratio = logratio_h.sum(1)
            ratio = logratio.exp()
            a = mb["advantages"]
            log("approx_kl", ((ratio - 1) - logratio).mean())
            log("clipfrac", ((ratio - 1.0).abs() > CLIP_EPS).float().mean())
            log("adv_mean", a.mean())
            log("adv_std", a.std(unbiased=False))
            log("adv_min", a.min())
            log("adv_max", a.max())
            log("adv_clipped", (a.abs() > ADV_CLIP).float().mean())
            log("ratio_mean", ratio.mean())
            log("ratio_high", (ratio > 1 + CLIP_EPS).float().mean())
            log("ratio_low", (ratio < 1 - CLIP_EPS).float().mean())
            ratio_h = logratio_h.exp()
            for k, head in enumerate(HEADS):
                sel = m[:, k]
                log(f"clip/{head}", (((ratio_h[:, k] - 1).abs() > CLIP_EPS) & sel).float().sum() / sel.sum())
                log(f"kl/{head}", (((ratio_h[:, k] - 1) - logratio_h[:, k]) * sel).sum() / sel.sum())
                log(f"entropy/{head}", (mb["entropy"][:, k] * sel).sum() / sel.sum())
            log("value_var", mb["values"].var(unbiased=False))
            log("policy_loss", mb["policy_loss"])
            log("value_loss", mb["value_loss"])
    out = {k: float(np.mean(v)) for k, v in logs.items()}
    y_pred = torch.cat([mb["values"] for mb in mbs]).cpu().numpy()
    y_true = torch.cat([mb["returns"] for mb in mbs]).cpu().numpy()
    var_y = np.var(y_true)
    out["explained_var"] = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
    return out


def count_syncs(fn, *args) -> int:
    calls = [0]
    saved = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def counting(original):
        def wrapper(self, *a, **k):
            calls[0] += 1
            return original(self, *a, **k)

        return wrapper

    try:
        for name, original in saved.items():
            setattr(torch.Tensor, name, counting(original))
        fn(*args)
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
    return calls[0]


def timed(fn, mbs, step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(mbs, step)
    if device.type == "cuda":
        torch.cuda.synchronize()  # both patterns pay for all their queued work
    return time.perf_counter() - t0


def bench(device: torch.device, args) -> list[tuple]:
    mbs = make_minibatches(args.minibatches, args.minibatch_size, device)
    rows = []
    for mode in ("stats", "stats+step"):
        step = PolicyStep(device, args.minibatch_size) if mode == "stats+step" else None
        for fn in (karn_update, cleanrl_update):  # warm-up: allocator, kernels, dynamo wrapper
            for _ in range(3):
                fn(mbs, step)
        karn, clean = [], []
        for _ in range(args.repeats):
            karn.append(timed(karn_update, mbs, step, device))
            clean.append(timed(cleanrl_update, mbs, step, device))
        ratio = statistics.median(k / c for k, c in zip(karn, clean))
        rows.append(
            (
                str(device),
                mode,
                1e3 * statistics.median(karn),
                1e3 * statistics.median(clean),
                ratio,
                count_syncs(karn_update, mbs, step),
                count_syncs(cleanrl_update, mbs, step),
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minibatches", type=int, default=32)
    ap.add_argument("--minibatch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machines are shared)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(
        f"one PPO update: {args.minibatches} minibatches x {args.minibatch_size} samples, "
        f"{len(HEADS)} heads; torch {torch.__version__}; median of {args.repeats} interleaved pairs"
    )
    header = (
        f"{'device':<7} {'workload':<11} {'karn ms':>9} {'cleanrl ms':>11} {'karn/cleanrl':>13} "
        f"{'syncs karn':>11} {'syncs cleanrl':>14}"
    )
    print(header)
    print("-" * len(header))
    for device in devices:
        for dev, mode, k_ms, c_ms, ratio, k_sync, c_sync in bench(device, args):
            print(f"{dev:<7} {mode:<11} {k_ms:>9.3f} {c_ms:>11.3f} {ratio:>13.3f} {k_sync:>11d} {c_sync:>14d}")


if __name__ == "__main__":
    main()
