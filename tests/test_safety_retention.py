"""Checkpoint retention deletes only what the trainer wrote (issue 14: the retention policy
used to delete any file named in an emitted HostBaseline)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from karn_otel.reference.trainer import apply_checkpoint_retention  # noqa: E402

NAME = "ep000-" + "0123456789abcdef" * 2 + "-initial.pt"


def test_retention_deletes_only_trainer_named_files_in_the_checkpoint_dir(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    own = ckpts / NAME
    precious = tmp_path / "precious.txt"  # not a checkpoint name
    outside = elsewhere / NAME  # a checkpoint name, outside the run's checkpoint dir
    via_dotdot = ckpts / ".." / ".." / "elsewhere" / ("ep001-" + "f" * 32 + "-initial.pt")
    for p in (own, precious, outside, via_dotdot):
        p.write_bytes(b"x")
    deleted = apply_checkpoint_retention([precious, outside, via_dotdot, own], "delete_after_run", root=ckpts)
    assert deleted == [own]
    assert not own.exists()
    assert precious.exists() and outside.exists() and via_dotdot.exists()


def test_retention_through_a_symlinked_dir_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / NAME).write_bytes(b"x")
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "link").symlink_to(real)
    assert apply_checkpoint_retention([ckpts / "link" / NAME], "delete_after_run", root=ckpts) == []
    assert (real / NAME).exists()


def test_keep_last_keeps_the_last(tmp_path):
    paths = [tmp_path / f"ep{k:03d}-{'a' * 32}-initial.pt" for k in range(3)]
    for p in paths:
        p.write_bytes(b"x")
    assert apply_checkpoint_retention(paths, "keep_last", root=Path(tmp_path)) == paths[:2]
    assert [p.exists() for p in paths] == [False, False, True]
