"""Your own training loop in a few lines: :func:`init`, :meth:`Run.log`, :meth:`Run.finish`.

::

    run = karn_otel.init(config=args, model=model, task="classification")
    for epoch in range(args.epochs):
        ...
        run.log({"train_loss": tl, "val_loss": vl, "val_accuracy": va}, epoch=epoch)
    run.finish()

``init`` opens a run and an episode and records what it can find by itself: the git commit
and whether the tree is dirty, the Python/torch/numpy/CUDA versions, the host, the seeds it
can read or is given, the hyperparameters (a dict, an ``argparse.Namespace`` or a dataclass;
``None`` kept, secret-looking names redacted at the collector's door), the model's parameter
count. What a plain loop cannot know is recorded as unknown (``EpisodeContext.unknown_fields``
names it), never invented.

``log`` takes named numbers: Python numbers, numpy scalars, 0-d (or one-element) tensors.
Well-known names (:data:`HOST_NAMES`) fill the spec's :class:`HostSnapshot` once an epoch has
both ``train_loss`` and ``val_loss``; everything else is recorded as :class:`Scalars`.
Accelerator tensors are read back without a sync per value: a call's tensors travel
together (one sync per ``log`` call with ``epoch=``), and calls with only ``step=`` (per
batch) are queued on the device and read back together once every ``sync_every`` calls
(default 100; and at each new epoch and at ``finish``). CPU tensors are read at once (there
is no device to wait for).

Nothing passed to ``init`` or ``log`` raises into the loop in lenient mode (the default): a
value of the wrong type is rejected, counted per reason in the run's accounting (``karn
inspect`` shows it) and reported once per name; the rest is recorded. Configuration errors
(an impossible console mode, a port outside 0-65535) raise at ``init``, before training.

Environment first: every ``init`` argument not given comes from ``KARN_OUT_DIR``,
``KARN_PROMETHEUS_PORT``, ``KARN_CONSOLE``, ``KARN_TASK``, ``KARN_RUN_ID`` and the standard
``OTEL_*`` variables (endpoint, protocol, service name: read by the OTel sink).

Torch-free at import: torch is touched only when the caller already imported it.
"""

from __future__ import annotations

import atexit
import dataclasses
import enum
import logging
import math
import os
import platform
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from karn_otel._version import __version__
from karn_otel.collector import KarnCollector, TelemetryValidationError, configure, get_collector, install
from karn_otel.config import KarnConfig
from karn_otel.contracts import EpisodeContext, EpisodeSummary, HostSnapshot, Scalars
from karn_otel.health import ReturnMonitor, TaskProfile, return_name_kind, task_profile

__all__ = ["HOST_NAMES", "Run", "init"]

log = logging.getLogger("karn")

HOST_NAMES: dict[str, str] = {
    "train_loss": "train_loss",
    "train_accuracy": "train_accuracy",
    "train_acc": "train_accuracy",
    "val_loss": "val_loss",
    "valid_loss": "val_loss",
    "val_accuracy": "val_accuracy",
    "val_acc": "val_accuracy",
    "valid_accuracy": "val_accuracy",
    "grad_norm": "host_grad_norm",
    "host_grad_norm": "host_grad_norm",
}
"""Logged name -> :class:`HostSnapshot` field. Accuracies are fractions in [0, 1]; losses and
the gradient norm in the loop's own units. Any other name is recorded as :class:`Scalars`."""

EPOCH_NAMES = ("epochs", "max_epochs", "num_epochs", "n_epochs")
"""Hyperparameter names read as the planned number of epochs (``max_epochs``)."""
SEED_NAMES = ("seed", "random_seed", "base_seed")
"""Hyperparameter names read as the run's base seed when ``seed=`` is not given."""

UNKNOWN = "unknown"
_MAX_NAMES = 1024  # distinct logged names kept for the summary (memory bounded by configuration)
_MAX_DEPTH = 4  # nesting of hyperparameter mappings flattened to dotted names
_MAX_TEXT = 500  # characters kept of a hyperparameter shown as text
_INT64 = 2**63
_new_object = object.__new__


def init(
    config: Any = None,
    *,
    model: Any = None,
    task: str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    run_id: str | None = None,
    seed: Any = None,
    numpy_seed: Any = None,
    max_epochs: Any = None,
    architecture: str | None = None,
    slots: Mapping[str, int] | None = None,
    console: str | None = None,
    prometheus_port: int | None = None,
    strict: bool = False,
    code_dir: str | os.PathLike[str] | None = None,
    sync_every: int = 100,
    karn_config: KarnConfig | None = None,
) -> Run:
    """Open a run and its episode, capturing what can be captured; returns the :class:`Run`.

    Args:
        config: the hyperparameters: a mapping, an ``argparse.Namespace``, a dataclass
            instance (nested ones are flattened to dotted names), or None.
        model: anything with ``parameters()`` (a ``torch.nn.Module``): its parameter count
            and class name are recorded. An int is taken as the parameter count.
        task: ``"classification"``, ``"regression"``, ``"rl"`` or any name
            (:data:`karn_otel.health.TASK_PROFILES`); default ``KARN_TASK``, else
            ``"classification"``. ``"rl"`` gets return-based health instead of the
            accuracy checks.
        out_dir: where the run directory goes (default ``KARN_OUT_DIR``, else ``runs``).
        seed: the base seed (default: a ``seed`` hyperparameter). torch's seed is read from
            ``torch.initial_seed()`` when torch is imported; numpy's global seed cannot be
            read back, so it is recorded only when given as ``numpy_seed``.
        max_epochs: the planned epochs (default: an ``epochs``/``max_epochs`` hyperparameter).
        slots: slot id -> channel width, for loops that grow seeds (then emit
            :class:`~karn_otel.contracts.SlotSnapshot` through :meth:`Run.emit`).
        console: ``auto``/``live``/``plain``/``off`` (default ``KARN_CONSOLE``, else auto).
        prometheus_port: serve ``/metrics`` on 127.0.0.1 (default ``KARN_PROMETHEUS_PORT``,
            else none). A busy port falls back to any free port, with a warning.
        strict: raise :class:`~karn_otel.TelemetryValidationError` on a rejected value
            (tests), instead of counting it.
        code_dir: the directory whose git commit is recorded (default: the working dir).
        sync_every: accelerator tensors logged with ``step=`` only are read back together,
            one device sync per ``sync_every`` calls (and at each epoch and at ``finish``);
            those records reach the sinks that much later. 1: read at every call.
        karn_config: a full :class:`~karn_otel.KarnConfig` (the arguments above override it).
    """
    task = task or os.environ.get("KARN_TASK") or "classification"
    for previous in list(_OPEN_RUNS):  # one run at a time, as configure() allows one collector
        if get_collector() is previous.collector:
            log.warning("Karn: init() while run %s is open; finishing it first", previous.run_id)
            previous.finish()
    profile = task_profile(str(task))
    kcfg, notes = _karn_config(karn_config, out_dir, run_id, console, prometheus_port, strict)
    try:
        collector = configure(kcfg)
    except OSError as exc:  # the endpoint could not bind after all: run without it
        if kcfg.prometheus_port is None:
            raise
        notes.append(f"Prometheus endpoint unavailable ({exc}); running without it")
        kcfg = dataclasses.replace(kcfg, prometheus_port=None)
        collector = configure(kcfg)
    run = Run(collector, kcfg, profile)
    run._sync_every = max(1, int(sync_every)) if isinstance(sync_every, int) else 100
    for note in notes:
        run._warn(note)
    run._open(config, model, seed, numpy_seed, max_epochs, architecture, slots, code_dir)
    return run


class Run:
    """One run opened by :func:`init`: ``log`` named values, ``finish`` (or leave a ``with``
    block, or let the process exit) to write its summary and close it."""

    def __init__(self, collector: KarnCollector, config: KarnConfig, profile: TaskProfile) -> None:
        self.collector = collector
        self.config = config
        self.profile = profile
        self.task = profile.task
        self.run_id = collector.run_id
        self.run_dir: Path | None = None if config.out_dir is None else Path(config.out_dir) / collector.run_id
        self.context: EpisodeContext | None = None
        self.problems: list[str] = []  # what init could not take as given, in words
        self.warnings = 0
        self._strict = config.strict
        self._lock = threading.Lock()
        self._closed = False
        self._t0 = time.monotonic()
        self._params = 0
        self._epoch: int | None = None  # the epoch whose host values are pending
        self._pending: dict[str, float] = {}
        self._host_done = False
        self._epochs_seen = 0
        self._logs = 0
        self._last: dict[str, float] = {}
        self._returns: deque[float] = deque(maxlen=100)
        self._lengths: deque[float] = deque(maxlen=100)
        self._episodes = 0
        self._last_val_loss = math.nan
        self._last_val_accuracy = math.nan
        self._returns_monitor: ReturnMonitor | None = None
        self._kinds: dict[str, str | None] = {}  # logged name -> "return" / "length" / None
        self._sync_every = 100
        self._defer_cpu = False  # tests: treat CPU tensors as a device's
        self._deferred: list[tuple[int, dict[str, Any]]] = []
        self.syncs = 0  # batched device read-backs so far
        _track(self)

    # ------------------------------------------------------------------ opening

    def _open(
        self,
        config: Any,
        model: Any,
        seed: Any,
        numpy_seed: Any,
        max_epochs: Any,
        architecture: str | None,
        slots: Mapping[str, int] | None,
        code_dir: Any,
    ) -> None:
        unknown: list[str] = []
        hp = self._hyperparameters(config)
        commit, dirty = _git(Path(code_dir) if code_dir is not None else Path.cwd())
        if commit == UNKNOWN:
            unknown.append("git_commit")
        software = _software()
        software["git_dirty"] = dirty
        software["host"] = platform.node() or UNKNOWN
        base = self._int_or_none(seed, "seed")
        if base is None:
            base = next((hp[k] for k in SEED_NAMES if type(hp.get(k)) is int), None)  # type: ignore[misc]
        torch_seed = _torch_seed()
        np_seed = self._int_or_none(numpy_seed, "numpy_seed")
        seeds = {"base_seed": base, "torch_seed": torch_seed, "numpy_seed": np_seed}
        for name, v in seeds.items():
            if v is None:
                unknown.append(name)
        params, arch = self._model(model)
        if params is None:
            unknown.append("host_params")
        if architecture is not None:
            arch = _text(str(architecture)[:_MAX_TEXT])
        if arch is None:
            unknown.append("host_architecture")
        self._params = params or 0
        epochs = self._int_or_none(max_epochs, "max_epochs")
        if epochs is None:
            epochs = next((hp[k] for k in EPOCH_NAMES if type(hp.get(k)) is int), None)  # type: ignore[misc]
        if epochs is None:
            unknown.append("max_epochs")
        slot_config = self._slots(slots)
        ctx = EpisodeContext(
            episode_id="ep-" + secrets.token_hex(4),
            timestamp=datetime.now(timezone.utc),
            git_commit=commit,
            base_seed=-1 if base is None else base,
            torch_seed=-1 if torch_seed is None else torch_seed,
            numpy_seed=-1 if np_seed is None else np_seed,
            host_architecture=arch or UNKNOWN,
            host_params=self._params,
            slot_config=slot_config,
            max_epochs=-1 if epochs is None else epochs,
            task_type=self.task,
            hyperparameters=hp,
            software=software,
            unknown_fields=tuple(unknown),
        )
        if not self.collector.emit(ctx):
            # Never an empty run: open with what surely passes, and say so loudly.
            self._warn("the episode context was rejected (see the message above); the run is opened without it")
            ctx = dataclasses.replace(
                ctx, hyperparameters={}, slot_config={}, software={}, host_architecture=UNKNOWN, git_commit=UNKNOWN
            )
            if not self.collector.emit(ctx):
                self._warn("the run could not be opened: nothing will be recorded")
                self._closed = True
                return
        self.context = ctx
        if self.profile.return_checks:  # joins after the context: it starts fresh, as on EPISODE_STARTED
            self._returns_monitor = ReturnMonitor(strict=self._strict)
            self.collector.add_processor(self._returns_monitor)

    def _hyperparameters(self, config: Any) -> dict[str, bool | int | float | str | None]:
        out: dict[str, bool | int | float | str | None] = {}
        try:
            items = _config_items(config)
        except Exception as exc:  # noqa: BLE001 (a hostile config object: recorded as nothing)
            self._problem(f"hyperparameters: could not read {type(config).__name__} ({type(exc).__name__})")
            return out
        if items is None:
            self._problem(
                f"hyperparameters: a {type(config).__name__} is not a mapping, Namespace or dataclass; not recorded"
            )
            return out
        _flatten(items, "", out, self, 0)
        return out

    def _model(self, model: Any) -> tuple[int | None, str | None]:
        if model is None:
            return None, None
        if isinstance(model, int) and not isinstance(model, bool):
            return (model, None) if 0 <= model < _INT64 else (None, None)
        try:
            n = sum(int(p.numel()) for p in model.parameters())
        except Exception as exc:  # noqa: BLE001
            self._problem(f"model: no parameter count from {type(model).__name__} ({type(exc).__name__})")
            return None, type(model).__name__
        return n, type(model).__name__

    def _slots(self, slots: Any) -> dict[str, int]:
        if not slots:
            return {}
        out: dict[str, int] = {}
        try:
            for k, v in dict(slots).items():
                if isinstance(k, str) and type(v) is int and v >= 0:
                    out[k] = v
                else:
                    self._problem(f"slots: {k!r}={v!r} is not a name and a width >= 0; left out")
        except Exception:  # noqa: BLE001
            self._problem("slots: not a mapping of slot id -> width; no slots recorded")
        return out

    def _int_or_none(self, v: Any, name: str) -> int | None:
        if v is None:
            return None
        iv = _as_int(v)
        if iv is None:
            self._problem(f"{name}: {_short(v)} is not an integer; recorded as unknown")
        return iv

    # ------------------------------------------------------------------ logging

    def log(self, values: Mapping[str, Any], *, epoch: Any = None, step: Any = None) -> bool:
        """Record named values; True when everything given was recorded.

        ``epoch=e``: the values belong to epoch ``e`` (epochs never decrease); the epoch's
        :class:`HostSnapshot` is written as soon as it has ``train_loss`` and ``val_loss``.
        ``step=s``: a finer index (a batch, an environment step) kept with the values.
        Never raises in lenient mode.
        """
        try:
            with self._lock:
                return self._log(values, epoch, step)
        except TelemetryValidationError:
            raise  # strict mode only
        except Exception as exc:  # noqa: BLE001 (telemetry never raises into training)
            if self._strict:
                raise
            self._reject("malformed", "log", f"Karn could not record a log call: {type(exc).__name__}")
            return False

    def _log(self, values: Any, epoch: Any, step: Any) -> bool:
        # The per-epoch call runs after milliseconds of training, with the CPU caches cold,
        # where each Python call costs about a microsecond (docs/benchmarks.md): the common
        # case (ints, a dict, floats and CPU tensors) is kept inline, the rest goes to helpers.
        if self._closed:
            self._reject("after_finish", "log", "Karn: run.log() after run.finish(); not recorded")
            return False
        ok = True
        ep: int | None = None
        if epoch is not None:
            ep = epoch if type(epoch) is int and 0 <= epoch < _INT64 else _as_int(epoch)
            if ep is None or ep < 0:
                self._reject("bad_epoch", "epoch", f"Karn rejected epoch={_short(epoch)} (an integer >= 0); ignored")
                ep, ok = None, False
        st: int | None = None
        if step is not None:
            st = step if type(step) is int and -_INT64 <= step < _INT64 else _as_int(step)
            if st is None:
                self._reject("type_error", "step", f"Karn rejected step={_short(step)} (an integer); ignored")
                ok = False
        if type(values) is not dict and not isinstance(values, Mapping):
            self._reject("type_error", "values", f"Karn: run.log() takes a dict of named numbers, got {_type(values)}")
            return False
        if ep is not None and ep != self._epoch:
            if self._epoch is not None and ep < self._epoch:
                self._reject(
                    "epoch_regression",
                    "epoch",
                    f"Karn rejected epoch {ep} after epoch {self._epoch} (epochs must not decrease)",
                )
                return False
            if self._pending or self._deferred:
                self._close_epoch()
            self._host_done = False
            self._epoch = ep
            self._epochs_seen += 1
        values = dict(values)
        device = self._has_device_scalar(values)
        if device and ep is None and self._sync_every > 1:
            # Accelerator tensors logged per step: read back together, once per sync_every calls.
            self._deferred.append((st if st is not None else self._logs, values))
            self._logs += 1
            if len(self._deferred) >= self._sync_every:
                self._flush_deferred()
            return ok
        if self._deferred:
            self._flush_deferred()  # what was queued goes first: records stay in call order
        if device:
            self._materialize([values])
        return self._record(values, ep, st if st is not None else (ep if ep is not None else self._logs)) and ok

    def _record(self, values: dict[str, Any], ep: int | None, idx: int) -> bool:
        """Validate and record one call's values (tensors already read back where deferred)."""
        ok = True
        scalars: dict[str, float] = {}
        torch = sys.modules.get("torch")
        tensor = torch.Tensor if torch is not None else None
        host = ep is not None and self.profile.host_checks
        kinds, last, pending = self._kinds, self._last, self._pending
        for key, raw in values.items():
            name = key if type(key) is str else str(key)
            t = type(raw)
            try:
                if t is float:
                    x: float | None = raw
                elif t is tensor and raw.numel() == 1:
                    x = raw.item()  # a CPU tensor (device ones were read back together)
                    if type(x) is not float:
                        x = _as_float(x)
                else:
                    x = _as_float(raw)
            except Exception:  # noqa: BLE001 (a hostile __float__ or .item(): this value only)
                x = None
            if x is None:
                self._reject(
                    "type_error", name, f"Karn rejected {name!r}: {_type(raw)} is not a number (the rest is recorded)"
                )
                ok = False
                continue
            field = HOST_NAMES.get(name)
            if kinds.get(name, "") is None and field is None:  # a name seen before, of no kind
                if name in last or len(last) < _MAX_NAMES:
                    last[name] = x
            else:
                self._remember(name, x, field)
            if field is not None and host:
                if "accuracy" in field and not (0.0 <= x <= 1.0 or math.isnan(x)):
                    self._warn_once(
                        f"implausible:{name}",
                        f"Karn: {name}={x:g} is not a fraction in [0, 1] (a percentage?); recorded as a scalar, "
                        "not as the epoch's accuracy",
                    )
                elif not self._host_done and field not in pending:
                    pending[field] = x
                    continue
            scalars[name] = x
        if scalars:
            ok = self.collector.emit(Scalars(idx, scalars), epoch=ep) and ok
        self._logs += 1
        if ep is not None and "train_loss" in pending and "val_loss" in pending:
            ok = self._emit_host(ep) and ok
        return ok

    def _emit_host(self, ep: int) -> bool:
        p, nan = self._pending, math.nan
        # Built without the frozen dataclass's twelve object.__setattr__ calls (the same
        # instance as HostSnapshot(...); validated by the collector like any other).
        snap = _new_object(HostSnapshot)
        snap.__dict__.update(
            epoch=ep,
            train_loss=p["train_loss"],
            train_accuracy=p.get("train_accuracy", nan),
            val_loss=p["val_loss"],
            val_accuracy=p.get("val_accuracy", nan),
            host_params=self._params,
            total_seed_params=0,
            total_params=self._params,
            fossilized_params=0,
            host_grad_norm=p.get("host_grad_norm", nan),
            seed_grad_norms={},
            grad_isolation_leakage=None,
        )
        self._pending = {}
        self._host_done = True
        return self.collector.emit(snap)

    def _has_device_scalar(self, values: dict[str, Any]) -> bool:
        """Whether ``values`` holds a tensor whose read-back waits for a device (one pass,
        metadata only; a tensor that cannot say is left to :func:`_as_float`)."""
        torch = sys.modules.get("torch")
        if torch is None:
            return False
        tensor, cpu_too = torch.Tensor, self._defer_cpu
        try:
            for v in values.values():
                if isinstance(v, tensor) and (cpu_too or not v.is_cpu) and self._device_scalar(v):
                    return True
        except Exception:  # noqa: BLE001 (a tensor subclass that cannot say: read one by one)
            return False
        return False

    def _device_scalar(self, v: Any) -> bool:
        """A one-element torch tensor whose read-back would wait for the device (CPU ones are
        read at once: no sync to save)."""
        torch = sys.modules.get("torch")
        if torch is None or not isinstance(v, torch.Tensor):
            return False
        try:
            return v.numel() == 1 and (self._defer_cpu or not v.is_cpu)  # metadata only: no sync
        except Exception:  # noqa: BLE001
            return False

    def _materialize(self, entries: list[dict[str, Any]]) -> None:
        """Replace the device scalars of ``entries`` by floats with one transfer (the one sync);
        on any failure (mixed devices, an odd dtype) they stay tensors and are read one by one."""
        refs = [(d, k) for d in entries for k, v in d.items() if self._device_scalar(v)]
        if not refs:
            return
        torch = sys.modules["torch"]
        try:
            flat = torch.stack([d[k].detach().reshape(()).to(torch.float64) for d, k in refs]).tolist()
        except Exception:  # noqa: BLE001
            return
        self.syncs += 1
        for (d, k), x in zip(refs, flat):
            d[k] = x

    def _flush_deferred(self) -> None:
        if not self._deferred:
            return
        queued, self._deferred = self._deferred, []
        self._materialize([v for _, v in queued])
        logs = self._logs
        for idx, values in queued:
            self._record(values, None, idx)
        self._logs = logs  # each queued call was counted when it was made

    def _close_epoch(self) -> None:
        """An epoch ends without both losses: its host values are kept as Scalars."""
        self._flush_deferred()
        if self._pending and self._epoch is not None:
            back = {k: v for k, v in self._pending.items()}
            self.collector.emit(Scalars(self._epoch, back), epoch=self._epoch)
        self._pending = {}
        self._host_done = False

    def _remember(self, name: str, x: float, field: str | None) -> None:
        if name in self._last or len(self._last) < _MAX_NAMES:
            self._last[name] = x
        kind = self._kinds.get(name, "")
        if kind == "":  # first sight of this name: classify it once
            kind = return_name_kind(name)
            if len(self._kinds) < _MAX_NAMES:
                self._kinds[name] = kind
            if _looks_like_accuracy(name) and name not in HOST_NAMES and not (0.0 <= x <= 1.0 or math.isnan(x)):
                self._warn_once(
                    f"implausible:{name}", f"Karn: {name}={x:g} is not a fraction in [0, 1] (a percentage?)"
                )
        if kind == "return" and math.isfinite(x):
            self._returns.append(x)
            self._episodes += 1
        elif kind == "length" and math.isfinite(x):
            self._lengths.append(x)
        if field == "val_loss":
            self._last_val_loss = x
        elif field == "val_accuracy" and 0.0 <= x <= 1.0:
            self._last_val_accuracy = x

    def emit(self, payload: Any, *, epoch: int | None = None) -> bool:
        """A typed contract (:mod:`karn_otel.contracts`) into this run: the full-power API
        (SlotSnapshot, StageTransition, PPOUpdateStats, ...). Same validation as ``log``."""
        if self._closed:
            self._reject("after_finish", "emit", "Karn: run.emit() after run.finish(); not recorded")
            return False
        return self.collector.emit(payload, epoch=epoch)

    def ppo(
        self, heads: Any = ("action",), *, clip_eps: float = 0.2, adv_clip: float = 10.0, device: Any = "cpu"
    ) -> Any:
        """A :class:`karn_otel.adapters.ppo.PPOLogger` bound to this run (imports torch)."""
        from karn_otel.adapters.ppo import PPOLogger

        return PPOLogger(self, heads, clip_eps=clip_eps, adv_clip=adv_clip, device=device)

    # ------------------------------------------------------------------ finishing

    def summary(self) -> EpisodeSummary:
        """The summary ``finish`` writes: epochs, the last validation numbers (NaN when never
        logged), and ``final_metrics``: the last value of every logged name, plus for RL
        the mean return and length over the last (up to) 100 episodes."""
        final = dict(self._last)
        if self._returns:
            final["episodic_return_mean100"] = sum(self._returns) / len(self._returns)
            final["episodes"] = float(self._episodes)
        if self._lengths:
            final["episodic_length_mean100"] = sum(self._lengths) / len(self._lengths)
        return EpisodeSummary(
            epochs_completed=self._epochs_seen,
            final_val_loss=self._last_val_loss,
            final_val_accuracy=self._last_val_accuracy,
            host_only_accuracy=None,
            host_params=self._params,
            total_params=self._params,
            fossilized_params=0,
            wall_time_s=time.monotonic() - self._t0,
            final_metrics=final,
            task_type=self.task,
        )

    def finish(self, *, summary: bool = True) -> dict[str, int]:
        """Write the summary (``karn inspect`` then calls the run finished), flush and close.

        Idempotent. Returns what could not be written (``sink:reason`` -> events)."""
        with self._lock:
            if self._closed:
                return {}
            try:
                self._close_epoch()
                if summary and self.context is not None:
                    self.collector.emit(self.summary())
            except Exception as exc:  # noqa: BLE001
                if self._strict:
                    raise
                log.warning("Karn could not write the run's summary: %s", type(exc).__name__)
            self._closed = True
        _OPEN_RUNS.discard(self)
        if get_collector() is self.collector:
            install(None)
        self.collector.close()
        return dict(self.collector.pipeline.unwritten)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # An exception ends the run without a summary: `karn inspect` says it was interrupted.
        self.finish(summary=exc_type is None)

    # ------------------------------------------------------------------ reporting

    def _reject(self, reason: str, name: str, message: str) -> None:
        """A value the caller passed that cannot be recorded: counted in the run's accounting
        (under ``reason``), reported once per (reason, name); raised in strict mode."""
        pipeline = self.collector.pipeline
        pipeline.rejected[reason] += 1
        if self._strict:
            raise TelemetryValidationError(reason, message, field=name)
        pipeline.report_once(f"api:{reason}:{name}", message + f" (further '{reason}' for {name!r} counted)")

    def _problem(self, message: str) -> None:
        self.problems.append(message)
        self._warn("init: " + message)

    def _warn(self, message: str) -> None:
        self.warnings += 1
        log.warning("Karn %s", message)

    def _warn_once(self, key: str, message: str) -> None:
        self.warnings += 1
        self.collector.pipeline.report_once(key, message)


# ---------------------------------------------------------------------- capture helpers


def _karn_config(
    base: KarnConfig | None,
    out_dir: Any,
    run_id: str | None,
    console: str | None,
    port: int | None,
    strict: bool,
) -> tuple[KarnConfig, list[str]]:
    notes: list[str] = []
    env = os.environ
    cfg = base or KarnConfig()
    changes: dict[str, Any] = {}
    if out_dir is not None:
        changes["out_dir"] = Path(out_dir)
    elif base is None and env.get("KARN_OUT_DIR"):
        changes["out_dir"] = Path(env["KARN_OUT_DIR"])
    rid = run_id or (env.get("KARN_RUN_ID") if base is None or base.run_id is None else None)
    if rid:
        changes["run_id"] = rid
    con = console or (env.get("KARN_CONSOLE") if base is None else None)
    if con:
        changes["console"] = con
    if port is None and base is None and env.get("KARN_PROMETHEUS_PORT"):
        try:
            port = int(env["KARN_PROMETHEUS_PORT"])
        except ValueError:
            raise ValueError(f"KARN_PROMETHEUS_PORT={env['KARN_PROMETHEUS_PORT']!r} is not a port number") from None
    if port is not None:
        changes["prometheus_port"] = port
    if strict:
        changes["strict"] = True
    cfg = dataclasses.replace(cfg, **changes) if changes else cfg
    busy = cfg.prometheus_port and _port_busy(cfg.prometheus_host, cfg.prometheus_port)
    if busy:
        notes.append(
            f"{cfg.prometheus_host}:{cfg.prometheus_port} is in use (another run?); /metrics is served on a free port"
        )
        cfg = dataclasses.replace(cfg, prometheus_port=0)
    return cfg, notes


def _port_busy(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds it
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _git(where: Path) -> tuple[str, str]:
    """(commit, dirty) of the repository containing ``where``: ("unknown", "unknown") outside
    one or without git. Dirty means tracked files differ from the commit."""
    try:
        head = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        if head.returncode != 0:
            return UNKNOWN, UNKNOWN
        commit = head.stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        dirty = UNKNOWN if status.returncode != 0 else ("true" if status.stdout.strip() else "false")
        return commit or UNKNOWN, dirty
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN, UNKNOWN


def _software() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform(), "karn": __version__}
    for dist in ("numpy", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    torch = sys.modules.get("torch")
    if torch is not None:  # only when the caller imported it: init never imports torch
        try:
            out["torch"] = str(torch.__version__)
            out["cuda"] = str(torch.version.cuda) if torch.version.cuda else "none (CPU build)"
            out["cuda_available"] = "true" if torch.cuda.is_available() else "false"
        except Exception:  # noqa: BLE001
            pass
    return out


def _torch_seed() -> int | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        s = int(torch.initial_seed())
    except Exception:  # noqa: BLE001
        return None
    return s if 0 <= s < _INT64 else None


def _config_items(config: Any) -> Mapping[str, Any] | None:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return config
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if hasattr(config, "__dict__") and type(config).__name__ == "Namespace":
        return dict(vars(config))
    return None


def _flatten(items: Mapping[Any, Any], prefix: str, out: dict[str, Any], run: Run, depth: int) -> None:
    for k, v in items.items():
        name = _text(prefix + (k if isinstance(k, str) else str(k)))
        if depth < _MAX_DEPTH:
            nested = _config_items(v) if not isinstance(v, (str, bytes)) and v is not None else None
            if nested is not None and not _is_scalar(v):
                _flatten(nested, name + ".", out, run, depth + 1)
                continue
        out[name] = _hp_value(v)


def _text(s: str) -> str:
    """``s`` as writable UTF-8: a lone surrogate (from a mis-decoded path or argv) is escaped
    instead of getting the whole context rejected."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _hp_value(v: Any) -> bool | int | float | str | None:
    """A hyperparameter as recorded: None and plain scalars as they are, numpy/0-d tensor
    scalars as numbers, enums by value, anything else as (bounded) text."""
    if v is None or isinstance(v, (bool, str)):
        return v if not isinstance(v, str) else _text(v[:_MAX_TEXT])
    if isinstance(v, int):
        return v if -_INT64 <= v < _INT64 else str(v)[:_MAX_TEXT]
    if isinstance(v, float):
        return v
    if isinstance(v, enum.Enum):
        return _hp_value(v.value)
    if _is_array_scalar(v):
        try:
            x = v.item()
            if isinstance(x, (bool, int, float)):
                return _hp_value(x)
        except Exception:  # noqa: BLE001
            pass
    if isinstance(v, os.PathLike):
        return os.fspath(v) if isinstance(os.fspath(v), str) else str(v)
    try:
        text = repr(v) if isinstance(v, (list, tuple, set, frozenset, dict)) else str(v)
    except Exception:  # noqa: BLE001
        text = f"<{type(v).__name__}>"
    return text[:_MAX_TEXT]


def _is_array_scalar(v: Any) -> bool:
    """A numpy scalar or a 0-d/one-element array or tensor, recognised without importing them."""
    torch = sys.modules.get("torch")
    if torch is not None and type(v) is torch.Tensor:  # the common case, by one type check
        return bool(v.numel() == 1)
    shape = getattr(v, "shape", None)
    return hasattr(v, "item") and hasattr(v, "dtype") and shape is not None and _size(shape) == 1


def _size(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _as_float(v: Any) -> float | None:
    """A logged value as a float, or None when it is not a number. Python numbers, numpy
    scalars, one-element arrays and tensors (``.item()``: a device sync on an accelerator)."""
    if isinstance(v, float):
        return v
    if isinstance(v, (bool, int)):
        try:
            return float(v)
        except OverflowError:
            return None
    if _is_array_scalar(v):
        x = v.item()
        if isinstance(x, (bool, int, float)):
            return float(x)
        return None
    if isinstance(v, (str, bytes)) or v is None:
        return None
    f = getattr(type(v), "__float__", None)
    if f is not None:
        try:
            return float(v)
        except (TypeError, ValueError, OverflowError):
            return None
    return None


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if -_INT64 <= v < _INT64 else None
    if _is_array_scalar(v):
        try:
            x = v.item()
        except Exception:  # noqa: BLE001
            return None
        return _as_int(x) if isinstance(x, int) else None
    return None


def _looks_like_accuracy(name: str) -> bool:
    last = name.rsplit("/", 1)[-1].lower()
    return last.endswith(("accuracy", "_acc")) or last == "acc"


def _type(v: Any) -> str:
    return type(v).__name__


def _short(v: Any) -> str:
    try:
        text = repr(v)
    except Exception:  # noqa: BLE001
        text = f"<{type(v).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------- atexit

_OPEN_RUNS: set[Run] = set()  # strong: a run dropped by the script is still finished at exit
_atexit_registered = False


def _track(run: Run) -> None:
    """Remember an open run; the exit hook is registered on the first init, not at import."""
    global _atexit_registered
    _OPEN_RUNS.add(run)
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(_finish_open_runs)


def _finish_open_runs() -> None:
    """At interpreter exit, finish every run the script did not (events are not lost)."""
    for run in list(_OPEN_RUNS):
        try:
            run.finish()
        except Exception:  # noqa: BLE001,S110 (exiting: nothing left to tell)
            pass
