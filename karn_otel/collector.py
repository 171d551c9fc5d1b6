"""KarnCollector: validate, stamp and route every event (spec "Collector").

``configure(KarnConfig)`` installs the process-wide collector; ``emit(payload)`` sends to
it. With nothing configured, ``emit`` returns after one global lookup (see
benchmarks/bench_overhead.py), so instrumented code can call it unconditionally.

Two error rules, as in opentelemetry-python: invalid *configuration* raises at
construction; an invalid *event* is rejected with a clear message, counted per reason and
logged once per reason, and training continues. ``strict=True`` raises
:class:`TelemetryValidationError` instead (tests use it).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from karn_otel.codec import check_types
from karn_otel.config import KarnConfig
from karn_otel.contracts import (
    EVENT_TYPE_OF,
    SCHEMA_VERSION,
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
    OperatingMode,
    PolicySnapshot,
    PPOUpdateStats,
    Scalars,
    SlotSnapshot,
    StageTransition,
    TelemetryEvent,
    TelemetryEventType,
    TelemetryStats,
)
from karn_otel.pipeline import Pipeline, Processor, Sink, StoreView
from karn_otel.store import TelemetryStore

log = logging.getLogger("karn")
ET = TelemetryEventType


class TelemetryValidationError(ValueError):
    """An event broke a contract rule. ``reason`` is the bounded counter key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"[{reason}] {message}")
        self.reason = reason


class KarnCollector:
    """Validates and stamps (time, run, episode, epoch, rank, world_size) events, then hands
    them to its :class:`~karn_otel.pipeline.Pipeline` (store, sinks, processors)."""

    def __init__(self, config: KarnConfig, sinks: Iterable[Sink] = (), store: TelemetryStore | None = None) -> None:
        self.config = config
        self.run_id = config.run_id or new_run_id()
        rank, world = discover_rank(config)
        self.rank, self.world_size = rank, world
        self.store = store or TelemetryStore(
            max_dense_traces=config.max_dense_traces,
            max_epoch_snapshots=config.max_epoch_snapshots,
            max_recent_events=config.max_recent_events,
        )
        self.pipeline = Pipeline(
            self.store,
            run_id=self.run_id,
            rank=rank,
            world_size=world,
            configured_mode=config.mode,
            strict=config.strict,
        )
        for s in sinks:
            self.pipeline.add_sink(s)
        self._lock = threading.RLock()
        self._episode: EpisodeContext | None = None
        self._slot_ids: frozenset[str] = frozenset()
        self._epoch = 0
        self._closed = False

    # ------------------------------------------------------------------ wiring (composition root)

    @property
    def view(self) -> StoreView:
        """The read-only view processors and sinks are given."""
        return self.pipeline.view

    @property
    def sinks(self) -> tuple[Sink, ...]:
        return self.pipeline.sinks

    @property
    def accepted(self) -> int:
        return self.pipeline.accepted

    @property
    def rejected(self) -> Counter[str]:
        return self.pipeline.rejected

    @property
    def sink_errors(self) -> Counter[str]:
        return self.pipeline.sink_errors

    def add_sink(self, sink: Sink) -> None:
        with self._lock:
            self.pipeline.add_sink(sink)

    def add_processor(self, processor: Processor) -> None:
        with self._lock:
            self.pipeline.add_processor(processor)

    # ------------------------------------------------------------------ emit

    def emit(
        self,
        event: Any,
        *,
        epoch: int | None = None,
        is_reduced: bool = False,
    ) -> bool:
        """Validate, stamp and route one event. Returns True when accepted.

        ``event`` is a contract payload (the usual case: the collector builds the envelope)
        or a complete :class:`TelemetryEvent`. The epoch is taken from the payload when it
        has one, else from ``epoch``, else the episode's current epoch. Events the
        processors derive from it (alerts, mode changes) are routed after it, before
        ``emit`` returns.
        """
        with self._lock:
            env = self._accept(event, epoch, is_reduced)
            if env is None:
                return False
            if env.event_type is ET.EPISODE_ENDED:
                # Karn's own accounting goes into the log just before the summary.
                self.pipeline.deliver_unprocessed(self._envelope(self.stats(), env.epoch, False))
            self.pipeline.route(env, self._stamp_derived)
        if env.event_type is ET.EPISODE_ENDED:
            self.flush()
        return True

    def _accept(self, event: Any, epoch: int | None, is_reduced: bool) -> TelemetryEvent | None:
        """Envelope and validate ``event``; update the episode state. None when rejected."""
        try:
            env = self._envelope(event, epoch, is_reduced)
            self._validate(env)
        except TelemetryValidationError as err:
            self._reject(err)
            return None
        except Exception as exc:  # a malformed envelope (e.g. a str rank): rejected, never raised
            self._reject(TelemetryValidationError("malformed", f"{type(event).__name__}: {exc!r}"[:500]))
            return None
        if isinstance(env.payload, EpisodeContext):
            self._episode = env.payload
            self._slot_ids = frozenset(env.payload.slot_config)
        self._epoch = env.epoch
        return env

    def _stamp_derived(self, payload: Any, epoch: int) -> TelemetryEvent | None:
        return self._accept(payload, epoch, False)

    def _envelope(self, event: Any, epoch: int | None, is_reduced: bool) -> TelemetryEvent:
        if isinstance(event, TelemetryEvent):
            if not isinstance(event.event_type, TelemetryEventType):
                raise TelemetryValidationError(
                    "type_error", f"event_type {event.event_type!r} is not a TelemetryEventType"
                )
            expected = EVENT_TYPE_OF.get(type(event.payload))
            if expected is not event.event_type:
                raise TelemetryValidationError(
                    "type_error",
                    f"payload {type(event.payload).__name__} does not match event_type {event.event_type.value}",
                )
            return event
        et = EVENT_TYPE_OF.get(type(event))
        if et is None:
            raise TelemetryValidationError(
                "unknown_event_type", f"{type(event).__name__} is not a Karn contract (see karn_otel.contracts)"
            )
        ep = getattr(event, "epoch", None)
        if et is ET.EPISODE_STARTED:
            ep = 0 if epoch is None else epoch
        elif ep is None:
            ep = epoch if epoch is not None else self._epoch
        if et is ET.EPISODE_STARTED:
            episode_id = event.episode_id
        else:
            episode_id = self._episode.episode_id if self._episode is not None else ""
        return _make_event(
            et,
            self.run_id,
            episode_id,
            ep if type(ep) is int else -1,
            time.time(),
            event,
            self.rank,
            self.world_size,
            is_reduced,
        )

    # ------------------------------------------------------------------ validation

    def _validate(self, env: TelemetryEvent) -> None:
        p = env.payload
        problem = check_types(p)
        if problem:
            raise TelemetryValidationError("type_error", f"{type(p).__name__}.{problem}")
        if not 0 <= env.rank < env.world_size:
            raise TelemetryValidationError("bad_rank", f"rank {env.rank} outside world_size {env.world_size}")
        if env.epoch < 0:
            raise TelemetryValidationError("bad_epoch", f"epoch {env.epoch} is negative")
        for name in _PARAM_FIELDS.get(type(p), ()):
            if getattr(p, name) < 0:
                raise TelemetryValidationError(
                    "negative_param_count", f"{type(p).__name__}.{name} = {getattr(p, name)} is negative"
                )
        if isinstance(p, EpisodeContext):
            bad = {k: v for k, v in p.slot_config.items() if v < 0}
            if bad:
                raise TelemetryValidationError("negative_param_count", f"EpisodeContext.slot_config has negative {bad}")
            return
        if self._episode is None:
            raise TelemetryValidationError(
                "no_active_episode", f"{env.event_type.value} emitted before any EpisodeContext"
            )
        if env.episode_id != self._episode.episode_id:
            raise TelemetryValidationError(
                "unknown_episode", f"episode {env.episode_id!r} is not the active episode {self._episode.episode_id!r}"
            )
        if env.epoch < self._epoch:
            raise TelemetryValidationError(
                "epoch_regression",
                f"{env.event_type.value} at epoch {env.epoch} after epoch {self._epoch} (epochs must not decrease)",
            )
        if isinstance(p, SlotSnapshot) and not 0.0 <= p.alpha <= 1.0:
            raise TelemetryValidationError("alpha_out_of_range", f"slot {p.slot_id!r} alpha {p.alpha} not in [0, 1]")
        for slot in _slots_named(p):
            if slot not in self._slot_ids:
                raise TelemetryValidationError(
                    "unknown_slot",
                    f"{type(p).__name__} names slot {slot!r}; the episode's slots are {sorted(self._slot_ids)}",
                )

    def _reject(self, err: TelemetryValidationError) -> None:
        self.pipeline.rejected[err.reason] += 1
        if self.config.strict:
            raise err
        self.pipeline.report_once(
            err.reason, f"Karn rejected an event: {err} (further '{err.reason}' rejections are counted)"
        )

    # ------------------------------------------------------------------ accounting, lifecycle

    def dropped(self) -> dict[str, int]:
        """Events lost by sinks (queue full, write failures), summed per sink and reason."""
        return self.pipeline.dropped()

    def stats(self) -> TelemetryStats:
        return self.pipeline.stats()

    def flush(self, timeout: float | None = 10.0) -> None:
        self.pipeline.flush(timeout)

    def close(self) -> None:
        """Flush and close every sink. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.pipeline.close()


# ---------------------------------------------------------------------- validation helpers

_EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(TelemetryEvent))
_new_object = object.__new__


def _make_event(
    event_type: TelemetryEventType,
    run_id: str,
    episode_id: str,
    epoch: int,
    timestamp: float,
    payload: Any,
    rank: int,
    world_size: int,
    is_reduced: bool,
) -> TelemetryEvent:
    """Build an envelope without the frozen dataclass's per-field ``object.__setattr__``.

    Equivalent to ``TelemetryEvent(...)`` (same fields, still frozen afterwards) at a third of
    the cost; this runs once per emitted event on the training thread.
    """
    ev = _new_object(TelemetryEvent)
    ev.__dict__.update(
        event_type=event_type,
        run_id=run_id,
        episode_id=episode_id,
        epoch=epoch,
        timestamp=timestamp,
        payload=payload,
        rank=rank,
        world_size=world_size,
        is_reduced=is_reduced,
        schema_version=SCHEMA_VERSION,
    )
    return ev


_PARAM_FIELDS: dict[type, tuple[str, ...]] = {
    SlotSnapshot: ("seed_params",),
    HostSnapshot: ("host_params", "total_seed_params", "total_params", "fossilized_params"),
    EpisodeContext: ("host_params",),
    EpisodeSummary: ("host_params", "total_params", "fossilized_params"),
}


# Contract classes that name no slot: the common per-step ones skip _slots_named entirely.
_NAMES_NO_SLOT: frozenset[type] = frozenset(
    {Scalars, EpisodeContext, EpisodeSummary, HostBaseline, PPOUpdateStats, HealthAlert, ModeChange, DenseTrace}
)


def _slots_named(p: Any) -> Iterable[str]:
    if type(p) in _NAMES_NO_SLOT:
        return ()
    if isinstance(p, SlotSnapshot):
        return (p.slot_id,)
    if isinstance(p, (HostSnapshot, BatchMetrics)):
        return p.seed_grad_norms.keys()
    if isinstance(p, (StageTransition, GateEvaluationTrace)):
        return (p.slot_id,)
    if isinstance(p, (ControllerDecision, PolicySnapshot)):
        slots = [p.action.slot]
        if p.shadow_action is not None:
            slots.append(p.shadow_action.slot)
        return [s for s in slots if s is not None]
    if isinstance(p, CounterfactualMatrix):
        return p.slot_ids
    return ()


# ---------------------------------------------------------------------- identity


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxxxx`` (UTC + random suffix): sortable and unique."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def discover_rank(config: KarnConfig) -> tuple[int, int]:
    """Rank and world size: the config's when set, else torch.distributed's process group,
    else the launcher's RANK / WORLD_SIZE (karn_otel.ranks.discover)."""
    from karn_otel.ranks import discover

    rank, world = config.rank, config.world_size
    if rank is None or world is None:
        info = discover()
        rank = info.rank if rank is None else rank
        world = info.world_size if world is None else world
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world_size {world} (check RANK/WORLD_SIZE)")
    return rank, world


# ---------------------------------------------------------------------- process-wide collector

_active: KarnCollector | None = None
_active_lock = threading.Lock()


def configure(
    config: KarnConfig | None = None, *, sinks: Iterable[Sink] | None = None, processors: bool = True
) -> KarnCollector:
    """Build a collector for ``config`` and install it process-wide (closing any previous one).

    ``sinks=None`` builds the sinks the config asks for (run log, console, OTel); pass a
    list to choose them yourself. ``processors`` attaches the health monitor and the
    dense-trace triggers (adaptive escalation). The wiring itself is the composition root,
    :func:`karn_otel.sinks.factory.build_pipeline`.
    """
    from karn_otel.sinks.factory import build_pipeline

    config = config or KarnConfig()
    collector = KarnCollector(config)
    build_pipeline(config, collector, sinks=sinks, processors=processors)
    previous = install(collector)
    if previous is not None:
        previous.close()
    return collector


def install(collector: KarnCollector | None) -> KarnCollector | None:
    """Make ``collector`` the process-wide one (None: uninstall) and return the previous one,
    without closing it. ``configure`` uses this; so does ``karn replay``, which records into
    a collector of its own and puts the user's back afterwards."""
    global _active
    with _active_lock:
        previous, _active = _active, collector
    return previous


def get_collector() -> KarnCollector | None:
    """The active collector, or None when Karn is not configured."""
    return _active


def shutdown() -> None:
    """Close and uninstall the active collector."""
    previous = install(None)
    if previous is not None:
        previous.close()


def dense_requested() -> tuple[bool, str | None]:
    """Whether instrumentation should collect dense (tier-3) data now, and why.

    True while the active collector is in research mode: configured so, or escalated by
    the dense-trace triggers after an anomaly. False when Karn is not configured.
    """
    c = _active
    if c is None:
        return False, None
    view = c.view
    if view.mode is OperatingMode.RESEARCH:
        return True, view.mode_reason
    return False, None


def emit(event: Any, *, epoch: int | None = None, is_reduced: bool = False) -> bool:
    """Emit to the active collector; a near-free no-op when Karn is not configured."""
    c = _active
    if c is None:
        return False
    return c.emit(event, epoch=epoch, is_reduced=is_reduced)
