"""karn_otel.distributed: rank discovery, fixed-schema reduction, sharded counterfactuals,
heartbeats and the launcher.

Two kinds of test: single-process ones on the pure parts (simulated ranks, as torchmetrics
tests do) and two real 2-rank gloo jobs on 127.0.0.1, started once per module with
:func:`karn_otel.distributed.spawn` (tests/_dist_worker.py holds the rank functions). Every
reference value is recomputed here, in one process, from the same known per-rank data.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from karn_otel.contracts import HealthAlert, HostSnapshot, Severity, from_jsonable, to_jsonable
from karn_otel.counterfactual import ConfigEvaluation, attribute
from karn_otel.distributed import (
    HOST_SNAPSHOT_STATES,
    DistributedEvaluationError,
    RANK_MISSING_CHECK,
    EpochReducer,
    MissingRankMonitor,
    RankDisagreementError,
    RankHeartbeat,
    RankInfo,
    Reduction,
    SpawnResult,
    StateSpec,
    discover,
    distributed_attribute,
    gather_evaluations,
    make_distributed_evaluate,
    missing_rank_count,
    missing_ranks,
    rank_missing_alert,
    read_heartbeats,
    reduce_host_snapshot,
    reduce_rows,
    schema_mismatch,
    shard_indices,
    spawn,
)
from tests import _dist_worker as w

# =========================================================================== rank discovery


def test_discover_defaults_to_a_single_process():
    assert discover({}) == RankInfo(0, 1, 0)


def test_discover_reads_the_launcher_environment():
    info = discover({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.is_main, info.is_distributed) == (3, 4, 1, False, True)


@pytest.mark.parametrize(
    "env, match",
    [
        ({"RANK": "x"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is outside world_size 2"),
        ({"WORLD_SIZE": "0"}, "world_size must be >= 1"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "outside world_size"),
        ({"LOCAL_RANK": "5", "WORLD_SIZE": "2"}, "local_rank 5"),
    ],
)
def test_discover_rejects_bad_environments_clearly(env, match):
    with pytest.raises(ValueError, match=match):
        discover(env)


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


# =========================================================================== reduction (simulated ranks)


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


# =========================================================================== counterfactuals (one process)


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
    from karn_otel.distributed import _describe_evaluation_mismatch as why

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


# =========================================================================== heartbeats


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_rank_that_stops_beating_goes_missing(tmp_path):
    clock = FakeClock()
    beats = [RankHeartbeat(tmp_path, r, clock=clock) for r in range(3)]
    assert missing_ranks(tmp_path, 3, timeout_s=10, now=clock.t) == []
    clock.t += 8
    beats[0].beat(1)
    beats[2].beat(1)
    clock.t += 5  # rank 1 last beat 13 s ago
    assert missing_ranks(tmp_path, 3, timeout_s=10, now=clock.t) == [1]
    assert missing_rank_count(tmp_path, 3, 10, now=clock.t) == 1
    assert missing_ranks(tmp_path, 4, timeout_s=10, now=clock.t) == [1, 3]  # rank 3 never reported
    beats[1].finish(1)
    clock.t += 100
    assert missing_ranks(tmp_path, 3, timeout_s=10, now=clock.t) == [0, 2]  # finished ranks are never missing


def test_heartbeat_files_are_whole_and_foreign_files_ignored(tmp_path):
    hb = RankHeartbeat(tmp_path, 0).beat(7)
    assert read_heartbeats(tmp_path, 1)[0] == hb
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json"]  # no temporary file left
    (tmp_path / "rank1.json").write_text("{not json")
    (tmp_path / "rank2.json").write_text('{"rank": 2, "epoch": 1, "time": "yesterday"}')
    (tmp_path / "rank3.json").write_text(json.dumps({**to_jsonable(hb), "rank": 0}))  # someone else's
    assert list(read_heartbeats(tmp_path, 4)) == [0]
    assert missing_ranks(tmp_path, 4, timeout_s=60) == [1, 2, 3]


def test_missing_rank_alert_names_the_rank(tmp_path):
    clock = FakeClock()
    RankHeartbeat(tmp_path, 0, clock=clock)
    one = RankHeartbeat(tmp_path, 1, clock=clock)
    one.beat(4)
    clock.t += 30
    RankHeartbeat(tmp_path, 0, clock=clock).beat(5)
    alert = rank_missing_alert([1], 2, 10.0, read_heartbeats(tmp_path, 2), now=clock.t)
    assert isinstance(alert, HealthAlert)
    assert (alert.check, alert.severity) == (RANK_MISSING_CHECK, Severity.CRITICAL)
    assert (alert.value, alert.threshold) == (1.0, 0.0)  # one rank missing; any is too many
    assert "rank 1 of 2 stopped reporting" in alert.message and "epoch 4 30.0 s ago" in alert.message
    assert rank_missing_alert([], 2, 10.0) is None
    assert "rank 3 never reported" in rank_missing_alert([3], 4, 10.0).message


def test_monitor_alerts_once_per_loss_and_again_on_relapse(tmp_path):
    clock = FakeClock()
    beats = [RankHeartbeat(tmp_path, r, clock=clock) for r in range(2)]
    mon = MissingRankMonitor(tmp_path, 2, timeout_s=5, clock=clock)
    assert mon.check() is None and mon.count() == 0
    clock.t += 6
    beats[0].beat(1)
    assert "rank 1" in mon.check().message
    assert mon.check() is None and mon.count() == 1  # still missing: no second alert
    beats[1].beat(1)
    assert mon.check() is None and mon.count() == 0
    clock.t += 6
    beats[0].beat(2)
    assert mon.check() is not None  # relapse


# =========================================================================== launcher (no processes)


def test_spawn_result_describes_the_first_failure_first():
    r = SpawnResult((-15, 1), 1, {1: "Traceback...\nRuntimeError: boom\n"})
    assert not r.ok
    assert r.describe().splitlines() == [
        "rank 1 exited with code 1 (first failure): RuntimeError: boom",
        "rank 0 exited with code -15",
    ]
    assert SpawnResult((0, 0), None, {}).ok and SpawnResult((0, 0), None, {}).describe() == ""


def test_spawn_rejects_bad_arguments():
    with pytest.raises(ValueError):
        spawn(w.scenario, 0)


# =========================================================================== real 2-rank jobs (gloo, 127.0.0.1)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-rank job running every scenario; returns (SpawnResult, per-rank results, out dir)."""
    out = tmp_path_factory.mktemp("dist")
    result = spawn(w.scenario, 2, (str(out),), num_threads=1, timeout_s=240, grace_s=10)
    assert result.ok, result.describe()
    return result, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], out


def _reference_snapshot() -> dict[str, float]:
    data = [w.rank_data(r) for r in range(2)]
    cat = lambda k: np.concatenate([d[k] for d in data])  # noqa: E731
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


def test_spawn_runs_every_rank_with_its_identity(two_ranks):
    result, ranks, _ = two_ranks
    assert result.exit_codes == (0, 0) and result.first_failure is None
    assert [r["info"] for r in ranks] == [{"rank": k, "world_size": 2, "local_rank": k} for k in range(2)]


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


def test_generic_reduction_sums_counts_and_takes_extremes(two_ranks):
    _, ranks, _ = two_ranks
    data = [w.rank_data(r) for r in range(2)]
    for r in ranks:
        g = r["generic"]
        assert g["n"] == sum(w.TRAIN_SIZES) and g["batches"] == 3
        assert abs(g["loss"] - np.concatenate([d["train_loss"] for d in data]).mean()) <= 1e-12
        assert g["grad_max"] == max(d["host_grad_norm"] for d in data)
        assert g["grad_min"] == min(d["host_grad_norm"] for d in data)


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


def test_schema_mismatch_is_reported_on_every_rank_with_rank_and_key(two_ranks):
    _, ranks, _ = two_ranks
    for r in ranks:
        err = r["schema_mismatch"]
        assert err["type"] == "SchemaMismatchError" and (err["rank"], err["key"]) == (1, "seed_grad_norms[late]")
        assert "rank 1" in err["message"]


def test_other_collective_errors_reach_every_rank_and_leave_the_group_in_step(two_ranks):
    _, ranks, _ = two_ranks
    for r in ranks:
        assert r["disagreement"]["type"] == "RankDisagreementError" and "'epoch'" in r["disagreement"]["message"]
        assert r["eval_failure"]["type"] == "DistributedEvaluationError"
        assert "rank 1 failed to evaluate its shard: RuntimeError" in r["eval_failure"]["message"]
        assert r["after_errors"] == r["reduced"]


def test_finished_ranks_are_not_missing(two_ranks):
    _, _, out = two_ranks
    assert missing_ranks(out / "heartbeats", 2, timeout_s=0.001) == []


def test_a_dead_rank_is_detected_reported_and_its_peer_terminated(tmp_path):
    # grace_s leaves rank 0 ample time (its monitor needs ~0.5 s) to report before it is terminated.
    result = spawn(w.dies_after_heartbeat, 2, (str(tmp_path),), num_threads=1, timeout_s=120, grace_s=5)
    assert result.first_failure == 1 and result.exit_codes[1] == 1 and not result.timed_out
    assert result.exit_codes[0] < 0  # rank 0 hung and was terminated after the grace period
    assert "RuntimeError: rank 1 fails on purpose" in result.errors[1]
    assert result.describe().startswith("rank 1 exited with code 1 (first failure)")
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["missing"] == [1] and report["count"] == 1
    alert = from_jsonable(HealthAlert, report["alert"])
    assert alert.check == RANK_MISSING_CHECK and alert.severity is Severity.CRITICAL
    assert alert.message.startswith("rank 1 of 2 stopped reporting")


def test_a_job_past_its_timeout_is_terminated():
    result = spawn(w.sleeps, 2, timeout_s=2.0, grace_s=1.0)
    assert result.timed_out and result.first_failure is None and not result.ok
    assert all(code < 0 for code in result.exit_codes)
    assert result.describe().endswith("the job exceeded its timeout and was terminated")


def test_distributed_attribute_refuses_a_wall_clock_budget_only_when_distributed(two_ranks):
    _, ranks, _ = two_ranks
    assert all("timeout_seconds cannot be used" in r["timeout_refused"]["message"] for r in ranks)
    # In one process a time budget is harmless: there is nothing to desynchronise.
    cf = dataclasses.replace(w.CF_FULL, timeout_seconds=60.0, bootstrap_samples=0)
    assert distributed_attribute(w.synthetic_evaluate, w.SLOTS3, cf).n_evaluations == 8


def test_importing_the_module_does_not_import_torch():
    # Heartbeats and rank discovery are used from metrics callbacks and the CLI: keep them cheap.
    import subprocess
    import sys

    code = (
        "import sys, karn_otel.distributed as d\n"
        "assert all(hasattr(d, n) for n in d.__all__)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
