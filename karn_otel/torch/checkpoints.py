"""Checkpoints the reference trainer writes, and their comparison for exact replay.

:func:`save_checkpoint` is the guarded write: the state is serialized in memory on the
calling thread (a consistent snapshot, and the only part that costs training time), then a
daemon thread writes it to a temporary file and renames it into place. A full, read-only,
deleted or frozen disk costs the caller at most ``timeout_s``: the failure is logged once as a
warning and the function returns False, and training goes on without that checkpoint.
:func:`compare_state_dicts` is what :mod:`karn_otel.replay` imports lazily.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_TIMEOUT_S", "compare_state_dicts", "save_checkpoint"]

log = logging.getLogger("karn")
CHECKPOINT_TIMEOUT_S = 5.0


def save_checkpoint(
    state: Any, path: str | os.PathLike[str], *, timeout_s: float = CHECKPOINT_TIMEOUT_S, mode: int = 0o600
) -> bool:
    """Write ``state`` (e.g. a state dict) with ``torch.save`` to ``path``; True when it is on disk.

    Never raises for a disk fault and never waits longer than ``timeout_s``; a partial file
    is never left under ``path`` (the write goes to ``<path>.tmp`` and is renamed). A write
    still blocked at the bound finishes (or fails) in the background.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)  # on this thread: the snapshot is taken now, not when the disk answers
    data = buf.getbuffer()
    outcome: list[BaseException | None] = []

    def write() -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # private, like the run dir
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with open(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 (reported to the caller, never raised into training)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            outcome.append(exc)

    thread = threading.Thread(target=write, name="karn-checkpoint", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        log.warning(
            "Karn: checkpoint %s not written within %.1f s (the disk is not answering); training goes on without it",
            path,
            timeout_s,
        )
        return False
    exc = outcome[0]
    if exc is not None:
        why = getattr(exc, "strerror", None) or repr(exc)
        log.warning("Karn: could not write checkpoint %s (%s); training goes on without it", path, why)
        return False
    return True


def compare_state_dicts(path_a: str | os.PathLike[str], path_b: str | os.PathLike[str]) -> bool:
    """True when two saved state dicts hold the same keys and bit-identical tensors.

    Both are loaded with ``weights_only=True`` (no code runs from a checkpoint file).
    """
    a = torch.load(path_a, weights_only=True)
    b = torch.load(path_b, weights_only=True)
    return bool(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))
