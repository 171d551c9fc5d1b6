"""TelemetryStore: tiers 1-3 in memory, bounded by configuration, with a small query API.

The pipeline writes here (under the collector's lock) after an event is validated;
processors and sinks read through a read-only view (karn_otel.pipeline.StoreView). The
operating mode is not kept here: its one owner is the dense-trigger engine. Every history is a bounded
deque, so memory depends on KarnConfig, never on the length of the run. The run log on
disk (sinks/runlog.py) is the complete record.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterable
from typing import TypeVar

from karn_otel.contracts import (
    EVENT_TYPE_OF,
    BatchMetrics,
    ControllerDecision,
    CounterfactualMatrix,
    DenseTrace,
    EpisodeContext,
    EpisodeSummary,
    GateEvaluationTrace,
    HealthAlert,
    HostBaseline,
    HostSnapshot,
    ModeChange,
    PolicySnapshot,
    PPOUpdateStats,
    Scalars,
    SlotSnapshot,
    StageTransition,
    TelemetryEvent,
    TelemetryEventType,
    TelemetryStats,
)

ET = TelemetryEventType


def is_global_host_snapshot(event: TelemetryEvent) -> bool:
    """A HostSnapshot that describes the whole job: the only rank's, or the reduced one.

    With several ranks every rank also reports its own (``is_reduced=False``); those are kept
    per rank, apart from the history that analytics and the console read.
    """
    return event.world_size == 1 or event.is_reduced


# Payload classes the store only counts (per-batch metrics, gate traces, mode changes, stats).
_COUNTED_ONLY: frozenset[type] = frozenset({BatchMetrics, GateEvaluationTrace, ModeChange, TelemetryStats})
# Recorded without the store's lock (see add): the counted-only classes and Scalars.
_LOCK_FREE: frozenset[type] = _COUNTED_ONLY | {Scalars}
_EVENT_TYPE_OF = EVENT_TYPE_OF


class TelemetryStore:
    """In-memory state of the current episode (and counts across the run)."""

    def __init__(
        self,
        max_dense_traces: int = 10,
        max_epoch_snapshots: int = 10_000,
        max_recent_events: int = 256,
    ) -> None:
        self._lock = threading.Lock()
        self.max_dense_traces = max_dense_traces
        self._max_epochs = max_epoch_snapshots
        self._max_recent = max_recent_events
        # Accepted events per payload class (a type hashes in C; an enum member does not).
        self._counts_by_class: dict[type, int] = dict.fromkeys(EVENT_TYPE_OF, 0)
        self.run_id: str | None = None
        self.rank = 0
        self.world_size = 1
        self._reset_episode()

    def _reset_episode(self) -> None:
        self.context: EpisodeContext | None = None
        self.baseline: HostBaseline | None = None
        self.summary: EpisodeSummary | None = None
        self.epoch = 0
        self._host: deque[HostSnapshot] = deque(maxlen=self._max_epochs)
        self._host_per_rank: dict[int, HostSnapshot] = {}
        self._slots_latest: dict[str, SlotSnapshot] = {}
        self._slot_history: dict[str, deque[tuple[int, SlotSnapshot]]] = {}
        self._policy: deque[PolicySnapshot] = deque(maxlen=self._max_recent)
        self._ppo_updates: deque[PPOUpdateStats] = deque(maxlen=self._max_recent)
        self._decisions: deque[tuple[int, ControllerDecision]] = deque(maxlen=self._max_recent)
        self._action_counts: Counter[str] = Counter()  # per op, whole episode
        self._transitions: deque[tuple[int, StageTransition]] = deque(maxlen=self._max_recent)
        self._alerts: deque[tuple[int, HealthAlert]] = deque(maxlen=self._max_recent)
        self._counterfactuals: deque[CounterfactualMatrix] = deque(maxlen=self._max_epochs)
        self.dense_traces: deque[DenseTrace] = deque(maxlen=self.max_dense_traces)
        self.scalars: dict[str, float] = {}  # latest value per name (bounded by the user's names)

    # ------------------------------------------------------------------ writing

    def add(self, event: TelemetryEvent) -> None:
        """Record a validated event. Called by the pipeline only.

        Dispatch is on the payload's class (``match``), so each branch sees its payload typed.
        """
        p = event.payload
        cls = type(p)
        if cls is Scalars:  # the per-step record, first (see the lock-free branch below)
            self._counts_by_class[Scalars] += 1
            epoch = event.epoch
            if epoch > self.epoch:
                self.epoch = epoch
            self.scalars.update(p.values)  # type: ignore[union-attr]
            return
        if cls in _LOCK_FREE:
            # The per-step/per-batch path, without the lock: the pipeline is the only writer
            # (it holds the collector's lock), the scalars are merged by one C call (atomic
            # under the GIL), and readers copy under self._lock, so they see whole steps.
            self._counts_by_class[cls] += 1
            if event.epoch > self.epoch:
                self.epoch = event.epoch
            if isinstance(p, Scalars):
                self.scalars.update(p.values)
            return
        epoch = event.epoch
        counts = self._counts_by_class
        with self._lock:
            counts[cls] = counts.get(cls, 0) + 1
            self.run_id = event.run_id
            self.rank, self.world_size = event.rank, event.world_size
            if epoch > self.epoch:
                self.epoch = epoch
            match p:
                case EpisodeContext():
                    self._reset_episode()
                    self.context = p
                case HostBaseline() as p:
                    self.baseline = p
                case HostSnapshot() as p:
                    if is_global_host_snapshot(event):
                        self._host.append(p)
                    else:
                        self._host_per_rank[event.rank] = p
                case SlotSnapshot() as p:
                    self._slots_latest[p.slot_id] = p
                    hist = self._slot_history.get(p.slot_id)
                    if hist is None:
                        hist = self._slot_history[p.slot_id] = deque(maxlen=self._max_epochs)
                    hist.append((epoch, p))
                case PolicySnapshot() as p:
                    self._policy.append(p)
                case PPOUpdateStats() as p:
                    self._ppo_updates.append(p)
                case ControllerDecision() as p:
                    self._decisions.append((epoch, p))
                    self._action_counts[p.action.op.value] += 1
                case StageTransition() as p:
                    self._transitions.append((epoch, p))
                case HealthAlert() as p:
                    self._alerts.append((epoch, p))
                case CounterfactualMatrix() as p:
                    self._counterfactuals.append(p)
                case DenseTrace() as p:
                    self.dense_traces.append(p)
                case EpisodeSummary() as p:
                    self.summary = p
                case _:
                    pass  # counted only (batch metrics, gate traces, mode changes, Karn's stats)

    # ------------------------------------------------------------------ queries

    def latest_host(self) -> HostSnapshot | None:
        with self._lock:
            return self._host[-1] if self._host else None

    def host_per_rank(self) -> dict[int, HostSnapshot]:
        """Latest per-rank (not reduced) snapshot of each rank seen, in a multi-rank run."""
        with self._lock:
            return dict(self._host_per_rank)

    def host_history(self) -> list[HostSnapshot]:
        with self._lock:
            return list(self._host)

    def slots(self) -> dict[str, SlotSnapshot]:
        """Latest snapshot of every slot seen this episode."""
        with self._lock:
            return dict(self._slots_latest)

    def slot_history(self, slot_id: str) -> list[tuple[int, SlotSnapshot]]:
        with self._lock:
            return list(self._slot_history.get(slot_id, ()))

    def policy_snapshots(self) -> list[PolicySnapshot]:
        with self._lock:
            return list(self._policy)

    def ppo_updates(self) -> list[PPOUpdateStats]:
        with self._lock:
            return list(self._ppo_updates)

    def recent_decisions(self, n: int | None = None) -> list[tuple[int, ControllerDecision]]:
        with self._lock:
            return _tail(self._decisions, n)

    def action_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._action_counts)

    def recent_transitions(self, n: int | None = None) -> list[tuple[int, StageTransition]]:
        with self._lock:
            return _tail(self._transitions, n)

    def recent_alerts(self, n: int | None = None) -> list[tuple[int, HealthAlert]]:
        with self._lock:
            return _tail(self._alerts, n)

    def latest_counterfactual(self) -> CounterfactualMatrix | None:
        with self._lock:
            return self._counterfactuals[-1] if self._counterfactuals else None

    def counterfactual_history(self) -> list[CounterfactualMatrix]:
        with self._lock:
            return list(self._counterfactuals)

    def dense_trace_list(self) -> list[DenseTrace]:
        with self._lock:
            return list(self.dense_traces)

    def latest_scalars(self) -> dict[str, float]:
        """Latest value of every named scalar (a copy, taken under the lock)."""
        with self._lock:
            return dict(self.scalars)

    def counts(self) -> dict[str, int]:
        """Accepted events per event type (its string value)."""
        counts = _copy(self._counts_by_class)
        return {_EVENT_TYPE_OF[cls].value: n for cls, n in counts.items() if n}

    @property
    def event_counts(self) -> Counter[TelemetryEventType]:
        """Accepted events per event type."""
        return Counter({_EVENT_TYPE_OF[cls]: n for cls, n in _copy(self._counts_by_class).items() if n})


T = TypeVar("T")
K = TypeVar("K")


def _copy(d: dict[K, int]) -> dict[K, int]:
    """A copy of a dict the pipeline may be growing in another thread (dict() of a dict is
    one C call, atomic under the GIL; retried in the unlikely case it is not)."""
    for _ in range(5):
        try:
            return dict(d)
        except RuntimeError:
            continue
    return {}


def _tail(items: Iterable[T], n: int | None) -> list[T]:
    items = list(items)
    return items if n is None else items[-n:] if n > 0 else []
