"""What Karn creates in a run dir is private by default (0600 files, 0700 dirs), configurable."""

from __future__ import annotations

import stat

import pytest

from karn_otel import collector as kc
from karn_otel.config import KarnConfig
from tests.conftest import make_context


def _modes(root):
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize(("file_mode", "dir_mode"), [(0o600, 0o700), (0o640, 0o750)])
def test_run_dir_modes(tmp_path, file_mode, dir_mode):
    c = kc.configure(
        KarnConfig(out_dir=tmp_path, console="off", run_id="modes", file_mode=file_mode, dir_mode=dir_mode),
        processors=False,
    )
    c.emit(make_context())
    kc.shutdown()
    modes = _modes(tmp_path / "modes")
    assert modes, "nothing written"
    for rel, mode in modes.items():
        is_dir = (tmp_path / "modes" / rel).is_dir() if rel != "." else True
        assert mode == (dir_mode if is_dir else file_mode), (rel, oct(mode))
    assert "episodes/ep-1/context.json" in modes and "events.jsonl" in modes


def test_checkpoints_are_private(tmp_path):
    torch = pytest.importorskip("torch")
    from karn_otel.torch.checkpoints import save_checkpoint

    path = tmp_path / "run" / "checkpoints" / "ep000-x-initial.pt"
    assert save_checkpoint({"w": torch.zeros(2)}, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
