"""The pipeline: where an accepted event goes, and the protocols of what it goes to.

Data flows one way::

    emit ─► Collector (validate, stamp) ─► Pipeline.route(event)
                                             ├─► store.add(event)
                                             ├─► every sink.handle(event)
                                             └─► every processor(event) ─► derived payloads
                                                   (stamped by the collector, then routed the
                                                    same way, after their cause — a queue,
                                                    never a recursive emit)

Processors (health, dense triggers) and sinks (run log, console, OTel) never see the
collector: they get a :class:`StoreView`, a read-only view of the store plus Karn's own
accounting, at construction. The one composition root that wires it all is
:func:`karn_otel.sinks.factory.build_pipeline`.

Where new code goes: a new backend is a :class:`Sink` (``karn_otel/sinks/``); a new
derived signal is a :class:`Processor`; a new query is a method on the store and this view.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

from karn_otel.contracts import (
    ControllerDecision,
    CounterfactualMatrix,
    DenseTrace,
    EpisodeContext,
    EpisodeSummary,
    HealthAlert,
    HostBaseline,
    HostSnapshot,
    OperatingMode,
    PolicySnapshot,
    PPOUpdateStats,
    SlotSnapshot,
    StageTransition,
    TelemetryEvent,
    TelemetryEventType,
    TelemetryStats,
)

if TYPE_CHECKING:
    from karn_otel.health import HealthReport
    from karn_otel.store import TelemetryStore

log = logging.getLogger("karn")

# Derived events a single event may cause, transitively (an alert causing a mode change
# causing ...): a bound so that a processor bug cannot loop forever on the training thread.
MAX_DERIVED_PER_EVENT = 64
# close() returns within this many seconds, whatever the disk or the network does.
SHUTDOWN_TIMEOUT_S = 5.0


# ---------------------------------------------------------------------- protocols


@runtime_checkable
class Sink(Protocol):
    """An output. ``handle`` runs on the training thread: enqueue and return, never block.

    Optional capabilities: ``dropped() -> dict[str, int]`` (events lost, by reason),
    ``queue_depth() -> int`` and ``linger_s() -> float``, asked at close: how long beyond
    the shutdown bound its ``close`` may wait for a reader outside the process (the embedded
    Prometheus endpoint's final scrape); 0 when nothing is waiting for it.
    """

    def handle(self, event: TelemetryEvent) -> None: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self) -> None: ...


class FinalSink(Protocol):
    """A sink closed last (``final_sink = True``: the run log), handed every other sink's
    drop counts to record, and a time bound; returns what it could not write."""

    final_sink: bool

    def close(self, final: Mapping[str, int] | None = None, timeout: float | None = None) -> dict[str, int]: ...


class Processor(Protocol):
    """Observes accepted events and returns derived contract payloads (alerts, mode changes).

    Must not raise in lenient mode and must not emit: what it returns is routed after its
    cause by the pipeline. A processor with a ``WATCHED`` set of event types is called for
    those types only (the per-batch hot path then skips it); one without sees every event.
    One with an ``errors`` count (events it skipped after an internal error) has it reported
    as ``<Processor>:error`` with the dropped counts.
    """

    def __call__(self, event: TelemetryEvent) -> Iterable[Any]: ...


class HealthSource(Protocol):
    """What the view needs of the health monitor: its report, computed on demand."""

    def report(self) -> HealthReport: ...


class ModeOwner(Protocol):
    """The one owner of the operating mode (the dense-trigger engine)."""

    @property
    def mode(self) -> OperatingMode: ...

    @property
    def window_reason(self) -> str | None: ...


class AnalyticsView(Protocol):
    """The derived figures sinks show (karn_otel.analytics.MorphogeneticAnalytics)."""

    def accuracy_delta(self) -> float | None: ...

    def param_ratio(self) -> float | None: ...

    def seed_contributions(self) -> Mapping[str, Any]: ...

    def training_health(self) -> HealthReport | None: ...

    def params_efficiency_ratio(self) -> float | None: ...

    def equivalent_traditional_params(self) -> int | None: ...

    def equivalent_traditional_note(self) -> str | None: ...

    @property
    def reference_curve(self) -> Any: ...


@runtime_checkable
class StoreView(Protocol):
    """Read-only view of the store and of Karn's accounting, for processors and sinks."""

    run_id: str
    rank: int
    world_size: int

    @property
    def context(self) -> EpisodeContext | None: ...

    @property
    def baseline(self) -> HostBaseline | None: ...

    @property
    def summary(self) -> EpisodeSummary | None: ...

    @property
    def epoch(self) -> int: ...

    @property
    def mode(self) -> OperatingMode: ...

    @property
    def mode_reason(self) -> str | None: ...

    @property
    def analytics(self) -> AnalyticsView | None: ...

    def latest_host(self) -> HostSnapshot | None: ...

    def host_per_rank(self) -> dict[int, HostSnapshot]: ...

    def host_history(self) -> list[HostSnapshot]: ...

    def slots(self) -> dict[str, SlotSnapshot]: ...

    def slot_history(self, slot_id: str) -> list[tuple[int, SlotSnapshot]]: ...

    def policy_snapshots(self) -> list[PolicySnapshot]: ...

    def ppo_updates(self) -> list[PPOUpdateStats]: ...

    def recent_decisions(self, n: int | None = None) -> list[tuple[int, ControllerDecision]]: ...

    def action_counts(self) -> dict[str, int]: ...

    def recent_transitions(self, n: int | None = None) -> list[tuple[int, StageTransition]]: ...

    def recent_alerts(self, n: int | None = None) -> list[tuple[int, HealthAlert]]: ...

    def latest_counterfactual(self) -> CounterfactualMatrix | None: ...

    def counterfactual_history(self) -> list[CounterfactualMatrix]: ...

    def dense_trace_list(self) -> list[DenseTrace]: ...

    def counts(self) -> dict[str, int]: ...

    def scalars(self) -> dict[str, float]: ...

    def stats(self) -> TelemetryStats: ...

    def dropped(self) -> dict[str, int]: ...

    def queue_depths(self) -> dict[str, int]: ...

    def health_report(self) -> HealthReport | None: ...


# ---------------------------------------------------------------------- the view


class PipelineView:
    """The :class:`StoreView` the pipeline hands out: store queries plus accounting.

    ``health_report()`` is computed at most once per accepted event, however many readers
    ask (one Prometheus scrape reads it from dozens of callbacks).
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self._p = pipeline
        self._store = pipeline.store
        self.run_id = pipeline.run_id
        self.rank = pipeline.rank
        self.world_size = pipeline.world_size
        self._report_lock = threading.Lock()
        self._report_key = -1
        self._report: HealthReport | None = None

    # store state
    @property
    def context(self) -> EpisodeContext | None:
        return self._store.context

    @property
    def baseline(self) -> HostBaseline | None:
        return self._store.baseline

    @property
    def summary(self) -> EpisodeSummary | None:
        return self._store.summary

    @property
    def epoch(self) -> int:
        return self._store.epoch

    @property
    def mode(self) -> OperatingMode:
        owner = self._p.mode_owner
        return owner.mode if owner is not None else self._p.configured_mode

    @property
    def mode_reason(self) -> str | None:
        owner = self._p.mode_owner
        if owner is not None:
            return owner.window_reason
        # No trigger engine: the configured mode stands, for the reason the engine would give.
        return "force_dense" if self._p.configured_mode is OperatingMode.RESEARCH else None

    @property
    def analytics(self) -> AnalyticsView | None:
        return self._p.analytics

    def latest_host(self) -> HostSnapshot | None:
        return self._store.latest_host()

    def host_per_rank(self) -> dict[int, HostSnapshot]:
        return self._store.host_per_rank()

    def host_history(self) -> list[HostSnapshot]:
        return self._store.host_history()

    def slots(self) -> dict[str, SlotSnapshot]:
        return self._store.slots()

    def slot_history(self, slot_id: str) -> list[tuple[int, SlotSnapshot]]:
        return self._store.slot_history(slot_id)

    def policy_snapshots(self) -> list[PolicySnapshot]:
        return self._store.policy_snapshots()

    def ppo_updates(self) -> list[PPOUpdateStats]:
        return self._store.ppo_updates()

    def recent_decisions(self, n: int | None = None) -> list[tuple[int, ControllerDecision]]:
        return self._store.recent_decisions(n)

    def action_counts(self) -> dict[str, int]:
        return self._store.action_counts()

    def recent_transitions(self, n: int | None = None) -> list[tuple[int, StageTransition]]:
        return self._store.recent_transitions(n)

    def recent_alerts(self, n: int | None = None) -> list[tuple[int, HealthAlert]]:
        return self._store.recent_alerts(n)

    def latest_counterfactual(self) -> CounterfactualMatrix | None:
        return self._store.latest_counterfactual()

    def counterfactual_history(self) -> list[CounterfactualMatrix]:
        return self._store.counterfactual_history()

    def dense_trace_list(self) -> list[DenseTrace]:
        return self._store.dense_trace_list()

    def counts(self) -> dict[str, int]:
        return self._store.counts()

    def scalars(self) -> dict[str, float]:
        return self._store.latest_scalars()

    # accounting
    def stats(self) -> TelemetryStats:
        return self._p.stats()

    def dropped(self) -> dict[str, int]:
        return self._p.dropped()

    def queue_depths(self) -> dict[str, int]:
        return self._p.queue_depths()

    def report(self) -> HealthReport:
        """:class:`HealthSource`: the cached health report (so analytics shares the cache).
        Only handed to analytics when a monitor is attached (see build_pipeline)."""
        report = self.health_report()
        if report is None:
            raise RuntimeError("this pipeline has no health monitor")
        return report

    def health_report(self) -> HealthReport | None:
        health = self._p.health
        if health is None:
            return None
        key = self._p.accepted
        with self._report_lock:
            if key != self._report_key:
                self._report, self._report_key = health.report(), key
            return self._report


# ---------------------------------------------------------------------- routing


class Pipeline:
    """Routes accepted events to the store, the sinks and the processors, in that order.

    A failing sink is isolated and counted (``sink_errors``); the pipeline itself never
    raises into the training thread unless ``strict``.
    """

    def __init__(
        self,
        store: TelemetryStore,
        *,
        run_id: str,
        rank: int,
        world_size: int,
        configured_mode: OperatingMode = OperatingMode.STANDARD,
        strict: bool = False,
    ) -> None:
        self.store = store
        self.run_id, self.rank, self.world_size = run_id, rank, world_size
        self.configured_mode = configured_mode
        self.strict = strict
        self._sinks: tuple[Sink, ...] = ()
        self._processors: tuple[Processor, ...] = ()
        self._watching: dict[TelemetryEventType, tuple[Processor, ...]] = {}
        self.health: HealthSource | None = None
        self.mode_owner: ModeOwner | None = None
        self.analytics: AnalyticsView | None = None
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.sink_errors: Counter[str] = Counter()
        self._reported: set[str] = set()
        self.shutdown_timeout_s = SHUTDOWN_TIMEOUT_S  # the bound on close()
        self.unwritten: dict[str, int] = {}  # what the last close() could not write
        self.view = PipelineView(self)

    # wiring (done once, by the composition root, before events flow)
    @property
    def sinks(self) -> tuple[Sink, ...]:
        return self._sinks

    def add_sink(self, sink: Sink) -> None:
        self._sinks = self._sinks + (sink,)  # copy on write: iteration needs no lock

    def add_processor(self, processor: Processor) -> None:
        self._processors = self._processors + (processor,)
        self._watching = {}  # rebuilt lazily per event type

    # routing
    def route(self, event: TelemetryEvent, stamp: Callable[[Any, int], TelemetryEvent | None]) -> None:
        """Route ``event`` and, after it, everything the processors derive from it.

        ``stamp(payload, epoch)`` is the collector's validate-and-envelope step for a derived
        payload (None when rejected). Breadth-first: an alert is routed after its cause and
        before what the alert itself causes.
        """
        self.accepted += 1
        self._deliver(event)
        procs = self._watching.get(event.event_type)
        if procs is None:
            procs = self._watching_of(event.event_type)
        if not procs:
            return  # the common per-step case: no processor watches this type
        pending: deque[TelemetryEvent] = deque()
        budget = MAX_DERIVED_PER_EVENT
        env: TelemetryEvent | None = event
        while env is not None:
            for proc in self._watching.get(env.event_type) or self._watching_of(env.event_type):
                for derived in proc(env) or ():
                    if budget <= 0:
                        self.report_once("derived_budget", "Karn dropped derived events beyond the per-event bound")
                        self.rejected["derived_budget"] += 1
                        continue
                    budget -= 1
                    stamped = stamp(derived, env.epoch)
                    if stamped is not None:
                        pending.append(stamped)
            env = pending.popleft() if pending else None
            if env is not None:
                self.accepted += 1
                self._deliver(env)

    def _watching_of(self, event_type: TelemetryEventType) -> tuple[Processor, ...]:
        """The processors that watch ``event_type`` (a processor without ``WATCHED`` sees all)."""
        procs = tuple(p for p in self._processors if event_type in getattr(p, "WATCHED", (event_type,)))
        self._watching[event_type] = procs
        return procs

    def deliver_unprocessed(self, event: TelemetryEvent) -> None:
        """Store and sink an event no processor should see (Karn's own TelemetryStats)."""
        self._deliver(event)

    def _deliver(self, env: TelemetryEvent) -> None:
        self.store.add(env)
        for sink in self._sinks:
            try:
                sink.handle(env)
            except Exception as exc:  # a broken sink must never stop training
                name = type(sink).__name__
                self.sink_errors[name] += 1
                if self.strict:
                    raise
                self.report_once(f"sink:{name}", f"Karn sink {name} failed: {exc!r} (further failures counted)")

    # accounting (read from other threads, e.g. a Prometheus scrape, while the training
    # thread counts: copies retry on "dictionary changed size during iteration")
    def dropped(self) -> dict[str, int]:
        """Events lost by sinks (queue full, write failures), summed per sink and reason."""
        out: Counter[str] = Counter()
        for sink in self._sinks:
            fn = getattr(sink, "dropped", None)
            if fn is not None:
                for reason, n in _snapshot(fn).items():
                    out[f"{type(sink).__name__}:{reason}"] += n
        for name, n in _snapshot(lambda: self.sink_errors).items():
            out[f"{name}:error"] += n
        for proc in self._processors:  # events a processor skipped after an internal error
            n = getattr(proc, "errors", 0)
            if isinstance(n, int) and n > 0:
                out[f"{type(proc).__name__}:error"] += n
        return dict(out)

    def queue_depths(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for sink in self._sinks:
            fn = getattr(sink, "queue_depth", None)
            if callable(fn):
                out[type(sink).__name__] = int(fn())
        return out

    def stats(self) -> TelemetryStats:
        return TelemetryStats(accepted=self.accepted, rejected=_snapshot(lambda: self.rejected), dropped=self.dropped())

    def report_once(self, key: str, message: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning(message)

    # lifecycle
    def flush(self, timeout: float | None = 10.0) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for sink in self._sinks:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                sink.flush(left)
            except Exception as exc:
                self.report_once(f"flush:{type(sink).__name__}", f"Karn sink flush failed: {exc!r}")

    def close(self, timeout: float | None = None) -> dict[str, int]:
        """Flush and close every sink within ``timeout`` s (default ``shutdown_timeout_s``),
        whatever the disk or the network does; returns what could not be written
        (``sink:reason`` -> events), also kept in ``unwritten``.

        Order: flush all; close every sink except the final ones (the run log) in parallel,
        leaving the final ones a reserve of the bound; then close the final ones with the
        drop counts of all the others, so every sink's losses reach the run log's final
        accounting. A sink still closing at the bound is left behind (reported). A sink that
        lingers for an outside reader (``linger_s``: the Prometheus endpoint waiting for its
        final scrape, at most ``final_scrape_s``) extends the bound by that much: a process
        that exits right after close must not cut the wait short.
        """
        bound = self.shutdown_timeout_s if timeout is None else timeout
        sinks = self._sinks
        final = [s for s in sinks if getattr(s, "final_sink", False) is True]
        others = [s for s in sinks if s not in final]
        linger = max((_linger_of(s) for s in others), default=0.0)
        deadline = time.monotonic() + bound + linger
        reserve = min(1.0, 0.2 * bound) if final else 0.0
        self.flush(timeout=max(0.0, deadline - linger - reserve - time.monotonic()))
        busy = _run_bounded([(type(s).__name__, s.close) for s in others], deadline - reserve, self.report_once)
        for name in busy:
            self.report_once(
                f"close:{name}",
                f"Karn sink {name} was still closing at the {bound + linger:g} s shutdown bound; left behind",
            )
        unwritten: dict[str, int] = {}
        for sink in final:
            name = type(sink).__name__
            try:
                closer = cast(FinalSink, sink)
                left = closer.close(final=self.dropped(), timeout=max(0.0, deadline - time.monotonic()))
            except Exception as exc:
                self.report_once(f"close:{name}", f"Karn sink close failed: {exc!r}")
                continue
            for reason, n in (left or {}).items():
                unwritten[f"{name}:{reason}"] = n
        self.unwritten = unwritten
        return unwritten


def _linger_of(sink: Sink) -> float:
    """The sink's ``linger_s()`` (0 without one, or when it fails or makes no sense)."""
    fn = getattr(sink, "linger_s", None)
    if not callable(fn):
        return 0.0
    try:
        s = float(fn())
    except Exception:  # noqa: BLE001 (a sink's bug must not stop the shutdown)
        return 0.0
    return s if 0.0 < s < math.inf else 0.0


def _run_bounded(
    jobs: list[tuple[str, Callable[[], object]]], deadline: float, report: Callable[[str, str], None]
) -> list[str]:
    """Run ``jobs`` in parallel daemon threads until ``deadline``; the names still running."""

    def run(name: str, job: Callable[[], object]) -> None:
        try:
            job()
        except Exception as exc:
            report(f"close:{name}", f"Karn sink close failed: {exc!r}")

    threads = [
        (name, threading.Thread(target=run, args=(name, job), name=f"karn-close-{name}", daemon=True))
        for name, job in jobs
    ]
    for _, t in threads:
        t.start()
    for _, t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [name for name, t in threads if t.is_alive()]


def _snapshot(read: Callable[[], Mapping[str, int]], attempts: int = 5) -> dict[str, int]:
    """A copy of a counter another thread may be growing; retried, then empty (never raises)."""
    for _ in range(attempts):
        try:
            return dict(read())
        except RuntimeError:
            continue
    return {}


__all__ = [
    "AnalyticsView",
    "FinalSink",
    "HealthSource",
    "ModeOwner",
    "Pipeline",
    "PipelineView",
    "Processor",
    "Sink",
    "StoreView",
]
