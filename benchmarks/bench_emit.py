"""Cost of one instrumented step, end to end, and the run-log writer's throughput (issue 11).

One step = 20 named scalars emitted as one ``Scalars`` contract event through a configured
collector with the run log on. Measured END TO END: the time for N steps including the final
flush (``karn_otel.shutdown()``, which waits until every event is on disk), divided by N.
Each variant builds its step's dict of 20 values inside the timed loop, as a training loop
does (precomputed dicts for 20,000 steps would not fit in cache and charge every variant
for memory misses instead). Beside it, in the same run and interleaved (A B C A B C ...): one orjson line per step to a
file, and 20 prometheus_client gauges with bound labels. Targets: <= 10 us per step and
<= 2x one orjson line.

Then the writer alone (``RunLogSink``, no collector): events/s it sustains while the
producing thread is busy in pure Python (holding the GIL), and while the producer has the GIL
released (time.sleep, like a numpy/torch op), with the drops. Targets: >= 50,000 events/s
with the GIL held (0 drops), >= 200,000 events/s with it released.

``--profile`` adds a cProfile of the emit path, to show where a step's time goes.

    .venv/bin/python benchmarks/bench_emit.py [--steps 20000] [--rounds 5] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

import karn_otel
from karn_otel.config import KarnConfig
from karn_otel.contracts import (
    EpisodeContext,
    Scalars,
    TelemetryEvent,
    TelemetryEventType,
)
from karn_otel.sinks.runlog import RunLogSink

NAMES = [f"metric_{i:02d}" for i in range(20)]


def _values(step: int) -> dict[str, float]:
    base = step * 1e-3
    return {n: base + i * 0.123456789 for i, n in enumerate(NAMES)}


def _context() -> EpisodeContext:
    return EpisodeContext(
        episode_id="bench",
        timestamp=datetime(2026, 1, 1),
        git_commit="-",
        base_seed=0,
        torch_seed=0,
        numpy_seed=0,
        host_architecture="none",
        host_params=0,
        slot_config={},
        max_epochs=1,
        task_type="bench",
        hyperparameters={},
    )


_CPU: dict[str, list[float]] = {"karn": [], "bare": [], "orjson": []}  # process CPU s per run


def karn_steps(n: int, out: Path | None) -> float:
    """Seconds for n steps through a configured collector with the run log (None: no sinks,
    the collector alone), flush included. Also records the process CPU time (every thread,
    the run-log writer's included) in _CPU."""
    karn_otel.configure(KarnConfig(out_dir=out, console="off"))
    emit = karn_otel.emit
    c0 = time.process_time()
    t0 = time.perf_counter()
    emit(_context())
    for s in range(n):
        emit(Scalars(s, _values(s)))
    karn_otel.shutdown()  # flushes: everything is on disk (fsynced) when it returns
    elapsed = time.perf_counter() - t0
    _CPU["karn" if out is not None else "bare"].append(time.process_time() - c0)
    return elapsed


def orjson_steps(n: int, out: Path) -> float:
    c0 = time.process_time()
    t0 = time.perf_counter()
    with open(out / "orjson.jsonl", "wb") as f:
        dumps = orjson.dumps
        for s in range(n):  # noqa: FURB122 (one write per step, as a hand-rolled logger does)
            f.write(dumps({"step": s, "values": _values(s)}) + b"\n")
    elapsed = time.perf_counter() - t0
    _CPU["orjson"].append(time.process_time() - c0)
    return elapsed


def prometheus_steps(n: int) -> float | None:
    try:
        from prometheus_client import CollectorRegistry, Gauge
    except ImportError:
        return None
    reg = CollectorRegistry()
    g = Gauge("bench_value", "bench", ["name"], registry=reg)
    bound = [g.labels(name=nm) for nm in NAMES]
    t0 = time.perf_counter()
    for s in range(n):
        v = _values(s)
        for b, nm in zip(bound, NAMES):
            b.set(v[nm])
    return time.perf_counter() - t0


def bench_steps(steps: int, rounds: int) -> None:
    karn, bare, orj, prom = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            out = Path(tmp) / f"r{r}"
            out.mkdir()
            karn.append(karn_steps(steps, out) / steps * 1e6)
            bare.append(karn_steps(steps, None) / steps * 1e6)
            orj.append(orjson_steps(steps, out) / steps * 1e6)
            p = prometheus_steps(steps)
            if p is not None:
                prom.append(p / steps * 1e6)
    k, o = statistics.median(karn), statistics.median(orj)
    print(f"step = 20 scalars, {steps} steps x {rounds} rounds (interleaved), median per step:")
    print(f"  karn emit + run log, end to end: {k:8.2f} us   (target <= 10 us: {'OK' if k <= 10 else 'MISSED'})")
    b = statistics.median(bare)
    print(f"    of which the collector alone (no sinks: validation, stamping, store): {b:.2f} us")
    print(f"    so the run log costs {k - b:.2f} us per step (handle + writer thread + final flush)")
    print(f"  one orjson line to a file:       {o:8.2f} us")
    if prom:
        pr = statistics.median(prom)
        print(f"  prometheus_client, 20 gauges:    {pr:8.2f} us")
    print(f"  karn / orjson: {k / o:5.2f}x   (target <= 2x: {'OK' if k / o <= 2 else 'MISSED'})")
    print(f"  run-log part / orjson: {(k - b) / o:5.2f}x   (the part the run log controls)")
    if prom:
        print(f"  karn / prometheus: {k / pr:5.2f}x")
    print(f"  all rounds (us): karn {[round(x, 2) for x in karn]}, orjson {[round(x, 2) for x in orj]}")
    # CPU time of the whole process (training thread + run-log writer), best round: what a
    # step costs the machine, less sensitive than wall time to other load on a shared host.
    kc_, bc_, oc_ = (min(_CPU[k]) / steps * 1e6 for k in ("karn", "bare", "orjson"))
    print(
        f"  process CPU per step (all threads, best round): karn {kc_:.2f} us (collector alone {bc_:.2f},"
        f" run log {kc_ - bc_:.2f}), orjson {oc_:.2f} us: {kc_ / oc_:.2f}x"
    )


def bench_door(rounds: int = 40, number: int = 2000) -> None:
    """Where one step's emit goes: the collector's parts, each timed alone (min over rounds,
    interleaved), beside the loop's own cost of building the 20 values."""
    import timeit

    from karn_otel.codec import checker, encode_lines

    c = karn_otel.configure(KarnConfig(out_dir=None, console="off"))
    karn_otel.emit(_context())
    s = Scalars(5, _values(5))
    env = c._accept(s, None, False)
    assert env is not None
    batch = [env] * 512
    g = {
        "emit": karn_otel.emit,
        "s": s,
        "values": _values,
        "Scalars": Scalars,
        "check": checker(Scalars),
        "c": c,
        "env": env,
        "encode": encode_lines,
        "batch": batch,
    }
    parts = {
        "the loop builds its 20 values (not Karn)": ("values(5)", 1),
        "Scalars(step, values)": ("Scalars(5, s.values)", 1),
        "karn_otel.emit(payload), no sinks": ("emit(s)", 1),
        "  validation (generated checker)": ("check(s)", 1),
        "  store.add": ("c.store.add(env)", 1),
        "run-log encoding, per event (batches of 512)": ("encode(batch)", 512),
    }
    best = {k: float("inf") for k in parts}
    for _ in range(rounds):
        for name, (stmt, per) in parts.items():
            t = timeit.Timer(stmt, timer=time.process_time, globals=g).timeit(number) / number / per * 1e6
            best[name] = min(best[name], t)
    karn_otel.shutdown()
    print(f"emit path, each part alone (min of {rounds} interleaved rounds of {number}):")
    for name, t in best.items():
        print(f"  {name:46s} {t:6.2f} us")


def _event(step: int) -> TelemetryEvent:
    return TelemetryEvent(
        TelemetryEventType.SCALARS,
        "bench",
        "ep",
        0,
        time.time(),
        Scalars(step, _values(step)),
    )


def writer_throughput(gil_held: bool, seconds: float, rate: float) -> tuple[float, int, int, float, int]:
    """Offer ``rate`` events/s for ``seconds`` while the producer thread is busy; return the
    writer's rate (events written / time until all are written), drops, events offered, the
    rate actually offered (``handle`` encodes on the producer's thread, so one producer
    cannot offer more than its own handle cost allows), and the backlog left at the end."""
    events = [_event(s) for s in range(2048)]
    with tempfile.TemporaryDirectory() as tmp:
        sink = RunLogSink(Path(tmp), "bench")
        n = 0
        t0 = time.perf_counter()
        t_end = t0 + seconds
        chunk = 256
        while True:
            now = time.perf_counter()
            if now >= t_end:
                break
            due = int((now - t0) * rate)
            while n < due:
                for _ in range(min(chunk, due - n)):
                    sink.handle(events[n & 2047])
                    n += 1
            if gil_held:
                x = 0
                for i in range(2000):  # pure-Python "training" work, holding the GIL
                    x += i * i
            else:
                time.sleep(0.0005)  # a numpy/torch op: GIL released
        offered = n / (time.perf_counter() - t0)
        backlog = sink.queue_depth()
        sink.flush(timeout=60)
        elapsed = time.perf_counter() - t0
        drops = sum(sink.dropped().values())
        lines = (Path(tmp) / "bench" / "events.jsonl").read_bytes().count(b"\n")
        sink.close()
    assert lines + drops == n, (lines, drops, n)
    return lines / elapsed, drops, n, offered, backlog


def bench_writer(seconds: float) -> None:
    print("run-log writer (RunLogSink alone, Scalars events of 20 values), producer busy:")
    for gil_held, rate, target in ((True, 60_000, 50_000), (False, 240_000, 200_000)):
        got, drops, n, offered, backlog = writer_throughput(gil_held, seconds, rate)
        what = "GIL held (pure Python)" if gil_held else "GIL released (sleep)"
        ok = "OK" if got >= target and drops == 0 else "MISSED"
        print(
            f"  {what:24s}: asked {rate:>7,}/s, the producer offered {offered:>9,.0f}/s -> written "
            f"{got:>9,.0f} events/s, drops {drops} of {n:,}, backlog at the end {backlog:,}"
            f"   (target >= {target:,}/s, 0 drops: {ok})"
        )
        if offered < 0.95 * rate:
            print(
                f"  {'':24s}  (the producer could not offer the rate asked: its own handle() calls, which "
                "encode on its thread, and its sleeps fill its time)"
            )
    # Capacity: a full queue (100,000 events) drained while the producer is busy.
    for gil_held in (True, False):
        rate = drain_rate(gil_held)
        what = "GIL held" if gil_held else "GIL released"
        stall = f"; longest training-thread pause {_STALLS[-1] * 1e3:.1f} ms" if gil_held else ""
        print(f"  capacity, {what:12s}: {rate:>9,.0f} events/s (draining a full queue of 100,000){stall}")


_STALLS: list[float] = []


def drain_rate(gil_held: bool, n: int = 100_000) -> float:
    events = [_event(s) for s in range(2048)]
    with tempfile.TemporaryDirectory() as tmp:
        sink = RunLogSink(Path(tmp), "bench", max_queue=n, wake_batch=10**9)
        for i in range(n):
            sink.handle(events[i & 2047])
        t0 = time.perf_counter()
        sink._wake.set()
        if gil_held:
            stall = 0.0
            last = time.perf_counter()
            while sink.queue_depth():
                x = 0
                for i in range(200):  # pure-Python training work (~10-20 us)
                    x += i * i
                now = time.perf_counter()
                stall, last = max(stall, now - last), now
            _STALLS.append(stall)
        else:
            while sink.queue_depth():
                time.sleep(0.0005)
        sink.flush(timeout=60)
        rate = n / (time.perf_counter() - t0)
        sink.close()
    return rate


def profile_emit(steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        prof = cProfile.Profile()
        prof.enable()
        karn_steps(steps, Path(tmp))
        prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
    print("cProfile of the emit path (tottime, training thread):")
    print(s.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--seconds",
        type=float,
        default=2.0,
        help="duration of each writer-throughput run",
    )
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    print(f"switch interval {sys.getswitchinterval() * 1e3:.1f} ms, python {sys.version.split()[0]}")
    bench_steps(args.steps, args.rounds)
    bench_door()
    bench_writer(args.seconds)
    if args.profile:
        profile_emit(args.steps)


if __name__ == "__main__":
    main()
