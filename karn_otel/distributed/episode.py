"""One episode id per DDP job: rank 0 chooses it, every rank uses it.

The episode id is the trace id (:func:`karn_otel.sinks.otel.trace_id_for_episode`), so ranks
that share it share one trace per episode: each rank's ``karn.episode`` and ``karn.epoch``
spans under it, told apart by their resource (``service.instance.id`` = ``<run>-rank<k>``,
``karn.rank``). Every rank must call :func:`shared_episode_id` at the same point (it is a
collective when the group spans more than one rank). No torch import unless a collective
is taken.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from karn_otel.ranks import dist_for

__all__ = ["shared_episode_id"]


def shared_episode_id(group: Any = None) -> str:
    """A fresh ``uuid4().hex``, rank 0's on every rank of ``group`` (one all_gather of 16 bytes)."""
    mine = uuid.uuid4().hex
    if dist_for(group) is None:
        return mine
    from karn_otel.torch import collectives

    row = np.frombuffer(bytes.fromhex(mine), dtype=np.uint8).astype(np.int64)
    rows = collectives.all_gather_rows(row, "int64", group)
    return bytes(rows[0].astype(np.uint8).tolist()).hex()
