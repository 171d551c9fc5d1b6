"""W&B offline: one offline W&B run per Karn run, for ``wandb sync`` to upload later.

Nothing contacts a server: the run is created in offline mode (``WANDB_MODE=offline`` is
forced for the export), with git, code and system-stats capture off, so the export works on
a machine with no network at all. Per Karn run:

* **config**: the episode context (git commit, seeds, host, slots, task, software,
  experiment id and arm) and its hyperparameters, secret-looking keys redacted;
* **history**: one row per epoch (W&B step = the epoch's position in the run, episodes one
  after another), with ``epoch`` and ``episode`` columns; the host snapshot's values, the
  host-only removal accuracy (not causal), the control twin's accuracy (causal) when recorded,
  each slot's alpha and counterfactual contribution, each slot's Shapley value, the PPO
  update's statistics in the epoch it happened;
* **summary**: the episode summary of the last episode;
* the report's figures (accuracy, Shapley, lifecycle) as images in the last row.

Then ``wandb sync OUT/wandb/offline-run-*`` uploads it. Needs ``pip install 'karn-otel[wandb]'``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from karn_otel.analytics import all_off_accuracy
from karn_otel.contracts import (
    CounterfactualMatrix,
    EpisodeContext,
    EpisodeSummary,
    HostSnapshot,
    PPOUpdateStats,
    Scalars,
    SlotSnapshot,
    TelemetryEvent,
)
from karn_otel.export import ExportError, ExportOptions, ExportReport, safe_name
from karn_otel.sinks.runlog import RunRecord

_OFFLINE_ENV = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_DISABLE_GIT": "true",
    "WANDB_DISABLE_CODE": "true",
    "WANDB_CONSOLE": "off",
}


@contextlib.contextmanager
def _offline_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    os.environ.update(_OFFLINE_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _num(v: Any) -> float | int | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None  # W&B history has no NaN/inf
    return None


def config_of(ctx: EpisodeContext) -> dict[str, Any]:
    from karn_otel.experiment.report import redact

    cfg: dict[str, Any] = {
        "karn/episode_id": ctx.episode_id,
        "karn/git_commit": ctx.git_commit,
        "karn/base_seed": ctx.base_seed,
        "karn/torch_seed": ctx.torch_seed,
        "karn/numpy_seed": ctx.numpy_seed,
        "karn/host_architecture": ctx.host_architecture,
        "karn/host_params": ctx.host_params,
        "karn/slots": dict(ctx.slot_config),
        "karn/task_type": ctx.task_type,
        "karn/software": dict(ctx.software),
    }
    if ctx.experiment_id:
        cfg["karn/experiment_id"] = ctx.experiment_id
        cfg["karn/experiment_arm"] = ctx.experiment_arm
    cfg.update(redact(dict(ctx.hyperparameters)))
    return cfg


def history_of(events: Sequence[TelemetryEvent]) -> list[dict[str, Any]]:
    """One row per epoch, in order, episodes one after another."""
    rows: list[dict[str, Any]] = []
    episode = -1
    current: dict[str, Any] = {}
    seen: set[str] = set()
    for ev in events:
        if ev.is_reduced:
            continue
        p = ev.payload
        if isinstance(p, EpisodeContext):
            if ev.episode_id not in seen:
                seen.add(ev.episode_id)
                episode += 1
            continue
        if isinstance(p, CounterfactualMatrix):
            acc = all_off_accuracy(p)
            if acc is not None:
                current["accuracy/host_only_removal"] = acc
            for sid, est in (p.shapley_values or {}).items():
                if (m := _num(est.mean)) is not None:
                    current[f"shapley/{sid}"] = m
        elif isinstance(p, SlotSnapshot):
            current[f"slot/{p.slot_id}/alpha"] = p.alpha
            if (c := _num(p.counterfactual_contribution)) is not None:
                current[f"slot/{p.slot_id}/contribution"] = c
        elif isinstance(p, Scalars):
            for k, v in p.values.items():
                if (n := _num(v)) is not None:
                    current[f"scalars/{k}"] = n
        elif isinstance(p, PPOUpdateStats):
            for f in ("policy_loss", "value_loss", "kl_divergence", "explained_variance", "value_variance"):
                if (n := _num(getattr(p, f))) is not None:
                    current[f"ppo/{f}"] = n
            for head, h in p.entropy.items():
                if (n := _num(h)) is not None:
                    current[f"ppo/entropy/{head}"] = n
        elif isinstance(p, HostSnapshot):
            row = {"epoch": p.epoch, "episode": max(episode, 0)}
            for f in dataclasses.fields(p):
                if f.name != "epoch" and (n := _num(getattr(p, f.name))) is not None:
                    row[f"host/{f.name}"] = n
            row.update(current)
            rows.append(row)
            current = {}
    return rows


def _figures(run: RunRecord, tmp: Path) -> dict[str, Any]:
    import wandb

    from karn_otel.experiment import report

    events = report._last_episode(run)
    out = {}
    for name, b64 in (
        ("accuracy", report.fig_accuracy(events)),
        ("shapley", report.fig_shapley(events)),
        ("lifecycle", report.fig_lifecycle(events)),
    ):
        import base64

        path = tmp / f"{name}.png"
        path.write_bytes(base64.b64decode(b64))
        out[f"figures/{name}"] = wandb.Image(str(path))
    return out


def export(runs: Sequence[RunRecord], out: Path, options: ExportOptions) -> ExportReport:
    try:
        import wandb
    except ImportError:
        raise ExportError("the W&B export needs wandb: pip install 'karn-otel[wandb]'") from None
    report = ExportReport()
    out.mkdir(parents=True, exist_ok=True)
    with _offline_env(), tempfile.TemporaryDirectory() as tmpdir:
        for run in runs:
            ctx = next((ev.payload for ev in run.events if isinstance(ev.payload, EpisodeContext)), None)
            rows = history_of(run.events)
            summary = [ev.payload for ev in run.events if isinstance(ev.payload, EpisodeSummary)]
            settings = wandb.Settings(
                mode="offline", silent=True, x_disable_stats=True, disable_git=True, save_code=False
            )
            wb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "karn"),
                name=run.run_id,
                id=safe_name(run.run_id),
                dir=str(out),
                config=config_of(ctx) if isinstance(ctx, EpisodeContext) else {},
                group=(ctx.experiment_id if isinstance(ctx, EpisodeContext) else None) or None,
                job_type=(ctx.experiment_arm if isinstance(ctx, EpisodeContext) else None) or None,
                settings=settings,
            )
            with contextlib.redirect_stdout(io.StringIO()):
                for step, row in enumerate(rows, start=1):
                    wb.log(row, step=step)
                if rows:
                    fig_dir = Path(tmpdir) / safe_name(run.run_id)
                    fig_dir.mkdir()
                    wb.log(_figures(run, fig_dir), step=len(rows))
                if summary:
                    for f in dataclasses.fields(summary[-1]):
                        if (n := _num(getattr(summary[-1], f.name))) is not None:
                            wb.summary[f.name] = n
                run_dir = Path(wb.dir).parent
                wb.finish()
            report.written[run_dir] = len(rows)
            options.progress(f"{run.run_id}: {len(rows)} epochs -> {run_dir}")
    report.notes.append(f"upload later with: wandb sync {out / 'wandb'}/offline-run-*")
    return report
