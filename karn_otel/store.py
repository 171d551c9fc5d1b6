"""TelemetryStore: tiers 1-3 in memory, bounded by configuration, with a small query API.

The collector writes here (under its lock) after an event is validated; analytics, the
console and the OTel sink read through the query methods. Every history is a bounded
deque, so memory depends on KarnConfig, never on the length of the run. The run log on
disk (sinks/runlog.py) is the complete record.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Iterable

from karn_otel.contracts import (
    ControllerDecision,
    CounterfactualMatrix,
    DenseTrace,
    EpisodeContext,
    EpisodeSummary,
    HealthAlert,
    HostBaseline,
    HostSnapshot,
    ModeChange,
    OperatingMode,
    PolicySnapshot,
    PPOUpdateStats,
    SlotSnapshot,
    StageTransition,
    TelemetryEvent,
    TelemetryEventType,
)

ET = TelemetryEventType


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
        self.event_counts: Counter[str] = Counter()
        self.run_id: str | None = None
        self.rank = 0
        self.world_size = 1
        self._reset_episode()

    def _reset_episode(self) -> None:
        self.context: EpisodeContext | None = None
        self.baseline: HostBaseline | None = None
        self.summary: EpisodeSummary | None = None
        self.mode = OperatingMode.STANDARD
        self.mode_reason: str | None = None
        self.epoch = 0
        self._host: deque[HostSnapshot] = deque(maxlen=self._max_epochs)
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

    # ------------------------------------------------------------------ writing

    def add(self, event: TelemetryEvent) -> None:
        """Record a validated event. Called by the collector only."""
        p = event.payload
        et = event.event_type
        with self._lock:
            self.event_counts[et.value] += 1
            self.run_id = event.run_id
            self.rank, self.world_size = event.rank, event.world_size
            if et is ET.EPISODE_STARTED:
                self._reset_episode()
                self.context = p
            self.epoch = max(self.epoch, event.epoch)
            if et is ET.HOST_BASELINE:
                self.baseline = p
            elif et is ET.HOST_SNAPSHOT:
                self._host.append(p)
            elif et is ET.SLOT_SNAPSHOT:
                self._slots_latest[p.slot_id] = p
                hist = self._slot_history.setdefault(p.slot_id, deque(maxlen=self._max_epochs))
                hist.append((event.epoch, p))
            elif et is ET.POLICY_SNAPSHOT:
                self._policy.append(p)
            elif et is ET.PPO_UPDATE:
                self._ppo_updates.append(p)
            elif et is ET.CONTROLLER_DECISION:
                self._decisions.append((event.epoch, p))
                self._action_counts[p.action.op.value] += 1
            elif et is ET.STAGE_TRANSITION:
                self._transitions.append((event.epoch, p))
            elif et is ET.HEALTH_ALERT:
                self._alerts.append((event.epoch, p))
            elif et is ET.COUNTERFACTUAL:
                self._counterfactuals.append(p)
            elif et is ET.DENSE_TRACE:
                self.dense_traces.append(p)
            elif et is ET.MODE_CHANGE:
                self.mode, self.mode_reason = p.mode, p.reason
            elif et is ET.EPISODE_ENDED:
                self.summary = p

    # ------------------------------------------------------------------ queries

    def latest_host(self) -> HostSnapshot | None:
        with self._lock:
            return self._host[-1] if self._host else None

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

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.event_counts)


def _tail(items: Iterable, n: int | None) -> list:
    items = list(items)
    return items if n is None else items[-n:] if n > 0 else []
