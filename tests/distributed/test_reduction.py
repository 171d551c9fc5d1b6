"""karn_otel.distributed.reduction: the fixed reduction schema and the HostSnapshot reduction.

Single-process tests on the pure parts (simulated ranks, as torchmetrics tests do), then the
real 2-rank gloo job of conftest.py: every reference value is recomputed here, in one
process, from the same known per-rank data (tests/distributed/_dist_worker.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from karn_otel.codec import from_jsonable, to_jsonable
from karn_otel.contracts import MAX_NAMED_UNHEALTHY, HostSnapshot, RankHealthSummary
from karn_otel.distributed.reduction import (
    HOST_SNAPSHOT_STATES,
    EpochReducer,
    RankDisagreementError,
    Reduction,
    StateSpec,
    rank_health_summary,
    reduce_host_snapshot,
    reduce_rows,
    schema_mismatch,
)
from tests.distributed import _dist_worker as w
from tests.distributed._dist_worker import rank_data

# =========================================================================== simulated ranks


def test_schema_declaration_is_checked_once_at_declaration():
    r = EpochReducer()
    r.add_state("n", "sum")
    with pytest.raises(ValueError, match="declared twice"):
        r.add_state("n", "sum")
    with pytest.raises(ValueError, match="needs weight"):
        r.add_state("loss", "mean")
    with pytest.raises(ValueError, match="SUM state declared before"):
        r.add_state("loss", "mean", weight="later")
    with pytest.raises(ValueError, match="only MEAN"):
        r.add_state("g", "max", weight="n")
    with pytest.raises(ValueError, match="unknown reduction"):
        r.add_state("g", "median")
    r.add_state("loss", Reduction.MEAN, weight="n")
    assert r.schema == (StateSpec("n", Reduction.SUM), StateSpec("loss", Reduction.MEAN, "n"))


def test_fingerprint_depends_on_order_keys_and_reductions():
    a = EpochReducer([("n", "sum"), ("g", "max")])
    assert a.fingerprint() == EpochReducer([("n", "sum"), ("g", "max")]).fingerprint()
    assert a.fingerprint() != EpochReducer([("g", "max"), ("n", "sum")]).fingerprint()
    assert a.fingerprint() != EpochReducer([("n", "sum"), ("g", "min")]).fingerprint()


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5).filter(any), seed=st.integers(0, 2**31))
def test_reduce_rows_equals_one_pass_over_all_ranks_data(sizes, seed):
    rng = np.random.default_rng(seed)
    losses = [rng.gamma(2.0, 1.0, n) for n in sizes]
    norms = rng.uniform(0, 5, len(sizes))
    states = EpochReducer([("n", "sum"), ("loss", "mean", "n"), ("g", "max"), ("epoch", "same")]).schema
    # A rank without examples reports NaN (0/0): it must not poison the mean.
    rows = np.array([[n, l.mean() if n else np.nan, g, 4] for n, l, g in zip(sizes, losses, norms)])
    out = reduce_rows(states, rows)
    assert out["n"] == sum(sizes)
    assert abs(out["loss"] - np.concatenate(losses).mean()) <= 1e-12
    assert out["g"] == norms.max() and out["epoch"] == 4


def test_reduce_rows_keeps_a_diverged_rank_visible():
    states = EpochReducer([("n", "sum"), ("loss", "mean", "n"), ("g", "max")]).schema
    out = reduce_rows(states, np.array([[10, 1.0, 1.0], [10, np.nan, np.inf]]))
    assert math.isnan(out["loss"]) and out["g"] == math.inf
    assert math.isnan(reduce_rows(states, np.array([[0, np.nan, 0.0]]))["loss"])  # nobody saw an example


def test_same_states_must_agree():
    states = EpochReducer([("epoch", "same")]).schema
    with pytest.raises(RankDisagreementError, match="rank 0 has 3, rank 1 has 4"):
        reduce_rows(states, np.array([[3.0], [4.0]]))


def test_schema_mismatch_names_rank_and_first_differing_key():
    base = [("n", "sum", None), ("seed_grad_norms[early]", "max", None), ("seed_grad_norms[mid]", "max", None)]
    extra = base[:2] + [("seed_grad_norms[late]", "max", None)] + base[2:]
    assert schema_mismatch([base, base, base]) is None
    err = schema_mismatch([base, base, extra])
    assert (err.rank, err.key, err.position) == (2, "seed_grad_norms[late]", 2)
    err = schema_mismatch([extra, base])  # rank 1 lacks a key rank 0 has
    assert (err.rank, err.key) == (1, "seed_grad_norms[late]") and "lacks" in str(err)
    err = schema_mismatch([base, [base[0], base[2], base[1]]])  # same keys, other order
    assert (err.rank, err.key, err.position) == (1, "seed_grad_norms[mid]", 1)
    err = schema_mismatch([base, [("n", "max", None)] + base[1:]])  # same key, other reduction
    assert (err.rank, err.key) == (1, "n") and "(max)" in str(err)


def test_reducer_rejects_values_that_do_not_match_its_schema():
    r = EpochReducer([("n", "sum"), ("loss", "mean", "n")])
    with pytest.raises(ValueError, match="undeclared \\['extra'\\]"):
        r.reduce({"n": 1, "loss": 1.0, "extra": 2.0})
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        r.reduce({"n": -1, "loss": 1.0})
    assert r.reduce({"n": 3, "loss": 0.5}) == {"n": 3.0, "loss": 0.5}


def test_reduce_host_snapshot_in_one_process_is_the_snapshot():
    snap = w.local_snapshot(0)
    assert reduce_host_snapshot(snap, 37) == snap
    no_leak = HostSnapshot(**{**to_jsonable(snap), "grad_isolation_leakage": None, "seed_grad_norms": {}})
    assert reduce_host_snapshot(no_leak, 37) == no_leak
    assert [s.key for s in HOST_SNAPSHOT_STATES][:3] == ["n_train_examples", "n_val_examples", "epoch"]


# =========================================================================== real 2-rank job (gloo, 127.0.0.1)


def _reference_snapshot() -> dict[str, float]:
    data = [w.rank_data(r) for r in range(2)]
    cat = lambda k: np.concatenate([d[k] for d in data])
    return {
        "train_loss": cat("train_loss").mean(),
        "train_accuracy": cat("train_correct").mean(),
        "val_loss": cat("val_loss").mean(),
        "val_accuracy": cat("val_correct").mean(),
        "host_grad_norm": max(d["host_grad_norm"] for d in data),
        "leakage": max(d["leakage"] for d in data),
        "early": max(d["seed_grad_norms"]["early"] for d in data),
        "mid": max(d["seed_grad_norms"]["mid"] for d in data),
    }


def test_reduced_snapshot_equals_a_single_process_computation(two_ranks):
    _, ranks, _ = two_ranks
    ref = _reference_snapshot()
    for r in ranks:
        snap = from_jsonable(HostSnapshot, r["reduced"])
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert abs(getattr(snap, key) - ref[key]) <= 1e-12, key
        assert snap.host_grad_norm == ref["host_grad_norm"]
        assert snap.seed_grad_norms == {"early": ref["early"], "mid": ref["mid"]}
        assert snap.grad_isolation_leakage == ref["leakage"]
        assert (snap.epoch, snap.host_params, snap.total_params, snap.fossilized_params) == (3, 1000, 1060, 20)
    assert ranks[0]["reduced"] == ranks[1]["reduced"]  # bit-identical on every rank


def test_reduce_epoch_adds_the_spread_across_ranks_in_the_same_gather(two_ranks):
    _, ranks, _ = two_ranks
    data = [rank_data(r) for r in range(2)]
    for r in ranks:
        # The snapshot is the same as reduce_host_snapshot's, bit for bit.
        assert r["epoch_reduced"] == r["reduced"]
        s = from_jsonable(RankHealthSummary, r["epoch_summary"])
        losses = [float(np.mean(d["train_loss"])) for d in data]
        norms = [d["host_grad_norm"] for d in data]
        assert (s.train_loss.min, s.train_loss.max) == (min(losses), max(losses))
        assert s.train_loss.mean == pytest.approx(np.mean(losses), abs=1e-15)
        assert s.train_loss.max_rank == int(np.argmax(losses)) and s.train_loss.min_rank == int(np.argmin(losses))
        assert (s.host_grad_norm.max, s.host_grad_norm.max_rank) == (max(norms), int(np.argmax(norms)))
        assert (s.busy_s.min, s.busy_s.max, s.busy_s.max_rank) == (1.0, 1.5, 1)
        assert (s.epoch, s.world_size, s.n_unhealthy, s.n_critical, s.unhealthy_ranks) == (3, 2, 1, 0, (1,))
    # Rank 0 waited for the late rank 1; rank 1 found rank 0 already there.
    waits = [from_jsonable(RankHealthSummary, r["epoch_summary"]).wait_s for r in ranks]
    assert waits[0] >= 0.25 and waits[1] < waits[0], waits


@pytest.mark.parametrize("seed", range(20))
def test_rank_health_summary_matches_numpy_on_simulated_ranks(seed):
    rng = np.random.default_rng(seed)
    world = int(rng.integers(1, 40))
    keys = ("epoch", "train_loss", "host_grad_norm", "rank.busy_s", "rank.health_level")
    rows = np.column_stack(
        [
            np.full(world, 5.0),
            rng.gamma(2, 1, world),
            rng.gamma(2, 1, world),
            rng.uniform(1, 2, world),
            rng.choice([0, 1, 2, 3], world, p=[0.6, 0.1, 0.2, 0.1]),
        ]
    )
    if world > 3 and seed % 3 == 0:
        rows[2, 1] = np.nan  # a diverged rank: NaN spread, and it is the worst rank
    s = rank_health_summary(rows, keys)
    loss = rows[:, 1]
    if np.isnan(loss).any():
        assert np.isnan(s.train_loss.max) and s.train_loss.max_rank == 2
        assert s.train_loss.min_rank == int(np.nanargmin(loss))
    else:
        assert (s.train_loss.min, s.train_loss.max) == (loss.min(), loss.max())
        assert s.train_loss.max_rank == int(np.argmax(loss))
    levels = rows[:, 4]
    bad = [r for r in sorted(range(world), key=lambda r: (-levels[r], r)) if levels[r] >= 2]
    assert s.n_unhealthy == len(bad) and s.n_critical == int((levels == 3).sum())
    assert s.unhealthy_ranks == tuple(bad[:MAX_NAMED_UNHEALTHY])
    assert s.world_size == world and s.epoch == 5


def test_generic_reduction_sums_counts_and_takes_extremes(two_ranks):
    _, ranks, _ = two_ranks
    data = [w.rank_data(r) for r in range(2)]
    for r in ranks:
        g = r["generic"]
        assert g["n"] == sum(w.TRAIN_SIZES) and g["batches"] == 3
        assert abs(g["loss"] - np.concatenate([d["train_loss"] for d in data]).mean()) <= 1e-12
        assert g["grad_max"] == max(d["host_grad_norm"] for d in data)
        assert g["grad_min"] == min(d["host_grad_norm"] for d in data)


def test_schema_mismatch_is_reported_on_every_rank_with_rank_and_key(two_ranks):
    _, ranks, _ = two_ranks
    for r in ranks:
        err = r["schema_mismatch"]
        assert err["type"] == "SchemaMismatchError" and (err["rank"], err["key"]) == (1, "seed_grad_norms[late]")
        assert "rank 1" in err["message"]


def test_a_same_state_disagreement_reaches_every_rank_and_leaves_the_group_in_step(two_ranks):
    _, ranks, _ = two_ranks
    for r in ranks:
        assert r["disagreement"]["type"] == "RankDisagreementError" and "'epoch'" in r["disagreement"]["message"]
        assert r["after_errors"] == r["reduced"]
