"""HealthMonitor and HealthReport: Karn's training-health checks (spec "Live Analytics").

A fixed, bounded set of named checks watches the host (``HostSnapshot``, once per epoch) and
the PPO controller (``PPOUpdateStats``, once per update). Each check has one stable name,
one severity and one threshold, defined once in :class:`HealthThresholds`; the same numbers
drive the dense-trace triggers (:mod:`karn_otel.triggers`) and the generated Prometheus
alert rules (:func:`alert_thresholds`, :data:`CHECKS`).

===========================  ========  ==============================================  =========
check                        severity  fails when                                      default
===========================  ========  ==============================================  =========
non_finite_loss              critical  count of NaN/inf losses (host or PPO) > 0       0
loss_spike                   warning   train loss / rolling mean of previous epochs >  2.0
gradient_explosion           critical  host grad norm / rolling median of previous >   100.0
accuracy_drop                warning   val accuracy drop epoch over epoch (points) >   5.0
isolation_leakage            critical  grad_isolation_leakage >                        1e-6
kl_too_high                  warning   abs(approx KL) per update (nats) >              0.1
kl_too_low                   warning   abs(approx KL) per update (nats) <              1e-4
explained_variance_negative  warning   explained variance <                            0.0
value_collapse               warning   Var(V) / Var(returns) <                         0.01
entropy_collapse             warning   a head's entropy (nats) < its floor             see below
lstm_saturation              warning   fraction of LSTM units with abs(h) > 0.9 >      0.5
===========================  ========  ==============================================  =========

``entropy_collapse``'s floor is 10% of log(n_actions) for a head whose size is given
(``head_sizes``), else an absolute 0.1 nats. ``non_finite_loss`` counts the host's train and
val loss and the PPO update's policy/value loss, KL, EV and value variance (not per-head
entropies, which are NaN by contract for a head that had no sample in the update).
Each default is justified on its :class:`HealthThresholds` field.

Severity: *critical* means the run's numbers are already invalid or about to be (a NaN has
propagated, the gradients are diverging, seed isolation, which every attribution assumes,
is broken); *warning* means learning is degraded but can recover.

Alerts are edge-triggered: :class:`HealthMonitor` returns one :class:`HealthAlert` when a
check goes from passing to failing, none while it keeps failing, and a new one on relapse.
Its per-check status (:meth:`HealthMonitor.status`, :meth:`HealthMonitor.report`) shows
resolution. The monitor never raises on odd input: a NaN is a finding (``non_finite_loss``),
not a crash.

The check logic itself lives in small pure functions (``*_finding``) over plain numbers, so
the triggers reuse it with their own thresholds. Imports neither torch nor opentelemetry.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from karn_otel.contracts import (
    HealthAlert,
    HostSnapshot,
    PPOUpdateStats,
    Severity,
    TelemetryEvent,
    TelemetryEventType,
)

__all__ = [
    "CHECKS",
    "CHECK_NAMES",
    "RETURN_CHECKS",
    "TASK_PROFILES",
    "ReturnMonitor",
    "ReturnThresholds",
    "TaskProfile",
    "return_name_kind",
    "task_profile",
    "DEFAULT_THRESHOLDS",
    "CheckSpec",
    "Finding",
    "HealthCheckResult",
    "HealthMonitor",
    "HealthReport",
    "HealthThresholds",
    "HostHistory",
    "accuracy_drop_finding",
    "alert_thresholds",
    "entropy_collapse_finding",
    "entropy_floors",
    "gradient_explosion_finding",
    "host_findings",
    "loss_spike_finding",
    "ppo_findings",
    "value_collapse_finding",
]

log = logging.getLogger("karn")
ET = TelemetryEventType

_SEVERITY_RANK = {Severity.OK: 0, Severity.INFO: 1, Severity.WARNING: 2, Severity.CRITICAL: 3}


# --------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class HealthThresholds:
    """Every default health threshold, in one place.

    The values shared with :class:`karn_otel.config.DenseTraceTrigger` (loss spike 2.0x,
    gradient explosion 100x, accuracy drop 5 points) are the spec's numbers; a test pins
    that the two agree.
    """

    # --- host, per epoch (spec Tier 3 trigger conditions) ---
    loss_spike_ratio: float = 2.0
    """train loss / mean train loss of the previous ``rolling_window_epochs`` epochs (ratio)."""
    gradient_explosion_ratio: float = 100.0
    """host grad norm / median host grad norm of the previous epochs (ratio). The median,
    not the mean, is "typical": one earlier explosion must not raise the bar for the next."""
    accuracy_drop_points: float = 5.0
    """Drop of validation accuracy from the previous epoch, in percentage points (accuracies
    are fractions in [0, 1], so 5 points = 0.05)."""
    isolation_leakage_epsilon: float = 1e-6
    """Gradient leaking from a seed into the host (the unit of ``grad_isolation_leakage``).
    Exact isolation (a detached host path) gives exactly 0; 1e-6 only absorbs float32
    round-off in how the leakage is measured, so anything above is a real leak."""
    rolling_window_epochs: int = 5
    """Previous epochs that make the rolling mean (loss) and rolling median (grad norm).
    Five epochs follow the loss's downward trend closely enough that ordinary progress
    never looks like a 2x spike, yet one noisy epoch moves the baseline by at most 1/5."""

    # --- PPO, per update (review P1 #6, P2 #9) ---
    kl_too_high: float = 0.1
    """abs(approx KL(old || new)) per update, nats. Spec P1 #6: above it the learning rate
    is too high (common PPO early-stop targets are 0.01-0.02, so 0.1 is ~5-10x over)."""
    kl_too_low: float = 1e-4
    """abs(approx KL) per update, nats: "KL ~ 0" (P1 #6). A healthy update moves the policy
    by roughly the 0.01-0.02 nats target above; 1e-4 is two orders of magnitude below it,
    i.e. the policy is not moving at all (learning rate too low, or advantages ~0 so the
    gradient is degenerate), while a merely small step (1e-3) is not flagged."""
    explained_variance_min: float = 0.0
    """EV = 1 - Var(returns - values) / Var(returns) (dimensionless). Below 0 the critic is
    worse than predicting the mean return (P1 #6)."""
    value_collapse_ratio: float = 0.01
    """Var(values) / Var(returns), dimensionless. Below 1% the critic's spread is under a
    tenth of the returns' standard deviation: it predicts nearly the same value everywhere
    while the returns do vary. See :func:`value_collapse_finding` for how Var(returns) is
    recovered from the fields of :class:`PPOUpdateStats`."""
    entropy_collapse_fraction: float = 0.1
    """Per-head entropy as a fraction of that head's maximum log(n_actions), for heads whose
    size is known. 10% of log(4) = 0.14 nats is a 4-way head putting ~97% on one action:
    the policy has become (nearly) deterministic."""
    entropy_collapse_nats: float = 0.1
    """Absolute entropy floor in nats for heads of unknown size: 0.1 nats is a binary head
    at ~98% on one action, and an even more peaked distribution for larger heads, so it
    never flags a head that still explores."""
    lstm_saturation_fraction: float = 0.5
    """Fraction of LSTM hidden units with abs(h) > 0.9 (P2 #9). There tanh' = 1 - h^2 < 0.19,
    so gradient through those units is cut at least 5x per step; when most units sit
    there the recurrent state is a near-binary latch and gradients through time vanish."""

    def __post_init__(self) -> None:
        for name in ("loss_spike_ratio", "gradient_explosion_ratio"):
            if not getattr(self, name) > 1.0:
                raise ValueError(f"{name} must be > 1 (a multiple of the typical value), got {getattr(self, name)}")
        for name in (
            "accuracy_drop_points",
            "kl_too_high",
            "entropy_collapse_nats",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("isolation_leakage_epsilon", "kl_too_low", "value_collapse_ratio"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.kl_too_low < self.kl_too_high:
            raise ValueError(f"kl_too_low ({self.kl_too_low}) must be below kl_too_high ({self.kl_too_high})")
        for name in ("entropy_collapse_fraction", "lstm_saturation_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not math.isfinite(self.explained_variance_min) or self.explained_variance_min > 1.0:
            raise ValueError(f"explained_variance_min must be finite and <= 1, got {self.explained_variance_min}")
        if isinstance(self.rolling_window_epochs, bool) or not (
            isinstance(self.rolling_window_epochs, int) and self.rolling_window_epochs >= 1
        ):
            raise ValueError(f"rolling_window_epochs must be an int >= 1, got {self.rolling_window_epochs!r}")

    def entropy_floor(self, n_actions: int | None) -> float | None:
        """Entropy floor in nats for a head with ``n_actions`` choices (None: size unknown).

        Returns None for a head with a single action: its entropy is always 0 and carries
        no information about collapse.
        """
        if n_actions is None:
            return self.entropy_collapse_nats
        if n_actions < 2:
            return None
        return self.entropy_collapse_fraction * math.log(n_actions)


DEFAULT_THRESHOLDS = HealthThresholds()


@dataclass(frozen=True)
class CheckSpec:
    """The static description of one check: what a Prometheus rule generator needs.

    ``comparison`` is how the check's value fails against its threshold: ``"gt"`` fails
    when value > threshold, ``"lt"`` when value < threshold.
    """

    name: str
    severity: Severity
    source: str  # the event type whose payload the check reads
    threshold_field: str  # attribute of HealthThresholds
    comparison: str  # "gt" | "lt"
    unit: str
    summary: str


CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec(
        "non_finite_loss",
        Severity.CRITICAL,
        "host_snapshot,ppo_update",
        "",
        "gt",
        "count",
        "a loss (train/val, PPO policy/value) or PPO KL/EV/value variance is NaN or infinite",
    ),
    CheckSpec(
        "loss_spike",
        Severity.WARNING,
        "host_snapshot",
        "loss_spike_ratio",
        "gt",
        "ratio",
        "train loss above a multiple of its rolling mean over previous epochs",
    ),
    CheckSpec(
        "gradient_explosion",
        Severity.CRITICAL,
        "host_snapshot",
        "gradient_explosion_ratio",
        "gt",
        "ratio",
        "host gradient norm above a multiple of its rolling median (or non-finite)",
    ),
    CheckSpec(
        "accuracy_drop",
        Severity.WARNING,
        "host_snapshot",
        "accuracy_drop_points",
        "gt",
        "percentage points",
        "validation accuracy fell epoch over epoch",
    ),
    CheckSpec(
        "isolation_leakage",
        Severity.CRITICAL,
        "host_snapshot",
        "isolation_leakage_epsilon",
        "gt",
        "grad norm",
        "gradient leaks from a seed into the host",
    ),
    CheckSpec(
        "kl_too_high",
        Severity.WARNING,
        "ppo_update",
        "kl_too_high",
        "gt",
        "nats",
        "approx KL per PPO update too high: learning rate too high",
    ),
    CheckSpec(
        "kl_too_low",
        Severity.WARNING,
        "ppo_update",
        "kl_too_low",
        "lt",
        "nats",
        "approx KL per PPO update ~0: learning rate too low or degenerate gradients",
    ),
    CheckSpec(
        "explained_variance_negative",
        Severity.WARNING,
        "ppo_update",
        "explained_variance_min",
        "lt",
        "1",
        "critic worse than predicting the mean return",
    ),
    CheckSpec(
        "value_collapse",
        Severity.WARNING,
        "ppo_update",
        "value_collapse_ratio",
        "lt",
        "ratio",
        "critic predicts nearly the same value everywhere",
    ),
    CheckSpec(
        "entropy_collapse",
        Severity.WARNING,
        "ppo_update",
        "entropy_collapse_nats",
        "lt",
        "nats",
        "a policy head has become (nearly) deterministic",
    ),
    CheckSpec(
        "lstm_saturation",
        Severity.WARNING,
        "ppo_update",
        "lstm_saturation_fraction",
        "gt",
        "fraction",
        "most LSTM hidden units saturated (|h| > 0.9): vanishing gradients",
    ),
)
CHECK_NAMES: tuple[str, ...] = tuple(c.name for c in CHECKS)
_SPEC = {c.name: c for c in CHECKS}


def alert_thresholds(thresholds: HealthThresholds = DEFAULT_THRESHOLDS) -> dict[str, float]:
    """``{check name: threshold}`` for every check, in :data:`CHECK_NAMES` order.

    The value compared is the one a :class:`HealthAlert` of that check carries, in the unit
    of :data:`CHECKS`. ``non_finite_loss`` counts non-finite values (threshold 0).
    ``entropy_collapse`` gives the floor for heads of unknown size; use
    :func:`entropy_floors` for per-head floors when head sizes are known.
    """
    return {c.name: float(getattr(thresholds, c.threshold_field)) if c.threshold_field else 0.0 for c in CHECKS}


def entropy_floors(
    head_sizes: Mapping[str, int], thresholds: HealthThresholds = DEFAULT_THRESHOLDS
) -> dict[str, float]:
    """Per-head entropy floor in nats (heads with a single action are omitted)."""
    out = {}
    for head, n in head_sizes.items():
        floor = thresholds.entropy_floor(n)
        if floor is not None:
            out[head] = floor
    return out


# --------------------------------------------------------------------------- pure checks


class Finding(NamedTuple):
    """The outcome of evaluating one check on one observation.

    ``text`` is the message, or a function that formats it: every check is evaluated every
    epoch, and formatting its numbers (about 1.6 us a message) is done only when the message
    is read (an alert, a status report), not for each passing check. Read :attr:`message`.
    """

    check: str
    failing: bool
    value: float
    threshold: float
    text: str | Callable[[], str]

    @property
    def message(self) -> str:
        t = self.text
        return t if isinstance(t, str) else t()


def _num(x: Any) -> float:
    """A float, or NaN for anything that is not a real number (never raises)."""
    if type(x) is float:  # what a validated payload holds: nine calls per epoch
        return x
    if isinstance(x, bool):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError, OverflowError):
        return math.nan


_finite = math.isfinite  # called ~13 times per epoch: an alias, not a wrapper function


def loss_spike_finding(loss: object, previous: Iterable[float], ratio: float) -> Finding | None:
    """train loss vs ``ratio`` x the mean of ``previous`` epochs' losses.

    None when it cannot be evaluated: no finite history, a non-positive baseline (a ratio
    to 0 means nothing), or a non-finite loss (that is ``non_finite_loss``'s finding).
    """
    x = _num(loss)
    prev = list(filter(_finite, previous))
    if not prev or not _finite(x):
        return None
    avg = sum(prev) / len(prev)
    if avg <= 0:
        return None
    value = x / avg
    return Finding(
        "loss_spike",
        value > ratio,
        value,
        ratio,
        lambda: f"train loss {x:.4g} is {value:.3g}x its rolling mean {avg:.4g} over {len(prev)} epoch(s)",
    )


def gradient_explosion_finding(norm: object, previous: Iterable[float], ratio: float) -> Finding | None:
    """host grad norm vs ``ratio`` x the median of ``previous`` epochs' norms.

    A non-finite norm is the limit of an explosion and fails outright (value inf), provided
    there is a history; None when the typical norm is unknown or not positive.
    """
    n = _num(norm)
    prev = list(filter(_finite, previous))
    if not prev:
        return None
    typical = statistics.median(prev)
    if typical <= 0:
        return None
    if not _finite(n):
        return Finding(
            "gradient_explosion", True, math.inf, ratio, lambda: f"host grad norm is {n} (typical {typical:.4g})"
        )
    value = n / typical
    return Finding(
        "gradient_explosion",
        value > ratio,
        value,
        ratio,
        lambda: f"host grad norm {n:.4g} is {value:.3g}x its rolling median {typical:.4g}",
    )


def accuracy_drop_finding(previous: object, current: object, points: float) -> Finding | None:
    """Validation accuracy drop from ``previous`` to ``current`` (fractions), in points."""
    cur, prev = _num(current), _num(previous) if previous is not None else math.nan
    if not (_finite(cur) and _finite(prev)):
        return None
    drop = 100.0 * (prev - cur)
    return Finding(
        "accuracy_drop",
        drop > points,
        drop,
        points,
        lambda: f"val accuracy {100 * cur:.2f}% is {drop:.2f} points below the previous epoch's {100 * prev:.2f}%",
    )


def value_collapse_finding(
    value_variance: object, advantage_std: object, explained_variance: object, ratio: float
) -> Finding | None:
    """Var(values) relative to Var(returns), from what :class:`PPOUpdateStats` carries.

    With GAE, returns = advantages + values, so the advantages are the critic's residuals
    and EV = 1 - Var(A) / Var(R), hence Var(R) = Var(A) / (1 - EV) exactly. When EV is not
    usable (non-finite or >= 1) the fallback Var(R) ~ Var(V) + Var(A) assumes residuals
    uncorrelated with predictions (true at a least-squares fit). Both assume
    ``advantage_stats`` describe the raw advantages, before per-minibatch normalisation.
    None when Var(R) is not positive and finite: with no variance in the returns a constant
    critic is correct, not collapsed.
    """
    vv, std, ev = _num(value_variance), _num(advantage_std), _num(explained_variance)
    if not (_finite(vv) and _finite(std)) or vv < 0:
        return None
    var_a = std * std
    var_r = var_a / (1.0 - ev) if _finite(ev) and ev < 1.0 else vv + var_a
    if not (_finite(var_r) and var_r > 0):
        return None
    value = vv / var_r
    return Finding(
        "value_collapse",
        value < ratio,
        value,
        ratio,
        lambda: f"value variance {vv:.4g} is {100 * value:.3g}% of the return variance {var_r:.4g}",
    )


def entropy_collapse_finding(
    entropy: Mapping[str, float],
    thresholds: HealthThresholds,
    head_sizes: Mapping[str, int] | None = None,
) -> Finding | None:
    """The head closest to (or furthest below) its entropy floor, in nats.

    Floors: ``entropy_collapse_fraction`` x log(n) for heads in ``head_sizes``, else the
    absolute ``entropy_collapse_nats``. Non-finite entropies are skipped (NaN means the head
    had no sample in the update); None when no head can be evaluated.
    """
    sizes = head_sizes or {}
    worst: tuple[float, str, float, float] | None = None  # (entropy / floor, head, entropy, floor)
    try:
        items = list(entropy.items())
    except AttributeError:
        return None
    for head, h in items:
        h = _num(h)
        n = sizes.get(head)
        floor = thresholds.entropy_floor(n if isinstance(n, int) else None)
        if floor is None or not _finite(h):
            continue
        score = h / floor if floor > 0 else math.inf
        if worst is None or score < worst[0]:
            worst = (score, str(head), h, floor)
    if worst is None:
        return None
    _, head, h, floor = worst
    return Finding(
        "entropy_collapse",
        h < floor,
        h,
        floor,
        lambda: f"entropy of head {head!r} is {h:.4g} nats (floor {floor:.4g} nats)",
    )


class HostHistory:
    """Rolling per-epoch baselines shared by the health checks and the dense triggers.

    Keeps the previous ``window`` epochs' finite train losses and host grad norms and the
    previous epoch's validation accuracy. Call :meth:`update` *after* evaluating an epoch,
    so each epoch is compared against the epochs before it.
    """

    def __init__(self, window: int) -> None:
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.last_val_accuracy: float | None = None

    def update(self, h: HostSnapshot) -> None:
        loss, norm, acc = (
            _num(getattr(h, "train_loss", None)),
            _num(getattr(h, "host_grad_norm", None)),
            _num(getattr(h, "val_accuracy", None)),
        )
        # Only finite values enter the baselines: one NaN epoch must not poison the next five.
        if _finite(loss):
            self.losses.append(loss)
        if _finite(norm):
            self.grad_norms.append(norm)
        if _finite(acc):
            self.last_val_accuracy = acc

    def reset(self) -> None:
        self.losses.clear()
        self.grad_norms.clear()
        self.last_val_accuracy = None


def host_findings(h: HostSnapshot, history: HostHistory, thresholds: HealthThresholds) -> list[Finding]:
    """Evaluate the per-epoch host checks on ``h`` against ``history`` (not modified)."""
    train_loss, val_loss = _num(getattr(h, "train_loss", None)), _num(getattr(h, "val_loss", None))
    if _finite(train_loss) and _finite(val_loss):
        out = [Finding("non_finite_loss", False, 0.0, 0.0, "losses finite")]
    else:
        bad = {k: v for k, v in (("train_loss", train_loss), ("val_loss", val_loss)) if not _finite(v)}
        out = [
            Finding(
                "non_finite_loss",
                True,
                float(len(bad)),
                0.0,
                lambda: "non-finite " + ", ".join(f"{k}={v}" for k, v in bad.items()),
            )
        ]
    for f in (
        loss_spike_finding(train_loss, history.losses, thresholds.loss_spike_ratio),
        gradient_explosion_finding(
            getattr(h, "host_grad_norm", None), history.grad_norms, thresholds.gradient_explosion_ratio
        ),
        accuracy_drop_finding(
            history.last_val_accuracy, getattr(h, "val_accuracy", None), thresholds.accuracy_drop_points
        ),
    ):
        if f is not None:
            out.append(f)
    leak_raw = getattr(h, "grad_isolation_leakage", None)
    if leak_raw is not None:  # None: isolation is not being monitored this run
        leak, eps = _num(leak_raw), thresholds.isolation_leakage_epsilon
        # A NaN leakage measurement cannot vouch for isolation: count it as a leak.
        failing = not _finite(leak) or abs(leak) > eps
        out.append(
            Finding(
                "isolation_leakage",
                failing,
                leak,
                eps,
                lambda: f"gradient isolation leakage {leak:.4g} (epsilon {eps:.2g})",
            )
        )
    return out


def ppo_findings(
    s: PPOUpdateStats, thresholds: HealthThresholds, head_sizes: Mapping[str, int] | None = None
) -> list[Finding]:
    """Evaluate the per-update PPO checks on ``s``."""
    out: list[Finding] = []
    scalars = {
        "policy_loss": _num(getattr(s, "policy_loss", None)),
        "value_loss": _num(getattr(s, "value_loss", None)),
        "kl_divergence": _num(getattr(s, "kl_divergence", None)),
        "explained_variance": _num(getattr(s, "explained_variance", None)),
        "value_variance": _num(getattr(s, "value_variance", None)),
    }
    # Per-head entropies are not counted: a head with no relevant sample in the update
    # reports NaN by contract (karn_otel/torch/ppo.py: "undefined, not zero"). A genuinely
    # diverged policy shows up in policy_loss and the KL anyway.
    bad = {k: v for k, v in scalars.items() if not _finite(v)}
    out.append(
        Finding(
            "non_finite_loss",
            bool(bad),
            float(len(bad)),
            0.0,
            lambda: (
                ("non-finite PPO " + ", ".join(f"{k}={v}" for k, v in bad.items())) if bad else "PPO statistics finite"
            ),
        )
    )
    kl = scalars["kl_divergence"]
    if _finite(kl):
        # Estimators such as mean(-log ratio) can go slightly negative; the magnitude is what
        # says how far the policy moved.
        out.append(
            Finding(
                "kl_too_high",
                abs(kl) > thresholds.kl_too_high,
                abs(kl),
                thresholds.kl_too_high,
                lambda: f"approx KL {kl:.4g} nats per update (limit {thresholds.kl_too_high:.3g})",
            )
        )
        out.append(
            Finding(
                "kl_too_low",
                abs(kl) < thresholds.kl_too_low,
                abs(kl),
                thresholds.kl_too_low,
                lambda: f"approx KL {kl:.4g} nats per update (floor {thresholds.kl_too_low:.3g})",
            )
        )
    ev = scalars["explained_variance"]
    if _finite(ev):
        out.append(
            Finding(
                "explained_variance_negative",
                ev < thresholds.explained_variance_min,
                ev,
                thresholds.explained_variance_min,
                lambda: f"explained variance {ev:.4g}",
            )
        )
    adv = getattr(s, "advantage_stats", None)
    vc = value_collapse_finding(
        scalars["value_variance"], getattr(adv, "std", None), ev, thresholds.value_collapse_ratio
    )
    if vc is not None:
        out.append(vc)
    entropy = getattr(s, "entropy", None)
    if isinstance(entropy, Mapping):
        ec = entropy_collapse_finding(entropy, thresholds, head_sizes)
        if ec is not None:
            out.append(ec)
    lstm = getattr(s, "lstm_health", None)
    if lstm is not None:
        sat = _num(getattr(lstm, "saturation_fraction", None))
        if _finite(sat):
            out.append(
                Finding(
                    "lstm_saturation",
                    sat > thresholds.lstm_saturation_fraction,
                    sat,
                    thresholds.lstm_saturation_fraction,
                    lambda: f"{100 * sat:.1f}% of LSTM hidden units saturated (|h| > 0.9)",
                )
            )
    return out


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class HealthCheckResult:
    """Current state of one check. ``severity`` is OK while passing, else the check's own.

    ``value``/``threshold`` are in the check's unit (see :data:`CHECKS`); ``value`` is NaN
    while the check has not been evaluated yet.
    """

    name: str
    severity: Severity
    ok: bool
    value: float
    threshold: float
    message: str


@dataclass(frozen=True)
class HealthReport:
    """Every check's current state, in :data:`CHECK_NAMES` order, and the worst severity."""

    checks: tuple[HealthCheckResult, ...]
    overall: Severity
    epoch: int | None = None  # the epoch of the last event the monitor evaluated

    @property
    def ok(self) -> bool:
        return self.overall is Severity.OK

    @property
    def failing(self) -> tuple[HealthCheckResult, ...]:
        return tuple(c for c in self.checks if not c.ok)

    def check(self, name: str) -> HealthCheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)


# --------------------------------------------------------------------------- monitor


class GuardedProcessor:
    """A collector processor that never breaks training: it observes only ``WATCHED`` event
    types (everything else, per-batch metrics included, leaves at once), serialises its
    state under a lock (the collector calls processors outside its own lock), and on an
    internal error skips the event, counts it in ``errors`` (the pipeline reports it as
    ``<Processor>:error`` with the dropped counts) and logs once, or raises when ``strict``."""

    WATCHED: frozenset[TelemetryEventType] = frozenset()

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self._lock = threading.Lock()
        self.errors = 0  # events skipped after an internal error

    def __call__(self, event: TelemetryEvent) -> list[Any]:
        if getattr(event, "event_type", None) not in self.WATCHED:
            return []
        try:
            with self._lock:
                return self._observe(event)
        except Exception as exc:
            if self.strict:
                raise
            self.errors += 1
            if self.errors == 1:
                log.warning(
                    "Karn %s skipped an event after an internal error: %r (further errors counted)",
                    type(self).__name__,
                    exc,
                )
            return []

    def _observe(self, event: TelemetryEvent) -> list[Any]:
        raise NotImplementedError


class HealthMonitor(GuardedProcessor):
    """Stateful health checks; a collector processor (``collector.add_processor(monitor)``).

    Observes ``HOST_SNAPSHOT`` and ``PPO_UPDATE`` events, resets on ``EPISODE_STARTED`` and
    returns a :class:`HealthAlert` for each check that has just started failing.

    ``head_sizes`` (head name -> number of actions) lets ``entropy_collapse`` use a floor
    relative to each head's maximum entropy log(n); heads not listed use the absolute nats
    floor. ``emit_resolutions=True`` also returns a ``Severity.OK`` alert when a failing
    check recovers (off by default: the console counts alerts, and resolution is visible in
    :meth:`status`). ``strict=True`` re-raises internal errors (for tests); otherwise an
    unexpected error is logged once and the event is skipped, because a processor runs on
    the training thread and must never stop training.
    """

    WATCHED = frozenset({ET.HOST_SNAPSHOT, ET.PPO_UPDATE, ET.EPISODE_STARTED})

    def __init__(
        self,
        thresholds: HealthThresholds = DEFAULT_THRESHOLDS,
        *,
        head_sizes: Mapping[str, int] | None = None,
        emit_resolutions: bool = False,
        strict: bool = False,
    ) -> None:
        if not isinstance(thresholds, HealthThresholds):
            raise TypeError(f"thresholds must be a HealthThresholds, got {type(thresholds).__name__}")
        self.thresholds = thresholds
        self.head_sizes: dict[str, int] = dict(head_sizes or {})
        for head, n in self.head_sizes.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"head_sizes[{head!r}] must be an int >= 1, got {n!r}")
        self.emit_resolutions = emit_resolutions
        super().__init__(strict)
        self._history = HostHistory(thresholds.rolling_window_epochs)
        # Latest finding per (check, source): non_finite_loss is fed by both the host and
        # the PPO update, and one source passing must not hide the other failing.
        self._findings: dict[tuple[str, str], Finding] = {}
        self._epoch: int | None = None
        # The findings of the last observed event, for the dense triggers to reuse (one
        # evaluation of each shared check): ``last_findings_for(event)``.
        self._last_event: TelemetryEvent | None = None
        self._last_findings: tuple[Finding, ...] = ()

    def _observe(self, event: TelemetryEvent) -> list[HealthAlert]:
        et, p = event.event_type, event.payload
        if et is ET.EPISODE_STARTED:
            self.reset()
            return []
        if et is ET.HOST_SNAPSHOT and event.is_reduced:
            # Rank 0's job-wide snapshot (DDP): this monitor judges this rank's own values;
            # mixing the job's means into its rolling histories would blur both.
            return []
        # Dispatch on the envelope's type, not the payload's class: the checks read fields
        # defensively, so even a payload that slipped past validation is judged, not skipped.
        if et is ET.HOST_SNAPSHOT:
            h = cast(HostSnapshot, p)
            source, findings = et.value, host_findings(h, self._history, self.thresholds)
            self._history.update(h)
        else:
            source, findings = et.value, ppo_findings(cast(PPOUpdateStats, p), self.thresholds, self.head_sizes)
        self._last_event, self._last_findings = event, tuple(findings)
        self._epoch = event.epoch
        # Alerts are edges of "some source fails this check": without a finding whose failing
        # flag differs from its source's last one (or is new), there are none, and the usual
        # epoch skips the scans. Storing a finding that did not flip leaves what fails as it
        # was, so the state before the first flip is still "before".
        known = self._findings
        before: dict[str, Finding] | None = None
        for f in findings:
            key = (f.check, source)
            if before is None:
                old = known.get(key)
                if old is None or old.failing != f.failing:
                    before = self._failing()
            known[key] = f
        if before is None:
            return []
        after = self._failing()
        alerts = []
        for name in CHECK_NAMES:
            if name in after and name not in before:
                new = after[name]
                alerts.append(HealthAlert(name, _SPEC[name].severity, new.message, new.value, new.threshold))
            elif self.emit_resolutions and name in before and name not in after:
                cur = self._current(name)
                value, threshold = (cur.value, cur.threshold) if cur is not None else (math.nan, math.nan)
                alerts.append(
                    HealthAlert(name, Severity.OK, f"resolved: {cur.message if cur else name}", value, threshold)
                )
        return alerts

    def last_findings_for(self, event: TelemetryEvent) -> tuple[Finding, ...] | None:
        """This monitor's findings for ``event`` if it was the last one observed, else None."""
        with self._lock:
            return self._last_findings if self._last_event is event else None

    def _failing(self) -> dict[str, Finding]:
        out: dict[str, Finding] = {}
        for (name, _), f in self._findings.items():
            if f.failing and name not in out:
                out[name] = f
        return out

    def _current(self, name: str) -> Finding | None:
        """The finding that describes a check now: a failing source first, else the latest."""
        latest = None
        for (n, _), f in self._findings.items():
            if n == name:
                if f.failing:
                    return f
                latest = f
        return latest

    def reset(self) -> None:
        """Forget all history and status (a new episode)."""
        self._history = HostHistory(self.thresholds.rolling_window_epochs)
        self._findings.clear()
        self._epoch = None
        self._last_event, self._last_findings = None, ()

    def status(self) -> dict[str, Severity]:
        """Per check: ``Severity.OK`` while passing (or not yet evaluated), else its severity."""
        with self._lock:
            failing = self._failing()
        return {n: (_SPEC[n].severity if n in failing else Severity.OK) for n in CHECK_NAMES}

    def report(self) -> HealthReport:
        """Every check's current state; ``overall`` is the worst failing severity, else OK."""
        defaults = alert_thresholds(self.thresholds)
        with self._lock:
            results = []
            for name in CHECK_NAMES:
                f = self._current(name)
                spec = _SPEC[name]
                if f is None:
                    results.append(HealthCheckResult(name, Severity.OK, True, math.nan, defaults[name], "no data yet"))
                else:
                    sev = spec.severity if f.failing else Severity.OK
                    results.append(HealthCheckResult(name, sev, not f.failing, f.value, f.threshold, f.message))
            epoch = self._epoch
        overall = max((r.severity for r in results), key=_SEVERITY_RANK.__getitem__, default=Severity.OK)
        return HealthReport(tuple(results), overall, epoch)


# --------------------------------------------------------------------------- task profiles (RL)

RETURN_NAMES: tuple[str, ...] = ("episodic_return", "episode_return", "return", "ep_return", "mean_return")
"""Logged names (or last ``/``-separated tag parts, e.g. CleanRL's ``charts/episodic_return``)
read as an episode's return by the return checks."""
LENGTH_NAMES: tuple[str, ...] = ("episodic_length", "episode_length", "ep_length", "ep_len")
"""Logged names read as an episode's length (steps)."""


@dataclass(frozen=True)
class TaskProfile:
    """What a task's headline numbers and health checks are (``karn_otel.init(task=...)``).

    ``host_checks``: the run's epochs close with a :class:`HostSnapshot`, so the host checks
    (loss spike, gradient explosion, accuracy drop) apply. ``return_checks``: the
    :class:`ReturnMonitor` watches logged episode returns. ``headline`` names the numbers a
    summary leads with.
    """

    task: str
    headline: tuple[str, ...]
    host_checks: bool
    return_checks: bool


TASK_PROFILES: dict[str, TaskProfile] = {
    "classification": TaskProfile("classification", ("val_accuracy", "val_loss", "train_loss"), True, False),
    "regression": TaskProfile("regression", ("val_loss", "train_loss"), True, False),
    "rl": TaskProfile("rl", ("episodic_return", "episodic_length"), False, True),
}


def task_profile(task: str) -> TaskProfile:
    """The profile of ``task``; an unknown task gets host checks on what it logs, and no
    return checks (it is not known to have episodes)."""
    return TASK_PROFILES.get(task, TaskProfile(task, ("val_loss", "train_loss"), True, False))


def return_name_kind(name: str) -> str | None:
    """``"return"`` or ``"length"`` when a logged name is an episode return / length, else None."""
    last = name.rsplit("/", 1)[-1]
    if last in RETURN_NAMES:
        return "return"
    if last in LENGTH_NAMES:
        return "length"
    return None


@dataclass(frozen=True)
class ReturnThresholds:
    """The return checks' thresholds (an RL task's replacement for the accuracy checks)."""

    window_episodes: int = 20
    """Episodes in the rolling mean of the return. CartPole-style returns vary by 2-5x from
    one episode to the next; over 20 episodes the mean's noise is ~5x smaller."""
    regression_fraction: float = 0.5
    """``return_regression`` fails when the rolling mean has lost more than this fraction
    of the improvement it had gained (best rolling mean minus the first one). Relative to
    the gain, so it means the same for returns of any sign and scale; half the gain lost is
    more than rolling-mean noise once the gain is real (see ``min_gain_episodes``)."""
    min_gain_episodes: int = 40
    """Episodes seen before a regression can be judged: two full windows, so the first and
    best means are over disjoint episodes."""
    noise_z: float = 4.0
    """Both the gain (best rolling mean minus the first) and the drop from the best must
    exceed ``noise_z`` standard errors of a difference of two window means (sqrt(2) x std /
    sqrt(window), with the spread of every return seen so far: a learning trend only widens it). Episode returns are noisy (CartPole's
    spread is about their mean) and the best of many rolling means sits above the truth by
    chance (the maximum of ~15 independent window means is ~1.7 standard errors up, rarely
    over 3.3), so a plain fraction fires on almost every flat run. With 4, simulated flat
    runs raise it in under 2% (tests/adapters/test_cleanrl_ppo.py measures it)."""

    def __post_init__(self) -> None:
        if isinstance(self.window_episodes, bool) or not (
            isinstance(self.window_episodes, int) and self.window_episodes >= 1
        ):
            raise ValueError(f"window_episodes must be an int >= 1, got {self.window_episodes!r}")
        if not 0.0 < self.regression_fraction <= 1.0:
            raise ValueError(f"regression_fraction must be in (0, 1], got {self.regression_fraction}")
        if isinstance(self.min_gain_episodes, bool) or not isinstance(self.min_gain_episodes, int):
            raise ValueError(f"min_gain_episodes must be an int, got {self.min_gain_episodes!r}")


RETURN_CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec(
        "non_finite_return",
        Severity.CRITICAL,
        "scalars",
        "",
        "gt",
        "count",
        "a logged episode return is NaN or infinite",
    ),
    CheckSpec(
        "return_regression",
        Severity.WARNING,
        "scalars",
        "regression_fraction",
        "gt",
        "fraction",
        "the rolling mean return lost more than a fraction of the improvement it had gained",
    ),
)
_RETURN_SPEC = {c.name: c for c in RETURN_CHECKS}


class ReturnMonitor(GuardedProcessor):
    """Return-based health of an RL run: a processor over logged episode returns (``Scalars``
    named as :data:`RETURN_NAMES`), wired by ``karn_otel.init(task="rl")``.

    Checks, edge-triggered like :class:`HealthMonitor`: ``non_finite_return`` (critical)
    and ``return_regression`` (warning; see :class:`ReturnThresholds`). The PPO statistics
    keep their own checks in :class:`HealthMonitor`.
    """

    WATCHED = frozenset({ET.SCALARS, ET.EPISODE_STARTED})

    def __init__(self, thresholds: ReturnThresholds | None = None, *, strict: bool = False) -> None:
        super().__init__(strict)
        self.thresholds = thresholds or ReturnThresholds()
        self.reset()

    def reset(self) -> None:
        self._recent: deque[float] = deque(maxlen=self.thresholds.window_episodes)
        self._first_mean: float | None = None
        self._best_mean = -math.inf
        self._episodes = 0
        self._mean = 0.0
        self._m2 = 0.0
        self._failing: dict[str, Finding] = {}
        self.latest: dict[str, float] = {}

    def _observe(self, event: TelemetryEvent) -> list[HealthAlert]:
        if event.event_type is ET.EPISODE_STARTED:
            self.reset()
            return []
        values = getattr(event.payload, "values", None)
        if not isinstance(values, Mapping):
            return []
        findings: list[Finding] = []
        for name, raw in values.items():
            if not isinstance(name, str) or return_name_kind(name) != "return":
                continue
            findings.extend(self._return(_num(raw)))
        return self._edges(findings)

    def _return(self, r: float) -> list[Finding]:
        t = self.thresholds
        if not _finite(r):
            return [Finding("non_finite_return", True, 1.0, 0.0, lambda: f"episode return is {r}")]
        out = [Finding("non_finite_return", False, 0.0, 0.0, "returns finite")]
        self._recent.append(r)
        self._episodes += 1
        delta = r - self._mean  # Welford: the spread of every return seen (a trend only widens it)
        self._mean += delta / self._episodes
        self._m2 += delta * (r - self._mean)
        self.latest = {"return": r, "episodes": float(self._episodes)}
        if len(self._recent) < t.window_episodes:
            return out
        mean = sum(self._recent) / len(self._recent)
        self.latest["return_mean"] = mean
        if self._first_mean is None:
            self._first_mean = mean
        self._best_mean = max(self._best_mean, mean)
        gain = self._best_mean - self._first_mean
        if self._episodes >= t.min_gain_episodes and gain > 0:
            lost = (self._best_mean - mean) / gain
            n = len(self._recent)
            sd = math.sqrt(self._m2 / (self._episodes - 1))
            noise = t.noise_z * math.sqrt(2.0 / n) * sd
            beyond_noise = gain > noise and self._best_mean - mean > noise
            # Hysteresis: a failing check recovers only below half the fraction (no flapping).
            limit = t.regression_fraction / 2 if "return_regression" in self._failing else t.regression_fraction
            first, best = self._first_mean, self._best_mean  # the message reads them as of now
            out.append(
                Finding(
                    "return_regression",
                    lost > limit and beyond_noise,
                    lost,
                    t.regression_fraction,
                    lambda: (
                        f"mean return over {n} episodes {mean:.4g} has lost {100 * lost:.0f}% of "
                        f"the gain from {first:.4g} to its best {best:.4g}"
                    ),
                )
            )
        return out

    def _edges(self, findings: list[Finding]) -> list[HealthAlert]:
        alerts = []
        for f in findings:
            was = f.check in self._failing
            if f.failing and not was:
                self._failing[f.check] = f
                spec = _RETURN_SPEC[f.check]
                alerts.append(HealthAlert(f.check, spec.severity, f.message, f.value, f.threshold))
            elif not f.failing and was:
                del self._failing[f.check]
        return alerts

    def status(self) -> dict[str, Severity]:
        """Per return check: ``Severity.OK`` while passing, else its severity."""
        with self._lock:
            return {c.name: (c.severity if c.name in self._failing else Severity.OK) for c in RETURN_CHECKS}
