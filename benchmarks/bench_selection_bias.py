"""Selection bias of the reference controller, with and without ``RunConfig.attribution_split``.

Run: ``python benchmarks/bench_selection_bias.py [--episodes 150] [--splits 0 0.3 0.5]``
(about 0.2 s per simulated episode and arm on one core).

The reference trainer with its real run loop, lifecycle gates and heuristic controller, on a
simulated network with known truth (tests/test_calibration_selection.py,
:func:`simulated_trainer`): the 359 validation examples of the digits reference, three slots,
each owning 30% of the examples; every seed grown breaks a correct prediction with
probability 0.1 and fixes a wrong one at the rate that gives it a true contribution of
``effect``. The heuristic fossilizes a seed whose removal cost at the end of probation is > 0
and culls it otherwise, so the kept seeds are selected on that number.

Per split (0 = decide and report on the same examples), measured in this run on the same
simulated worlds:

* null seeds (effect 0): the kept seeds' mean reported removal cost (the bias; truth 0) with
  its standard error, how often the reported 95% Shapley interval covers 0, how often its
  lower end is above 0 (a naive "helps"), its mean width, and the width ratio to split 0
  beside the predicted ``sqrt(1 / f)``;
* helpful seeds (effect +1 point): how often the controller keeps one (the decision's power,
  on fewer examples under a split) and the kept seeds' bias against +1 point.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_calibration_selection import reference_selection, selection_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=150)
    ap.add_argument("--splits", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    ap.add_argument("--effect", type=float, default=0.01, help="the helpful seeds' true contribution (fraction)")
    args = ap.parse_args(argv)
    if args.splits[0] != 0.0:
        args.splits = [0.0, *args.splits]
    t0 = time.perf_counter()
    print(f"reference heuristic, simulated network, {args.episodes} episodes per arm (same worlds)\n")
    print("null seeds (truth 0): the kept ones, as reported")
    hdr = (
        f"{'split':>6} {'kept':>5} {'of':>5} {'bias pts':>9} {'se':>6} {'covers 0':>9} "
        f"{'ci_low>0':>9} {'width pts':>10} {'width x':>8} {'sqrt(1/f)':>10}"
    )
    print(hdr)
    base_width = None
    for f in args.splits:
        rows, decided = reference_selection(args.episodes, f)
        bias, se, cover, claim, width = selection_table({"x": rows})["x"]
        base_width = width if f == 0.0 else base_width
        ratio = width / base_width if base_width else math.nan
        pred = math.sqrt(1 / f) if f > 0 else 1.0
        print(
            f"{f:>6.2f} {len(rows):>5} {decided:>5} {100 * bias:>+9.3f} {100 * se:>6.3f} {100 * cover:>8.1f}% "
            f"{100 * claim:>8.1f}% {100 * width:>10.2f} {ratio:>8.2f} {pred:>10.2f}"
        )
    print(f"\nhelpful seeds (truth {100 * args.effect:+.1f} points): kept rate and the kept ones' bias")
    print(f"{'split':>6} {'kept':>5} {'of':>5} {'kept %':>7} {'bias pts':>9} {'se':>6} {'covers':>7}")
    for f in args.splits:
        rows, decided = reference_selection(args.episodes, f, effect=args.effect)
        bias, se, cover, _, _ = selection_table({"x": rows}, truth=args.effect)["x"]
        print(
            f"{f:>6.2f} {len(rows):>5} {decided:>5} {100 * len(rows) / max(decided, 1):>6.1f}% "
            f"{100 * bias:>+9.3f} {100 * se:>6.3f} {100 * cover:>6.1f}%"
        )
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
