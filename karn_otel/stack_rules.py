"""Prometheus alert rules for the stack, generated from the HealthMonitor and the metric registry.

``stack/prometheus/rules/karn-alerts.yml`` is this module's output; a test fails when the
committed file differs from it::

    python -m karn_otel.stack_rules --write   # rewrite stack/prometheus/rules/karn-alerts.yml
    python -m karn_otel.stack_rules --check   # exit 1 when the file is stale
    python -m karn_otel.stack_rules           # print the rules

One source of truth. Every check of :data:`karn_otel.health.CHECKS` becomes one alert
(``loss_spike`` -> ``KarnLossSpike``) with the check's severity, and its thresholds are
:data:`karn_otel.health.DEFAULT_THRESHOLDS`. Metric names come from
:mod:`karn_otel.metrics_registry`, so a renamed metric regenerates into the rules.

How a check fires, and why this way:

1. **The HealthMonitor's verdict** ``karn_health_status{check="..."} > 0``. Karn exports each
   check's *current* severity from the monitor that runs in the training process (the OTel
   sink reads ``HealthMonitor.report()``), so the rule is exactly the monitor's logic: the
   rolling mean/median windows over *epochs* behind ``loss_spike`` and
   ``gradient_explosion``, the previous epoch's accuracy behind ``accuracy_drop``, per-head
   entropy floors (10% of log(n) when ``KarnConfig.policy_head_sizes`` is set), the
   Var(V)/Var(R) reconstruction behind ``value_collapse``, and non-finite values (which the
   OTel SDK refuses to export, so PromQL could never see a NaN loss). PromQL over *time*
   cannot reproduce epoch windows, so this is the only faithful source for the host checks.
   It also resolves by itself when a check recovers.
2. **A raw-metric fallback with the thresholds inlined**, for the checks a single sample can
   decide (the PPO checks and isolation leakage): e.g. ``karn_ppo_entropy < 0.1``. It only
   applies to ranks that export no status for that check (``unless on (run_id, rank)
   karn_health_status{...}``): a process configured without the monitor
   (``configure(processors=False)``), or another exporter of the same metrics. Where the
   monitor reports, its verdict wins, so the two never disagree or double-notify.

Two more alerts watch Karn itself: ``KarnRankMissing`` (a rank's series vanished mid-episode
or while other ranks of its run still report) and ``KarnTelemetryDropping`` (events dropped by
a sink, or failed OTLP exports).

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
from karn_otel.health import CHECKS, DEFAULT_THRESHOLDS, CheckSpec, HealthThresholds, entropy_floors
from karn_otel.metrics_registry import by_name

RULES_PATH = Path(__file__).resolve().parents[1] / "stack" / "prometheus" / "rules" / "karn-alerts.yml"
GRAFANA_URL = "http://127.0.0.1:3000"
"""Where docker-compose.yml publishes Grafana; the alerts link to its dashboards."""

FOR = {Severity.CRITICAL: "30s", Severity.WARNING: "1m", Severity.INFO: "5m"}
"""``for:`` per severity. Karn's gauges hold the latest epoch's or update's value, so a
failing check stays failing until the next one; ``for`` only guards against a single
unlucky evaluation, and critical checks (the run's numbers are already invalid) page
within half a minute."""

LOOKBACK = "30m"
"""How long a vanished rank stays reported as missing (a rule cannot see series older than this)."""
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


def _threshold_text(spec: CheckSpec, t: HealthThresholds) -> str:
    op = ">" if spec.comparison == "gt" else "<"
    if spec.name == "entropy_collapse":
        return (
            f"{op} {_n(round(t.entropy_collapse_fraction * 100, 9))}% of log(n) nats for a head of n actions "
            f"(KarnConfig.policy_head_sizes), else {op} {_n(t.entropy_collapse_nats)} nats"
        )
    unit = "" if spec.unit == "1" else f" {spec.unit}"
    if not spec.threshold_field:
        return f"{op} 0{unit}"
    return f"{op} {_n(getattr(t, spec.threshold_field))}{unit} (HealthThresholds.{spec.threshold_field})"


def _dashboard_link(uid: str) -> str:
    return f"{GRAFANA_URL}/d/{uid}?var-run_id={{{{ $labels.run_id }}}}&var-rank={{{{ $labels.rank }}}}"


def _where() -> str:
    return "run {{ $labels.run_id }} rank {{ $labels.rank }}"


def health_rule(
    spec: CheckSpec, t: HealthThresholds = DEFAULT_THRESHOLDS, head_sizes: Mapping[str, int] | None = None
) -> Rule:
    """The alert of one HealthMonitor check: its verdict, else the raw-metric fallback."""
    status = _m("karn.health.status")
    value = _m("karn.health.value")
    sel = f'{status}{{check="{spec.name}"}}'
    expr = [f"{sel} > 0"]
    raw = _fallback(spec.name, t, head_sizes)
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
        '{{ else }}No finite value from a HealthMonitor on this rank; alert value {{ $value | printf "%.4g" }}.{{ end }}'
    )
    return Rule(
        alert=alert_name(spec.name),
        expr=expr,
        for_=FOR[spec.severity],
        labels={"severity": spec.severity.value, "check": spec.name},
        annotations={
            "summary": f"{spec.summary[0].upper()}{spec.summary[1:]} ({_where()})",
            "description": (
                f"Karn health check {spec.name} is failing on {_where()}; it fails when the value is "
                f"{_threshold_text(spec, t)}. {latest}"
            ),
            "dashboard": _dashboard_link(dashboard),
        },
    )


def rank_missing_rule() -> Rule:
    """A rank's series vanished while its episode was still open, or while other ranks of its run still report.

    A clean finish is told apart from a crash by the last values Prometheus saw: a rank that
    finished its episode last reported ``karn_host_epoch == karn_episode_max_epochs``.
    """
    accepted = _m("karn.telemetry.events.accepted")
    epoch, max_epochs = _m("karn.host.epoch"), _m("karn.episode.max_epochs")
    lb = LOOKBACK
    return Rule(
        alert="KarnRankMissing",
        expr=[
            "(",
            f"  max by (run_id, rank, world_size) (present_over_time({accepted}[{lb}]))",
            f"  unless on (run_id, rank) {accepted}",
            ")",
            "and on (run_id, rank)",
            "(",
            f"    max by (run_id, rank) (last_over_time({max_epochs}[{lb}]))",
            "    > on (run_id, rank)",
            "    (",
            f"        max by (run_id, rank) (last_over_time({epoch}[{lb}]))",
            "      or",
            f"        0 * max by (run_id, rank) (last_over_time({max_epochs}[{lb}]))",
            "    )",
            "  or",
            f"    max by (run_id, rank) (present_over_time({accepted}[{lb}]))",
            f"    and on (run_id) group by (run_id) ({accepted})",
            ")",
        ],
        for_="1m",
        labels={"severity": Severity.CRITICAL.value},
        annotations={
            "summary": "Karn rank {{ $labels.rank }} of run {{ $labels.run_id }} stopped reporting",
            "description": (
                "Rank {{ $labels.rank }} of run {{ $labels.run_id }} (world size {{ $labels.world_size }}) stopped "
                "reporting Karn metrics before its episode ended, or while other ranks of the run still report: "
                "the process crashed or was killed, or its endpoint is unreachable. "
                f"Reported for up to {lb} after the rank vanished."
            ),
            "dashboard": f"{GRAFANA_URL}/d/{_RANKS_DASHBOARD}?var-run_id={{{{ $labels.run_id }}}}",
        },
    )


def telemetry_dropping_rule() -> Rule:
    """Events dropped by a sink or failed OTLP exports in the last DROP_WINDOW.

    A drop counter series only appears once something was dropped, and ``increase`` cannot
    see a series' first sample, so a series that is new within the window counts with its
    whole value (that term comes first: ``or`` keeps the left side of equal label sets).
    """
    dropped, failures = _m("karn.telemetry.events.dropped"), _m("karn.telemetry.export.failures")
    w = DROP_WINDOW
    return Rule(
        alert="KarnTelemetryDropping",
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
                "(events dropped by a sink: queue full or write failure; or failed OTLP exports). "
                "Training is unaffected; the run log is the source of truth."
            ),
            "dashboard": f"{GRAFANA_URL}/d/{_RANKS_DASHBOARD}?var-run_id={{{{ $labels.run_id }}}}",
        },
    )


def rules(
    thresholds: HealthThresholds = DEFAULT_THRESHOLDS, head_sizes: Mapping[str, int] | None = None
) -> dict[str, list[Rule]]:
    """``{group name: rules}``: one alert per HealthMonitor check, then Karn's own."""
    return {
        "karn-health": [health_rule(spec, thresholds, head_sizes) for spec in CHECKS],
        "karn-telemetry": [rank_missing_rule(), telemetry_dropping_rule()],
    }


# --------------------------------------------------------------------------- YAML


def _q(s: str) -> str:
    """A single-quoted YAML scalar (no escapes but '' for ')."""
    return "'" + s.replace("'", "''") + "'"


def render(thresholds: HealthThresholds = DEFAULT_THRESHOLDS, head_sizes: Mapping[str, int] | None = None) -> str:
    """The full text of the rules file."""
    out = [
        "# Karn alert rules. Generated by `python -m karn_otel.stack_rules --write` from",
        "# karn_otel/health.py (CHECKS, HealthThresholds defaults) and karn_otel/metrics_registry.py.",
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
            out += [f"          {k}: {_q(v)}" for k, v in r.annotations.items()]
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
    args = ap.parse_args(argv)
    from karn_otel.generated import write_or_check

    return write_or_check(
        render(DEFAULT_THRESHOLDS, args.head_sizes),
        args.path,
        write=args.write,
        check=args.check,
        regenerate="python -m karn_otel.stack_rules --write",
    )


if __name__ == "__main__":
    sys.exit(main())
