"""`karn run --nproc 4` under each rank export policy, scraped by a real Prometheus and decoded
from OTLP: the series that reach the backend are the ones the policy promises, and the
job-wide spread across ranks (RankHealthSummary, exported by rank 0) equals the ranks' own
run logs.

Rank 2 is made faulty: it sleeps before every validation (a straggler) and its labels are
shuffled in epoch 7 (a real loss spike on that rank alone, which its own HealthMonitor flags).
So under ``sampled:1`` the per-rank series come from the one rank the run id hashes to plus
rank 2 once it turned unhealthy, and under every policy rank 0's ``karn_ranks_*`` series name
rank 2 as the slowest and the unhealthy one.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from karn_otel import stack_rules
from karn_otel.distributed.export_policy import sampled_ranks
from karn_otel.sinks.runlog import read_run
from tests.otlp_receiver import OTLPReceiver
from tests.stack.conftest import REPO, Prometheus, free_port, stop_process, wait_until

pytestmark = [pytest.mark.stack, pytest.mark.slow]

WORLD = 4
EPOCHS = 8
FAULTY = 2
SPIKE_EPOCH = 7
SLOW_S = 0.3
RECORDING_RULES = stack_rules.RECORDING_PATH


def free_port_block(n: int) -> int:
    """A base port with ``n - 1`` free successors (rank k listens on base + k)."""
    for _ in range(50):
        base = free_port()
        socks = []
        try:
            for k in range(1, n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {n} free ports")


def host_snapshots(run_dir: Path) -> list:
    return [e.payload for e in read_run(run_dir).events if e.event_type.value == "host_snapshot" and not e.is_reduced]


def check_recording_rules(prom: Prometheus, run_id: str, policy: str, last: list, exporting: set[int]) -> None:
    """The recording rules (stack/prometheus/rules/karn-recording.yml), as the real Prometheus
    evaluated them on the scraped series, equal numpy on the ranks' own run logs: over every rank
    under ``all``; under ``reduced`` they have nothing to read (karn_ranks_* is the spread then)."""
    sel = f'{{run_id="{run_id}"}}'
    if policy == "reduced":
        assert prom.query(f"run:karn_host_train_loss:max{sel}") == []
        assert prom.query(f"rank:karn_host_train_loss:ratio_to_median{sel}") == []
        return
    ranks = sorted(exporting)
    fields = {
        "karn_host_train_loss": "train_loss",
        "karn_host_val_accuracy": "val_accuracy",
        "karn_host_grad_norm": "host_grad_norm",
    }
    for metric, field in fields.items():
        x = np.array([getattr(last[k], field) for k in ranks])
        want = {"max": x.max(), "min": x.min(), "avg": x.mean(), "median": np.median(x), "spread": x.max() - x.min()}

        def recorded(metric: str = metric, want: dict = want) -> dict[str, float]:
            got = {op: prom.query(f"run:{metric}:{op}{sel}") for op in want}
            return {op: float(r[0]["value"][1]) for op, r in got.items() if r}

        # The rules run every second; the last scrape of the last epoch reaches them within a few.
        wait_until(lambda: recorded() == pytest.approx(want, rel=1e-9), timeout=15, what=f"run:{metric}:* = numpy")
        if metric == "karn_host_val_accuracy":
            dev = {str(k): x[i] - np.median(x) for i, k in enumerate(ranks)}
            got = prom.query(f"rank:{metric}:diff_from_median{sel}")
        else:
            dev = {str(k): x[i] / np.median(x) for i, k in enumerate(ranks)}
            got = prom.query(f"rank:{metric}:ratio_to_median{sel}")
        assert {r["metric"]["rank"]: float(r["value"][1]) for r in got} == pytest.approx(dev, rel=1e-9), metric
    counted = prom.query(f"run:karn_telemetry_events_accepted_total:count_ranks{sel}")
    assert [(r["metric"]["world_size"], float(r["value"][1])) for r in counted] == [(str(WORLD), len(ranks))]
    # The Ranks dashboard's Worst ranks table, as Grafana runs it: per measure, the ranks above the
    # job median (below it, for accuracy), worst first, at most 5.
    rows = prom.query(stack_rules.worst_ranks_expr(sel))
    loss = np.array([last[k].train_loss for k in ranks])
    above = {str(k) for i, k in enumerate(ranks) if loss[i] / np.median(loss) > 1}
    shown = {r["metric"]["rank"] for r in rows if r["metric"]["measure"] == "train loss / job median"}
    assert shown == set(sorted(above, key=lambda k: -last[int(k)].train_loss)[: stack_rules.WORST_K])


@pytest.mark.parametrize("policy", ["all", "reduced", "sampled:1"])
def test_four_ranks_export_what_the_policy_says(start_prometheus, tmp_path, policy):
    base = free_port_block(WORLD)
    targets = [f"127.0.0.1:{base + k}" for k in range(WORLD)]
    prom: Prometheus = start_prometheus(
        {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "karn", "honor_labels": True, "static_configs": [{"targets": targets}]}],
            "rule_files": [str(RECORDING_RULES)],
        }
    )
    with OTLPReceiver("http/protobuf") as rx:
        cmd = [
            sys.executable, "-m", "karn_otel.cli", "run", "--nproc", str(WORLD), "--epochs", str(EPOCHS),
            "--no-live", "--out", str(tmp_path), "--prometheus-port", str(base), "--serve-after", "60",
            "--export-ranks", policy, "--inject-fault-rank", str(FAULTY), "--inject-slow-rank", str(SLOW_S),
            "--inject-loss-spike", str(SPIKE_EPOCH),
            "--otlp-endpoint", rx.endpoint, "--otlp-protocol", "http/protobuf",
        ]  # fmt: skip
        log = open(tmp_path / "karn-run.log", "w")  # a file, not a pipe nobody drains
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            # Rank 0's job-wide series reach the last epoch under every policy.
            wait_until(
                lambda: prom.query(f'karn_host_epoch{{scope="job"}} >= {EPOCHS}'),
                timeout=180,
                what=f"the job-wide epoch {EPOCHS} in Prometheus",
            )
            (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
            run_id = run_dir.name
            expected = {
                "all": set(range(WORLD)),
                "reduced": set(),
                "sampled:1": set(sampled_ranks(run_id, WORLD, 1)) | {FAULTY},
            }[policy]

            def ranks_ever(expr: str) -> set[int]:
                return {int(r["metric"]["rank"]) for r in prom.query(expr) if r["metric"].get("rank")}

            # Scrapes: per-rank series from exactly the policy's ranks (rank 2 joins once unhealthy).
            ever = f'count by (rank) (count_over_time(karn_host_train_loss{{run_id="{run_id}", scope=""}}[10m]))'
            wait_until(
                lambda: ranks_ever(ever) == expected,
                timeout=60,
                what=f"per-rank series of exactly ranks {sorted(expected)} under {policy}",
            )
            every = ranks_ever(
                f'count by (rank) (count_over_time(karn_telemetry_events_accepted_total{{run_id="{run_id}"}}[10m]))'
            )
            assert every == expected, "Karn's own per-rank accounting follows the policy too (liveness does not)"

            # Every rank still writes its own run log, all epochs.
            logs = [run_dir] + [run_dir / "ranks" / f"rank{k}" for k in range(1, WORLD)]
            snaps = [host_snapshots(d) for d in logs]
            assert [len(s) for s in snaps] == [EPOCHS] * WORLD

            # The spread across ranks, as rank 0 exported it, equals the ranks' own logs.
            last = [s[-1] for s in snaps]
            losses = [h.train_loss for h in last]
            spread = {
                r["metric"]["stat"]: float(r["value"][1]) for r in prom.query('karn_ranks_train_loss{scope="job"}')
            }
            assert spread["max"] == pytest.approx(max(losses), rel=1e-12)
            assert spread["min"] == pytest.approx(min(losses), rel=1e-12)
            assert spread["mean"] == pytest.approx(sum(losses) / WORLD, rel=1e-12)
            worst = {r["metric"]["quantity"]: float(r["value"][1]) for r in prom.query("karn_ranks_worst_rank")}
            assert worst["busy"] == FAULTY, "the straggler is the busiest rank"
            busy = {r["metric"]["stat"]: float(r["value"][1]) for r in prom.query("karn_ranks_busy_seconds")}
            assert busy["max"] - busy["min"] >= SLOW_S * 0.7, busy
            # A counter: the faulty rank was unhealthy for about one epoch, maybe less than a scrape.
            flagged = prom.query(f'karn_ranks_unhealthy_epochs_total{{run_id="{run_id}"}} > 0')
            assert {r["metric"]["rank"] for r in flagged} == {str(FAULTY)}, "the unhealthy rank, named by rank 0"
            assert all("rank" not in r["metric"] for r in prom.query("karn_ranks_train_loss")), "job-wide: no rank"
            check_recording_rules(prom, run_id, policy, last, expected)
        finally:
            stop_process(proc)
            log.close()

        # OTLP: the same policy on the push path.
        points = rx.metric_points()
        otlp_ranks = {
            p.attributes["rank"] for p in points if p.name == "karn.host.train_loss" and "scope" not in p.attributes
        }
        assert otlp_ranks == expected
        job = [p for p in points if p.name == "karn.host.train_loss" and p.attributes.get("scope") == "job"]
        assert len(job) >= EPOCHS - 1 and {p.resource["karn.rank"] for p in job} == {0}
        assert {p.resource["karn.rank"] for p in points if p.name.startswith("karn.ranks.")} == {0}

        # Traces (every policy exports them): one trace, each rank's share of the reduction.
        spans = rx.spans()
        assert len({s.trace_id for s in spans}) == 1, "one trace per episode across the four ranks"
        gathers = [s for s in spans if s.name == "karn.reduction.gather"]
        assert {(s.resource["karn.rank"], s.attributes["karn.epoch"]) for s in gathers} == {
            (k, e) for k in range(WORLD) for e in range(1, EPOCHS + 1)
        }
        waits: dict[int, list[float]] = {k: [] for k in range(WORLD)}
        for s in spans:
            if s.name == "karn.counterfactual":
                waits[s.resource["karn.rank"]].append(s.attributes["karn.rank.wait_s"])
        median = {k: sorted(v)[len(v) // 2] for k, v in waits.items()}
        assert min(median, key=median.get) == FAULTY, f"the others wait for the straggler: {median}"
        assert all(median[k] >= SLOW_S * 0.7 for k in range(WORLD) if k != FAULTY), median
