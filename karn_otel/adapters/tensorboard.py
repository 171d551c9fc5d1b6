"""A TensorBoard ``SummaryWriter`` that records into Karn: change one import.

::

    from torch.utils.tensorboard import SummaryWriter   # before
    from karn_otel.adapters.tensorboard import SummaryWriter   # after

Scalars (``add_scalar``, ``add_scalars``) become Karn :class:`~karn_otel.contracts.Scalars`,
one event per ``global_step`` (the values of a step are gathered until the step changes, a
tag repeats, ``flush`` or ``close``; nothing is overwritten). The ``"hyperparameters"`` markdown table CleanRL writes with
``add_text`` and ``add_hparams``' dict become the run's hyperparameters. Images, histograms,
graphs and the other non-scalar calls are accepted and not recorded (said once).

The Karn run opens at the first scalar (so the hyperparameters written before it are in
its context) and closes with ``close()`` or at exit, with its summary. Its task is
``task=`` if given, else ``KARN_TASK``, else ``"rl"`` when the first scalar or the
hyperparameters look like RL (an episode return, ``env_id``), else ``"unknown"``. Karn's
run directory goes to ``KARN_OUT_DIR`` (default ``runs``), not to ``log_dir``.
Neither tensorboard nor torch is needed.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from karn_otel.health import return_name_kind

__all__ = ["SummaryWriter"]

log = logging.getLogger("karn")

_RL_TAGS = frozenset({"approx_kl", "old_approx_kl", "clipfrac", "explained_variance", "policy_loss", "value_loss"})
_RL_HPARAMS = frozenset({"env_id", "env", "env_name", "gamma", "gae_lambda", "clip_coef"})
_NOT_RECORDED = (
    "add_histogram",
    "add_histogram_raw",
    "add_image",
    "add_images",
    "add_image_with_boxes",
    "add_figure",
    "add_video",
    "add_audio",
    "add_graph",
    "add_embedding",
    "add_pr_curve",
    "add_pr_curve_raw",
    "add_custom_scalars",
    "add_custom_scalars_multilinechart",
    "add_custom_scalars_marginchart",
    "add_mesh",
    "add_onnx_graph",
)


class SummaryWriter:
    """``torch.utils.tensorboard.SummaryWriter``'s interface, recording into Karn.

    Karn's own keywords: ``task``, ``run`` (an open :class:`karn_otel.api.Run` to write
    into instead of opening one), and any :func:`karn_otel.init` argument via ``karn=``.
    """

    def __init__(
        self,
        log_dir: Any = None,
        comment: str = "",
        purge_step: Any = None,
        max_queue: int = 10,
        flush_secs: int = 120,
        filename_suffix: str = "",
        *,
        task: str | None = None,
        run: Any = None,
        karn: Mapping[str, Any] | None = None,
    ) -> None:
        self.log_dir = None if log_dir is None else str(log_dir)
        self._task = task
        self._run = run
        self._own_run = run is None
        self._init_kwargs = dict(karn or {})
        self._hparams: dict[str, Any] = {}
        self._step: int | None = None
        self._values: dict[str, Any] = {}
        self._said: set[str] = set()
        self._closed = False

    # ------------------------------------------------------------------ the karn run

    @property
    def karn_run(self) -> Any:
        """The Karn run this writer records into (opened now if not yet)."""
        return self._open(None)

    def _open(self, first_tag: str | None) -> Any:
        if self._run is None:
            from karn_otel.api import init

            task = self._task or os.environ.get("KARN_TASK") or self._guess_task(first_tag)
            kwargs = dict(self._init_kwargs)
            kwargs.setdefault("task", task)
            self._run = init(config=self._hparams, **kwargs)
        return self._run

    def _guess_task(self, tag: str | None) -> str:
        last = (tag or "").rsplit("/", 1)[-1]
        if return_name_kind(last) is not None or last in _RL_TAGS or _RL_HPARAMS & set(self._hparams):
            return "rl"
        return "unknown"

    # ------------------------------------------------------------------ scalars

    def add_scalar(
        self,
        tag: str,
        scalar_value: Any,
        global_step: Any = None,
        walltime: Any = None,
        new_style: bool = False,
        double_precision: bool = False,
    ) -> None:
        """One named value at ``global_step`` (gathered with the step's other values)."""
        try:
            if self._closed:
                return
            self._open(tag if isinstance(tag, str) else None)
            step = global_step if global_step is None or isinstance(global_step, int) else _int(global_step)
            name = tag if isinstance(tag, str) else str(tag)
            if self._values and (step != self._step or name in self._values):  # a repeated tag: never overwritten
                self._emit()
            self._step = step
            self._values[name] = scalar_value
        except Exception as exc:  # noqa: BLE001 (never into the training loop)
            self._say("error", f"Karn SummaryWriter could not record {tag!r}: {type(exc).__name__}")

    def add_scalars(
        self, main_tag: str, tag_scalar_dict: Mapping[str, Any], global_step: Any = None, walltime: Any = None
    ) -> None:
        """Several values under ``main_tag/<name>``, as TensorBoard names them."""
        try:
            for k, v in dict(tag_scalar_dict).items():
                self.add_scalar(f"{main_tag}/{k}", v, global_step, walltime)
        except Exception as exc:  # noqa: BLE001
            self._say("error", f"Karn SummaryWriter could not record {main_tag!r}: {type(exc).__name__}")

    def _emit(self) -> None:
        values, self._values = self._values, {}
        if self._run is not None and values:
            self._run.log(values, step=self._step)

    # ------------------------------------------------------------------ hyperparameters, text

    def add_text(self, tag: str, text_string: str, global_step: Any = None, walltime: Any = None) -> None:
        """CleanRL's ``"hyperparameters"`` table (``|param|value|`` rows) becomes the run's
        hyperparameters when written before the first scalar; other text is not recorded."""
        if tag == "hyperparameters" and isinstance(text_string, str) and self._run is None:
            self._hparams.update(_parse_table(text_string))
        else:
            self._say("text", "Karn SummaryWriter: add_text is not recorded (except the hyperparameters table)")

    def add_hparams(
        self,
        hparam_dict: Mapping[str, Any],
        metric_dict: Mapping[str, Any],
        hparam_domain_discrete: Any = None,
        run_name: Any = None,
        global_step: Any = None,
    ) -> None:
        """Hyperparameters (into the context when the run is not open yet) and their metrics."""
        try:
            if self._run is None:
                self._hparams.update(dict(hparam_dict))
            else:
                self._say(
                    "hparams",
                    "Karn SummaryWriter: add_hparams after the first scalar; its hparams are not in the context",
                )
            for k, v in dict(metric_dict).items():
                self.add_scalar(k, v, global_step)
        except Exception as exc:  # noqa: BLE001
            self._say("error", f"Karn SummaryWriter could not record hparams: {type(exc).__name__}")

    def __getattr__(self, name: str) -> Any:
        if name in _NOT_RECORDED:

            def _ignored(*args: Any, **kwargs: Any) -> None:
                self._say(name, f"Karn SummaryWriter: {name} is accepted and not recorded")

            return _ignored
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # ------------------------------------------------------------------ lifecycle

    def get_logdir(self) -> str | None:
        return self.log_dir

    def flush(self) -> None:
        """Record the gathered values of the current step."""
        try:
            self._emit()
        except Exception:  # noqa: BLE001,S110
            pass

    def close(self) -> None:
        """Record what is gathered and finish the Karn run this writer opened (with its summary)."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._own_run and self._run is not None:
            self._run.finish()

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _say(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning(message)


def _int(v: Any) -> int | None:
    try:
        item = v.item() if hasattr(v, "item") else v
        return int(item) if float(item) == int(item) else None
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def _parse_table(text: str) -> dict[str, Any]:
    """``|param|value|`` markdown rows -> {param: value}, values read back as None, bool,
    int or float where they spell one (CleanRL writes ``str(value)``), else kept as text."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0] or set(cells[0]) <= {"-", ":"} or cells == ["param", "value"]:
            continue
        out[cells[0]] = _literal(cells[1])
    return out


def _literal(s: str) -> Any:
    if s == "None":
        return None
    if s in ("True", "False"):
        return s == "True"
    try:
        return int(s)
    except ValueError:
        pass
    try:
        x = float(s)
        return x if math.isfinite(x) or s.lower() in ("nan", "inf", "-inf") else s
    except ValueError:
        return s
