"""The real 2-rank gloo job (127.0.0.1) shared by the tests in this folder: started once per
session with :func:`karn_otel.distributed.launch.spawn`, every scenario of
:func:`tests.distributed._dist_worker.scenario` in one process group."""

from __future__ import annotations

import json

import pytest

from karn_otel.distributed.launch import spawn
from tests.distributed import _dist_worker as w


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory):
    """One 2-rank job running every scenario; returns (SpawnResult, per-rank results, out dir)."""
    out = tmp_path_factory.mktemp("dist")
    result = spawn(w.scenario, 2, (str(out),), num_threads=1, timeout_s=240, grace_s=10)
    assert result.ok, result.describe()
    return result, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], out
