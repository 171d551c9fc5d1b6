"""MorphogeneticAnalytics: the research questions, answered from the TelemetryStore.

"Is it winning?" is answered against the *host-only* accuracy: the model with every seed's
alpha forced to 0, measured each epoch by the counterfactual pass (the all-off
configuration) and at episode end by the host baseline. Accuracies are fractions in [0, 1];
deltas are fractions too (0.049 = +4.9 points). Pure Python: no torch, no OTel.
"""

from __future__ import annotations

import bisect
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from karn_otel.claims import ALPHA, Claim, final_verdict, live_claim, live_claim_chain
from karn_otel.contracts import ActionOp, CounterfactualMatrix, CounterfactualResult, ShapleyEstimate
from karn_otel.pipeline import HealthSource
from karn_otel.store import TelemetryStore

if TYPE_CHECKING:  # health.py is not imported at run time here
    from karn_otel.health import HealthReport


@dataclass(frozen=True)
class SeedContributionSummary:
    slot_id: str
    blueprint_id: str | None
    seed_params: int
    contribution: float | None  # Shapley mean if available, else removal cost (fraction)
    ci_low: float | None  # descriptive per-epoch interval (not a claim)
    ci_high: float | None
    source: str  # "shapley" | "removal_cost" | "none"
    # The claim rule's outcome (karn_otel.claims): the live alpha-spending rule during the
    # episode, the final-epoch Holm verdict once it has ended; None without an interval.
    claim: Claim | None = None
    # The blend alpha the contribution was measured at (the matrix's all-on configuration):
    # a blending seed advances after its epoch's matrix, so its snapshot's alpha is the next
    # one. None when no matrix names the slot.
    measured_alpha: float | None = None

    @property
    def efficiency(self) -> float | None:
        """Contribution in accuracy points per 10K seed parameters (the spec dashboard's unit)."""
        if self.contribution is None or self.seed_params <= 0:
            return None
        return 100.0 * self.contribution / (self.seed_params / 1e4)

    @property
    def helps(self) -> bool:
        """The claim: made by a rule with a per-run false-claim rate <= 5% (``claim.rule``).

        Not ``ci_low > 0``: that descriptive check, made every epoch for every seed, claims a
        seed with no effect in most 100-epoch runs (docs/counterfactual-validity.md).
        """
        return self.claim is not None and self.claim.helps


@dataclass(frozen=True)
class PolicyComparisonSummary:
    """How the controller's decisions compare with the shadow heuristic's."""

    n_decisions: int  # decisions that have a shadow decision recorded
    agreement: float | None  # fraction where both chose the same FactoredAction
    op_agreement: float | None  # fraction where both chose the same op
    policy_ops: dict[str, float]  # op -> fraction of the controller's decisions
    heuristic_ops: dict[str, float]  # op -> fraction of the shadow heuristic's decisions


@dataclass(frozen=True)
class ReferenceCurve:
    """Host-only accuracy of traditional (seedless) models of several sizes.

    Produced by `karn calibrate`; ``points`` are (parameters, validation accuracy after
    ``epochs`` epochs) sorted by parameters; ``by_epoch[i]`` is point i's accuracy after
    epochs 1, 2, ..., ``epochs`` (empty in curves written before 2026-12-04). Used to answer
    "how big would a traditional model, trained as long, have to be?".
    """

    points: tuple[tuple[int, float], ...]
    epochs: int
    seed: int
    by_epoch: tuple[tuple[float, ...], ...] = ()

    @classmethod
    def load(cls, path: Path | str) -> ReferenceCurve:
        data = json.loads(Path(path).read_text())
        rows = [(int(p), float(a)) for p, a in data["points"]]
        curves = [tuple(float(x) for x in c) for c in data.get("by_epoch", ())]
        epochs = int(data["epochs"])
        if len(rows) < 2:
            raise ValueError(f"{path}: a reference curve needs at least 2 points")
        if curves and (len(curves) != len(rows) or any(len(c) != epochs for c in curves)):
            raise ValueError(f"{path}: by_epoch must hold {epochs} accuracies for each of the {len(rows)} points")
        order = sorted(range(len(rows)), key=lambda i: rows[i])
        return cls(
            tuple(rows[i] for i in order), epochs, int(data["seed"]), tuple(curves[i] for i in order) if curves else ()
        )

    def save(self, path: Path | str) -> None:
        data: dict[str, object] = {"points": self.points, "epochs": self.epochs, "seed": self.seed}
        if self.by_epoch:
            data["by_epoch"] = self.by_epoch
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

    def at_epoch(self, epoch: int) -> tuple[tuple[int, float], ...] | None:
        """(parameters, accuracy after ``epoch`` epochs) per size, or None when the curve
        does not cover that epoch: beyond its training length, or before it in a curve
        without per-epoch accuracies."""
        if epoch == self.epochs:
            return self.points
        if self.by_epoch and 1 <= epoch < self.epochs:
            return tuple((p, c[epoch - 1]) for (p, _), c in zip(self.points, self.by_epoch))
        return None

    def params_for_accuracy(self, accuracy: float, epoch: int | None = None) -> int | None:
        """Interpolated parameter count (log-linear in params) reaching ``accuracy`` after
        ``epoch`` epochs of training (default: the curve's full length).

        The curve is made monotone (running maximum of accuracy) first. None when the
        accuracy lies outside the measured range (extrapolating would be a guess) or the
        curve does not cover ``epoch`` (:meth:`at_epoch`).
        """
        points = self.points if epoch is None else self.at_epoch(epoch)
        if points is None:
            return None
        params = [p for p, _ in points]
        accs: list[float] = []
        for _, a in points:
            accs.append(max(a, accs[-1]) if accs else a)
        if accuracy < accs[0] or accuracy > accs[-1]:
            return None
        i = bisect.bisect_left(accs, accuracy)
        if accs[i] == accuracy or i == 0:
            return params[i]
        a0, a1 = accs[i - 1], accs[i]
        t = (accuracy - a0) / (a1 - a0)
        return int(round(math.exp(math.log(params[i - 1]) + t * (math.log(params[i]) - math.log(params[i - 1])))))


class MorphogeneticAnalytics:
    """The spec's analytics API over a TelemetryStore.

    ``health`` is the collector's HealthMonitor (for training_health); ``reference_curve``
    the `karn calibrate` output (for equivalent_traditional_params).
    """

    def __init__(
        self, store: TelemetryStore, health: HealthSource | None = None, reference_curve: ReferenceCurve | None = None
    ) -> None:
        self.store = store
        self.health = health
        self.reference_curve = reference_curve
        # (slot, threshold) -> the live chain so far: [(epoch, id of the estimate, claim)]
        self._chains: dict[tuple[str, float], list[tuple[int, int, Claim]]] = {}

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

    def accuracy_trajectory(self) -> list[tuple[int, float, float]]:
        """(epoch, morphogenetic accuracy, host-only accuracy) for every epoch in memory.

        Host-only accuracy is that epoch's all-off counterfactual configuration.
        """
        host_only = {}
        for cf in self.store.counterfactual_history():
            acc = all_off_accuracy(cf)
            if acc is not None:
                host_only[cf.epoch] = acc
        return [
            (h.epoch, h.val_accuracy, host_only[h.epoch]) for h in self.store.host_history() if h.epoch in host_only
        ]

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

    def equivalent_traditional_params(self) -> int | None:
        """Estimated size of a traditional (seedless) model that, trained for as many epochs
        as this run so far, matches its current accuracy.

        The epoch is the latest host snapshot's, counted as the reference trainer counts
        them (1 after the first epoch of training). None ("unknown", with the reason in
        :meth:`equivalent_traditional_note`) when no reference curve was calibrated, the
        curve does not cover this epoch, or the accuracy is outside its measured range.
        """
        h = self.store.latest_host()
        if self.reference_curve is None or h is None:
            return None
        return self.reference_curve.params_for_accuracy(h.val_accuracy, h.epoch)

    def equivalent_traditional_note(self) -> str | None:
        """Why :meth:`equivalent_traditional_params` is unknown (None when it is known, or
        when there is no reference curve at all)."""
        curve, h = self.reference_curve, self.store.latest_host()
        if curve is None or h is None or self.equivalent_traditional_params() is not None:
            return None
        if curve.at_epoch(h.epoch) is None:
            if h.epoch > curve.epochs:
                return f"the reference curve covers {curve.epochs} epochs of training"
            return f"the reference curve has only epoch {curve.epochs} (recalibrate for every epoch)"
        return "accuracy outside the calibrated curve"

    # === Causal attribution ===

    def _rule_scope(self, cf: CounterfactualMatrix) -> tuple[int | None, int]:
        """(planned horizon, number of slots) for the live rule's alpha spending."""
        ctx = self.store.context
        if ctx is None:
            return None, len(cf.slot_ids)
        return ctx.max_epochs, max(len(ctx.slot_config), len(cf.slot_ids))

    def claims(self, cf: CounterfactualMatrix | None = None, threshold: float = 0.0) -> dict[str, Claim]:
        """The claim for every slot of ``cf`` (default: the latest matrix) with a Shapley value.

        Once the episode has ended (its summary arrived) the latest matrix is the pre-set final
        epoch and the claims are the final-epoch Holm verdict; before that, the live
        alpha-spending rule at the matrix's epoch. Both keep the per-run false-claim rate at or
        below 5% (karn_otel.claims). ``threshold`` is a fraction (0.005 = half a point).
        """
        latest = self.store.latest_counterfactual()
        cf = latest if cf is None else cf
        if cf is None or not cf.shapley_values:
            return {}
        if cf is latest and self.store.summary is not None:
            return final_verdict(cf.shapley_values, cf.epoch, alpha=ALPHA, threshold=threshold)
        horizon, n_slots = self._rule_scope(cf)
        if cf is not latest:  # an old matrix on its own: one test, no carried alpha
            return {
                sid: live_claim(sid, est, cf.epoch, horizon=horizon, n_slots=n_slots, alpha=ALPHA, threshold=threshold)
                for sid, est in cf.shapley_values.items()
            }
        out: dict[str, Claim] = {}
        for sid in cf.shapley_values:
            chain = self.live_chain(sid, threshold)
            if chain and chain[-1].epoch == cf.epoch:
                out[sid] = chain[-1]
        return out

    def live_chain(self, slot_id: str, threshold: float = 0.0) -> list[Claim]:
        """The live rule's claims for ``slot_id`` at every epoch in the store's history.

        Computed with the online fallback (karn_otel.claims.live_claim_chain) and extended
        incrementally as epochs arrive (the console asks several times a second).
        """
        by_epoch: dict[int, ShapleyEstimate] = {}
        scope: CounterfactualMatrix | None = None
        for m in self.store.counterfactual_history():
            est = (m.shapley_values or {}).get(slot_id)
            if est is not None:
                by_epoch[m.epoch] = est  # the last matrix of an epoch wins
                scope = m
        if scope is None:
            return []
        history = sorted(by_epoch.items())
        key = (slot_id, float(threshold))
        cached = self._chains.get(key, [])
        k = 0
        while k < len(cached) and k < len(history) and cached[k][:2] == (history[k][0], id(history[k][1])):
            k += 1
        if k < len(cached):  # the history changed under the cache (a new episode): start again
            cached, k = [], 0
        horizon, n_slots = self._rule_scope(scope)
        new = live_claim_chain(
            slot_id,
            history[k:],
            horizon=horizon,
            n_slots=n_slots,
            alpha=ALPHA,
            threshold=threshold,
            after=cached[-1][2] if cached else None,
        )
        cached = cached + [(e, id(est), c) for (e, est), c in zip(history[k:], new)]
        self._chains[key] = cached
        return [c for _, _, c in cached]

    def seed_contributions(self) -> dict[str, SeedContributionSummary]:
        """Per-slot attribution: Shapley with its interval when measured, else removal cost.

        ``ci_low``/``ci_high`` are the descriptive per-epoch interval; ``claim``/``helps``
        come from the claim rule (:meth:`claims`).
        """
        cf = self.store.latest_counterfactual()
        claims = self.claims(cf) if cf is not None else {}
        on = all_on(cf) if cf is not None else None
        measured = on.alpha_settings if on is not None else {}
        out: dict[str, SeedContributionSummary] = {}
        for slot_id, s in self.store.slots().items():
            if s.seed_id is None:
                continue
            at = measured.get(slot_id)
            est: ShapleyEstimate | None = None
            if cf is not None and cf.shapley_values and slot_id in cf.shapley_values:
                est = cf.shapley_values[slot_id]
            if est is not None:
                out[slot_id] = SeedContributionSummary(
                    slot_id,
                    s.blueprint_id,
                    s.seed_params,
                    est.mean,
                    est.ci_low,
                    est.ci_high,
                    "shapley",
                    claims.get(slot_id),
                    at,
                )
            else:
                c = s.counterfactual_contribution
                out[slot_id] = SeedContributionSummary(
                    slot_id,
                    s.blueprint_id,
                    s.seed_params,
                    c,
                    None,
                    None,
                    "removal_cost" if c is not None else "none",
                    measured_alpha=at if c is not None else None,
                )
        return out

    def contribution_onset_epoch(self, slot_id: str, threshold: float = 0.5) -> int | None:
        """First epoch at which the live claim rule says the slot's Shapley value exceeds
        ``threshold`` percentage points (the spec's 0.5 = half a point of accuracy).

        The rule is the anytime-valid alpha-spending rule (karn_otel.claims.live_claim) at
        threshold/100, not the point estimate: a seed with no effect gets an onset in at most
        5% of runs (tests/test_calibration.py). None when no epoch qualifies, or when the
        slot has no Shapley interval (a removal cost alone cannot support an onset claim).
        Only the epochs still in the store's history are scanned.
        """
        for claim in self.live_chain(slot_id, threshold / 100.0):
            if claim.helps:  # the chain's first claim is made at the epoch's own share of alpha
                return claim.epoch
        return None

    # === Policy quality ===

    def action_distribution(self) -> dict[str, float]:
        """Fraction of this episode's decisions per op (WAIT, GERMINATE, FOSSILIZE, CULL)."""
        counts = self.store.action_counts()
        total = sum(counts.values())
        return {op.value: counts.get(op.value, 0) / total for op in ActionOp} if total else {}

    def policy_vs_heuristic(self) -> PolicyComparisonSummary:
        """Agreement between the controller and the shadow heuristic, over recent decisions."""
        pairs = [(d.action, d.shadow_action) for _, d in self.store.recent_decisions() if d.shadow_action is not None]
        if not pairs:
            return PolicyComparisonSummary(0, None, None, {}, {})
        n = len(pairs)
        pol = Counter(a.op.value for a, _ in pairs)
        heu = Counter(b.op.value for _, b in pairs)
        return PolicyComparisonSummary(
            n_decisions=n,
            agreement=sum(a == b for a, b in pairs) / n,
            op_agreement=sum(a.op is b.op for a, b in pairs) / n,
            policy_ops={k: v / n for k, v in pol.items()},
            heuristic_ops={k: v / n for k, v in heu.items()},
        )

    # === Health ===

    def training_health(self) -> HealthReport | None:
        """The HealthMonitor's HealthReport (named checks with severities), or None if no
        monitor is attached (Karn configured with processors=False)."""
        return None if self.health is None else self.health.report()


def all_off_accuracy(cf: CounterfactualMatrix) -> float | None:
    for r in cf.configs:
        if not any(r.config):
            return r.val_accuracy
    return None


def all_on(cf: CounterfactualMatrix) -> CounterfactualResult | None:
    """The matrix's all-on configuration: the model as it runs (its alphas included)."""
    return next((r for r in cf.configs if all(r.config)), None)
