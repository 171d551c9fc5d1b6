"""What compare and report need from one run, read from its run log (never a live process).

A run's *arm* says what it is in an experiment: ``morph`` (seeds may grow) or ``control`` (the
host-only twin: same initial weights, data order and seeds; seeds never germinate). It comes
from the episode context (``experiment_arm``), else from the controller (``none`` = control).
The last episode of a multi-episode run is the one summarised (PPO learns across episodes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from karn_otel.analytics import all_off_accuracy
from karn_otel.contracts import (
    CounterfactualMatrix,
    EpisodeContext,
    EpisodeSummary,
    HostSnapshot,
    ShapleyEstimate,
    TelemetryEvent,
)
from karn_otel.sinks.runlog import RunRecord, read_run


@dataclass(frozen=True)
class EpochPoint:
    epoch: int
    val_accuracy: float
    removal_accuracy: float | None  # the all-seeds-off configuration: host-only removal (not causal)
    total_params: int
    host_params: int


@dataclass
class RunSummary:
    run_id: str
    run_dir: Path
    experiment_id: str | None
    arm: str  # morph | control
    seed: int | None
    controller: str
    finished: bool
    final_val_accuracy: float
    final_removal_accuracy: float | None  # host-only removal at the end (not causal)
    total_params: int
    host_params: int
    curve: list[EpochPoint] = field(default_factory=list)
    final_shapley: dict[str, ShapleyEstimate] = field(default_factory=dict)
    final_shapley_epoch: int = 0
    # The episode's hyperparameters as recorded: compare checks that paired runs differ only
    # in what makes them arms of one experiment before it calls a difference causal.
    hyperparameters: dict[str, bool | int | float | str | None] = field(default_factory=dict)

    @property
    def removal_delta(self) -> float | None:
        """Final accuracy minus host-only removal accuracy (within the run; not causal)."""
        r = self.final_removal_accuracy
        return None if r is None else self.final_val_accuracy - r

    def efficiency_vs(self, acc_ref: float, params_ref: int) -> float | None:
        """Accuracy per parameter relative to a reference (>1: more accuracy per parameter)."""
        if acc_ref <= 0 or params_ref <= 0 or self.total_params <= 0:
            return None
        return (self.final_val_accuracy / self.total_params) / (acc_ref / params_ref)


def job_events(events: list[TelemetryEvent]) -> list[TelemetryEvent]:
    """The job's view of one episode's events: for each event type that has reduced (job-wide)
    records, those only; every other type as recorded. A single-process run has none, so it is
    unchanged; in rank 0's log of a multi-rank run the host snapshots are the job-wide ones (as
    ``karn inspect`` and the console show) and the counterfactual matrices, which exist only
    reduced, are kept (they were dropped before 2026-12-04)."""
    reduced = {ev.event_type for ev in events if ev.is_reduced}
    return [ev for ev in events if ev.is_reduced or ev.event_type not in reduced]


def summarise(rec: RunRecord) -> RunSummary:
    contexts = [ev for ev in rec.events if isinstance(ev.payload, EpisodeContext)]
    if not contexts:
        raise ValueError(f"{rec.run_dir}: no episode context recorded")
    last_ep = contexts[-1].episode_id
    ctx = contexts[-1].payload
    assert isinstance(ctx, EpisodeContext)
    events = job_events([ev for ev in rec.events if ev.episode_id == last_ep])
    hp = ctx.hyperparameters
    controller = str(hp.get("controller", "unknown"))
    arm = ctx.experiment_arm or ("control" if controller == "none" else "morph")
    removal: dict[int, float] = {}
    final_shapley: dict[str, ShapleyEstimate] = {}
    final_shapley_epoch = 0
    curve: list[EpochPoint] = []
    summary: EpisodeSummary | None = None
    for ev in events:
        p = ev.payload
        if isinstance(p, CounterfactualMatrix):
            acc = all_off_accuracy(p)
            if acc is not None:
                removal[p.epoch] = acc
            # The latest matrix's values only, as the run's own final verdict reads them: an
            # earlier matrix's (a seed culled before the last epoch) is not the pre-set test.
            final_shapley, final_shapley_epoch = dict(p.shapley_values or {}), p.epoch
        elif isinstance(p, HostSnapshot):
            curve.append(EpochPoint(p.epoch, p.val_accuracy, None, p.total_params, p.host_params))
        elif isinstance(p, EpisodeSummary):
            summary = p
    curve = [EpochPoint(c.epoch, c.val_accuracy, removal.get(c.epoch), c.total_params, c.host_params) for c in curve]
    if summary is not None:
        final_acc, total, host = summary.final_val_accuracy, summary.total_params, summary.host_params
        final_removal = summary.host_only_accuracy
    elif curve:
        final_acc, total, host = curve[-1].val_accuracy, curve[-1].total_params, curve[-1].host_params
        final_removal = curve[-1].removal_accuracy
    else:
        raise ValueError(f"{rec.run_dir}: no epoch recorded")
    if final_removal is None and curve and curve[-1].total_params == curve[-1].host_params:
        final_removal = final_acc  # no seed ever grew: the model is the host
    seed = hp.get("seed", ctx.base_seed)
    return RunSummary(
        run_id=rec.run_id,
        run_dir=rec.run_dir,
        experiment_id=ctx.experiment_id,
        arm=str(arm),
        seed=int(seed)
        if isinstance(seed, (int, float)) and not isinstance(seed, bool) and math.isfinite(seed)
        else None,
        controller=controller,
        finished=summary is not None,
        final_val_accuracy=final_acc,
        final_removal_accuracy=final_removal,
        total_params=total,
        host_params=host,
        curve=curve,
        final_shapley=final_shapley,
        final_shapley_epoch=final_shapley_epoch,
        hyperparameters=dict(hp),
    )


def load(path: Path | str) -> RunSummary:
    return summarise(read_run(path))
