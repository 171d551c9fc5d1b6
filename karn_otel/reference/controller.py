"""Tamiyo's role: the controller that decides, once per epoch, what happens to seeds.

``HeuristicController`` is the default and the shadow baseline the PPO policy is compared
against. A controller sees a :class:`ControllerObservation` and returns a
:class:`FactoredAction` with a one-line reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from karn_otel.contracts import ActionOp, FactoredAction, SeedStage


@dataclass(frozen=True)
class SlotView:
    slot_id: str
    stage: SeedStage
    epochs_in_stage: int
    alpha: float
    # Removal cost (fraction), None when not measured. Under RunConfig.attribution_split it is
    # measured on the decision examples, never on the attribution examples that are reported.
    contribution: float | None
    consecutive_gate_failures: int
    seed_params: int


@dataclass(frozen=True)
class ControllerObservation:
    epoch: int
    max_epochs: int
    val_accuracy: float
    val_loss: float
    accuracy_history: tuple[float, ...]  # val accuracy per epoch so far, oldest first
    slots: tuple[SlotView, ...]
    host_params: int


@dataclass(frozen=True)
class HeuristicConfig:
    warmup_epochs: int = 2  # let the host learn before growing anything
    plateau_window: int = 2  # epochs over which improvement is measured
    plateau_threshold: float = 0.01  # germinate when accuracy improved less than this (fraction)
    max_gate_failures: int = 4  # cull a seed stuck at a gate this many epochs
    probation_epochs: int = 2
    blueprint_for_slot: dict[str, str] = field(
        default_factory=lambda: {"early": "conv_light", "mid": "attention", "late": "norm"}
    )
    germination_order: tuple[str, ...] = ("mid", "late", "early")


class HeuristicController:
    """Grow one seed at a time on plateaus; fossilize seeds that pay, cull those that don't."""

    name = "heuristic"

    def __init__(self, config: HeuristicConfig | None = None) -> None:
        self.config = config or HeuristicConfig()

    def decide(self, obs: ControllerObservation) -> tuple[FactoredAction, str]:
        cfg = self.config
        for s in obs.slots:
            if s.stage is SeedStage.PROBATIONARY and s.epochs_in_stage >= cfg.probation_epochs:
                if s.contribution is not None and s.contribution > 0:
                    return FactoredAction(ActionOp.FOSSILIZE, s.slot_id), (
                        f"{s.slot_id} served probation, removal cost {100 * s.contribution:+.2f} pts"
                    )
                return FactoredAction(ActionOp.CULL, s.slot_id), f"{s.slot_id} does not pay for itself"
            if (
                s.stage in (SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.PROBATIONARY)
                and s.consecutive_gate_failures >= cfg.max_gate_failures
            ):
                return FactoredAction(ActionOp.CULL, s.slot_id), (
                    f"{s.slot_id} failed its gate {s.consecutive_gate_failures} times in a row"
                )
        growing = any(s.stage in (SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING) for s in obs.slots)
        if obs.epoch < cfg.warmup_epochs or growing:
            return FactoredAction(ActionOp.WAIT), "warming up" if obs.epoch < cfg.warmup_epochs else "a seed is growing"
        hist = obs.accuracy_history
        if len(hist) > cfg.plateau_window:
            gain = hist[-1] - hist[-1 - cfg.plateau_window]
            if gain < cfg.plateau_threshold:
                dormant = {s.slot_id for s in obs.slots if s.stage is SeedStage.DORMANT}
                for slot_id in cfg.germination_order:
                    if slot_id in dormant:
                        bp = cfg.blueprint_for_slot.get(slot_id, "conv_light")
                        return FactoredAction(ActionOp.GERMINATE, slot_id, bp), (
                            f"plateau: {100 * gain:+.2f} pts over {cfg.plateau_window} epochs"
                        )
        return FactoredAction(ActionOp.WAIT), "still improving"


class NoGrowthController:
    """Never grows a seed: trains the host alone (reference curves, host-only controls)."""

    name = "none"

    def decide(self, obs: ControllerObservation) -> tuple[FactoredAction, str]:
        return FactoredAction(ActionOp.WAIT), "host-only run"
