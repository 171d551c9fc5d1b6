"""Metric instruments: one observable instrument per entry of :mod:`karn_otel.metrics_registry`.

:class:`MetricInstruments` keeps the latest payloads (``handle``: O(1) dict writes on the
training thread) and registers the instruments on a meter provider. Their callbacks run
when a reader collects (a Prometheus scrape, a periodic OTLP export), on the reader's
thread, and read one *source* each (see ``_sources``): the latest payloads kept here, and
the pipeline's read-only :class:`~karn_otel.pipeline.StoreView` for what Karn knows beyond
the event stream (its accounting, the health report, the analytics). The health report is
the view's, cached once per accepted event, so a scrape computes it at most once however
many instruments read it. Without a health monitor, ``karn.health.*`` shows the latest
alert per check; without analytics, ``karn.analytics.*`` has no points.

Every point carries ``run_id``, ``rank`` and ``world_size`` attributes, so they arrive as
Prometheus labels on every series by either export path. Rank k's points describe rank k:
the job-wide HostSnapshot that rank 0 adds in a DDP job (``is_reduced``) becomes the host
series with ``scope="job"`` and *no* ``rank`` label, never rank 0's. Unmeasured (None),
non-numeric and non-finite values make no point.

Every counter has a series for each label combination Karn knows from the start, at 0
(every check with its severity, every controller operation, every rejection reason, every
drop reason of the pipeline's own sinks), so ``increase()`` sees the first increment.
``karn.episode.complete`` is 0 while an episode is open and 1 once it ended, held for the
rest of the process's life; ``karn.episode.stopped`` is 1 when Karn shut down with the
episode open (an error, Ctrl-C, a launcher stopping the rank). A rank that finished or said
goodbye is told apart from one that vanished (killed, crashed, unreachable).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Histogram, Observation
from opentelemetry.sdk.metrics import MeterProvider

from karn_otel import __version__
from karn_otel.contracts import ActionOp, SeedStage, Severity, TelemetryEvent, TelemetryEventType
from karn_otel.distributed.export_policy import RankExportPolicy
from karn_otel.health import CHECKS
from karn_otel.metrics_registry import (
    EPOCH_DURATION_BUCKETS_S,
    MAX_UNHEALTHY_RANK_SERIES,
    METRICS,
    REJECTION_REASONS,
    SINK_DROP_REASONS,
    SOURCES,
    MetricDef,
)
from karn_otel.pipeline import StoreView
from karn_otel.sinks.otel.lifecycle import ExportLedger

log = logging.getLogger("karn")
ET = TelemetryEventType

MAX_HEALTH_CHECKS = 32  # distinct `check` label values; more fold into "other"
_SEVERITY_LEVEL = {Severity.OK: 0, Severity.INFO: 1, Severity.WARNING: 2, Severity.CRITICAL: 3}
Reader = Callable[[], Iterable[tuple[Any, dict[str, str]]]]  # a source: (object, labels) pairs at collection time


class MetricInstruments:
    """The latest payloads, and the registry's instruments that read them and the view."""

    def __init__(self, view: StoreView, ledger: ExportLedger, policy: RankExportPolicy | None = None) -> None:
        self._view = view
        self._ledger = ledger
        # Which ranks export their own series (karn_otel/distributed/export_policy.py): a rank
        # outside the policy exports only job-wide values (rank 0), unless its health turns bad.
        self._policy = policy or RankExportPolicy("all")
        self._unhealthy = False  # latched: once bad, a sampled-out rank exports for the rest of the run
        self._common = {"run_id": view.run_id, "rank": view.rank, "world_size": view.world_size}
        self._reported: set[str] = set()
        self.reset_episode()
        # Run-wide (counters never go back), every known combination at 0 from the start.
        self._alerts: Counter[tuple[str, str]] = Counter({(c.name, c.severity.value): 0 for c in CHECKS})
        self._decisions: Counter[str] = Counter({op.value: 0 for op in ActionOp})
        # Epochs each rank was named unhealthy by the reduction (rank 0's job-wide counter): a
        # counter, so a rank unhealthy for less than a scrape interval is still seen.
        self._unhealthy_epochs: Counter[int] = Counter()
        self._lifecycle: list[tuple[Any, dict[str, Any]]] = []  # [] until the first episode starts
        self._epoch_duration: Histogram | None = None
        self._epoch_mark: float | None = None  # when the epoch in progress started (s)
        self._epoch_elapsed: float | None = None  # the epoch that just ended, not yet recorded
        self._epoch_ctx: Context | None = None  # the latest epoch's span: the host points' exemplar

    def reset_episode(self) -> None:
        # New objects, not .clear(): a callback on a reader thread may be iterating the old ones.
        self._latest: dict[TelemetryEventType, Any] = {}
        self._job_host: Any = None  # the job-wide (reduced) HostSnapshot, rank 0 of a DDP job
        self._rank_summary: Any = None  # the latest RankHealthSummary (every rank gets it; rank 0 exports it)
        self._slots: dict[str, Any] = {}
        self._health: dict[str, Any] = {}

    def handle(self, event: TelemetryEvent) -> None:
        """Keep the latest payloads (training thread; a few dict writes)."""
        et = event.event_type
        p: Any = event.payload
        if et is ET.EPISODE_STARTED:
            self.reset_episode()
            self._lifecycle = [(_Progress(0, 0), {})]
            self._epoch_mark = event.timestamp
            self._epoch_ctx = None
        elif et is ET.EPISODE_ENDED:
            self._lifecycle = [(_Progress(1, 0), {})]
        if et is ET.HOST_SNAPSHOT and event.is_reduced:
            self._job_host = p  # job-wide: its own series (scope="job"), never this rank's
            return
        if et is ET.RANK_SUMMARY:
            self._rank_summary = p
            counts = self._unhealthy_epochs
            for rank in p.unhealthy_ranks:
                if rank in counts or len(counts) < MAX_UNHEALTHY_RANK_SERIES:
                    counts[rank] += 1
            return
        if et is ET.HOST_SNAPSHOT and self._epoch_mark is not None:
            self._epoch_elapsed = max(0.0, event.timestamp - self._epoch_mark)
            self._epoch_mark = event.timestamp
        self._latest[et] = p
        if et is ET.SLOT_SNAPSHOT:
            self._slots[p.slot_id] = p
        elif et is ET.HEALTH_ALERT:
            check = p.check if p.check in self._health or len(self._health) < MAX_HEALTH_CHECKS else "other"
            self._health[check] = p
            self._alerts[(check, p.severity.value)] += 1
        elif et is ET.CONTROLLER_DECISION:
            self._decisions[p.action.op.value] += 1
        elif et is ET.DENSE_TRACE:
            self._ledger.dense_windows += 1

    def record_epoch_duration(self, context: Context | None) -> None:
        """Record the epoch that just ended (once), inside ``context`` (its span: the exemplar).

        The host series' points carry the same exemplar from now on (the loss of an epoch links
        to that epoch's trace), until the next epoch.
        """
        self._epoch_ctx = context
        elapsed, self._epoch_elapsed = self._epoch_elapsed, None
        if elapsed is not None and self._epoch_duration is not None and self.exports_rank_series():
            self._epoch_duration.record(elapsed, self._common, context=context)

    def mark_stopped(self) -> None:
        """Karn is shutting down: an episode still open was stopped (said goodbye), not lost."""
        if self._lifecycle and not self._lifecycle[0][0].complete:
            self._lifecycle = [(_Progress(0, 1), {})]

    def register(self, meter_provider: MeterProvider) -> None:
        """Create one observable instrument per registry metric on ``meter_provider``."""
        meter = meter_provider.get_meter("karn_otel", __version__)
        sources = self._sources()
        missing = set(SOURCES) ^ set(sources)
        if missing:
            raise RuntimeError(f"registry sources and OTelSink readers differ: {sorted(missing)}")
        for m in METRICS:
            if m.kind == "histogram":  # recorded at the epoch boundary (record_epoch_duration)
                self._epoch_duration = meter.create_histogram(
                    m.name,
                    unit=m.unit,
                    description=m.description,
                    explicit_bucket_boundaries_advisory=EPOCH_DURATION_BUCKETS_S,
                )
                continue
            create = meter.create_observable_counter if m.kind == "counter" else meter.create_observable_gauge
            create(m.name, callbacks=[self._callback(m, sources[m.source])], unit=m.unit, description=m.description)

    def _callback(self, m: MetricDef, source: Reader) -> Callable[[CallbackOptions], list[Observation]]:
        """One instrument's callback: walk ``m.field`` into each source object, one point per value."""
        path = m.field.split(".") if m.field else []
        common = self._common
        linked = m.source == "host"  # per-rank host points link to their epoch's span (exemplar)

        def observe(options: CallbackOptions) -> list[Observation]:
            points: list[Observation] = []
            try:
                ctx = self._epoch_ctx if linked else None
                own = self.exports_rank_series()
                for obj, labels in source():
                    if not own and "scope" not in labels:
                        continue  # this rank's own series are not exported under the policy
                    for value, key in _values(_walk(obj, path), m.key_label is not None):
                        attrs: dict[str, Any] = {**common, **labels}
                        if "rank" in labels and labels["rank"] is None:
                            del attrs["rank"]  # a job-wide value belongs to no rank
                        if key is not None:
                            attrs[str(m.key_label)] = key
                        points.append(Observation(value, attrs, context=None if "scope" in labels else ctx))
            except Exception as exc:  # a broken reader must cost one metric, not the whole scrape
                self._report_once(m.name, f"Karn metric {m.name} could not be read: {exc!r}")
                return []
            return points

        return observe

    def exports_rank_series(self) -> bool:
        """Whether this rank exports its own series now (the export policy, with health latched)."""
        view = self._view
        if self._policy.kind == "all" or view.world_size == 1:
            return True
        if not self._unhealthy and self._policy.kind == "sampled":
            report = view.health_report()
            self._unhealthy = report is not None and report.overall in (Severity.WARNING, Severity.CRITICAL)
        return self._policy.exports_rank_series(view.run_id, view.rank, view.world_size, self._unhealthy)

    def _sources(self) -> dict[str, Reader]:
        """One reader per registry source: yields (object, labels) pairs at collection time."""
        latest = self._latest_of
        view = self._view
        return {
            "host": self._read_host,
            "slot": self._read_slots,
            "slot_stage": self._read_slot_stages,
            "counterfactual": lambda: latest(ET.COUNTERFACTUAL),
            "shapley": self._read_shapley,
            "policy": lambda: latest(ET.POLICY_SNAPSHOT),
            # A PolicySnapshot repeats the latest update's statistics; use it before any update.
            "ppo": lambda: latest(ET.PPO_UPDATE) or latest(ET.POLICY_SNAPSHOT),
            "baseline": lambda: latest(ET.HOST_BASELINE),
            "context": lambda: latest(ET.EPISODE_STARTED),
            "summary": lambda: latest(ET.EPISODE_ENDED),
            "lifecycle": lambda: self._lifecycle,
            "epochs": lambda: [],  # a histogram, recorded rather than read
            "analytics": self._read_analytics,
            "claims": self._read_claims,
            "control": self._read_control,
            "health": self._read_health,
            "ranks": self._read_ranks,
            "ranks_unhealthy": self._read_ranks_unhealthy,
            "ranks_unhealthy_epochs": self._read_unhealthy_epochs,
            "alerts": lambda: [(n, {"check": c, "severity": s}) for (c, s), n in _copy(self._alerts).items()],
            "decisions": lambda: [(n, {"op": op}) for op, n in _copy(self._decisions).items()],
            "collector": self._read_collector,  # accepted, rejected
            "dropped": self._read_dropped,
            "otel": lambda: [(self._ledger, {})],
            "queues": lambda: [(depth, {"component": name}) for name, depth in view.queue_depths().items()],
        }

    def _read_host(self) -> list[tuple[Any, dict[str, Any]]]:
        out: list[tuple[Any, dict[str, Any]]] = self._latest_of(ET.HOST_SNAPSHOT)
        job = self._job_host
        if job is not None:
            out.append((job, {"scope": "job", "rank": None}))
        return out

    def _job_summary(self) -> Any:
        """The latest RankHealthSummary if this rank exports job-wide values (rank 0), else None."""
        if self._rank_summary is None or not self._policy.exports_job_series(self._view.rank):
            return None
        return self._rank_summary

    def _read_ranks(self) -> list[tuple[Any, dict[str, Any]]]:
        r = self._job_summary()
        if r is None:
            return []
        spreads = ("train_loss", "host_grad_norm", "busy_s")
        values = types.SimpleNamespace(
            **{q: {"min": getattr(r, q).min, "mean": getattr(r, q).mean, "max": getattr(r, q).max} for q in spreads},
            worst_rank={q.removesuffix("_s"): getattr(r, q).max_rank for q in spreads},
            world_size=r.world_size,
            n_unhealthy=r.n_unhealthy,
            n_critical=r.n_critical,
        )
        return [(values, {"scope": "job", "rank": None})]

    def _read_ranks_unhealthy(self) -> list[tuple[Any, dict[str, Any]]]:
        r = self._job_summary()
        if r is None:
            return []
        # The level comes from the reduction's order (worst first): warning or critical.
        critical = set(r.unhealthy_ranks[: r.n_critical])
        return [(3 if rank in critical else 2, {"scope": "job", "rank": str(rank)}) for rank in r.unhealthy_ranks]

    def _read_unhealthy_epochs(self) -> list[tuple[Any, dict[str, Any]]]:
        if not self._policy.exports_job_series(self._view.rank):
            return []
        return [(n, {"scope": "job", "rank": str(rank)}) for rank, n in sorted(_copy(self._unhealthy_epochs).items())]

    def _read_collector(self) -> list[tuple[Any, dict[str, str]]]:
        stats = self._view.stats()
        rejected = {r: 0 for r in REJECTION_REASONS}
        rejected.update(stats.rejected)
        return [(dataclasses.replace(stats, rejected=rejected), {})]

    def _latest_of(self, et: TelemetryEventType) -> list[tuple[Any, dict[str, str]]]:
        p = self._latest.get(et)
        return [] if p is None else [(p, {})]

    def _read_slots(self) -> list[tuple[Any, dict[str, str]]]:
        return [(s, {"slot": sid, "blueprint": s.blueprint_id or "none"}) for sid, s in _copy(self._slots).items()]

    def _read_slot_stages(self) -> list[tuple[Any, dict[str, str]]]:
        # A state set: every stage has a series, so a stage change never leaves a stale 1 behind.
        return [
            (int(s.stage is stage), {"slot": sid, "stage": stage.value})
            for sid, s in _copy(self._slots).items()
            for stage in SeedStage
        ]

    def _read_shapley(self) -> list[tuple[Any, dict[str, str]]]:
        cf = self._latest.get(ET.COUNTERFACTUAL)
        if cf is None or not cf.shapley_values:
            return []
        return [(est, {"slot": sid}) for sid, est in cf.shapley_values.items()]

    def _read_analytics(self) -> list[tuple[Any, dict[str, str]]]:
        analytics = self._view.analytics
        return [] if analytics is None else [(analytics, {})]

    def _read_control(self) -> list[tuple[Any, dict[str, str]]]:
        values = self._view.scalars()
        if "control_val_accuracy" not in values:
            return []
        return [(types.SimpleNamespace(**{k: values.get(k) for k in _CONTROL_FIELDS}), {})]

    def _read_claims(self) -> list[tuple[Any, dict[str, str]]]:
        analytics = self._view.analytics
        if analytics is None:
            return []
        return [(c, {"slot": sid, "rule": c.rule}) for sid, c in analytics.claims().items()]

    def _read_health(self) -> list[tuple[Any, dict[str, str]]]:
        # The monitor knows every check's state, passing ones and recoveries included; its
        # alerts are edge-triggered, so without it the latest alert per check is the best guess.
        report = self._view.health_report()  # cached by the view: once per accepted event
        if report is not None:
            return [(c, {"check": c.name}) for c in report.checks]
        return [(a, {"check": c}) for c, a in _copy(self._health).items()]

    def _read_dropped(self) -> list[tuple[Any, dict[str, str]]]:
        counts: dict[tuple[str, str], int] = {}
        for component in self._view.queue_depths():  # the pipeline's sinks that report a queue
            for reason in SINK_DROP_REASONS.get(component, ()):
                counts[(component, reason)] = 0
        for key, n in self._view.dropped().items():
            component, _, reason = key.partition(":")
            counts[(component, reason or "unknown")] = n
        return [(n, {"component": c, "reason": r}) for (c, r), n in counts.items()]

    def _report_once(self, key: str, message: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning(message)


# ---------------------------------------------------------------------- metric values


@dataclasses.dataclass(frozen=True)
class _Progress:
    complete: int  # 0 while the episode is open, 1 once it ended
    stopped: int  # 1 when Karn shut down with the episode still open


_CONTROL_FIELDS = ("control_val_accuracy", "accuracy_delta_vs_control")


def _walk(obj: Any, path: Sequence[str]) -> Any:
    """Follow a dotted field path; a missing attribute or None anywhere gives None. Methods are called."""
    for part in path:
        if obj is None:
            return None
        obj = getattr(obj, part, None)
        if callable(obj):
            obj = obj()
    return obj


def _values(value: Any, keyed: bool) -> Iterable[tuple[float, str | None]]:
    """(number, key) pairs: one unkeyed value, or one per mapping entry / named contract field."""
    if not keyed:
        n = _number(value)
        return [] if n is None else [(n, None)]
    if isinstance(value, dict):
        items: Iterable[tuple[Any, Any]] = _copy(value).items()
    elif dataclasses.is_dataclass(value):
        items = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    else:
        return []
    return [(n, str(k)) for k, v in items if (n := _number(v)) is not None]


def _number(v: Any) -> float | int | None:
    """The value to observe, or None for no point: unmeasured (None), non-numeric or non-finite.

    The OTel SDK drops NaN and inf observations itself, with a warning per collection; a
    diverged loss shows up as the ``non_finite_loss`` health check instead.
    """
    if v is None:
        return None
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, Severity):
        return _SEVERITY_LEVEL[v]
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return None


def _copy(d: dict[Any, Any]) -> dict[Any, Any]:
    """Copy a dict the training thread may be inserting into (rarely raises; retry)."""
    for _ in range(3):
        try:
            return dict(d)
        except RuntimeError:
            continue
    return {}


__all__ = ["MAX_HEALTH_CHECKS", "MetricInstruments", "Reader"]
