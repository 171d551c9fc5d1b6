"""MorphogeneticAnalytics against hand-computed examples."""

from __future__ import annotations

import json
import math

import pytest

from karn_otel import collector as kc
from karn_otel.analytics import MorphogeneticAnalytics, ReferenceCurve
from karn_otel.config import KarnConfig
from karn_otel.contracts import (
    ActionOp,
    ControllerDecision,
    CounterfactualMatrix,
    CounterfactualResult,
    FactoredAction,
    ShapleyEstimate,
)
from karn_otel.health import HealthMonitor
from tests.conftest import make_context
from tests.test_collector import host, slot


def cf(epoch, on_acc, off_acc, shapley=None, marginal=None):
    return CounterfactualMatrix(
        epoch=epoch,
        slot_ids=("mid",),
        configs=(
            CounterfactualResult((True,), {"mid": 1.0}, 0.3, on_acc),
            CounterfactualResult((False,), {"mid": 0.0}, 0.4, off_acc),
        ),
        marginal_contributions=marginal or {"mid": on_acc - off_acc},
        interaction_effects={},
        shapley_values=shapley,
    )


@pytest.fixture
def setup():
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", strict=True))
    c.emit(make_context())
    return c, MorphogeneticAnalytics(c.store)


def test_accuracy_delta_and_efficiency(setup):
    c, a = setup
    c.emit(cf(1, 0.80, 0.75))
    c.emit(slot("mid", seed_params=250))
    c.emit(
        host(epoch=1, val_accuracy=0.80, host_params=1000, total_seed_params=250, total_params=1250, seed_grad_norms={})
    )
    assert a.accuracy_delta() == pytest.approx(0.05)
    assert a.param_ratio() == pytest.approx(1.25)
    # (0.80 / 1250e-6) / (0.75 / 1000e-6) = 640 / 750
    assert a.params_efficiency_ratio() == pytest.approx(640 / 750)


def test_stale_counterfactual_is_not_used(setup):
    c, a = setup
    c.emit(cf(1, 0.80, 0.70))
    c.emit(host(epoch=1, val_accuracy=0.80, total_seed_params=0, seed_grad_norms={}))
    c.emit(host(epoch=2, val_accuracy=0.85, total_seed_params=10, seed_grad_norms={}))
    assert a.host_only_accuracy() is None, "epoch 1's host-only number must not be shown for epoch 2"


def test_trajectory(setup):
    c, a = setup
    for e, (on, off) in enumerate([(0.70, 0.70), (0.74, 0.738), (0.78, 0.77), (0.80, 0.78)], start=1):
        c.emit(cf(e, on, off))
        c.emit(host(epoch=e, val_accuracy=on, seed_grad_norms={}))
    assert a.accuracy_trajectory() == [(1, 0.70, 0.70), (2, 0.74, 0.738), (3, 0.78, 0.77), (4, 0.80, 0.78)]
    # removal costs alone carry no interval: no onset claim can be made from them
    assert a.contribution_onset_epoch("mid") is None


def test_onset_comes_from_the_anytime_valid_rule(setup):
    """Onset = first epoch whose live-rule lower bound exceeds the threshold, not the mean."""
    from karn_otel.claims import live_test_level, lower_bound

    c, a = setup
    # max_epochs=10, 3 slots: each test at 0.05 * 0.95 / 11 / 3 = 1.44e-3 (z = 2.98)
    level = live_test_level(1, horizon=10, n_slots=3)
    assert level == pytest.approx(0.05 * 0.95 / 11 / 3)
    std = 0.002
    # means in points: 0.9 (> 0.5 but bound 0.3: no), 1.0 (bound 0.4: no), 1.2 (bound 0.6: yes)
    for e, mean in enumerate([0.009, 0.010, 0.012, 0.03], start=1):
        est = ShapleyEstimate(mean, std, 200, "exact_enumeration", mean - 0.004, mean + 0.004)
        c.emit(cf(e, 0.8, 0.8 - mean, shapley={"mid": est}))
    assert (
        lower_bound(ShapleyEstimate(0.012, std, 200), level)
        > 0.005
        > lower_bound(ShapleyEstimate(0.010, std, 200), level)
    )
    assert a.contribution_onset_epoch("mid") == 3, "epoch 1's point estimate (0.9 points) is not an onset"
    assert a.contribution_onset_epoch("mid", threshold=2.0) == 4
    assert a.contribution_onset_epoch("late") is None


def test_claims_use_the_live_rule_then_the_final_verdict(setup):
    from karn_otel.contracts import EpisodeSummary

    c, a = setup
    # descriptively "significant" (ci_low > 0) but not by the live rule (z = 2.5 < 2.98)
    weak = ShapleyEstimate(0.005, 0.002, 200, "exact_enumeration", 0.001, 0.009)
    c.emit(cf(1, 0.8, 0.795, shapley={"mid": weak}))
    c.emit(slot("mid", seed_params=500))
    s = a.seed_contributions()["mid"]
    assert s.ci_low > 0 and not s.helps
    assert s.claim.rule == "alpha-spending" and s.claim.label() == "no claim (alpha-spending, 5% per run)"
    # the episode ends: the same matrix is now the final epoch, one Holm test (level 0.05, z 1.645)
    c.emit(
        EpisodeSummary(
            epochs_completed=1,
            final_val_loss=0.3,
            final_val_accuracy=0.8,
            host_only_accuracy=0.795,
            host_params=1000,
            total_params=1500,
            fossilized_params=0,
            wall_time_s=1.0,
        )
    )
    s = a.seed_contributions()["mid"]
    assert s.helps and s.claim.rule == "final-epoch Holm" and s.claim.p_value == pytest.approx(0.00621, abs=1e-4)


def test_shapley_preferred_over_removal_cost(setup):
    c, a = setup
    est = ShapleyEstimate(0.03, 0.005, 200, "exact_enumeration", 0.02, 0.04)
    c.emit(cf(1, 0.8, 0.75, shapley={"mid": est}))
    c.emit(slot("mid", seed_params=500))
    s = a.seed_contributions()["mid"]
    assert (s.contribution, s.ci_low, s.source) == (0.03, 0.02, "shapley")
    assert s.helps and s.efficiency == pytest.approx(100 * 0.03 / (500 / 1e4))
    assert s.claim.rule == "alpha-spending" and s.claim.bound > 0


def test_action_distribution_and_policy_vs_heuristic(setup):
    c, a = setup
    wait, germ = FactoredAction(ActionOp.WAIT), FactoredAction(ActionOp.GERMINATE, "mid", "norm")
    for action, shadow in [(wait, wait), (germ, wait), (wait, wait), (germ, germ)]:
        c.emit(ControllerDecision("ppo", action, "r", shadow_action=shadow))
    assert a.action_distribution() == {"WAIT": 0.5, "GERMINATE": 0.5, "FOSSILIZE": 0.0, "CULL": 0.0}
    cmp = a.policy_vs_heuristic()
    assert cmp.n_decisions == 4 and cmp.agreement == 0.75 and cmp.op_agreement == 0.75
    assert cmp.policy_ops == {"WAIT": 0.5, "GERMINATE": 0.5} and cmp.heuristic_ops == {"WAIT": 0.75, "GERMINATE": 0.25}


def test_training_health_reports_the_monitor():
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", strict=True))
    mon = HealthMonitor()
    c.add_processor(mon)
    a = MorphogeneticAnalytics(c.store, health=mon)
    c.emit(make_context())
    c.emit(host(epoch=1, train_loss=float("nan"), seed_grad_norms={}))
    report = a.training_health()
    assert not report.ok and report.check("non_finite_loss").ok is False
    assert MorphogeneticAnalytics(c.store).training_health() is None


def test_equivalent_traditional_params(tmp_path, setup):
    c, a = setup
    assert a.equivalent_traditional_params() is None, "unknown without a curve"
    curve = ReferenceCurve(((1000, 0.80), (4000, 0.90), (2000, 0.85), (8000, 0.88)), epochs=20, seed=0)
    path = tmp_path / "curve.json"
    curve.save(path)
    loaded = ReferenceCurve.load(path)
    a.reference_curve = loaded
    c.emit(host(epoch=1, val_accuracy=0.875, seed_grad_norms={}))
    # A curve of 20-epoch models says nothing about a model after 1 epoch (this curve has no
    # per-epoch accuracies): unknown, and why.
    assert a.equivalent_traditional_params() is None
    assert a.equivalent_traditional_note() == "the reference curve has only epoch 20 (recalibrate for every epoch)"
    c.emit(host(epoch=20, val_accuracy=0.875, seed_grad_norms={}))
    # sorted, monotone: (1000,.80) (2000,.85) (4000,.90) (8000,.90); 0.875 is halfway 2000..4000 in log space
    assert a.equivalent_traditional_params() == round(math.sqrt(2000 * 4000))
    assert a.equivalent_traditional_note() is None
    c.emit(host(epoch=21, val_accuracy=0.875, seed_grad_norms={}))
    assert a.equivalent_traditional_params() is None
    assert a.equivalent_traditional_note() == "the reference curve covers 20 epochs of training"
    assert loaded.params_for_accuracy(0.80) == 1000
    assert loaded.params_for_accuracy(0.95) is None, "no extrapolation beyond the curve"
    assert loaded.params_for_accuracy(0.5) is None


def test_equivalent_traditional_params_compare_models_trained_as_long(tmp_path, setup):
    """With per-epoch accuracies (what `karn calibrate` writes now), epoch e of a run is
    compared with the traditional models after e epochs, not after the curve's full length."""
    c, a = setup
    curve = ReferenceCurve(
        ((1000, 0.80), (4000, 0.90)), epochs=3, seed=0, by_epoch=((0.50, 0.70, 0.80), (0.60, 0.80, 0.90))
    )
    curve.save(tmp_path / "curve.json")
    a.reference_curve = ReferenceCurve.load(tmp_path / "curve.json")
    assert a.reference_curve == curve
    c.emit(host(epoch=1, val_accuracy=0.60, seed_grad_norms={}))
    assert a.equivalent_traditional_params() == 4000, "at epoch 1 only the big model reaches 60%"
    c.emit(host(epoch=2, val_accuracy=0.75, seed_grad_norms={}))
    assert a.equivalent_traditional_params() == 2000, "halfway (log) between 70% and 80% after 2 epochs"
    c.emit(host(epoch=3, val_accuracy=0.95, seed_grad_norms={}))
    assert a.equivalent_traditional_params() is None
    assert a.equivalent_traditional_note() == "accuracy outside the calibrated curve"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"points": [[1, 0.5], [2, 0.6]], "epochs": 3, "seed": 0, "by_epoch": [[0.5]]}))
    with pytest.raises(ValueError, match="by_epoch"):
        ReferenceCurve.load(bad)


def test_a_lasting_claim_keeps_its_star_through_the_fallback(setup):
    c, a = setup
    c.emit(slot("mid", seed_params=500))
    # z = 3.0 at epoch 1 (> 2.98: claimed), then z = 2.8 (< 2.98 alone, > 2.76 with the carried level)
    for e, mean in [(1, 0.030), (2, 0.028), (3, 0.028)]:
        est = ShapleyEstimate(mean, 0.01, 200, "exact_enumeration", mean - 0.02, mean + 0.02)
        c.emit(cf(e, 0.8, 0.8 - mean, shapley={"mid": est}))
        assert a.seed_contributions()["mid"].helps, e
    chain = a.live_chain("mid")
    assert [x.epoch for x in chain] == [1, 2, 3] and chain[2].test_level == pytest.approx(3 * chain[0].test_level)
    assert a.contribution_onset_epoch("mid", threshold=0.0) == 1
