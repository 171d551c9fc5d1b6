"""Episode traces: the event stream as OTel spans, one trace per episode.

The trace id is derived from ``episode_id`` (a 32-hex uuid4 id *is* the trace id, so a
run-log line finds its trace in Tempo; other ids are hashed to 128 bits; see
:func:`trace_id_for_episode` and :class:`EpisodeIdGenerator`). Spans:

- ``karn.episode``, the root: opened at EPISODE_STARTED, ended at EPISODE_ENDED.
- ``karn.epoch``, one per rank's own HostSnapshot, a child of the root, created when the snapshot
  arrives with explicit times (start = the previous epoch's end) and ended at once, so it is
  exported during the run. The epoch's gate evaluations, stage transitions, controller
  decisions, alerts and PPO updates are its span events (at most MAX_EPOCH_EVENTS; more are
  counted as ``span_events_over_limit``). Status ERROR with ``error.type`` when the epoch's
  loss is not finite (``non_finite_loss``) or a critical health alert came in it (the check).
- timed operations as child spans of their epoch, from ``elapsed_s`` before the event to the
  event: ``karn.counterfactual`` (every pass), ``karn.ppo_update`` (when the update reports an
  ``elapsed_s``; until then it stays a span event).
- ``karn.reduction``: rank 0's job-wide HostSnapshot in a DDP job (``is_reduced``), a child
  of rank 0's epoch span with ``karn.scope = "job"`` (so there is one epoch span per rank).
- ``karn.reduction.gather``, on every rank of a DDP job: this rank's time in the epoch's one
  reduction collective (a :class:`~karn_otel.contracts.RankHealthSummary`'s ``wait_s``), a child
  of its own epoch span, with the spread across ranks as attributes. The rank the others
  waited for has the shortest gather (and ``karn.ranks.slowest_rank`` names it on every rank).
  With ``karn.rank.compute_s`` / ``karn.rank.wait_s`` on ``karn.counterfactual`` (a distributed
  pass: this rank's own evaluation vs its wait for the others), a slow rank is visible in Tempo.
- ``karn.dense_window``, one per DenseTrace, with the trigger reason and window bounds as
  attributes and at most MAX_BATCH_EVENTS of its batches as ``karn.batch`` events.

The long-lived root is only exported when the episode ends. Meanwhile Tempo already holds
the finished epochs: a trace lookup by episode id shows them under a missing parent ("root
span not yet received"); once the episode ends the root arrives and the trace is whole. A
run that stops without EPISODE_ENDED gets its root ended by the sink's ``close()`` with
``karn.episode.complete = false`` and status ERROR (``error.type = karn.episode_abandoned``).

The span attribute and span event builders (``_*_attributes``, ``_*_event``) live here too:
they are the only place that names span attributes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import Status, StatusCode

from karn_otel import __version__
from karn_otel.contracts import Severity, TelemetryEvent, TelemetryEventType
from karn_otel.sinks.otel.lifecycle import MAX_SPAN_QUEUE, ExportLedger

ET = TelemetryEventType

MAX_EPOCH_EVENTS = 64  # span events per epoch span (the SDK's own limit is 128)
MAX_BATCH_EVENTS = 32  # batch events per dense-window span


def start_tracing(
    resource: Resource, exporter: SpanExporter, ledger: ExportLedger, *, interval_s: float, export_timeout_s: float
) -> tuple[TracerProvider, EpisodeTraces]:
    """A private tracer provider (never the global one) exporting through ``exporter``, and the
    :class:`EpisodeTraces` that feeds it."""
    ids = EpisodeIdGenerator(str(resource.attributes.get("service.instance.id", "")))
    # The sampler is the standard OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (the SDK reads
    # them); unset, every span is kept (parentbased_always_on: a trace is a whole episode, and
    # there are few). A ratio sampler decides on the trace id, which every rank of a job shares.
    provider = TracerProvider(resource=resource, id_generator=ids, shutdown_on_exit=False)
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=MAX_SPAN_QUEUE,
            schedule_delay_millis=interval_s * 1000,
            export_timeout_millis=export_timeout_s * 1000,
            meter_provider=NoOpMeterProvider(),
        )
    )
    tracer = provider.get_tracer("karn_otel", __version__)
    return provider, EpisodeTraces(tracer, ids, ledger)


def trace_id_for_episode(episode_id: str) -> int:
    """The 128-bit trace id of an episode: the id itself when it is 32 hex digits (uuid4().hex), else a hash.

    Ranks of a DDP job that share an episode id therefore share its trace: one
    ``karn.episode`` root per rank, told apart by the resource's ``service.instance.id``.
    """
    if len(episode_id) == 32:
        try:
            tid = int(episode_id, 16)
            if tid:
                return tid
        except ValueError:
            pass
    return int.from_bytes(hashlib.sha256(episode_id.encode()).digest()[:16], "big") or 1


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class EpisodeIdGenerator(RandomIdGenerator):
    """Ids derived from the run, not drawn at random: the next root span's trace id is set by
    the sink from the episode id, and each span id is a hash of (this process's
    ``service.instance.id``, the trace id, the span's position in the trace). The same events
    in the same order — the live run, or ``karn export --to otlp`` replaying its run log —
    therefore give the same ids, so re-sending a run is idempotent in Tempo, and two ranks of
    one trace never collide (their instance ids differ)."""

    def __init__(self, instance: str = "") -> None:
        self.next_trace_id: int | None = None
        self._instance = instance
        self._trace = 0
        self._n = 0

    def generate_trace_id(self) -> int:
        tid, self.next_trace_id = self.next_trace_id, None
        tid = tid if tid is not None else super().generate_trace_id()
        self._trace, self._n = tid, 0
        return tid

    def generate_span_id(self) -> int:
        if not self._trace:
            return super().generate_span_id()
        self._n += 1
        digest = hashlib.sha256(f"{self._instance}:{self._trace:032x}:{self._n}".encode()).digest()
        return int.from_bytes(digest[:8], "big") or 1

    def is_trace_id_random(self) -> bool:
        return False  # derived from episode ids; ratio samplers must not rely on it


class EpisodeTraces:
    """Turns the event stream into spans. Called from ``OTelSink.handle`` on the training thread."""

    def __init__(self, tracer: trace.Tracer, ids: EpisodeIdGenerator, ledger: ExportLedger) -> None:
        self._tracer = tracer
        self._ids = ids
        self._ledger = ledger
        self._episode: Any = None  # the open karn.episode span
        self._episode_ctx: Context | None = None
        self._episode_id = ""
        self._epoch_start = 0  # ns; the end of the previous epoch
        self._epoch_starts: dict[int, int] = {}  # epoch -> start ns, for dense windows (bounded)
        self._pending: list[tuple[str, dict[str, Any], int]] = []  # span events of the epoch in progress
        self._slot_attrs: dict[str, Any] = {}
        self._last_epoch: int | None = None  # the latest ended epoch span, parent of its reduction
        self._epoch_span: Any = None  # the epoch span in progress (opened by a child span)
        self._critical: str | None = None  # the first critical health check of the epoch in progress
        self._last_epoch_ctx: Context | None = None

    def handle(self, event: TelemetryEvent) -> None:
        et = event.event_type
        if et is ET.EPISODE_STARTED:
            self._start_episode(event)
        elif self._episode is None:
            return  # events outside an episode belong to no trace
        elif et is ET.HOST_SNAPSHOT and event.is_reduced:
            self._job_reduction(event)
        elif et is ET.HOST_SNAPSHOT:
            self._end_epoch(event)
        elif et is ET.SLOT_SNAPSHOT:
            self._slot_attrs.update(_slot_attributes(event.payload))
        elif et is ET.DENSE_TRACE:
            self._dense_window(event)
        elif et is ET.COUNTERFACTUAL:
            self._counterfactual(event)
        elif et is ET.RANK_SUMMARY:
            self._rank_gather(event)
        elif et is ET.PPO_UPDATE and _elapsed(event.payload) is not None:
            self._timed_child(event, *_ppo_event(event.payload))
        elif et is ET.EPISODE_ENDED:
            self._end_episode(event)
        else:
            describe = _SPAN_EVENTS.get(et)
            if describe is not None:
                self._add_event(*describe(event.payload), _ns(event.timestamp))
            if et is ET.HEALTH_ALERT and event.payload.severity is Severity.CRITICAL and self._critical is None:
                self._critical = str(event.payload.check)

    def _start_episode(self, event: TelemetryEvent) -> None:
        now = _ns(event.timestamp)
        self.abandon_episode(now)
        ctx: Any = event.payload
        self._episode_id = ctx.episode_id
        self._ids.next_trace_id = trace_id_for_episode(ctx.episode_id)
        self._episode = self._tracer.start_span(
            "karn.episode",
            context=Context(),  # an empty context: never a child of whatever the caller is tracing
            attributes=_episode_attributes(ctx),
            start_time=now,
        )
        self._episode_ctx = trace.set_span_in_context(self._episode)
        self._epoch_start = now
        self._epoch_starts = {}
        self._pending = []
        self._slot_attrs = {}
        self._epoch_span = None
        self._critical = None
        self._last_epoch = None

    def _open_epoch(self) -> Any:
        """The epoch span in progress, started at the previous epoch's end (created on first need)."""
        if self._epoch_span is None:
            self._epoch_span = self._tracer.start_span(
                "karn.epoch", context=self._episode_ctx, start_time=self._epoch_start
            )
        return self._epoch_span

    def _end_epoch(self, event: TelemetryEvent) -> None:
        h: Any = event.payload
        end = _ns(event.timestamp)
        attrs = {"karn.episode_id": self._episode_id, **_host_attributes(h), **self._slot_attrs}
        span = self._open_epoch()
        span.set_attributes(attrs)
        for name, a, t in self._pending:
            span.add_event(name, a, t)
        losses = (h.train_loss, h.val_loss)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses):
            self._error(span, "non_finite_loss", "a train or validation loss is not finite")
        elif self._critical is not None:
            self._error(span, self._critical, f"critical health alert: {self._critical}")
        self._end(span, end)
        self._epoch_span = None
        self._critical = None
        self._last_epoch, self._last_epoch_ctx = h.epoch, trace.set_span_in_context(span)
        self._epoch_starts[h.epoch] = self._epoch_start
        if len(self._epoch_starts) > 256:
            self._epoch_starts.pop(next(iter(self._epoch_starts)))
        self._epoch_start = end
        self._pending = []
        self._slot_attrs = {}

    def _counterfactual(self, event: TelemetryEvent) -> None:
        """A counterfactual pass: a timed ``karn.counterfactual`` child of its epoch's span."""
        self._timed_child(event, *_counterfactual_event(event.payload))

    def _timed_child(self, event: TelemetryEvent, name: str, attrs: dict[str, Any]) -> None:
        """A timed operation (its payload's ``elapsed_s``) as a child span of its epoch, ending at the event."""
        end = _ns(event.timestamp)
        elapsed = _elapsed(event.payload) or 0.0
        start = max(self._epoch_start, end - _ns(elapsed))
        parent = trace.set_span_in_context(self._open_epoch())
        span = self._tracer.start_span(
            name, context=parent, attributes={"karn.episode_id": self._episode_id, **attrs}, start_time=start
        )
        self._end(span, end)

    @staticmethod
    def _error(span: Any, error_type: str, description: str) -> None:
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR, description))

    def epoch_context(self) -> Context | None:
        """The context of the epoch span that ended last (for an exemplar), if any."""
        return self._last_epoch_ctx

    def _job_reduction(self, event: TelemetryEvent) -> None:
        """Rank 0's job-wide snapshot: a ``karn.reduction`` child of its own epoch span, never a second epoch."""
        h: Any = event.payload
        end = _ns(event.timestamp)
        parent = self._last_epoch_ctx if self._last_epoch == h.epoch else self._episode_ctx
        start = min(self._epoch_start, end)
        attrs = {"karn.episode_id": self._episode_id, "karn.scope": "job", **_host_attributes(h)}
        span = self._tracer.start_span("karn.reduction", context=parent, attributes=attrs, start_time=start)
        self._end(span, end)

    def _rank_gather(self, event: TelemetryEvent) -> None:
        """This rank's share of the epoch's reduction: a ``karn.reduction.gather`` child of its epoch span."""
        r: Any = event.payload
        end = _ns(event.timestamp)
        parent = self._last_epoch_ctx if self._last_epoch == r.epoch else self._episode_ctx
        start = max(0, end - _ns(max(0.0, r.wait_s)))
        attrs = {"karn.episode_id": self._episode_id, **_rank_summary_attributes(r)}
        span = self._tracer.start_span("karn.reduction.gather", context=parent, attributes=attrs, start_time=start)
        self._end(span, end)

    def _dense_window(self, event: TelemetryEvent) -> None:
        d: Any = event.payload
        end = _ns(event.timestamp)
        start = min(self._epoch_starts.get(d.window_start_epoch, self._epoch_start), end)
        attrs = {"karn.episode_id": self._episode_id, **_dense_attributes(d)}
        span = self._tracer.start_span(
            "karn.dense_window", context=self._episode_ctx, attributes=attrs, start_time=start
        )
        batches = d.batch_metrics
        picked = _spread(len(batches), MAX_BATCH_EVENTS)
        # Batches carry no timestamps: the events are spread evenly over the window, in batch order.
        for j, i in enumerate(picked):
            t = start + (end - start) * (j + 1) // (len(picked) + 1)
            span.add_event("karn.batch", _batch_attributes(batches[i]), t)
        self._end(span, end)

    def _end_episode(self, event: TelemetryEvent) -> None:
        s: Any = event.payload
        self._episode.set_attributes(
            {
                "karn.episode.complete": True,
                "karn.epochs_completed": s.epochs_completed,
                "karn.final_val_loss": s.final_val_loss,
                "karn.final_val_accuracy": s.final_val_accuracy,
                "karn.total_params": s.total_params,
                "karn.fossilized_params": s.fossilized_params,
                "karn.wall_time_s": s.wall_time_s,
                **({"karn.host_only_accuracy": s.host_only_accuracy} if s.host_only_accuracy is not None else {}),
            }
        )
        self._close_root(_ns(event.timestamp))

    def abandon_episode(self, now_ns: int) -> None:
        """End an open episode span that never got its EPISODE_ENDED (a new episode, or close()).

        The root gets status ERROR with ``error.type = karn.episode_abandoned``; an epoch span
        left open by a child span is ended with it (incomplete, ``karn.epoch.complete = false``).
        """
        if self._episode is not None:
            if self._epoch_span is not None:
                self._epoch_span.set_attribute("karn.epoch.complete", False)
                self._end(self._epoch_span, now_ns)
                self._epoch_span = None
            self._episode.set_attribute("karn.episode.complete", False)
            self._error(self._episode, "karn.episode_abandoned", "the episode ended without an EpisodeSummary")
            self._close_root(now_ns)

    def _close_root(self, end: int) -> None:
        # Events after the last epoch (final baseline, late alerts) go on the root span.
        for name, a, t in self._pending:
            self._episode.add_event(name, a, t)
        self._end(self._episode, end)
        self._episode = None
        self._episode_ctx = None
        self._pending = []

    def _add_event(self, name: str, attrs: dict[str, Any], t: int) -> None:
        if len(self._pending) >= MAX_EPOCH_EVENTS:
            self._ledger.count("span_events_over_limit")
            return
        self._pending.append((name, attrs, t))

    def _end(self, span: Any, end_ns: int) -> None:
        self._ledger.span_ended()
        span.end(end_time=end_ns)


def _elapsed(payload: Any) -> float | None:
    """A payload's measured duration in seconds (``elapsed_s``), or None when it has none."""
    v = getattr(payload, "elapsed_s", None)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
        return float(v)
    return None


def _spread(n: int, k: int) -> list[int]:
    """At most k indices out of range(n), evenly spaced, first and last included."""
    if n <= k:
        return list(range(n))
    return [round(j * (n - 1) / (k - 1)) for j in range(k)]


def _episode_attributes(ctx: Any) -> dict[str, Any]:
    return {
        "karn.episode_id": ctx.episode_id,
        "karn.host_architecture": ctx.host_architecture,
        "karn.host_params": ctx.host_params,
        "karn.max_epochs": ctx.max_epochs,
        "karn.base_seed": ctx.base_seed,
        "karn.git_commit": ctx.git_commit,
        "karn.task_type": ctx.task_type,
        "karn.slots": list(ctx.slot_config),
    }


def _host_attributes(h: Any) -> dict[str, Any]:
    attrs = {
        "karn.epoch": h.epoch,
        "karn.train_loss": h.train_loss,
        "karn.train_accuracy": h.train_accuracy,
        "karn.val_loss": h.val_loss,
        "karn.val_accuracy": h.val_accuracy,
        "karn.host_params": h.host_params,
        "karn.total_seed_params": h.total_seed_params,
        "karn.total_params": h.total_params,
        "karn.fossilized_params": h.fossilized_params,
        "karn.host_grad_norm": h.host_grad_norm,
    }
    if h.grad_isolation_leakage is not None:
        attrs["karn.grad_isolation_leakage"] = h.grad_isolation_leakage
    for sid, norm in h.seed_grad_norms.items():
        attrs[f"karn.seed_grad_norm.{sid}"] = norm
    return attrs


def _rank_summary_attributes(r: Any) -> dict[str, Any]:
    return {
        "karn.epoch": r.epoch,
        "karn.rank.wait_s": r.wait_s,
        "karn.ranks.world_size": r.world_size,
        "karn.ranks.slowest_rank": r.busy_s.max_rank,
        "karn.ranks.busy.min_s": r.busy_s.min,
        "karn.ranks.busy.max_s": r.busy_s.max,
        "karn.ranks.train_loss.max_rank": r.train_loss.max_rank,
        "karn.ranks.unhealthy": r.n_unhealthy,
        "karn.ranks.unhealthy_ranks": list(r.unhealthy_ranks),
    }


def _slot_attributes(s: Any) -> dict[str, Any]:
    prefix = f"karn.slot.{s.slot_id}."
    attrs: dict[str, Any] = {prefix + "stage": s.stage.value, prefix + "alpha": s.alpha}
    if s.seed_id is not None:
        attrs[prefix + "seed_id"] = s.seed_id
    return attrs


def _dense_attributes(d: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "karn.dense.trigger_reason": d.trigger_reason,
        "karn.dense.window_start_epoch": d.window_start_epoch,
        "karn.dense.window_end_epoch": d.window_end_epoch,
        "karn.dense.batches": len(d.batch_metrics),
        "karn.dense.batch_events": min(len(d.batch_metrics), MAX_BATCH_EVENTS),
    }
    # Per-layer statistics, capped so a large model cannot hit the SDK's attribute limit.
    budget = 64
    for prefix, values in (
        ("karn.gradient_flow.", d.gradient_flow),
        ("karn.activation_mean.", d.activation_means),
        ("karn.activation_std.", d.activation_stds),
        ("karn.dead_neurons.", d.dead_neuron_counts),
    ):
        for layer, v in list(values.items())[: max(budget, 0)]:
            attrs[prefix + layer] = v
        budget -= len(values)
    g = d.gate_evaluation_details
    if g is not None:
        attrs.update(
            {
                "karn.gate": g.gate,
                "karn.gate.slot": g.slot_id,
                "karn.gate.passed": g.passed,
                "karn.gate.reason": g.reason,
            }
        )
    return attrs


def _batch_attributes(b: Any) -> dict[str, Any]:
    attrs = {
        "karn.epoch": b.epoch,
        "karn.batch_idx": b.batch_idx,
        "karn.loss": b.loss,
        "karn.accuracy": b.accuracy,
        "karn.host_grad_norm": b.host_grad_norm,
    }
    if b.isolation_leakage is not None:
        attrs["karn.isolation_leakage"] = b.isolation_leakage
    for sid, norm in b.seed_grad_norms.items():
        attrs[f"karn.seed_grad_norm.{sid}"] = norm
    return attrs


def _opt(attrs: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    if value is not None:
        attrs[key] = value
    return attrs


def _gate_event(g: Any) -> tuple[str, dict[str, Any]]:
    a = {
        "karn.gate": g.gate,
        "karn.slot": g.slot_id,
        "karn.passed": g.passed,
        "karn.reason": g.reason,
        "karn.from_stage": g.from_stage.value,
    }
    _opt(a, "karn.seed_id", g.seed_id)
    _opt(a, "karn.to_stage", g.to_stage.value if g.to_stage is not None else None)
    for k, v in list(g.measurements.items())[:16]:
        a[f"karn.measurement.{k}"] = v
    for k, v in list(g.thresholds.items())[:16]:
        a[f"karn.threshold.{k}"] = v
    return "karn.gate_evaluation", a


def _transition_event(t: Any) -> tuple[str, dict[str, Any]]:
    a = {
        "karn.slot": t.slot_id,
        "karn.from_stage": t.from_stage.value,
        "karn.to_stage": t.to_stage.value,
        "karn.reason": t.reason,
    }
    _opt(a, "karn.seed_id", t.seed_id)
    _opt(a, "karn.blueprint", t.blueprint_id)
    return "karn.stage_transition", a


def _decision_event(d: Any) -> tuple[str, dict[str, Any]]:
    a = {
        "karn.controller": d.controller,
        "karn.action": d.action.label(),
        "karn.op": d.action.op.value,
        "karn.reason": d.reason,
    }
    _opt(a, "karn.shadow_action", d.shadow_action.label() if d.shadow_action is not None else None)
    return "karn.controller_decision", a


def _rank_share(cf: Any) -> dict[str, float]:
    """A distributed pass: this rank's own evaluation (compute) vs its wait for the others."""
    if cf.wait_s is None:
        return {}
    return {"karn.rank.wait_s": cf.wait_s, "karn.rank.compute_s": max(0.0, cf.elapsed_s - cf.wait_s)}


def _counterfactual_event(cf: Any) -> tuple[str, dict[str, Any]]:
    a: dict[str, Any] = {
        "karn.strategy": cf.strategy,
        "karn.evaluations": cf.n_evaluations,
        "karn.elapsed_s": cf.elapsed_s,
        "karn.partial": cf.partial,
        **_rank_share(cf),
        "karn.slots": list(cf.slot_ids),
    }
    _opt(a, "karn.partial_reason", cf.partial_reason)
    for sid, v in cf.marginal_contributions.items():
        a[f"karn.removal_cost.{sid}"] = v
    for sid, est in (cf.shapley_values or {}).items():
        a[f"karn.shapley.{sid}"] = est.mean
    return "karn.counterfactual", a


def _alert_event(al: Any) -> tuple[str, dict[str, Any]]:
    return "karn.health_alert", {
        "karn.check": al.check,
        "karn.severity": al.severity.value,
        "karn.message": al.message,
        "karn.value": al.value,
        "karn.threshold": al.threshold,
    }


def _ppo_event(u: Any) -> tuple[str, dict[str, Any]]:
    return "karn.ppo_update", {
        "karn.update_index": u.update_index,
        "karn.policy_loss": u.policy_loss,
        "karn.value_loss": u.value_loss,
        "karn.kl_divergence": u.kl_divergence,
        "karn.explained_variance": u.explained_variance,
    }


def _policy_event(p: Any) -> tuple[str, dict[str, Any]]:
    a = {
        "karn.action": p.action.label(),
        "karn.value_estimate": p.value_estimate,
        "karn.reward": p.reward_total,
        "karn.action_masked": p.action_was_masked,
    }
    _opt(a, "karn.shadow_action", p.shadow_action.label() if p.shadow_action is not None else None)
    return "karn.policy_decision", a


def _baseline_event(b: Any) -> tuple[str, dict[str, Any]]:
    a = {
        "karn.initial_loss": b.initial_loss,
        "karn.initial_accuracy": b.initial_accuracy,
        "karn.checkpoint": str(b.initial_checkpoint),
    }
    _opt(a, "karn.final_host_only_loss", b.final_host_only_loss)
    _opt(a, "karn.final_host_only_accuracy", b.final_host_only_accuracy)
    return "karn.host_baseline", a


def _mode_event(m: Any) -> tuple[str, dict[str, Any]]:
    return "karn.mode_change", {"karn.mode": m.mode.value, "karn.reason": m.reason}


# Events that become span events on their epoch's span. BATCH_METRICS (one per batch) only
# appear inside dense windows; snapshots become span attributes; TELEMETRY_STATS is in the log.
_SPAN_EVENTS: dict[TelemetryEventType, Callable[[Any], tuple[str, dict[str, Any]]]] = {
    ET.GATE_EVALUATION: _gate_event,
    ET.STAGE_TRANSITION: _transition_event,
    ET.CONTROLLER_DECISION: _decision_event,
    ET.HEALTH_ALERT: _alert_event,
    ET.PPO_UPDATE: _ppo_event,
    ET.POLICY_SNAPSHOT: _policy_event,
    ET.HOST_BASELINE: _baseline_event,
    ET.MODE_CHANGE: _mode_event,
}


__all__ = [
    "MAX_BATCH_EVENTS",
    "MAX_EPOCH_EVENTS",
    "EpisodeIdGenerator",
    "EpisodeTraces",
    "start_tracing",
    "trace_id_for_episode",
]
