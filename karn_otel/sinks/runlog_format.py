"""The run log's on-disk framing: checksummed blocks of JSON lines, and a streaming reader.

``events.jsonl`` stays one JSON envelope per line (jq and DuckDB read it as before). The
writer writes events in *blocks* of at most a few dozen lines; the last line of every block
carries one extra key, the block's frame::

    {...envelope...,"$block":{"seq":1200,"n":64,"crc32":"9a3b10ff"}}

``seq`` is the sequence number of the block's first event (the run log numbers every event
it is handed, so a gap between blocks is events lost on the way: counted drops), ``n`` the
number of lines in the block, ``crc32`` the CRC-32 of the block's bytes as they would be
without the frame (the ``n`` lines, each ending in ``\\n``, the last one ending ``}\\n``).

Why per block and not per line: the CRC of a 40 KB block is one C call that releases the
GIL, so framing costs the training thread nothing; a per-line frame costs about 2 us per
event in the writer (more than encoding it). A damaged block loses at most its own lines.

The reader (:func:`scan`) streams the file line by line with a bounded line length, holds at
most one block, and reports every line it cannot vouch for: a block whose checksum fails,
lines no frame covers (a write torn by a killed process), an over-long line (skipped without
being held in memory). Logs written before framing (no ``framing`` key in ``run.json``) are
read line by line, unverified, as before.

The *live counter* is a 64-byte file in ``/dev/shm`` that the training thread updates on
every event (one memory store): how many events the run log was handed, and what it
dropped. It survives a killed process (not a reboot), so ``karn inspect`` can tell exactly
how many events never reached the disk. A clean close records the same figures in
``run.json`` (``closed``) and removes the counter.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

FRAMING = "crc32-blocks-v1"
FRAME_KEY = b',"$block":'
# The frame is the end of the block's last line; nothing a Karn envelope ends with can look
# like it (an envelope ends with its schema_version).
_FRAME_RE = re.compile(rb',"\$block":\{"seq":(\d{1,19}),"n":(\d{1,9}),"crc32":"([0-9a-f]{8})"\}\}\r?\n?\Z')
_FRAME_FMT = b',"$block":{"seq":%d,"n":%d,"crc32":"%08x"}}\n'
FRAME_TAIL_MAX = 96  # bytes at the end of a line that can hold a frame

DEFAULT_MAX_RECORD_BYTES = 64 * 1024 * 1024  # a longer line is skipped, never held in memory
MAX_BLOCK_LINES = 4096  # the writer writes <= 64; more lines pending without a frame are orphans


def frame(seq: int, n: int, crc: int) -> bytes:
    """The bytes replacing a block's final ``}\\n``."""
    return _FRAME_FMT % (seq, n, crc)


_CRC_PIECE = 5120  # zlib.crc32 releases the GIL above 5 KiB: a busy training thread would then
# take it and the writer wait a whole switch interval (5 ms) to get it back, per block.


def crc32(buf: bytes | bytearray | memoryview) -> int:
    """CRC-32 of ``buf``, computed in pieces that keep the GIL (see ``_CRC_PIECE``)."""
    if len(buf) <= _CRC_PIECE:
        return zlib.crc32(buf)
    view = memoryview(buf)
    crc = 0
    for i in range(0, len(view), _CRC_PIECE):
        crc = zlib.crc32(view[i : i + _CRC_PIECE], crc)
    return crc


def frame_block(buf: bytes, seq: int, n: int) -> list[bytes | memoryview]:
    """``buf`` (``n`` JSON lines, the last ending in ``}\\n``) as writev parts with its frame."""
    return [memoryview(buf)[:-2], frame(seq, n, crc32(buf))]


# ---------------------------------------------------------------------- reading


@dataclass
class BadSpan:
    """Lines the reader could not vouch for: ``first_line``..``last_line`` (1-based)."""

    first_line: int
    last_line: int
    why: str
    records: int  # lines (records) in the span
    nbytes: int


@dataclass
class Integrity:
    """What a scan of ``events.jsonl`` found, beside the good records it yielded."""

    framed: bool = False
    records: int = 0  # good (verified, or legacy) lines yielded
    blocks: int = 0
    bad: list[BadSpan] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)  # (first missing seq, how many)
    seq_end: int | None = None  # seq after the last good block (the next one the writer would use)
    good_bytes: int = 0  # offset just after the last good block (repair truncates here)
    first_bad_offset: int | None = None  # offset of the first line not part of a good block
    size: int = 0  # bytes scanned
    last_timestamp: float | None = None

    @property
    def unreadable(self) -> int:
        return sum(b.records for b in self.bad)


@dataclass
class _Line:
    no: int
    offset: int
    data: bytes


class _Reader:
    """Lines of a binary file, each at most ``limit`` bytes (longer ones skipped in chunks)."""

    def __init__(self, f: BinaryIO, limit: int) -> None:
        self.f = f
        self.limit = limit
        self.offset = 0
        self.no = 0

    def __iter__(self) -> Iterator[tuple[int, int, bytes | None, int]]:
        """(line number, offset, line or None when over-long, length in bytes)."""
        f, limit = self.f, self.limit
        chunk = min(_CHUNK, limit + 1)
        while True:
            line: bytes | bytearray = f.readline(chunk)
            if not line:
                return
            self.no += 1
            start = self.offset
            n = len(line)
            if n == chunk and not line.endswith(b"\n"):
                # A long line: grown in place (no joined copy), abandoned once over the limit.
                buf: bytearray | None = bytearray(line)
                while True:
                    part = f.readline(_CHUNK)
                    n += len(part)
                    if buf is not None:
                        if n > limit:
                            buf = None  # over the limit: skip the rest without holding it
                        else:
                            buf += part
                    if not part or part.endswith(b"\n"):
                        break
                self.offset += n
                if buf is None:
                    yield self.no, start, None, n
                    continue
                line = buf
            else:
                self.offset += n
            yield self.no, start, line, n  # type: ignore[misc]


_CHUNK = 1 << 20


def scan(
    path: Path | str,
    *,
    framed: bool = True,
    framed_from: int = 0,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    integrity: Integrity | None = None,
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line number, line)`` for every record of ``path`` that can be trusted.

    ``framed``: the log declares framing (``run.json``); bytes before ``framed_from`` are an
    older, unframed part, yielded line by line. Everything else is reported in
    ``integrity`` (filled in as the scan goes, complete when the iterator is exhausted).
    Memory: one block of lines (the writer's blocks are <= 64 lines) and one line of at most
    ``max_record_bytes``.
    """
    info = integrity if integrity is not None else Integrity()
    info.framed = framed
    pending: list[_Line] = []
    expected_seq: int | None = None

    def orphan(lines: list[_Line], why: str) -> None:
        if not lines:
            return
        if info.first_bad_offset is None:
            info.first_bad_offset = lines[0].offset
        info.bad.append(BadSpan(lines[0].no, lines[-1].no, why, len(lines), sum(len(x.data) for x in lines)))

    with open(path, "rb") as f:
        reader = _Reader(f, max_record_bytes)
        for no, offset, line, length in reader:
            info.size = offset + length
            if line is None:
                orphan(pending, "block cut by an over-long line")
                pending = []
                if info.first_bad_offset is None:
                    info.first_bad_offset = offset
                info.bad.append(
                    BadSpan(
                        no,
                        no,
                        f"record of {length:,} bytes exceeds the reader's limit of {max_record_bytes:,}",
                        1,
                        length,
                    )
                )
                continue
            if not line.strip():
                continue
            if not framed or offset < framed_from:
                if not line.endswith(b"\n"):
                    if info.first_bad_offset is None:
                        info.first_bad_offset = offset
                    info.bad.append(BadSpan(no, no, "torn last line (process killed mid-write?)", 1, length))
                    continue
                info.records += 1
                info.good_bytes = offset + length
                yield no, line
                continue
            m = _FRAME_RE.search(line, max(0, len(line) - FRAME_TAIL_MAX)) if line.endswith(b"}\n") else None
            if m is None:
                pending.append(_Line(no, offset, line))
                if len(pending) > MAX_BLOCK_LINES:
                    orphan(pending[:1], "not covered by any block checksum")
                    del pending[0]
                continue
            seq, n, crc = int(m.group(1)), int(m.group(2)), int(m.group(3), 16)
            last = _Line(no, offset, line[: m.start()] + b"}\n")
            block = [*pending[-(n - 1) :], last] if n > 1 else [last]
            before = pending[: len(pending) - (n - 1)] if n > 1 else pending
            if n < 1 or len(block) != n:
                orphan(
                    pending + [_Line(no, offset, line)],
                    f"block frame at line {no} names {n} lines, only {len(block)} found",
                )
                pending = []
                continue
            got = 0
            for x in block:
                got = zlib.crc32(x.data, got)
            if got != crc:
                orphan(before, "torn write (not covered by any block checksum)")
                orphan(
                    [*block[:-1], _Line(no, offset, line)],
                    f"checksum mismatch in the block of seq {seq}..{seq + n - 1}",
                )
                pending = []
                continue
            orphan(before, "torn write (not covered by any block checksum)")
            pending = []
            if expected_seq is not None and seq > expected_seq:
                info.gaps.append((expected_seq, seq - expected_seq))
            expected_seq = seq + n if expected_seq is None else max(expected_seq, seq + n)
            info.seq_end = expected_seq
            info.blocks += 1
            info.records += n
            info.good_bytes = offset + length
            for x in block:
                yield x.no, x.data
    if pending:
        tail_torn = not pending[-1].data.endswith(b"\n")
        why = (
            "torn last line (process killed mid-write?)"
            if tail_torn and len(pending) == 1
            else "torn last block: lines no checksum covers (process killed mid-write, or still being written)"
        )
        orphan(pending, why)


# ---------------------------------------------------------------------- repair


@dataclass
class Repair:
    """What repair-on-open cut from the end of a log."""

    truncated_at: int
    dropped_bytes: int
    dropped_lines: int
    saved_to: Path | None

    def describe(self) -> str:
        where = f"; the cut bytes are in {self.saved_to.name}" if self.saved_to is not None else ""
        return (
            f"repaired events.jsonl: truncated at byte {self.truncated_at:,} (the first record that failed its check), "
            f"dropping {self.dropped_bytes:,} bytes ({self.dropped_lines} line(s)){where}"
        )


def repair(path: Path, info: Integrity) -> Repair | None:
    """Truncate ``path`` at its first bad record (as found by a complete :func:`scan`).

    The cut bytes are first copied (streamed) to ``events.jsonl.damaged-<offset>`` beside it,
    so nothing is destroyed; returns None when there was nothing to cut.
    """
    cut = info.first_bad_offset
    if cut is None or cut >= info.size:
        return None
    saved: Path | None = path.with_name(f"{path.name}.damaged-{cut}")
    lines, last = 0, b"\n"
    try:
        with open(path, "rb") as src, open(saved, "wb") as dst:  # type: ignore[arg-type]
            src.seek(cut)
            while chunk := src.read(1 << 20):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
                dst.write(chunk)
    except OSError:
        saved = None
    size = info.size
    with open(path, "r+b") as f:
        f.truncate(cut)
    return Repair(cut, size - cut, lines + (last != b"\n"), saved)


def reseal(path: Path | str) -> int:
    """Recompute every block frame of ``path`` over the lines as they are now; returns the
    number of blocks resealed.

    For deliberate edits (a test that changes a recorded value to check that ``karn replay``
    names it): without it the edited block fails its checksum and is skipped as corrupt.
    Lines before a frame that the frame's ``n`` does not cover are left as they are.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".reseal")
    pending: list[bytes] = []
    blocks = 0
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for line in src:
            m = _FRAME_RE.search(line, max(0, len(line) - FRAME_TAIL_MAX)) if line.endswith(b"}\n") else None
            if m is None:
                pending.append(line)
                continue
            seq, n = int(m.group(1)), int(m.group(2))
            last = line[: m.start()] + b"}\n"
            body = [*pending[len(pending) - (n - 1) :], last] if n > 1 else [last]
            dst.writelines(pending[: len(pending) - len(body) + 1])
            crc = 0
            for x in body:
                crc = zlib.crc32(x, crc)
            dst.writelines(body[:-1])
            dst.write(last[:-2] + frame(seq, n, crc))
            pending = []
            blocks += 1
        dst.writelines(pending)
    os.replace(tmp, path)
    return blocks


# ---------------------------------------------------------------------- live counter

_SHM = Path("/dev/shm")
_COUNTER_NAME = re.compile(r"karn-runlog-[0-9a-f]{16}")
COUNTER_MAGIC = 0x314E55524E52414B  # b"KARNRUN1" little-endian
# slots of the counter (uint64 each)
C_MAGIC, C_HANDLED, C_REFUSED, C_WRITER_DROPPED, C_WRITTEN, C_PID, C_CLOSED = range(7)
_SLOTS = 8


class LiveCounter:
    """The run log's counts in shared memory (see the module docstring).

    ``slots`` is a writable ``memoryview`` of uint64; without ``/dev/shm`` it is plain memory
    (same code path, nothing survives the process).
    """

    def __init__(self) -> None:
        self.name: str | None = None
        self._mm: mmap.mmap | None = None
        buf: bytearray | mmap.mmap = bytearray(8 * _SLOTS)
        try:
            if _SHM.is_dir():
                name = f"karn-runlog-{secrets.token_hex(8)}"
                fd = os.open(_SHM / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.ftruncate(fd, 8 * _SLOTS)
                    self._mm = mmap.mmap(fd, 8 * _SLOTS)
                finally:
                    os.close(fd)
                buf, self.name = self._mm, name
        except OSError:
            self.name, self._mm = None, None
        self.slots = memoryview(buf).cast("Q")
        self.slots[C_MAGIC] = COUNTER_MAGIC
        self.slots[C_PID] = os.getpid()

    def remove(self) -> None:
        """After a clean close (the figures are in run.json): delete the shared-memory file."""
        if self.name is not None:
            try:
                os.unlink(_SHM / self.name)
            except OSError:
                pass
            self.name = None


@dataclass(frozen=True)
class CounterReading:
    handled: int
    refused: int
    writer_dropped: int
    written: int
    pid: int
    closed: bool


def read_counter(name: object) -> CounterReading | None:
    """Read a live counter named in an (untrusted) run.json; None when absent or not one."""
    if not isinstance(name, str) or not _COUNTER_NAME.fullmatch(name):
        return None
    try:
        data = (_SHM / name).read_bytes()[: 8 * _SLOTS]
    except OSError:
        return None
    if len(data) != 8 * _SLOTS:
        return None
    s = memoryview(data).cast("Q")
    if s[C_MAGIC] != COUNTER_MAGIC:
        return None
    return CounterReading(s[C_HANDLED], s[C_REFUSED], s[C_WRITER_DROPPED], s[C_WRITTEN], s[C_PID], bool(s[C_CLOSED]))


__all__ = [
    "DEFAULT_MAX_RECORD_BYTES",
    "FRAMING",
    "BadSpan",
    "CounterReading",
    "Integrity",
    "LiveCounter",
    "Repair",
    "crc32",
    "frame",
    "frame_block",
    "read_counter",
    "repair",
    "reseal",
    "scan",
]
