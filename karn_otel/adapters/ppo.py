"""PPOLogger: the PPO statistics of an RL loop from the tensors PPO already has.

Feed it every minibatch of an update (log-ratios come from the new and old log-probs), then
call :meth:`PPOLogger.emit` once per update: one host-device sync, one
:class:`~karn_otel.contracts.PPOUpdateStats` (approx KL, explained variance, advantage and
ratio statistics, per-head entropy, clip rates), which Karn's PPO health checks read
(``kl_too_high``, ``explained_variance_negative``, ``value_collapse``, ``entropy_collapse``).
The math is :class:`karn_otel.torch.ppo.PPOStatsAccumulator`'s; definitions are there.

CleanRL's ``ppo.py`` (one action head, 1-D tensors)::

    ppo = PPOLogger(run, heads=("action",), clip_eps=args.clip_coef)
    for epoch in range(args.update_epochs):
        for start in range(0, args.batch_size, args.minibatch_size):
            ...
            ppo.update(new_logp=newlogprob.detach(), old_logp=b_logprobs[mb_inds],
                       advantages=b_advantages[mb_inds], values=b_values[mb_inds],
                       returns=b_returns[mb_inds], entropy=entropy.detach(),
                       policy_loss=pg_loss.detach(), value_loss=v_loss.detach())
    ppo.emit(update_index=iteration)

Pass the advantages *before* per-minibatch normalisation (CleanRL normalises inside the
minibatch loop, so ``b_advantages[mb_inds]`` is the raw one), or the advantage statistics
and the value-collapse check lose their meaning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from karn_otel.contracts import PPOUpdateStats
from karn_otel.torch.ppo import PPOStatsAccumulator

__all__ = ["PPOLogger"]

log = logging.getLogger("karn")


class PPOLogger:
    """Accumulates PPO minibatches on their device; :meth:`emit` syncs once per update.

    ``run``: a :class:`karn_otel.api.Run` (None: the active collector, ``karn_otel.emit``).
    ``heads``: action head names; a single head takes 1-D ``[B]`` log-prob and entropy
    tensors, several take ``[B, H]`` or ``{head: [B]}``. ``clip_eps``: PPO's ratio clip;
    ``adv_clip``: the advantage magnitude counted as clipped. Never raises into the loop in
    lenient mode: a minibatch of the wrong shape is skipped, counted and reported once.
    """

    def __init__(
        self,
        run: Any = None,
        heads: Sequence[str] = ("action",),
        *,
        clip_eps: float = 0.2,
        adv_clip: float = 10.0,
        device: Any = "cpu",
    ) -> None:
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        self.run = run
        self.acc = PPOStatsAccumulator(heads, clip_eps, adv_clip, device=device)
        self.heads = self.acc.heads
        self.updates = 0
        self.skipped = 0
        self._device_set = device != "cpu"

    def update(
        self,
        *,
        new_logp: Any,
        old_logp: Any,
        advantages: torch.Tensor,
        values: torch.Tensor,
        returns: torch.Tensor,
        entropy: Any,
        head_mask: Any = None,
        policy_loss: torch.Tensor | None = None,
        value_loss: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        cell: torch.Tensor | None = None,
    ) -> bool:
        """Add one minibatch (no device sync). False when it was skipped (wrong shapes)."""
        try:
            if not self._device_set and isinstance(advantages, torch.Tensor) and advantages.device.type != "cpu":
                self.acc.device = advantages.device  # follow the loop's device on first use
                self.acc.reset()
                self._device_set = True
            self.acc.update(
                new_logp=self._matrix(new_logp),
                old_logp=self._matrix(old_logp),
                advantages=advantages.reshape(-1),
                values=values.reshape(-1),
                returns=returns.reshape(-1),
                entropy=self._matrix(entropy),
                head_mask=None if head_mask is None else self._matrix(head_mask),
                policy_loss=policy_loss,
                value_loss=value_loss,
                hidden=hidden,
                cell=cell,
            )
            return True
        except Exception as exc:  # noqa: BLE001 (telemetry never raises into training)
            if self._strict():
                raise
            self.skipped += 1
            self._reject("ppo_minibatch", f"Karn skipped a PPO minibatch: {exc} (further ones counted)")
            return False

    def emit(self, update_index: int | None = None) -> PPOUpdateStats | None:
        """The update's statistics (the one sync), recorded and returned; the state is reset.

        None when no minibatch was added since the last ``emit``."""
        idx = self.updates if update_index is None else int(update_index)
        if self.acc.minibatches == 0:
            return None
        try:
            stats = self.acc.compute(idx)
        finally:
            self.acc.reset()
        self.updates += 1
        if self.run is not None:
            self.run.emit(stats)
        else:
            import karn_otel

            karn_otel.emit(stats)
        return stats

    def _matrix(self, t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() == 1 and len(self.heads) == 1:
            return t.reshape(-1, 1)
        return t

    def _strict(self) -> bool:
        collector = self._collector()
        return bool(collector is not None and collector.config.strict)

    def _collector(self) -> Any:
        if self.run is not None:
            return self.run.collector
        from karn_otel.collector import get_collector

        return get_collector()

    def _reject(self, reason: str, message: str) -> None:
        collector = self._collector()
        if collector is None:
            log.warning(message)
            return
        collector.pipeline.rejected[reason] += 1
        collector.pipeline.report_once(f"api:{reason}", message)
