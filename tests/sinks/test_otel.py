"""OTel sink: what the exporters really send (decoded by a loopback receiver), what Prometheus
really scrapes, and that an unreachable collector costs neither training time nor a hung exit."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import MetricExporter
from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client.parser import text_string_to_metric_families

import karn_otel
from karn_otel import collector as kc
from karn_otel import metrics_registry as reg
from karn_otel.config import KarnConfig
from karn_otel.contracts import (
    ActionOp,
    AdvantageStats,
    BatchMetrics,
    ControllerDecision,
    CounterfactualMatrix,
    CounterfactualResult,
    DenseTrace,
    EpisodeSummary,
    FactoredAction,
    GateEvaluationTrace,
    HealthAlert,
    HostBaseline,
    HostSnapshot,
    LSTMHealth,
    PolicySnapshot,
    PPOUpdateStats,
    RankHealthSummary,
    RankSpread,
    RatioStats,
    RewardComponentsTelemetry,
    Scalars,
    SeedStage,
    Severity,
    ShapleyEstimate,
    SlotSnapshot,
    StageTransition,
    TelemetryEventType,
)
from karn_otel.health import CHECK_NAMES
from karn_otel.reference.trainer import RunConfig, run_episode
from karn_otel.sinks import otel
from karn_otel.sinks.factory import build_pipeline
from karn_otel.sinks.otel import OTelSink, build_resource, trace_id_for_episode
from karn_otel.sinks.otel import resource as otel_resource
from karn_otel.sinks.runlog import read_run
from tests.conftest import make_context
from tests.otlp_receiver import OTLPReceiver

PROTOCOLS = ["grpc", "http/protobuf"]
COMMON = set(reg.COMMON_LABELS)

# What a 3-epoch reference episode (heuristic controller) cannot produce, and why. Every one
# of them is produced, and scraped, by hand-made events in
# test_every_registry_metric_is_scraped_under_its_prometheus_name.
NOT_IN_SHORT_REFERENCE_RUN = {
    # No seed germinates in 3 epochs (warm-up), so nothing per-seed is measured, and with
    # fewer than two active seeds there is no Shapley estimate.
    "karn.host.seed_grad_norm",
    "karn.host.grad_isolation_leakage",
    "karn.slot.counterfactual_contribution",
    "karn.slot.total_improvement",
    "karn.slot.last_gate_passed",
    "karn.counterfactual.removal_cost",
    *(m.name for m in reg.METRICS if m.source == "shapley"),
    # The heuristic controller is no PPO policy and has no shadow to agree with.
    *(m.name for m in reg.METRICS if m.source in ("policy", "ppo")),
    "karn.analytics.policy_agreement",
    # A claim needs a Shapley estimate; a control twin needs karn run --control.
    "karn.counterfactual.claim",
    *(m.name for m in reg.METRICS if m.source == "control"),
    # One process: no reduction, so no spread across ranks (tests/stack/test_ddp_scrape.py has it).
    *(m.name for m in reg.METRICS if m.source in ("ranks", "ranks_unhealthy", "ranks_unhealthy_epochs")),
}
INJECTED_REASON = "test_injected_window"


# ---------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _no_final_scrape_wait(monkeypatch):
    """These tests scrape once and shut down: no wait for a final scrape unless a test asks."""
    monkeypatch.setenv(otel.sink.ENV_FINAL_SCRAPE_S, "0")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def otel_sink(collector: kc.KarnCollector) -> OTelSink:
    return next(s for s in collector.sinks if isinstance(s, OTelSink))


def scrape(port: int) -> dict[str, list]:
    """Prometheus text exposition -> {sample name: [(labels, value), ...]}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def batches(epoch: int, n: int) -> tuple[BatchMetrics, ...]:
    return tuple(BatchMetrics(epoch, i, 2.0 - i / n, i / n, 0.5, {}, None) for i in range(n))


def dense_trace(epoch: int) -> DenseTrace:
    return DenseTrace(
        trigger_reason=INJECTED_REASON,
        window_start_epoch=epoch,
        window_end_epoch=epoch,
        batch_metrics=batches(epoch, 40),
        gradient_histograms={},
        gradient_flow={"conv1": 0.3},
        activation_means={"conv1": 0.1},
        activation_stds={"conv1": 1.0},
        dead_neuron_counts={"conv1": 2},
    )


def run_reference(tmp_path: Path, **otel_config) -> tuple[kc.KarnCollector, str]:
    """The reference episode (3 epochs) with a DenseTrace emitted after epoch 2, as a trigger would."""
    c = karn_otel.configure(KarnConfig(out_dir=tmp_path, console="off", otel_export_interval_s=0.2, **otel_config))

    def dense_after_epoch_2(env):
        if env.event_type is TelemetryEventType.HOST_SNAPSHOT and env.payload.epoch == 2:
            return [dense_trace(2)]
        return ()

    c.add_processor(dense_after_epoch_2)
    result = run_episode(RunConfig(epochs=3))
    return c, result.episode_id


# ---------------------------------------------------------------------- the registry and its docs


def test_docs_are_generated_from_the_registry():
    path = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
    assert path.read_text(encoding="utf-8") == reg.render_markdown(), (
        "docs/metrics.md is stale: run python -m karn_otel.metrics_registry --write-docs"
    )
    assert reg.main(["--check"]) == 0


def test_registry_rules():
    reg.validate()
    for m in reg.METRICS:
        assert set(m.labels) <= set(reg.LABEL_VALUES), m.name
        assert not COMMON & set(m.labels), m.name
        assert "_" + m.unit not in m.name, f"{m.name}: no unit in the name"
    assert reg.prometheus_name("karn.host.val_loss", "1", "gauge") == "karn_host_val_loss"
    assert reg.prometheus_name("karn.episode.duration", "s", "gauge") == "karn_episode_duration_seconds"
    assert reg.prometheus_name("karn.health.alerts", "{alert}", "counter") == "karn_health_alerts_total"
    with pytest.raises(ValueError):
        reg.prometheus_name("karn.x", "furlong", "gauge")
    with pytest.raises(ValueError, match="bounded label"):
        reg.validate((reg.MetricDef("karn.bad.seed", "gauge", "1", "d", "slot", "alpha", "seed_id"),))


def test_trace_id_is_the_episode_id():
    eid = uuid.uuid4().hex
    assert f"{trace_id_for_episode(eid):032x}" == eid
    other = trace_id_for_episode("ep-1")
    assert 0 < other < 2**128 and other == trace_id_for_episode("ep-1") != trace_id_for_episode("ep-2")


def test_resource_merges_standard_env(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=lab,karn.rank=99")
    r = build_resource(KarnConfig(out_dir=None), "run-1", 2, 4).attributes
    assert r["service.name"] == "karn"
    assert r["service.instance.id"] == "run-1-rank2"
    assert (r["karn.run_id"], r["karn.rank"], r["karn.world_size"]) == ("run-1", 2, 4), "Karn's facts win over the env"
    assert r["deployment.environment"] == "lab" and r["host.name"]
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    assert build_resource(KarnConfig(out_dir=None), "r", 0, 1).attributes["service.name"] == "from-env"
    cfg = KarnConfig(out_dir=None, service_name="from-config")
    assert build_resource(cfg, "r", 0, 1).attributes["service.name"] == "from-config"


# ---------------------------------------------------------------------- the reference episode over OTLP


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reference_episode_over_otlp(tmp_path, protocol):
    with OTLPReceiver(protocol) as rx:
        try:
            c, episode_id = run_reference(
                tmp_path, otlp_endpoint=rx.endpoint, otlp_protocol=protocol, prometheus_port=0
            )
            sink = otel_sink(c)
            assert sink.otlp_protocol == protocol
            assert trace.get_tracer_provider() is not sink._tracer_provider, "Karn never sets the global provider"
            scraped = scrape(sink.prometheus_port)
        finally:
            karn_otel.shutdown()

        check_resource(rx, c)
        check_trace(rx.spans(), episode_id)
        check_otlp_metrics(rx)
        check_epoch_exemplars(rx, tmp_path / c.run_id)
    check_prometheus(scraped, c, expect=[m for m in reg.METRICS if m.name not in NOT_IN_SHORT_REFERENCE_RUN])
    # With the HealthMonitor attached (configure() does), every check has a status, passing or not.
    assert {lb["check"] for lb, _ in scraped["karn_health_status"]} == set(CHECK_NAMES)


def check_resource(rx: OTLPReceiver, c: kc.KarnCollector) -> None:
    resources = rx.resources()
    assert resources, "nothing arrived"
    for r in resources:
        assert r["service.name"] == "karn"
        assert r["service.instance.id"] == f"{c.run_id}-rank0"
        assert (r["karn.run_id"], r["karn.rank"], r["karn.world_size"]) == (c.run_id, 0, 1)


def check_trace(spans: list, episode_id: str) -> None:
    assert {s.trace_id for s in spans} == {episode_id}, "one trace per episode, its id the episode id"
    roots = [s for s in spans if s.name == "karn.episode"]
    assert len(roots) == 1 and roots[0].parent_span_id == ""
    root = roots[0]
    assert root.attributes["karn.episode_id"] == episode_id
    assert root.attributes["karn.episode.complete"] is True
    epochs = sorted((s for s in spans if s.name == "karn.epoch"), key=lambda s: s.start_ns)
    assert [s.attributes["karn.epoch"] for s in epochs] == [1, 2, 3]
    for prev, span in zip([root] + epochs, epochs):
        assert span.parent_span_id == root.span_id
        assert span.attributes["karn.episode_id"] == episode_id
        assert {"karn.val_loss", "karn.val_accuracy", "karn.train_loss", "karn.total_params"} <= set(span.attributes)
        assert span.attributes["karn.slot.early.stage"] == "DORMANT"
        # Epochs tile the episode: each starts where the previous one ended.
        assert span.start_ns == (prev.start_ns if prev is root else prev.end_ns) and span.end_ns >= span.start_ns
        names = [e[0] for e in span.events]
        assert "karn.controller_decision" in names
        assert span.status == "UNSET", "a healthy epoch has no error status"
        # The counterfactual pass is a timed child of its epoch, inside it.
        [cf] = [s for s in spans if s.name == "karn.counterfactual" and s.parent_span_id == span.span_id]
        assert span.start_ns <= cf.start_ns <= cf.end_ns <= span.end_ns
        assert cf.end_ns - cf.start_ns == pytest.approx(cf.attributes["karn.elapsed_s"] * 1e9, rel=1e-3, abs=2e3)
    assert root.end_ns >= epochs[-1].end_ns
    assert root.status == "UNSET" and root.resource["service.version"] == karn_otel.__version__
    windows = [s for s in spans if s.name == "karn.dense_window"]
    dense = [s for s in windows if s.attributes["karn.dense.trigger_reason"] == INJECTED_REASON]
    assert len(dense) == 1
    d = dense[0]
    assert d.parent_span_id == root.span_id
    assert (d.attributes["karn.dense.window_start_epoch"], d.attributes["karn.dense.window_end_epoch"]) == (2, 2)
    assert d.attributes["karn.dense.batches"] == 40
    batch_events = [e for e in d.events if e[0] == "karn.batch"]
    assert len(batch_events) == otel.MAX_BATCH_EVENTS, "batches are bounded span events"
    assert batch_events[0][2]["karn.batch_idx"] == 0 and batch_events[-1][2]["karn.batch_idx"] == 39
    assert d.start_ns == epochs[1].start_ns, "the window starts with its first epoch"
    assert {s.name for s in spans} == {"karn.episode", "karn.epoch", "karn.counterfactual", "karn.dense_window"}


def check_epoch_exemplars(rx: OTLPReceiver, run_dir: Path) -> None:
    """karn.epoch.duration: one record per epoch, each with an exemplar that is that epoch's span;
    the host (loss) points carry their epoch's span as exemplar too."""
    epochs = {s.span_id: s for s in rx.spans() if s.name == "karn.epoch"}
    points = [p for p in rx.metric_points() if p.name == "karn.epoch.duration"]
    assert points and points[-1].value[0] == 3, "three epochs recorded"
    exemplars = {(t, sid): v for p in points for t, sid, v in p.exemplars}
    assert {sid for _, sid in exemplars} == set(epochs), "every epoch's span, and only those"
    for (trace_id, span_id), v in exemplars.items():
        span = epochs[span_id]
        assert trace_id == span.trace_id
        assert v == pytest.approx((span.end_ns - span.start_ns) / 1e9, abs=2e-3), "the epoch's wall time"
    # The loss points link to their epoch: each exemplar's span has that point's train loss.
    loss = [p for p in rx.metric_points() if p.name == "karn.host.train_loss"]
    assert loss
    for p in loss:
        [(trace_id, span_id, v)] = p.exemplars
        assert v == p.value == epochs[span_id].attributes["karn.train_loss"]
    hosts = [e for e in read_run(run_dir).events if e.event_type is TelemetryEventType.HOST_SNAPSHOT]
    starts = [read_run(run_dir).events[0].timestamp] + [h.timestamp for h in hosts[:-1]]
    assert points[-1].value[1] == pytest.approx(sum(h.timestamp - t for h, t in zip(hosts, starts)), abs=1e-3)


def check_otlp_metrics(rx: OTLPReceiver) -> None:
    points = rx.metric_points()
    assert points
    kinds = {"gauge": "gauge", "counter": "sum", "histogram": "histogram"}
    names = set()
    for p in points:
        m = reg.by_name(p.name)  # KeyError: a metric the registry does not know
        names.add(p.name)
        assert (p.unit, p.description, p.kind) == (m.unit, m.description, kinds[m.kind]), p.name
        assert set(p.attributes) == COMMON | set(m.labels), p.name
        assert p.attributes["rank"] == 0 and p.attributes["world_size"] == 1
    assert {"karn.host.val_loss", "karn.slot.alpha", "karn.telemetry.events.accepted"} <= names


# Job-wide series whose `rank` label names the rank they are about, not the exporter.
NAMES_A_RANK = {"karn_ranks_unhealthy_rank", "karn_ranks_unhealthy_epochs_total"}


def check_prometheus(scraped: dict, c: kc.KarnCollector, expect: list) -> None:
    # Every series carries the run, the rank and the world size.
    for name, series in scraped.items():
        if name == "target_info":
            continue
        for labels, _ in series:
            assert labels["run_id"] == c.run_id and labels["world_size"] == str(c.world_size), name
            if labels.get("scope") == "job":  # job-wide: no exporter rank (unhealthy_rank names a rank)
                assert "rank" not in labels or name in NAMES_A_RANK, name
                continue
            assert labels["rank"] == str(c.rank), name
    assert scraped["target_info"][0][0]["service_instance_id"] == f"{c.run_id}-rank{c.rank}"
    known = {p: m for m in reg.METRICS for p in m.prometheus_series}
    for name, series in scraped.items():
        if name == "target_info":
            continue
        m = known.get(name)
        assert m is not None, f"{name} is exposed but is no registry prometheus_name"
        for labels, _ in series:
            want = COMMON | set(m.labels) | ({"le"} if name.endswith("_bucket") else set())
            if labels.get("scope") == "job" and name not in NAMES_A_RANK:
                want -= {"rank"}
            assert set(labels) == want, name
    missing = [m.name for m in expect if not set(m.prometheus_series) <= set(scraped)]
    assert not missing, f"registry metrics not exposed under their prometheus_name: {missing}"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_standard_otel_env_configures_the_export(monkeypatch, protocol):
    with OTLPReceiver(protocol) as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-karn-tenant=lab")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "karn-env")
        c = karn_otel.configure(KarnConfig(out_dir=None, console="off", otel_shutdown_timeout_s=2.0))
        try:
            assert otel_sink(c).otlp_protocol == protocol, "the factory adds the sink for the env endpoint alone"
            c.emit(make_context(episode_id="ep-env"))
            c.emit(HostSnapshot(1, 1.9, 0.4, 1.8, 0.82, 1674, 0, 1674, 0, 0.5, {}, None))
            c.emit(EpisodeSummary(1, 1.8, 0.82, 0.80, 1674, 1674, 0, 0.1))
        finally:
            karn_otel.shutdown()
        spans = rx.spans()
        assert {s.name for s in spans} == {"karn.episode", "karn.epoch"}
        assert {s.trace_id for s in spans} == {f"{trace_id_for_episode('ep-env'):032x}"}, "other ids are hashed"
        assert all(r["service.name"] == "karn-env" for r in rx.resources())
        assert rx.headers and all(h.get("x-karn-tenant") == "lab" for h in rx.headers)
        assert rx.metric_points()


# ---------------------------------------------------------------------- every metric, hand-driven


RANK_SUMMARY = RankHealthSummary(
    epoch=1,
    world_size=4,
    train_loss=RankSpread(1.5, 1.9, 2.5, 0, 3),
    host_grad_norm=RankSpread(0.4, 0.5, 0.7, 2, 1),
    busy_s=RankSpread(1.0, 1.2, 1.8, 0, 3),
    n_unhealthy=2,
    n_critical=1,
    unhealthy_ranks=(3, 1),
    wait_s=0.01,
)


def full_episode(c: kc.KarnCollector) -> None:
    """One epoch with every event type Karn knows, so every registry metric has a value."""
    c.emit(make_context(episode_id=uuid.uuid4().hex))
    c.emit(HostBaseline(2.3, 0.1, Path("ckpt.pt")), epoch=0)
    dormant, germinated = SeedStage.DORMANT, SeedStage.GERMINATED
    c.emit(GateEvaluationTrace("G0", "mid", None, True, "ok", dormant, germinated, {"p": 76.0}, {"max": 1e3}), epoch=1)
    c.emit(StageTransition("mid", "mid-attention-1", "attention", dormant, germinated, "G0 passed"), epoch=1)
    c.emit(
        CounterfactualMatrix(
            epoch=1,
            slot_ids=("mid",),
            configs=(
                CounterfactualResult((True,), {"mid": 1.0}, 0.5, 0.82),
                CounterfactualResult((False,), {"mid": 0.0}, 0.6, 0.80),
            ),
            marginal_contributions={"mid": 0.02},
            interaction_effects={},
            shapley_values={"mid": ShapleyEstimate(0.02, 0.005, 20, ci_low=0.01, ci_high=0.03)},
            n_evaluations=2,
            elapsed_s=0.25,
        )
    )
    op = FactoredAction(ActionOp.GERMINATE, "mid", "attention")
    c.emit(ControllerDecision("ppo", op, "plateau", shadow_action=FactoredAction(ActionOp.WAIT)), epoch=1)
    adv = AdvantageStats(0.0, 1.0, -2.0, 2.5, 0.1)
    ratio = RatioStats(1.01, 0.05, 0.04, {"op": 0.02, "slot": 0.03})
    lstm = LSTMHealth(0.01, 0.3, -0.02, 0.5, 0.07)
    c.emit(
        PPOUpdateStats(
            3, -0.02, 0.4, 0.011, {"op": 0.006, "slot": 0.005}, 0.6, {"op": 1.2, "slot": 0.9}, 0.42, adv, ratio, lstm
        ),
        epoch=1,
    )
    c.emit(
        PolicySnapshot(
            observation_vector=(0.1, 0.2),
            action=op,
            action_log_probs={"op": -0.5, "slot": -1.1},
            action_was_masked=False,
            value_estimate=0.3,
            advantage=0.05,
            reward_total=0.04,
            reward_components=RewardComponentsTelemetry(0.05, -0.01, 0.0, 0.0),
        ),
        epoch=1,
    )
    c.emit(HealthAlert("entropy_collapse", Severity.WARNING, "entropy 0.05 < 0.1", 0.05, 0.1), epoch=1)
    for sid, stage in (("early", SeedStage.DORMANT), ("mid", SeedStage.GERMINATED), ("late", SeedStage.DORMANT)):
        seeded = sid == "mid"
        c.emit(
            SlotSnapshot(
                sid,
                stage,
                1,
                "mid-attention-1" if seeded else None,
                "attention" if seeded else None,
                76 if seeded else 0,
                0.3 if seeded else 0.0,
                0.02 if seeded else None,
                0.01 if seeded else None,
                0.0,
                "G0" if seeded else None,
                True if seeded else None,
                "ok" if seeded else None,
            ),
            epoch=1,
        )
    c.emit(Scalars(1, {"control_val_accuracy": 0.8, "accuracy_delta_vs_control": 0.02}), epoch=1)
    c.emit(HostSnapshot(1, 1.9, 0.4, 1.8, 0.82, 1674, 76, 1750, 0, 0.5, {"mid": 0.2}, 0.001))
    c.emit(RANK_SUMMARY, is_reduced=True)
    c.emit(dense_trace(1), epoch=1)
    c.emit(
        SlotSnapshot("nowhere", SeedStage.DORMANT, 0, None, None, 0, 0.0, None, None, 0.0, None, None, None), epoch=1
    )
    c.emit(HostBaseline(2.3, 0.1, Path("ckpt.pt"), final_host_only_loss=1.9, final_host_only_accuracy=0.8))
    c.emit(EpisodeSummary(1, 1.8, 0.82, 0.80, 1674, 1750, 0, 3.5))


class LossySink:
    """Stands in for a sink that lost events and has a queue (the run log, say)."""

    def handle(self, event):
        pass

    def flush(self, timeout=None):
        pass

    def close(self):
        pass

    def dropped(self):
        return {"queue_full": 2}

    def queue_depth(self):
        return 5


def test_every_registry_metric_is_scraped_under_its_prometheus_name():
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", prometheus_port=0))
    sink = OTelSink(c.config, c.view)
    # Analytics but no health monitor: karn.health.* falls back to the latest alert per check.
    build_pipeline(c.config, c, sinks=[sink, LossySink()], processors=False)
    try:
        assert sink.otlp_protocol is None and sink._traces is None, "no endpoint: metrics only, no span bookkeeping"
        full_episode(c)
        assert c.rejected == {"unknown_slot": 1} and not c.sink_errors
        scraped = scrape(sink.prometheus_port)
    finally:
        c.close()
    check_prometheus(scraped, c, expect=list(reg.METRICS))

    def value(name, **labels):
        [v] = [v for lb, v in scraped[name] if all(lb[k] == x for k, x in labels.items())]
        return v

    assert value("karn_ppo_entropy", head="op") == 1.2
    assert value("karn_ppo_ratio_head_clip_rate", head="slot") == 0.03
    assert value("karn_policy_reward_component", component="parameter_cost") == -0.01
    assert value("karn_counterfactual_shapley_ci_high", slot="mid") == 0.03
    assert value("karn_counterfactual_duration_seconds") == 0.25
    assert value("karn_slot_stage", slot="mid", stage="GERMINATED") == 1
    assert value("karn_slot_stage", slot="mid", stage="DORMANT") == 0
    assert value("karn_slot_alpha", slot="mid", blueprint="attention") == 0.3
    assert value("karn_health_status", check="entropy_collapse") == 2, "no monitor: the latest alert's severity"
    assert value("karn_analytics_policy_agreement") == 0, "GERMINATE vs the shadow's WAIT"
    assert value("karn_health_alerts_total", check="entropy_collapse", severity="warning") == 1
    assert value("karn_controller_decisions_total", op="GERMINATE") == 1
    assert value("karn_telemetry_events_rejected_total", reason="unknown_slot") == 1
    assert value("karn_telemetry_events_dropped_total", component="LossySink", reason="queue_full") == 2
    assert value("karn_telemetry_queue_depth", component="LossySink") == 5
    assert value("karn_telemetry_dense_windows_total") == 1
    assert value("karn_analytics_accuracy_delta") == pytest.approx(0.02)
    assert value("karn_episode_duration_seconds") == 3.5
    # The spread across ranks (rank 0's RankHealthSummary): job-wide, the stat/quantity labels
    # bounded, and the unhealthy ranks named by their own rank label, critical first.
    assert value("karn_ranks_train_loss", stat="max", scope="job") == 2.5
    assert value("karn_ranks_busy_seconds", stat="min") == 1.0
    assert value("karn_ranks_worst_rank", quantity="busy") == 3
    assert value("karn_ranks_unhealthy_rank", rank="3") == 3 and value("karn_ranks_unhealthy_rank", rank="1") == 2
    assert {lb["rank"] for lb, _ in scraped["karn_ranks_unhealthy_rank"]} == {"1", "3"}
    assert value("karn_ranks_unhealthy_epochs_total", rank="3") == 1, "each epoch a rank was named, counted"
    assert {lb["rank"] for lb, _ in scraped["karn_ranks_unhealthy_epochs_total"]} == {"1", "3"}
    assert all("rank" not in lb for lb, _ in scraped["karn_ranks_train_loss"])


def test_non_finite_values_make_no_point(caplog):
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", prometheus_port=0))
    sink = OTelSink(c.config, c.view)
    c.add_sink(sink)
    try:
        c.emit(make_context())
        c.emit(HostSnapshot(1, float("inf"), 0.4, float("nan"), 0.82, 1674, 0, 1674, 0, 0.5, {}, None))
        scraped = scrape(sink.prometheus_port)
    finally:
        c.close()
    assert "karn_host_val_loss" not in scraped and "karn_host_train_loss" not in scraped
    assert scraped["karn_host_val_accuracy"][0][1] == 0.82
    assert "non-finite" not in caplog.text, "Karn filters them before the SDK complains on every collection"


def test_one_scrape_computes_the_health_report_at_most_once():
    """Dozens of callbacks read the health report; the view computes it once per accepted event."""
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", prometheus_port=0))
    sink = OTelSink(c.config, c.view)
    build_pipeline(c.config, c, sinks=[sink])  # health monitor, triggers, analytics: configure()'s wiring
    monitor = c.pipeline.health
    calls = []
    real_report = monitor.report

    def counted_report():
        calls.append(1)
        return real_report()

    monitor.report = counted_report
    try:
        full_episode(c)
        calls.clear()
        scraped = scrape(sink.prometheus_port)
        assert len(calls) <= 1, f"one scrape computed the health report {len(calls)} times"
        assert {lb["check"] for lb, _ in scraped["karn_health_status"]} == set(CHECK_NAMES), "read from the report"
        assert "karn_analytics_param_ratio" in scraped, "the pipeline's analytics"
        scrape(sink.prometheus_port)
        assert len(calls) <= 1, "no event since: the cached report"
        c.emit(HostSnapshot(2, 1.8, 0.5, 1.7, 0.84, 1674, 76, 1750, 0, 0.5, {"mid": 0.2}, 0.001))
        calls.clear()
        scrape(sink.prometheus_port)
        assert len(calls) == 1, "a new event: a fresh report, computed once"
    finally:
        c.close()


def test_a_bare_collector_has_no_analytics_and_no_health_report():
    """KarnCollector without build_pipeline: the analytics metrics have no points, health falls back."""
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", prometheus_port=0))
    assert c.view.analytics is None and c.view.health_report() is None
    sink = OTelSink(c.config, c.view)
    c.add_sink(sink)
    try:
        c.emit(make_context())
        c.emit(HealthAlert("entropy_collapse", Severity.WARNING, "entropy 0.05 < 0.1", 0.05, 0.1), epoch=1)
        c.emit(HostSnapshot(1, 1.9, 0.4, 1.8, 0.82, 1674, 0, 1674, 0, 0.5, {}, None))
        scraped = scrape(sink.prometheus_port)
    finally:
        c.close()
    assert not [name for name in scraped if name.startswith("karn_analytics_")]
    assert [(lb["check"], v) for lb, v in scraped["karn_health_status"]] == [("entropy_collapse", 2)]
    assert scraped["karn_telemetry_events_accepted_total"][0][1] == 3
    assert {lb["component"] for lb, _ in scraped["karn_telemetry_queue_depth"]} == {"OTelSink"}


def test_the_sink_reads_the_view_only():
    """No second analytics, no collector: the package is given a StoreView and nothing else."""
    package = Path(otel.__file__).parent
    for path in package.glob("*.py"):
        source = path.read_text(encoding="utf-8")
        assert "karn_otel.analytics" not in source and "karn_otel.collector" not in source, path.name


def test_prometheus_port_is_base_plus_local_rank(monkeypatch):
    port = free_port()
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second process of a 2-rank job on this host
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", prometheus_port=port - 1))
    sink = OTelSink(c.config, c.view)
    try:
        assert sink.prometheus_port == port
        assert "karn_telemetry_events_accepted_total" in scrape(port)
    finally:
        sink.close()


# ---------------------------------------------------------------------- outage


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unreachable_endpoint_loses_counted_data_and_nothing_else(tmp_path, protocol):
    bound = 1.5
    c, episode_id = run_reference(
        tmp_path,
        otlp_endpoint=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        otlp_protocol=protocol,
        prometheus_port=0,
        otel_shutdown_timeout_s=bound,
    )
    sink = otel_sink(c)
    try:
        # The epochs were exported (and failed) while the episode ran; the failures are counted...
        deadline = time.monotonic() + 10
        while sink.dropped().get("spans_export_failed", 0) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        scraped = scrape(sink.prometheus_port)
        t0 = time.monotonic()
    finally:
        karn_otel.shutdown()
    elapsed = time.monotonic() - t0
    assert elapsed <= bound + 0.25, f"shutdown took {elapsed:.2f} s with a {bound} s bound"

    lost = sink.dropped()
    # 1 episode + 3 epochs + 3 counterfactual passes + 1 dense window: every span is accounted for.
    assert lost.get("spans_export_failed", 0) + lost.get("spans_unsent_at_shutdown", 0) == 8, lost
    assert sink._ledger.export_failures["traces"] >= 1
    assert sink.queue_depth() == 0
    # ... and visible as metrics.
    failed = {lb["signal"]: v for lb, v in scraped["karn_telemetry_export_failures_total"]}
    assert failed["traces"] >= 1
    dropped = {
        lb["reason"]: v for lb, v in scraped["karn_telemetry_events_dropped_total"] if lb["component"] == "OTelSink"
    }
    assert dropped["spans_export_failed"] >= 4

    # The run log, the source of truth, is complete.
    rec = read_run(tmp_path / c.run_id)
    types = [e.event_type for e in rec.events]
    assert types[0] is TelemetryEventType.EPISODE_STARTED and types[-1] is TelemetryEventType.EPISODE_ENDED
    assert types.count(TelemetryEventType.HOST_SNAPSHOT) == 3 and TelemetryEventType.DENSE_TRACE in types
    assert rec.events[-1].episode_id == episode_id and not rec.skipped


def test_flush_never_waits_for_an_endpoint_that_has_not_answered():
    cfg = KarnConfig(out_dir=None, console="off", otlp_endpoint=f"127.0.0.1:{free_port()}", otel_shutdown_timeout_s=1.0)
    c = kc.KarnCollector(cfg)
    sink = OTelSink(cfg, c.view)
    c.add_sink(sink)
    try:
        c.emit(make_context())
        t0 = time.monotonic()
        sink.flush(timeout=10.0)
        assert time.monotonic() - t0 < 0.5
    finally:
        c.close()


class HangingSpanExporter(SpanExporter):
    def export(self, spans):
        time.sleep(30)

    def shutdown(self):
        time.sleep(30)


class HangingMetricExporter(MetricExporter):
    def export(self, metrics_data, timeout_millis=10_000, **kwargs):
        time.sleep(30)

    def force_flush(self, timeout_millis=10_000):
        return True

    def shutdown(self, timeout_millis=30_000, **kwargs):
        time.sleep(30)


def test_close_is_bounded_even_when_exporters_hang(monkeypatch):
    monkeypatch.setattr(otel_resource, "otlp_span_exporter", lambda *a: HangingSpanExporter())
    monkeypatch.setattr(otel_resource, "otlp_metric_exporter", lambda *a: HangingMetricExporter())
    cfg = KarnConfig(
        out_dir=None,
        console="off",
        otlp_endpoint="127.0.0.1:1",
        otel_export_interval_s=0.05,
        otel_shutdown_timeout_s=0.5,
    )
    c = kc.KarnCollector(cfg)
    sink = OTelSink(cfg, c.view)
    c.add_sink(sink)
    c.emit(make_context())
    c.emit(HostSnapshot(1, 1.9, 0.4, 1.8, 0.82, 1674, 0, 1674, 0, 0.5, {}, None))
    time.sleep(0.2)  # let both exporters get stuck
    t0 = time.monotonic()
    sink.close()
    elapsed = time.monotonic() - t0
    assert elapsed <= 0.5 + 0.25, f"close took {elapsed:.2f} s with a 0.5 s bound"
    assert sink.dropped().get("spans_unsent_at_shutdown", 0) >= 1, "the open episode span was never sent"


# ---------------------------------------------------------------------- what the user sees is true


def test_a_processor_error_is_scraped_as_dropped(monkeypatch):
    """What Prometheus (and KarnTelemetryDropping) sees when the health checks fail internally:
    the events they skipped, under the processor's name with reason "error"."""
    import karn_otel.health as health
    import karn_otel.triggers as triggers

    def broken(*_a, **_k):
        raise ZeroDivisionError("a bug in a check")

    monkeypatch.setattr(health, "host_findings", broken)
    monkeypatch.setattr(triggers, "host_findings", broken)  # its own binding (standalone evaluation)
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", prometheus_port=0))
    sink = OTelSink(c.config, c.view)
    build_pipeline(c.config, c, sinks=[sink])
    try:
        c.emit(make_context())
        for e in (1, 2):
            assert c.emit(HostSnapshot(e, 1.9, 0.4, 1.8, 0.82, 1674, 0, 1674, 0, 0.5, {}, None))
        scraped = scrape(sink.prometheus_port)
    finally:
        c.close()
    dropped = {(lb["component"], lb["reason"]): v for lb, v in scraped["karn_telemetry_events_dropped_total"]}
    assert dropped[("HealthMonitor", "error")] == 2, dropped
    assert dropped[("DenseTriggerEngine", "error")] == 2, dropped


def test_every_counter_has_its_known_series_at_zero_in_the_first_scrape(tmp_path):
    """increase() cannot see a counter's first sample: every known label combination starts at 0."""
    c = karn_otel.configure(KarnConfig(out_dir=tmp_path, console="off", prometheus_port=0))
    try:
        scraped = scrape(otel_sink(c).prometheus_port)  # before any event
    finally:
        karn_otel.shutdown()

    def series(name: str, *keys: str) -> dict[tuple, float]:
        return {tuple(lb[k] for k in keys): v for lb, v in scraped.get(name, [])}

    from karn_otel.health import CHECKS

    assert series("karn_health_alerts_total", "check", "severity") == {
        (spec.name, spec.severity.value): 0 for spec in CHECKS
    }
    assert series("karn_controller_decisions_total", "op") == {(op.value,): 0 for op in ActionOp}
    assert series("karn_telemetry_events_rejected_total", "reason") == {(r,): 0 for r in reg.REJECTION_REASONS}
    dropped = series("karn_telemetry_events_dropped_total", "component", "reason")
    for component in ("RunLogSink", "OTelSink"):
        for reason in reg.SINK_DROP_REASONS[component]:
            assert dropped.pop((component, reason)) == 0, (component, reason)
    assert not dropped
    assert series("karn_telemetry_events_accepted_total") == {(): 0}
    assert "karn_episode_complete" not in scraped, "no episode yet: nothing to be complete or missing from"


def test_rejection_reasons_are_every_reason_the_collector_uses():
    import re

    import karn_otel.codec
    import karn_otel.pipeline

    src = "".join(Path(m.__file__).read_text() for m in (kc, karn_otel.pipeline))
    used = set(re.findall(r'TelemetryValidationError\(\s*"([a-z_]+)"', src))
    used |= set(re.findall(r'rejected\["([a-z_]+)"\]', src))
    # The codec's checkers name the reason of a type or value problem (the collector passes it on).
    used |= set(re.findall(r'Problem\(\s*"([a-z_]+)"', Path(karn_otel.codec.__file__).read_text())) - {"ok"}
    assert used and used <= set(reg.REJECTION_REASONS), used - set(reg.REJECTION_REASONS)


def test_job_wide_snapshot_is_its_own_series_never_rank_0s(tmp_path):
    """Rank 0 of a DDP job: its own HostSnapshot is rank="0"; the reduced one is scope="job" without a rank."""
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", prometheus_port=0, rank=0, world_size=2))
    sink = OTelSink(c.config, c.view)
    c.add_sink(sink)
    try:
        c.emit(make_context())
        c.emit(HostSnapshot(1, 1.8203, 0.4, 1.9, 0.5, 1674, 0, 1674, 0, 0.5, {}, None))
        c.emit(HostSnapshot(1, 1.8365, 0.41, 1.9, 0.5, 1674, 0, 1674, 0, 0.7, {}, None), is_reduced=True)
        scraped = scrape(sink.prometheus_port)
    finally:
        c.close()
    # The exposition writes an absent label as "" (Prometheus stores no such label).
    loss = {(lb.get("rank") or None, lb.get("scope") or None): v for lb, v in scraped["karn_host_train_loss"]}
    assert loss == {("0", None): 1.8203, (None, "job"): 1.8365}
    norm = {(lb.get("rank") or None, lb.get("scope") or None): v for lb, v in scraped["karn_host_grad_norm"]}
    assert norm == {("0", None): 0.5, (None, "job"): 0.7}


def test_completion_is_held_and_the_endpoint_waits_for_a_final_scrape(monkeypatch):
    monkeypatch.setenv(otel.sink.ENV_FINAL_SCRAPE_S, "20")
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", prometheus_port=0))
    sink = OTelSink(c.config, c.view)
    c.add_sink(sink)
    assert sink.final_scrape_s == 20
    port = sink.prometheus_port
    c.emit(make_context())
    assert [v for _, v in scrape(port)["karn_episode_complete"]] == [0], "an open episode"
    c.emit(EpisodeSummary(3, 1.0, 0.5, 0.4, 1000, 1000, 0, 2.0))
    c.emit(HostSnapshot(4, 1.8, 0.4, 1.9, 0.5, 1674, 0, 1674, 0, 0.5, {}, None))  # rejected: still held
    assert [v for _, v in scrape(port)["karn_episode_complete"]] == [1]

    import threading

    t0 = time.monotonic()
    closer = threading.Thread(target=c.close)
    closer.start()
    time.sleep(0.5)
    assert closer.is_alive(), "the endpoint waits for Prometheus' final scrape"
    final = scrape(port)  # the final scrape: the completion is still there
    assert [v for _, v in final["karn_episode_complete"]] == [1]
    closer.join(10)
    assert not closer.is_alive() and time.monotonic() - t0 < 5, "and stops right after it"
    with pytest.raises(OSError):
        scrape(port)


_EXITS_AFTER_SHUTDOWN = """
import sys
import karn_otel
from karn_otel.config import KarnConfig
from karn_otel.contracts import EpisodeSummary
from tests.conftest import make_context

c = karn_otel.configure(KarnConfig(out_dir=sys.argv[1], console="off", prometheus_port=0, shutdown_timeout_s=1.0))
karn_otel.emit(make_context())
print(next(s for s in c.sinks if hasattr(s, "prometheus_port")).prometheus_port, flush=True)
sys.stdin.readline()  # scraped once: finish the episode and exit at once after shutdown()
karn_otel.emit(EpisodeSummary(3, 1.0, 0.5, 0.4, 1000, 1000, 0, 2.0))
karn_otel.shutdown()
print("shutdown returned", flush=True)
"""


def test_a_process_exiting_after_shutdown_still_gets_its_final_scrape(tmp_path):
    """The user-visible promise (finished is not missing): a script that calls shutdown() and
    exits at once keeps /metrics up for Prometheus' next scrape, even when that scrape comes
    after the 1 s shutdown bound (the endpoint's wait used to be cut off there, and the
    process took the endpoint down with it before a 15 s scrape interval came round)."""
    import subprocess
    import sys

    env = {**os.environ, "KARN_PROMETHEUS_FINAL_SCRAPE_S": "20", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen(
        [sys.executable, "-c", _EXITS_AFTER_SHUTDOWN, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        port = int(child.stdout.readline())
        assert [v for _, v in scrape(port)["karn_episode_complete"]] == [0]  # Prometheus has scraped it
        t0 = time.monotonic()
        child.stdin.write("go\n")
        child.stdin.flush()
        time.sleep(2.5)  # the next scrape comes well after the 1 s shutdown bound
        assert child.poll() is None, "the process waits for the final scrape"
        final = scrape(port)
        assert [v for _, v in final["karn_episode_complete"]] == [1], "the final scrape reads the completion"
        assert child.wait(10) == 0
        assert time.monotonic() - t0 < 6, "and it exits right after that scrape"
        assert "shutdown returned" in child.stdout.read()
        said = child.stderr.read()
        assert said.count("up until Prometheus' final scrape") == 1, said  # why it has not exited
        assert "left behind" not in said, said
    finally:
        child.kill()
        child.wait()


def test_an_endpoint_nobody_scraped_stops_at_once(monkeypatch):
    monkeypatch.setenv(otel.sink.ENV_FINAL_SCRAPE_S, "20")
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", prometheus_port=0))
    c.add_sink(OTelSink(c.config, c.view))
    c.emit(make_context())
    t0 = time.monotonic()
    c.close()
    assert time.monotonic() - t0 < 2


def test_abandoned_episode_and_critical_epoch_spans_have_error_status():
    exporter = InMemorySpans()
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off"))
    sink = OTelSink(c.config, c.view)
    c.add_sink(sink)
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from karn_otel.sinks.otel.lifecycle import ExportLedger
    from karn_otel.sinks.otel.traces import EpisodeIdGenerator, EpisodeTraces

    provider = TracerProvider(id_generator=EpisodeIdGenerator())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    traces = EpisodeTraces(provider.get_tracer("t"), provider.id_generator, ExportLedger())
    sink._traces = traces
    c.emit(make_context(episode_id=uuid.uuid4().hex))
    c.emit(HostSnapshot(1, 1.8, 0.4, 1.9, 0.5, 1674, 0, 1674, 0, 0.5, {}, None))
    c.emit(HostSnapshot(2, float("nan"), 0.4, 1.9, 0.5, 1674, 0, 1674, 0, 0.5, {}, None))
    c.emit(HealthAlert("gradient_explosion", Severity.CRITICAL, "boom", 500.0, 100.0))
    c.emit(HostSnapshot(3, 1.7, 0.4, 1.9, 0.5, 1674, 0, 1674, 0, 50.0, {}, None))
    c.close()  # no EpisodeSummary: abandoned
    spans = {(s.name, s.attributes.get("karn.epoch")): s for s in exporter.spans}
    ok, nan, crit = (spans[("karn.epoch", k)] for k in (1, 2, 3))
    assert ok.status.status_code.name == "UNSET"
    assert nan.status.status_code.name == "ERROR" and nan.attributes["error.type"] == "non_finite_loss"
    assert crit.status.status_code.name == "ERROR" and crit.attributes["error.type"] == "gradient_explosion"
    root = spans[("karn.episode", None)]
    assert root.status.status_code.name == "ERROR" and root.attributes["error.type"] == "karn.episode_abandoned"
    assert root.attributes["karn.episode.complete"] is False


class InMemorySpans(SpanExporter):
    def __init__(self):
        self.spans = []

    def export(self, spans):
        self.spans.extend(spans)
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass


def test_standard_sampler_env_is_honoured(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    from karn_otel.sinks.otel.lifecycle import ExportLedger
    from karn_otel.sinks.otel.traces import start_tracing

    provider, _ = start_tracing(
        build_resource(KarnConfig(out_dir=None), "r", 0, 1),
        InMemorySpans(),
        ExportLedger(),
        interval_s=1,
        export_timeout_s=1,
    )
    try:
        assert type(provider.sampler).__name__ == "StaticSampler"
        assert provider.sampler.get_description() == "AlwaysOffSampler"
    finally:
        provider.shutdown()


def test_epoch_reader_never_waits_for_a_slow_backend_and_stays_bounded(monkeypatch):
    """Each epoch is one collection; a backend that hangs costs queue slots (bounded, drops counted), never training time."""
    import threading

    from opentelemetry.sdk.metrics.export import MetricExportResult

    from karn_otel.sinks.otel import epochs

    monkeypatch.setattr(epochs, "MAX_PENDING_COLLECTIONS", 3)
    gate = threading.Event()

    class Hanging(MetricExporter):
        def __init__(self):
            super().__init__()
            self.exports = 0

        def export(self, metrics_data, timeout_millis=10_000, **kwargs):
            gate.wait(20)
            self.exports += 1
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis=10_000):
            return True

        def shutdown(self, timeout_millis=30_000, **kwargs):
            pass

    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", otel_export_interval_s=60.0))
    hanging = Hanging()
    sink = OTelSink(c.config, c.view, metric_exporters=[hanging])
    c.add_sink(sink)
    try:
        c.emit(make_context())
        t0 = time.monotonic()
        for k in range(1, 11):
            c.emit(HostSnapshot(k, 1.8, 0.4, 1.9, 0.5, 1674, 0, 1674, 0, 0.5, {}, None))
            time.sleep(0.05)
        assert time.monotonic() - t0 < 2, "the training thread never waits for the backend"
        reader = sink._epoch_readers[0]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # let the collector thread take the last signals (a loaded machine)
            lost = sink.dropped()
            if lost.get("metric_collections_dropped", 0) + lost.get("metric_epochs_merged", 0) >= 6:
                break
            time.sleep(0.05)
        assert len(reader._pending) <= 3
        lost = sink.dropped()
        # 10 epochs: one export in flight, 3 waiting, the rest dropped (or merged, if they came too fast).
        assert lost.get("metric_collections_dropped", 0) + lost.get("metric_epochs_merged", 0) == 10 - 1 - 3, lost
    finally:
        gate.set()
        c.close()
    assert hanging.exports >= 4


def test_a_timed_ppo_update_is_a_child_span_of_its_epoch():
    """A PPO update that reports its elapsed_s becomes a timed karn.ppo_update child of its epoch."""
    from types import SimpleNamespace

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from karn_otel.sinks.otel.lifecycle import ExportLedger
    from karn_otel.sinks.otel.traces import EpisodeIdGenerator, EpisodeTraces

    exporter = InMemorySpans()
    ids = EpisodeIdGenerator()
    provider = TracerProvider(id_generator=ids)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    traces = EpisodeTraces(provider.get_tracer("t"), ids, ExportLedger())
    ET_ = TelemetryEventType

    def ev(et, payload, t):
        return SimpleNamespace(event_type=et, payload=payload, timestamp=t, is_reduced=False)

    update = SimpleNamespace(
        update_index=1, policy_loss=0.1, value_loss=0.2, kl_divergence=0.01, explained_variance=0.5, elapsed_s=0.25
    )
    traces.handle(ev(ET_.EPISODE_STARTED, make_context(episode_id=uuid.uuid4().hex), 100.0))
    traces.handle(ev(ET_.PPO_UPDATE, update, 101.0))
    traces.handle(ev(ET_.HOST_SNAPSHOT, HostSnapshot(1, 1.8, 0.4, 1.9, 0.5, 1674, 0, 1674, 0, 0.5, {}, None), 102.0))
    spans = {s.name: s for s in exporter.spans}
    ppo, epoch = spans["karn.ppo_update"], spans["karn.epoch"]
    assert ppo.parent.span_id == epoch.context.span_id
    assert (ppo.start_time, ppo.end_time) == (int(100.75e9), int(101e9))
    assert "karn.ppo_update" not in [e.name for e in epoch.events], "a child span, not also an event"


def test_a_dead_endpoint_is_one_warning_line_and_counted(tmp_path):
    """OTel's exporters log a retry or failure every few seconds while the endpoint is down;
    Karn says it once and counts what it could not send (inspect shows it)."""
    import subprocess
    import sys

    dead = f"http://127.0.0.1:{free_port()}"
    p = subprocess.run(
        [sys.executable, "-m", "karn_otel.cli", "run", "--epochs", "3", "--no-live", "--out", str(tmp_path),
         "--otlp-endpoint", dead],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert sum("OTLP export is failing" in ln for ln in lines) == 1, lines
    assert not any(ln.startswith("opentelemetry.") for ln in lines), lines
    run_dir = next(d for d in tmp_path.iterdir() if d.is_dir())
    shown = subprocess.run(
        [sys.executable, "-m", "karn_otel.cli", "inspect", str(run_dir)], capture_output=True, text=True
    )
    assert "OTelSink:spans_export_failed" in shown.stdout
