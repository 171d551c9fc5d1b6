"""The reference PPO controller on synthetic observations: masks, learning, determinism, RNG hygiene.

No host training: a toy lifecycle (``ToyEnv``) produces ControllerObservation objects that
react to the controller's actions roughly as the reference slots do.
"""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch

from karn_otel.codec import check_types
from karn_otel.contracts import ActionOp, FactoredAction, PolicySnapshot, RewardComponentsTelemetry, SeedStage
from karn_otel.reference.controller import ControllerObservation, SlotView
from karn_otel.reference.ppo import (
    LIVE_STAGES,
    PPOConfig,
    PPOController,
    compute_reward,
    gae,
    observation_size,
    observation_vector,
)

SLOTS = ("early", "mid", "late")
BPS = ("conv_light", "attention", "norm")
GAIN = {"conv_light": 0.01, "attention": 0.02, "norm": -0.005}  # accuracy per epoch at alpha 1
PARAMS = {"conv_light": 300, "attention": 150, "norm": 20}
ACTIVE = (SeedStage.BLENDING, SeedStage.PROBATIONARY, SeedStage.FOSSILIZED)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on shared cores they spin-wait."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class ToyEnv:
    """DORMANT -> GERMINATED -> TRAINING (2) -> BLENDING (2) -> PROBATIONARY; seeds add accuracy."""

    def __init__(self, seed: int, max_epochs: int = 12, host_params: int = 2000) -> None:
        self.rng = random.Random(seed)
        self.max_epochs, self.host_params = max_epochs, host_params
        self.reset()

    def reset(self) -> ControllerObservation:
        self.epoch, self.acc = 0, 0.5
        self.hist = [self.acc]
        self.slots = {s: dict(stage=SeedStage.DORMANT, eis=0, bp=None, alpha=0.0) for s in SLOTS}
        return self.obs()

    def obs(self) -> ControllerObservation:
        views = tuple(
            SlotView(
                sid,
                d["stage"],
                d["eis"],
                d["alpha"],
                GAIN[d["bp"]] if d["stage"] in ACTIVE else None,
                0,
                PARAMS[d["bp"]] if d["bp"] else 0,
            )
            for sid, d in self.slots.items()
        )
        return ControllerObservation(
            self.epoch, self.max_epochs, self.acc, 2.0 - 2 * self.acc, tuple(self.hist), views, self.host_params
        )

    def step(self, action: FactoredAction) -> tuple[ControllerObservation, bool]:
        d = self.slots.get(action.slot) if action.slot else None
        if action.op is ActionOp.GERMINATE and d["stage"] is SeedStage.DORMANT:
            d.update(stage=SeedStage.GERMINATED, eis=0, bp=action.blueprint, alpha=0.0)
        elif action.op is ActionOp.FOSSILIZE and d["stage"] is SeedStage.PROBATIONARY and GAIN[d["bp"]] > 0:
            d.update(stage=SeedStage.FOSSILIZED, eis=0)
        elif action.op is ActionOp.CULL and d["stage"] in LIVE_STAGES:
            d.update(stage=SeedStage.CULLED, eis=0, alpha=0.0)
        self.epoch += 1
        gain = 0.005 * self.rng.random()
        for d in self.slots.values():
            d["eis"] += 1
            st = d["stage"]
            if st is SeedStage.CULLED:
                d.update(stage=SeedStage.DORMANT, eis=0, bp=None)
            elif st is SeedStage.GERMINATED:
                d.update(stage=SeedStage.TRAINING, eis=0)
            elif st is SeedStage.TRAINING and d["eis"] >= 2:
                d.update(stage=SeedStage.BLENDING, eis=0, alpha=0.5)
            elif st is SeedStage.BLENDING and d["eis"] >= 2:
                d.update(stage=SeedStage.PROBATIONARY, eis=0, alpha=1.0)
            if d["stage"] in ACTIVE:
                gain += d["alpha"] * GAIN[d["bp"]] * 0.3
        self.acc = min(0.99, self.acc + gain)
        self.hist.append(self.acc)
        return self.obs(), self.epoch >= self.max_epochs


def run(cfg: PPOConfig, episodes: int, env_seed: int = 0):
    """Train on ToyEnv; returns (controller, decisions, update stats)."""
    ppo = PPOController(cfg, SLOTS, BPS)
    env = ToyEnv(env_seed)
    decisions, updates = [], []
    for _ in range(episodes):
        obs, done = env.reset(), False
        ppo.reset_episode()
        while not done:
            action, _ = ppo.decide(obs)
            decisions.append(ppo.last_decision)
            next_obs, done = env.step(action)
            ppo.record_reward(compute_reward(obs, next_obs, action, cfg), done)
            obs = next_obs
            stats = ppo.maybe_update()
            if stats is not None:
                updates.append(stats)
    return ppo, decisions, updates


def random_observation(rng: random.Random) -> ControllerObservation:
    slots = []
    for sid in SLOTS:
        stage = rng.choice(list(SeedStage))
        bp = None if stage is SeedStage.DORMANT else rng.choice(BPS)
        contribution = rng.uniform(-0.02, 0.03) if stage in ACTIVE and rng.random() < 0.8 else None
        slots.append(
            SlotView(sid, stage, rng.randrange(6), rng.random(), contribution, rng.randrange(3), PARAMS.get(bp, 0))
        )
    hist = tuple(rng.uniform(0.3, 0.9) for _ in range(rng.randrange(1, 6)))
    return ControllerObservation(len(hist), 20, hist[-1], rng.uniform(0.2, 2.0), hist, tuple(slots), 2000)


def legal_under(action: FactoredAction, obs: ControllerObservation) -> bool:
    stage = {s.slot_id: s.stage for s in obs.slots}
    if action.op is ActionOp.WAIT:
        return action.slot is None and action.blueprint is None
    if action.op is ActionOp.GERMINATE:
        return stage[action.slot] is SeedStage.DORMANT and action.blueprint in BPS and action.blend is not None
    if action.op is ActionOp.FOSSILIZE:
        return stage[action.slot] is SeedStage.PROBATIONARY and action.blueprint is None
    return stage[action.slot] in LIVE_STAGES and action.blueprint is None


@pytest.fixture(scope="module")
def trained():
    return run(PPOConfig(seed=3), episodes=6)


# ---------------------------------------------------------------------- masks


def test_masks_are_respected_over_many_random_observations():
    rng = random.Random(0)
    ppo = PPOController(PPOConfig(seed=0), SLOTS, BPS)
    ops_seen = set()
    for _ in range(400):
        obs = random_observation(rng)
        action, reason = ppo.decide(obs)
        assert legal_under(action, obs), (action, obs)
        info = ppo.last_decision
        ops_seen.add(action.op)
        only_wait = not any(s.stage in (SeedStage.DORMANT, SeedStage.PROBATIONARY) + LIVE_STAGES for s in obs.slots)
        if only_wait:
            assert action.op is ActionOp.WAIT and info.action_was_masked and "forced" in reason
            assert info.action_log_probs == {"op": 0.0} and info.entropy == {"op": 0.0}
        else:
            assert not info.action_was_masked
        expected_heads = {"op"} | ({"slot"} if action.op is not ActionOp.WAIT else set())
        expected_heads |= {"blueprint", "blend"} if action.op is ActionOp.GERMINATE else set()
        assert set(info.action_log_probs) == expected_heads == set(info.entropy)
        assert all(lp <= 0.0 for lp in info.action_log_probs.values())
        ppo.record_reward(RewardComponentsTelemetry(), done=rng.random() < 0.2)
    assert ops_seen == set(ActionOp)  # masks restrict, they don't starve the policy


def test_forced_slot_is_reported_per_head():
    rng = random.Random(1)
    ppo = PPOController(PPOConfig(seed=0), SLOTS, BPS)
    base = ToyEnv(0).reset()
    # Exactly one live seed: CULL (if chosen) has a single legal slot.
    views = (dataclasses.replace(base.slots[0], stage=SeedStage.TRAINING, seed_params=300),) + tuple(
        dataclasses.replace(s, stage=SeedStage.FOSSILIZED) for s in base.slots[1:]
    )
    obs = dataclasses.replace(base, slots=views)
    seen_cull = False
    for _ in range(60):
        action, _ = ppo.decide(obs)
        info = ppo.last_decision
        if action.op is ActionOp.CULL:
            seen_cull = True
            assert action.slot == "early" and info.forced_heads == ("slot",) and not info.action_was_masked
        ppo.record_reward(RewardComponentsTelemetry(), done=rng.random() < 0.5)
    assert seen_cull


# ---------------------------------------------------------------------- learning


def test_training_run_performs_updates_with_finite_stats(trained):
    ppo, decisions, updates = trained
    assert len(updates) >= 4
    assert [u.update_index for u in updates] == list(range(len(updates)))
    for u in updates:
        assert check_types(u) is None
        scalars = [u.policy_loss, u.value_loss, u.kl_divergence, u.explained_variance, u.value_variance]
        scalars += list(dataclasses.astuple(u.advantage_stats)) + [u.ratio_stats.mean]
        scalars += list(dataclasses.astuple(u.lstm_health))
        assert all(math.isfinite(x) for x in scalars), u
        assert math.isfinite(u.entropy["op"]) and math.isfinite(u.per_head_kl["op"])
        assert u.kl_divergence >= 0 and 0 <= u.ratio_stats.fraction_clipped_high <= 1
    # Germinations happened, so somewhere every head had relevant samples.
    assert any(all(math.isfinite(v) for v in u.entropy.values()) for u in updates)
    # The last update covered one rollout; its advantages line up with its decisions.
    adv = ppo.last_advantages()
    assert len(adv) == len(ppo.last_update_decisions) == 16
    assert all(math.isfinite(a) for a in adv)
    assert list(ppo.last_update_decisions) == sorted(ppo.last_update_decisions)


def test_policy_snapshot_can_be_built_from_a_decision(trained):
    ppo, decisions, _ = trained
    d = decisions[-1]
    snap = PolicySnapshot(
        observation_vector=d.observation_vector,
        action=d.action,
        action_log_probs=d.action_log_probs,
        action_was_masked=d.action_was_masked,
        value_estimate=d.value_estimate,
        advantage=None,
        reward_total=0.0,
        reward_components=RewardComponentsTelemetry(),
        entropy=d.entropy,
    )
    assert check_types(snap) is None
    assert len(d.observation_vector) == observation_size(len(SLOTS))


def test_update_at_episode_end_and_force():
    ppo, _, updates = run(PPOConfig(seed=0, update_at_episode_end=True, rollout_length=100), episodes=2)
    assert len(updates) == 2 and ppo.last_update_decisions == tuple(range(12, 24))
    ppo, _, updates = run(PPOConfig(seed=0, rollout_length=100), episodes=1)
    assert updates == []
    assert ppo.maybe_update(force=True) is not None
    assert ppo.maybe_update(force=True) is None  # nothing left


def test_force_entropy_collapse_makes_the_policy_deterministic():
    _, decisions, updates = run(PPOConfig(seed=3, force_entropy_collapse=True), episodes=3)
    assert updates
    assert max(v for d in decisions for v in d.entropy.values()) < 1e-6
    assert all(u.entropy["op"] < 1e-6 for u in updates)
    _, healthy, _ = run(PPOConfig(seed=3), episodes=1)
    assert np.mean([d.entropy["op"] for d in healthy]) > 0.5


def test_gae_matches_a_direct_recursion():
    g = torch.Generator().manual_seed(0)
    r, v, nv = (torch.randn(9, generator=g, dtype=torch.float64) for _ in range(3))
    done = torch.tensor([0, 0, 1, 0, 0, 0, 0, 1, 0], dtype=torch.float64)
    adv, ret = gae(r, v, nv, done, 0.9, 0.8)
    want, last = np.zeros(9), 0.0
    for t in reversed(range(9)):
        nd = 1.0 - done[t].item()
        delta = r[t].item() + 0.9 * nv[t].item() * nd - v[t].item()
        last = delta + 0.9 * 0.8 * nd * last
        want[t] = last
    np.testing.assert_allclose(adv.numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(ret.numpy(), want + v.numpy(), rtol=1e-12)


# ---------------------------------------------------------------------- determinism and RNG hygiene


def test_deterministic_for_a_fixed_seed():
    _, d1, u1 = run(PPOConfig(seed=5), episodes=3)
    _, d2, u2 = run(PPOConfig(seed=5), episodes=3)
    assert d1 == d2 and u1 == u2 and u1
    _, d3, _ = run(PPOConfig(seed=6), episodes=3)
    assert [d.action for d in d3] != [d.action for d in d1]


def test_global_torch_rng_is_untouched():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    ppo, _, updates = run(PPOConfig(seed=0), episodes=3)
    assert updates
    assert torch.equal(before, torch.get_rng_state())
    # ... and the controller does not depend on it either.
    torch.manual_seed(99)
    _, d_other, u_other = run(PPOConfig(seed=0), episodes=3)
    torch.manual_seed(1234)
    _, d_same, u_same = run(PPOConfig(seed=0), episodes=3)
    assert d_other == d_same and u_other == u_same


# ---------------------------------------------------------------------- bookkeeping


def test_call_order_is_enforced():
    env = ToyEnv(0)
    ppo = PPOController(PPOConfig(), SLOTS, BPS)
    with pytest.raises(RuntimeError):
        ppo.record_reward(RewardComponentsTelemetry(), done=False)
    ppo.decide(env.obs())
    with pytest.raises(RuntimeError):
        ppo.decide(env.obs())
    ppo.reset_episode()  # drops the decision that never got its reward
    ppo.decide(env.obs())
    assert ppo.record_reward(
        RewardComponentsTelemetry(accuracy_gain=0.5, parameter_cost=-0.2), done=False
    ) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        PPOConfig(minibatch_size=0)
    with pytest.raises(ValueError):
        PPOController(PPOConfig(), ("a",), BPS).decide(env.obs())


def test_observation_vector():
    obs = ToyEnv(0).reset()
    vec = observation_vector(obs)
    assert len(vec) == observation_size(3) and all(isinstance(x, float) and math.isfinite(x) for x in vec)
    reordered = observation_vector(dataclasses.replace(obs, slots=obs.slots[::-1]), SLOTS)
    assert reordered == vec  # slot order comes from slot_ids, not from the observation
    germinated = dataclasses.replace(
        obs, slots=(dataclasses.replace(obs.slots[0], stage=SeedStage.PROBATIONARY, contribution=0.01),) + obs.slots[1:]
    )
    assert observation_vector(germinated) != vec


def test_reward_components():
    cfg = PPOConfig()
    env = ToyEnv(0)
    prev = env.reset()
    obs, _ = env.step(FactoredAction(ActionOp.GERMINATE, "mid", "attention", "linear"))
    r = compute_reward(prev, obs, FactoredAction(ActionOp.GERMINATE, "mid", "attention", "linear"), cfg)
    assert r.invalid_action_penalty == 0.0 and r.parameter_cost < 0
    assert r.accuracy_gain == pytest.approx(cfg.accuracy_scale * (obs.val_accuracy - prev.val_accuracy))
    # Illegal: fossilizing a slot that is not probationary.
    bad = compute_reward(prev, obs, FactoredAction(ActionOp.FOSSILIZE, "early"), cfg)
    assert bad.invalid_action_penalty == -cfg.invalid_penalty and bad.lifecycle_bonus == 0.0
    # Fossilizing a contributor earns the bonus; a refused fossilization is penalised instead.
    prob = dataclasses.replace(
        prev,
        slots=(dataclasses.replace(prev.slots[0], stage=SeedStage.PROBATIONARY, contribution=0.02),) + prev.slots[1:],
    )
    fossil = dataclasses.replace(
        prev, slots=(dataclasses.replace(prev.slots[0], stage=SeedStage.FOSSILIZED, seed_params=300),) + prev.slots[1:]
    )
    good = compute_reward(prob, fossil, FactoredAction(ActionOp.FOSSILIZE, "early"), cfg)
    assert good.lifecycle_bonus == cfg.fossilize_bonus and good.invalid_action_penalty == 0.0
    refused = compute_reward(prob, prob, FactoredAction(ActionOp.FOSSILIZE, "early"), cfg)
    assert refused.lifecycle_bonus == 0.0 and refused.invalid_action_penalty == -cfg.invalid_penalty


def test_one_host_transfer_per_decision_and_per_update(monkeypatch):
    cfg = PPOConfig(seed=0, rollout_length=100)
    ppo, _, _ = run(cfg, episodes=1)
    env = ToyEnv(1)
    obs = env.reset()
    ppo.reset_episode()
    calls: list[str] = []
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _n=name, _o=original, **k: (calls.append(_n), _o(self, *a, **k))[1]
        )
    action, _ = ppo.decide(obs)
    assert calls == ["tolist"]
    next_obs, _ = env.step(action)
    ppo.record_reward(compute_reward(obs, next_obs, action, cfg), done=True)
    calls.clear()
    assert ppo.maybe_update(force=True) is not None
    assert calls == ["tolist"]  # the statistics' one transfer; Adam, clipping, GAE ask nothing
