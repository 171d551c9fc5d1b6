"""The OTel sink's cost on the reference training loop, measured in one run.

Three configurations, all with the run log on (console off):

  base  Karn without the OTel sink
  live  + OTel sink exporting over OTLP to a loopback receiver in another process
        (tests/otlp_receiver.py), plus the embedded Prometheus endpoint (not scraped)
  dead  + OTel sink exporting to a closed port (every export fails)

Repetitions are interleaved (base live dead, base live dead, ...) and the median of the
per-pair ratios live/base and dead/base is printed: each pair ran back to back, so slow
drifts of a shared machine cancel. Targets: live <= 1.03, dead <= 1.02. Only the episode is
timed; configure() and shutdown() are not (shutdown time is printed separately).

    .venv/bin/python benchmarks/bench_otel.py [--epochs 8] [--repeats 9] [--protocol grpc]
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import subprocess
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
from tests.conftest import make_context  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here afterwards
    return port


class ReceiverProcess:
    """The loopback OTLP receiver in its own process: its decoding must not be billed to Karn."""

    def __init__(self, protocol: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.otlp_receiver", protocol],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline().split()
        if line[:1] != ["port"]:
            raise RuntimeError(f"receiver did not start: {line}")
        self.endpoint = f"http://127.0.0.1:{line[1]}"

    def stop(self) -> str:
        """Stop it; returns its 'spans N metric_points M' line."""
        out, _ = self.proc.communicate(timeout=30)
        return out.strip()


def karn_config(out: Path, endpoint: str | None, args: argparse.Namespace) -> KarnConfig:
    if endpoint is None:
        return KarnConfig(out_dir=out, console="off")
    return KarnConfig(
        out_dir=out,
        console="off",
        otlp_endpoint=endpoint,
        otlp_protocol=args.protocol,
        prometheus_port=0,
        otel_export_interval_s=args.interval,
    )


def timed_episode(cfg: RunConfig, kcfg: KarnConfig) -> tuple[float, float, float]:
    """(episode wall seconds, episode CPU seconds of the whole process, shutdown wall seconds)."""
    karn_otel.configure(kcfg)
    t0, c0 = time.perf_counter(), time.process_time()
    run_episode(cfg)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    t1 = time.perf_counter()
    karn_otel.shutdown()
    return dt, cpu, time.perf_counter() - t1


def emit_cost(kcfg: KarnConfig, n: int = 20_000) -> float:
    """Microseconds per emit(SlotSnapshot) with this configuration (validation + every sink's handle)."""
    c = karn_otel.configure(kcfg)
    c.emit(make_context())
    snap = SlotSnapshot("early", SeedStage.BLENDING, 2, "s", "norm", 16, 0.5, 0.01, 0.02, 0.0, "G2", True, "ok")
    per = min(timeit.repeat(lambda: c.emit(snap, epoch=1), number=n, repeat=3)) / n
    karn_otel.shutdown()
    return per * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--protocol", choices=["grpc", "http/protobuf"], default="grpc")
    ap.add_argument("--interval", type=float, default=1.0, help="otel_export_interval_s (spans and metrics)")
    args = ap.parse_args()
    # The OTLP exporters log every failed export; the dead-port runs would flood the output.
    logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
    cfg = RunConfig(epochs=args.epochs)
    rx = ReceiverProcess(args.protocol)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        dead = f"http://127.0.0.1:{closed_port()}"
        configs = {"base": None, "live": rx.endpoint, "dead": dead}
        timed_episode(cfg, karn_config(out, rx.endpoint, args))  # warm-up: imports, data, allocator
        times: dict[str, list[float]] = {k: [] for k in configs}
        cpus: dict[str, list[float]] = {k: [] for k in configs}
        closes: dict[str, list[float]] = {k: [] for k in configs}
        order = list(configs)
        for i in range(args.repeats):
            # Rotate the order inside each triple so no configuration always runs first.
            for name in order[i % 3 :] + order[: i % 3]:
                dt, cpu, close = timed_episode(cfg, karn_config(out, configs[name], args))
                times[name].append(dt)
                cpus[name].append(cpu)
                closes[name].append(close)

        def ratio(samples: dict[str, list[float]], name: str) -> float:
            return statistics.median(x / b for x, b in zip(samples[name], samples["base"]))

        print(
            f"reference loop, {args.epochs} epochs, {args.repeats} interleaved triples, "
            f"OTLP {args.protocol}, export interval {args.interval} s"
        )
        for name in configs:
            print(
                f"  {name:4s}  wall median {statistics.median(times[name]):.3f} s  {[round(x, 3) for x in times[name]]}"
                f"  cpu median {statistics.median(cpus[name]):.3f} s"
                f"  shutdown median {statistics.median(closes[name]):.3f} s"
            )
        print(f"  wall ratio live/base = {ratio(times, 'live'):.4f}   (target <= 1.03)")
        print(f"  wall ratio dead/base = {ratio(times, 'dead'):.4f}   (target <= 1.02)")
        # CPU time of the whole process (every thread): what the sink costs on a saturated machine.
        print(f"  cpu  ratio live/base = {ratio(cpus, 'live'):.4f}   dead/base = {ratio(cpus, 'dead'):.4f}")
        # Other processes only ever add time, so the fastest runs are the least disturbed.
        best = {k: min(v) for k, v in times.items()}
        live_best, dead_best = best["live"] / best["base"], best["dead"] / best["base"]
        print(f"  best-run ratio live/base = {live_best:.4f}   dead/base = {dead_best:.4f}")
        base_us = emit_cost(karn_config(out, None, args))
        live_us = emit_cost(karn_config(out, rx.endpoint, args))
        print(f"emit(SlotSnapshot): {base_us:.2f} us without the OTel sink, {live_us:.2f} us with it")
    print(f"receiver: {rx.stop()}")


if __name__ == "__main__":
    main()
