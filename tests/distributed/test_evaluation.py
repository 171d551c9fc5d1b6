"""karn_otel.distributed.evaluation: sharded validation and gathered counterfactuals.

One-process identities first, then the real 2-rank gloo job of conftest.py, whose matrices
must equal a single-process :func:`~karn_otel.counterfactual.attribute` bit for bit.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from karn_otel.counterfactual import ConfigEvaluation, attribute
from karn_otel.distributed.evaluation import (
    DistributedEvaluationError,
    distributed_attribute,
    gather_evaluations,
    make_distributed_evaluate,
    shard_indices,
)
from tests.distributed import _dist_worker as w

# =========================================================================== sharding


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), world=st.integers(1, 9))
def test_shards_are_contiguous_balanced_and_restore_the_order(n, world):
    shards = [shard_indices(n, r, world) for r in range(world)]
    data = np.arange(n)
    assert np.array_equal(np.concatenate([data[s] for s in shards]), data)
    sizes = [len(data[s]) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("args", [(10, 2, 2), (10, -1, 2), (-1, 0, 1), (10, 0, 0), (10.0, 0, 1)])
def test_shard_indices_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        shard_indices(*args)


# =========================================================================== one process


def test_gather_and_distributed_evaluate_are_identities_in_one_process():
    configs = [(True, False), (False, True)]
    local = w.synthetic_evaluate(configs)
    gathered = gather_evaluations(local, configs=configs)
    assert all(np.array_equal(a.correct, b.correct) and np.array_equal(a.loss, b.loss) for a, b in zip(local, gathered))
    cf = w.CF_FULL
    direct = attribute(w.synthetic_evaluate, w.SLOTS3, cf)
    wrapped = attribute(make_distributed_evaluate(w.synthetic_evaluate), w.SLOTS3, cf)
    assert w.matrix_json(direct) == w.matrix_json(wrapped)


def test_evaluation_disagreements_are_explained():
    from karn_otel.distributed.evaluation import _describe_evaluation_mismatch as why

    ok = (None, 2, True, [(True,), (False,)])
    failed = ("ValueError: bad shard", 0, False, None)
    assert why([ok, failed]) == "rank 1 failed to evaluate its shard: ValueError: bad shard"
    assert "rank 1 returned 1 configurations" in why([ok, (None, 1, True, [(True,)])])
    assert "rank 1 lacks per-example losses and rank 0 has them" in why([ok, (None, 2, False, ok[3])])
    assert "same order" in why([ok, (None, 2, True, ok[3][::-1])])


def test_local_results_must_be_consistent():
    with pytest.raises(DistributedEvaluationError, match="every configuration has a per-example loss or none"):
        gather_evaluations([ConfigEvaluation(np.ones(3), np.ones(3)), ConfigEvaluation(np.ones(3))])
    with pytest.raises(DistributedEvaluationError, match="same number of examples"):
        gather_evaluations([np.ones(3), np.ones(4)])


def test_plain_arrays_and_missing_losses_are_accepted():
    out = gather_evaluations([np.array([1, 0, 1])])
    assert out[0].loss is None and out[0].correct.dtype == np.float64


# =========================================================================== real 2-rank job (gloo, 127.0.0.1)


@pytest.mark.parametrize("key, slots, cf", [("cf_full", w.SLOTS3, w.CF_FULL), ("cf_sampled", w.SLOTS4, w.CF_SAMPLED)])
def test_distributed_counterfactuals_equal_the_single_process_matrix(two_ranks, key, slots, cf):
    _, ranks, _ = two_ranks
    single = w.matrix_json(attribute(w.synthetic_evaluate, slots, cf, epoch=3))
    assert ranks[0][key] == single and ranks[1][key] == single  # marginals, Shapley means and CIs, all of it
    assert single["shapley_values"] and all(math.isfinite(v["ci_low"]) for v in single["shapley_values"].values())
    assert [r["shard_sizes_seen"] for r in ranks] == [[51], [50]]  # each rank evaluated only its shard


def test_distributed_counterfactuals_of_a_real_torch_host_equal_the_single_process_matrix(two_ranks):
    _, ranks, _ = two_ranks
    single = w.matrix_json(attribute(w.host_evaluate, w.SLOTS3, w.CF_FULL, epoch=3))
    assert ranks[0]["cf_host"] == single and ranks[1]["cf_host"] == single
    assert len({c["val_accuracy"] for c in single["configs"]}) > 1  # the seeds change predictions


def test_a_failing_shard_evaluation_reaches_every_rank(two_ranks):
    _, ranks, _ = two_ranks
    for r in ranks:
        assert r["eval_failure"]["type"] == "DistributedEvaluationError"
        assert "rank 1 failed to evaluate its shard: RuntimeError" in r["eval_failure"]["message"]


def test_distributed_attribute_refuses_a_wall_clock_budget_only_when_distributed(two_ranks):
    _, ranks, _ = two_ranks
    assert all("timeout_seconds cannot be used" in r["timeout_refused"]["message"] for r in ranks)
    # In one process a time budget is harmless: there is nothing to desynchronise.
    cf = dataclasses.replace(w.CF_FULL, timeout_seconds=60.0, bootstrap_samples=0)
    assert distributed_attribute(w.synthetic_evaluate, w.SLOTS3, cf).n_evaluations == 8
