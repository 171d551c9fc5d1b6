"""Dense-trace windows: when to capture Tier 3 (spec "Tier 3: Dense Traces", "Operating Modes").

:class:`DenseTriggerEngine` is a collector processor implementing the spec's *Adaptive
Escalation*: start in Standard mode; on an anomaly (any enabled condition of
:class:`~karn_otel.config.DenseTraceTrigger`) return ``ModeChange(RESEARCH, reason)`` and
open a dense window; once an epoch closes (its ``HOST_SNAPSHOT``) with no anomaly, return
``ModeChange(STANDARD, "resolved: ...")``. With ``force_dense=True`` (the spec's Research
mode) it switches to RESEARCH once per episode and stays there.

It only decides windows; the torch-side code (``karn_otel/torch/``) reads ``mode`` /
``window_reason`` / ``window_start_epoch`` and assembles the :class:`DenseTrace`.

Thresholds: the loss-spike, accuracy-drop and gradient-explosion multiples come from the
``DenseTraceTrigger`` (the user's trigger configuration; its defaults equal the health
defaults, see :mod:`karn_otel.health`). Value and entropy collapse, for which the trigger
only has on/off switches, and the rolling window use :class:`HealthThresholds`; the checks
themselves are the health module's functions, so a dense window and a health alert can
never disagree about what a "spike" is. Imports neither torch nor opentelemetry.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import cast

from karn_otel.config import DenseTraceTrigger
from karn_otel.contracts import (
    HostSnapshot,
    ModeChange,
    OperatingMode,
    PPOUpdateStats,
    TelemetryEvent,
    TelemetryEventType,
)
from karn_otel.health import (
    DEFAULT_THRESHOLDS,
    Finding,
    GuardedProcessor,
    HealthMonitor,
    HealthThresholds,
    HostHistory,
    host_findings,
    ppo_findings,
)

__all__ = ["ANOMALY_REASONS", "DenseTriggerEngine", "DenseWindow"]

log = logging.getLogger("karn")
ET = TelemetryEventType

ANOMALY_REASONS: tuple[str, ...] = (
    "stage_transition",
    "loss_spike",
    "accuracy_drop",
    "gradient_explosion",
    "gate_failure",
    "value_collapse",
    "entropy_collapse",
    "force_dense",
)
"""Every reason a window can open for (DenseTraceTrigger field order): a bounded label set."""

_POLICY_REASONS = ("value_collapse", "entropy_collapse")
_WATCHED = frozenset({ET.EPISODE_STARTED, ET.HOST_SNAPSHOT, ET.PPO_UPDATE, ET.STAGE_TRANSITION, ET.GATE_EVALUATION})


@dataclass(frozen=True)
class DenseWindow:
    """A closed dense window: epochs ``start_epoch``..``end_epoch`` inclusive."""

    reason: str  # the first reason, one of ANOMALY_REASONS (DenseTrace.trigger_reason)
    reasons: tuple[str, ...]  # every reason seen while the window was open, first-seen order
    start_epoch: int
    end_epoch: int


class DenseTriggerEngine(GuardedProcessor):
    """Decides when dense-trace windows open and close; a collector processor.

    ``mode`` is the configured operating mode: ``OperatingMode.RESEARCH`` behaves like
    ``force_dense=True`` (dense always). ``min_window_epochs`` is the shortest window in
    epochs, counting its opening epoch (default 1: the first clean epoch closes it);
    ``clean_epochs_to_resolve`` is how many consecutive anomaly-free epochs close it
    (default 1). ``head_sizes`` (head -> number of actions) sets relative entropy floors as
    in :class:`~karn_otel.health.HealthMonitor`.

    Anomalies from events (stage transitions, gate failures) and from the epoch's host
    snapshot mark only the epoch they occur in. Value and entropy collapse are *states* of
    the policy: they stay active until a later PPO update no longer shows them, so a
    collapsed critic keeps the window open across epochs without PPO updates.
    """

    WATCHED = _WATCHED

    def __init__(
        self,
        trigger: DenseTraceTrigger,
        thresholds: HealthThresholds = DEFAULT_THRESHOLDS,
        mode: OperatingMode = OperatingMode.STANDARD,
        *,
        min_window_epochs: int = 1,
        clean_epochs_to_resolve: int = 1,
        head_sizes: Mapping[str, int] | None = None,
        strict: bool = False,
        health: HealthMonitor | None = None,
    ) -> None:
        if not isinstance(trigger, DenseTraceTrigger):
            raise TypeError(f"trigger must be a DenseTraceTrigger, got {type(trigger).__name__}")
        if not isinstance(thresholds, HealthThresholds):
            raise TypeError(f"thresholds must be a HealthThresholds, got {type(thresholds).__name__}")
        if not isinstance(mode, OperatingMode):
            raise TypeError(f"mode must be an OperatingMode, got {mode!r}")
        for name, v in (("min_window_epochs", min_window_epochs), ("clean_epochs_to_resolve", clean_epochs_to_resolve)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.trigger = trigger
        # The trigger's own multiples win over the health defaults for the host anomalies.
        self.thresholds = replace(
            thresholds,
            loss_spike_ratio=trigger.loss_spike_threshold,
            accuracy_drop_points=trigger.accuracy_drop_threshold,
            gradient_explosion_ratio=trigger.gradient_explosion,
        )
        self.configured_mode = mode
        self.min_window_epochs = min_window_epochs
        self.clean_epochs_to_resolve = clean_epochs_to_resolve
        self.head_sizes = dict(head_sizes or {})
        # With a monitor (the pipeline's, which runs first) the shared checks are evaluated
        # once, by the monitor; the engine applies its own thresholds to the findings' values.
        self.health = health
        super().__init__(strict)
        self._reset()

    # ------------------------------------------------------------------ state

    @property
    def always_dense(self) -> bool:
        """True in the spec's Research mode (force_dense or mode=RESEARCH)."""
        return self.trigger.force_dense or self.configured_mode is OperatingMode.RESEARCH

    @property
    def dense_active(self) -> bool:
        """Whether dense capture is on now (the torch side polls this per batch)."""
        return self.mode is OperatingMode.RESEARCH

    def _reset(self) -> None:
        self.mode = OperatingMode.STANDARD
        self.window_reason: str | None = None
        self.window_reasons: tuple[str, ...] = ()
        self.window_start_epoch: int | None = None
        self.last_closed_window: DenseWindow | None = None
        self._history = HostHistory(self.thresholds.rolling_window_epochs)
        self._policy_anomalies: tuple[str, ...] = ()  # from the latest PPO update
        self._anomaly_this_epoch = False
        self._clean_epochs = 0
        self._started = False

    # ------------------------------------------------------------------ detection

    def anomalies(self, event: TelemetryEvent) -> list[str]:
        """The reasons (from :data:`ANOMALY_REASONS`) ``event`` shows, given the history so far.

        Pure: reads the rolling baselines but changes nothing. Disabled conditions of the
        trigger are never reported. A non-finite train loss counts as a loss spike (the
        limit of one): the window around a divergence is the one most worth having.
        """
        et, p, t = getattr(event, "event_type", None), getattr(event, "payload", None), self.trigger
        out: list[str] = []
        if et is ET.HOST_SNAPSHOT and getattr(event, "is_reduced", False):
            return out  # the job-wide snapshot is not this rank's: no rank-local anomaly in it
        if et is ET.HOST_SNAPSHOT or et is ET.PPO_UPDATE:
            # One evaluation of the shared checks: the pipeline's health monitor (which runs
            # first) has the findings; a standalone engine evaluates them with its own history.
            findings = self.health.last_findings_for(event) if self.health is not None else None
            if findings is None:
                if et is ET.HOST_SNAPSHOT:
                    findings = tuple(host_findings(cast(HostSnapshot, p), self._history, self.thresholds))
                else:
                    findings = tuple(ppo_findings(cast(PPOUpdateStats, p), self.thresholds, self.head_sizes))
            return self._anomalies_from(findings, p)
        if et is ET.STAGE_TRANSITION:
            if t.stage_transition:
                out.append("stage_transition")
        elif et is ET.GATE_EVALUATION and t.gate_failure and getattr(p, "passed", True) is False:
            out.append("gate_failure")
        return out

    def _anomalies_from(self, findings: tuple[Finding, ...], p: object) -> list[str]:
        """The host/PPO anomalies from the checks' findings, at this engine's limits (the
        findings' own ``failing`` uses the health thresholds; the trigger's may differ)."""
        th, t = self.thresholds, self.trigger
        by: dict[str, Finding] = {}
        for f in findings:  # a loop, not a comprehension: no extra code object per epoch
            by[f.check] = f
        out: list[str] = []
        spike = by.get("loss_spike")
        if (spike is not None and spike.value > th.loss_spike_ratio) or _non_finite(getattr(p, "train_loss", None)):
            out.append("loss_spike")
        drop = by.get("accuracy_drop")
        if drop is not None and drop.value > th.accuracy_drop_points:
            out.append("accuracy_drop")
        grad = by.get("gradient_explosion")
        if grad is not None and grad.value > th.gradient_explosion_ratio:
            out.append("gradient_explosion")
        for name, enabled in (("value_collapse", t.value_collapse), ("entropy_collapse", t.entropy_collapse)):
            collapse = by.get(name)
            if enabled and collapse is not None and collapse.failing:
                out.append(name)
        return out

    # ------------------------------------------------------------------ processor

    def _observe(self, event: TelemetryEvent) -> list[ModeChange]:
        et, epoch = event.event_type, event.epoch
        out: list[ModeChange] = []
        if et is ET.EPISODE_STARTED:
            self._reset()
        if not self._started:
            # Also covers an engine registered mid-episode: force_dense still switches once.
            self._started = True
            if self.always_dense:
                self._open(("force_dense",), epoch)
                return [ModeChange(OperatingMode.RESEARCH, "force_dense")]
        if et is ET.EPISODE_STARTED or self.always_dense:
            return out  # Research mode: dense always, windows never close

        reasons = self.anomalies(event)
        if self.health is None and isinstance(event.payload, HostSnapshot) and not event.is_reduced:
            self._history.update(event.payload)
        elif et is ET.PPO_UPDATE:
            self._policy_anomalies = tuple(r for r in reasons if r in _POLICY_REASONS)
        if reasons:
            self._anomaly_this_epoch = True
            if self.mode is OperatingMode.STANDARD:
                self._open(tuple(reasons), epoch)
                out.append(ModeChange(OperatingMode.RESEARCH, ", ".join(reasons)))
            else:
                self.window_reasons += tuple(r for r in reasons if r not in self.window_reasons)

        if et is ET.HOST_SNAPSHOT:  # the epoch closes here
            clean = not self._anomaly_this_epoch and not self._policy_anomalies
            self._anomaly_this_epoch = False
            if self.mode is OperatingMode.RESEARCH:
                self._clean_epochs = self._clean_epochs + 1 if clean else 0
                start = self.window_start_epoch if self.window_start_epoch is not None else epoch
                long_enough = epoch - start + 1 >= self.min_window_epochs
                if self._clean_epochs >= self.clean_epochs_to_resolve and long_enough:
                    out.append(self._close(epoch))
        return out

    def _open(self, reasons: tuple[str, ...], epoch: int) -> None:
        self.mode = OperatingMode.RESEARCH
        self.window_reason = reasons[0]
        self.window_reasons = reasons
        self.window_start_epoch = epoch
        self._clean_epochs = 0

    def _close(self, epoch: int) -> ModeChange:
        reasons = self.window_reasons
        start = self.window_start_epoch if self.window_start_epoch is not None else epoch
        self.last_closed_window = DenseWindow(self.window_reason or "", reasons, start, epoch)
        self.mode = OperatingMode.STANDARD
        self.window_reason = None
        self.window_reasons = ()
        self.window_start_epoch = None
        self._clean_epochs = 0
        return ModeChange(OperatingMode.STANDARD, "resolved: " + ", ".join(reasons))


def _non_finite(x: object) -> bool:
    if type(x) is float:  # what a validated payload holds
        return x - x != 0.0
    if isinstance(x, bool) or x is None:
        return False
    try:
        return not math.isfinite(float(x))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return False
