"""Claim rules: when Karn may say "seed X helps", with a per-run false-claim rate <= alpha.

Two kinds of statement are kept apart (docs/counterfactual-validity.md, "Claims"):

* **Descriptive** per-epoch intervals (``ShapleyEstimate.ci_low``/``ci_high``): one epoch,
  one slot, 95% two-sided. Looked at every epoch for every seed they are *not* a claim rule:
  a seed with no effect crosses zero in most 100-epoch runs.
* **Claims**, made by one of two rules whose false-claim rate is bounded **per run** (over
  every epoch and every seed looked at):

  - the **live rule** (:func:`live_claim_chain`, ``rule = "alpha-spending"``): at epoch ``e``
    each of the ``m`` slots is tested one-sided at level ``alpha * w(e) / m`` with
    ``sum over e of w(e) <= 1`` (Bonferroni over seeds, alpha spending over looks), plus,
    when the same slot was claimed at epoch ``e - 1``, the level that claim was made at
    (the *online fallback* of Tian & Ramdas 2021, a Bonferroni-based graphical procedure: a
    claim passes its alpha on to the slot's next epoch, so a real, lasting effect keeps its
    claim). The family-wise error over every epoch and slot is <= alpha under arbitrary
    dependence between epochs and seeds, however often the console looks. It is
    anytime-valid: the run may stop at any epoch, or go on past the planned horizon.
    :func:`live_claim` is one test without the carried alpha (the first claim of a chain).
  - the **final verdict** (:func:`final_verdict`, ``rule = "final-epoch Holm"``): one pre-set
    look at the final epoch's matrix, one-sided tests of every slot, Holm's step-down over
    the slots at level alpha (family-wise error <= alpha over seeds).

The spending sequence ``w``: with a planned horizon of ``H`` epochs (``EpisodeContext.
max_epochs``) the looks at epochs ``0..H`` share ``1 - TAIL`` equally and epochs past ``H``
get ``TAIL / (j (j + 1))`` for the j-th extra epoch (so an over-long run stays valid); with no
horizon, epoch ``e >= 0`` gets ``1 / ((e + 1)(e + 2))``. The per-test level is tiny (100
epochs, 3 slots: 1.6e-4, a one-sided z of 3.6 instead of 1.645): that is the price of being
allowed to look every epoch, measured in ``tests/test_calibration.py`` and the docs.

A one-sided test of ``theta > threshold`` at level ``a`` rejects when the lower bound
``mean - q(1 - a) * std`` exceeds ``threshold``, with ``q`` the Student-t quantile at the
estimate's ``df`` (normal when ``df`` is infinite). An estimate with an undefined (NaN) or
zero ``std`` never makes a claim (a zero std means nothing was measured about the noise).

Pure Python (statistics from the standard library; the Student-t quantile from
:mod:`karn_otel.counterfactual`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

from karn_otel.contracts import ShapleyEstimate

__all__ = [
    "ALPHA",
    "FINAL_RULE",
    "LIVE_RULE",
    "TAIL",
    "Claim",
    "final_verdict",
    "live_claim",
    "live_claim_chain",
    "live_test_level",
    "lower_bound",
    "one_sided_p",
    "spending_weight",
]

ALPHA = 0.05
"""Default per-run false-claim rate of both rules."""
LIVE_RULE = "alpha-spending"
"""``Claim.rule`` of the anytime-valid live rule (Bonferroni over slots, spending over epochs)."""
FINAL_RULE = "final-epoch Holm"
"""``Claim.rule`` of the pre-set final-epoch test, Holm over slots."""
TAIL = 0.05
"""Share of alpha kept for epochs past the planned horizon."""

_NORMAL = NormalDist()


@dataclass(frozen=True)
class Claim:
    """The outcome of a claim rule for one slot.

    ``helps`` is the claim ("the slot's contribution exceeds ``threshold``"); ``rule`` and
    ``alpha`` say which rule made it and at what per-run level; ``test_level`` is the
    one-sided level this test used (the live rule's share of alpha, or Holm's adjusted level
    for the final verdict); ``bound`` is the one-sided lower confidence bound at that level
    (fraction; NaN when undefined); ``p_value`` the one-sided p-value of ``theta <= threshold``.
    """

    slot_id: str
    helps: bool
    rule: str
    alpha: float
    test_level: float
    bound: float
    p_value: float
    epoch: int
    threshold: float = 0.0

    def label(self) -> str:
        """``"helps (alpha-spending, 5% per run)"`` / ``"no claim (final-epoch Holm, 5% per run)"``."""
        what = "helps" if self.helps else "no claim"
        return f"{what} ({self.rule}, {100 * self.alpha:g}% per run)"


def _quantile(p: float, df: float) -> float:
    if math.isfinite(df) and df > 0:
        from karn_otel.counterfactual import student_t_ppf  # numpy is only needed for this

        return student_t_ppf(p, df)
    return _NORMAL.inv_cdf(p)


def _cdf(x: float, df: float) -> float:
    if math.isfinite(df) and df > 0:
        from karn_otel.counterfactual import student_t_cdf

        return student_t_cdf(x, df)
    return _NORMAL.cdf(x)


def _usable(est: ShapleyEstimate) -> bool:
    return math.isfinite(est.mean) and math.isfinite(est.std) and est.std > 0 and not est.df <= 0


def lower_bound(est: ShapleyEstimate, level: float) -> float:
    """One-sided lower confidence bound at ``level`` (e.g. 0.025): NaN when undefined."""
    if not _usable(est) or not 0.0 < level < 1.0:
        return float("nan")
    return est.mean - _quantile(1.0 - level, est.df) * est.std


def one_sided_p(est: ShapleyEstimate, threshold: float = 0.0) -> float:
    """P-value of ``theta <= threshold`` against ``theta > threshold``; 1.0 when undefined."""
    if not _usable(est):
        return 1.0
    return 1.0 - _cdf((est.mean - threshold) / est.std, est.df)


def spending_weight(epoch: int, horizon: int | None) -> float:
    """Share of alpha spent at ``epoch`` (see the module docstring); 0 for a negative epoch.

    Sums to at most 1 over all epochs ``>= 0`` for any fixed ``horizon``.
    """
    if epoch < 0:
        return 0.0
    if horizon is None or horizon < 0:
        return 1.0 / ((epoch + 1) * (epoch + 2))
    if epoch <= horizon:
        return (1.0 - TAIL) / (horizon + 1)
    j = epoch - horizon
    return TAIL / (j * (j + 1))


def live_test_level(epoch: int, *, horizon: int | None, n_slots: int, alpha: float = ALPHA) -> float:
    """One-sided level of each slot's test at ``epoch`` under the live rule."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return alpha * spending_weight(epoch, horizon) / max(1, int(n_slots))


def live_claim(
    slot_id: str,
    est: ShapleyEstimate,
    epoch: int,
    *,
    horizon: int | None,
    n_slots: int,
    alpha: float = ALPHA,
    threshold: float = 0.0,
) -> Claim:
    """The anytime-valid live rule for one slot at one epoch.

    ``n_slots`` must be an upper bound on the number of slots tested at any epoch of the run
    (the episode's slot count), ``horizon`` the planned number of epochs (None if unknown).
    """
    level = live_test_level(epoch, horizon=horizon, n_slots=n_slots, alpha=alpha)
    bound = lower_bound(est, level) if level > 0 else float("nan")
    return Claim(
        slot_id,
        bool(bound > threshold),  # NaN > x is False
        LIVE_RULE,
        alpha,
        level,
        bound,
        one_sided_p(est, threshold),
        int(epoch),
        threshold,
    )


def live_claim_chain(
    slot_id: str,
    history: Sequence[tuple[int, ShapleyEstimate]],
    *,
    horizon: int | None,
    n_slots: int,
    alpha: float = ALPHA,
    threshold: float = 0.0,
    after: Claim | None = None,
) -> list[Claim]:
    """The live rule over one slot's epochs (increasing), with the online fallback.

    The level at epoch ``e`` is the spent share ``alpha * w(e) / n_slots`` plus, when the
    slot was claimed at epoch ``e - 1`` (the immediately preceding epoch, tested), the level
    of that claim; an epoch without a claim, or without a matrix, passes nothing on.
    ``after`` continues a chain: the last claim of the epochs already processed.
    """
    out: list[Claim] = []
    carry = after.test_level if after is not None and after.helps else 0.0
    prev_epoch = after.epoch if after is not None else None
    for epoch, est in history:
        if prev_epoch is not None and epoch <= prev_epoch:
            raise ValueError(f"epochs must increase: {epoch} after {prev_epoch}")
        if prev_epoch is None or epoch != prev_epoch + 1:
            carry = 0.0
        base = live_test_level(epoch, horizon=horizon, n_slots=n_slots, alpha=alpha)
        level = min(base + carry, alpha / max(1, int(n_slots)))
        bound = lower_bound(est, level) if level > 0 else float("nan")
        helps = bool(bound > threshold)
        out.append(
            Claim(slot_id, helps, LIVE_RULE, alpha, level, bound, one_sided_p(est, threshold), int(epoch), threshold)
        )
        carry = level if helps else 0.0
        prev_epoch = epoch
    return out


def final_verdict(
    estimates: Mapping[str, ShapleyEstimate],
    epoch: int,
    *,
    alpha: float = ALPHA,
    threshold: float = 0.0,
) -> dict[str, Claim]:
    """Holm's step-down over the slots' one-sided tests at the final epoch.

    Sorted by p-value, the k-th smallest (k = 0, 1, ...) is tested at ``alpha / (m - k)``; the
    procedure stops at the first failure. A slot whose estimate is undefined has p = 1 and
    counts in ``m`` (it was looked at). ``bound`` is each slot's lower bound at the level it
    was tested at (the level of the first failure for slots after it).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    m = len(estimates)
    pvals = {s: one_sided_p(e, threshold) for s, e in estimates.items()}
    order = sorted(pvals, key=lambda s: (pvals[s], s))
    out: dict[str, Claim] = {}
    stopped = False
    for k, s in enumerate(order):
        level = alpha / (m - k)
        if not stopped and pvals[s] <= level and _usable(estimates[s]):
            helps = True
        else:
            stopped, helps = True, False
        out[s] = Claim(
            s, helps, FINAL_RULE, alpha, level, lower_bound(estimates[s], level), pvals[s], int(epoch), threshold
        )
    return {s: out[s] for s in estimates}
