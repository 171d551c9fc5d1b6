"""The run log's durability figures (issue 14): sustained events/s at 0 drops with the training
thread busy, the loss bound under SIGKILL, and how long shutdown takes on a disk that stops
answering. Prints what it measured; docs/reliability.md quotes it.

1. Sustained rate at 0 drops. A producer offers a fixed rate of 20-scalar ``Scalars`` events
   to a ``RunLogSink`` for ``--seconds`` while it is busy between events, either in pure
   Python (holding the GIL: training code in Python) or in ``time.sleep`` (GIL released: a
   torch/numpy op). The rate rises step by step; the figure is the highest offered rate the
   writer sustained with 0 drops and caught up with (written / time until all were written
   >= 95% of offered), best of two tries per step. Targets: >= 50,000/s GIL held,
   >= 200,000/s GIL released. On a shared machine the figure is bounded by the CPU it gets:
   the load average is printed before and after.
2. SIGKILL. A child emits through ``karn_otel.emit`` at ~1,000 steps/s (~2,000 with
   ``--fast``) and is killed at random points; for each kill: events emitted (its own ground
   truth), on disk, the loss ``karn inspect`` reports, and the time between the last event on
   disk and the kill. Bound: one flush interval (0.1 s).
3. Shutdown on a hung disk: events.jsonl is a FIFO nobody reads (write(2) blocks as on a
   frozen filesystem); ``karn_otel.shutdown()`` with its default 5 s bound.

    .venv/bin/python benchmarks/bench_runlog.py [--seconds 2] [--kills 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from karn_otel.contracts import EpisodeContext, Scalars, TelemetryEvent, TelemetryEventType  # noqa: E402
from karn_otel.sinks.runlog import RunLogSink, read_run  # noqa: E402

NAMES = [f"metric_{i:02d}" for i in range(20)]


def _event(step: int) -> TelemetryEvent:
    values = {n: step * 1e-3 + i * 0.123456789 for i, n in enumerate(NAMES)}
    return TelemetryEvent(TelemetryEventType.SCALARS, "bench", "ep", 0, time.time(), Scalars(step, values))


def offer(rate: float, seconds: float, gil_held: bool) -> tuple[float, int, int]:
    """(written events/s including the final drain, not the final fsync; drops; events offered)."""
    events = [_event(s) for s in range(2048)]
    with tempfile.TemporaryDirectory() as tmp:
        sink = RunLogSink(Path(tmp), "bench")
        handle = sink.handle
        n = 0
        t0 = time.perf_counter()
        t_end = t0 + seconds
        while True:
            now = time.perf_counter()
            if now >= t_end:
                break
            due = min(int((now - t0) * rate), n + 4096)
            while n < due:
                handle(events[n & 2047])
                n += 1
            if gil_held:
                x = 0
                for i in range(500):  # pure-Python "training" work (~20 us), holding the GIL
                    x += i * i
            else:
                time.sleep(0.0002)  # a torch/numpy op: GIL released
        # Until everything is written (write(2) returned: safe from a process kill); the fsync
        # of the whole file that flush() adds is not part of the sustained rate.
        deadline = time.monotonic() + 120
        while sink._written + sink._refused < n and time.monotonic() < deadline:
            time.sleep(0.0005)
        elapsed = time.perf_counter() - t0
        sink.flush(timeout=120)
        drops = sum(sink.dropped().values())
        lines = (Path(tmp) / "bench" / "events.jsonl").read_bytes().count(b"\n")
        sink.close()
        if sink.counter.name:
            Path("/dev/shm", sink.counter.name).unlink(missing_ok=True)
    assert lines + drops == n, (lines, drops, n)
    return lines / elapsed, drops, n


def sustained(gil_held: bool, seconds: float, rates: list[int], tries: int = 2) -> int:
    best, ok = 0, False
    what = "GIL held (pure Python)" if gil_held else "GIL released (sleep)"
    for rate in rates:
        for _ in range(tries):  # best of `tries`: a shared machine has bad seconds
            got, drops, n = offer(rate, seconds, gil_held)
            ok = drops == 0 and got >= 0.95 * (n / seconds)
            print(
                f"    {what:24s} offered {rate:>8,}/s: written {got:>9,.0f}/s, drops {drops:,} of {n:,}"
                f"  {'ok' if ok else '-'}"
            )
            if ok:
                break
        if not ok:
            break
        best = rate
    return best


CHILD = textwrap.dedent(
    """
    import mmap, os, sys, time
    sys.path.insert(0, {root!r})
    import karn_otel
    from karn_otel.config import KarnConfig
    from karn_otel.contracts import EpisodeContext, Scalars
    from datetime import datetime
    out, truth, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
    fd = os.open(truth, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 16)
    mv = memoryview(mmap.mmap(fd, 16)).cast("d")
    c = karn_otel.configure(KarnConfig(out_dir=out, console="off"))
    karn_otel.emit(EpisodeContext("bench", datetime(2026, 1, 1), "-", 0, 0, 0, "none", 0, {{}}, 1, "bench", {{}}))
    mv[0] = 1
    print(c.run_id, flush=True)
    i = 0
    while True:
        karn_otel.emit(Scalars(i, {{f"metric_{{k:02d}}": i + k / 7 for k in range(20)}}))
        i += 1
        mv[0], mv[1] = i + 1, time.time()
        time.sleep(pause)
    """
).format(root=str(ROOT))


def kill_once(tmp: Path, k: int, delay: float, pause: float) -> dict[str, float]:
    out, truth, script = tmp / f"o{k}", tmp / f"t{k}", tmp / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), str(truth), str(pause)], stdout=subprocess.PIPE, text=True
    )
    run_id = proc.stdout.readline().strip() if proc.stdout else ""
    time.sleep(delay)
    t_kill = time.time()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    if proc.stdout:
        proc.stdout.close()
    with open(truth, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 16)
        mv = memoryview(mm).cast("d")
        emitted = int(mv[0])
        mv.release()
        mm.close()
    rec = read_run(out / run_id)
    acc = rec.accounting
    assert acc is not None and acc.emitted is not None
    counter = json.loads((out / run_id / "run.json").read_text()).get("live_counter")
    if counter:
        Path("/dev/shm", counter).unlink(missing_ok=True)
    return {
        "emitted": emitted,
        "karn_emitted": acc.emitted,
        "on_disk": acc.on_disk,
        "reported_missing": acc.missing or 0,
        "window_s": t_kill - rec.events[-1].timestamp,
        "prefix": float([e.payload.step for e in rec.events[1:]] == list(range(len(rec.events) - 1))),
    }


def bench_sigkill(kills: int, pause: float) -> None:
    rng = random.Random(14)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(kills):
            rows.append(kill_once(Path(tmp), k, rng.uniform(0.3, 1.5), pause))
    for r in rows:
        exact = r["karn_emitted"] - r["emitted"] in (0, 1) and r["reported_missing"] == r["karn_emitted"] - r["on_disk"]
        print(
            f"    emitted {r['emitted']:>6,} (karn counted {r['karn_emitted']:,}), on disk {r['on_disk']:>6,}, "
            f"inspect reports {r['reported_missing']:>4,} missing {'(exact)' if exact else '(WRONG)'}; "
            f"last event on disk {1e3 * r['window_s']:5.1f} ms before the kill; "
            f"{'exact prefix' if r['prefix'] else 'NOT A PREFIX'}"
        )
    windows = [r["window_s"] for r in rows]
    lost = [r["emitted"] - r["on_disk"] for r in rows]
    print(
        f"  SIGKILL loss: {kills} kills, events lost median {statistics.median(lost):.0f} / max {max(lost)}; "
        f"time lost median {1e3 * statistics.median(windows):.0f} ms / max {1e3 * max(windows):.0f} ms "
        f"(bound: one flush interval, 100 ms){'' if max(windows) <= 0.1 else ' EXCEEDED'}"
    )


def bench_hung_disk() -> None:
    import karn_otel
    from karn_otel import collector as kc
    from karn_otel.config import KarnConfig

    logging.getLogger("karn").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "hung").mkdir()
        fifo = Path(tmp) / "hung" / "events.jsonl"
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            sink = RunLogSink(Path(tmp), "hung")
            c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", run_id="hung"), sinks=[sink])
            kc.install(c)
            c.emit(EpisodeContext("bench", datetime(2026, 1, 1), "-", 0, 0, 0, "none", 0, {}, 1, "bench", {}))
            worst = 0.0
            for s in range(5000):
                t0 = time.perf_counter()
                c.emit(Scalars(s, {f"metric_{k:02d}": s + k / 7 for k in range(20)}))
                worst = max(worst, time.perf_counter() - t0)
            t0 = time.perf_counter()
            c.flush(timeout=10)  # what the episode-end flush costs training
            flush_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            unwritten = karn_otel.shutdown()
            took = time.perf_counter() - t0
        finally:
            os.close(reader)
        if sink.counter.name:
            Path("/dev/shm", sink.counter.name).unlink(missing_ok=True)
    print(
        f"  hung disk: slowest emit {1e3 * worst:.2f} ms, episode-end flush {flush_s:.2f} s; "
        f"shutdown returned in {took:.2f} s (bound 5 s), reporting {unwritten}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--kills", type=int, default=8)
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print("sustained rate at 0 drops (RunLogSink alone, 20-scalar events):")
    held = sustained(True, args.seconds, [25_000, 50_000, 75_000, 100_000, 125_000, 150_000])
    free = sustained(False, args.seconds, [100_000, 150_000, 200_000, 250_000, 300_000, 350_000])
    print(f"  GIL held:     {held:>8,} events/s at 0 drops (target >= 50,000: {'OK' if held >= 50_000 else 'MISSED'})")
    print(
        f"  GIL released: {free:>8,} events/s at 0 drops (target >= 200,000: {'OK' if free >= 200_000 else 'MISSED'})"
    )
    print("SIGKILL at random points (child emitting ~1,000 steps/s through karn_otel.emit):")
    bench_sigkill(args.kills, 0.0005)
    bench_hung_disk()
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
