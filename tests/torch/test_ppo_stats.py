"""PPO statistics (karn_otel.torch.ppo) against a direct numpy computation; one sync per update."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from karn_otel.codec import check_types
from karn_otel.contracts import PPOUpdateStats
from karn_otel.torch.ppo import (
    SATURATION_THRESHOLD,
    PPOStatsAccumulator,
    approx_kl,
    explained_variance,
    ppo_update_stats,
)

HEADS = ("op", "slot", "blueprint", "blend")
EPS, ADV_CLIP = 0.2, 1.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on shared cores they spin-wait."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_batch(seed: int, b: int = 64, h: int = len(HEADS), mask_p: float = 0.3, drop_head: int | None = None):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, h, generator=g) * 3
    new = old + 0.3 * torch.randn(b, h, generator=g)  # ratios spread across both clip bounds
    mask = torch.rand(b, h, generator=g) > mask_p
    mask[:, 0] = True  # the op head always counts
    if drop_head is not None:
        mask[:, drop_head] = False
    # Excluded entries carry garbage, as a masked head's log-prob may: it must not leak in.
    new = torch.where(mask, new, torch.tensor(float("-inf")))
    values = torch.randn(b, generator=g)
    return dict(
        new_logp=new,
        old_logp=old,
        advantages=2 * torch.randn(b, generator=g),
        values=values,
        returns=values + 0.5 * torch.randn(b, generator=g) + 0.3,
        entropy=torch.where(mask, torch.rand(b, h, generator=g) * 1.4, torch.tensor(float("nan"))),
        head_mask=mask,
        policy_loss=torch.randn((), generator=g),
        value_loss=torch.rand((), generator=g),
        hidden=torch.tanh(2 * torch.randn(b, 8, generator=g)),
        cell=torch.randn(b, 8, generator=g),
    )


def reference(batches: list[dict], eps: float = EPS, adv_clip: float = ADV_CLIP) -> dict:
    """The statistics computed directly in numpy (float64) over the concatenated minibatches."""
    cat = lambda k: np.concatenate([b[k].double().numpy() for b in batches])  # noqa: E731
    new, old, mask = cat("new_logp"), cat("old_logp"), np.concatenate([b["head_mask"].numpy() for b in batches])
    adv, v, y, ent = cat("advantages"), cat("values"), cat("returns"), cat("entropy")
    logratio_h = np.where(mask, new - old, 0.0)
    ratio = np.exp(logratio_h.sum(1))
    out = {
        "adv_mean": adv.mean(),
        "adv_std": adv.std(),
        "adv_min": adv.min(),
        "adv_max": adv.max(),
        "adv_clipped": np.mean(np.abs(adv) > adv_clip),
        "ratio_mean": ratio.mean(),
        "ratio_high": np.mean(ratio > 1 + eps),
        "ratio_low": np.mean(ratio < 1 - eps),
        "kl": np.mean((ratio - 1) - np.log(ratio)),
        "ev": 1 - np.var(y - v) / np.var(y),
        "value_var": np.var(v),
        "policy_loss": np.mean([b["policy_loss"].item() for b in batches]),
        "value_loss": np.mean([b["value_loss"].item() for b in batches]),
    }
    for k, head in enumerate(HEADS):
        sel = mask[:, k]
        if not sel.any():
            out[f"kl/{head}"] = out[f"clip/{head}"] = out[f"ent/{head}"] = math.nan
            continue
        r_h = np.exp(new[sel, k] - old[sel, k])
        out[f"kl/{head}"] = np.mean((r_h - 1) - np.log(r_h))
        out[f"clip/{head}"] = np.mean((r_h > 1 + eps) | (r_h < 1 - eps))
        out[f"ent/{head}"] = ent[sel, k].mean()
    h, c = cat("hidden"), cat("cell")
    out.update(
        h_mean=h.mean(), h_std=h.std(), c_mean=c.mean(), c_std=c.std(), sat=np.mean(np.abs(h) > SATURATION_THRESHOLD)
    )
    return out


def flatten(s: PPOUpdateStats) -> dict:
    out = {
        "adv_mean": s.advantage_stats.mean,
        "adv_std": s.advantage_stats.std,
        "adv_min": s.advantage_stats.min,
        "adv_max": s.advantage_stats.max,
        "adv_clipped": s.advantage_stats.fraction_clipped,
        "ratio_mean": s.ratio_stats.mean,
        "ratio_high": s.ratio_stats.fraction_clipped_high,
        "ratio_low": s.ratio_stats.fraction_clipped_low,
        "kl": s.kl_divergence,
        "ev": s.explained_variance,
        "value_var": s.value_variance,
        "policy_loss": s.policy_loss,
        "value_loss": s.value_loss,
        "h_mean": s.lstm_health.hidden_mean,
        "h_std": s.lstm_health.hidden_std,
        "c_mean": s.lstm_health.cell_mean,
        "c_std": s.lstm_health.cell_std,
        "sat": s.lstm_health.saturation_fraction,
    }
    for head in HEADS:
        out[f"kl/{head}"] = s.per_head_kl[head]
        out[f"clip/{head}"] = s.ratio_stats.per_head_clip_rates[head]
        out[f"ent/{head}"] = s.entropy[head]
    return out


def assert_stats_close(got: dict, want: dict, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    assert got.keys() == want.keys()
    for k in want:
        if math.isnan(want[k]):
            assert math.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(want[k], rel=rtol, abs=atol), k


@pytest.mark.parametrize("seed", range(4))
def test_every_statistic_matches_numpy(seed):
    batch = make_batch(seed, drop_head=2 if seed == 3 else None)
    stats = ppo_update_stats(HEADS, 7, clip_eps=EPS, adv_clip=ADV_CLIP, **batch)
    assert stats.update_index == 7
    assert check_types(stats) is None  # plain Python floats where the contract says float
    want = reference([batch])
    assert 0 < want["ratio_high"] < 1 and 0 < want["ratio_low"] < 1  # both bounds exercised
    assert 0 < want["adv_clipped"] < 1
    assert_stats_close(flatten(stats), want)


def test_masked_head_is_excluded_and_undefined_when_never_relevant():
    batch = make_batch(0, drop_head=2)
    stats = ppo_update_stats(HEADS, 0, clip_eps=EPS, adv_clip=ADV_CLIP, **batch)
    # Never relevant: undefined (nan), not a misleading 0.
    assert math.isnan(stats.per_head_kl["blueprint"])
    assert math.isnan(stats.entropy["blueprint"])
    assert math.isnan(stats.ratio_stats.per_head_clip_rates["blueprint"])
    # Changing what a masked-out entry holds changes nothing.
    other = dict(batch)
    m = batch["head_mask"]
    other["new_logp"] = torch.where(m, batch["new_logp"], torch.tensor(5.0))
    other["entropy"] = torch.where(m, batch["entropy"], torch.tensor(99.0))
    again = ppo_update_stats(HEADS, 0, clip_eps=EPS, adv_clip=ADV_CLIP, **other)
    assert_stats_close(flatten(again), flatten(stats), rtol=0, atol=0)
    # Whereas counting every head (no mask) would see the garbage.
    unmasked = dict(other, head_mask=None)
    assert ppo_update_stats(HEADS, 0, clip_eps=EPS, adv_clip=ADV_CLIP, **unmasked).entropy["blueprint"] > 50


def test_per_head_clip_rate_uses_per_head_ratios():
    # Joint ratio exactly 1 (the two heads cancel), but each head is far outside the clip range.
    new = torch.tensor([[0.5, -0.5, 0.0, 0.0]])
    old = torch.zeros(1, 4)
    z = torch.zeros(1)
    stats = ppo_update_stats(
        HEADS, 0, new_logp=new, old_logp=old, advantages=z, values=z, returns=z, entropy=torch.zeros(1, 4)
    )
    assert stats.ratio_stats.mean == pytest.approx(1.0)
    assert stats.ratio_stats.fraction_clipped_high == 0.0 and stats.ratio_stats.fraction_clipped_low == 0.0
    assert stats.ratio_stats.per_head_clip_rates == {"op": 1.0, "slot": 1.0, "blueprint": 0.0, "blend": 0.0}
    assert stats.kl_divergence == pytest.approx(0.0, abs=1e-12)
    assert stats.per_head_kl["op"] == pytest.approx(math.exp(0.5) - 1 - 0.5)


def test_mapping_inputs_equal_matrix_inputs():
    batch = make_batch(1)
    as_map = dict(batch)
    for k in ("new_logp", "old_logp", "entropy", "head_mask"):
        as_map[k] = {h: batch[k][:, i] for i, h in enumerate(HEADS)}
    a = ppo_update_stats(HEADS, 0, clip_eps=EPS, adv_clip=ADV_CLIP, **batch)
    b = ppo_update_stats(HEADS, 0, clip_eps=EPS, adv_clip=ADV_CLIP, **as_map)
    assert_stats_close(flatten(a), flatten(b), rtol=0, atol=0)


def test_minibatch_accumulation_equals_one_shot():
    full = make_batch(2, b=96)
    sizes = [7, 32, 1, 40, 16]  # uneven, including a single-sample minibatch
    pieces, start = [], 0
    for n in sizes:
        pieces.append({k: (v[start : start + n] if v.dim() > 0 else v) for k, v in full.items()})
        start += n
    acc = PPOStatsAccumulator(HEADS, EPS, ADV_CLIP)
    for p in pieces:
        acc.update(**p)
    got = flatten(acc.compute(0))
    want = reference(pieces)
    assert_stats_close(got, want)
    # Sample statistics equal those of the unsplit batch (losses are per-minibatch means).
    one_shot = flatten(ppo_update_stats(HEADS, 0, clip_eps=EPS, adv_clip=ADV_CLIP, **full))
    for k in got:
        if "loss" not in k:
            assert got[k] == pytest.approx(one_shot[k], rel=1e-9, abs=1e-12), k


def test_merge_is_the_cross_rank_reduction():
    batches = [make_batch(s, b=20) for s in range(4)]
    ranks = [PPOStatsAccumulator(HEADS, EPS, ADV_CLIP) for _ in range(2)]
    for i, b in enumerate(batches):
        ranks[i % 2].update(**b)
    ranks[0].merge(ranks[1])
    assert_stats_close(flatten(ranks[0].compute(0)), reference(batches))


def test_repeated_epochs_leave_rollout_statistics_unchanged():
    batch = make_batch(5, b=32)
    once = ppo_update_stats(HEADS, 0, clip_eps=EPS, adv_clip=ADV_CLIP, **batch)
    acc = PPOStatsAccumulator(HEADS, EPS, ADV_CLIP)
    for _ in range(3):  # three update epochs over the same samples
        for idx in torch.randperm(32, generator=torch.Generator().manual_seed(0)).split(8):
            acc.update(**{k: (v[idx] if v.dim() > 0 else v) for k, v in batch.items()})
    thrice = acc.compute(0)
    for f in ("mean", "std", "min", "max", "fraction_clipped"):
        assert getattr(thrice.advantage_stats, f) == pytest.approx(
            getattr(once.advantage_stats, f), rel=1e-9, abs=1e-12
        )
    assert thrice.explained_variance == pytest.approx(once.explained_variance, rel=1e-9)
    assert thrice.value_variance == pytest.approx(once.value_variance, rel=1e-9)


def test_explained_variance_conventions_for_constant_returns():
    z = torch.zeros(8)
    base = dict(new_logp=torch.zeros(8, 4), old_logp=torch.zeros(8, 4), advantages=z, entropy=torch.zeros(8, 4))
    c = torch.full((8,), 0.1)
    perfect = ppo_update_stats(HEADS, 0, values=c, returns=c, **base)
    assert perfect.explained_variance == 1.0  # both variances 0 despite float rounding
    wrong = ppo_update_stats(HEADS, 0, values=torch.arange(8.0), returns=c, **base)
    assert wrong.explained_variance == 0.0
    assert wrong.value_variance == pytest.approx(np.var(np.arange(8.0)))


def test_optional_parts_absent():
    b = make_batch(0)
    for k in ("hidden", "cell", "policy_loss", "value_loss"):
        b.pop(k)
    stats = ppo_update_stats(HEADS, 0, **b)
    assert stats.lstm_health is None
    assert math.isnan(stats.policy_loss) and math.isnan(stats.value_loss)
    b2 = make_batch(0)
    b2.pop("value_loss")
    assert math.isnan(ppo_update_stats(HEADS, 0, **b2).value_loss)


def test_functional_helpers_match_numpy():
    b = make_batch(3)
    new, old = b["old_logp"][:, 0] + 0.1, b["old_logp"][:, 0]
    r = np.exp(new.double().numpy() - old.double().numpy())
    assert approx_kl(new.double(), old.double()).item() == pytest.approx(np.mean((r - 1) - np.log(r)))
    v, y = b["values"].double(), b["returns"].double()
    assert explained_variance(v, y).item() == pytest.approx(1 - np.var((y - v).numpy()) / np.var(y.numpy()))


def test_misuse_fails_loudly():
    acc = PPOStatsAccumulator(HEADS)
    with pytest.raises(ValueError, match="before any update"):
        acc.compute(0)
    b = make_batch(0)
    with pytest.raises(ValueError, match="advantages"):
        acc.update(**dict(b, advantages=b["advantages"][:3]))
    with pytest.raises(ValueError, match="new_logp"):
        acc.update(**dict(b, new_logp=b["new_logp"][:, :2]))
    with pytest.raises(ValueError, match="missing head"):
        acc.update(**dict(b, entropy={"op": b["entropy"][:, 0]}))
    with pytest.raises(ValueError):
        PPOStatsAccumulator(HEADS, clip_eps=0.0)
    with pytest.raises(ValueError):
        PPOStatsAccumulator(["op", "op"])


SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@pytest.fixture
def sync_counter(monkeypatch):
    """Counts every Tensor method that moves a value to the host (or asks for its truth)."""
    calls: list[str] = []

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    for name in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    return calls


def test_exactly_one_sync_per_update(sync_counter):
    batches = [make_batch(s, b=16) for s in range(8)]  # built before counting starts
    sync_counter.clear()
    acc = PPOStatsAccumulator(HEADS, EPS, ADV_CLIP)
    for b in batches:
        acc.update(**b)
    assert sync_counter == [], "update() must not synchronise"
    stats = acc.compute(3)
    assert sync_counter == ["tolist"]
    assert stats.update_index == 3


def test_update_inside_a_compiled_step_runs_eagerly_and_agrees():
    batch = make_batch(0)
    acc = PPOStatsAccumulator(HEADS, EPS, ADV_CLIP)

    def train_step(b):
        out = b["values"] * 2  # stands for the compiled policy step
        acc.update(**b)  # torch.compiler.disable: a graph break, not a traced telemetry op
        return out

    compiled = torch.compile(train_step, backend="eager")
    compiled(batch)
    compiled(batch)
    eager = PPOStatsAccumulator(HEADS, EPS, ADV_CLIP)
    eager.update(**batch)
    eager.update(**batch)
    assert_stats_close(flatten(acc.compute(0)), flatten(eager.compute(0)), rtol=0, atol=0)
