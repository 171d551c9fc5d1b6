"""Karn's cost on the reference training loop, measured in one run (issue: the spine).

Prints:
  * wall-time ratio of the reference loop with Karn in standard mode (run log + console)
    vs Karn unconfigured — target <= 1.02;
  * the cost of one `emit` (configured with the run log, and unconfigured), in microseconds.

Runs are interleaved (A B A B ...) and the median of the per-pair ratios is reported,
because these machines are noisy; the process-CPU-time ratio is printed too (it does not
count time the VM was descheduled). "Standard mode" is what `karn run` configures: run log,
console (to /dev/null), health monitor and dense-trace triggers (dense windows open at stage
transitions and anomalies, per the spec's operating modes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import karn_otel  # noqa: E402
from karn_otel.config import KarnConfig  # noqa: E402
from karn_otel.contracts import SeedStage, SlotSnapshot  # noqa: E402
from karn_otel.reference.trainer import RunConfig, run_episode  # noqa: E402
from karn_otel.sinks.console import ConsoleSink  # noqa: E402


def timed_episode(cfg: RunConfig, configured: bool, out: Path) -> tuple[float, float]:
    if configured:
        c = karn_otel.configure(KarnConfig(out_dir=out, console="off"))
        c.add_sink(ConsoleSink(c.view, live=False, stream=open(os.devnull, "w")))
    else:
        karn_otel.shutdown()
    t0, c0 = time.perf_counter(), time.process_time()
    run_episode(cfg)
    karn_otel.shutdown()  # the run log's last flush is part of the cost
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    cfg = RunConfig(epochs=args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        timed_episode(cfg, True, out)  # warm-up: imports, allocator, data load
        base, karn = [], []
        for _ in range(args.repeats):
            base.append(timed_episode(cfg, False, out))
            karn.append(timed_episode(cfg, True, out))
        # Median of per-pair ratios: each pair ran back to back, so slow drifts cancel.
        ratio = statistics.median(k[0] / b[0] for k, b in zip(karn, base))
        cpu_ratio = statistics.median(k[1] / b[1] for k, b in zip(karn, base))
        print(f"reference loop, {args.epochs} epochs, {args.repeats} interleaved pairs")
        print(
            f"  unconfigured   median {statistics.median(b[0] for b in base):.3f} s  {[round(b[0], 3) for b in base]}"
        )
        print(
            f"  standard mode  median {statistics.median(k[0] for k in karn):.3f} s  {[round(k[0], 3) for k in karn]}"
        )
        print(f"  ratio standard/unconfigured, wall time = {ratio:.4f}   (target <= 1.02)")
        print(
            f"  ratio standard/unconfigured, process CPU time (all threads) = {cpu_ratio:.4f}"
            "   (less sensitive to VM steal; includes the writer and console threads)"
        )

        snap = SlotSnapshot("early", SeedStage.BLENDING, 2, "s", "norm", 16, 0.5, 0.01, 0.02, 0.0, "G2", True, "ok")
        from tests.conftest import make_context  # noqa: E402

        c = karn_otel.configure(KarnConfig(out_dir=out, console="off"))
        c.emit(make_context())
        n = 50_000
        per = min(timeit.repeat(lambda: c.emit(snap, epoch=1), number=n, repeat=3)) / n
        karn_otel.shutdown()
        noop = min(timeit.repeat(lambda: karn_otel.emit(snap, epoch=1), number=n, repeat=3)) / n
        print(f"emit(SlotSnapshot) with run log: {per * 1e6:.2f} us/event (validation + stamping + enqueue)")
        print(f"emit() unconfigured:             {noop * 1e6:.3f} us/event")


if __name__ == "__main__":
    main()
