"""HealthMonitor: every check fires on a failing input and stays quiet on a healthy one;
alerts are edge-triggered; odd input (NaN, inf, wrong types) is a finding, never a crash."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from karn_otel.config import DenseTraceTrigger
from karn_otel.contracts import (
    EVENT_TYPE_OF,
    AdvantageStats,
    HealthAlert,
    HostSnapshot,
    LSTMHealth,
    PPOUpdateStats,
    RatioStats,
    Severity,
    TelemetryEvent,
    TelemetryEventType,
)
from karn_otel.health import (
    CHECK_NAMES,
    CHECKS,
    DEFAULT_THRESHOLDS,
    HealthMonitor,
    HealthReport,
    HealthThresholds,
    HostHistory,
    ReturnMonitor,
    alert_thresholds,
    entropy_floors,
    host_findings,
    value_collapse_finding,
)
from tests.conftest import make_context
from tests.test_collector import host

NAN, INF = float("nan"), float("inf")


def ev(payload, epoch=1):
    """A stamped envelope, as the collector would hand it to a processor."""
    return TelemetryEvent(EVENT_TYPE_OF[type(payload)], "run", "ep-1", epoch, 0.0, payload)


def ppo(update_index=0, lstm_saturation=0.1, adv_std=1.0, **kw):
    """A healthy PPO update: KL 0.01 nats, EV 0.5, Var(V)/Var(R) = 0.5 * 0.5 = 0.25."""
    base = dict(
        update_index=update_index,
        policy_loss=-0.01,
        value_loss=0.2,
        kl_divergence=0.01,
        per_head_kl={"op": 0.005},
        explained_variance=0.5,
        entropy={"op": 1.0, "slot": 0.9},
        value_variance=0.5,
        advantage_stats=AdvantageStats(0.0, adv_std, -2.0, 2.0, 0.05),
        ratio_stats=RatioStats(1.0, 0.05, 0.05, {"op": 0.05}),
        lstm_health=LSTMHealth(0.0, 0.3, 0.0, 0.5, lstm_saturation) if lstm_saturation is not None else None,
    )
    base.update(kw)
    return PPOUpdateStats(**base)


def calm_hosts(n=4, start=1):
    """Slowly improving epochs: loss falls 5%/epoch, accuracy rises 1 point."""
    return [
        host(
            epoch=start + i,
            train_loss=1.0 * 0.95**i,
            val_accuracy=0.5 + 0.01 * i,
            host_grad_norm=1.0 + 0.1 * i,
            grad_isolation_leakage=0.0,
        )
        for i in range(n)
    ]


def run(monitor, payloads, start_epoch=1):
    """Feed payloads; return the alerts from each call."""
    out = []
    for i, p in enumerate(payloads):
        out.append(monitor(ev(p, getattr(p, "epoch", start_epoch + i))))
    return out


# --------------------------------------------------------------------------- thresholds


def test_thresholds_agree_with_dense_trace_trigger_defaults():
    spec = DenseTraceTrigger()
    assert DEFAULT_THRESHOLDS.loss_spike_ratio == spec.loss_spike_threshold == 2.0
    assert DEFAULT_THRESHOLDS.gradient_explosion_ratio == spec.gradient_explosion == 100.0
    assert DEFAULT_THRESHOLDS.accuracy_drop_points == spec.accuracy_drop_threshold == 5.0


def test_alert_thresholds_cover_every_check_with_spec_numbers():
    t = alert_thresholds()
    assert tuple(t) == CHECK_NAMES
    assert len(set(CHECK_NAMES)) == len(CHECK_NAMES) == 11
    assert all(isinstance(v, float) and math.isfinite(v) for v in t.values())
    assert t["kl_too_high"] == 0.1  # review P1 #6
    assert t["explained_variance_negative"] == 0.0  # review P1 #6
    assert t["loss_spike"] == 2.0 and t["gradient_explosion"] == 100.0 and t["accuracy_drop"] == 5.0
    assert t["non_finite_loss"] == 0.0
    assert {c.severity for c in CHECKS} <= {Severity.WARNING, Severity.CRITICAL}
    assert all(c.comparison in ("gt", "lt") for c in CHECKS)
    custom = alert_thresholds(HealthThresholds(kl_too_high=0.05))
    assert custom["kl_too_high"] == 0.05


def test_entropy_floors_relative_to_head_size():
    floors = entropy_floors({"op": 4, "slot": 2, "forced": 1})
    assert floors == pytest.approx({"op": 0.1 * math.log(4), "slot": 0.1 * math.log(2)})
    assert DEFAULT_THRESHOLDS.entropy_floor(None) == 0.1


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(loss_spike_ratio=1.0),
        dict(gradient_explosion_ratio=0.5),
        dict(accuracy_drop_points=0),
        dict(kl_too_low=0.2),
        dict(kl_too_high=-1),
        dict(lstm_saturation_fraction=1.5),
        dict(entropy_collapse_fraction=-0.1),
        dict(rolling_window_epochs=0),
        dict(value_collapse_ratio=NAN),
        dict(isolation_leakage_epsilon=-1e-6),
        dict(explained_variance_min=NAN),
    ],
)
def test_invalid_thresholds_raise_at_construction(kwargs):
    with pytest.raises(ValueError):
        HealthThresholds(**kwargs)


def test_invalid_monitor_configuration_raises():
    with pytest.raises(ValueError):
        HealthMonitor(head_sizes={"op": 0})
    with pytest.raises(TypeError):
        HealthMonitor(thresholds={"kl_too_high": 0.1})


# --------------------------------------------------------------------------- each check

# check -> (healthy trajectory, failing trajectory, head_sizes). The failing trajectory is the
# healthy prefix plus the event that breaks the check; only its last event may alert.
H = calm_hosts()
SCENARIOS = {
    "non_finite_loss": (H, H + [host(epoch=5, val_loss=NAN)], None),
    "loss_spike": (H + [host(epoch=5, train_loss=1.5)], H + [host(epoch=5, train_loss=2.5)], None),
    "gradient_explosion": (H + [host(epoch=5, host_grad_norm=50.0)], H + [host(epoch=5, host_grad_norm=500.0)], None),
    "accuracy_drop": (H + [host(epoch=5, val_accuracy=0.50)], H + [host(epoch=5, val_accuracy=0.47)], None),
    "isolation_leakage": (
        H + [host(epoch=5, grad_isolation_leakage=1e-9)],
        H + [host(epoch=5, grad_isolation_leakage=1e-3)],
        None,
    ),
    "kl_too_high": ([ppo(kl_divergence=0.05)], [ppo(), ppo(1, kl_divergence=0.2)], None),
    "kl_too_low": ([ppo(kl_divergence=1e-3)], [ppo(), ppo(1, kl_divergence=1e-6)], None),
    "explained_variance_negative": ([ppo(explained_variance=0.01)], [ppo(), ppo(1, explained_variance=-0.3)], None),
    # Var(R) = Var(A) / (1 - EV) = 1.0: Var(V) = 0.05 is 5% (healthy), 1e-4 is 0.01% (collapsed).
    "value_collapse": (
        [ppo(value_variance=0.05, explained_variance=0.0)],
        [ppo(), ppo(1, value_variance=1e-4, explained_variance=0.0)],
        None,
    ),
    "entropy_collapse": (
        [ppo(entropy={"op": 0.5, "slot": 0.2})],
        [ppo(), ppo(1, entropy={"op": 0.5, "slot": 0.02})],
        None,
    ),
    "lstm_saturation": ([ppo(lstm_saturation=0.4)], [ppo(), ppo(1, lstm_saturation=0.8)], None),
}


def test_every_check_has_a_scenario():
    assert set(SCENARIOS) == set(CHECK_NAMES)


@pytest.mark.parametrize("check", CHECK_NAMES)
def test_check_quiet_on_healthy_input(check):
    healthy, _, sizes = SCENARIOS[check]
    m = HealthMonitor(head_sizes=sizes, strict=True)
    assert [a for alerts in run(m, healthy) for a in alerts] == []
    report = m.report()
    assert report.ok and report.overall is Severity.OK
    assert report.check(check).ok
    assert set(m.status().values()) == {Severity.OK}


@pytest.mark.parametrize("check", CHECK_NAMES)
def test_check_fires_on_failing_input(check):
    _, failing, sizes = SCENARIOS[check]
    m = HealthMonitor(head_sizes=sizes, strict=True)
    alerts = run(m, failing)
    assert all(a == [] for a in alerts[:-1]), "the healthy prefix must not alert"
    assert [a.check for a in alerts[-1]] == [check]
    alert = alerts[-1][0]
    spec = {c.name: c for c in CHECKS}[check]
    assert isinstance(alert, HealthAlert) and alert.severity is spec.severity
    assert alert.message
    assert alert.threshold == alert_thresholds()[check] or check == "entropy_collapse"
    assert m.status()[check] is spec.severity
    result = m.report().check(check)
    assert not result.ok and result.severity is spec.severity and result.message == alert.message
    assert m.report().overall is spec.severity


def test_alert_values_are_in_the_checks_units():
    m = HealthMonitor(strict=True)
    run(m, calm_hosts(2))
    (a,) = m(ev(host(epoch=3, train_loss=3.0 * 0.975, val_accuracy=0.51), 3))
    assert a.check == "loss_spike" and a.value == pytest.approx(3.0) and a.threshold == 2.0
    (a,) = m(ev(host(epoch=4, train_loss=2.9, val_accuracy=0.41), 4))
    assert a.check == "accuracy_drop" and a.value == pytest.approx(10.0) and a.threshold == 5.0


def test_entropy_collapse_relative_to_head_size():
    # 0.12 nats: above the absolute 0.1 floor, below 10% of log(4) = 0.139 for a 4-way head.
    update = ppo(entropy={"op": 0.12, "slot": 0.6})
    assert HealthMonitor(strict=True)(ev(update)) == []
    (a,) = HealthMonitor(head_sizes={"op": 4, "slot": 3}, strict=True)(ev(update))
    assert a.check == "entropy_collapse" and "'op'" in a.message
    assert a.value == pytest.approx(0.12) and a.threshold == pytest.approx(0.1 * math.log(4))
    # A single-action head always has zero entropy: never a collapse.
    assert HealthMonitor(head_sizes={"op": 1}, strict=True)(ev(ppo(entropy={"op": 0.0, "slot": 0.6}))) == []


def test_negative_kl_estimate_is_judged_by_magnitude():
    m = HealthMonitor(strict=True)
    assert m(ev(ppo(kl_divergence=-0.005))) == []
    assert [a.check for a in m(ev(ppo(1, kl_divergence=-0.5)))] == ["kl_too_high"]


def test_value_collapse_uses_explained_variance_to_recover_return_variance():
    # Var(A) = 4, EV = 0.75 -> Var(R) = 16; Var(V) = 0.08 -> 0.5%.
    f = value_collapse_finding(0.08, 2.0, 0.75, 0.01)
    assert f.failing and f.value == pytest.approx(0.005)
    # Without a usable EV: Var(R) ~ Var(V) + Var(A) = 4.08.
    f = value_collapse_finding(0.08, 2.0, NAN, 0.01)
    assert not f.failing and f.value == pytest.approx(0.08 / 4.08)
    # No variance anywhere: a constant critic is right, not collapsed.
    assert value_collapse_finding(0.0, 0.0, 0.0, 0.01) is None
    assert value_collapse_finding(NAN, 1.0, 0.0, 0.01) is None


def test_loss_spike_baseline_is_a_rolling_window():
    m = HealthMonitor(HealthThresholds(rolling_window_epochs=2), strict=True)
    hosts = [host(epoch=e, train_loss=l) for e, l in enumerate([10.0, 10.0, 1.0, 1.0, 2.5], start=1)]
    alerts = run(m, hosts)
    # Against the last two epochs (1.0, 1.0) epoch 5 is a 2.5x spike; against all five it is not.
    assert [a.check for a in alerts[-1]] == ["loss_spike"]


def test_gradient_typical_is_a_median_robust_to_one_outlier():
    m = HealthMonitor(strict=True)
    norms = [1.0, 1.0, 90.0, 1.0, 1.0, 150.0]
    alerts = run(m, [host(epoch=e, host_grad_norm=n) for e, n in enumerate(norms, start=1)])
    assert [a.check for a in alerts[-1]] == ["gradient_explosion"]


# --------------------------------------------------------------------------- edge triggering


def test_persistent_failure_alerts_once_and_relapse_alerts_again():
    m = HealthMonitor(strict=True)
    leaks = [0.0, 1e-3, 1e-3, 1e-3, 0.0, 0.0, 1e-2, 1e-2]
    alerts = run(m, [host(epoch=e, grad_isolation_leakage=x) for e, x in enumerate(leaks, start=1)])
    fired = [e for e, a in enumerate(alerts, start=1) if a]
    assert fired == [2, 7]
    assert all(a[0].check == "isolation_leakage" and a[0].severity is Severity.CRITICAL for a in alerts if a)
    assert m.status()["isolation_leakage"] is Severity.CRITICAL


def test_status_shows_resolution():
    m = HealthMonitor(strict=True)
    m(ev(ppo(kl_divergence=0.5)))
    assert m.status()["kl_too_high"] is Severity.WARNING
    assert m(ev(ppo(1, kl_divergence=0.01))) == []
    assert m.status()["kl_too_high"] is Severity.OK
    assert m.report().check("kl_too_high").ok and m.report().check("kl_too_high").value == pytest.approx(0.01)


def test_emit_resolutions_returns_an_ok_alert_on_recovery():
    m = HealthMonitor(emit_resolutions=True, strict=True)
    (a,) = m(ev(ppo(kl_divergence=0.5)))
    assert a.severity is Severity.WARNING
    (r,) = m(ev(ppo(1, kl_divergence=0.01)))
    assert r.check == "kl_too_high" and r.severity is Severity.OK and r.message.startswith("resolved")
    assert m(ev(ppo(2, kl_divergence=0.01))) == []


def test_non_finite_loss_from_one_source_is_not_hidden_by_the_other():
    m = HealthMonitor(strict=True)
    (a,) = m(ev(ppo(value_loss=NAN)))
    assert a.check == "non_finite_loss" and "value_loss" in a.message
    # A finite host epoch does not clear the PPO finding, and does not re-alert.
    assert m(ev(host(epoch=1))) == []
    assert m.status()["non_finite_loss"] is Severity.CRITICAL
    assert m(ev(host(epoch=2, train_loss=INF))) == []
    m(ev(ppo(1)))
    assert m.status()["non_finite_loss"] is Severity.CRITICAL  # the host is still non-finite
    m(ev(host(epoch=3)))
    assert m.status()["non_finite_loss"] is Severity.OK


def test_episode_start_resets_history_and_status():
    m = HealthMonitor(strict=True)
    run(m, [host(epoch=1, train_loss=0.1), host(epoch=2, grad_isolation_leakage=1.0)])
    assert not m.report().ok
    assert m(ev(make_context(), 0)) == []
    report = m.report()
    assert report.ok and report.epoch is None
    assert all(math.isnan(c.value) and c.message == "no data yet" for c in report.checks)
    # History is gone too: 1.0 after 0.1 would have been a spike in the previous episode.
    assert m(ev(host(epoch=1, train_loss=1.0))) == []


def test_report_structure():
    m = HealthMonitor(strict=True)
    run(m, calm_hosts(3))
    m(ev(ppo(kl_divergence=0.5, explained_variance=-1.0), 3))
    r = m.report()
    assert isinstance(r, HealthReport) and r.epoch == 3
    assert tuple(c.name for c in r.checks) == CHECK_NAMES
    assert {c.name for c in r.failing} == {"kl_too_high", "explained_variance_negative"}
    assert r.overall is Severity.WARNING
    run(m, [host(epoch=4, val_loss=NAN)])
    assert m.report().overall is Severity.CRITICAL
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.overall = Severity.OK  # type: ignore[misc]


def test_other_event_types_are_ignored():
    m = HealthMonitor(strict=True)
    from tests.test_collector import slot

    assert m(ev(slot())) == []
    assert m.report().ok


# --------------------------------------------------------------------------- odd input


def test_all_nan_host_is_a_finding_not_a_crash():
    m = HealthMonitor(strict=True)
    run(m, calm_hosts(3))
    weird = host(
        epoch=4, train_loss=NAN, val_loss=INF, val_accuracy=NAN, host_grad_norm=NAN, grad_isolation_leakage=NAN
    )
    checks = {a.check for a in m(ev(weird, 4))}
    assert "non_finite_loss" in checks
    assert "loss_spike" not in checks, "a NaN loss is non_finite_loss's finding, not a spike"
    nf = m.report().check("non_finite_loss")
    assert nf.value == 2.0 and "train_loss=nan" in nf.message and "val_loss=inf" in nf.message
    # The NaN epoch did not poison the baselines: a normal epoch afterwards is healthy.
    assert {
        a.check
        for a in m(
            ev(host(epoch=5, train_loss=0.9, val_accuracy=0.53, host_grad_norm=1.2, grad_isolation_leakage=0.0), 5)
        )
    } == set()


def test_all_nan_ppo_is_a_finding_not_a_crash():
    m = HealthMonitor(strict=True)
    stats = ppo(
        policy_loss=NAN,
        value_loss=NAN,
        kl_divergence=NAN,
        explained_variance=NAN,
        value_variance=NAN,
        entropy={"op": NAN},
        advantage_stats=AdvantageStats(NAN, NAN, NAN, NAN, NAN),
        lstm_health=LSTMHealth(NAN, NAN, NAN, NAN, NAN),
    )
    (a,) = m(ev(stats))
    assert a.check == "non_finite_loss" and a.severity is Severity.CRITICAL and a.value == 5.0


def test_nan_entropy_of_an_unused_head_is_not_a_finding():
    # karn_otel/torch/ppo.py reports NaN for a head with no relevant sample in the update.
    m = HealthMonitor(strict=True)
    assert m(ev(ppo(entropy={"op": 1.0, "blueprint": NAN}))) == []
    assert m.report().check("entropy_collapse").ok
    assert "'op'" in m.report().check("entropy_collapse").message


def test_garbage_payload_never_raises_in_lenient_mode(caplog):
    m = HealthMonitor()
    bogus = TelemetryEvent(TelemetryEventType.HOST_SNAPSHOT, "r", "e", 1, 0.0, object())  # type: ignore[arg-type]
    alerts = m(bogus)
    assert [a.check for a in alerts] == ["non_finite_loss"]
    wrong_types = host(epoch=2, train_loss="1.0", host_grad_norm=None, val_accuracy=True)  # type: ignore[arg-type]
    m(ev(wrong_types, 2))
    m(ev(ppo(entropy=None, advantage_stats=None, lstm_health=object()), 2))  # type: ignore[arg-type]
    m("not an event")  # type: ignore[arg-type]


finite_or_not = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([NAN, INF, -INF, 0.0, -0.0, 1e-300, 1e300]),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            finite_or_not,
            finite_or_not,
            finite_or_not,
            finite_or_not,
            st.one_of(st.none(), finite_or_not),
            st.booleans(),
            finite_or_not,
        ),
        max_size=12,
    )
)
def test_never_raises_and_non_finite_loss_tracks_the_inputs(rows):
    m = HealthMonitor(strict=True)  # strict: an internal error would fail the test, not hide
    host_bad = ppo_bad = False
    for epoch, (tl, vl, acc, norm, leak, is_ppo, kl) in enumerate(rows, start=1):
        if is_ppo:
            m(
                ev(
                    ppo(epoch, kl_divergence=kl, explained_variance=acc, value_variance=abs(norm), entropy={"op": tl}),
                    epoch,
                )
            )
            ppo_bad = not all(math.isfinite(x) for x in (kl, acc, abs(norm)))
        else:
            m(
                ev(
                    host(
                        epoch=epoch,
                        train_loss=tl,
                        val_loss=vl,
                        val_accuracy=acc,
                        host_grad_norm=norm,
                        grad_isolation_leakage=leak,
                    ),
                    epoch,
                )
            )
            host_bad = not (math.isfinite(tl) and math.isfinite(vl))
        failing = m.status()["non_finite_loss"] is Severity.CRITICAL
        assert failing == (host_bad or ppo_bad)
    r = m.report()
    assert len(r.checks) == len(CHECK_NAMES)


def test_the_job_wide_snapshot_is_not_judged_as_this_ranks():
    """Rank 0 also sees the reduced (job-wide) HostSnapshot in a DDP job: its monitor judges
    rank 0's own values only, so a job-wide mean never raises or clears a rank-local alert."""
    import dataclasses as dc

    from karn_otel.contracts import HostSnapshot, TelemetryEvent, TelemetryEventType
    from karn_otel.health import HealthMonitor
    from karn_otel.triggers import DenseTriggerEngine

    def ev(h, reduced):
        return TelemetryEvent(TelemetryEventType.HOST_SNAPSHOT, "r", "e", h.epoch, 0.0, h, 0, 2, reduced)

    base = HostSnapshot(1, 1.0, 0.5, 1.0, 0.5, 100, 0, 100, 0, 1.0, {}, None)
    mon = HealthMonitor()
    for e in range(1, 6):
        assert mon(ev(dc.replace(base, epoch=e), False)) == []
    spike = dc.replace(base, epoch=6, train_loss=50.0)
    assert mon(ev(spike, True)) == []  # a job-wide spike is not rank 0's
    assert mon(ev(dc.replace(spike, epoch=6), False)) != []  # rank 0's own spike is
    from karn_otel.config import DenseTraceTrigger

    eng = DenseTriggerEngine(DenseTraceTrigger())
    assert eng.anomalies(ev(spike, True)) == []


def test_a_findings_message_is_formatted_lazily_and_reads_the_state_of_its_evaluation():
    """Messages are formatted only when read; one read later still describes the
    observation that produced it, not the monitor's state since."""
    m = ReturnMonitor()
    regressions = []
    for r in [0.0] * 20 + [float(i) for i in range(1, 200)] + [0.0] * 200:
        regressions += [f for f in m._return(r) if f.check == "return_regression"]
    assert regressions, "the simulated collapse must be evaluated"
    first = regressions[0]
    assert callable(first.text)
    text = first.message
    for r in [500.0] * 100:  # the monitor's best mean and window move on
        m._return(r)
    assert first.message == text
    assert "mean return over" in text and "%" in text
    # The host checks: a passing finding formats on read, with the numbers it was built from.
    hist = HostHistory(5)
    snap = HostSnapshot(3, 0.5, 0.9, 0.6, 0.8, 1, 0, 1, 0, 1.0, {}, None)
    hist.update(snap)
    spike = next(f for f in host_findings(snap, hist, DEFAULT_THRESHOLDS) if f.check == "loss_spike")
    hist.update(HostSnapshot(4, 50.0, 0.9, 0.6, 0.8, 1, 0, 1, 0, 1.0, {}, None))
    assert not spike.failing and spike.message.startswith("train loss 0.5 is 1x its rolling mean 0.5")
