"""karn_otel.distributed.launch: SpawnResult, argument checks and real 2-rank jobs (gloo,
127.0.0.1); and the package's promise that importing it does not import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from karn_otel.distributed.launch import SpawnResult, spawn
from tests.distributed import _dist_worker as w

# =========================================================================== no processes


def test_spawn_result_describes_the_first_failure_first():
    r = SpawnResult((-15, 1), 1, {1: "Traceback...\nRuntimeError: boom\n"})
    assert not r.ok
    assert r.describe().splitlines() == [
        "rank 1 exited with code 1 (first failure): RuntimeError: boom",
        "rank 0 exited with code -15",
    ]
    assert SpawnResult((0, 0), None, {}).ok and SpawnResult((0, 0), None, {}).describe() == ""


def test_spawn_rejects_bad_arguments():
    with pytest.raises(ValueError):
        spawn(w.scenario, 0)


# =========================================================================== real 2-rank jobs


def test_spawn_runs_every_rank_with_its_identity(two_ranks):
    result, ranks, _ = two_ranks
    assert result.exit_codes == (0, 0) and result.first_failure is None
    assert [r["info"] for r in ranks] == [{"rank": k, "world_size": 2, "local_rank": k} for k in range(2)]


def test_a_job_past_its_timeout_is_terminated():
    result = spawn(w.sleeps, 2, timeout_s=2.0, grace_s=1.0)
    assert result.timed_out and result.first_failure is None and not result.ok
    assert all(code < 0 for code in result.exit_codes)
    assert result.describe().endswith("the job exceeded its timeout and was terminated")


# =========================================================================== import boundary


@pytest.mark.parametrize(
    "module",
    [
        "karn_otel.distributed",
        "karn_otel.distributed.reduction",
        "karn_otel.distributed.evaluation",
        "karn_otel.distributed.liveness",
        "karn_otel.distributed.launch",
    ],
)
def test_importing_the_package_imports_neither_torch_nor_opentelemetry(module):
    # Heartbeats, sharding and single-process reductions are used from metrics callbacks and
    # the CLI: keep them cheap. torch arrives with karn_otel.torch.collectives, on first use.
    code = (
        "import sys, importlib\n"
        f"m = importlib.import_module({module!r})\n"
        "assert all(hasattr(m, n) for n in m.__all__)\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'opentelemetry'})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""


def test_the_package_re_exports_every_public_name_of_its_modules():
    import karn_otel.distributed as d
    from karn_otel import ranks
    from karn_otel.distributed import evaluation, launch, liveness, reduction

    for mod in (evaluation, launch, liveness, reduction):
        for name in mod.__all__:
            assert getattr(d, name) is getattr(mod, name), (mod.__name__, name)
    assert d.discover is ranks.discover and d.RankInfo is ranks.RankInfo
