"""Kasmina's role: seed slots, blueprints, the lifecycle and its gates G0-G5.

A slot sits between two host blocks and computes ``x + alpha * seed(x)``. A seed moves
DORMANT -> GERMINATED -> TRAINING -> BLENDING -> PROBATIONARY -> FOSSILIZED, or is CULLED
(and the slot returns to DORMANT). Each move is checked by a gate that passes or fails
with a reason; every gate evaluation and stage transition is reported to Karn.

Gradient isolation (TRAINING): the seed learns while the host's forward pass is untouched.
The slot returns ``x + (s - s.detach())`` (value exactly ``x``; gradient as if alpha were 1
for the seed), and the seed's input passes an isolation gate whose backward lets through
``leak`` times the gradient (0 by design) and accumulates the squared norm of what it let
through on the device. That accumulator is the *measured* isolation leakage: a bug that
lets gradient reach the host through the seed shows up as a non-zero number.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from karn_otel import emit
from karn_otel.contracts import GateEvaluationTrace, SeedStage, StageTransition

BLUEPRINTS = ("conv_light", "attention", "norm")
ACTIVE_STAGES = (SeedStage.BLENDING, SeedStage.PROBATIONARY, SeedStage.FOSSILIZED)  # alpha > 0


# ---------------------------------------------------------------------- blueprints


class ConvLightSeed(nn.Module):
    """Depthwise-separable conv; the pointwise layer starts at zero so the seed starts silent."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.pw.weight)
        nn.init.zeros_(self.pw.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(torch.relu(self.dw(x)))


class AttentionSeed(nn.Module):
    """Channel attention (squeeze-excite style) producing a gated residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        hidden = max(2, c // 2)
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.tanh(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


class NormSeed(nn.Module):
    """A per-sample normalisation with zero-initialised affine parameters (2c parameters)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, c)
        nn.init.zeros_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def build_seed(blueprint: str, channels: int) -> nn.Module:
    if blueprint == "conv_light":
        return ConvLightSeed(channels)
    if blueprint == "attention":
        return AttentionSeed(channels)
    if blueprint == "norm":
        return NormSeed(channels)
    raise ValueError(f"unknown blueprint {blueprint!r}; known: {BLUEPRINTS}")


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------- isolation


class _IsolationGate(torch.autograd.Function):
    """Identity forward; backward passes ``leak * grad`` and meters its squared norm."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, leak: float, meter: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.leak = leak
        ctx.meter = meter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        passed = grad * ctx.leak
        ctx.meter.add_(passed.detach().pow(2).sum())  # stays on the device: no sync
        return passed, None, None


# ---------------------------------------------------------------------- lifecycle config


@dataclass(frozen=True)
class LifecycleConfig:
    min_training_epochs: int = 2  # G2: epochs of isolated training before blending
    blend_epochs: int = 3  # alpha ramps 1/blend_epochs per epoch
    probation_epochs: int = 2  # G4: epochs at alpha=1 before fossilization may be asked
    min_fossilize_contribution: float = 0.0  # G5: removal cost (fraction) that must be exceeded
    max_seed_param_fraction: float = 1.0  # G0: seed params <= this * host params
    max_blend_loss_increase: float = 0.25  # G3: relative val-loss increase tolerated by blending
    leak: float = 0.0  # isolation leak factor; > 0 only for fault injection


# ---------------------------------------------------------------------- the slot


class SeedSlot(nn.Module):
    def __init__(self, slot_id: str, channels: int, lifecycle: LifecycleConfig) -> None:
        super().__init__()
        self.slot_id = slot_id
        self.channels = channels
        self.lifecycle = lifecycle
        self.seed: nn.Module | None = None
        self.seed_id: str | None = None
        self.blueprint_id: str | None = None
        self.stage = SeedStage.DORMANT
        self.epochs_in_stage = 0
        self.alpha = 0.0
        self._forced_alpha: float | None = None
        self.register_buffer("leak_meter", torch.zeros(()), persistent=False)
        # Attribution and gate bookkeeping (plain floats, set once per epoch by the trainer).
        # Reported removal cost (the emitted matrix's; attribution examples under a split) ...
        self.counterfactual_contribution: float | None = None
        # ... and the one the gates (G5) and the controller decide on (the decision examples
        # under RunConfig.attribution_split; without a split the two are the same number).
        self.decision_contribution: float | None = None
        self.accuracy_at_germination: float | None = None
        self.val_loss_at_blend_start: float | None = None
        self.last_contribution: float | None = None
        self.last_gate: tuple[str, bool, str] | None = None
        self.last_gate_trace: GateEvaluationTrace | None = None
        self.consecutive_gate_failures = 0
        self._n_germinated = 0

    # -- forward ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.seed is None or self.stage in (SeedStage.DORMANT, SeedStage.GERMINATED, SeedStage.CULLED):
            return x
        forced = self._forced_alpha
        if forced is not None:
            return x if forced == 0.0 else x + forced * self.seed(x)
        if self.stage is SeedStage.TRAINING:
            s = self.seed(_IsolationGate.apply(x, self.lifecycle.leak, self.leak_meter))
            return x + (s - s.detach())
        return x + self.alpha * self.seed(x)

    @contextlib.contextmanager
    def force_alpha(self, value: float) -> Iterator[None]:
        """Temporarily override the blend (0.0 = this seed off) for counterfactual passes."""
        previous = self._forced_alpha
        self._forced_alpha = float(value)
        try:
            yield
        finally:
            self._forced_alpha = previous

    @property
    def is_active(self) -> bool:
        """Contributes to the forward pass (alpha > 0)."""
        return self.seed is not None and self.stage in ACTIVE_STAGES

    @property
    def is_isolated(self) -> bool:
        return self.seed is not None and self.stage is SeedStage.TRAINING

    @property
    def seed_params(self) -> int:
        return 0 if self.seed is None else count_params(self.seed)

    # -- lifecycle ----------------------------------------------------------------------

    def _gate(
        self,
        gate: str,
        passed: bool,
        reason: str,
        to_stage: SeedStage | None,
        measurements: dict[str, float] | None = None,
        thresholds: dict[str, float] | None = None,
    ) -> bool:
        self.last_gate = (gate, passed, reason)
        self.consecutive_gate_failures = 0 if passed else self.consecutive_gate_failures + 1
        self.last_gate_trace = GateEvaluationTrace(
            gate=gate,
            slot_id=self.slot_id,
            seed_id=self.seed_id,
            passed=passed,
            reason=reason,
            from_stage=self.stage,
            to_stage=to_stage if passed else None,
            measurements=measurements or {},
            thresholds=thresholds or {},
        )
        emit(self.last_gate_trace)
        return passed

    def _transition(self, to: SeedStage, reason: str) -> None:
        emit(StageTransition(self.slot_id, self.seed_id, self.blueprint_id, self.stage, to, reason))
        self.stage = to
        self.epochs_in_stage = 0

    def germinate(self, blueprint: str, host_params: int, val_accuracy: float) -> nn.Module | None:
        """G0. Returns the new seed module (the trainer gives it an optimizer) or None."""
        if self.stage is not SeedStage.DORMANT:
            self._gate("G0", False, f"slot is {self.stage.value}, not DORMANT", SeedStage.GERMINATED)
            return None
        if blueprint not in BLUEPRINTS:
            self._gate("G0", False, f"unknown blueprint {blueprint!r}", SeedStage.GERMINATED)
            return None
        seed = build_seed(blueprint, self.channels)
        n, limit = count_params(seed), self.lifecycle.max_seed_param_fraction * host_params
        if not self._gate(
            "G0",
            n <= limit,
            f"{n} params {'within' if n <= limit else 'over'} budget {limit:.0f}",
            SeedStage.GERMINATED,
            {"seed_params": float(n)},
            {"max_seed_params": float(limit)},
        ):
            return None
        self._n_germinated += 1
        self.seed_id = f"{self.slot_id}-{blueprint}-{self._n_germinated}"
        self.blueprint_id = blueprint
        self.seed = seed
        self.alpha = 0.0
        self.accuracy_at_germination = val_accuracy
        self.last_contribution = None
        self.counterfactual_contribution = None
        self.decision_contribution = None
        self._transition(SeedStage.GERMINATED, f"G0 passed: {blueprint}")
        return seed

    def try_fossilize(self) -> bool:
        """G4 (probation served) then G5 (positive contribution, on the decision examples)."""
        lc = self.lifecycle
        if self.stage is not SeedStage.PROBATIONARY:
            return self._gate("G4", False, f"seed is {self.stage.value}, not PROBATIONARY", SeedStage.FOSSILIZED)
        if not self._gate(
            "G4",
            self.epochs_in_stage >= lc.probation_epochs,
            f"probation {self.epochs_in_stage}/{lc.probation_epochs} epochs",
            SeedStage.FOSSILIZED,
            {"epochs_in_stage": float(self.epochs_in_stage)},
            {"probation_epochs": float(lc.probation_epochs)},
        ):
            return False
        c = self.decision_contribution
        ok = c is not None and c > lc.min_fossilize_contribution
        reason = "no counterfactual measured" if c is None else f"removal cost {100 * c:+.2f} pts"
        if not self._gate(
            "G5",
            ok,
            reason,
            SeedStage.FOSSILIZED,
            {"contribution": float("nan") if c is None else c},
            {"min_contribution": lc.min_fossilize_contribution},
        ):
            return False
        self._transition(SeedStage.FOSSILIZED, f"G5 passed: {reason}")
        return True

    def cull(self, reason: str) -> bool:
        if self.seed is None or self.stage in (SeedStage.FOSSILIZED, SeedStage.CULLED):
            return False
        self._transition(SeedStage.CULLED, reason)
        self.alpha = 0.0
        return True

    def step_epoch(self, val_loss: float, seed_grad_norm: float) -> None:
        """Advance the automatic part of the lifecycle (G1-G3, alpha schedule) at epoch end."""
        lc = self.lifecycle
        self.epochs_in_stage += 1
        if self.stage is SeedStage.CULLED:
            # The culled seed is dropped; the slot is free again next epoch.
            self.seed, self.seed_id, self.blueprint_id = None, None, None
            self.counterfactual_contribution = None
            self.decision_contribution = None
            self._transition(SeedStage.DORMANT, "slot freed after cull")
        elif self.stage is SeedStage.GERMINATED:
            probe = torch.zeros(1, self.channels, 4, 4)
            with torch.no_grad():
                out = self.seed(probe)  # type: ignore[misc]
            ok = out.shape == probe.shape and bool(torch.isfinite(out).all())
            if self._gate(
                "G1", ok, "seed output finite and shape-preserving" if ok else "bad seed output", SeedStage.TRAINING
            ):
                self._transition(SeedStage.TRAINING, "G1 passed")
        elif self.stage is SeedStage.TRAINING and self.epochs_in_stage >= lc.min_training_epochs:
            # Gates are attempted only once their time is served, so a failure is a real failure.
            ok = math.isfinite(seed_grad_norm) and seed_grad_norm > 0
            if ok:
                reason = f"trained {self.epochs_in_stage} epochs, grad norm {seed_grad_norm:.3g}"
            else:
                reason = f"seed gradient unusable ({seed_grad_norm})"
            if self._gate(
                "G2",
                ok,
                reason,
                SeedStage.BLENDING,
                {"epochs_in_stage": float(self.epochs_in_stage), "seed_grad_norm": seed_grad_norm},
                {"min_training_epochs": float(lc.min_training_epochs)},
            ):
                self._transition(SeedStage.BLENDING, "G2 passed")
                self.val_loss_at_blend_start = val_loss
                self.alpha = 1.0 / lc.blend_epochs
        elif self.stage is SeedStage.BLENDING:
            if self.alpha < 1.0:
                self.alpha = min(1.0, round(self.alpha + 1.0 / lc.blend_epochs, 9))
            else:
                start = self.val_loss_at_blend_start or val_loss
                rel = (val_loss - start) / max(start, 1e-12)
                ok = rel <= lc.max_blend_loss_increase
                if self._gate(
                    "G3",
                    ok,
                    f"val loss {100 * rel:+.1f}% over blending",
                    SeedStage.PROBATIONARY,
                    {"relative_loss_change": rel},
                    {"max_relative_increase": lc.max_blend_loss_increase},
                ):
                    self._transition(SeedStage.PROBATIONARY, "G3 passed")
