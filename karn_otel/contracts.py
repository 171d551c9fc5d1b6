"""Karn's typed contracts: every event payload and the envelope that carries it.

The names follow the Karn design document ("Data Model: Three Tiers" plus the expert
review's P0-P2 additions), so a reader of the spec finds each one by name:

* Tier 1 (once per episode): :class:`EpisodeContext`, :class:`HostBaseline`.
* Tier 2 (every epoch): :class:`HostSnapshot`, :class:`SlotSnapshot`, :class:`PolicySnapshot`,
  :class:`CounterfactualMatrix`.
* Tier 3 (adaptive): :class:`DenseTrace` with :class:`BatchMetrics` and
  :class:`GateEvaluationTrace`.

Every contract is a frozen dataclass. Encoding and decoding (``to_json``/``from_json``, the
envelope's ``event_to_json``/``event_from_json``) live in :mod:`karn_otel.codec`: an exact
round trip, non-finite floats included (a diverged loss is written as ``{"$float": "nan"}``
and read back as ``float("nan")``, never as ``null``), typed by the hints, so a round trip
also restores enums, tuples, paths and datetimes.

This module imports neither torch nor opentelemetry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Union

SCHEMA_VERSION = 1
"""Version of the event schema written to ``events.jsonl``. Bump on incompatible change."""


# --------------------------------------------------------------------------- enums


class SeedStage(str, enum.Enum):
    """Seed lifecycle. The happy path runs top to bottom; CULLED is the exit."""

    DORMANT = "DORMANT"
    GERMINATED = "GERMINATED"
    TRAINING = "TRAINING"
    BLENDING = "BLENDING"
    PROBATIONARY = "PROBATIONARY"
    FOSSILIZED = "FOSSILIZED"
    CULLED = "CULLED"


class ActionOp(str, enum.Enum):
    """The controller's operation head."""

    WAIT = "WAIT"
    GERMINATE = "GERMINATE"
    FOSSILIZE = "FOSSILIZE"
    CULL = "CULL"


class Severity(str, enum.Enum):
    OK = "ok"
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class OperatingMode(str, enum.Enum):
    """Spec "Operating Modes": standard (trigger-based dense capture) or research (dense always)."""

    STANDARD = "standard"
    RESEARCH = "research"


class TelemetryEventType(str, enum.Enum):
    EPISODE_STARTED = "episode_started"  # EpisodeContext
    HOST_BASELINE = "host_baseline"  # HostBaseline (start: finals None; end: finals set)
    SLOT_SNAPSHOT = "slot_snapshot"  # SlotSnapshot
    HOST_SNAPSHOT = "host_snapshot"  # HostSnapshot; closes an epoch
    POLICY_SNAPSHOT = "policy_snapshot"  # PolicySnapshot
    PPO_UPDATE = "ppo_update"  # PPOUpdateStats
    CONTROLLER_DECISION = "controller_decision"  # ControllerDecision
    STAGE_TRANSITION = "stage_transition"  # StageTransition
    GATE_EVALUATION = "gate_evaluation"  # GateEvaluationTrace
    BATCH_METRICS = "batch_metrics"  # BatchMetrics
    DENSE_TRACE = "dense_trace"  # DenseTrace
    COUNTERFACTUAL = "counterfactual"  # CounterfactualMatrix
    HEALTH_ALERT = "health_alert"  # HealthAlert
    MODE_CHANGE = "mode_change"  # ModeChange
    TELEMETRY_STATS = "telemetry_stats"  # TelemetryStats (Karn's own accounting)
    SCALARS = "scalars"  # Scalars: free-form named values of a user's loop (run log only)
    RANK_SUMMARY = "rank_summary"  # RankHealthSummary: every rank's numbers, reduced (DDP)
    EPISODE_ENDED = "episode_ended"  # EpisodeSummary


# --------------------------------------------------------------------------- tier 1


@dataclass(frozen=True)
class EpisodeContext:
    """Everything needed to reproduce an episode (spec Tier 1)."""

    episode_id: str
    timestamp: datetime
    git_commit: str
    base_seed: int
    torch_seed: int
    numpy_seed: int
    host_architecture: str
    host_params: int
    slot_config: dict[str, int]  # slot id -> channel width at that slot
    max_epochs: int
    task_type: str
    hyperparameters: dict[str, Union[bool, int, float, str, None]]  # None: a default left unset
    software: dict[str, str] = field(default_factory=dict)  # python/torch/numpy versions
    # Experiments: runs that belong together share an id; the arm says what this run is in it
    # ("morph", or "control": the host-only twin). None outside an experiment.
    experiment_id: str | None = None
    experiment_arm: str | None = None
    # Fields of this context the emitter could not know (karn_otel.init on a plain loop): their
    # values are placeholders (-1 for a seed or max_epochs, 0 for a param count, "unknown"),
    # never invented. Empty: every field was known.
    unknown_fields: tuple[str, ...] = ()


RetentionPolicy = Literal["keep_all", "keep_last", "delete_after_run"]


@dataclass(frozen=True)
class HostBaseline:
    """The host-only reference (spec Tier 1, review P2 #10: checkpoint as a path)."""

    initial_loss: float
    initial_accuracy: float  # fraction in [0, 1]
    initial_checkpoint: Path
    checkpoint_retention_policy: RetentionPolicy = "keep_last"
    final_host_only_loss: float | None = None
    final_host_only_accuracy: float | None = None


# --------------------------------------------------------------------------- tier 2


@dataclass(frozen=True)
class SlotSnapshot:
    slot_id: str
    stage: SeedStage
    epochs_in_stage: int
    seed_id: str | None
    blueprint_id: str | None
    seed_params: int
    alpha: float  # blend coefficient in [0, 1]
    counterfactual_contribution: float | None  # acc_with - acc_without (fraction)
    total_improvement: float | None  # acc_now - acc_at_germination (fraction)
    improvement_this_epoch: float
    last_gate_attempted: str | None
    last_gate_passed: bool | None
    last_gate_reason: str | None


@dataclass(frozen=True)
class HostSnapshot:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    host_params: int
    total_seed_params: int
    total_params: int
    fossilized_params: int
    host_grad_norm: float
    seed_grad_norms: dict[str, float]
    grad_isolation_leakage: float | None


@dataclass(frozen=True)
class FactoredAction:
    """One decision of the controller, one field per action head."""

    op: ActionOp
    slot: str | None = None
    blueprint: str | None = None
    blend: str | None = None

    def label(self) -> str:
        if self.op is ActionOp.WAIT:
            return "WAIT"
        if self.op is ActionOp.GERMINATE:
            return f"GERMINATE({self.slot},{self.blueprint})"
        return f"{self.op.value}({self.slot})"


@dataclass(frozen=True)
class RewardComponentsTelemetry:
    """Named reward terms; their sum is the reward."""

    accuracy_gain: float = 0.0
    parameter_cost: float = 0.0
    lifecycle_bonus: float = 0.0
    invalid_action_penalty: float = 0.0

    @property
    def total(self) -> float:
        return self.accuracy_gain + self.parameter_cost + self.lifecycle_bonus + self.invalid_action_penalty


@dataclass(frozen=True)
class AdvantageStats:
    mean: float
    std: float
    min: float
    max: float
    fraction_clipped: float  # |A| > clip threshold


@dataclass(frozen=True)
class RatioStats:
    mean: float
    fraction_clipped_high: float  # ratio > 1 + eps
    fraction_clipped_low: float  # ratio < 1 - eps
    per_head_clip_rates: dict[str, float]


@dataclass(frozen=True)
class LSTMHealth:
    hidden_mean: float
    hidden_std: float
    cell_mean: float
    cell_std: float
    saturation_fraction: float  # |h| > 0.9


@dataclass(frozen=True)
class PPOUpdateStats:
    """Statistics of one PPO update, materialised once per update."""

    update_index: int
    policy_loss: float
    value_loss: float
    kl_divergence: float  # approx KL(old || new)
    per_head_kl: dict[str, float]
    explained_variance: float
    entropy: dict[str, float]  # per head, nats
    value_variance: float
    advantage_stats: AdvantageStats
    ratio_stats: RatioStats
    lstm_health: LSTMHealth | None
    elapsed_s: float = 0.0  # wall time of the update (the OTel sink makes it a timed span)


@dataclass(frozen=True)
class PolicySnapshot:
    """One controller decision with the policy internals behind it (spec Tier 2 + P0 #1, P1 #6)."""

    observation_vector: tuple[float, ...]
    action: FactoredAction
    action_log_probs: dict[str, float]
    action_was_masked: bool
    value_estimate: float
    advantage: float | None
    reward_total: float
    reward_components: RewardComponentsTelemetry
    kl_divergence: float | None = None  # from the latest PPO update, None before the first
    explained_variance: float | None = None
    per_head_kl: dict[str, float] = field(default_factory=dict)
    advantage_stats: AdvantageStats | None = None
    ratio_stats: RatioStats | None = None
    lstm_health: LSTMHealth | None = None
    entropy: dict[str, float] = field(default_factory=dict)
    shadow_action: FactoredAction | None = None  # what the heuristic would have done


@dataclass(frozen=True)
class ControllerDecision:
    """What the controller decided this epoch and why (any controller, heuristic included)."""

    controller: str
    action: FactoredAction
    reason: str
    shadow_action: FactoredAction | None = None
    # Whether the action took effect: False when it was refused (a failed gate, a busy slot,
    # nothing to cull); None when not reported (WAIT, or a controller that does not say).
    applied: bool | None = None


@dataclass(frozen=True)
class StageTransition:
    slot_id: str
    seed_id: str | None
    blueprint_id: str | None
    from_stage: SeedStage
    to_stage: SeedStage
    reason: str


@dataclass(frozen=True)
class GateEvaluationTrace:
    """The internals of one gate check G0-G5."""

    gate: str
    slot_id: str
    seed_id: str | None
    passed: bool
    reason: str
    from_stage: SeedStage
    to_stage: SeedStage | None
    measurements: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- counterfactuals


@dataclass(frozen=True)
class CounterfactualResult:
    config: tuple[bool, ...]  # (True, False, True) = first on, second off, third on
    alpha_settings: dict[str, float]
    val_loss: float
    val_accuracy: float
    per_class_accuracy: dict[int, float] | None = None  # research mode only


@dataclass(frozen=True)
class ShapleyEstimate:
    """A Shapley value with its uncertainty (review P1 #4).

    ``std`` is the standard error of ``mean``; ``ci_low``/``ci_high`` the two-sided interval at
    ``confidence`` (t-quantiles for sampling, combined with validation-set bootstrap noise).
    """

    mean: float
    std: float
    n_samples: int
    algorithm: str = "permutation_antithetic"
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    confidence: float = 0.95
    # Degrees of freedom of the t interval (Welch-Satterthwaite for sampling; B - 1 for the
    # bootstrap); inf = normal. The claim rules (karn_otel.claims) use it for their quantiles.
    df: float = float("inf")


@dataclass(frozen=True)
class CounterfactualMatrix:
    epoch: int
    slot_ids: tuple[str, ...]
    configs: tuple[CounterfactualResult, ...]
    marginal_contributions: dict[str, float]
    interaction_effects: dict[tuple[str, str], float]
    shapley_values: dict[str, ShapleyEstimate] | None
    strategy: str = "full_factorial"
    interaction_index: dict[tuple[str, str], float] | None = None
    n_evaluations: int = 0
    partial: bool = False
    partial_reason: str | None = None
    elapsed_s: float = 0.0
    # Pairwise interactions with intervals (full matrix only; docs/counterfactual-validity.md).
    # interaction_effects above is the *removal* interaction (co-Moebius, other slots on);
    # synergy_dividends is the Moebius dividend v(ab) - v(a) - v(b) + v(0) (other slots off).
    # *_ci_low/_ci_high: two-sided bootstrap intervals at the matrix's confidence.
    synergy_dividends: dict[tuple[str, str], float] | None = None
    synergy_ci_low: dict[tuple[str, str], float] | None = None
    synergy_ci_high: dict[tuple[str, str], float] | None = None
    interaction_index_ci_low: dict[tuple[str, str], float] | None = None
    interaction_index_ci_high: dict[tuple[str, str], float] | None = None
    removal_interaction_ci_low: dict[tuple[str, str], float] | None = None
    removal_interaction_ci_high: dict[tuple[str, str], float] | None = None
    # Distributed passes (karn_otel.distributed.evaluation): the part of elapsed_s this rank
    # spent in the gathers, i.e. waiting for the other ranks' shards. None in one process.
    wait_s: float | None = None


# --------------------------------------------------------------------------- tier 3


@dataclass(frozen=True)
class BatchMetrics:
    epoch: int
    batch_idx: int
    loss: float
    accuracy: float
    host_grad_norm: float
    seed_grad_norms: dict[str, float]
    isolation_leakage: float | None


@dataclass(frozen=True)
class DenseTrace:
    trigger_reason: str
    window_start_epoch: int
    window_end_epoch: int
    batch_metrics: tuple[BatchMetrics, ...]
    gradient_histograms: dict[str, tuple[float, ...]]
    gradient_flow: dict[str, float]
    activation_means: dict[str, float]
    activation_stds: dict[str, float]
    dead_neuron_counts: dict[str, int]
    gate_evaluation_details: GateEvaluationTrace | None = None


# --------------------------------------------------------------------------- across ranks


@dataclass(frozen=True)
class RankSpread:
    """One per-rank quantity across the ranks of a job: min, unweighted mean over ranks, max,
    and the ranks that hold the extremes (the lowest rank on a tie). NaN if any rank's is NaN."""

    min: float
    mean: float
    max: float
    min_rank: int
    max_rank: int


@dataclass(frozen=True)
class RankHealthSummary:
    """Every rank at the end of an epoch, as the epoch's one reduction saw it (DDP jobs).

    Job-wide (emitted with ``is_reduced=True``; rank 0 exports it, ``scope="job"``), so a
    dashboard of a 1,000-rank job shows which ranks are unhealthy and how far apart they are
    without a per-rank series for each. Bounded: three quantities, and at most
    ``MAX_NAMED_UNHEALTHY`` ranks named (worst first; ``n_unhealthy`` counts them all).
    ``wait_s`` is this rank's own time in the reduction's collectives, i.e. waiting for the
    slowest rank: the rank whose wait is shortest is the one the others waited for.
    """

    epoch: int
    world_size: int
    train_loss: RankSpread
    host_grad_norm: RankSpread
    # each rank's wall time for the epoch up to the reduction, less its waits for other ranks in
    # Karn's counterfactual gathers (DDP's gradient all-reduce waits cannot be told apart: busy)
    busy_s: RankSpread
    n_unhealthy: int  # ranks whose own HealthMonitor is at WARNING or CRITICAL
    n_critical: int
    unhealthy_ranks: tuple[int, ...]  # worst severity first, then by rank; at most MAX_NAMED_UNHEALTHY
    wait_s: float = 0.0


MAX_NAMED_UNHEALTHY = 8


# --------------------------------------------------------------------------- health, modes, accounting


@dataclass(frozen=True)
class HealthAlert:
    check: str  # bounded set: see karn_otel.health
    severity: Severity
    message: str
    value: float
    threshold: float


@dataclass(frozen=True)
class ModeChange:
    mode: OperatingMode
    reason: str


@dataclass(frozen=True, init=False)
class Scalars:
    """Named scalars of one training step, for values outside the spec's snapshots.

    Recorded in the run log and the store (latest value per name). Names are free-form,
    so they are never exported as metric labels.
    """

    step: int
    values: dict[str, float]

    def __init__(self, step: int, values: dict[str, float]) -> None:
        # Built once per training step: two dict stores instead of the frozen dataclass's
        # two object.__setattr__ calls (same instance, half the cost).
        d = self.__dict__
        d["step"] = step
        d["values"] = values


@dataclass(frozen=True)
class TelemetryStats:
    """Karn's own accounting, written at episode end so `karn inspect` can show it."""

    accepted: int
    rejected: dict[str, int]
    dropped: dict[str, int]


@dataclass(frozen=True)
class EpisodeSummary:
    epochs_completed: int
    final_val_loss: float
    final_val_accuracy: float
    host_only_accuracy: float | None
    host_params: int
    total_params: int
    fossilized_params: int
    wall_time_s: float
    # The run's headline numbers by name when they are not accuracies (an RL run's final mean
    # return, its episode length): karn_otel.init fills it from the task's profile.
    final_metrics: dict[str, float] = field(default_factory=dict)
    task_type: str | None = None


Payload = Union[
    EpisodeContext,
    HostBaseline,
    SlotSnapshot,
    HostSnapshot,
    PolicySnapshot,
    PPOUpdateStats,
    ControllerDecision,
    StageTransition,
    GateEvaluationTrace,
    BatchMetrics,
    DenseTrace,
    CounterfactualMatrix,
    HealthAlert,
    ModeChange,
    TelemetryStats,
    Scalars,
    RankHealthSummary,
    EpisodeSummary,
]

PAYLOAD_TYPES: dict[TelemetryEventType, type] = {
    TelemetryEventType.EPISODE_STARTED: EpisodeContext,
    TelemetryEventType.HOST_BASELINE: HostBaseline,
    TelemetryEventType.SLOT_SNAPSHOT: SlotSnapshot,
    TelemetryEventType.HOST_SNAPSHOT: HostSnapshot,
    TelemetryEventType.POLICY_SNAPSHOT: PolicySnapshot,
    TelemetryEventType.PPO_UPDATE: PPOUpdateStats,
    TelemetryEventType.CONTROLLER_DECISION: ControllerDecision,
    TelemetryEventType.STAGE_TRANSITION: StageTransition,
    TelemetryEventType.GATE_EVALUATION: GateEvaluationTrace,
    TelemetryEventType.BATCH_METRICS: BatchMetrics,
    TelemetryEventType.DENSE_TRACE: DenseTrace,
    TelemetryEventType.COUNTERFACTUAL: CounterfactualMatrix,
    TelemetryEventType.HEALTH_ALERT: HealthAlert,
    TelemetryEventType.MODE_CHANGE: ModeChange,
    TelemetryEventType.TELEMETRY_STATS: TelemetryStats,
    TelemetryEventType.SCALARS: Scalars,
    TelemetryEventType.RANK_SUMMARY: RankHealthSummary,
    TelemetryEventType.EPISODE_ENDED: EpisodeSummary,
}
EVENT_TYPE_OF: dict[type, TelemetryEventType] = {cls: et for et, cls in PAYLOAD_TYPES.items()}


@dataclass(frozen=True)
class TelemetryEvent:
    """The envelope of every record (review P0 #2: rank, world_size, is_reduced from day one)."""

    event_type: TelemetryEventType
    run_id: str
    episode_id: str
    epoch: int
    timestamp: float  # unix seconds
    payload: Payload
    rank: int = 0
    world_size: int = 1
    is_reduced: bool = False
    schema_version: int = SCHEMA_VERSION


# --------------------------------------------------------------------------- encoding lives in codec

_MOVED_TO_CODEC = frozenset(
    {
        "ContractDecodeError",
        "event_from_dict",
        "event_from_json",
        "event_to_dict",
        "event_to_json",
        "from_json",
        "from_jsonable",
        "to_json",
        "to_jsonable",
        "type_hints",
    }
)


def __getattr__(name: str) -> Any:
    """Backwards compatibility: the JSON codec moved to :mod:`karn_otel.codec`."""
    if name in _MOVED_TO_CODEC:
        from karn_otel import codec

        return getattr(codec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
