"""Prometheus alert and recording rules for the stack, generated from the health checks and the metric registry.

``stack/prometheus/rules/karn-alerts.yml`` and ``stack/prometheus/rules/karn-recording.yml``
are this module's output; a test fails when a committed file differs from it::

    python -m karn_otel.stack_rules --write   # rewrite karn-alerts.yml and karn-recording.yml
    python -m karn_otel.stack_rules --check   # exit 1 when either file is stale
    python -m karn_otel.stack_rules           # print the rules (alerts, ---, recording rules)

One source of truth. Every check of :data:`karn_otel.health.CHECKS` becomes one alert
(``loss_spike`` -> ``KarnLossSpike``) with the check's severity, and its thresholds are
:data:`karn_otel.health.DEFAULT_THRESHOLDS`; so does every return check of an RL task
(:data:`karn_otel.health.RETURN_CHECKS`, the ReturnMonitor's: ``KarnNonFiniteReturn``,
``KarnReturnRegression``, thresholds :class:`karn_otel.health.ReturnThresholds`' defaults). Metric names come from
:mod:`karn_otel.metrics_registry`, so a renamed metric regenerates into the rules.

How a check fires, and why this way. A check's status lasts one epoch (or one PPO update),
often shorter than a scrape plus a ``for:`` hold, so a rule on the status alone never fires
for a one-epoch anomaly. Each health alert therefore fires on any of three terms, aggregated
``by (run_id, rank, world_size, check)`` so one anomaly is one alert:

1. **The event stream**: ``karn_health_alerts_total{check="..."}`` grew within
   :data:`HOLD` (``increase``), or its series is new within HOLD and already above 0 (a rank
   whose first scrape came after its first alert). The sink exports every (check, severity)
   pair at 0 from the start, so the first alert of each kind is an increase. The monitor's
   alerts are edge-triggered and judged over *epochs* (rolling means, the previous epoch's
   accuracy, per-head entropy floors, the Var(V)/Var(R) reconstruction), so this is exactly
   the monitor's verdict, however short. No ``for:``: the alert fires at the first
   evaluation after the scrape that saw the increment (two intervals at most) and resolves
   by itself HOLD after the last alert.
2. **The held state** ``karn_health_status{check="..."} > 0``: a check still failing keeps
   its alert firing past HOLD, and resolves when the check recovers.
3. **A raw-metric fallback with the thresholds inlined**, for the checks a single sample can
   decide (the PPO checks and isolation leakage): e.g. ``karn_ppo_entropy < 0.1``. It only
   applies to ranks that export no status for that check (``unless on (run_id, rank)
   karn_health_status{...}``): a process configured without the monitor
   (``configure(processors=False)``), or another exporter of the same metrics.

Karn's own alerts: ``KarnRankMissing`` (a rank's series vanished while its episode was open:
its last ``karn_episode_complete`` was 0 and it said no goodbye, ``karn_episode_stopped``; a
rank that finished exports 1 and stays up for a final scrape, so it is never paged), ``KarnTelemetryDropping`` (events dropped by a sink, or
failed OTLP exports) and ``KarnWatchdog`` (always firing: the alerting pipeline is alive).

Every alert carries ``runbook_url`` (a section of docs/alerts.md), a dashboard link and a
Grafana Explore link to the run's traces in Tempo.

Recording rules (:func:`recording_rules`): the job-wide aggregates and the per-rank spread of
train loss, validation accuracy, host gradient norm and epoch time (``run:<metric>:max|min|avg|
median|spread``), each rank's deviation from its run's median (``rank:<metric>:ratio_to_median``,
``rank:karn_host_val_accuracy:diff_from_median``) and failing health checks per rank, named
``level:metric:operations`` (Prometheus' convention, newest operation first). The Ranks dashboard
reads them, and its "Worst ranks" table is :func:`worst_ranks_expr`; so a dashboard never reads
every rank's raw series of a large job.

Imports neither torch nor opentelemetry.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from karn_otel.contracts import Severity
from karn_otel.health import (
    CHECKS,
    DEFAULT_THRESHOLDS,
    RETURN_CHECKS,
    CheckSpec,
    HealthThresholds,
    ReturnThresholds,
    entropy_floors,
)
from karn_otel.metrics_registry import by_name

RULES_DIR = Path(__file__).resolve().parents[1] / "stack" / "prometheus" / "rules"
RULES_PATH = RULES_DIR / "karn-alerts.yml"
RECORDING_PATH = RULES_DIR / "karn-recording.yml"
DEFAULT_RETURN_THRESHOLDS = ReturnThresholds()
GRAFANA_URL = "http://127.0.0.1:3000"
"""Where docker-compose.yml publishes Grafana; the alerts link to its dashboards."""

HOLD = "5m"
"""How long a health alert stays firing after the last HealthAlert event of its check (the
``increase`` window); a check still failing keeps it firing through its status."""
EVALUATION_INTERVAL = "15s"
"""stack/prometheus/prometheus.yml's scrape and evaluation interval, which the windows assume."""
RUNBOOK_BASE = "docs/alerts.md"
"""Where the runbooks live: ``runbook_url`` is ``RUNBOOK_BASE#<alert name, lower case>``.
Regenerate with ``--runbook-base https://.../docs/alerts.md`` to point at hosted docs."""
TEMPO_UID = "karn-tempo"
"""The Tempo data source's uid (stack/grafana/provisioning/datasources/datasources.yaml)."""

LOOKBACK = "30m"
"""How long a vanished rank stays reported as missing (a rule cannot see series older than this)."""
RANK_MISSING_FOR = "1m"
"""How long a rank must be gone before it is paged: longer than a scrape that times out once."""
DROP_WINDOW = "5m"

# Alert names: CamelCase of the check name, with these words spelled as acronyms.
_ACRONYMS = {"kl": "KL", "lstm": "LSTM"}

# The dashboard where each check's signal is plotted (new checks default to the training one).
_DASHBOARD = {
    "non_finite_loss": "karn-gradients",
    "loss_spike": "karn-training",
    "gradient_explosion": "karn-gradients",
    "accuracy_drop": "karn-training",
    "isolation_leakage": "karn-gradients",
}
_PPO_DASHBOARD = "karn-policy"
_RANKS_DASHBOARD = "karn-ranks"


def alert_name(check: str) -> str:
    """``kl_too_high`` -> ``KarnKLTooHigh``."""
    return "Karn" + "".join(_ACRONYMS.get(w, w.capitalize()) for w in check.split("_"))


def _n(x: float) -> str:
    """A PromQL number literal: shortest exact form, no trailing ``.0``."""
    if not math.isfinite(x):
        raise ValueError(f"threshold {x} is not finite")
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


def _m(otel_name: str) -> str:
    return by_name(otel_name).prometheus_name


# --------------------------------------------------------------------------- raw fallbacks


def _entropy_expr(t: HealthThresholds, head_sizes: Mapping[str, int] | None) -> str:
    entropy = _m("karn.ppo.entropy")
    if not head_sizes:
        return f"{entropy} < {_n(t.entropy_collapse_nats)}"
    floors = entropy_floors(head_sizes, t)
    parts = [f'{entropy}{{head="{h}"}} < {_n(f)}' for h, f in sorted(floors.items())]
    known = "|".join(sorted(head_sizes))
    parts.append(f'{entropy}{{head!~"{known}"}} < {_n(t.entropy_collapse_nats)}')
    return " or ".join(parts)


def _value_collapse_expr(t: HealthThresholds) -> list[str]:
    """Var(V) / Var(R) < ratio, as karn_otel.health.value_collapse_finding computes it.

    With EV < 1, Var(R) = Var(A) / (1 - EV), so the ratio is Var(V) (1 - EV) / Var(A); with
    EV >= 1 or EV not exported (the OTel SDK drops non-finite values), Var(R) ~ Var(V) + Var(A).
    Var(A) = 0 gives Inf or NaN, which never compares below the threshold (the monitor's
    "cannot be evaluated").
    """
    vv, std, ev = _m("karn.ppo.value_variance"), _m("karn.ppo.advantage.std"), _m("karn.ppo.explained_variance")
    r = _n(t.value_collapse_ratio)
    return [
        f"({vv} * (1 - {ev}) / {std} ^ 2 < {r} and {ev} < 1)",
        "or",
        f"({vv} / ({vv} + {std} ^ 2) < {r} unless {ev} < 1)",
    ]


def _fallback(check: str, t: HealthThresholds, head_sizes: Mapping[str, int] | None) -> list[str] | None:
    """The raw-metric expression of a check a single sample decides, or None."""
    kl = _m("karn.ppo.kl_divergence")
    simple = {
        "entropy_collapse": lambda: _entropy_expr(t, head_sizes),
        "kl_too_high": lambda: f"abs({kl}) > {_n(t.kl_too_high)}",
        "kl_too_low": lambda: f"abs({kl}) < {_n(t.kl_too_low)}",
        "explained_variance_negative": lambda: f"{_m('karn.ppo.explained_variance')} < {_n(t.explained_variance_min)}",
        "lstm_saturation": lambda: f"{_m('karn.ppo.lstm.saturation_fraction')} > {_n(t.lstm_saturation_fraction)}",
        "isolation_leakage": lambda: (
            f"abs({_m('karn.host.grad_isolation_leakage')}) > {_n(t.isolation_leakage_epsilon)}"
        ),
    }
    if check == "value_collapse":
        return _value_collapse_expr(t)
    make = simple.get(check)
    return [make()] if make else None


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    alert: str
    expr: list[str]  # lines
    for_: str
    labels: dict[str, str]
    annotations: dict[str, str]


def _threshold_text(spec: CheckSpec, t: HealthThresholds | ReturnThresholds) -> str:
    op = ">" if spec.comparison == "gt" else "<"
    if spec.name == "entropy_collapse" and isinstance(t, HealthThresholds):
        return (
            f"{op} {_n(round(t.entropy_collapse_fraction * 100, 9))}% of log(n) nats for a head of n actions "
            f"(KarnConfig.policy_head_sizes), else {op} {_n(t.entropy_collapse_nats)} nats"
        )
    unit = "" if spec.unit == "1" else f" {spec.unit}"
    if not spec.threshold_field:
        return f"{op} 0{unit}"
    text = f"{op} {_n(getattr(t, spec.threshold_field))}{unit} ({type(t).__name__}.{spec.threshold_field})"
    if spec.name == "return_regression" and isinstance(t, ReturnThresholds):
        text += (
            f" of the gain of its rolling mean over {t.window_episodes} episodes, after at least "
            f"{t.min_gain_episodes} episodes, with the gain and the drop both beyond {_n(t.noise_z)} standard "
            "errors (ReturnThresholds.noise_z)"
        )
    return text


def _dashboard_link(uid: str) -> str:
    return f"{GRAFANA_URL}/d/{uid}?var-run_id={{{{ $labels.run_id }}}}&var-rank={{{{ $labels.rank }}}}"


def runbook_url(alert: str, base: str = RUNBOOK_BASE) -> str:
    """The alert's section of docs/alerts.md (its heading is the alert name)."""
    return f"{base}#{alert.lower()}"


def explore_link(rank: bool = True) -> str:
    """Grafana Explore on Tempo with a TraceQL search for the run's (and rank's) traces.

    The pane JSON is percent-encoded here; the labels are filled in by Prometheus' template,
    escaped with Go's ``urlquery``.
    """
    from urllib.parse import quote

    # TraceQL { resource.karn.run_id = "<run>" && resource.karn.rank = <k> } inside a JSON string.
    pieces: list[tuple[bool, str]] = [
        (
            False,
            '{"karn":{"datasource":"' + TEMPO_UID + '","queries":[{"refId":"A",'
            '"datasource":{"type":"tempo","uid":"' + TEMPO_UID + '"},"queryType":"traceql",'
            '"query":"{ resource.karn.run_id = \\"',
        ),
        (True, "{{ $labels.run_id | urlquery }}"),
        (False, '\\"'),
    ]
    if rank:
        pieces += [(False, " && resource.karn.rank = "), (True, "{{ $labels.rank | urlquery }}")]
    pieces.append((False, ' }"}],"range":{"from":"now-6h","to":"now"}}}'))
    panes = "".join(text if template else quote(text, safe="") for template, text in pieces)
    return f"{GRAFANA_URL}/explore?schemaVersion=1&panes={panes}"


def _where() -> str:
    return "run {{ $labels.run_id }} rank {{ $labels.rank }}"


def health_rule(
    spec: CheckSpec,
    t: HealthThresholds = DEFAULT_THRESHOLDS,
    head_sizes: Mapping[str, int] | None = None,
    returns: ReturnThresholds = DEFAULT_RETURN_THRESHOLDS,
) -> Rule:
    """The alert of one HealthMonitor or ReturnMonitor check: its alert events or its status, else
    the raw-metric fallback (HealthMonitor checks a single sample decides; a return is a logged
    scalar, not a metric, so the return checks have none)."""
    is_return = spec in RETURN_CHECKS
    monitor = "ReturnMonitor" if is_return else "HealthMonitor"
    status = _m("karn.health.status")
    value = _m("karn.health.value")
    alerts = _m("karn.health.alerts")
    sel = f'{status}{{check="{spec.name}"}}'
    events = f'{alerts}{{check="{spec.name}", severity!="ok"}}'
    expr = [
        "max by (run_id, rank, world_size, check) (",
        f"    increase({events}[{HOLD}]) > 0",
        "  or",
        f"    ({events} > 0 unless {events} offset {HOLD})",
        "  or",
        f"    {sel} > 0",
        ")",
    ]
    raw = None if is_return else _fallback(spec.name, t, head_sizes)
    if raw is not None:
        expr += ["or", "("]
        if len(raw) == 1:
            expr.append(f'  label_replace({raw[0]}, "check", "{spec.name}", "", "")')
        else:
            expr += ["  label_replace("] + [f"    {line}" for line in raw] + [f'  , "check", "{spec.name}", "", "")']
        expr += [f"  unless on (run_id, rank) {sel}", ")"]
    dashboard = _DASHBOARD.get(spec.name) or (
        _PPO_DASHBOARD if "ppo_update" in spec.source.split(",") else "karn-training"
    )
    query = f'printf "{value}{{check=%q,run_id=%q,rank=%q}}" "{spec.name}" $labels.run_id $labels.rank | query'
    latest = (
        f'{{{{ with {query} }}}}Latest value: {{{{ . | first | value | printf "%.4g" }}}}.'
        "{{ else }}No finite value from a " + monitor + " on this rank.{{ end }}"
    )
    name = alert_name(spec.name)
    return Rule(
        alert=name,
        expr=expr,
        for_="0s",
        labels={"severity": spec.severity.value, "check": spec.name},
        annotations={
            "summary": f"{spec.summary[0].upper()}{spec.summary[1:]} ({_where()})",
            "description": (
                f"Karn health check {spec.name} failed on {_where()}; it fails when the value is "
                f"{_threshold_text(spec, returns if is_return else t)}. {latest} The alert holds for {HOLD} after the check's last "
                "alert, and while the check is still failing."
            ),
            "dashboard": _dashboard_link(dashboard),
            "explore": explore_link(),
            "runbook_url": runbook_url(name),
        },
    )


def rank_missing_rule() -> Rule:
    """A rank's series vanished while its episode was open (its last ``karn_episode_complete`` was 0)
    without a goodbye (its last ``karn_episode_stopped`` was not 1).

    A rank that finished exports ``karn_episode_complete 1`` and its embedded endpoint stays up
    for a final scrape, so a finished rank is never missing, however long before the other
    ranks it finished. A rank whose process shut Karn down with the episode open (an error,
    Ctrl-C, the launcher stopping it after its peer died) exports ``karn_episode_stopped 1``
    in that final scrape: it is not missing either, the rank that took it down is. A rank that
    vanished before it ever reported an episode has nothing to be missing from.
    """
    accepted, complete = _m("karn.telemetry.events.accepted"), _m("karn.episode.complete")
    stopped = _m("karn.episode.stopped")
    lb = LOOKBACK
    name = "KarnRankMissing"
    return Rule(
        alert=name,
        expr=[
            f"max by (run_id, rank, world_size) (last_over_time({complete}[{lb}])) == 0",
            f"unless on (run_id, rank) (max by (run_id, rank) (last_over_time({stopped}[{lb}])) == 1)",
            f"unless on (run_id, rank) {complete}",
            f"unless on (run_id, rank) {accepted}",
        ],
        for_=RANK_MISSING_FOR,
        labels={"severity": Severity.CRITICAL.value},
        annotations={
            "summary": "Karn rank {{ $labels.rank }} of run {{ $labels.run_id }} stopped reporting",
            "description": (
                "Rank {{ $labels.rank }} of run {{ $labels.run_id }} (world size {{ $labels.world_size }}) stopped "
                "reporting Karn metrics while its episode was still open, without shutting Karn down: the process "
                f"was killed or crashed, or its endpoint is unreachable. Reported for up to {lb} after the rank vanished."
            ),
            "dashboard": f"{GRAFANA_URL}/d/{_RANKS_DASHBOARD}?var-run_id={{{{ $labels.run_id }}}}",
            "explore": explore_link(),
            "runbook_url": runbook_url(name),
        },
    )


def telemetry_dropping_rule() -> Rule:
    """Events dropped by a sink or failed OTLP exports in the last DROP_WINDOW.

    The sink exports every drop counter it knows at 0 from the start, and ``increase`` sees
    from there; a series that is new within the window (another exporter, a sink added later)
    counts with its whole value (that term comes first: ``or`` keeps the left side of equal
    label sets).
    """
    dropped, failures = _m("karn.telemetry.events.dropped"), _m("karn.telemetry.export.failures")
    w = DROP_WINDOW
    name = "KarnTelemetryDropping"
    return Rule(
        alert=name,
        expr=[
            "sum by (run_id, rank, world_size) (",
            f"    ({dropped} unless {dropped} offset {w})",
            "  or",
            f"    increase({dropped}[{w}])",
            "  or",
            f"    ({failures} > 0 unless {failures} offset {w})",
            "  or",
            f"    increase({failures}[{w}])",
            ") > 0",
        ],
        for_="1m",
        labels={"severity": Severity.WARNING.value},
        annotations={
            "summary": f"Karn telemetry is being lost on {_where()}",
            "description": (
                f'{{{{ $value | printf "%.0f" }}}} telemetry items lost in the last {w} on {_where()} '
                "(events dropped by a sink: queue full or write failure; events a health or "
                "trigger processor skipped after an internal error, reason error; or failed OTLP "
                "exports). Training is unaffected; the run log is the source of truth."
            ),
            "dashboard": f"{GRAFANA_URL}/d/{_RANKS_DASHBOARD}?var-run_id={{{{ $labels.run_id }}}}",
            "explore": explore_link(),
            "runbook_url": runbook_url(name),
        },
    )


def watchdog_rule() -> Rule:
    """Always firing: proof that Prometheus evaluates rules and Alertmanager delivers them."""
    name = "KarnWatchdog"
    return Rule(
        alert=name,
        expr=["vector(1)"],
        for_="0s",
        labels={"severity": "none"},
        annotations={
            "summary": "The Karn alerting pipeline is alive (this alert always fires)",
            "description": (
                "Always firing. When it stops arriving, Prometheus is not evaluating Karn's rules or "
                "Alertmanager is not delivering them: no other Karn alert can reach you either."
            ),
            "dashboard": f"{GRAFANA_URL}/d/{_RANKS_DASHBOARD}",
            "runbook_url": runbook_url(name),
        },
    )


def rules(
    thresholds: HealthThresholds = DEFAULT_THRESHOLDS,
    head_sizes: Mapping[str, int] | None = None,
    returns: ReturnThresholds = DEFAULT_RETURN_THRESHOLDS,
) -> dict[str, list[Rule]]:
    """``{group name: rules}``: one alert per HealthMonitor check, one per ReturnMonitor check
    (RL tasks, ``karn_otel.init(task="rl")``), then Karn's own."""
    return {
        "karn-health": [health_rule(spec, thresholds, head_sizes) for spec in CHECKS],
        "karn-returns": [health_rule(spec, thresholds, head_sizes, returns) for spec in RETURN_CHECKS],
        "karn-telemetry": [rank_missing_rule(), telemetry_dropping_rule(), watchdog_rule()],
    }


# --------------------------------------------------------------------------- recording rules

RANK_WINDOW = "5m"
"""The window of the per-rank mean epoch time (``increase`` of the epoch histogram's sum and
count): the mean of the epochs that ended in it. A rank whose epochs are longer than the window
has no value between epochs."""
WORST_K = 5
"""Rows per measure in the Ranks dashboard's "Worst ranks" table."""
PER_RANK = '{rank!="", scope!="job"}'
"""A per-rank series: it has a ``rank`` label and is not a job-wide (``scope="job"``) one."""


@dataclass(frozen=True)
class Recording:
    record: str
    expr: str
    help: str  # one line: what the recorded value is (a comment above the rule, and docs)


@dataclass(frozen=True)
class Spread:
    """One per-rank quantity whose job-wide aggregates and per-rank deviation are recorded."""

    metric: str  # Prometheus name (for the histogram, the base name): the middle of level:metric:ops
    per_rank: str  # an expression with labels (run_id, rank): one value per rank
    ops: str  # the operations already applied to the per-rank value ("" or "mean5m")
    worse: str  # "higher" | "lower": which way a rank is worse
    title: str  # how the Worst ranks table names its measure


def _ops(op: str, spread: Spread) -> str:
    return f"{op}_{spread.ops}" if spread.ops else op


def spreads() -> list[Spread]:
    """The per-rank quantities of the Ranks dashboard: train loss, validation accuracy, host
    gradient norm (the latest value of each rank's gauge) and epoch time (each rank's mean
    epoch duration over :data:`RANK_WINDOW`, from the epoch histogram)."""

    def gauge(otel: str, worse: str, title: str) -> Spread:
        name = _m(otel)
        return Spread(name, f"max by (run_id, rank) ({name}{PER_RANK})", "", worse, title)

    epoch = by_name("karn.epoch.duration")
    assert epoch.kind == "histogram"
    e, w = epoch.prometheus_name, RANK_WINDOW
    mean = f"mean{w}"
    return [
        gauge("karn.host.train_loss", "higher", "train loss / job median"),
        gauge("karn.host.val_accuracy", "lower", "val accuracy - job median"),
        gauge("karn.host.grad_norm", "higher", "host grad norm / job median"),
        Spread(e, f"rank:{e}:{mean}", mean, "higher", "epoch time / job median"),
    ]


def _deviation_record(s: Spread) -> str:
    """``rank:<metric>:ratio_to_median`` (or ``diff_from_median`` for a quantity where lower is worse)."""
    op = "diff_from_median" if s.worse == "lower" else "ratio_to_median"
    return f"rank:{s.metric}:{_ops(op, s)}"


def recording_rules() -> dict[str, list[Recording]]:
    """``{group name: recording rules}``: one group, evaluated in order (a rule reads the ones above it).

    ``rank:`` rules have labels ``run_id, rank``; ``run:`` rules ``run_id`` (the ranks count also
    ``world_size``, one value per run). Per-rank series only (``rank`` set, ``scope`` not ``job``),
    deduplicated per (run, rank) first, so a rank exported twice (its endpoint and the Collector)
    counts once.
    """
    out: list[Recording] = []
    epoch = by_name("karn.epoch.duration")
    e, w = epoch.prometheus_name, RANK_WINDOW
    out.append(
        Recording(
            f"rank:{e}:mean{w}",
            f"sum by (run_id, rank) (increase({e}_sum{PER_RANK}[{w}]))\n"
            f"/\n(sum by (run_id, rank) (increase({e}_count{PER_RANK}[{w}])) > 0)",
            f"each rank's mean epoch time (s) over the epochs that ended in the last {w}",
        )
    )
    accepted = _m("karn.telemetry.events.accepted")
    out.append(
        Recording(
            f"run:{accepted}:count_ranks",
            f"count by (run_id, world_size) (max by (run_id, rank, world_size) ({accepted}{PER_RANK}))",
            "ranks exporting their own series (labels run_id, world_size)",
        )
    )
    for s in spreads():
        metric, base = s.metric, s.per_rank
        what = "epoch time (s)" if s.ops else metric
        for op, fn in (("max", "max"), ("min", "min"), ("avg", "avg")):
            out.append(
                Recording(
                    f"run:{metric}:{_ops(op, s)}",
                    f"{fn} by (run_id) ({base})",
                    f"{'unweighted mean' if op == 'avg' else op} across the run's ranks of each rank's {what}",
                )
            )
        out.append(
            Recording(
                f"run:{metric}:{_ops('median', s)}",
                f"quantile by (run_id) (0.5, {base})",
                f"median across the run's ranks of each rank's {what} (mean of the middle two for an even count)",
            )
        )
        out.append(
            Recording(
                f"run:{metric}:{_ops('spread', s)}",
                f"run:{metric}:{_ops('max', s)} - run:{metric}:{_ops('min', s)}",
                f"max - min across the run's ranks of {what}",
            )
        )
        median = f"run:{metric}:{_ops('median', s)}"
        if s.worse == "lower":
            expr = f"{base}\n- on (run_id) group_left ()\n{median}"
            text = f"each rank's {what} minus the run's median (negative: below the job)"
        else:
            expr = f"{base}\n/ on (run_id) group_left ()\n({median} > 0)"
            text = f"each rank's {what} / the run's median (> 1: above the job; none while the median is <= 0)"
        out.append(Recording(_deviation_record(s), expr, text))
    status = _m("karn.health.status")
    failing = f"rank:{status}:count_failing"
    out.append(
        Recording(
            failing,
            f"sum by (run_id, rank) (max by (run_id, rank, check) ({status}{PER_RANK}) > bool 0)",
            "health checks failing on each rank now (0 when all pass)",
        )
    )
    out.append(
        Recording(
            f"run:{status}:count_ranks_failing",
            f"sum by (run_id) ({failing} > bool 0)",
            "ranks of the run with at least one failing health check",
        )
    )
    return {"karn-ranks": out}


def recorded_names() -> list[str]:
    return [r.record for group in recording_rules().values() for r in group]


def worst_ranks_expr(run: str = '{run_id=~"$run_id"}', k: int = WORST_K) -> str:
    """The Ranks dashboard's "Worst ranks" table: per measure, the ``k`` ranks furthest from the job
    median on the bad side (ratio > 1, or accuracy below the median), and the ranks with the most
    failing health checks; the ``measure`` label names the row's measure, ``rank`` the rank."""
    parts = []
    for s in spreads():
        rec = _deviation_record(s)
        sel = f"topk by (run_id) ({k}, {rec}{run} > 1)"
        if s.worse == "lower":
            sel = f"bottomk by (run_id) ({k}, {rec}{run} < 0)"
        parts.append(f'label_replace({sel}, "measure", "{s.title}", "", "")')
    failing = f"rank:{_m('karn.health.status')}:count_failing"
    parts.append(
        f'label_replace(topk by (run_id) ({k}, {failing}{run} > 0), "measure", "health checks failing", "", "")'
    )
    return "\n  or ".join(parts)


def render_recording() -> str:
    """The full text of the recording rules file."""
    out = [
        "# Karn recording rules: job-wide aggregates and per-rank spread, so dashboards never query",
        "# raw per-rank series across a large job. Generated by `python -m karn_otel.stack_rules --write`",
        "# from karn_otel/metrics_registry.py. Do not edit by hand: tests/stack/test_static.py fails when",
        "# this file differs from the generator. Unit tests: stack/prometheus/tests/karn-recording.test.yml;",
        "# tests/stack/test_export_policies.py checks the loss, accuracy and grad-norm rules, the ranks",
        "# count and the Worst ranks query in a real Prometheus against numpy on a 4-rank run.",
        "groups:",
    ]
    for group, recs in recording_rules().items():
        out += [f"  - name: {group}", "    rules:"]
        for r in recs:
            out.append(f"      # {r.help}")
            out.append(f"      - record: {r.record}")
            out.append("        expr: |-")
            out += [f"          {line}".rstrip() for line in r.expr.splitlines()]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- YAML


def _q(s: str) -> str:
    """A single-quoted YAML scalar (no escapes but '' for ')."""
    return "'" + s.replace("'", "''") + "'"


def render(
    thresholds: HealthThresholds = DEFAULT_THRESHOLDS,
    head_sizes: Mapping[str, int] | None = None,
    runbook_base: str = RUNBOOK_BASE,
) -> str:
    """The full text of the rules file (``runbook_base``: where docs/alerts.md is published)."""
    out = [
        "# Karn alert rules. Generated by `python -m karn_otel.stack_rules --write` from",
        "# karn_otel/health.py (CHECKS and RETURN_CHECKS, HealthThresholds and ReturnThresholds defaults)",
        "# and karn_otel/metrics_registry.py.",
        "# Do not edit by hand: tests/stack/test_static.py fails when this file differs from the generator.",
        "# Unit tests: stack/prometheus/tests/karn-alerts.test.yml (promtool test rules).",
    ]
    if head_sizes:
        out.append("# Entropy floors for head sizes: " + ", ".join(f"{h}={n}" for h, n in sorted(head_sizes.items())))
    out.append("groups:")
    for group, group_rules in rules(thresholds, head_sizes).items():
        out += [f"  - name: {group}", "    rules:"]
        for r in group_rules:
            out.append(f"      - alert: {r.alert}")
            out.append("        expr: |-")
            out += [f"          {line}".rstrip() for line in r.expr]
            out.append(f"        for: {r.for_}")
            out.append("        labels:")
            out += [f"          {k}: {_q(v)}" for k, v in r.labels.items()]
            out.append("        annotations:")
            for k, v in r.annotations.items():
                if k == "runbook_url":
                    v = runbook_url(r.alert, runbook_base)
                out.append(f"          {k}: {_q(v)}")
    return "\n".join(out) + "\n"


def _head_sizes(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        head, sep, n = item.partition("=")
        if not sep or not head or not n.strip().isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(f"expected head=n_actions, got {item!r}")
        out[head.strip()] = int(n)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m karn_otel.stack_rules", description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write the rules file")
    ap.add_argument("--check", action="store_true", help="exit 1 when the rules file differs from the generator")
    ap.add_argument(
        "--path", type=Path, default=RULES_PATH, help="the rules file (default: stack/prometheus/rules/karn-alerts.yml)"
    )
    ap.add_argument(
        "--head-sizes",
        type=_head_sizes,
        metavar="HEAD=N,...",
        help="also give the raw entropy fallback per-head floors (as KarnConfig.policy_head_sizes does for the "
        "monitor), e.g. op=4,slot=3,blueprint=3,blend=2; the committed file uses the monitor's defaults (none)",
    )
    ap.add_argument(
        "--runbook-base",
        default=RUNBOOK_BASE,
        metavar="URL",
        help=f"where docs/alerts.md is published, for every alert's runbook_url (default {RUNBOOK_BASE})",
    )
    ap.add_argument(
        "--recording-path",
        type=Path,
        default=RECORDING_PATH,
        help="the recording rules file (default: stack/prometheus/rules/karn-recording.yml)",
    )
    args = ap.parse_args(argv)
    from karn_otel.generated import write_or_check

    regenerate = "python -m karn_otel.stack_rules --write"
    status = write_or_check(
        render(DEFAULT_THRESHOLDS, args.head_sizes, args.runbook_base),
        args.path,
        write=args.write,
        check=args.check,
        regenerate=regenerate,
    )
    if not args.write and not args.check:
        sys.stdout.write("---\n")
    return max(
        status,
        write_or_check(
            render_recording(), args.recording_path, write=args.write, check=args.check, regenerate=regenerate
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
