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
    spec: CheckSpec, t: HealthThresholds = DEFAULT_THRESHOLDS, head_sizes: Mapping[str, int] | None = None
) -> Rule:
    """The alert of one HealthMonitor check: its alert events or its status, else the raw-metric fallback."""
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
        "{{ else }}No finite value from a HealthMonitor on this rank.{{ end }}"
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
                f"{_threshold_text(spec, t)}. {latest} The alert holds for {HOLD} after the check's last "
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
                "(events dropped by a sink: queue full or write failure; or failed OTLP exports). "
                "Training is unaffected; the run log is the source of truth."
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
    thresholds: HealthThresholds = DEFAULT_THRESHOLDS, head_sizes: Mapping[str, int] | None = None
) -> dict[str, list[Rule]]:
    """``{group name: rules}``: one alert per HealthMonitor check, then Karn's own."""
    return {
        "karn-health": [health_rule(spec, thresholds, head_sizes) for spec in CHECKS],
        "karn-telemetry": [rank_missing_rule(), telemetry_dropping_rule(), watchdog_rule()],
    }


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
    args = ap.parse_args(argv)
    from karn_otel.generated import write_or_check

    return write_or_check(
        render(DEFAULT_THRESHOLDS, args.head_sizes, args.runbook_base),
        args.path,
        write=args.write,
        check=args.check,
        regenerate="python -m karn_otel.stack_rules --write",
    )


if __name__ == "__main__":
    sys.exit(main())
