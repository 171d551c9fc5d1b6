"""Experiments: a set of runs that belong together, and their control twins.

``karn run --seeds 0,1,2 --control`` (or ``--repeats 3``) runs, for each seed, the host-only
control twin first and then the morphogenetic run, each in its own run dir under one
experiment dir::

    OUT/EXPERIMENT/experiment.json          the manifest (plan and status of every run)
    OUT/EXPERIMENT/EXPERIMENT-s0-control/   run dirs (events.jsonl, run.json, ...)
    OUT/EXPERIMENT/EXPERIMENT-s0-morph/

The twin is the same :class:`RunConfig` with ``controller="none"``: the same seed gives the
same initial weights and the same data order (both are seeded from it), and seeds never
germinate. Running it first lets the morph run record the twin's accuracy beside its own,
epoch by epoch (``Scalars``: ``control_val_accuracy``, ``accuracy_delta_vs_control``), so
"vs control (causal)" is in the morph run's own log. Cost: about 2x the runs.

Resuming: the same command with the same ``--experiment`` name skips every run the manifest
marks done; a run that was interrupted is started again in a fresh run dir (the partial one
is kept and listed as interrupted).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from karn_otel.contracts import HostSnapshot
from karn_otel.sinks.runlog import RunDirError, read_run

MANIFEST = "experiment.json"
MANIFEST_VERSION = 1


@dataclass
class PlannedRun:
    seed: int
    arm: str  # control | morph
    run_id: str
    status: str = "pending"  # pending | done | interrupted
    attempts: list[str] = field(default_factory=list)  # run ids of earlier, interrupted attempts


@dataclass
class Manifest:
    experiment_id: str
    created: str
    seeds: list[int]
    control: bool
    settings: dict[str, Any]  # the RunConfig fields shared by every run (seed aside)
    runs: list[PlannedRun]
    version: int = MANIFEST_VERSION

    def save(self, exp_dir: Path) -> None:
        tmp = exp_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        os.replace(tmp, exp_dir / MANIFEST)  # atomic: a kill never leaves half a manifest

    @classmethod
    def load(cls, exp_dir: Path) -> Manifest:
        try:
            raw = json.loads((exp_dir / MANIFEST).read_text())
            runs = [PlannedRun(**r) for r in raw.pop("runs")]
            return cls(runs=runs, **raw)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise RunDirError(f"{exp_dir / MANIFEST}: unreadable experiment manifest ({exc})") from None


def new_experiment_id() -> str:
    return "exp-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def plan(experiment_id: str, seeds: Sequence[int], control: bool, settings: dict[str, Any]) -> Manifest:
    runs = []
    for s in seeds:
        if control:
            runs.append(PlannedRun(s, "control", f"{experiment_id}-s{s}-control"))
        runs.append(PlannedRun(s, "morph", f"{experiment_id}-s{s}-morph"))
    return Manifest(experiment_id, datetime.now(timezone.utc).isoformat(), list(seeds), control, settings, runs)


def control_curve(run_dir: Path) -> tuple[float, ...]:
    """The twin's validation accuracy per epoch (epoch 1 first), from its run log."""
    rec = read_run(run_dir)
    by_epoch = {ev.payload.epoch: ev.payload.val_accuracy for ev in rec.events if isinstance(ev.payload, HostSnapshot)}
    return tuple(by_epoch[e] for e in sorted(by_epoch))


def _finished(run_dir: Path) -> bool:
    try:
        rec = read_run(run_dir)
    except RunDirError:
        return False
    return any(ev.event_type.value == "episode_ended" for ev in rec.events)


def run_experiment(
    exp_dir: Path,
    manifest: Manifest,
    run_one: Callable[[PlannedRun, tuple[float, ...]], int],
    progress: Callable[[str], None] = print,
) -> int:
    """Run every pending run of ``manifest`` in order; ``run_one(planned, control_curve)``
    trains one run (into ``exp_dir / planned.run_id``) and returns an exit code. Stops at the
    first failure (the manifest says where); returns 0 when every run is done."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    manifest.save(exp_dir)
    total = len(manifest.runs)
    for i, pr in enumerate(manifest.runs, 1):
        if pr.status == "done" and _finished(exp_dir / pr.run_id):
            progress(f"[{i}/{total}] seed {pr.seed} {pr.arm}: done earlier ({pr.run_id})")
            continue
        if (exp_dir / pr.run_id).exists():  # an interrupted attempt: keep it, start afresh
            pr.attempts.append(pr.run_id)
            pr.run_id = f"{manifest.experiment_id}-s{pr.seed}-{pr.arm}-r{len(pr.attempts)}"
        pr.status = "running"
        manifest.save(exp_dir)
        curve: tuple[float, ...] = ()
        if pr.arm == "morph" and manifest.control:
            twin = next(r for r in manifest.runs if r.seed == pr.seed and r.arm == "control")
            curve = control_curve(exp_dir / twin.run_id)
        progress(f"[{i}/{total}] seed {pr.seed} {pr.arm}: {pr.run_id}")
        try:
            rc = run_one(pr, curve)
        except KeyboardInterrupt:
            pr.status = "interrupted"
            manifest.save(exp_dir)
            raise
        pr.status = "done" if rc == 0 else "interrupted"
        manifest.save(exp_dir)
        if rc != 0:
            return rc
    return 0


def open_experiment(
    out: Path, name: str | None, seeds: Sequence[int], control: bool, settings: dict[str, Any]
) -> tuple[Path, Manifest, bool]:
    """The experiment dir and its manifest: a new one, or the existing one to resume (which
    must have been planned with the same seeds, control and settings). Returns (dir, manifest, resumed)."""
    experiment_id = name or new_experiment_id()
    exp_dir = out / experiment_id
    if (exp_dir / MANIFEST).is_file():
        m = Manifest.load(exp_dir)
        if m.seeds != list(seeds) or m.control != control or m.settings != settings:
            raise ValueError(
                f"{exp_dir} was planned with seeds {m.seeds}, control={m.control} and other settings; "
                "resume it with the same options, or choose a new --experiment name"
            )
        return exp_dir, m, True
    return exp_dir, plan(experiment_id, seeds, control, settings), False
