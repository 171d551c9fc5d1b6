"""MorphogeneticAnalytics: the research questions, answered from the TelemetryStore.

"Is it winning?" is answered against the *host-only* accuracy: the model with every seed's
alpha forced to 0, measured each epoch by the counterfactual pass (the all-off
configuration) and at episode end by the host baseline. Accuracies are fractions in [0, 1];
deltas are fractions too (0.049 = +4.9 points). Pure Python: no torch, no OTel.
"""

from __future__ import annotations

from dataclasses import dataclass

from karn_otel.contracts import CounterfactualMatrix, ShapleyEstimate
from karn_otel.store import TelemetryStore


@dataclass(frozen=True)
class SeedContributionSummary:
    slot_id: str
    blueprint_id: str | None
    seed_params: int
    contribution: float | None  # Shapley mean if available, else removal cost (fraction)
    ci_low: float | None
    ci_high: float | None
    source: str  # "shapley" | "removal_cost" | "none"

    @property
    def efficiency(self) -> float | None:
        """Contribution in accuracy points per 10K seed parameters (the spec dashboard's unit)."""
        if self.contribution is None or self.seed_params <= 0:
            return None
        return 100.0 * self.contribution / (self.seed_params / 1e4)

    @property
    def helps(self) -> bool:
        """The claim gate: helpful only when the interval's lower bound is above 0."""
        return self.ci_low is not None and self.ci_low > 0


class MorphogeneticAnalytics:
    def __init__(self, store: TelemetryStore) -> None:
        self.store = store

    # === Claim 1: accuracy ===

    @property
    def current_accuracy(self) -> float | None:
        h = self.store.latest_host()
        return None if h is None else h.val_accuracy

    def host_only_accuracy(self) -> float | None:
        """Latest host-only accuracy: this epoch's all-off configuration, else the baseline."""
        cf = self.store.latest_counterfactual()
        h = self.store.latest_host()
        if cf is not None and (h is None or cf.epoch >= h.epoch):  # never a stale matrix
            acc = all_off_accuracy(cf)
            if acc is not None:
                return acc
        b = self.store.baseline
        if b is not None and b.final_host_only_accuracy is not None:
            return b.final_host_only_accuracy
        # No seed has ever been active: the model *is* the host.
        if h is not None and h.total_seed_params == 0:
            return h.val_accuracy
        return None

    def accuracy_delta(self) -> float | None:
        """Current accuracy minus host-only accuracy (fraction); None when unknown."""
        cur, base = self.current_accuracy, self.host_only_accuracy()
        return None if cur is None or base is None else cur - base

    # === Claim 2: parameter efficiency ===

    def param_ratio(self) -> float | None:
        """Total parameters / host parameters."""
        h = self.store.latest_host()
        return None if h is None or h.host_params <= 0 else h.total_params / h.host_params

    def params_efficiency_ratio(self) -> float | None:
        """Accuracy per parameter vs the host-only model. > 1.0 = winning."""
        h = self.store.latest_host()
        base = self.host_only_accuracy()
        if h is None or base is None or base <= 0 or h.total_params <= 0 or h.host_params <= 0:
            return None
        return (h.val_accuracy / (h.total_params / 1e6)) / (base / (h.host_params / 1e6))

    # === Causal attribution ===

    def seed_contributions(self) -> dict[str, SeedContributionSummary]:
        """Per-slot attribution: Shapley with its interval when measured, else removal cost."""
        cf = self.store.latest_counterfactual()
        out: dict[str, SeedContributionSummary] = {}
        for slot_id, s in self.store.slots().items():
            if s.seed_id is None:
                continue
            est: ShapleyEstimate | None = None
            if cf is not None and cf.shapley_values and slot_id in cf.shapley_values:
                est = cf.shapley_values[slot_id]
            if est is not None:
                out[slot_id] = SeedContributionSummary(
                    slot_id, s.blueprint_id, s.seed_params, est.mean, est.ci_low, est.ci_high, "shapley"
                )
            else:
                c = s.counterfactual_contribution
                out[slot_id] = SeedContributionSummary(
                    slot_id, s.blueprint_id, s.seed_params, c, None, None, "removal_cost" if c is not None else "none"
                )
        return out


def all_off_accuracy(cf: CounterfactualMatrix) -> float | None:
    for r in cf.configs:
        if not any(r.config):
            return r.val_accuracy
    return None
