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
import math
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

from karn_otel.codec import (
    FINITE_FLAG,
    INT64_MAX,
    MAYBE_NONFINITE,
    Problem,
    canonical_floats,
    check_float,
    check_int,
    check_str,
    checker,
    id_problem,
    safe_repr,
    type_name,
)
from karn_otel.config import KarnConfig, redact_hyperparameters
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
    """An event broke a contract rule. ``reason`` is the bounded counter key; ``field`` the
    offending field's path when one is to blame (e.g. ``"values['loss']"``)."""

    def __init__(self, reason: str, message: str, field: str | None = None) -> None:
        super().__init__(f"[{reason}] {message}")
        self.reason = reason
        self.field = field


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
        self._episode_id = ""
        self._slot_ids: frozenset[str] = frozenset()
        self._epoch = 0
        self._route = self.pipeline.route  # bound once: the per-step path calls them every event
        self._derive = self._stamp_derived
        # The envelope of every event, its constant fields filled in (copied once per event).
        self._template: dict[str, Any] = dict.fromkeys(_EVENT_FIELDS)
        self._template.update(
            run_id=self.run_id, rank=rank, world_size=world, is_reduced=False, schema_version=SCHEMA_VERSION
        )
        # The flag's slot is in the template, so setting it never grows (resizes) the copy.
        self._template[FINITE_FLAG] = False
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

        Never raises in lenient mode, whatever it is given: a bad event is rejected and
        counted, an internal failure downstream counted under ``pipeline:error``. In strict
        mode every rejection raises :class:`TelemetryValidationError`.
        """
        with self._lock:
            env = None
            try:  # the per-step path, inlined: a simple payload, valid, in an open episode
                plan = _PLANS.get(type(event))
                if (
                    plan is not None
                    and is_reduced is False
                    and self._episode_id
                    and (epoch is None or (type(epoch) is int and epoch <= INT64_MAX))
                ):
                    et, check, has_epoch, simple, slots = plan
                    if simple:
                        r = check(event)
                        if r is None or r is MAYBE_NONFINITE:
                            if r is not None:
                                event, r = _canonical(event, r, check)
                            ep = event.epoch if has_epoch else (self._epoch if epoch is None else epoch)
                            if ep >= self._epoch and (slots is None or self._slot_ids.issuperset(slots(event))):
                                d = self._template.copy()
                                d["event_type"] = et
                                d["episode_id"] = self._episode_id
                                d["epoch"] = self._epoch = ep
                                d["timestamp"] = _now()
                                d["payload"] = event
                                if r is None:
                                    d[FINITE_FLAG] = True
                                env = _new_object(TelemetryEvent)
                                _set_attr(env, "__dict__", d)
            except Exception:
                env = None  # _accept below checks again, and rejects with the reason
            if env is not None:
                try:
                    self._route(env, self._derive)
                except Exception as exc:
                    self._route_failed(exc)
                return True
            env = self._accept(event, epoch, is_reduced)
            if env is None:
                return False
            ended = env.event_type is ET.EPISODE_ENDED
            try:
                if ended:
                    # Karn's own accounting goes into the log just before the summary.
                    self.pipeline.deliver_unprocessed(self._own(self.stats(), env.epoch))
                self._route(env, self._derive)
            except Exception as exc:
                self._route_failed(exc)
        if ended:
            self.flush()
        return True

    def _route_failed(self, exc: Exception) -> None:
        """A processor or sink failed on an accepted event: raised in strict mode, else counted."""
        if self.config.strict:
            raise exc
        self.pipeline.sink_errors["pipeline"] += 1
        self.pipeline.report_once(
            "pipeline", f"Karn could not route an event: {type_name(exc)} (further failures counted)"
        )

    def _accept(self, event: Any, epoch: Any, is_reduced: Any) -> TelemetryEvent | None:
        """Validate and envelope ``event``; update the episode state. None when rejected."""
        try:
            plan = _PLANS.get(type(event))
            if plan is not None and plan[3] and self._episode is not None:
                env = self._accept_simple(event, plan, epoch, is_reduced)
            else:
                env = self._accept_general(event, plan, epoch, is_reduced)
        except TelemetryValidationError as err:
            self._reject(err)
            return None
        except Exception as exc:  # a hostile object (a raising __class__, __eq__, ...): rejected, never raised
            self._reject(TelemetryValidationError("malformed", f"{type_name(event)}: {type_name(exc)} while checking"))
            return None
        self._epoch = env.epoch
        return env

    def _accept_simple(self, event: Any, plan: _Plan, epoch: Any, is_reduced: Any) -> TelemetryEvent:
        """The per-step path: a payload needing no cross-field rule (Scalars, BatchMetrics, ...)
        inside an open episode. Same checks as the general path, fewer steps."""
        et, check, has_epoch = plan[0], plan[1], plan[2]
        r = check(event)
        if r is not None:
            if r is not MAYBE_NONFINITE:
                raise _problem(r, event)
            event, r = _canonical(event, r, check)
        if has_epoch:
            ep = event.epoch
        elif epoch is None:
            ep = self._epoch
        else:
            ep = _checked_epoch(epoch)
        if ep < self._epoch:
            self._check_epoch(ep, et)
        slots = plan[4]
        if slots is not None and not self._slot_ids.issuperset(slots(event)):
            self._rules(event, et, ep)  # raises unknown_slot, naming it
        d = self._template.copy()
        d["event_type"] = et
        d["episode_id"] = self._episode_id
        d["epoch"] = ep
        d["timestamp"] = _now()
        d["payload"] = event
        if is_reduced is not False:
            d["is_reduced"] = _checked_bool(is_reduced, "is_reduced")
        if r is None:
            d[FINITE_FLAG] = True
        ev: TelemetryEvent = _new_object(TelemetryEvent)
        _set_attr(ev, "__dict__", d)
        return ev

    def _accept_general(self, event: Any, plan: _Plan | None, epoch: Any, is_reduced: Any) -> TelemetryEvent:
        if plan is None:
            if isinstance(event, TelemetryEvent):
                return self._accept_envelope(event)
            raise TelemetryValidationError(
                "unknown_event_type", f"{type_name(event)} is not a Karn contract (see karn_otel.contracts)"
            )
        et, check, has_epoch = plan[0], plan[1], plan[2]
        r = check(event)
        if r is not None:
            if r is not MAYBE_NONFINITE:
                raise _problem(r, event)
            event, r = _canonical(event, r, check)
        if et is ET.EPISODE_STARTED:
            ep = 0 if epoch is None else _checked_epoch(epoch)
        elif has_epoch:
            ep = event.epoch
        else:
            ep = self._epoch if epoch is None else _checked_epoch(epoch)
        reduced = _checked_bool(is_reduced, "is_reduced")
        payload = self._rules(event, et, ep)
        if payload is not event:
            r = check(payload)
        return self._stamp(et, ep, payload, reduced, r is None)

    def _accept_envelope(self, env: TelemetryEvent) -> TelemetryEvent:
        """A complete envelope given by the caller: every field is checked (it is rebuilt as a
        plain TelemetryEvent, so a subclass or a tampered ``__dict__`` goes no further)."""
        et = _field(env, "event_type")
        if type(et) is not TelemetryEventType:
            raise TelemetryValidationError(
                "type_error", f"TelemetryEvent.event_type: expected TelemetryEventType, got {type_name(et)}"
            )
        payload = _field(env, "payload")
        plan = _PLANS.get(type(payload))
        if plan is None or plan[0] is not et:
            raise TelemetryValidationError(
                "type_error", f"TelemetryEvent.payload: {type_name(payload)} does not match event_type {et.value}"
            )
        r = plan[1](payload)
        if r is not None:
            if r is not MAYBE_NONFINITE:
                raise _problem(r, payload)
            payload, r = _canonical(payload, r, plan[1])
        for name in ("run_id", "episode_id"):
            p = id_problem(_field(env, name)) if name == "run_id" or et is not ET.EPISODE_STARTED else None
            if name == "episode_id" and p is None:
                p = check_str(_field(env, name))
            if p is not None:
                raise _problem(p, env, root=f"TelemetryEvent.{name}", envelope=True)
        ep = _checked_epoch(_field(env, "epoch"), "TelemetryEvent.epoch")
        ts = _field(env, "timestamp")
        p = check_float(ts)
        if p is not None and not (p is MAYBE_NONFINITE and type(ts) is not float and math.isfinite(ts)):
            if p is MAYBE_NONFINITE:
                p = Problem("bad_timestamp", "", f"{safe_repr(ts)} is not a finite time")
            raise _problem(p, env, root="TelemetryEvent.timestamp", envelope=True)
        rank, world = _field(env, "rank"), _field(env, "world_size")
        for name, v in (("rank", rank), ("world_size", world)):
            p = check_int(v)
            if p is not None:
                raise _problem(p, env, root=f"TelemetryEvent.{name}", envelope=True)
        if not 0 <= rank < world <= _MAX_WORLD:
            raise TelemetryValidationError(
                "bad_rank", f"rank {safe_repr(rank)} outside world_size {safe_repr(world)}", field="rank"
            )
        reduced = _checked_bool(_field(env, "is_reduced"), "TelemetryEvent.is_reduced")
        version = _field(env, "schema_version")
        if type(version) is not int or version != SCHEMA_VERSION:
            raise TelemetryValidationError(
                "schema_version",
                f"TelemetryEvent.schema_version {safe_repr(version)} (this Karn writes {SCHEMA_VERSION})",
                field="schema_version",
            )
        episode_id = payload.episode_id if et is ET.EPISODE_STARTED else _field(env, "episode_id")
        if et is ET.EPISODE_STARTED and _field(env, "episode_id") != episode_id:
            raise TelemetryValidationError(
                "unknown_episode",
                "TelemetryEvent.episode_id differs from its EpisodeContext's episode_id",
                field="episode_id",
            )
        if et is not ET.EPISODE_STARTED and self._episode is not None and episode_id != self._episode.episode_id:
            raise TelemetryValidationError(
                "unknown_episode",
                f"episode {safe_repr(episode_id)} is not the active episode {safe_repr(self._episode.episode_id)}",
                field="episode_id",
            )
        payload = self._rules(payload, et, ep)
        return _make_event(et, env.run_id, episode_id, ep, float(ts), payload, rank, world, reduced, r is None)

    def _rules(self, p: Any, et: TelemetryEventType, ep: int) -> Any:
        """The cross-field rules of a type-valid payload; returns the payload to record (an
        EpisodeContext with its secrets redacted) and updates the episode state."""
        if ep < 0:
            raise TelemetryValidationError("bad_epoch", f"epoch {ep} is negative", field="epoch")
        cls = type(p)
        if cls is TelemetryStats:
            raise TelemetryValidationError(
                "reserved_event_type", "TelemetryStats is Karn's own accounting; it cannot be emitted"
            )
        for name in _PARAM_FIELDS.get(cls, ()):
            if getattr(p, name) < 0:
                raise TelemetryValidationError(
                    "negative_param_count", f"{cls.__name__}.{name} = {getattr(p, name)} is negative", field=name
                )
        if cls is EpisodeContext:
            bad = {k: v for k, v in p.slot_config.items() if v < 0}
            if bad:
                raise TelemetryValidationError(
                    "negative_param_count",
                    f"EpisodeContext.slot_config has negative {safe_repr(next(iter(bad)))}",
                    field="slot_config",
                )
            hp, n = redact_hyperparameters(p.hyperparameters, self.config.secret_patterns)
            if n:
                p = dataclasses.replace(p, hyperparameters=hp)
                self.pipeline.report_once(
                    "redacted", f"Karn redacted {n} hyperparameter(s) whose names look like secrets"
                )
            self._episode = p
            self._episode_id = p.episode_id
            self._slot_ids = frozenset(p.slot_config)
            self._epoch = ep
            return p
        if self._episode is None:
            raise TelemetryValidationError("no_active_episode", f"{et.value} emitted before any EpisodeContext")
        if ep < self._epoch:
            self._check_epoch(ep, et)
        if cls is SlotSnapshot and not 0.0 <= p.alpha <= 1.0:
            raise TelemetryValidationError(
                "alpha_out_of_range",
                f"slot {safe_repr(p.slot_id)} alpha {safe_repr(p.alpha)} not in [0, 1]",
                field="alpha",
            )
        for slot in _slots_named(p):
            if slot not in self._slot_ids:
                known = sorted(self._slot_ids)
                shown = ", ".join(map(safe_repr, known[:8])) + (", ..." if len(known) > 8 else "")
                raise TelemetryValidationError(
                    "unknown_slot", f"{cls.__name__} names slot {safe_repr(slot)}; the episode's slots are [{shown}]"
                )
        return p

    def _check_epoch(self, ep: int, et: TelemetryEventType) -> None:
        if ep < 0:
            raise TelemetryValidationError("bad_epoch", f"epoch {ep} is negative", field="epoch")
        raise TelemetryValidationError(
            "epoch_regression",
            f"{et.value} at epoch {ep} after epoch {self._epoch} (epochs must not decrease)",
            field="epoch",
        )

    def _stamp(self, et: TelemetryEventType, ep: int, payload: Any, reduced: bool, finite: bool) -> TelemetryEvent:
        episode_id = payload.episode_id if et is ET.EPISODE_STARTED else self._episode_id
        return _make_event(
            et, self.run_id, episode_id, ep, _now(), payload, self.rank, self.world_size, reduced, finite
        )

    def _own(self, payload: Any, epoch: int) -> TelemetryEvent:
        """An envelope for Karn's own records (TelemetryStats): built, not validated."""
        return self._stamp(EVENT_TYPE_OF[type(payload)], epoch, payload, False, False)

    def _stamp_derived(self, payload: Any, epoch: int) -> TelemetryEvent | None:
        return self._accept(payload, None if hasattr(payload, "epoch") else epoch, False)

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
    finite: bool = False,
) -> TelemetryEvent:
    """Build an envelope without the frozen dataclass's per-field ``object.__setattr__``.

    Equivalent to ``TelemetryEvent(...)`` (same fields, still frozen afterwards) at a third of
    the cost. ``finite``: validation proved every float finite (see codec.FINITE_FLAG).
    """
    d: dict[str, Any] = {
        "event_type": event_type,
        "run_id": run_id,
        "episode_id": episode_id,
        "epoch": epoch,
        "timestamp": timestamp,
        "payload": payload,
        "rank": rank,
        "world_size": world_size,
        "is_reduced": is_reduced,
        "schema_version": SCHEMA_VERSION,
        FINITE_FLAG: finite,
    }
    ev: TelemetryEvent = _new_object(TelemetryEvent)
    _set_attr(ev, "__dict__", d)
    return ev


_now = time.time
_set_attr = object.__setattr__
_MAX_WORLD = 2**31


def _problem(r: Problem, obj: Any, root: str | None = None, envelope: bool = False) -> TelemetryValidationError:
    """The error for a checker's Problem, naming the field (``root`` defaults to the class).

    A field of the wrong type in a caller-built envelope counts as ``malformed``."""
    base = type_name(obj) if root is None else root
    field = (r.where[1:] if r.where.startswith(".") else r.where) or (None if root is None else root.split(".")[-1])
    reason = "malformed" if envelope and r.reason == "type_error" else r.reason
    return TelemetryValidationError(reason, r.describe(base) if r.where else f"{base}: {r.detail}", field=field)


def _canonical(payload: Any, r: Problem | None, check: Callable[[Any], Problem | None]) -> tuple[Any, Problem | None]:
    """A valid payload (``check`` gave ``r``, MAYBE_NONFINITE) with an int given for a float
    converted (:func:`~karn_otel.codec.canonical_floats`), and its check result again."""
    c = canonical_floats(payload)
    return (payload, r) if c is payload else (c, check(c))


def _field(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise TelemetryValidationError("type_error", f"TelemetryEvent.{name} is missing", field=name) from None


def _checked_epoch(v: Any, where: str = "epoch") -> int:
    """An epoch given by the caller (the ``epoch=`` argument or an envelope's field)."""
    r = check_int(v)
    if r is not None:
        raise _problem(r, v, root=where, envelope=where != "epoch")
    if v < 0:
        raise TelemetryValidationError("bad_epoch", f"{where} {v} is negative", field="epoch")
    return int(v)


def _checked_bool(v: Any, where: str) -> bool:
    if v is True or v is False:
        return v
    raise TelemetryValidationError("type_error", f"{where}: expected bool, got {type_name(v)}", field=where)


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


# Per contract class: (event type, checker, payload has an ``epoch`` field, simple, slot names).
# "Simple" classes need no cross-field rule beyond the epoch and the slots they name, and take
# the per-step path of _accept.
_Plan = tuple[TelemetryEventType, Callable[[Any], "Problem | None"], bool, bool, Callable[[Any], Iterable[str]] | None]
_NEEDS_RULES: frozenset[type] = frozenset(
    {EpisodeContext, SlotSnapshot, HostSnapshot, EpisodeSummary, CounterfactualMatrix, TelemetryStats}
)


def _build_plans() -> dict[type, _Plan]:
    plans: dict[type, _Plan] = {}
    for cls, et in EVENT_TYPE_OF.items():
        has_epoch = "epoch" in {f.name for f in dataclasses.fields(cls)}
        slots = _seed_norm_slots if cls is BatchMetrics else None
        simple = cls not in _NEEDS_RULES and (cls in _NAMES_NO_SLOT or slots is not None)
        plans[cls] = (et, checker(cls), has_epoch, simple, slots)
    return plans


def _seed_norm_slots(p: Any) -> Iterable[str]:
    keys: Iterable[str] = p.seed_grad_norms.keys()
    return keys


_PLANS = _build_plans()


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


def shutdown(timeout: float | None = None) -> dict[str, int]:
    """Close and uninstall the active collector, within ``timeout`` s (default
    ``pipeline.SHUTDOWN_TIMEOUT_S``, 5 s) whatever the disk or the network does.

    Returns what could not be written (``sink:reason`` -> events; empty when everything
    was); each loss is also logged as a warning and counted in the collector's ``stats()``.
    """
    previous = install(None)
    if previous is None:
        return {}
    if timeout is not None:
        previous.pipeline.shutdown_timeout_s = timeout
    previous.close()
    return dict(previous.pipeline.unwritten)


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
    if epoch is None and is_reduced is False:
        return c.emit(event)  # the per-step call: no keyword arguments to pass on
    return c.emit(event, epoch=epoch, is_reduced=is_reduced)
