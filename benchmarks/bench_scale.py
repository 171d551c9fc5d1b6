"""Series budget at scale: simulate N ranks' metric exports in one process, per export policy.

Each simulated rank is a real collector with its pipeline (health monitor included) and the
OTel sink's real instruments registered on a meter provider with the SDK's in-memory reader
(no network). Every rank records the same short episode (3 slots, 4 epochs; one rank has a
loss spike, so its health turns bad); rank 0 also records the job-wide snapshot, and every
rank the epoch's spread across ranks (``RankHealthSummary``, exported by rank 0). Printed per
policy: series per run (data points of one collection, summed over ranks), bytes of one OTLP
export interval (the encoded metrics requests), and Prometheus samples per second at a 15 s
scrape interval. Target: ``sampled:8`` keeps a 1,000-rank run under 2,000 series.

    python benchmarks/bench_scale.py [--ranks 1000]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import numpy as np
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from karn_otel.collector import KarnCollector
from karn_otel.config import KarnConfig
from karn_otel.contracts import EpisodeContext, HostSnapshot, RankHealthSummary, SeedStage, SlotSnapshot
from karn_otel.distributed.export_policy import RankExportPolicy
from karn_otel.distributed.reduction import rank_health_summary
from karn_otel.sinks.factory import build_pipeline
from karn_otel.sinks.otel.lifecycle import ExportLedger
from karn_otel.sinks.otel.metrics import MetricInstruments

SLOTS = ("early", "mid", "late")
SCRAPE_INTERVAL_S = 15.0
TARGET_SAMPLED8_SERIES = 2_000


class _InstrumentSink:
    def __init__(self, inst: MetricInstruments) -> None:
        self.handle = inst.handle

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def _context() -> EpisodeContext:
    from datetime import datetime, timezone

    return EpisodeContext(
        "ep-scale", datetime.now(timezone.utc), "abc", 0, 0, 0, "cnn", 1000, {s: 8 for s in SLOTS}, 4,
        "classification", {"lr": 0.01},
    )  # fmt: skip


@functools.lru_cache(maxsize=8)
def _summary(epoch: int, world: int, sick_rank: int) -> RankHealthSummary:
    """The RankHealthSummary rank 0 would reduce: every rank's loss, gradient norm, busy time, health."""
    rows = np.zeros((world, 5))
    rows[:, 0] = epoch
    rows[:, 1] = 1.0 - 0.1 * epoch
    rows[:, 2] = 1.0
    rows[:, 3] = np.linspace(1.0, 1.1, world)
    if epoch == 4:
        rows[sick_rank, 1], rows[sick_rank, 4] = 40.0, 2  # its loss spike, and its monitor's warning
    return rank_health_summary(rows, ("epoch", "train_loss", "host_grad_norm", "rank.busy_s", "rank.health_level"))


def one_rank(rank: int, world: int, policy: str, sick_rank: int) -> tuple[int, int, int]:
    """(data points, of which this rank's own, encoded bytes) of one collection of its metrics."""
    cfg = KarnConfig(out_dir=None, console="off", rank=rank, world_size=world, run_id="scale-run", export_ranks=policy)
    c = KarnCollector(cfg)
    inst = MetricInstruments(c.view, ExportLedger(), RankExportPolicy.parse(policy, world))
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    inst.register(provider)
    build_pipeline(cfg, c, sinks=[_InstrumentSink(inst)], processors=True)
    try:
        c.emit(_context())
        for e in range(1, 5):
            for s in SLOTS:
                c.emit(SlotSnapshot(s, SeedStage.DORMANT, e, None, None, 0, 0.0, None, None, 0.0, None, None, None))
            loss = 40.0 if (rank == sick_rank and e == 4) else 1.0 - 0.1 * e
            h = HostSnapshot(e, loss, 0.5, 1.0, 0.5, 1000, 0, 1000, 0, 1.0, {}, None)
            c.emit(h)
            # Every rank gets the epoch's spread across ranks (the trainer's reduce_epoch); rank 0 exports it.
            c.emit(_summary(e, world, sick_rank), is_reduced=True)
            if rank == 0:
                c.emit(h, is_reduced=True)
        data = reader.get_metrics_data()
        if data is None:  # nothing to export from this rank under the policy
            return 0, 0, 0
        dps = [
            dp
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            for dp in m.data.data_points
        ]
        # This rank's own series; a job-wide one (scope="job") may name a rank (karn.ranks.unhealthy_rank).
        own = sum(1 for dp in dps if "rank" in dp.attributes and "scope" not in dp.attributes)
        size = len(encode_metrics(data).SerializeToString())
        return len(dps), own, size
    finally:
        provider.shutdown()
        c.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=1000)
    args = ap.parse_args(argv)
    world = args.ranks
    sick = world // 2 + 1  # one rank with a loss spike at the last epoch
    print(f"{world} simulated ranks, one unhealthy (rank {sick}); one collection per rank")
    print(
        f"{'policy':<12} {'ranks w/ own':>16} {'series/run':>11} {'bytes/interval':>15} {'samples/s':>10} {'time':>7}"
    )
    ok = True
    for policy in ("all", "reduced", "sampled:8"):
        t0 = time.perf_counter()
        total_points = total_bytes = exporting = 0
        for rank in range(world):
            points, own, size = one_rank(rank, world, policy, sick)
            total_points += points
            total_bytes += size
            exporting += own > 0
        dt = time.perf_counter() - t0
        print(
            f"{policy:<12} {exporting:>16,} {total_points:>11,} {total_bytes:>15,} "
            f"{total_points / SCRAPE_INTERVAL_S:>10,.0f} {dt:>6.1f}s"
        )
        if policy == "sampled:8":
            met = total_points < TARGET_SAMPLED8_SERIES
            ok = ok and met
            print(
                f"target sampled:8 < {TARGET_SAMPLED8_SERIES:,} series: {'MET' if met else 'MISSED'} ({total_points:,})"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
