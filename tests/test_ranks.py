"""karn_otel.ranks: rank discovery from the process group or the launcher's environment, and
its promise to stay light (the collector imports it when it is built)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from karn_otel.ranks import RankInfo, discover


def test_discover_defaults_to_a_single_process():
    assert discover({}) == RankInfo(0, 1, 0)


def test_discover_reads_the_launcher_environment():
    info = discover({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.is_main, info.is_distributed) == (3, 4, 1, False, True)


@pytest.mark.parametrize(
    "env, match",
    [
        ({"RANK": "x"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is outside world_size 2"),
        ({"WORLD_SIZE": "0"}, "world_size must be >= 1"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "outside world_size"),
        ({"LOCAL_RANK": "5", "WORLD_SIZE": "2"}, "local_rank 5"),
    ],
)
def test_discover_rejects_bad_environments_clearly(env, match):
    with pytest.raises(ValueError, match=match):
        discover(env)


def test_rank_info_accepts_numpy_integers_but_not_bools_or_floats():
    assert RankInfo(np.int64(1), np.int32(2)).rank == 1
    for bad in (True, 1.0, "1"):
        with pytest.raises(ValueError, match="must be an int"):
            RankInfo(bad, 2)  # type: ignore[arg-type]


def test_importing_ranks_imports_neither_torch_numpy_nor_opentelemetry():
    code = (
        "import sys, karn_otel.ranks as r\n"
        "assert all(hasattr(r, n) for n in r.__all__)\n"
        "assert r.discover({}) == r.RankInfo(0, 1)\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'opentelemetry'})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""
