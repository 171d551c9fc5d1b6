"""CleanRL's PPO on CartPole, instrumented by changing one import (the SummaryWriter shim)
plus the PPO helper: an RL run, not a classification one pretending."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Categorical

from karn_otel.adapters.ppo import PPOLogger
from karn_otel.adapters.tensorboard import SummaryWriter  # the one changed import
from karn_otel.api import init
from karn_otel.contracts import TelemetryEventType as ET
from karn_otel.sinks.runlog import read_run

HOST_CHECKS = {"accuracy_drop", "loss_spike", "gradient_explosion", "isolation_leakage"}

try:
    import gymnasium as gym

    def make_env(seed: int):
        env = gym.make("CartPole-v1")
        env.reset(seed=seed)
        return env
except ImportError:  # a tiny numpy CartPole (the classic-control dynamics), same interface
    gym = None

    class _CartPole:
        def __init__(self, seed: int) -> None:
            self.rng = np.random.default_rng(seed)
            self.t = 0

        def reset(self, seed=None):
            self.s = self.rng.uniform(-0.05, 0.05, 4)
            self.t = 0
            return self.s.astype(np.float32), {}

        def step(self, a):
            x, xd, th, thd = self.s
            f = 10.0 if a == 1 else -10.0
            ct, st = math.cos(th), math.sin(th)
            tmp = (f + 0.05 * thd**2 * st) / 1.1
            thacc = (9.8 * st - ct * tmp) / (0.5 * (4.0 / 3.0 - 0.1 * ct**2 / 1.1))
            xacc = tmp - 0.05 * thacc * ct / 1.1
            self.s = np.array([x + 0.02 * xd, xd + 0.02 * xacc, th + 0.02 * thd, thd + 0.02 * thacc])
            self.t += 1
            done = abs(self.s[0]) > 2.4 or abs(self.s[2]) > 0.2095
            return self.s.astype(np.float32), 1.0, bool(done), self.t >= 500, {}

    def make_env(seed: int):
        return _CartPole(seed)


class Agent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.critic = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
        self.actor = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2))

    def get_value(self, x):
        return self.critic(x)

    def get_action_and_value(self, x, action=None):
        probs = Categorical(logits=self.actor(x))
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(x)


def cleanrl_ppo(tmp_path, iterations=5, num_envs=4, num_steps=128, update_epochs=4, num_minibatches=4):
    """CleanRL ppo.py's loop, shortened; returns what it computed itself (the ground truth)."""
    args = dict(
        env_id="CartPole-v1", seed=1, learning_rate=2.5e-4, anneal_lr=True, gamma=0.99, gae_lambda=0.95,
        clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5, target_kl=None,
    )  # fmt: skip
    writer = SummaryWriter(f"{tmp_path}/tb/ppo", karn={"out_dir": tmp_path / "runs", "console": "off"})
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{k}|{v}|" for k, v in args.items()])),  # noqa: UP031 (as CleanRL writes it)
    )
    torch.manual_seed(args["seed"])
    envs = [make_env(args["seed"] + i) for i in range(num_envs)]
    agent = Agent()
    opt = torch.optim.Adam(agent.parameters(), lr=args["learning_rate"], eps=1e-5)
    batch, mb_size = num_envs * num_steps, num_envs * num_steps // num_minibatches
    obs_buf = torch.zeros(num_steps, num_envs, 4)
    act_buf, logp_buf, rew_buf, done_buf, val_buf = (torch.zeros(num_steps, num_envs) for _ in range(5))
    next_obs = torch.tensor(np.stack([e.reset(seed=args["seed"] + i)[0] for i, e in enumerate(envs)]))
    next_done = torch.zeros(num_envs)
    ep_ret, ep_len = np.zeros(num_envs), np.zeros(num_envs, dtype=int)
    returns_seen, updates_seen, global_step = [], [], 0
    ppo = PPOLogger(writer.karn_run, heads=("action",), clip_eps=args["clip_coef"])  # +karn: the PPO helper
    rng = np.random.default_rng(0)
    for iteration in range(1, iterations + 1):
        for step in range(num_steps):
            global_step += num_envs
            obs_buf[step], done_buf[step] = next_obs, next_done
            with torch.no_grad():
                action, logp, _, value = agent.get_action_and_value(next_obs)
            val_buf[step], act_buf[step], logp_buf[step] = value.flatten(), action, logp
            nxt, dones = [], []
            for i, env in enumerate(envs):
                o, r, term, trunc, _ = env.step(int(action[i]))
                rew_buf[step, i] = r
                ep_ret[i] += r
                ep_len[i] += 1
                if term or trunc:
                    writer.add_scalar("charts/episodic_return", ep_ret[i], global_step)
                    writer.add_scalar("charts/episodic_length", ep_len[i], global_step)
                    returns_seen.append(float(ep_ret[i]))
                    ep_ret[i], ep_len[i] = 0.0, 0
                    o, _ = env.reset()
                nxt.append(o)
                dones.append(float(term or trunc))
            next_obs, next_done = torch.tensor(np.stack(nxt)), torch.tensor(dones)
        with torch.no_grad():
            next_value = agent.get_value(next_obs).reshape(1, -1)
            adv = torch.zeros_like(rew_buf)
            last = 0
            for t in reversed(range(num_steps)):
                nonterm = 1.0 - (next_done if t == num_steps - 1 else done_buf[t + 1])
                nv = next_value if t == num_steps - 1 else val_buf[t + 1]
                delta = rew_buf[t] + args["gamma"] * nv * nonterm - val_buf[t]
                adv[t] = last = delta + args["gamma"] * args["gae_lambda"] * nonterm * last
            ret = adv + val_buf
        b_obs, b_logp, b_act = obs_buf.reshape(-1, 4), logp_buf.reshape(-1), act_buf.reshape(-1)
        b_adv, b_ret, b_val = adv.reshape(-1), ret.reshape(-1), val_buf.reshape(-1)
        seen = []  # every minibatch's tensors, for the numpy reference
        for _ in range(update_epochs):
            inds = rng.permutation(batch)
            for start in range(0, batch, mb_size):
                mb = inds[start : start + mb_size]
                _, newlogp, entropy, newvalue = agent.get_action_and_value(b_obs[mb], b_act.long()[mb])
                logratio = newlogp - b_logp[mb]
                ratio = logratio.exp()
                mb_adv = b_adv[mb]
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = torch.max(
                    -mb_adv * ratio, -mb_adv * torch.clamp(ratio, 1 - args["clip_coef"], 1 + args["clip_coef"])
                ).mean()
                v_loss = 0.5 * ((newvalue.view(-1) - b_ret[mb]) ** 2).mean()
                loss = pg_loss - args["ent_coef"] * entropy.mean() + v_loss * args["vf_coef"]
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args["max_grad_norm"])
                opt.step()
                ppo.update(  # +karn
                    new_logp=newlogp.detach(), old_logp=b_logp[mb], advantages=b_adv[mb], values=b_val[mb],
                    returns=b_ret[mb], entropy=entropy.detach(), policy_loss=pg_loss.detach(), value_loss=v_loss.detach(),
                )  # fmt: skip
                seen.append((newlogp.detach().double(), b_logp[mb].double(), entropy.detach().double()))
        stats = ppo.emit(update_index=iteration)  # +karn: the one sync of the update
        updates_seen.append((stats, seen, b_adv.double(), b_val.double(), b_ret.double()))
        writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
        writer.add_scalar("losses/policy_loss", pg_loss.item(), global_step)
        writer.add_scalar("charts/learning_rate", opt.param_groups[0]["lr"], global_step)
    writer.close()
    return writer.karn_run, returns_seen, updates_seen


def test_cleanrl_ppo_on_cartpole_through_the_shim(tmp_path):
    run, returns_seen, updates = cleanrl_ppo(tmp_path)
    rec = read_run(run.run_dir)
    (ctx,) = rec.episodes.values()
    assert ctx.task_type == "rl"
    hp = ctx.hyperparameters
    assert hp["env_id"] == "CartPole-v1" and hp["learning_rate"] == 2.5e-4 and hp["anneal_lr"] is True
    assert "target_kl" in hp and hp["target_kl"] is None
    assert ctx.base_seed == 1 and ctx.torch_seed == 1

    by = {et: [e.payload for e in rec.events if e.event_type is et] for et in ET}
    assert by[ET.HOST_SNAPSHOT] == []  # no invented accuracy
    assert not [a for a in by[ET.HEALTH_ALERT] if a.check in HOST_CHECKS]
    logged = [s.values["charts/episodic_return"] for s in by[ET.SCALARS] if "charts/episodic_return" in s.values]
    assert logged == returns_seen and len(logged) > 20  # every episode, two ending in one step included
    steps = [s.step for s in by[ET.SCALARS] if "charts/episodic_return" in s.values]
    assert len(set(steps)) < len(steps)  # (that case did occur)
    assert sorted(v for s in by[ET.SCALARS] for k, v in s.values.items() if k == "losses/value_loss") != []

    assert [u.update_index for u in by[ET.PPO_UPDATE]] == [1, 2, 3, 4, 5]
    for recorded, (stats, seen, adv, val, ret) in zip(by[ET.PPO_UPDATE], updates):
        assert recorded == stats
        new = torch.cat([s[0] for s in seen]).numpy()
        old = torch.cat([s[1] for s in seen]).numpy()
        ent = torch.cat([s[2] for s in seen]).numpy()
        r = np.exp(new - old)
        assert math.isclose(stats.kl_divergence, float(np.mean((r - 1) - np.log(r))), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(stats.ratio_stats.mean, float(np.mean(r)), rel_tol=1e-9)
        assert math.isclose(stats.ratio_stats.fraction_clipped_high, float(np.mean(r > 1.2)), abs_tol=1e-12)
        assert math.isclose(stats.entropy["action"], float(np.mean(ent)), rel_tol=1e-9)
        a, v, g = adv.numpy(), val.numpy(), ret.numpy()  # each sample seen update_epochs times: same moments
        assert math.isclose(stats.advantage_stats.mean, float(a.mean()), rel_tol=1e-6, abs_tol=1e-9)
        assert math.isclose(stats.advantage_stats.std, float(a.std()), rel_tol=1e-6)
        assert stats.advantage_stats.max == pytest.approx(float(a.max()), rel=1e-6)
        ev = 1 - np.var(g - v) / np.var(g)
        assert math.isclose(stats.explained_variance, float(ev), rel_tol=1e-6, abs_tol=1e-9)
        assert math.isclose(stats.value_variance, float(np.var(v)), rel_tol=1e-6)

    (summary,) = by[ET.EPISODE_ENDED]
    assert summary.task_type == "rl"
    assert math.isclose(summary.final_metrics["episodic_return_mean100"], float(np.mean(logged[-100:])), rel_tol=1e-12)
    assert math.isnan(summary.final_val_accuracy)  # an RL run has none, and says so

    out = subprocess.run(
        [sys.executable, "-m", "karn_otel.cli", "inspect", str(run.run_dir)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "finished:" in out.stdout and "interrupted" not in out.stdout
    assert "rejected in this episode: none" in out.stdout


def test_return_based_health_fires_on_a_collapse_not_on_learning(tmp_path):
    run = init(task="rl", out_dir=tmp_path, console="off")
    rng = np.random.default_rng(0)
    learning = list(np.linspace(20, 200, 60) + rng.normal(0, 10, 60))
    collapse = list(rng.normal(40, 5, 30))
    for i, r in enumerate(learning):
        run.log({"episodic_return": r, "episodic_length": r}, step=i)
    before = dict(run._returns_monitor.status())
    for i, r in enumerate(collapse):
        run.log({"episodic_return": r}, step=60 + i)
    run.log({"episodic_return": float("nan")}, step=90)
    run.log({"episodic_return": np.float32(45.0), "val_accuracy": 0.2}, step=91)  # no host checks for RL
    run.finish()
    alerts = [e.payload for e in read_run(run.run_dir).events if e.event_type is ET.HEALTH_ALERT]
    assert all(s.value == "ok" for s in before.values())
    assert [a.check for a in alerts] == ["return_regression", "non_finite_return"]
    assert alerts[0].value > 0.5 and alerts[0].severity.value == "warning"
    assert alerts[1].severity.value == "critical"
