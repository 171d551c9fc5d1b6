"""`karn compare`: is it winning across runs, with the statistics a reviewer asks for.

Groups: by default the morph runs against their control twins (``karn run --seeds ...
--control``), paired by seed; with ``--baseline DIRS`` every given run against the baseline
runs. Without any control or baseline only the within-run comparison is possible, and it is
labelled for what it is: *vs host-only removal (not causal)* — removing trained seeds from a
host that co-adapted with them is not the counterfactual "never grew them" (docs/counterfactual-validity.md).

Quantities, each with :mod:`karn_otel.experiment.stats`:

* final validation accuracy, morph vs control: means, stds, IQMs, difference with a
  bootstrap interval, Welch p, Cohen's d, Hedges' g (and the paired p by seed);
* accuracy delta vs control (causal), per seed: morph − its control twin; called causal only
  when each pair's hyperparameters differ in nothing but the arm (:data:`ARM_KEYS`, and the
  ``--treatment`` keys the user names), else labelled not causal with the differences named;
* accuracy delta vs host-only removal (not causal), per morph run;
* parameter-efficiency ratio vs control, per seed: (acc/params) of the morph run over that of
  its twin (> 1: more accuracy per parameter).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from karn_otel.experiment.stats import Comparison, NotEnoughRuns, OneSample, compare, describe
from karn_otel.experiment.summary import RunSummary, load
from karn_otel.export import run_dirs_in


@dataclass(frozen=True)
class SlotClaims:
    """One slot's Shapley value across runs, and how many runs' final verdicts claim it helps."""

    slot_id: str
    n_runs: int  # runs with a final-epoch estimate for the slot
    n_claimed: int  # of those, runs whose final verdict says "helps"
    rule: str
    alpha: float
    mean: OneSample | NotEnoughRuns  # the final Shapley means across runs


@dataclass
class CompareResult:
    a_label: str
    b_label: str
    runs_a: list[RunSummary]
    runs_b: list[RunSummary]
    rows: list[Comparison | OneSample | NotEnoughRuns] = field(default_factory=list)
    slots: list[SlotClaims] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def enc(x: Any) -> Any:
            if dataclasses.is_dataclass(x) and not isinstance(x, type):
                d = {f.name: enc(getattr(x, f.name)) for f in dataclasses.fields(x)}
                if isinstance(x, NotEnoughRuns):
                    d["message"] = x.message
                d["kind"] = type(x).__name__
                return d
            if isinstance(x, float) and not math.isfinite(x):
                return None
            return x

        return {
            "a": {"label": self.a_label, "runs": [r.run_id for r in self.runs_a]},
            "b": {"label": self.b_label, "runs": [r.run_id for r in self.runs_b]},
            "results": [enc(r) for r in self.rows],
            "shapley_claims": [enc(c) for c in self.slots],
            "notes": self.notes,
        }


def load_runs(paths: Sequence[Path | str], progress: Callable[[str], None] = lambda _m: None) -> list[RunSummary]:
    dirs = [d for p in paths for d in run_dirs_in(p)]
    out = []
    for i, d in enumerate(dirs, 1):
        out.append(load(d))
        progress(f"read {i}/{len(dirs)} runs")
    return out


def _pairs(a: list[RunSummary], b: list[RunSummary]) -> list[tuple[RunSummary, RunSummary]]:
    by_seed = {r.seed: r for r in b if r.seed is not None}
    return [(r, by_seed[r.seed]) for r in a if r.seed in by_seed]


# Hyperparameters that may differ between the two runs of a causal pair: what makes them arms
# of one experiment (the reference system's control twin is the same RunConfig with
# controller="none"), and settings that do not change what is trained (timeouts, checkpoint
# retention). Any other difference (epochs, lr, data, threads) is a second cause.
ARM_KEYS: frozenset[str] = frozenset(
    {
        "controller",
        "experiment_arm",
        "experiment_id",
        "control_curve",
        "heartbeat_timeout_s",
        "collective_timeout_s",
        "checkpoint_retention",
    }
)


def pair_differences(
    pairs: Sequence[tuple[RunSummary, RunSummary]], treatment: frozenset[str] = frozenset()
) -> dict[str, int]:
    """Hyperparameter -> number of pairs whose two runs differ in it, leaving out ARM_KEYS and
    the user's ``treatment`` keys. Empty: the pairs differ only in the treatment."""
    allowed = ARM_KEYS | treatment
    out: dict[str, int] = {}
    for x, y in pairs:
        hx, hy = x.hyperparameters, y.hyperparameters
        for k in sorted((hx.keys() | hy.keys()) - allowed):
            if k not in hx or k not in hy or hx[k] != hy[k]:
                out[k] = out.get(k, 0) + 1
    return out


def compare_runs(
    runs: list[RunSummary],
    baseline: list[RunSummary] | None = None,
    seed: int = 0,
    treatment: Sequence[str] = (),
) -> CompareResult:
    """``treatment``: hyperparameters the two arms are meant to differ in (beyond ARM_KEYS);
    a pair differing in anything else is not called causal."""
    notes = []
    unfinished = [r.run_id for r in runs + (baseline or []) if not r.finished]
    if unfinished:
        notes.append(f"{len(unfinished)} run(s) did not finish; their last epoch is used: {', '.join(unfinished)}")
    if baseline is not None:
        a, b, a_label, b_label = runs, baseline, "runs", "baseline"
    else:
        a = [r for r in runs if r.arm != "control"]
        b = [r for r in runs if r.arm == "control"]
        a_label, b_label = "morph", "control"
    res = CompareResult(a_label, b_label, a, b, notes=notes)
    pairs = _pairs(a, b)
    if b:
        res.rows.append(
            compare(
                "final val accuracy",
                [r.final_val_accuracy for r in a],
                [r.final_val_accuracy for r in b],
                pairs=[(x.final_val_accuracy, y.final_val_accuracy) for x, y in pairs],
                seed=seed,
            )
        )
        differs = pair_differences(pairs, frozenset(treatment))
        if differs:
            shown = ", ".join(f"{k} ({n} of {len(pairs)})" for k, n in list(differs.items())[:6])
            more = f" and {len(differs) - 6} more" if len(differs) > 6 else ""
            delta_label = (
                f"accuracy delta vs {b_label}, paired by seed (not causal: the pairs differ in more than the arm)"
            )
            notes.append(
                f"paired runs differ in hyperparameters other than the arm: {shown}{more}. The delta mixes "
                "those differences with the seeds' effect, so it is not labelled causal; if one of them "
                "is the treatment, name it with --treatment KEY"
            )
        else:
            delta_label = f"accuracy delta vs {b_label} (causal), paired by seed"
        res.rows.append(
            describe(
                delta_label,
                [x.final_val_accuracy - y.final_val_accuracy for x, y in pairs],
                0.0,
                seed,
            )
        )
        eff = [e for x, y in pairs if (e := x.efficiency_vs(y.final_val_accuracy, y.total_params)) is not None]
        res.rows.append(describe(f"parameter-efficiency ratio vs {b_label}, paired by seed", eff, 1.0, seed))
        if not pairs:
            notes.append(f"no {a_label} run shares a seed with a {b_label} run: the paired rows are empty")
    else:
        notes.append(
            "no control runs: only the within-run comparison (not causal); run with --control for a causal one"
        )
    removal = [d for r in a if (d := r.removal_delta) is not None]
    res.rows.append(describe("accuracy delta vs host-only removal (not causal)", removal, 0.0, seed))
    res.slots = slot_claims(a, seed)
    return res


def slot_claims(runs: list[RunSummary], seed: int = 0) -> list[SlotClaims]:
    """Per slot: each run's final verdict (final-epoch Holm over that run's slots, the rule the
    run's own summary uses), counted across runs, and the final Shapley means summarised."""
    from karn_otel.claims import ALPHA, FINAL_RULE, final_verdict

    means: dict[str, list[float]] = {}
    claimed: dict[str, int] = {}
    for r in runs:
        if not r.final_shapley:
            continue
        for sid, c in final_verdict(r.final_shapley, r.final_shapley_epoch).items():
            est = r.final_shapley[sid]
            if math.isfinite(est.mean):
                means.setdefault(sid, []).append(est.mean)
            claimed[sid] = claimed.get(sid, 0) + int(c.helps)
    return [
        SlotClaims(
            sid, len(v), claimed.get(sid, 0), FINAL_RULE, ALPHA, describe(f"Shapley value of {sid}", v, 0.0, seed)
        )
        for sid, v in sorted(means.items())
    ]


def _f(x: float | None, pct: bool = False, signed: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if pct:
        return f"{100 * x:+.2f} pt" if signed else f"{100 * x:.2f} pt"
    return f"{x:.4g}"


def _p(p: float | None, no_spread: bool = False) -> str:
    if p is not None and no_spread:
        return "n/a (no spread between runs: the t-test is undefined)"
    return "—" if p is None else ("<0.0001" if p < 1e-4 else f"{p:.4f}")


def render(res: CompareResult) -> str:
    lines = [f"{res.a_label}: {len(res.runs_a)} run(s)    {res.b_label}: {len(res.runs_b)} run(s)", ""]
    for row in res.rows:
        if isinstance(row, NotEnoughRuns):
            lines.append(f"• {row.message}")
        elif isinstance(row, Comparison):
            pct = "accuracy" in row.quantity
            lines += [
                f"• {row.quantity}: {res.a_label} − {res.b_label} = {_f(row.difference, pct)} "
                f"[95% bootstrap {_f(row.difference_ci.low, pct)}, {_f(row.difference_ci.high, pct)}]",
                f"    {res.a_label}: mean {_f(row.a.mean)} ± {_f(row.a.std)} (n={row.a.n}), IQM {_f(row.a.iqm)} "
                f"[{_f(row.a.iqm_ci.low)}, {_f(row.a.iqm_ci.high)}]",
                f"    {res.b_label}: mean {_f(row.b.mean)} ± {_f(row.b.std)} (n={row.b.n}), IQM {_f(row.b.iqm)} "
                f"[{_f(row.b.iqm_ci.low)}, {_f(row.b.iqm_ci.high)}]",
                f"    Welch p = {_p(row.welch_p, row.no_spread)}   "
                f"paired p = {_p(row.paired_p, row.paired_no_spread)} (n={row.paired_n})   "
                f"Cohen's d = {_f(row.cohens_d)}   Hedges' g = {_f(row.hedges_g)}",
            ]
        else:
            pct = "accuracy" in row.quantity
            s = row.stats
            lines += [
                f"• {row.quantity}: mean {_f(s.mean, pct)} [95% bootstrap {_f(row.mean_ci.low, pct)}, "
                f"{_f(row.mean_ci.high, pct)}], sd {_f(s.std, pct, signed=False)}, n={s.n}",
                f"    IQM {_f(s.iqm, pct)} [{_f(s.iqm_ci.low, pct)}, {_f(s.iqm_ci.high, pct)}]   "
                f"t-test vs {row.null:g}: p = {_p(row.p_value, row.no_spread)}",
            ]
    if res.slots:
        lines.append("• per-seed Shapley across runs (final-epoch value; claims by each run's final verdict):")
    for c in res.slots:
        m = c.mean
        value = (
            f"mean {_f(m.stats.mean, True)} [95% bootstrap {_f(m.mean_ci.low, True)}, {_f(m.mean_ci.high, True)}]"
            if isinstance(m, OneSample)
            else f"n={c.n_runs} (too few runs for an interval)"
        )
        lines.append(
            f"    {c.slot_id}: {value}; claimed to help in {c.n_claimed} of {c.n_runs} runs "
            f"({c.rule}, {100 * c.alpha:g}% per run)"
        )
    lines += ["", *(f"note: {n}" for n in res.notes)]
    return "\n".join(lines).rstrip() + "\n"


def to_json_text(res: CompareResult) -> str:
    return json.dumps(res.to_json(), indent=2, allow_nan=False)
