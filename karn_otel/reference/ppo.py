"""Simic's role: PPO training of the Tamiyo controller (a recurrent, factored-action policy).

Reads top to bottom like CleanRL's ``ppo.py``: the config, the observation, the action
masks, the network, the reward, GAE, then :class:`PPOController`, which samples one decision
per epoch, stores the transition and runs clipped PPO updates on rollouts of decisions
gathered across episodes (the controller persists; only its LSTM state is per episode).

How the trainer drives it (epoch ``e`` sees ``obs_e``; the reward of decision ``a_e`` is
known once the next epoch has trained)::

    ppo = PPOController(PPOConfig(seed=0), slot_ids, BLUEPRINTS)
    for episode in ...:
        ppo.reset_episode()
        prev = None
        for epoch in ...:
            obs = trainer.observation(...)
            if prev is not None:
                ppo.record_reward(compute_reward(prev_obs, obs, prev, ppo.cfg), done=False)
                stats = ppo.maybe_update()          # PPOUpdateStats or None; emit it
            prev, reason = ppo.decide(obs)          # ppo.last_decision -> PolicySnapshot
            prev_obs = obs
        ppo.record_reward(final_components, done=True)
        stats = ppo.maybe_update()

Rollouts: a transition is *ready* once its reward is recorded and the value of its successor
is known (the next decision exists) or it ended the episode (``done``). An update runs when
``rollout_length`` transitions are ready, at an episode end if ``update_at_episode_end``, or
on ``maybe_update(force=True)``. The newest, not yet ready transition stays in the buffer and
opens the next rollout. Minibatches are sets of time steps; each minibatch re-runs the LSTM
over the whole rollout from its stored initial state (resetting at episode starts), so the
gradient flows through time exactly as in CleanRL's ``ppo_atari_lstm.py``.

Randomness: the network is initialised under ``torch.random.fork_rng`` from ``cfg.seed`` and
every sample / minibatch permutation uses the controller's own ``torch.Generator``, so the
global torch RNG — and therefore the host's training — is the same with or without PPO.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from karn_otel.contracts import ActionOp, FactoredAction, PPOUpdateStats, RewardComponentsTelemetry, SeedStage
from karn_otel.reference.controller import ControllerObservation
from karn_otel.torch.ppo import PPOStatsAccumulator

HEADS = ("op", "slot", "blueprint", "blend")
OPS = (ActionOp.WAIT, ActionOp.GERMINATE, ActionOp.FOSSILIZE, ActionOp.CULL)
STAGES = tuple(SeedStage)
LIVE_STAGES = (SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.PROBATIONARY)
ACCURACY_DELTAS = 3
"""How many recent epoch-over-epoch accuracy deltas the observation carries."""
COLLAPSE_LOGIT_SCALE = 1e6
"""Logit sharpening of the ``force_entropy_collapse`` fault, in per-head standard deviations
of the logits (see :meth:`PPOController._logits`)."""


@dataclass(frozen=True)
class PPOConfig:
    seed: int = 0
    """seeds the network initialisation and the controller's own sampling generator"""
    lr: float = 3e-4
    """Adam learning rate"""
    gamma: float = 0.99
    """discount per decision (one decision per epoch)"""
    gae_lambda: float = 0.95
    """lambda of generalised advantage estimation"""
    clip_eps: float = 0.2
    """PPO ratio clip: the surrogate ignores ratios outside [1 - clip_eps, 1 + clip_eps]"""
    adv_clip: float = 10.0
    """raw advantages are clipped to +-adv_clip (reward units) before normalisation"""
    norm_adv: bool = True
    """normalise the (clipped) advantages over the rollout to mean 0, std 1"""
    ent_coef: float = 0.01
    """weight of the entropy bonus (summed over the relevant heads)"""
    vf_coef: float = 0.5
    """weight of the value loss"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    update_epochs: int = 4
    """passes over the rollout per update"""
    minibatch_size: int = 8
    """decisions per minibatch"""
    rollout_length: int = 16
    """ready decisions that trigger an update"""
    update_at_episode_end: bool = False
    """also update when an episode ends with fewer than rollout_length ready decisions"""
    hidden_size: int = 64
    """width of the encoder and of the LSTM"""
    blend_schedules: tuple[str, ...] = ("linear", "sigmoid")
    """choices of the blend head (recorded in the action; the reference slots blend linearly)"""
    accuracy_scale: float = 10.0
    """reward per unit of validation-accuracy gain (fraction): +1 pt of accuracy = +0.1"""
    param_cost: float = 0.05
    """reward cost per epoch of seed parameters, per host-size of parameters"""
    fossilize_bonus: float = 0.5
    """lifecycle bonus for fossilizing a seed with positive contribution (negative otherwise)"""
    cull_bonus: float = 0.1
    """lifecycle bonus for culling a seed with contribution <= 0 (negative otherwise)"""
    invalid_penalty: float = 0.5
    """penalty for an action that is illegal under the masks or did not take effect"""
    force_entropy_collapse: bool = False
    """fault injection: every head's logits are sharpened by COLLAPSE_LOGIT_SCALE (the policy
    takes its arg-max with probability ~1) and ent_coef is treated as 0, so Karn's
    entropy-collapse detection can be exercised"""
    device: str = "cpu"
    """where the network lives and updates run"""

    def __post_init__(self) -> None:
        for name in ("lr", "clip_eps", "adv_clip", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.gae_lambda <= 1.0):
            raise ValueError("gamma and gae_lambda must lie in [0, 1]")
        for name in ("update_epochs", "minibatch_size", "rollout_length", "hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.blend_schedules:
            raise ValueError("blend_schedules must not be empty")

    @property
    def effective_ent_coef(self) -> float:
        return 0.0 if self.force_entropy_collapse else self.ent_coef


# ---------------------------------------------------------------------- observation


def observation_size(n_slots: int) -> int:
    """Length of :func:`observation_vector` for ``n_slots`` slots."""
    return 3 + ACCURACY_DELTAS + n_slots * (len(STAGES) + 6)


def observation_vector(obs: ControllerObservation, slot_ids: Sequence[str] | None = None) -> list[float]:
    """The policy's input: a fixed-length list of floats, roughly in [-1, 1].

    Global: epoch / max_epochs, val accuracy (fraction), val loss (nats, capped at 10), the
    last ``ACCURACY_DELTAS`` epoch-over-epoch accuracy deltas x10 (newest first, 0-padded).
    Per slot (in ``slot_ids`` order, default the observation's): one-hot stage, alpha,
    contribution (removal cost, fraction x10; 0 when not measured), epochs_in_stage / 10,
    consecutive gate failures / 4, log1p(seed params) / log1p(host params), and 1 if the
    contribution was measured.
    """
    by_id = {s.slot_id: s for s in obs.slots}
    order = list(slot_ids) if slot_ids is not None else [s.slot_id for s in obs.slots]
    hist = obs.accuracy_history
    deltas = [hist[-1 - k] - hist[-2 - k] for k in range(min(ACCURACY_DELTAS, len(hist) - 1))]
    deltas += [0.0] * (ACCURACY_DELTAS - len(deltas))
    vec = [obs.epoch / max(obs.max_epochs, 1), obs.val_accuracy, min(obs.val_loss, 10.0)]
    vec += [10.0 * d for d in deltas]
    log_host = math.log1p(max(obs.host_params, 1))
    for sid in order:
        s = by_id[sid]
        vec += [1.0 if s.stage is st else 0.0 for st in STAGES]
        vec += [
            s.alpha,
            0.0 if s.contribution is None else 10.0 * s.contribution,
            s.epochs_in_stage / 10.0,
            s.consecutive_gate_failures / 4.0,
            math.log1p(s.seed_params) / log_host,
            0.0 if s.contribution is None else 1.0,
        ]
    return [float(x) for x in vec]


# ---------------------------------------------------------------------- action masks


def legal_slots(obs: ControllerObservation, op: ActionOp, slot_ids: Sequence[str]) -> list[bool]:
    """Which slots ``op`` may target: GERMINATE a DORMANT slot, FOSSILIZE a PROBATIONARY seed,
    CULL a live seed (germinated .. probationary). WAIT targets no slot (all False)."""
    stage = {s.slot_id: s.stage for s in obs.slots}
    if op is ActionOp.GERMINATE:
        ok = (SeedStage.DORMANT,)
    elif op is ActionOp.FOSSILIZE:
        ok = (SeedStage.PROBATIONARY,)
    elif op is ActionOp.CULL:
        ok = LIVE_STAGES
    else:
        ok = ()
    return [stage[sid] in ok for sid in slot_ids]


def legal_ops(obs: ControllerObservation, slot_ids: Sequence[str]) -> list[bool]:
    """WAIT is always legal; any other op is legal iff it has a legal slot."""
    return [op is ActionOp.WAIT or any(legal_slots(obs, op, slot_ids)) for op in OPS]


def is_legal(action: FactoredAction, obs: ControllerObservation, slot_ids: Sequence[str]) -> bool:
    if action.op is ActionOp.WAIT:
        return True
    return action.slot in slot_ids and legal_slots(obs, action.op, slot_ids)[list(slot_ids).index(action.slot)]


# ---------------------------------------------------------------------- the network


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class RecurrentActorCritic(nn.Module):
    """obs -> tanh encoder -> LSTM cell -> one linear head per action head + a value head."""

    def __init__(self, obs_dim: int, hidden: int, head_sizes: dict[str, int]) -> None:
        super().__init__()
        self.hidden = hidden
        self.encoder = nn.Sequential(layer_init(nn.Linear(obs_dim, hidden)), nn.Tanh())
        self.lstm = nn.LSTMCell(hidden, hidden)
        for name, p in self.lstm.named_parameters():
            if "bias" in name:
                nn.init.constant_(p, 0.0)
            else:
                nn.init.orthogonal_(p, 1.0)
        # Small actor init (CleanRL): near-uniform policies at the start.
        self.actor = nn.ModuleDict({h: layer_init(nn.Linear(hidden, n), std=0.01) for h, n in head_sizes.items()})
        self.critic = layer_init(nn.Linear(hidden, 1), std=1.0)

    def initial_state(self, device: torch.device) -> tuple[Tensor, Tensor]:
        z = torch.zeros(1, self.hidden, device=device)
        return z, z.clone()

    def unroll(
        self, obs: Tensor, starts: Sequence[bool], state: tuple[Tensor, Tensor]
    ) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """Run ``[T, obs_dim]`` through time from ``state``; zero the state where ``starts[t]``.

        Returns per-head logits ``[T, n_head]``, values ``[T]``, hidden and cell ``[T, hidden]``.
        """
        x = self.encoder(obs)
        h, c = state
        hs, cs = [], []
        for t in range(x.shape[0]):
            if starts[t]:  # a host-side flag: no device sync
                h, c = torch.zeros_like(h), torch.zeros_like(c)
            h, c = self.lstm(x[t : t + 1], (h, c))
            hs.append(h)
            cs.append(c)
        hidden, cell = torch.cat(hs), torch.cat(cs)
        logits = {name: head(hidden) for name, head in self.actor.items()}
        return logits, self.critic(hidden).squeeze(-1), hidden, cell


def masked_log_softmax(logits: Tensor, legal: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probabilities over the legal choices and the entropy (nats) of that distribution."""
    logp = torch.log_softmax(logits.masked_fill(~legal, torch.finfo(logits.dtype).min), dim=-1)
    # Illegal entries have p = 0 and a huge negative logp; where() keeps 0 * logp out of it.
    entropy = -torch.where(legal, logp.exp() * logp, 0.0).sum(-1) + 0.0  # + 0.0: no "-0.0" nats
    return logp, entropy


# ---------------------------------------------------------------------- reward


def compute_reward(
    prev_obs: ControllerObservation,
    obs: ControllerObservation,
    action: FactoredAction,
    cfg: PPOConfig | None = None,
) -> RewardComponentsTelemetry:
    """The reward of ``action`` taken on ``prev_obs``, judged on the next observation ``obs``.

    * accuracy_gain: ``accuracy_scale * (val_acc - prev val_acc)``.
    * parameter_cost: ``-param_cost * seed params / host params`` of the seeds alive or
      fossilized in ``obs`` (a rent per epoch, so a useless seed keeps costing).
    * lifecycle_bonus: ``+fossilize_bonus`` for a fossilization of a seed whose measured
      contribution was > 0 (``-fossilize_bonus`` if it was <= 0 or unmeasured);
      ``+cull_bonus`` for culling a seed whose contribution was <= 0 or unmeasured
      (``-cull_bonus`` for culling a contributor).
    * invalid_action_penalty: ``-invalid_penalty`` if the action was illegal under the
      masks of ``prev_obs`` or did not take effect (a gate refused it).
    """
    cfg = cfg or PPOConfig()
    slot_ids = [s.slot_id for s in prev_obs.slots]
    before = {s.slot_id: s for s in prev_obs.slots}
    after = {s.slot_id: s for s in obs.slots}
    live = LIVE_STAGES + (SeedStage.FOSSILIZED,)
    seed_params = sum(s.seed_params for s in obs.slots if s.stage in live)
    accuracy_gain = cfg.accuracy_scale * (obs.val_accuracy - prev_obs.val_accuracy)
    parameter_cost = -cfg.param_cost * seed_params / max(obs.host_params, 1)

    lifecycle, invalid = 0.0, 0.0
    if not is_legal(action, prev_obs, slot_ids):
        invalid = -cfg.invalid_penalty
    elif action.op is not ActionOp.WAIT:
        was, now = before[action.slot], after[action.slot]
        contributes = was.contribution is not None and was.contribution > 0
        if action.op is ActionOp.GERMINATE:
            took = now.stage is not SeedStage.DORMANT
        elif action.op is ActionOp.FOSSILIZE:
            took = now.stage is SeedStage.FOSSILIZED
            lifecycle = cfg.fossilize_bonus if contributes else -cfg.fossilize_bonus
        else:  # CULL: the slot is CULLED, or already freed to DORMANT by the next epoch
            took = now.stage in (SeedStage.CULLED, SeedStage.DORMANT)
            lifecycle = -cfg.cull_bonus if contributes else cfg.cull_bonus
        if not took:
            lifecycle, invalid = 0.0, -cfg.invalid_penalty
    return RewardComponentsTelemetry(
        accuracy_gain=float(accuracy_gain),
        parameter_cost=float(parameter_cost),
        lifecycle_bonus=float(lifecycle),
        invalid_action_penalty=float(invalid),
    )


# ---------------------------------------------------------------------- GAE


def gae(
    rewards: Tensor, values: Tensor, next_values: Tensor, dones: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over one rollout; returns (advantages, returns).

    ``next_values[t]`` is the value of the state after decision ``t`` (ignored where done).
    """
    not_done = 1.0 - dones
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] * not_done[t] - values[t]
        last = delta + gamma * lam * not_done[t] * last
        advantages[t] = last
    return advantages, advantages + values


# ---------------------------------------------------------------------- the controller


@dataclass(frozen=True)
class DecisionInfo:
    """The policy internals behind the last decision (what a PolicySnapshot records).

    ``action_log_probs`` and ``entropy`` (nats) hold only the heads that mattered for the
    action: op always; slot unless WAIT; blueprint and blend only for GERMINATE.
    ``action_was_masked`` is True when the masks left exactly one legal choice in every head
    that mattered, i.e. the action was forced (e.g. only WAIT was legal) and the policy had
    no say; ``forced_heads`` names the heads that individually had a single legal choice.
    """

    decision_index: int
    observation_vector: tuple[float, ...]
    action: FactoredAction
    action_log_probs: dict[str, float]
    action_was_masked: bool
    value_estimate: float
    entropy: dict[str, float]
    forced_heads: tuple[str, ...] = ()


@dataclass
class _Transition:
    obs: Tensor  # [obs_dim]
    actions: Tensor  # [n_heads] long
    legal: dict[str, Tensor]  # head -> [n_choices] bool, as used when sampling
    relevant: Tensor  # [n_heads] bool
    logp: Tensor  # [n_heads], 0 where not relevant
    value: Tensor  # 0-d
    index: int  # decision_index
    start: bool  # first decision of an episode: the LSTM state was reset before it
    state: tuple[Tensor, Tensor]  # LSTM state before this decision
    reward: float | None = None
    done: bool = False


def _adam(params, lr: float) -> torch.optim.Adam:
    """Adam, fused where this torch supports it: the fused step keeps its step count on the
    device, while the foreach path calls ``.item()`` on it for every parameter every step."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, eps=1e-5, fused=True)
    except (RuntimeError, ValueError):  # torch < 2.4 has no fused CPU Adam
        return torch.optim.Adam(params, lr=lr, eps=1e-5)


class PPOController:
    """A learned Tamiyo: samples factored actions under masks and trains itself with PPO."""

    name = "ppo"

    def __init__(self, cfg: PPOConfig, slot_ids: Sequence[str], blueprints: Sequence[str]) -> None:
        if not slot_ids or not blueprints:
            raise ValueError("slot_ids and blueprints must not be empty")
        self.cfg = cfg
        self.slot_ids = tuple(slot_ids)
        self.blueprints = tuple(blueprints)
        self.device = torch.device(cfg.device)
        self.head_sizes = {
            "op": len(OPS),
            "slot": len(self.slot_ids),
            "blueprint": len(self.blueprints),
            "blend": len(cfg.blend_schedules),
        }
        # Initialise from cfg.seed without touching (or depending on) the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = RecurrentActorCritic(observation_size(len(self.slot_ids)), cfg.hidden_size, self.head_sizes)
        self.net = net.to(self.device)
        self.optimizer = _adam(self.net.parameters(), cfg.lr)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.last_decision: DecisionInfo | None = None
        self.updates = 0
        self.decisions = 0
        self._buffer: list[_Transition] = []
        self._last_advantages: Tensor | None = None
        self._last_advantages_list: list[float] | None = None
        self.last_update_decisions: tuple[int, ...] | None = None
        """``decision_index`` of each decision in the last update (``last_advantages()`` order)"""
        self.reset_episode()

    # -- acting -----------------------------------------------------------------------

    def reset_episode(self) -> None:
        """Start a new episode: fresh LSTM state; the previous episode's last decision is
        closed (``done``; a truncated episode is treated as terminated) and a decision still
        waiting for its reward is dropped."""
        if self._buffer and self._buffer[-1].reward is None:
            self._buffer.pop()
        if self._buffer:
            self._buffer[-1].done = True
        self._state = self.net.initial_state(self.device)
        self._episode_start = True

    def _logits(self, logits: Tensor) -> Tensor:
        """The logits actually sampled from (identity unless ``force_entropy_collapse``).

        The fault rescales each head's logits by ``COLLAPSE_LOGIT_SCALE`` over their
        (detached) standard deviation: a plain x1e3 is not enough, because the small actor
        init leaves logit gaps of ~1e-4. After rescaling, any two choices more than 1e-4
        standard deviations apart differ by > 100 nats, so the entropy is ~0.
        """
        if not self.cfg.force_entropy_collapse:
            return logits
        spread = logits.detach().std(dim=-1, keepdim=True, correction=0) + 1e-12
        return (logits - logits.detach().amax(dim=-1, keepdim=True)) * (COLLAPSE_LOGIT_SCALE / spread)

    def _masks(self, obs: ControllerObservation) -> tuple[list[bool], list[list[bool]]]:
        """Legal ops, and per op the legal slots (WAIT: every slot, as a placeholder)."""
        ops = legal_ops(obs, self.slot_ids)
        placeholder = [True] * len(self.slot_ids)
        slots = [placeholder if op is ActionOp.WAIT else legal_slots(obs, op, self.slot_ids) for op in OPS]
        return ops, slots

    @torch.no_grad()
    def decide(self, obs: ControllerObservation) -> tuple[FactoredAction, str]:
        """Sample an action under the masks and store the transition (one host sync)."""
        if self._buffer and self._buffer[-1].reward is None:
            raise RuntimeError("decide() called twice without record_reward() for the previous decision")
        if {s.slot_id for s in obs.slots} != set(self.slot_ids):
            raise ValueError(f"observation slots {[s.slot_id for s in obs.slots]} != {list(self.slot_ids)}")
        dev = self.device
        vec = observation_vector(obs, self.slot_ids)
        x = torch.tensor(vec, dtype=torch.float32, device=dev)
        if self._episode_start:
            self._state = self.net.initial_state(dev)
        state_before = self._state
        logits, value, h, c = self.net.unroll(x[None], [False], state_before)
        self._state = (h, c)

        op_legal, slot_legal = self._masks(obs)
        legal = {
            "op": torch.tensor(op_legal, device=dev),
            "slot": None,  # depends on the sampled op
            "blueprint": torch.ones(self.head_sizes["blueprint"], dtype=torch.bool, device=dev),
            "blend": torch.ones(self.head_sizes["blend"], dtype=torch.bool, device=dev),
        }
        logp_op, ent_op = masked_log_softmax(self._logits(logits["op"][0]), legal["op"])
        # Indices stay tensors until the single transfer below (index_select/gather, not
        # t[tensor], which would ask the device for the index).
        op = torch.multinomial(logp_op.exp(), 1, generator=self.generator)
        legal["slot"] = torch.tensor(slot_legal, device=dev).index_select(0, op)[0]
        actions, logps, ents = [op], [logp_op.gather(0, op)], [ent_op[None]]
        for head in ("slot", "blueprint", "blend"):
            lp, ent = masked_log_softmax(self._logits(logits[head][0]), legal[head])
            a = torch.multinomial(lp.exp(), 1, generator=self.generator)
            actions.append(a)
            logps.append(lp.gather(0, a))
            ents.append(ent[None])
        actions_t = torch.cat(actions)
        # One transfer for everything the host needs (indices, log-probs, entropies, value).
        logps_t = torch.cat(logps)
        host = torch.cat([actions_t.to(torch.float32), logps_t, torch.cat(ents), value]).tolist()
        n = len(HEADS)
        idx = [int(v) for v in host[:n]]
        op_enum = OPS[idx[0]]
        relevant = [True, op_enum is not ActionOp.WAIT, op_enum is ActionOp.GERMINATE, op_enum is ActionOp.GERMINATE]
        relevant_t = torch.tensor(relevant, device=dev)
        action = FactoredAction(
            op=op_enum,
            slot=self.slot_ids[idx[1]] if relevant[1] else None,
            blueprint=self.blueprints[idx[2]] if relevant[2] else None,
            blend=self.cfg.blend_schedules[idx[3]] if relevant[3] else None,
        )
        n_legal = dict(self.head_sizes, op=sum(op_legal), slot=sum(slot_legal[idx[0]]))
        forced = tuple(hd for hd, rel in zip(HEADS, relevant) if rel and n_legal[hd] == 1)
        was_masked = all(n_legal[hd] == 1 for hd, rel in zip(HEADS, relevant) if rel)
        log_probs = {hd: host[n + k] for k, hd in enumerate(HEADS) if relevant[k]}
        entropy = {hd: host[2 * n + k] for k, hd in enumerate(HEADS) if relevant[k]}
        value_f = host[3 * n]

        self._buffer.append(
            _Transition(
                obs=x,
                actions=actions_t,
                legal=legal,
                relevant=relevant_t,
                logp=torch.where(relevant_t, logps_t, 0.0),
                value=value[0],
                index=self.decisions,
                start=self._episode_start,
                state=state_before,
            )
        )
        self._episode_start = False
        self.last_decision = DecisionInfo(
            decision_index=self.decisions,
            observation_vector=tuple(vec),
            action=action,
            action_log_probs=log_probs,
            action_was_masked=was_masked,
            value_estimate=value_f,
            entropy=entropy,
            forced_heads=forced,
        )
        self.decisions += 1
        if was_masked:
            reason = "forced by the action mask"
        else:
            reason = f"sampled p={math.exp(sum(log_probs.values())):.2f}, V={value_f:+.3f}"
        return action, reason

    def record_reward(self, components: RewardComponentsTelemetry, done: bool) -> float:
        """Attach the reward of the last decision; ``done`` ends the episode. Returns the total."""
        if not self._buffer or self._buffer[-1].reward is not None:
            raise RuntimeError("record_reward() without a decision waiting for its reward")
        total = float(components.total)
        if not math.isfinite(total):
            raise ValueError(f"reward must be finite, got {components}")
        self._buffer[-1].reward = total
        self._buffer[-1].done = bool(done)
        if done:
            self._episode_start = True
        return total

    # -- learning ---------------------------------------------------------------------

    def _ready(self) -> int:
        """How many leading transitions have a reward and a known successor value (or ended)."""
        if not self._buffer:
            return 0
        last = self._buffer[-1]
        return len(self._buffer) if (last.reward is not None and last.done) else len(self._buffer) - 1

    def maybe_update(self, force: bool = False) -> PPOUpdateStats | None:
        """Run a PPO update if ``rollout_length`` decisions are ready, an episode just ended and
        ``update_at_episode_end`` is set, or ``force`` and any decision is ready.

        Returns the update's :class:`PPOUpdateStats` (one host transfer) or None. Even with
        ``force``, a decision whose episode goes on stays for the next rollout: its successor's
        value is not known yet.
        """
        n = self._ready()
        episode_end = n > 0 and self._buffer[n - 1].done and self.cfg.update_at_episode_end
        if n == 0 or not (n >= self.cfg.rollout_length or force or episode_end):
            return None
        stats = self._update(self._buffer[:n], self._buffer[n] if n < len(self._buffer) else None)
        self.last_update_decisions = tuple(t.index for t in self._buffer[:n])
        del self._buffer[:n]
        return stats

    def last_advantages(self) -> list[float] | None:
        """GAE advantages (reward units, before clipping/normalisation) of the decisions in
        ``last_update_decisions``, in order; None before the first update."""
        if self._last_advantages is None:
            return None
        if self._last_advantages_list is None:  # one transfer, and only if someone asks
            self._last_advantages_list = self._last_advantages.tolist()
        return list(self._last_advantages_list)

    def _update(self, batch: list[_Transition], successor: _Transition | None) -> PPOUpdateStats:
        cfg, net, dev = self.cfg, self.net, self.device
        n = len(batch)
        obs = torch.stack([t.obs for t in batch])
        actions = torch.stack([t.actions for t in batch])  # [n, H]
        legal = {hd: torch.stack([t.legal[hd] for t in batch]) for hd in HEADS}
        relevant = torch.stack([t.relevant for t in batch])  # [n, H]
        old_logp = torch.stack([t.logp for t in batch])
        values = torch.stack([t.value for t in batch])
        rewards = torch.tensor([t.reward for t in batch], dtype=torch.float32, device=dev)
        dones = torch.tensor([float(t.done) for t in batch], device=dev)
        starts = [t.start for t in batch]
        state0 = batch[0].state
        # V(s_{t+1}): the next stored decision's value; 0 (masked by done) after the last one.
        after = values[1:] if successor is None else torch.cat([values[1:], successor.value[None]])
        next_values = torch.cat([after, torch.zeros(n - len(after), device=dev)])

        advantages, returns = gae(rewards, values, next_values, dones, cfg.gamma, cfg.gae_lambda)
        train_adv = advantages.clamp(-cfg.adv_clip, cfg.adv_clip)
        if cfg.norm_adv and n > 1:
            train_adv = (train_adv - train_adv.mean()) / (train_adv.std() + 1e-8)

        stats = PPOStatsAccumulator(HEADS, cfg.clip_eps, cfg.adv_clip, dev)
        for _epoch in range(cfg.update_epochs):
            perm = torch.randperm(n, generator=self.generator, device=dev)
            for mb in perm.split(cfg.minibatch_size):
                logits, new_values, hidden, cell = net.unroll(obs, starts, state0)
                new_logp, entropy = [], []
                for k, hd in enumerate(HEADS):
                    lp, ent = masked_log_softmax(self._logits(logits[hd][mb]), legal[hd][mb])
                    new_logp.append(lp.gather(1, actions[mb, k : k + 1]).squeeze(1))
                    entropy.append(ent)
                rel = relevant[mb]
                new_logp = torch.where(rel, torch.stack(new_logp, 1), 0.0)
                entropy = torch.where(rel, torch.stack(entropy, 1), 0.0)
                logratio = (new_logp - old_logp[mb]).sum(1)  # joint over the relevant heads
                ratio = logratio.exp()

                mb_adv = train_adv[mb]
                pg_loss = torch.max(-mb_adv * ratio, -mb_adv * ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps)).mean()
                v_loss = 0.5 * (new_values[mb] - returns[mb]).pow(2).mean()
                entropy_loss = entropy.sum(1).mean()
                loss = pg_loss - cfg.effective_ent_coef * entropy_loss + cfg.vf_coef * v_loss

                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
                self.optimizer.step()

                stats.update(
                    new_logp=new_logp.detach(),
                    old_logp=old_logp[mb],
                    advantages=advantages[mb],
                    values=values[mb],
                    returns=returns[mb],
                    entropy=entropy.detach(),
                    head_mask=rel,
                    policy_loss=pg_loss.detach(),
                    value_loss=v_loss.detach(),
                    hidden=hidden[mb].detach(),
                    cell=cell[mb].detach(),
                )
        self._last_advantages = advantages.detach()
        self._last_advantages_list = None
        result = stats.compute(self.updates)  # the update's one sync
        self.updates += 1
        return result


__all__ = [
    "DecisionInfo",
    "PPOConfig",
    "PPOController",
    "RecurrentActorCritic",
    "compute_reward",
    "gae",
    "is_legal",
    "legal_ops",
    "legal_slots",
    "observation_size",
    "observation_vector",
]
