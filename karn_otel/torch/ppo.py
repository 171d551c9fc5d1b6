"""PPO diagnostics from tensors, accumulated on the device with one host sync per update.

Review P0 #1 (advantage and ratio statistics), P1 #6 (KL and explained variance) and P2 #9
(LSTM health) of the Karn design, as one :class:`~karn_otel.contracts.PPOUpdateStats` per
PPO update.

Split torchmetrics-style: the stateless math is :func:`_ppo_stats_update` (one minibatch ->
a vector of sums) and :func:`_ppo_stats_compute` (host floats -> the contract);
:class:`PPOStatsAccumulator` only owns state. Every state entry is a *sum over samples* (or
a running min), so accumulating minibatches is an addition and a cross-rank reduction is an
``all_reduce(SUM)`` of :attr:`PPOStatsAccumulator.sums` plus an ``all_reduce(MIN)`` of
:attr:`PPOStatsAccumulator.extrema` (see :meth:`PPOStatsAccumulator.merge`).

Definitions (per sample ``i``, head ``h``; ``m[i,h]`` is 1 where head ``h`` was relevant and
unmasked for sample ``i``, else 0):

* per-head log-ratio ``l[i,h] = m[i,h] * (new_logp[i,h] - old_logp[i,h])`` and ratio
  ``r[i,h] = exp(l[i,h])``; the joint ratio is ``r[i] = exp(sum_h l[i,h])`` — an excluded
  head contributes a factor 1, exactly as it contributes nothing to the PPO loss.
* ``kl_divergence`` and ``per_head_kl``: approximate KL(old || new) with the low-variance,
  always non-negative estimator ``k3 = (r - 1) - log r`` (Schulman, "Approximating KL
  Divergence", 2020; CleanRL's ``approx_kl``), averaged over samples (per head: over the
  samples where the head counts). Unit: nats.
* ``ratio_stats``: mean joint ratio, fraction of samples with ``r > 1 + clip_eps`` /
  ``r < 1 - clip_eps``, and per head the fraction of its relevant samples whose per-head
  ratio lies outside ``[1 - clip_eps, 1 + clip_eps]``.
* ``advantage_stats``: mean, population std (ddof=0), min, max of the advantages passed in,
  and the fraction with ``|A| > adv_clip``.
* ``explained_variance = 1 - Var(returns - values) / Var(returns)`` from running sums (exact
  under minibatching). As in torchmetrics/scikit-learn: 1.0 when both variances are 0, 0.0
  when only ``Var(returns)`` is 0. Variances below 1e-12 of the mean square are treated as 0
  (the float64 cancellation floor of the sums formula).
* ``value_variance``: population variance of the value predictions passed in.
* ``entropy``: per head, mean entropy (nats) over the samples where the head counts.
* ``lstm_health``: mean/std of hidden and cell state entries, fraction of hidden entries
  with ``|h| > 0.9`` (saturated tanh: vanishing gradients). ``None`` if no state was given.
* ``policy_loss``/``value_loss``: mean over the minibatches that passed them.

A head with no counted sample in the update (e.g. ``blueprint`` when nothing germinated)
reports ``nan`` for its entropy, KL and clip rate: the quantity is undefined, not zero.

Every minibatch of every update epoch counts: with ``update_epochs`` passes that each visit
every sample once, the advantage/value/return statistics equal those of the rollout.

Use from a CleanRL-style loop (``b_*`` are the flattened rollout tensors; ``logp`` and
``entropy`` are ``[batch, n_heads]`` in the order of ``heads``, ``head_mask`` is bool)::

    stats = PPOStatsAccumulator(["op", "slot", "blueprint"], clip_eps=args.clip_coef,
                                adv_clip=10.0, device=device)
    for epoch in range(args.update_epochs):
        np.random.shuffle(b_inds)
        for start in range(0, args.batch_size, args.minibatch_size):
            mb = b_inds[start:start + args.minibatch_size]
            newlogp, entropy, newvalue = agent.evaluate(b_obs[mb], b_actions[mb])
            ...  # pg_loss, v_loss, loss.backward(), optimizer.step() as usual
            stats.update(new_logp=newlogp.detach(), old_logp=b_logprobs[mb],
                         advantages=b_advantages[mb], values=b_values[mb],
                         returns=b_returns[mb], entropy=entropy.detach(),
                         head_mask=b_head_mask[mb], policy_loss=pg_loss.detach(),
                         value_loss=v_loss.detach())
    update_stats = stats.compute(update_index=iteration)   # the only host-device sync
    emit(update_stats)
    stats.reset()

instead of CleanRL's ``clipfracs += [...item()]`` and ``approx_kl.item()`` per minibatch.
This module needs nothing but torch and :mod:`karn_otel.contracts`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Union

import torch
from torch import Tensor

from karn_otel.contracts import AdvantageStats, LSTMHealth, PPOUpdateStats, RatioStats

SATURATION_THRESHOLD = 0.9
"""|h| above which an LSTM hidden unit counts as saturated (review P2 #9)."""

_VARIANCE_FLOOR = 1e-12
"""Relative floor under which a variance from running sums is indistinguishable from 0."""

HeadTensor = Union[Tensor, Mapping[str, Tensor]]
"""Per-sample per-head values: a ``[batch, n_heads]`` tensor (columns in ``heads`` order) or
a mapping ``head -> [batch]`` tensor."""

# Layout of the float64 sums vector: scalar sums first, then 4 per-head blocks of n_heads.
# Every entry is a sum over samples (or minibatches), so accumulation is elementwise `+`.
_SCALARS = (
    "n",  # samples
    "adv",
    "adv_sq",
    "adv_clipped",
    "ratio",
    "ratio_high",
    "ratio_low",
    "kl",
    "value",
    "value_sq",
    "ret",
    "ret_sq",
    "err",
    "err_sq",  # err = returns - values
    "policy_loss_n",
    "policy_loss",
    "value_loss_n",
    "value_loss",  # per minibatch that passed one
    "h_n",
    "h",
    "h_sq",
    "h_sat",
    "c_n",
    "c",
    "c_sq",
)
_I = {name: i for i, name in enumerate(_SCALARS)}
_HEAD_BLOCKS = ("head_n", "head_entropy", "head_kl", "head_clipped")


def _as_matrix(x: HeadTensor, heads: Sequence[str], name: str) -> Tensor:
    if isinstance(x, Mapping):
        missing = [h for h in heads if h not in x]
        if missing:
            raise ValueError(f"{name}: missing head(s) {missing}")
        return torch.stack([x[h] for h in heads], dim=1)
    if x.dim() != 2 or x.shape[1] != len(heads):
        raise ValueError(f"{name}: expected shape [batch, {len(heads)}], got {tuple(x.shape)}")
    return x


# ---------------------------------------------------------------------- functional core


def _ppo_stats_update(
    new_logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    values: Tensor,
    returns: Tensor,
    entropy: Tensor,
    head_mask: Tensor | None,
    clip_eps: float,
    adv_clip: float,
    policy_loss: Tensor | None = None,
    value_loss: Tensor | None = None,
    hidden: Tensor | None = None,
    cell: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One minibatch -> (sums vector, extrema ``[min A, -max A]``), all float64 on the device.

    Pure tensor ops: no ``.item()``, ``.tolist()``, ``float(tensor)`` or data-dependent
    Python branching, so nothing here waits for the device.
    """
    f64 = torch.float64
    if head_mask is None:
        head_mask = torch.ones_like(new_logp, dtype=torch.bool)
    m = head_mask.to(torch.bool)
    mf = m.to(f64)
    # torch.where, not a multiply: an excluded head may carry -inf log-probs (inf - inf = nan).
    logratio_h = torch.where(m, (new_logp.to(f64) - old_logp.to(f64)), 0.0)
    ratio_h = torch.exp(logratio_h)
    kl_h = (ratio_h - 1.0) - logratio_h
    outside_h = ((ratio_h - 1.0).abs() > clip_eps) & m
    logratio = logratio_h.sum(dim=1)
    ratio = torch.exp(logratio)
    a, v, y = advantages.to(f64), values.to(f64), returns.to(f64)
    err = y - v
    per_sample = torch.stack(
        [
            torch.ones_like(a),
            a,
            a * a,
            (a.abs() > adv_clip).to(f64),
            ratio,
            (ratio > 1.0 + clip_eps).to(f64),
            (ratio < 1.0 - clip_eps).to(f64),
            (ratio - 1.0) - logratio,
            v,
            v * v,
            y,
            y * y,
            err,
            err * err,
        ],
        dim=1,
    ).sum(dim=0)
    zero, one = per_sample.new_zeros(()), per_sample.new_ones(())
    losses = []
    for loss in (policy_loss, value_loss):
        losses += [zero, zero] if loss is None else [one, loss.detach().to(f64).reshape(())]
    lstm = [zero] * 7
    if hidden is not None:
        h = hidden.detach().to(f64)
        saturated = (h.abs() > SATURATION_THRESHOLD).sum().to(f64)
        lstm[0:4] = [h.new_full((), float(h.numel())), h.sum(), (h * h).sum(), saturated]
    if cell is not None:
        c = cell.detach().to(f64)
        lstm[4:7] = [c.new_full((), float(c.numel())), c.sum(), (c * c).sum()]
    per_head = torch.stack([mf, torch.where(m, entropy.to(f64), 0.0), kl_h, outside_h.to(f64)]).sum(dim=1)
    sums = torch.cat([per_sample, torch.stack(losses + lstm), per_head.reshape(-1)])
    amin, amax = torch.aminmax(a)
    return sums, torch.stack([amin, -amax])


def _variance(s: float, ss: float, n: float) -> float:
    """Population variance from a sum and a sum of squares; 0 below the cancellation floor."""
    if n <= 0:
        return math.nan
    mean_sq = ss / n
    var = mean_sq - (s / n) ** 2
    return 0.0 if var <= _VARIANCE_FLOOR * mean_sq else var


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _ppo_stats_compute(values: Sequence[float], heads: Sequence[str], update_index: int) -> PPOUpdateStats:
    """Host floats (the sums vector followed by the extrema) -> :class:`PPOUpdateStats`."""
    s = {name: values[i] for name, i in _I.items()}
    nh = len(heads)
    base = len(_SCALARS)
    block = {name: values[base + k * nh : base + (k + 1) * nh] for k, name in enumerate(_HEAD_BLOCKS)}
    adv_min, neg_adv_max = values[base + 4 * nh], values[base + 4 * nh + 1]
    n = s["n"]

    var_ret = _variance(s["ret"], s["ret_sq"], n)
    var_err = _variance(s["err"], s["err_sq"], n)
    if var_ret > 0:
        explained_variance = 1.0 - var_err / var_ret
    else:  # torchmetrics/scikit-learn convention for constant returns
        explained_variance = 1.0 if var_err == 0 else 0.0

    head_n = block["head_n"]
    lstm = None
    if s["h_n"] > 0:
        lstm = LSTMHealth(
            hidden_mean=s["h"] / s["h_n"],
            hidden_std=math.sqrt(_variance(s["h"], s["h_sq"], s["h_n"])),
            cell_mean=_div(s["c"], s["c_n"]),
            cell_std=math.sqrt(_variance(s["c"], s["c_sq"], s["c_n"])) if s["c_n"] > 0 else math.nan,
            saturation_fraction=s["h_sat"] / s["h_n"],
        )
    return PPOUpdateStats(
        update_index=int(update_index),
        policy_loss=_div(s["policy_loss"], s["policy_loss_n"]),
        value_loss=_div(s["value_loss"], s["value_loss_n"]),
        kl_divergence=s["kl"] / n,
        per_head_kl={h: _div(block["head_kl"][k], head_n[k]) for k, h in enumerate(heads)},
        explained_variance=explained_variance,
        entropy={h: _div(block["head_entropy"][k], head_n[k]) for k, h in enumerate(heads)},
        value_variance=_variance(s["value"], s["value_sq"], n),
        advantage_stats=AdvantageStats(
            mean=s["adv"] / n,
            std=math.sqrt(_variance(s["adv"], s["adv_sq"], n)),
            min=adv_min,
            max=-neg_adv_max,
            fraction_clipped=s["adv_clipped"] / n,
        ),
        ratio_stats=RatioStats(
            mean=s["ratio"] / n,
            fraction_clipped_high=s["ratio_high"] / n,
            fraction_clipped_low=s["ratio_low"] / n,
            per_head_clip_rates={h: _div(block["head_clipped"][k], head_n[k]) for k, h in enumerate(heads)},
        ),
        lstm_health=lstm,
    )


def approx_kl(new_logp: Tensor, old_logp: Tensor) -> Tensor:
    """Approximate KL(old || new) in nats, as a 0-d tensor: ``mean((r - 1) - log r)``.

    The k3 estimator: unbiased, non-negative per sample, lower variance than ``-log r``.
    """
    logratio = new_logp - old_logp
    return ((logratio.exp() - 1.0) - logratio).mean()


def explained_variance(values: Tensor, returns: Tensor) -> Tensor:
    """``1 - Var(returns - values) / Var(returns)`` as a 0-d tensor (not finite if Var(returns) = 0)."""
    return 1.0 - (returns - values).var(unbiased=False) / returns.var(unbiased=False)


# ---------------------------------------------------------------------- the accumulator


class PPOStatsAccumulator:
    """Device-side sums of PPO diagnostics over one update's minibatches; one sync in compute().

    ``heads`` names the action heads (the column order of per-head tensors), ``clip_eps`` is
    PPO's ratio clip (dimensionless), ``adv_clip`` the advantage magnitude counted as clipped
    (advantage units).

    State (torchmetrics' ``add_state`` with its ``dist_reduce_fx``):

    * :attr:`sums` — float64 ``[n_scalars + 4 * n_heads]``, reduced across ranks by SUM;
    * :attr:`extrema` — float64 ``[min A, -max A]``, reduced across ranks by MIN.
    """

    def __init__(
        self,
        heads: Sequence[str],
        clip_eps: float = 0.2,
        adv_clip: float = 10.0,
        device: torch.device | str = "cpu",
    ) -> None:
        if not heads:
            raise ValueError("heads must name at least one action head")
        if len(set(heads)) != len(heads):
            raise ValueError(f"duplicate head names in {list(heads)}")
        if not clip_eps > 0:
            raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
        if not adv_clip > 0:
            raise ValueError(f"adv_clip must be > 0, got {adv_clip}")
        self.heads = tuple(heads)
        self.clip_eps = float(clip_eps)
        self.adv_clip = float(adv_clip)
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Zero the state for the next update."""
        self.sums = torch.zeros(len(_SCALARS) + 4 * len(self.heads), dtype=torch.float64, device=self.device)
        self.extrema = torch.full((2,), math.inf, dtype=torch.float64, device=self.device)
        self.minibatches = 0  # a host counter: known without asking the device

    @torch.compiler.disable  # telemetry must not be traced into (or break) a compiled step
    @torch.no_grad()
    def update(
        self,
        *,
        new_logp: HeadTensor,
        old_logp: HeadTensor,
        advantages: Tensor,
        values: Tensor,
        returns: Tensor,
        entropy: HeadTensor,
        head_mask: HeadTensor | None = None,
        policy_loss: Tensor | None = None,
        value_loss: Tensor | None = None,
        hidden: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> None:
        """Add one minibatch. Never synchronises with the device.

        Args:
            new_logp: log-probabilities (nats) of the taken actions under the current policy,
                per sample and head, ``[B, H]`` or ``{head: [B]}``.
            old_logp: the same under the rollout policy.
            advantages: ``[B]`` advantages (reward units) — pass them *before* any
                normalisation if the statistics should mean something across updates.
            values: ``[B]`` value predictions (reward units); CleanRL's explained variance
                uses the rollout-time values ``b_values[mb]``.
            returns: ``[B]`` value targets (reward units).
            entropy: per-sample per-head entropy (nats) of the current policy.
            head_mask: bool, ``True`` where the head was relevant and unmasked for the
                sample (e.g. False for the blueprint head unless the op was GERMINATE).
                ``None``: every head counts.
            policy_loss, value_loss: this minibatch's losses (0-d tensors), averaged over the
                minibatches that pass them.
            hidden, cell: LSTM states seen in this minibatch, any shape.
        """
        new = _as_matrix(new_logp, self.heads, "new_logp")
        old = _as_matrix(old_logp, self.heads, "old_logp")
        ent = _as_matrix(entropy, self.heads, "entropy")
        mask = None if head_mask is None else _as_matrix(head_mask, self.heads, "head_mask")
        b = new.shape[0]
        if b == 0:
            raise ValueError("empty minibatch")
        for name, t in (("old_logp", old), ("entropy", ent), ("head_mask", mask)):
            if t is not None and t.shape != new.shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)} != new_logp {tuple(new.shape)}")
        for name, t in (("advantages", advantages), ("values", values), ("returns", returns)):
            if t.shape != (b,):
                raise ValueError(f"{name}: expected shape ({b},), got {tuple(t.shape)}")
        sums, extrema = _ppo_stats_update(
            new,
            old,
            advantages,
            values,
            returns,
            ent,
            mask,
            self.clip_eps,
            self.adv_clip,
            policy_loss,
            value_loss,
            hidden,
            cell,
        )
        self.sums.add_(sums)
        torch.minimum(self.extrema, extrema, out=self.extrema)
        self.minibatches += 1

    def merge(self, other: PPOStatsAccumulator) -> None:
        """Fold another accumulator (another rank, another shard) into this one.

        The same reduction ``torch.distributed`` would do: SUM of ``sums``, MIN of ``extrema``.
        """
        if other.heads != self.heads:
            raise ValueError(f"heads differ: {other.heads} vs {self.heads}")
        self.sums.add_(other.sums.to(self.device))
        torch.minimum(self.extrema, other.extrema.to(self.device), out=self.extrema)
        self.minibatches += other.minibatches

    def compute(self, update_index: int) -> PPOUpdateStats:
        """Materialise the update's statistics: exactly one device-to-host transfer."""
        if self.minibatches == 0:
            raise ValueError("compute() called before any update(): no minibatch to report")
        host = torch.cat([self.sums, self.extrema]).tolist()  # the one sync
        return _ppo_stats_compute(host, self.heads, update_index)


def ppo_update_stats(
    heads: Sequence[str],
    update_index: int,
    clip_eps: float = 0.2,
    adv_clip: float = 10.0,
    **minibatch: Tensor | Mapping[str, Tensor] | None,
) -> PPOUpdateStats:
    """One-shot statistics of a single batch (the keyword arguments of ``update``)."""
    acc = PPOStatsAccumulator(heads, clip_eps, adv_clip, device=_first_device(minibatch))
    acc.update(**minibatch)  # type: ignore[arg-type]
    return acc.compute(update_index)


def _first_device(tensors: Mapping[str, object]) -> torch.device:
    for t in tensors.values():
        if isinstance(t, Tensor):
            return t.device
        if isinstance(t, Mapping):
            return _first_device(t)
    return torch.device("cpu")


__all__ = [
    "PPOStatsAccumulator",
    "SATURATION_THRESHOLD",
    "approx_kl",
    "explained_variance",
    "ppo_update_stats",
]
