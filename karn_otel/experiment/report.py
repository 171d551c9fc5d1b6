"""`karn report`: one self-contained HTML file with the plots a researcher reads.

Figures are matplotlib (Agg), embedded as base64 PNG: static figures need no JavaScript, no
network and no plotting runtime to view, print the same everywhere, and matplotlib is the
most widely installed, longest-maintained plotting library in the ecosystem. (An interactive
library would make a 5-10 MB file per report and a browser dependency on its runtime.)

A run's report has these sections (each an ``<section id=...>`` holding its figure):

* ``accuracy`` — validation accuracy over epochs, beside host-only removal (not causal) and,
  when the run has a control twin, the control's accuracy (causal), labelled apart;
* ``params`` — parameter ratio (total / host) and parameter efficiency over epochs;
* ``shapley`` — per-slot Shapley values over epochs with their intervals; claims marked;
* ``matrix`` — the counterfactual matrix of one epoch (the last by default) as a heatmap;
* ``lifecycle`` — stage and alpha per slot over epochs, gate results marked;
* ``ppo`` — entropy per head, KL, explained variance, clip fractions (when PPO ran);
* ``timeline`` — dense-trace windows and health alerts on the epoch axis;
* ``context`` — the episode context (git commit, seeds, software, hyperparameters; secret-
  looking keys redacted).

An experiment's report overlays its runs with a band (``runs``) and holds the compare table
(``compare``), then each run's accuracy figure.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from karn_otel.analytics import all_off_accuracy
from karn_otel.config import redact_hyperparameters
from karn_otel.contracts import (
    CounterfactualMatrix,
    DenseTrace,
    EpisodeContext,
    GateEvaluationTrace,
    HealthAlert,
    HostSnapshot,
    PolicySnapshot,
    PPOUpdateStats,
    Scalars,
    SeedStage,
    SlotSnapshot,
    TelemetryEvent,
)
from karn_otel.experiment.compare import compare_runs, render
from karn_otel.experiment.summary import job_events, summarise
from karn_otel.export import run_dirs_in
from karn_otel.sinks.runlog import RunRecord, read_run

SECTIONS_RUN = ("accuracy", "params", "shapley", "matrix", "lifecycle", "ppo", "timeline", "context")
SECTIONS_EXPERIMENT = ("runs", "compare")
_STAGE_ORDER = list(SeedStage)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str) -> str:
    return f'<img class="figure" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _empty_figure(message: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, color="#555")
    return _png(fig)


def _last_episode(rec: RunRecord) -> list[TelemetryEvent]:
    ids = [ev.episode_id for ev in rec.events if isinstance(ev.payload, EpisodeContext)]
    last = ids[-1] if ids else None
    return job_events([ev for ev in rec.events if ev.episode_id == last])


# ---------------------------------------------------------------------- run figures


def fig_accuracy(events: Sequence[TelemetryEvent]) -> str:
    host = [(ev.payload.epoch, ev.payload.val_accuracy) for ev in events if isinstance(ev.payload, HostSnapshot)]
    removal = [
        (p.epoch, a)
        for ev in events
        if isinstance(p := ev.payload, CounterfactualMatrix) and (a := all_off_accuracy(p)) is not None
    ]
    control = [
        (ev.epoch, ev.payload.values["control_val_accuracy"])
        for ev in events
        if isinstance(ev.payload, Scalars) and "control_val_accuracy" in ev.payload.values
    ]
    if not host:
        return _empty_figure("no epoch recorded")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(*zip(*host), marker="o", label="morphogenetic model")
    if removal:
        ax.plot(*zip(*removal), ls="--", marker=".", label="host-only removal (not causal)")
    if control:
        ax.plot(*zip(*control), ls="-.", marker="s", label="control twin (causal)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def fig_params(events: Sequence[TelemetryEvent]) -> str:
    hosts = [ev.payload for ev in events if isinstance(ev.payload, HostSnapshot)]
    removal = {
        p.epoch: a
        for ev in events
        if isinstance(p := ev.payload, CounterfactualMatrix) and (a := all_off_accuracy(p)) is not None
    }
    if not hosts:
        return _empty_figure("no epoch recorded")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.0))
    ax.plot(
        [h.epoch for h in hosts],
        [h.total_params / h.host_params for h in hosts],
        marker="o",
        label="total / host params",
    )
    eff = [
        (h.epoch, (h.val_accuracy / h.total_params) / (removal[h.epoch] / h.host_params))
        for h in hosts
        if removal.get(h.epoch, 0) > 0 and h.total_params > 0
    ]
    if eff:
        ax.plot(*zip(*eff), marker=".", label="accuracy per parameter vs host-only removal")
    ax.axhline(1.0, color="#999", lw=0.8)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def fig_shapley(events: Sequence[TelemetryEvent]) -> str:
    from karn_otel.claims import ALPHA, LIVE_RULE, live_claim

    ctx = next((ev.payload for ev in events if isinstance(ev.payload, EpisodeContext)), None)
    horizon = ctx.max_epochs if isinstance(ctx, EpisodeContext) else None
    n_slots = len(ctx.slot_config) if isinstance(ctx, EpisodeContext) else 1
    series: dict[str, list[tuple[int, float, float, float]]] = defaultdict(list)
    live: dict[str, list[tuple[int, float, bool]]] = defaultdict(list)
    for ev in events:
        p = ev.payload
        if isinstance(p, CounterfactualMatrix) and p.shapley_values:
            for sid, est in p.shapley_values.items():
                series[sid].append((p.epoch, est.mean, est.ci_low, est.ci_high))
                c = live_claim(sid, est, p.epoch, horizon=horizon, n_slots=n_slots)
                live[sid].append((p.epoch, est.mean, c.helps))
    if not series:
        return _empty_figure("no Shapley estimate recorded (no seed was active during a counterfactual pass)")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for sid, pts in sorted(series.items()):
        ep, mean, lo, hi = zip(*pts)
        line = ax.plot(ep, mean, marker="o", label=sid)[0]
        ok = [i for i in range(len(ep)) if math.isfinite(lo[i]) and math.isfinite(hi[i])]
        if ok:
            ax.fill_between(
                [ep[i] for i in ok], [lo[i] for i in ok], [hi[i] for i in ok], alpha=0.2, color=line.get_color()
            )
        claims = [(e, m) for e, m, c in live[sid] if c]
        if claims:
            ax.scatter(*zip(*claims), marker="*", s=120, color=line.get_color(), zorder=3)
    ax.axhline(0.0, color="#999", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("Shapley value (accuracy)")
    ax.set_title(
        f"bands: per-epoch 95% intervals (descriptive); ★ = claim by the live rule ({LIVE_RULE}, {100 * ALPHA:g}% per run)",
        fontsize=8,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def fig_matrix(events: Sequence[TelemetryEvent], epoch: int | None = None) -> tuple[str, int | None]:
    matrices = [ev.payload for ev in events if isinstance(ev.payload, CounterfactualMatrix) and ev.payload.configs]
    if epoch is not None:
        matrices = [m for m in matrices if m.epoch == epoch]
    if not matrices:
        return _empty_figure("no counterfactual matrix recorded" + (f" at epoch {epoch}" if epoch else "")), None
    m = matrices[-1]
    plt = _plt()
    n = len(m.slot_ids)
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.32 * len(m.configs)))
    grid = [[1.0 if on else 0.0 for on in r.config] + [r.val_accuracy] for r in m.configs]
    acc = [row[-1] for row in grid]
    ax.imshow([[v for v in row[:n]] for row in grid], cmap="Greens", aspect="auto", vmin=0, vmax=1.4)
    for i, a in enumerate(acc):
        ax.text(n - 0.4, i, f"acc {a:.3f}", va="center", fontsize=8)
    ax.set_xticks(range(n), m.slot_ids)
    ax.set_yticks(
        range(len(m.configs)), ["".join("1" if on else "0" for on in r.config) for r in m.configs], fontsize=7
    )
    ax.set_xlim(-0.5, n + 1.2)
    ax.set_title(f"epoch {m.epoch}: seeds on (green) per configuration, validation accuracy", fontsize=9)
    return _png(fig), m.epoch


def fig_lifecycle(events: Sequence[TelemetryEvent]) -> str:
    slots: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    gates: list[tuple[int, str, bool]] = []
    for ev in events:
        p = ev.payload
        if isinstance(p, SlotSnapshot):
            slots[p.slot_id].append((ev.epoch, _STAGE_ORDER.index(p.stage), p.alpha))
        elif isinstance(p, GateEvaluationTrace):
            gates.append((ev.epoch, p.slot_id, p.passed))
    if not slots:
        return _empty_figure("no slot snapshot recorded")
    plt = _plt()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 4.4), sharex=True)
    for sid, pts in sorted(slots.items()):
        ep, stage, alpha = zip(*pts)
        a1.step(ep, stage, where="post", label=sid)
        a2.plot(ep, alpha, marker=".", label=sid)
    order = sorted(slots)
    for ep, sid, passed in gates:
        if sid in slots:
            y = dict((e, s) for e, s, _ in slots[sid]).get(ep, 0)
            a1.scatter(
                [ep],
                [y + 0.15 * (order.index(sid) - 1)],
                marker="^" if passed else "x",
                color="g" if passed else "r",
                s=25,
            )
    a1.set_yticks(range(len(_STAGE_ORDER)), [s.value for s in _STAGE_ORDER], fontsize=7)
    a1.set_title("stage per slot (▲ gate passed, × gate failed)", fontsize=9)
    a1.legend(fontsize=7, loc="upper left")
    a2.set_ylabel("alpha")
    a2.set_xlabel("epoch")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    return _png(fig)


def fig_ppo(events: Sequence[TelemetryEvent]) -> str | None:
    ups = [ev.payload for ev in events if isinstance(ev.payload, PPOUpdateStats)]
    pols = [ev for ev in events if isinstance(ev.payload, PolicySnapshot)]
    if not ups and not pols:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(8, 4.6))
    if ups:
        x = [u.update_index for u in ups]
        for head in sorted({h for u in ups for h in u.entropy}):
            axes[0][0].plot(x, [u.entropy.get(head, math.nan) for u in ups], marker=".", label=head)
        axes[0][1].plot(x, [u.kl_divergence for u in ups], marker=".")
        axes[1][0].plot(x, [u.explained_variance for u in ups], marker=".")
        axes[1][1].plot(
            x,
            [u.ratio_stats.fraction_clipped_high + u.ratio_stats.fraction_clipped_low for u in ups],
            marker=".",
            label="ratio",
        )
        axes[1][1].plot(x, [u.advantage_stats.fraction_clipped for u in ups], marker=".", label="advantage")
        xlabel = "PPO update"
    else:  # before the first update: the policy snapshots' copies, per decision
        x = list(range(1, len(pols) + 1))
        ps = [ev.payload for ev in pols]
        assert all(isinstance(p, PolicySnapshot) for p in ps)
        for head in sorted({h for p in ps for h in p.entropy}):  # type: ignore[union-attr]
            axes[0][0].plot(x, [p.entropy.get(head, math.nan) for p in ps], marker=".", label=head)  # type: ignore[union-attr]
        axes[0][1].plot(x, [p.kl_divergence if p.kl_divergence is not None else math.nan for p in ps], marker=".")  # type: ignore[union-attr]
        axes[1][0].plot(
            x, [p.explained_variance if p.explained_variance is not None else math.nan for p in ps], marker="."
        )  # type: ignore[union-attr]
        axes[1][1].plot(x, [p.value_estimate for p in ps], marker=".", label="value estimate")  # type: ignore[union-attr]
        xlabel = "decision"
    for ax, title in zip(
        [a for row in axes for a in row],
        ["entropy per head (nats)", "KL(old‖new)", "explained variance", "clip fractions"],
    ):
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_xlabel(xlabel, fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def fig_timeline(events: Sequence[TelemetryEvent]) -> str:
    windows = [ev.payload for ev in events if isinstance(ev.payload, DenseTrace)]
    alerts = [(ev.epoch, ev.payload) for ev in events if isinstance(ev.payload, HealthAlert)]
    epochs = [ev.payload.epoch for ev in events if isinstance(ev.payload, HostSnapshot)]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 2.2))
    for w in windows:
        ax.axvspan(w.window_start_epoch - 0.5, w.window_end_epoch + 0.5, color="#8ab", alpha=0.35)
        ax.text(w.window_start_epoch - 0.4, 0.9, w.trigger_reason[:28], fontsize=6, rotation=0, va="top")
    colors = {"critical": "#c00", "warning": "#e80", "info": "#888"}
    for ep, a in alerts:
        ax.scatter([ep], [0.3], color=colors.get(a.severity.value, "#444"), marker="v", s=50, zorder=3)
        ax.text(ep, 0.38, a.check, fontsize=6, rotation=45)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xlim(0.5, max(epochs or [1]) + 0.5)
    ax.set_xlabel("epoch")
    ax.set_title(f"dense-trace windows (shaded): {len(windows)}   health alerts (▼): {len(alerts)}", fontsize=9)
    return _png(fig)


# ---------------------------------------------------------------------- HTML


def redact(hp: dict[str, Any]) -> dict[str, Any]:
    """Secret-looking hyperparameters redacted (the collector's rule; a run dir may predate it)."""
    return dict(redact_hyperparameters(hp)[0])


def _context_table(ctx: EpisodeContext | None) -> str:
    if ctx is None:
        return "<p>no episode context recorded</p>"
    rows = [
        ("episode", ctx.episode_id),
        ("git commit", ctx.git_commit),
        ("seeds (base / torch / numpy)", f"{ctx.base_seed} / {ctx.torch_seed} / {ctx.numpy_seed}"),
        ("host", f"{ctx.host_architecture}, {ctx.host_params:,} parameters"),
        ("slots", ", ".join(f"{k} ({v} ch)" for k, v in ctx.slot_config.items())),
        ("task", ctx.task_type),
        ("software", ", ".join(f"{k} {v}" for k, v in ctx.software.items())),
    ]
    if ctx.experiment_id:
        rows.append(("experiment", f"{ctx.experiment_id} ({ctx.experiment_arm})"))
    rows += [(f"hp: {k}", str(v)) for k, v in sorted(redact(ctx.hyperparameters).items())]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f'<table class="context">{body}</table>'


_CSS = """
body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}
section{margin:1.6em 0;padding-top:.4em;border-top:1px solid #ddd}
img.figure{max-width:100%;display:block}
table{border-collapse:collapse;font-size:13px}th,td{padding:2px 8px;text-align:left;vertical-align:top}
th{color:#555;font-weight:600}pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:12px}
.note{color:#666;font-size:13px}
"""

# Counts the figures the browser actually decoded; a test reads the attributes it sets.
_SCRIPT = """
window.addEventListener('load', function () {
  var sections = document.querySelectorAll('section');
  var rendered = 0;
  sections.forEach(function (s) {
    var imgs = s.querySelectorAll('img.figure');
    var figures = imgs.length > 0 && Array.prototype.every.call(imgs, function (i) { return i.complete && i.naturalWidth > 0; });
    var tables = s.querySelectorAll('table tr, pre').length > 0;
    var ok = figures || (imgs.length === 0 && tables);
    s.setAttribute('data-rendered', ok ? 'yes' : 'no');
    if (ok) rendered++;
  });
  document.body.setAttribute('data-sections', String(sections.length));
  document.body.setAttribute('data-rendered', String(rendered));
});
"""


def _page(title: str, sections: list[tuple[str, str, str]]) -> str:
    body = "".join(
        f'<section id="{sid}"><h2>{html.escape(heading)}</h2>{content}</section>' for sid, heading, content in sections
    )
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}<script>{_SCRIPT}</script></body></html>"
    )


def run_sections(rec: RunRecord, matrix_epoch: int | None = None) -> list[tuple[str, str, str]]:
    events = _last_episode(rec)
    ctx = next((ev.payload for ev in events if isinstance(ev.payload, EpisodeContext)), None)
    assert ctx is None or isinstance(ctx, EpisodeContext)
    matrix, shown = fig_matrix(events, matrix_epoch)
    ppo = fig_ppo(events)
    sections = [
        (
            "accuracy",
            "Accuracy: vs host-only removal (not causal) and vs control (causal)",
            _img(fig_accuracy(events), "accuracy"),
        ),
        ("params", "Parameters: ratio and efficiency", _img(fig_params(events), "parameters")),
        ("shapley", "Per-seed Shapley values", _img(fig_shapley(events), "shapley")),
        (
            "matrix",
            f"Counterfactual matrix (epoch {shown})" if shown else "Counterfactual matrix",
            _img(matrix, "matrix"),
        ),
        ("lifecycle", "Seed lifecycle", _img(fig_lifecycle(events), "lifecycle")),
    ]
    if ppo is not None:
        sections.append(("ppo", "PPO health", _img(ppo, "ppo")))
    sections += [
        ("timeline", "Dense-trace windows and alerts", _img(fig_timeline(events), "timeline")),
        ("context", "Episode context", _context_table(ctx)),
    ]
    return sections


def fig_runs(records: Sequence[RunRecord]) -> str:
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    by_arm: dict[str, list[dict[int, float]]] = defaultdict(list)
    for rec in records:
        s = summarise(rec)
        by_arm[s.arm].append({p.epoch: p.val_accuracy for p in s.curve})
    for arm, curves in sorted(by_arm.items()):
        epochs = sorted(set().union(*curves))
        m = np.array([[c.get(e, np.nan) for e in epochs] for c in curves])
        mean = np.nanmean(m, axis=0)
        line = ax.plot(epochs, mean, marker="o", label=f"{arm} (mean of {len(curves)})")[0]
        if len(curves) > 1:
            ax.fill_between(epochs, np.nanmin(m, axis=0), np.nanmax(m, axis=0), alpha=0.2, color=line.get_color())
        for row in m:
            ax.plot(epochs, row, lw=0.6, alpha=0.5, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title("runs overlaid; band = min–max across runs", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def build_report(
    source: Path | str, matrix_epoch: int | None = None, progress: Callable[[str], None] = lambda _m: None
) -> str:
    """The report's HTML for a run dir or an experiment dir."""
    dirs = run_dirs_in(source)
    records = []
    for i, d in enumerate(dirs, 1):
        records.append(read_run(d))
        progress(f"read {i}/{len(dirs)} runs")
    if len(records) == 1:
        rec = records[0]
        n = len(rec.episodes)
        # Every figure and table reads the last episode (a PPO run learns across them): say so.
        scope = f", episode {n} of {n} (the last; the others are in karn inspect)" if n > 1 else ""
        return _page(f"Karn report — run {rec.run_id}{scope}", run_sections(rec, matrix_epoch))
    summaries = [summarise(r) for r in records]
    cmp = compare_runs(summaries)
    sections = [
        ("runs", "Runs overlaid", _img(fig_runs(records), "runs")),
        ("compare", "Compare (karn compare)", f"<pre>{html.escape(render(cmp))}</pre>"),
    ]
    for i, rec in enumerate(records, 1):
        progress(f"figures {i}/{len(records)}")
        sections.append(
            (
                f"run-{i}",
                f"Run {rec.run_id}: accuracy",
                _img(fig_accuracy(_last_episode(rec)), f"accuracy {rec.run_id}"),
            )
        )
    name = Path(source).name
    return _page(f"Karn report — experiment {name} ({len(records)} runs)", sections)


def write_report(
    source: Path | str, out: Path, matrix_epoch: int | None = None, progress: Callable[[str], None] = lambda _m: None
) -> Path:
    text = build_report(source, matrix_epoch, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
