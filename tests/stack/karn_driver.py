"""A Karn process for the stack tests: trains the reference system, then serves /metrics until told to stop.

Run by tests/stack/test_live.py as a subprocess (``python tests/stack/karn_driver.py ...``) so
that a real Prometheus scrapes a real, separate Karn process, exactly as a user's trainer.

Protocol: one JSON object per line on stdout.

* ``{"event": "port", "port": N, "run_id": ...}`` once the endpoint is up (before training);
* ``{"event": "ready", "run_dir": ..., "failing": [...]}`` after training, with the run log
  flushed and the HealthMonitor's failing checks (also written to ``--report``); with
  ``--inject-loss-spike-epoch`` the labels are shuffled for that one epoch: a real loss spike the
  HealthMonitor raises (an alert event) and the run recovers from;
* ``{"event": "done", "cmd": ...}`` after each command read from stdin:

  - ``faults``: a sink that fails on every event is added and an event is emitted through it
    (dropped: ``FailingSink:error``), and an event for an unknown slot is emitted (rejected);
  - ``midepisode``: a new episode starts and reports its first epoch (a rank killed right
    after this has vanished mid-episode);
  - ``exit``: shut Karn down and exit.

The process exits by itself after ``--timeout`` seconds, so a crashed test leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import select
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import karn_otel  # noqa: E402
from karn_otel.config import KarnConfig  # noqa: E402
from karn_otel.contracts import EpisodeContext, HostSnapshot, Scalars, SeedStage, SlotSnapshot  # noqa: E402
from karn_otel.reference.trainer import RunConfig, run_reference  # noqa: E402

# A short heuristic run in which seeds germinate, blend and get attributed (Shapley values
# with intervals, removal costs, gate results, isolation leakage, dense windows) within ~10
# epochs: warm-up of one epoch, germinate on any plateau, short lifecycle stages.
FAST_LIFECYCLE = dict(warmup_epochs=1, plateau_threshold=1.0, min_training_epochs=1, blend_epochs=2, probation_epochs=1)


def say(**msg) -> None:
    print(json.dumps(msg), flush=True)


class FailingSink:
    """A sink whose every write fails (a full disk, a dead network): the collector counts the loss."""

    def handle(self, event) -> None:
        raise RuntimeError("stack test: this sink always fails")

    def flush(self, timeout=None) -> None:
        pass

    def close(self) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--report", type=Path, required=True)
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--inject-loss-spike-epoch", type=int, default=0, help="shuffle the labels for this epoch (0: off)")
    args = ap.parse_args()
    deadline = time.monotonic() + args.timeout

    collector = karn_otel.configure(
        KarnConfig(run_id=args.run_id, out_dir=args.out, console="off", prometheus_port=args.port, rank=0, world_size=1)
    )
    port = next(s.prometheus_port for s in collector.sinks if getattr(s, "prometheus_port", None) is not None)
    say(event="port", port=port, run_id=collector.run_id)

    cfg = RunConfig(epochs=args.epochs, seed=0, inject_loss_spike_epoch=args.inject_loss_spike_epoch, **FAST_LIFECYCLE)
    run_reference(cfg, checkpoint_dir=args.out / collector.run_id / "checkpoints")
    collector.flush()
    failing = sorted(c.name for c in collector.view.health_report().failing)
    args.report.write_text(json.dumps({"run_id": collector.run_id, "failing": failing}))
    say(event="ready", run_dir=str(args.out / collector.run_id), failing=failing)

    while time.monotonic() < deadline:
        ready, _, _ = select.select([sys.stdin], [], [], 0.5)
        if not ready:
            continue
        cmd = sys.stdin.readline().strip()
        if cmd in ("", "exit"):
            break
        if cmd == "faults":
            collector.add_sink(FailingSink())
            karn_otel.emit(Scalars(step=0, values={"stack_test_probe": 1.0}))
            karn_otel.emit(
                SlotSnapshot("nowhere", SeedStage.DORMANT, 0, None, None, 0, 0.0, None, None, 0.0, None, None, None)
            )
        elif cmd == "midepisode":
            karn_otel.emit(
                EpisodeContext(
                    episode_id=uuid.uuid4().hex,
                    timestamp=datetime.now(timezone.utc),
                    git_commit="stack-test",
                    base_seed=1,
                    torch_seed=1,
                    numpy_seed=1,
                    host_architecture="cnn_3block",
                    host_params=1674,
                    slot_config={"early": 4, "mid": 8, "late": 16},
                    max_epochs=args.epochs,
                    task_type="classification",
                    hyperparameters={"stack_test": True},
                )
            )
            karn_otel.emit(HostSnapshot(1, 2.0, 0.3, 1.9, 0.35, 1674, 0, 1674, 0, 1.0, {}, None))
        else:
            say(event="error", cmd=cmd)
            continue
        collector.flush()
        say(event="done", cmd=cmd)
    karn_otel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
