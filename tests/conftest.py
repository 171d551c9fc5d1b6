from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from karn_otel import collector as kc
from karn_otel.config import KarnConfig
from karn_otel.contracts import EpisodeContext
from karn_otel.sinks import MemorySink
from karn_otel.sinks.runlog_format import read_counter


def canon(x: Any) -> Any:
    """A canonical, type-strict form: NaN equals NaN, -0.0 differs from 0.0, 1 from 1.0."""
    if dataclasses.is_dataclass(x):
        return (type(x).__name__, tuple((f.name, canon(getattr(x, f.name))) for f in dataclasses.fields(x)))
    if isinstance(x, float):
        return ("float", "nan" if math.isnan(x) else x.hex())
    if isinstance(x, enum.Enum):
        return (type(x).__name__, x.value)
    if isinstance(x, bool):
        return ("bool", x)
    if isinstance(x, int):
        return ("int", x)
    if isinstance(x, dict):
        return ("dict", tuple((canon(k), canon(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(canon(v) for v in x))
    if isinstance(x, (str, type(None), Path, datetime)):
        return (type(x).__name__, x)
    raise TypeError(type(x))


def make_context(slots=("early", "mid", "late"), episode_id="ep-1") -> EpisodeContext:
    return EpisodeContext(
        episode_id=episode_id,
        timestamp=datetime(2026, 1, 1, 12, 0, 0),
        git_commit="abc",
        base_seed=0,
        torch_seed=0,
        numpy_seed=0,
        host_architecture="cnn_3block",
        host_params=1000,
        slot_config={s: 8 for s in slots},
        max_epochs=10,
        task_type="classification",
        hyperparameters={"lr": 0.01, "batch_size": 64},
    )


@pytest.fixture
def memory_collector():
    """A strict collector with an in-memory sink and no processors, installed process-wide."""
    sink = MemorySink()
    c = kc.configure(KarnConfig(out_dir=None, console="off", strict=True), sinks=[sink], processors=False)
    c.memory = sink  # type: ignore[attr-defined]
    yield c
    kc.shutdown()


@pytest.fixture(autouse=True)
def _no_leftover_collector():
    yield
    kc.shutdown()


@contextlib.contextmanager
def own_live_counters_removed() -> Iterator[None]:
    """Runs left unclosed on purpose (killed, faulted) keep their live counter in /dev/shm:
    remove the new ones this process owns when the block ends. Only this process's: under
    pytest-xdist another worker may be reading its own killed child's counter right now
    (deleting every new counter failed the SIGKILL and frozen-disk tests whenever
    test_disk.py, test_sigkill.py and test_runlog.py ran side by side). Tests that kill
    children remove their children's counters themselves."""
    shm = Path("/dev/shm")
    before = set(shm.glob("karn-runlog-*")) if shm.is_dir() else set()
    yield
    for p in (set(shm.glob("karn-runlog-*")) if shm.is_dir() else set()) - before:
        reading = read_counter(p.name)
        if reading is not None and reading.pid == os.getpid():
            p.unlink(missing_ok=True)
