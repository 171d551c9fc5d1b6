"""The one registry of Karn's metrics: names, instruments, units, labels, Prometheus names.

Every metric Karn exports is one :class:`MetricDef` in :data:`METRICS`. The OTel sink
(``karn_otel/sinks/otel/metrics.py``) builds its instruments from this table and nothing else;
``docs/metrics.md`` is generated from it::

    python -m karn_otel.metrics_registry --write-docs   # rewrite docs/metrics.md
    python -m karn_otel.metrics_registry --check        # exit 1 when the file is stale

How a value is found: each metric names a *source* (a small, fixed set described in
:data:`SOURCES`: "the latest HostSnapshot", "each slot's latest SlotSnapshot", ...) and a
*field*, a dotted attribute path into the source's object (``advantage_stats.mean``). When
the field holds a mapping (``per_head_kl``) or a contract of named terms
(``reward_components``), the metric's ``key_label`` names the label that carries the key,
so ``karn.ppo.head_kl_divergence{head="op"}``. ``None`` means "not measured" and produces
no point, and so does a non-finite value (the OTel SDK drops NaN and inf); booleans are 0/1.

Every instrument but one is asynchronous (observable): values are read from Karn's state when
a reader collects, never recorded on the training thread (a synchronous record costs 6-9 us).
The one histogram, ``karn.epoch.duration``, is recorded once per epoch (at its HostSnapshot),
inside the epoch's span, so each of its points carries an exemplar with the epoch span's trace
and span id (Grafana opens the epoch's trace from it); its buckets are
:data:`EPOCH_DURATION_BUCKETS_S`.

Prometheus names. ``prometheus_name`` is what ``opentelemetry-exporter-prometheus`` 0.66b2
exposes, verified by scraping in tests/sinks/test_otel.py:

* the OTel name is sanitised (every run of characters outside ``[a-zA-Z0-9:]`` becomes ``_``);
* the unit is appended as a suffix unless the name already ends with it: ``s`` becomes
  ``_seconds``; the dimensionless ``1`` and any curly-brace annotation (``{parameter}``)
  add nothing (the exporter maps ``1`` to an empty suffix, not ``_ratio``);
* counters get ``_total``.

Labels. Every series carries :data:`COMMON_LABELS` (``run_id``, ``rank``, ``world_size``;
Karn adds them to every data point because the exporter would otherwise put resource
attributes into ``target_info`` only), plus the metric's own labels, each from a bounded
set (:data:`LABEL_VALUES`). Seed ids, batch indices and free text never become labels:
they go on spans.

Imports neither torch nor opentelemetry.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["gauge", "counter", "histogram"]
"""``gauge``: ObservableGauge (a current value). ``counter``: ObservableCounter (a monotonic total).
``histogram``: a synchronous Histogram, recorded once per epoch (Prometheus: ``_bucket``, ``_sum``,
``_count``)."""

EPOCH_DURATION_BUCKETS_S: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
"""Bucket boundaries of ``karn.epoch.duration`` (seconds): reference epochs take ~0.3 s, real ones minutes."""

COMMON_LABELS: tuple[str, ...] = ("run_id", "rank", "world_size")
"""Labels on every series. Bounded per process: one run, one rank."""

LABEL_VALUES: dict[str, str] = {
    "slot": "the episode's slot ids (EpisodeContext.slot_config), e.g. early, mid, late",
    "blueprint": "the seed's blueprint id, or `none` for an empty slot",
    "stage": "SeedStage: DORMANT, GERMINATED, TRAINING, BLENDING, PROBATIONARY, FOSSILIZED, CULLED",
    "head": "the controller's action heads, e.g. op, slot, blueprint, blend",
    "component": "reward terms (accuracy_gain, parameter_cost, lifecycle_bonus, invalid_action_penalty); "
    "for Karn's own metrics, the sink class name (RunLogSink, OTelSink)",
    "check": "the HealthMonitor's check names (karn_otel.health.CHECK_NAMES)",
    "severity": "Severity: ok, info, warning, critical",
    "op": "ActionOp: WAIT, GERMINATE, FOSSILIZE, CULL",
    "reason": "the collector's rejection reasons (type_error, unknown_slot, ...) or a sink's drop reasons",
    "signal": "traces, metrics",
    "rule": "the claim rule that made a claim: alpha-spending (live), final-epoch Holm (after the episode)",
    "scope": "`job` on the job-wide (reduced over ranks) series, which carry no `rank` label (the "
    "`karn.ranks.unhealthy_rank` and `karn.ranks.unhealthy_epochs` series' `rank` names the unhealthy rank); "
    "absent on per-rank series",
    "stat": "min, mean, max: the spread of one per-rank value across the ranks of a job",
    "quantity": "train_loss, host_grad_norm, busy: the per-rank values a `RankHealthSummary` spreads",
}
"""Every label key a metric may use, with the bounded set its values come from."""

REJECTION_REASONS: tuple[str, ...] = (
    "malformed",
    "type_error",
    "out_of_range",
    "invalid_string",
    "invalid_id",
    "bad_rank",
    "bad_epoch",
    "negative_param_count",
    "no_active_episode",
    "unknown_episode",
    "epoch_regression",
    "alpha_out_of_range",
    "unknown_slot",
    "unknown_event_type",
    "schema_version",
    "reserved_event_type",
    "derived_budget",
    "bad_timestamp",
)
"""Every reason the collector and pipeline reject an event for (tests/sinks/test_otel.py reads
their source to keep this complete). Each has a ``karn_telemetry_events_rejected_total`` series
at 0 from the start, so ``increase()`` sees the first rejection."""

SINK_DROP_REASONS: dict[str, tuple[str, ...]] = {
    "RunLogSink": ("queue_full", "encode_error", "write_error", "error"),
    "OTelSink": (
        "spans_export_failed",
        "spans_queue_full",
        "spans_unsent_at_shutdown",
        "span_events_over_limit",
        "error",
    ),
}
"""The drop reasons of Karn's own sinks (``error``: the sink raised; the pipeline counts it).
Each sink present in the pipeline gets a ``karn_telemetry_events_dropped_total`` series at 0 per
reason from the start."""


@dataclass(frozen=True)
class Source:
    """Where a group of metrics reads its values (the sink implements one reader per source)."""

    name: str
    labels: tuple[str, ...]  # labels every object of this source comes with
    doc: str


MAX_UNHEALTHY_RANK_SERIES = 64
"""Ranks with a ``karn.ranks.unhealthy_epochs`` series (the first ones named); later ones are not counted."""

_SOURCE_LIST = (
    Source("host", (), "the latest `HostSnapshot`"),
    Source("slot", ("slot", "blueprint"), "each slot's latest `SlotSnapshot`"),
    Source(
        "slot_stage", ("slot", "stage"), "`SlotSnapshot.stage` as a state set: a series per stage, 1 for the current"
    ),
    Source("counterfactual", (), "the latest `CounterfactualMatrix`"),
    Source("shapley", ("slot",), "`CounterfactualMatrix.shapley_values`, one `ShapleyEstimate` per slot"),
    Source("policy", (), "the latest `PolicySnapshot`"),
    Source("ppo", (), "the latest `PPOUpdateStats`; before the first update, the latest `PolicySnapshot`'s copies"),
    Source("baseline", (), "the latest `HostBaseline`"),
    Source("context", (), "the episode's `EpisodeContext`"),
    Source(
        "lifecycle",
        (),
        "the episode's progress, from `EpisodeContext` on (none before): `complete` 0 until `EpisodeSummary`, "
        "then 1 for the rest of the endpoint's life; `stopped` 1 once Karn shut down with the episode open",
    ),
    Source("summary", (), "the `EpisodeSummary` (once the episode has ended)"),
    Source(
        "epochs",
        (),
        "each epoch's wall time (the previous epoch's end, or the episode's start, to its `HostSnapshot`), "
        "recorded once per epoch with an exemplar of the epoch's span",
    ),
    Source("analytics", (), "`MorphogeneticAnalytics` over the collector's store"),
    Source(
        "control",
        (),
        "the control twin's accuracy this run records per epoch (`karn run --control`; `Scalars` "
        "`control_val_accuracy`, `accuracy_delta_vs_control`)",
    ),
    Source(
        "claims",
        ("slot", "rule"),
        "`MorphogeneticAnalytics.claims()`: each slot's claim by the multiplicity-safe rule (karn_otel/claims.py)",
    ),
    Source(
        "health",
        ("check",),
        "each check of the collector's `HealthMonitor.report()`; without a monitor, the latest `HealthAlert` per check",
    ),
    Source(
        "ranks",
        ("scope",),
        'the latest `RankHealthSummary` (DDP jobs, rank 0 only, `scope="job"` and no `rank` label): every '
        "rank's numbers as the epoch's one reduction gathered them",
    ),
    Source(
        "ranks_unhealthy",
        ("scope",),
        "`RankHealthSummary.unhealthy_ranks`: one series per named unhealthy rank (at most "
        "`MAX_NAMED_UNHEALTHY` = 8), its `rank` label naming that rank, not the exporter",
    ),
    Source(
        "ranks_unhealthy_epochs",
        ("scope",),
        "`RankHealthSummary.unhealthy_ranks`, counted per rank over the run (rank 0 only; the first "
        f"{MAX_UNHEALTHY_RANK_SERIES} "
        "ranks ever named have a series), its `rank` label naming that rank",
    ),
    Source("alerts", ("check", "severity"), "`HealthAlert` events, counted"),
    Source("decisions", ("op",), "`ControllerDecision` events, counted by the operation chosen"),
    Source("collector", (), "the `KarnCollector`'s accounting"),
    Source("dropped", ("component", "reason"), "`KarnCollector.dropped()`: events lost, per sink and reason"),
    Source("otel", (), "the OTel sink's own accounting"),
    Source("queues", ("component",), "the queue depth of each sink that reports one (`queue_depth()`)"),
)
SOURCES: dict[str, Source] = {s.name: s for s in _SOURCE_LIST}


@dataclass(frozen=True)
class MetricDef:
    """One exported metric."""

    name: str  # OTel instrument name, "karn.<group>.<quantity>"
    kind: Kind
    unit: str  # UCUM: "1", "s", "{parameter}", ...
    description: str
    source: str  # a key of SOURCES
    field: str = ""  # dotted attribute path into the source's object; "" = the object itself
    key_label: str | None = None  # label for the keys when the field is a mapping

    @property
    def labels(self) -> tuple[str, ...]:
        """The metric's own label keys (COMMON_LABELS come on top)."""
        extra = (self.key_label,) if self.key_label else ()
        return SOURCES[self.source].labels + extra

    @property
    def prometheus_name(self) -> str:
        return prometheus_name(self.name, self.unit, self.kind)

    @property
    def prometheus_series(self) -> tuple[str, ...]:
        """The sample names Prometheus stores: the name itself, or a histogram's three."""
        base = self.prometheus_name
        return (base + "_bucket", base + "_sum", base + "_count") if self.kind == "histogram" else (base,)


def _g(name: str, unit: str, source: str, field: str, description: str, key: str | None = None) -> MetricDef:
    return MetricDef(name, "gauge", unit, description, source, field, key)


def _c(name: str, unit: str, source: str, field: str, description: str, key: str | None = None) -> MetricDef:
    return MetricDef(name, "counter", unit, description, source, field, key)


def _h(name: str, unit: str, source: str, description: str) -> MetricDef:
    return MetricDef(name, "histogram", unit, description, source)


FRACTION = "Fraction in [0, 1]."

METRICS: tuple[MetricDef, ...] = (
    # --- HostSnapshot: the host network, once per epoch
    _g("karn.host.epoch", "{epoch}", "host", "epoch", "Epoch of the latest host snapshot (1-based)."),
    _g("karn.host.train_loss", "1", "host", "train_loss", "Mean training cross-entropy over the epoch (nats)."),
    _g("karn.host.train_accuracy", "1", "host", "train_accuracy", "Training accuracy over the epoch. " + FRACTION),
    _g("karn.host.val_loss", "1", "host", "val_loss", "Validation cross-entropy (nats)."),
    _g("karn.host.val_accuracy", "1", "host", "val_accuracy", "Validation accuracy. " + FRACTION),
    _g("karn.host.params", "{parameter}", "host", "host_params", "Parameters of the host network alone."),
    _g("karn.host.seed_params", "{parameter}", "host", "total_seed_params", "Parameters in all live seeds."),
    _g("karn.host.total_params", "{parameter}", "host", "total_params", "Host plus seed parameters."),
    _g("karn.host.fossilized_params", "{parameter}", "host", "fossilized_params", "Parameters of fossilized seeds."),
    _g("karn.host.grad_norm", "1", "host", "host_grad_norm", "L2 norm of the host's gradients over the epoch."),
    _g("karn.host.seed_grad_norm", "1", "host", "seed_grad_norms", "L2 norm of each live seed's gradients.", "slot"),
    _g(
        "karn.host.grad_isolation_leakage",
        "1",
        "host",
        "grad_isolation_leakage",
        "Gradient norm leaking from isolated seeds into the host (0 = perfect isolation).",
    ),
    # --- SlotSnapshot: each slot, once per epoch
    _g("karn.slot.stage", "1", "slot_stage", "", "1 for the slot's current lifecycle stage, 0 for every other stage."),
    _g("karn.slot.epochs_in_stage", "{epoch}", "slot", "epochs_in_stage", "Epochs the slot has spent in its stage."),
    _g("karn.slot.seed_params", "{parameter}", "slot", "seed_params", "Parameters of the slot's seed (0 when empty)."),
    _g("karn.slot.alpha", "1", "slot", "alpha", "Blend coefficient of the slot's seed. " + FRACTION),
    _g(
        "karn.slot.counterfactual_contribution",
        "1",
        "slot",
        "counterfactual_contribution",
        "Accuracy with the seed minus accuracy without it (fraction; absent while the slot is inactive).",
    ),
    _g(
        "karn.slot.total_improvement",
        "1",
        "slot",
        "total_improvement",
        "Accuracy now minus accuracy at germination (fraction).",
    ),
    _g(
        "karn.slot.improvement_this_epoch",
        "1",
        "slot",
        "improvement_this_epoch",
        "Change of the seed's contribution since the previous epoch (fraction).",
    ),
    _g(
        "karn.slot.last_gate_passed",
        "1",
        "slot",
        "last_gate_passed",
        "1 when the slot's last gate check passed, 0 when it failed.",
    ),
    # --- CounterfactualMatrix: attribution, once per epoch
    _g(
        "karn.counterfactual.removal_cost",
        "1",
        "counterfactual",
        "marginal_contributions",
        "Accuracy lost when the slot's seed is removed (alpha forced to 0), fraction.",
        "slot",
    ),
    _g(
        "karn.counterfactual.evaluations",
        "{configuration}",
        "counterfactual",
        "n_evaluations",
        "Configurations evaluated by the latest pass.",
    ),
    _g(
        "karn.counterfactual.duration",
        "s",
        "counterfactual",
        "elapsed_s",
        "Wall time of the latest counterfactual pass.",
    ),
    _g(
        "karn.counterfactual.partial",
        "1",
        "counterfactual",
        "partial",
        "1 when the latest pass stopped early (budget or timeout).",
    ),
    _g(
        "karn.counterfactual.shapley.mean",
        "1",
        "shapley",
        "mean",
        "Shapley value of the slot's seed (accuracy, fraction).",
    ),
    _g(
        "karn.counterfactual.shapley.std_error", "1", "shapley", "std", "Standard error of the Shapley mean (fraction)."
    ),
    _g(
        "karn.counterfactual.shapley.ci_low",
        "1",
        "shapley",
        "ci_low",
        "Lower bound of the Shapley confidence interval (fraction).",
    ),
    _g(
        "karn.counterfactual.shapley.ci_high",
        "1",
        "shapley",
        "ci_high",
        "Upper bound of the Shapley confidence interval (fraction).",
    ),
    _g(
        "karn.counterfactual.shapley.samples",
        "{permutation}",
        "shapley",
        "n_samples",
        "Permutations behind the Shapley estimate.",
    ),
    # --- PolicySnapshot: the controller, once per decision
    _g(
        "karn.policy.value_estimate", "1", "policy", "value_estimate", "Critic's value estimate at the latest decision."
    ),
    _g("karn.policy.advantage", "1", "policy", "advantage", "Advantage of the latest decision (once computed)."),
    _g("karn.policy.reward", "1", "policy", "reward_total", "Total reward of the latest decision."),
    _g(
        "karn.policy.reward_component",
        "1",
        "policy",
        "reward_components",
        "Each named term of the latest reward.",
        "component",
    ),
    _g(
        "karn.policy.action_log_prob",
        "1",
        "policy",
        "action_log_probs",
        "Log-probability of the chosen action, per head (nats).",
        "head",
    ),
    _g(
        "karn.policy.action_masked",
        "1",
        "policy",
        "action_was_masked",
        "1 when the masks left the policy no choice (the action was forced).",
    ),
    # --- PPOUpdateStats: policy training, once per update
    _g("karn.ppo.update_index", "{update}", "ppo", "update_index", "Index of the latest PPO update."),
    _g("karn.ppo.policy_loss", "1", "ppo", "policy_loss", "Clipped surrogate policy loss."),
    _g("karn.ppo.value_loss", "1", "ppo", "value_loss", "Value-function loss."),
    _g("karn.ppo.kl_divergence", "1", "ppo", "kl_divergence", "Approximate KL(old || new) of the update (nats)."),
    _g("karn.ppo.head_kl_divergence", "1", "ppo", "per_head_kl", "Approximate KL per action head (nats).", "head"),
    _g(
        "karn.ppo.explained_variance",
        "1",
        "ppo",
        "explained_variance",
        "Explained variance of the value function (1 = perfect).",
    ),
    _g("karn.ppo.entropy", "1", "ppo", "entropy", "Policy entropy per action head (nats).", "head"),
    _g(
        "karn.ppo.value_variance",
        "1",
        "ppo",
        "value_variance",
        "Variance of the value predictions (collapse when near 0).",
    ),
    _g("karn.ppo.advantage.mean", "1", "ppo", "advantage_stats.mean", "Mean advantage over the update's batch."),
    _g("karn.ppo.advantage.std", "1", "ppo", "advantage_stats.std", "Standard deviation of the advantages."),
    _g("karn.ppo.advantage.min", "1", "ppo", "advantage_stats.min", "Smallest advantage."),
    _g("karn.ppo.advantage.max", "1", "ppo", "advantage_stats.max", "Largest advantage."),
    _g(
        "karn.ppo.advantage.clip_fraction",
        "1",
        "ppo",
        "advantage_stats.fraction_clipped",
        "Fraction of advantages beyond the clip threshold.",
    ),
    _g("karn.ppo.ratio.mean", "1", "ppo", "ratio_stats.mean", "Mean probability ratio new/old."),
    _g(
        "karn.ppo.ratio.clip_fraction_high",
        "1",
        "ppo",
        "ratio_stats.fraction_clipped_high",
        "Fraction of ratios above 1 + epsilon.",
    ),
    _g(
        "karn.ppo.ratio.clip_fraction_low",
        "1",
        "ppo",
        "ratio_stats.fraction_clipped_low",
        "Fraction of ratios below 1 - epsilon.",
    ),
    _g(
        "karn.ppo.ratio.head_clip_rate",
        "1",
        "ppo",
        "ratio_stats.per_head_clip_rates",
        "Clip rate per action head.",
        "head",
    ),
    _g("karn.ppo.lstm.hidden_mean", "1", "ppo", "lstm_health.hidden_mean", "Mean of the LSTM hidden state."),
    _g(
        "karn.ppo.lstm.hidden_std", "1", "ppo", "lstm_health.hidden_std", "Standard deviation of the LSTM hidden state."
    ),
    _g("karn.ppo.lstm.cell_mean", "1", "ppo", "lstm_health.cell_mean", "Mean of the LSTM cell state."),
    _g("karn.ppo.lstm.cell_std", "1", "ppo", "lstm_health.cell_std", "Standard deviation of the LSTM cell state."),
    _g(
        "karn.ppo.lstm.saturation_fraction",
        "1",
        "ppo",
        "lstm_health.saturation_fraction",
        "Fraction of hidden units with |h| > 0.9.",
    ),
    # --- HostBaseline and the episode
    _g(
        "karn.baseline.initial_loss",
        "1",
        "baseline",
        "initial_loss",
        "Validation loss of the host before training (nats).",
    ),
    _g(
        "karn.baseline.initial_accuracy",
        "1",
        "baseline",
        "initial_accuracy",
        "Validation accuracy before training. " + FRACTION,
    ),
    _g(
        "karn.baseline.final_host_only_loss",
        "1",
        "baseline",
        "final_host_only_loss",
        "Validation loss at episode end with every seed removed.",
    ),
    _g(
        "karn.baseline.final_host_only_accuracy",
        "1",
        "baseline",
        "final_host_only_accuracy",
        "Validation accuracy at episode end with every seed removed. " + FRACTION,
    ),
    _g("karn.episode.max_epochs", "{epoch}", "context", "max_epochs", "Epochs the episode is configured to run."),
    _g(
        "karn.episode.epochs_completed",
        "{epoch}",
        "summary",
        "epochs_completed",
        "Epochs completed by the finished episode.",
    ),
    _g("karn.episode.duration", "s", "summary", "wall_time_s", "Wall time of the finished episode."),
    _g(
        "karn.episode.complete",
        "1",
        "lifecycle",
        "complete",
        "1 once the latest episode ended (held until the process exits), 0 while it is open. "
        "KarnRankMissing pages only for a rank that vanished at 0.",
    ),
    _g(
        "karn.episode.stopped",
        "1",
        "lifecycle",
        "stopped",
        "1 when Karn was shut down with the episode still open (an error, Ctrl-C, a launcher stopping the rank), "
        "else 0: the rank said goodbye, so KarnRankMissing does not page for it.",
    ),
    _h(
        "karn.epoch.duration",
        "s",
        "epochs",
        "Wall time of each epoch; each point's exemplar is the epoch's span (trace id, span id).",
    ),
    # --- MorphogeneticAnalytics: is morphogenesis winning?
    _g(
        "karn.analytics.accuracy_delta",
        "1",
        "analytics",
        "accuracy_delta",
        "Current minus host-only validation accuracy (fraction; > 0 = winning).",
    ),
    _g(
        "karn.analytics.params_efficiency_ratio",
        "1",
        "analytics",
        "params_efficiency_ratio",
        "Accuracy per parameter relative to the host-only model (> 1 = winning).",
    ),
    _g("karn.analytics.param_ratio", "1", "analytics", "param_ratio", "Total parameters / host parameters."),
    _g(
        "karn.analytics.host_only_accuracy",
        "1",
        "analytics",
        "host_only_accuracy",
        "Latest host-only validation accuracy. " + FRACTION,
    ),
    _g(
        "karn.analytics.policy_agreement",
        "1",
        "analytics",
        "policy_vs_heuristic.agreement",
        "Fraction of recent decisions where the controller chose what the shadow heuristic would have.",
    ),
    _g(
        "karn.control.val_accuracy",
        "1",
        "control",
        "control_val_accuracy",
        "Validation accuracy of the host-only control twin at this epoch (same weights, data order, "
        "seeds never germinated): the causal baseline. " + FRACTION,
    ),
    _g(
        "karn.control.accuracy_delta",
        "1",
        "control",
        "accuracy_delta_vs_control",
        "This run's validation accuracy minus its control twin's at the same epoch (causal; "
        "`karn.analytics.accuracy_delta` is vs host-only removal, not causal).",
    ),
    # --- RankHealthSummary: every rank, reduced by rank 0 (DDP)
    _g(
        "karn.ranks.train_loss",
        "1",
        "ranks",
        "train_loss",
        "Each rank's own mean training loss this epoch, across ranks: min, mean (unweighted), max.",
        "stat",
    ),
    _g(
        "karn.ranks.grad_norm",
        "1",
        "ranks",
        "host_grad_norm",
        "Each rank's own host gradient norm this epoch, across ranks: min, mean, max.",
        "stat",
    ),
    _g(
        "karn.ranks.busy",
        "s",
        "ranks",
        "busy_s",
        "Each rank's busy time this epoch (wall time up to the reduction, less its waits for other ranks in "
        "Karn's counterfactual gathers), across ranks: min, mean, max. The straggler has the max.",
        "stat",
    ),
    _g(
        "karn.ranks.worst_rank",
        "{rank}",
        "ranks",
        "worst_rank",
        "The rank with the largest value of each quantity this epoch (a NaN counts as largest).",
        "quantity",
    ),
    _g("karn.ranks.world_size", "{rank}", "ranks", "world_size", "Ranks in the latest reduction."),
    _g("karn.ranks.unhealthy", "{rank}", "ranks", "n_unhealthy", "Ranks whose own health is warning or critical."),
    _g("karn.ranks.critical", "{rank}", "ranks", "n_critical", "Ranks whose own health is critical."),
    _g(
        "karn.ranks.unhealthy_rank",
        "1",
        "ranks_unhealthy",
        "",
        "One series per named unhealthy rank (its `rank` label), worst first, at most 8: 2 = warning, 3 = critical.",
    ),
    _c(
        "karn.ranks.unhealthy_epochs",
        "{epoch}",
        "ranks_unhealthy_epochs",
        "",
        "Epochs each rank was named unhealthy (its `rank` label), over the run: a counter, so a rank "
        "unhealthy for less than a scrape interval still shows (`increase(...[10m]) > 0`).",
    ),
    _g(
        "karn.counterfactual.claim",
        "1",
        "claims",
        "helps",
        "1 when the claim rule says the slot's seed helps (per-run false-claim rate <= 5%; `rule`: "
        "alpha-spending while the episode runs, final-epoch Holm once it ended), else 0. The Shapley "
        "intervals themselves are descriptive.",
    ),
    # --- Health
    _g(
        "karn.health.status",
        "1",
        "health",
        "severity",
        "Current severity of each check: 0 ok, 1 info, 2 warning, 3 critical.",
    ),
    _g(
        "karn.health.value",
        "1",
        "health",
        "value",
        "The check's latest measured value, in its own unit (absent before the first).",
    ),
    _g("karn.health.threshold", "1", "health", "threshold", "The threshold the check compares its value against."),
    _c("karn.health.alerts", "{alert}", "alerts", "", "Health alerts raised, by check and severity."),
    _c("karn.controller.decisions", "{decision}", "decisions", "", "Controller decisions, by operation."),
    # --- Karn itself
    _c("karn.telemetry.events.accepted", "{event}", "collector", "accepted", "Events accepted by the collector."),
    _c(
        "karn.telemetry.events.rejected",
        "{event}",
        "collector",
        "rejected",
        "Events rejected by validation, by reason.",
        "reason",
    ),
    _c(
        "karn.telemetry.events.dropped",
        "{event}",
        "dropped",
        "",
        "Events or spans lost by a sink (queue full, write or export failure), or events a "
        "health or trigger processor skipped after an internal error (reason `error`).",
    ),
    _c(
        "karn.telemetry.export.failures",
        "{export}",
        "otel",
        "export_failures",
        "Failed OTLP export calls, by signal.",
        "signal",
    ),
    _g(
        "karn.telemetry.queue.depth",
        "{item}",
        "queues",
        "",
        "Items waiting in a sink's queue for its background thread.",
    ),
    _c(
        "karn.telemetry.dense_windows",
        "{window}",
        "otel",
        "dense_windows",
        "Dense-trace windows received (each is a karn.dense_window span).",
    ),
)

_BY_NAME: dict[str, MetricDef] = {m.name: m for m in METRICS}


def by_name(name: str) -> MetricDef:
    """The definition of one metric; KeyError for a name Karn does not export."""
    return _BY_NAME[name]


# ---------------------------------------------------------------------- Prometheus names

# What opentelemetry-exporter-prometheus 0.66b2 (_mapping.map_unit) appends for the units Karn
# uses. A unit outside this table is refused, so adding one forces a look at the exporter.
_UNIT_SUFFIX = {"1": "", "s": "seconds", "ms": "milliseconds", "By": "bytes", "%": "percent"}
_ANNOTATION = re.compile(r"^\{[a-z_]+\}$")
_NAME_SANITIZE = re.compile(r"[^a-zA-Z0-9:]+")


def prometheus_name(name: str, unit: str, kind: Kind) -> str:
    """The sample name the embedded Prometheus exporter exposes for an instrument.

    >>> prometheus_name("karn.host.val_loss", "1", "gauge")
    'karn_host_val_loss'
    >>> prometheus_name("karn.counterfactual.duration", "s", "gauge")
    'karn_counterfactual_duration_seconds'
    >>> prometheus_name("karn.health.alerts", "{alert}", "counter")
    'karn_health_alerts_total'
    """
    base = _NAME_SANITIZE.sub("_", name)
    if _ANNOTATION.match(unit):
        suffix = ""
    elif unit in _UNIT_SUFFIX:
        suffix = _UNIT_SUFFIX[unit]
    else:
        raise ValueError(
            f"unit {unit!r} of {name}: no known Prometheus suffix (check the exporter, then extend _UNIT_SUFFIX)"
        )
    if suffix and not base.endswith("_" + suffix):
        base += "_" + suffix
    if kind == "counter":
        base = base.removesuffix("_total") + "_total"
    return base


# ---------------------------------------------------------------------- validation

_NAME_RE = re.compile(r"^karn(\.[a-z][a-z0-9_]*)+$")


def validate(metrics: tuple[MetricDef, ...] = METRICS) -> None:
    """Raise ValueError when a definition breaks a registry rule (tests call it too)."""
    seen: set[str] = set()
    prom: set[str] = set()
    for m in metrics:
        if not _NAME_RE.match(m.name):
            raise ValueError(f"{m.name}: names are karn.<lower_snake>.<...>")
        if m.name in seen:
            raise ValueError(f"{m.name}: defined twice")
        seen.add(m.name)
        if m.kind not in ("gauge", "counter", "histogram"):
            raise ValueError(f"{m.name}: kind must be gauge, counter or histogram")
        if m.source not in SOURCES:
            raise ValueError(f"{m.name}: unknown source {m.source!r}")
        for label in m.labels:
            if label not in LABEL_VALUES:
                raise ValueError(f"{m.name}: label {label!r} is not a bounded label (LABEL_VALUES)")
        if len(set(m.labels)) != len(m.labels):
            raise ValueError(f"{m.name}: repeated label")
        for p in m.prometheus_series:  # prometheus_name raises for an unknown unit
            if p in prom:
                raise ValueError(f"{m.name}: Prometheus name {p} collides with another metric")
            prom.add(p)
        if not m.description.strip():
            raise ValueError(f"{m.name}: needs a description")


validate()


# ---------------------------------------------------------------------- docs/metrics.md

DOCS_PATH = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"

_GROUP_TITLES = {
    "host": "Host (HostSnapshot)",
    "slot": "Slots (SlotSnapshot)",
    "counterfactual": "Counterfactual attribution (CounterfactualMatrix)",
    "policy": "Controller decisions (PolicySnapshot)",
    "ppo": "PPO updates (PPOUpdateStats)",
    "baseline": "Host baseline (HostBaseline)",
    "episode": "Episode (EpisodeContext, EpisodeSummary)",
    "epoch": "Epochs",
    "analytics": "Is it winning? (MorphogeneticAnalytics)",
    "health": "Health",
    "controller": "Controller",
    "telemetry": "Karn itself",
}


def _source_text(m: MetricDef) -> str:
    src = SOURCES[m.source].doc
    return f"{src}, `{m.field}`" if m.field else src


def render_markdown() -> str:
    """The full text of docs/metrics.md."""
    out = [
        "# Karn metrics",
        "",
        "<!-- Generated by `python -m karn_otel.metrics_registry --write-docs` from",
        "     karn_otel/metrics_registry.py. Do not edit by hand: a test compares this file to the registry. -->",
        "",
        f"Karn exports {len(METRICS)} metrics, all from asynchronous (observable) instruments: values are read from",
        "Karn's state when a reader collects, never recorded on the training thread. The embedded Prometheus",
        "endpoint is read by each scrape (sampled: the latest epoch only). The push path (OTLP, and any extra",
        "exporter) collects at every epoch boundary, on its own thread: each epoch's host, slot and",
        "counterfactual values are one data point stamped at the epoch's end, and the rest is collected every",
        "`otel_export_interval_s` too.",
        "",
        "**Counters start at 0.** Every counter has a series for each label combination Karn knows from the",
        "first collection (each check with its severity, each controller operation, each rejection reason, each",
        "drop reason of the pipeline's own sinks), so `increase()` sees the first alert, rejection or drop.",
        "",
        "**Per-rank means per-rank.** Rank *k*'s series describe rank *k*. In a DDP job, rank 0's job-wide",
        '(reduced) host snapshot is exported as the host series with `scope="job"` and no `rank` label.',
        "",
        "**Names.** The OTel name is `karn.<group>.<quantity>` with a UCUM unit. The Prometheus name is what",
        "the embedded endpoint (opentelemetry-exporter-prometheus 0.66b2) exposes: dots become `_`; unit `s`",
        "appends `_seconds`; the dimensionless unit `1` and annotations such as `{parameter}` append nothing;",
        "counters end in `_total`. Through the bundled collector (`collector-config/otel-collector.yaml`,",
        "which drops the unit `1` before its Prometheus exporter would append `_ratio`) the names are the same.",
        "",
        "**Labels.** Every series carries `" + "`, `".join(COMMON_LABELS) + "`. Metric labels come from bounded sets:",
        "",
    ]
    for key, values in LABEL_VALUES.items():
        out.append(f"- `{key}`: {values}")
    out += [
        "",
        "A value that was not measured (None in the event) produces no series, and neither does a NaN or",
        'infinite one (the OTel SDK drops them; a diverged loss shows as `karn_health_status{check="non_finite_loss"}`).',
        "Booleans are 0/1.",
        "Resource attributes (`service.name`, `service.instance.id` = `<run_id>-rank<k>`, `karn.run_id`,",
        "`karn.rank`, `karn.world_size`, `host.name`) appear in Prometheus as `target_info`.",
        "",
        "**Where a rank runs** (`karn_otel/distributed/placement.py`), also resource attributes, from the",
        "environment: SLURM (`slurm.job.id`, `slurm.job.name`, `slurm.job.node_list`, `slurm.job.num_nodes`,",
        "`slurm.task.id`, `slurm.task.local_id`, `slurm.node.id`, `slurm.partition`, `slurm.array.*`), Kubernetes",
        "(the semantic conventions' `k8s.pod.name`, `k8s.namespace.name`, `k8s.node.name`, `k8s.pod.uid`,",
        "`k8s.job.name`, from the downward-API variables `POD_NAME`, `POD_NAMESPACE`, `NODE_NAME`, `POD_UID`,",
        "`JOB_NAME`), torchrun (`karn.dl.local_rank`, `karn.dl.node_rank`, `karn.dl.local_world_size`,",
        "`karn.dl.restart_count`, `karn.dl.elastic_run_id`) and the parallel layout you state",
        "(`KARN_DP_RANK`/`KARN_DP_SIZE`, `KARN_TP_*`, `KARN_PP_*` -> `karn.dl.{dp,tp,pp}.{rank,size}`).",
        "NeMo Lens, the closest peer, puts rank and world size under `nv.dl.`; Karn keeps one vendor-neutral",
        "`karn.dl.` prefix and the standard `k8s.*` names, and `slurm.*` follows the variables as Lens does.",
        "",
        "**Which ranks export** (`KarnConfig.export_ranks` or `KARN_EXPORT_RANKS`; docs/scaling.md): `all`,",
        "`reduced` (rank 0's job-wide series only), `sampled:K` (those plus K ranks chosen from the run id, and",
        "any rank whose health turns bad), `auto` (all up to 64 ranks, `sampled:8` beyond). A rank outside the",
        "policy exposes none of its own series; every rank still writes its run log and raises its alerts.",
        "",
    ]
    groups: dict[str, list[MetricDef]] = {}
    for m in METRICS:
        groups.setdefault(m.name.split(".")[1], []).append(m)
    for group, metrics in groups.items():
        out += [f"## {_GROUP_TITLES.get(group, group)}", ""]
        out += [
            "| Prometheus name | OTel name | kind | unit | labels | source | description |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in metrics:
            labels = ", ".join(f"`{lb}`" for lb in m.labels) or "-"
            cells = [
                " ".join(f"`{p}`" for p in m.prometheus_series),
                f"`{m.name}`",
                m.kind,
                f"`{m.unit}`",
                labels,
                _source_text(m),
                m.description,
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m karn_otel.metrics_registry", description=__doc__.splitlines()[0])
    ap.add_argument("--write-docs", action="store_true", help="write the generated docs/metrics.md")
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/metrics.md differs from the registry")
    ap.add_argument("--path", type=Path, default=DOCS_PATH, help="the markdown file (default: docs/metrics.md)")
    args = ap.parse_args(argv)
    from karn_otel.generated import write_or_check

    return write_or_check(
        render_markdown(),
        args.path,
        write=args.write_docs,
        check=args.check,
        regenerate="python -m karn_otel.metrics_registry --write-docs",
    )


if __name__ == "__main__":
    sys.exit(main())
