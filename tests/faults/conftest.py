"""Fixtures that make real disk faults: a small tmpfs (full, or remounted read-only) and a
loop-mounted ext4 that can be frozen. They need root (mount, fsfreeze) and skip with the
reason otherwise; every mount is undone, a frozen filesystem thawed, whatever the test does."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import own_live_counters_removed


@pytest.fixture(autouse=True)
def _no_live_counters_left() -> Iterator[None]:
    with own_live_counters_removed():
        yield


def _sh(*cmd: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _need_root(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mount)")
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (fills up quickly)."""
    _need_root("mount", "umount")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = _sh("mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt))
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if _sh("umount", str(mnt)).returncode != 0:
            _sh("umount", "-l", str(mnt))  # a daemon writer thread may still hold a file open


class Freezable:
    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self.frozen = False
        self._watchdog: subprocess.Popen[bytes] | None = None

    def freeze(self, safety_s: float = 30.0) -> None:
        r = _sh("fsfreeze", "-f", str(self.mnt))
        if r.returncode != 0:
            pytest.skip(f"fsfreeze failed: {r.stderr.strip()}")
        self.frozen = True
        # Never leave it frozen, even if this process dies: a detached watchdog thaws it.
        self._watchdog = subprocess.Popen(
            ["sh", "-c", f"sleep {safety_s:g}; fsfreeze -u '{self.mnt}'"],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def make_read_only(self) -> None:
        """What a failing disk does to ext4 mounted errors=remount-ro: an error, and from then
        on every write fails with EROFS (a plain remount refuses while files are open)."""
        dev = Path(_sh("findmnt", "-n", "-o", "SOURCE", str(self.mnt)).stdout.strip()).name
        knob = Path("/sys/fs/ext4", dev, "trigger_fs_error")
        if not knob.exists():
            pytest.skip(f"no {knob} (kernel without ext4 error injection)")
        knob.write_text("karn fault test")
        deadline = time.monotonic() + 5
        while not {"ro", "emergency_ro"} & set(
            _sh("findmnt", "-n", "-o", "OPTIONS", str(self.mnt)).stdout.strip().split(",")
        ):
            if time.monotonic() > deadline:
                pytest.skip("the filesystem did not turn read-only")
            time.sleep(0.01)

    def thaw(self) -> None:
        if self.frozen:
            _sh("fsfreeze", "-u", str(self.mnt))
            self.frozen = False
        if self._watchdog is not None and self._watchdog.poll() is None:
            os.killpg(self._watchdog.pid, signal.SIGKILL)  # its own session: the sh and its sleep
            self._watchdog.wait(5)


@pytest.fixture
def ext4_fs(tmp_path: Path) -> Iterator[Freezable]:
    """A 16 MiB ext4 image, loop-mounted with errors=remount-ro (tmpfs cannot be frozen)."""
    _need_root("mount", "umount", "mkfs.ext4", "fsfreeze")
    img, mnt = tmp_path / "fs.img", tmp_path / "fmnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    if _sh("mkfs.ext4", "-q", "-F", str(img)).returncode != 0:
        pytest.skip("mkfs.ext4 failed")
    r = _sh("mount", "-o", "loop,errors=remount-ro", str(img), str(mnt))
    if r.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 image: {r.stderr.strip()}")
    fs = Freezable(mnt)
    try:
        yield fs
    finally:
        fs.thaw()
        if _sh("umount", str(mnt)).returncode != 0:
            _sh("umount", "-l", str(mnt))
