"""Console: the spec's dashboard blocks render from the store; plain mode prints per epoch."""

from __future__ import annotations

import io

from karn_otel.contracts import (
    ActionOp,
    ControllerDecision,
    CounterfactualMatrix,
    CounterfactualResult,
    FactoredAction,
    HealthAlert,
    Severity,
    ShapleyEstimate,
)
from karn_otel.sinks.console import WIDTH, ConsoleSink
from tests.conftest import make_context
from tests.test_collector import host, slot


class Tty(io.StringIO):
    def isatty(self):
        return True


def _matrix(est=None, on_alpha=1.0):
    """The epoch-4 matrix of one slot, "mid", evaluated on at ``on_alpha``."""
    return CounterfactualMatrix(
        epoch=4,
        slot_ids=("mid",),
        configs=(
            CounterfactualResult((True,), {"mid": on_alpha}, 0.3, 0.672),
            CounterfactualResult((False,), {"mid": 0.0}, 0.4, 0.623),
        ),
        marginal_contributions={"mid": 0.049},
        interaction_effects={},
        shapley_values={"mid": est or ShapleyEstimate(0.049, 0.01, 1, "exact_enumeration", 0.029, 0.069)},
    )


def _feed(c, est=None):
    c.emit(make_context())
    c.emit(_matrix(est))
    c.emit(ControllerDecision("heuristic", FactoredAction(ActionOp.GERMINATE, "mid", "attention"), "plateau"))
    c.emit(slot("mid", alpha=1.0, seed_params=2000, blueprint_id="attention"))
    c.emit(HealthAlert("loss_spike", Severity.WARNING, "loss 3.1x rolling mean", 3.1, 2.0))
    c.emit(
        host(
            epoch=4,
            val_accuracy=0.672,
            host_params=10_000,
            total_seed_params=2000,
            total_params=12_000,
            seed_grad_norms={},
        )
    )


def test_equivalent_traditional_says_why_it_is_unknown(memory_collector):
    """A reference curve of 20-epoch models is not compared with a model after 4 epochs: the
    row says unknown and why, instead of a size that would mislead (or a wrong reason)."""
    from karn_otel.analytics import ReferenceCurve

    sink = ConsoleSink(memory_collector.view, live=True, stream=Tty(), refresh_hz=50)
    memory_collector.add_sink(sink)
    sink.analytics.reference_curve = ReferenceCurve(((1000, 0.5), (100_000, 0.9)), epochs=20, seed=0)
    _feed(memory_collector)  # epoch 4, 67.2%: inside the curve's accuracy range
    text = "\n".join(sink.render())
    assert "EQUIV. TRADITIONAL unknown (the reference curve has only epoch 20" in text, text
    sink.analytics.reference_curve = ReferenceCurve(
        ((1000, 0.5), (100_000, 0.9)), epochs=20, seed=0, by_epoch=((0.4,) * 20, (0.8,) * 20)
    )
    text = "\n".join(sink.render())
    # after 4 epochs the models reach 40% and 80%: 67.2% is 0.68 of the way, log-linearly
    # 1000 * 100**0.68 = 22,909 params, 1.91x the run's 12,000
    assert "EQUIV. TRADITIONAL 22,909 params (1.91x ours)" in text, text


def test_a_blending_seed_shows_the_alpha_its_contribution_was_measured_at(memory_collector):
    """The trainer measures an epoch's matrix, then advances the blend: the snapshot's alpha
    (0.75) is not the one the contribution was measured at (0.50). Both are shown, and said
    which is which; a seed measured at its current alpha shows one number."""
    from karn_otel.contracts import SeedStage

    sink = ConsoleSink(memory_collector.view, live=True, stream=Tty(), refresh_hz=50)
    memory_collector.add_sink(sink)
    c = memory_collector
    c.emit(make_context())
    c.emit(_matrix(on_alpha=0.5))
    c.emit(slot("mid", alpha=0.75, stage=SeedStage.BLENDING, seed_params=2000))
    c.emit(host(epoch=4, val_accuracy=0.672, seed_grad_norms={}))
    assert sink.analytics.seed_contributions()["mid"].measured_alpha == 0.5
    text = "\n".join(sink.render())
    assert "α=0.50→0.75 +4.9% [+2.9,+6.9]" in text, text
    assert "α=a→b: the contribution was measured at a; the blend is now at b" in text
    assert "seeds mid:BLEND@0.50→0.75+4.9%[+2.9%,+6.9%]" in sink.plain_line(), sink.plain_line()
    c.emit(slot("mid", alpha=0.5, stage=SeedStage.BLENDING, seed_params=2000))
    text = "\n".join(sink.render())
    assert "α=0.50 +4.9%" in text and "→" not in text, text


def test_live_dashboard_renders_every_block(memory_collector):
    stream = Tty()
    sink = ConsoleSink(memory_collector.view, live=True, stream=stream, refresh_hz=50)
    memory_collector.add_sink(sink)
    _feed(memory_collector)
    lines = sink.render()
    text = "\n".join(lines)
    assert all(len(line) == WIDTH + 2 for line in lines), "a closed box"
    assert "Epoch 4/10" in text
    assert "67.2% (+4.9% vs host-only removal, not causal)" in text and "✓ WIN" in text
    assert "VS CONTROL" not in text  # no control twin: no causal number is shown
    assert "PARAM RATIO     1.20x" in text
    assert "mid:" in text and "+4.9% [+2.9,+6.9]" in text and "attention" in text
    assert "GERMINATE(mid,attention)" in text
    assert "loss_spike" in text
    # 0.049 / 0.01 = 4.9 > 2.98 (one-sided 0.05 * 0.95 / 11 / 3): the live rule claims it
    assert (
        "+4.9% [+2.9,+6.9]★ eff 24.5 attention 2.0Kp" in text
        and "★ = helps by alpha-spending, 5% false claims/run" in text
    )
    sink.close()
    assert "KARN" in stream.getvalue(), "the refresh thread drew to the terminal"


def test_plain_mode_prints_one_line_per_epoch_and_alerts(memory_collector):
    stream = io.StringIO()
    sink = ConsoleSink(memory_collector.view, live=None, stream=stream)
    assert sink.live is False, "not a terminal: plain lines"
    memory_collector.add_sink(sink)
    _feed(memory_collector)
    out = stream.getvalue().splitlines()
    assert len(out) == 2
    assert out[0].startswith("[karn] ALERT warning loss_spike")
    assert out[1].startswith("[karn] epoch 4/10") and "+4.9% vs host-only removal)" in out[1]


def test_policy_health_block_judges_collapse():
    from karn_otel import collector as kc
    from karn_otel.config import KarnConfig
    from karn_otel.contracts import AdvantageStats, LSTMHealth, PPOUpdateStats, RatioStats
    from karn_otel.sinks.factory import build_pipeline

    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", strict=True, policy_head_sizes={"op": 4}))
    build_pipeline(c.config, c, sinks=[])
    sink = ConsoleSink(c.view, live=False, stream=io.StringIO())
    c.add_sink(sink)
    c.emit(make_context())

    def update(i, entropy):
        return PPOUpdateStats(
            update_index=i,
            policy_loss=0.1,
            value_loss=0.2,
            kl_divergence=0.01,
            per_head_kl={"op": 0.01},
            explained_variance=0.5,
            entropy={"op": entropy},
            value_variance=0.5,
            advantage_stats=AdvantageStats(0.0, 1.0, -2.0, 2.0, 0.0),
            ratio_stats=RatioStats(1.0, 0.05, 0.05, {"op": 0.1}),
            lstm_health=LSTMHealth(0.0, 0.3, 0.0, 0.5, 0.01),
        )

    c.emit(update(1, 1.2), epoch=1)
    text = "\n".join(sink.render())
    assert "Entropy: 1.20 (exploring)" in text and "(healthy)" in text
    c.emit(update(2, 0.001), epoch=2)
    text = "\n".join(sink.render())
    assert "Entropy: 0.00 (COLLAPSED)" in text and "entropy_collapse" in text


def test_star_comes_from_the_claim_rule_not_the_descriptive_interval(memory_collector):
    """ci_low > 0 (descriptive, +0.5 points) is not a claim: the live rule needs z > 2.98 here."""
    sink = ConsoleSink(memory_collector.view, live=False, stream=io.StringIO())
    memory_collector.add_sink(sink)
    _feed(memory_collector, ShapleyEstimate(0.025, 0.01, 200, "exact_enumeration", 0.005, 0.045))
    text = "\n".join(sink.render())
    assert "+2.5% [+0.5,+4.5]" in text and "descriptive 95% CI" in text
    assert "+2.5% [+0.5,+4.5] eff 12.5" in text, "no star on the seed row"
    assert "★ = helps by alpha-spending" in text
    assert "(helps)" not in sink.plain_line()
    assert sink.verdict_line() == "[karn] live claims (alpha-spending, 5% false-claim rate per run): mid no claim"


def test_episode_end_prints_the_final_holm_verdict(memory_collector):
    from karn_otel.contracts import EpisodeSummary

    stream = io.StringIO()
    sink = ConsoleSink(memory_collector.view, live=False, stream=stream)
    memory_collector.add_sink(sink)
    _feed(memory_collector, ShapleyEstimate(0.025, 0.01, 200, "exact_enumeration", 0.005, 0.045))
    memory_collector.emit(EpisodeSummary(10, 0.3, 0.672, 0.623, 10_000, 12_000, 0, 5.0))
    out = stream.getvalue().splitlines()
    # one pre-set test (z = 2.5 > 1.645; Holm over one slot): the final verdict claims it
    assert out[-1] == "[karn] final verdict (final-epoch Holm, 5% false-claim rate per run): mid helps"


def test_an_rl_episode_ends_with_its_own_headline_not_a_nan_accuracy():
    import io
    import math

    from karn_otel import collector as kc
    from karn_otel.config import KarnConfig
    from karn_otel.contracts import EpisodeSummary
    from karn_otel.sinks.console import ConsoleSink
    from tests.conftest import make_context

    out = io.StringIO()
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off"))
    from karn_otel.sinks.factory import build_pipeline

    build_pipeline(c.config, c, sinks=[], processors=False)
    c.pipeline.add_sink(ConsoleSink(c.view, live=False, stream=out))
    c.emit(make_context())
    c.emit(
        EpisodeSummary(3, math.nan, math.nan, None, 10, 10, 0, 1.0, final_metrics={"episodic_return_mean100": 198.0})
    )
    c.close()
    text = out.getvalue()
    assert "episodic_return_mean100 198" in text and "nan%" not in text


def test_a_loop_without_slots_is_not_compared_with_a_host_only_model():
    import io

    from karn_otel import collector as kc
    from karn_otel.config import KarnConfig
    from karn_otel.contracts import HostSnapshot
    from karn_otel.sinks.console import ConsoleSink
    from karn_otel.sinks.factory import build_pipeline
    from tests.conftest import make_context

    out = io.StringIO()
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off"))
    build_pipeline(c.config, c, sinks=[], processors=False)
    sink = ConsoleSink(c.view, live=False, stream=out)
    c.pipeline.add_sink(sink)
    c.emit(make_context(slots=()))
    c.emit(HostSnapshot(1, 1.0, 0.5, 1.0, 0.6, 100, 0, 100, 0, 1.0, {}, None))
    c.close()
    line = next(ln for ln in out.getvalue().splitlines() if ln.startswith("[karn] epoch 1"))
    assert "val_acc  60.0%" in line and "host-only" not in line


def test_a_row_too_long_for_the_box_shortens_its_left_side_never_the_verdict():
    """The audit's find: 'ACCURACY 92.5% (+0.0% vs host-only removal, not causal) ✗ not y│'."""
    from karn_otel.sinks.console import _box, _lr

    left = "ACCURACY        100.0% (+10.3% vs host-only removal, not causal)"
    (row,) = [r for r in _box([_lr(left, "✗ not yet")]) if "ACCURACY" in r]
    assert row.endswith("✗ not yet│") and "…" in row and len(row) == WIDTH + 2, row
    short = _lr("ACCURACY        92.5%", "✓ WIN")
    assert short.startswith("ACCURACY        92.5%") and short.endswith(" ✓ WIN") and "…" not in short


def test_the_final_verdict_says_when_a_claimed_seed_was_culled_after_it(memory_collector):
    from karn_otel.contracts import EpisodeSummary, SeedStage

    sink = ConsoleSink(memory_collector.view, live=False, stream=io.StringIO())
    memory_collector.add_sink(sink)
    _feed(memory_collector)
    memory_collector.emit(slot("mid", alpha=0.0, stage=SeedStage.CULLED, seed_params=2000))
    memory_collector.emit(EpisodeSummary(4, 1.0, 0.623, 0.623, 10_000, 10_000, 0, 1.0))
    line = sink.verdict_line()
    assert line is not None and line.startswith("[karn] final verdict"), line
    assert "mid helps (then culled: not in the final model)" in line, line


def test_a_refused_action_is_shown_as_refused(memory_collector):
    sink = ConsoleSink(memory_collector.view, live=True, stream=Tty(), refresh_hz=50)
    memory_collector.add_sink(sink)
    _feed(memory_collector)
    memory_collector.emit(
        ControllerDecision("heuristic", FactoredAction(ActionOp.FOSSILIZE, "mid"), "probation done", applied=False)
    )
    assert "action FOSSILIZE(mid) (refused)" in sink.plain_line(), sink.plain_line()
    text = "\n".join(sink.render())
    assert "Recent actions: GERMINATE(mid,attention) FOSSILIZE(mid) (refused)" in text, text


def test_the_alerts_block_says_its_scope(memory_collector):
    """The store holds one episode: the alerts block says so, and that it shows the latest
    three of more; the telemetry line is the run's."""
    sink = ConsoleSink(memory_collector.view, live=True, stream=Tty(), refresh_hz=50)
    memory_collector.add_sink(sink)
    _feed(memory_collector)
    for k in range(4):
        memory_collector.emit(HealthAlert("loss_spike", Severity.WARNING, f"spike {k}", 3.0, 2.0))
    text = "\n".join(sink.render())
    assert "ALERTS (this episode): 5, the latest 3:" in text, text
    assert "TELEMETRY (run): " in text
    memory_collector.emit(make_context(episode_id="ep-2"))
    assert "ALERTS (this episode): None" in "\n".join(sink.render())


def test_a_ppo_controller_without_an_update_this_episode_says_so(memory_collector):
    sink = ConsoleSink(memory_collector.view, live=True, stream=Tty(), refresh_hz=50)
    memory_collector.add_sink(sink)
    memory_collector.emit(make_context())
    memory_collector.emit(ControllerDecision("ppo", FactoredAction(ActionOp.WAIT), "policy"))
    memory_collector.emit(host(epoch=1, seed_grad_norms={}))
    assert "controller: ppo (no PPO update yet this episode)" in "\n".join(sink.render())
