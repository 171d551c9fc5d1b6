"""The run log: the run directory on disk, the source of truth for everything after a run.

Layout of ``<out>/<run_id>/``::

    run.json                          run id, schema version, creation time, framing; at a
                                      clean close also ``closed``: the final accounting of
                                      every sink (written last, atomically)
    events.jsonl                      one TelemetryEvent envelope per line, append-only, in
                                      checksummed blocks (karn_otel.sinks.runlog_format)
    episodes/<episode_id>/context.json  each episode's EpisodeContext (a run may hold several)
    checkpoints/                      initial host checkpoints (written, and pruned by its
                                      checkpoint_retention, by the trainer)

``RunLogSink.handle`` appends to a bounded in-memory queue and bumps the live counter; every
64th event it encodes the 64 as one batch (one call into the C encoder of
:mod:`karn_otel.codec`, about 2 us per event) and hands the bytes to a writer thread, which
frames each batch as a block (sequence number, line count, CRC-32) and writes them with one
writev call: the training thread never waits on the disk. Why the training thread encodes:
under the GIL a writer thread's encoding runs in turn with training anyway, and handing it
the event objects costs more than the encoding (the queued objects survive garbage
collections into the old generation, and are read and freed on another core: an A/B by
benchmarks/bench_emit.py measured 23.8 against 21.9 us of process CPU per 20-scalar step, and
62,591 of 480k events dropped against none with the producer releasing the GIL); what is left to the writer (CRC, framing,
the write) holds the GIL for well under a microsecond per event. Events still waiting in a
partial batch are taken, and encoded, by the writer itself when it wakes on its timer, on a
flush, or when the queue is full. The writer wakes when ``wake_batch`` events are queued and
at least every ``flush_interval_s`` (default 0.1 s): a killed process loses at most the
events of that last interval, and ``karn inspect`` counts them from the sequence numbers and
the live counter.

Faults: a full queue drops and counts (or, with ``backpressure="block"``, makes ``handle``
wait up to ``block_timeout_s`` first); a failing disk (ENOSPC, EROFS) drops and counts,
and the file is cut back to its last whole block; a deleted run directory is detected and
reported; a disk that stops answering (a frozen filesystem) stalls only the writer thread:
``flush`` stops waiting for it after ``stall_timeout_s`` and ``close`` returns within
``shutdown_timeout_s``, counting what it could not write. Opening an existing log repairs
it first (truncates at the first bad record, keeping the cut bytes beside it, and says so).
"""

from __future__ import annotations

import json
import logging
import operator
import os
import re
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from karn_otel.codec import (
    ContractDecodeError,
    encode_event,
    encode_lines,
    event_from_json,
    from_json,
    id_problem,
    to_json,
)
from karn_otel.contracts import (
    SCHEMA_VERSION,
    EpisodeContext,
    TelemetryEvent,
    TelemetryEventType,
)
from karn_otel.sinks.runlog_format import (
    C_CLOSED,
    C_HANDLED,
    C_REFUSED,
    C_WRITER_DROPPED,
    C_WRITTEN,
    DEFAULT_MAX_RECORD_BYTES,
    FRAMING,
    CounterReading,
    Integrity,
    LiveCounter,
    Repair,
    crc32,
    frame,
    read_counter,
    repair,
    scan,
)

log = logging.getLogger("karn")
EVENTS_FILE = "events.jsonl"
RUN_FILE = "run.json"
_BATCH = 64  # events per block: one C encode call and one CRC (about 45 KB of 20-scalar steps)
# Frame blocks for up to this long per write call: just under the interpreter's switch
# interval. A training thread holding the GIL takes it back after one switch interval
# anyway, so the writer's share is its turn over (turn + interval): ending the turn early with
# the writev (which hands the GIL over) only shortens its share.
_BUDGET_S = max(0.001, sys.getswitchinterval() - 0.0003)
_MAX_PER_WRITE = 16_384  # events per write call at most (bounds the writer's memory)
_MAX_BLOCK_BYTES = 4 << 20  # a bigger batch is split (blocks stay small enough to verify)
_SIDE_FILE_TYPES = frozenset({TelemetryEventType.EPISODE_STARTED})
_event_type_of = operator.attrgetter("event_type")
_EPISODE_ENDED = TelemetryEventType.EPISODE_ENDED  # a module global: cheaper than the enum lookup per event
_IOV_MAX = 1000
# An encoded batch waiting for the writer: (blocks as (bytes, lines, events accounted for),
# events, the refused count when it was queued, the events needing side files or None).
_Chunk = tuple[list[tuple[bytes, int, int]], int, int, "list[TelemetryEvent] | None"]

if (C_HANDLED, C_REFUSED) != (1, 2):  # handle() stores into these slots by number (speed)
    raise ImportError("runlog_format's counter layout changed; update RunLogSink.handle")

DEFAULT_FLUSH_INTERVAL_S = 0.1
_WAKE_PERIOD = 0.75  # of flush_interval_s: the writer's timer while events are pending (see _run)
DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0


class RunLogSink:
    """Writes events to ``<out_dir>/<run_id>/events.jsonl`` from a background thread.

    ``flush_interval_s``: the writer writes what is queued at least this often (the most a
    killed process loses). ``backpressure``: ``"drop"`` (default) drops and counts when the
    queue holds ``max_queue`` events; ``"block"`` makes ``handle`` wait up to
    ``block_timeout_s`` for room first (then drops and counts, and stops waiting until the
    writer catches up). ``stall_timeout_s``: how long ``flush`` waits on a disk call that
    does not return before giving up on it. ``shutdown_timeout_s``: the bound on ``close``.
    ``max_record_bytes``: an event that encodes longer is dropped and counted (``too_large``;
    the reader would skip it).
    """

    final_sink = True  # the pipeline closes it after every other sink, with their final counts

    def __init__(
        self,
        out_dir: Path,
        run_id: str,
        max_queue: int = 100_000,
        wake_batch: int = 512,
        run_dir: Path | None = None,
        *,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        backpressure: Literal["drop", "block"] = "drop",
        block_timeout_s: float = 0.1,
        stall_timeout_s: float = 0.25,
        shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        file_mode: int = 0o600,
        dir_mode: int = 0o700,
    ) -> None:
        if not flush_interval_s > 0:
            raise ValueError(f"flush_interval_s must be > 0, got {flush_interval_s!r}")
        if backpressure not in ("drop", "block"):
            raise ValueError(f"backpressure must be 'drop' or 'block', got {backpressure!r}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue!r}")
        self.run_id = run_id
        self.run_dir = Path(run_dir) if run_dir is not None else Path(out_dir) / run_id
        self.flush_interval_s = flush_interval_s
        self.backpressure = backpressure
        self.block_timeout_s = block_timeout_s if backpressure == "block" else 0.0
        self.stall_timeout_s = stall_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.max_record_bytes = max_record_bytes
        self.file_mode, self.dir_mode = file_mode, dir_mode
        self.repaired: Repair | None = None
        # Events handled and not yet encoded (at most one batch: see handle), and the encoded
        # batches waiting for the writer. Both are counted against max_queue.
        self._pending: list[TelemetryEvent] = []
        self._q: deque[_Chunk] = deque()
        self._enc_lock = threading.Lock()  # one encoder at a time: blocks stay in handle order
        self._drop_lock = threading.Lock()  # writer drops are counted from both threads
        self._max_queue = max_queue
        self._wake_batch = wake_batch
        self._hand_at = max(1, min(_BATCH, wake_batch))
        self._encoded = 0  # events moved from _pending into _q (encoded, or dropped encoding)
        self._taken = 0  # events the writer has taken out of _q
        self._room_wanted = False  # a blocked handle waits for room: the writer takes _pending too
        self._timed_out = False  # the writer woke on its timer (then it takes _pending too)
        self._wake = threading.Event()
        # The writer sleeps without a timer while nothing is pending or queued; the next
        # handle() wakes it (once), and its timer runs again from that event on.
        self._idle = False
        self._next_file_check = 0.0  # monotonic time of the next deleted-file check
        self._cv = threading.Condition()
        self._dropped: Counter[str] = Counter()
        self._handled = 0  # events handed to handle() before close: enqueued + refused
        self._refused = 0  # handle-side drops (queue full)
        self._refused_seen = 0  # ... already turned into a sequence gap by the writer
        self._saturated = False  # "block" mode gave up waiting; drop at once until there is room
        self._written = 0  # events the writer has finished with (written or dropped)
        self._records = 0  # events written (on disk, as far as write(2) knows)
        self._writer_dropped = 0
        self._sync_target = 0  # fsync requested once _written reaches this (flush)
        self._synced = 0  # the flush watermark: written (or dropped) and fsynced
        self._seq = 0  # sequence number of the next event the writer takes
        self._io_since = 0.0  # monotonic time a disk call began (0: none in progress)
        self._good_size = 0  # bytes of events.jsonl that hold whole blocks
        self._cut_failed = False  # a failed write left a partial line we could not truncate
        self._deleted = False
        self._stalled_reported = False
        self._closing = False
        self._closed = False
        self._final: dict[str, Any] | None = None  # the final accounting, handed over by close
        self._final_done = threading.Event()
        self._stop = False
        self._abandoned = False  # close() gave up on a writer stuck in a disk call
        self._fd = -1
        self._meta: dict[str, Any] = {}
        self.counter = LiveCounter()
        self._ctr = self.counter.slots
        try:
            self._open()
        except (OSError, ValueError) as exc:  # read-only, full or unreadable at start: training goes on, all counted
            self._fd = -1
            self.counter.remove()  # nothing on disk to account for
            log.warning(
                "Karn run log: cannot write %s (%s); events are dropped and counted",
                self.run_dir,
                getattr(exc, "strerror", None) or exc,
            )
        self._thread = threading.Thread(target=self._run, name="karn-runlog", daemon=True)
        self._thread.start()

    # -- opening (and repairing) -------------------------------------------------------

    def _open(self) -> None:
        self.run_dir.mkdir(mode=self.dir_mode, parents=True, exist_ok=True)
        events = self.run_dir / EVENTS_FILE
        previous = _read_meta(self.run_dir / RUN_FILE)
        framed_from = 0
        if events.is_file() and events.stat().st_size > 0:
            framed = previous.get("framing") == FRAMING
            framed_from = _int(previous.get("framed_from")) if framed else events.stat().st_size
            info = Integrity()
            for _ in scan(
                events, framed=framed, framed_from=framed_from, max_record_bytes=self.max_record_bytes, integrity=info
            ):
                pass
            self.repaired = repair(events, info)
            if self.repaired is not None:
                log.warning("Karn run log: %s", self.repaired.describe())
            # Continue the numbering after what the previous writer was handed: its lost
            # tail shows as a gap.
            before = read_counter(previous.get("live_counter"))
            closed = previous.get("closed")
            if not isinstance(closed, dict):
                closed = {}
            self._seq = max(
                info.seq_end or 0,
                before.handled if before is not None else 0,
                _int(closed.get("emitted")),
            )
        self._meta = {
            "run_id": self.run_id,
            "schema_version": SCHEMA_VERSION,
            "created": previous.get("created") if isinstance(previous.get("created"), str) else _now(),
            "framing": FRAMING,
            "framed_from": framed_from,
            "flush_interval_s": self.flush_interval_s,
            "live_counter": self.counter.name,
        }
        if previous:
            self._meta["reopened"] = _now()
        _write_json_atomic(self.run_dir / RUN_FILE, self._meta, self.file_mode)
        self._fd = os.open(events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.file_mode)
        self._good_size = os.fstat(self._fd).st_size

    # -- training thread -------------------------------------------------------------

    def handle(self, event: TelemetryEvent) -> None:
        n = self._handled + 1  # counted before the append: an interrupted handle over-reports
        if n - self._refused - self._taken > self._max_queue and not self._room():
            self._refused += 1
            self._handled = n
            ctr = self._ctr
            ctr[2] = self._refused  # C_REFUSED
            ctr[1] = n  # C_HANDLED
            self._dropped["queue_full"] += 1
            return
        self._handled = n
        self._ctr[1] = n  # C_HANDLED: one store into shared memory, the whole cost of durability
        p = self._pending
        p.append(event)
        if self._idle:  # the writer sleeps untimed: start its loss-bound timer
            self._idle = False
            self._wake.set()
        if len(p) >= self._hand_at or event.event_type is _EPISODE_ENDED:
            self._hand_over(event.event_type is _EPISODE_ENDED)

    def _hand_over(self, wake: bool = False) -> None:
        """Encode what is pending as one batch and queue it for the writer (any thread)."""
        with self._enc_lock:
            self._take_pending()
        if (wake or self._encoded - self._taken >= self._wake_batch) and not self._wake.is_set():
            self._wake.set()

    def _take_pending(self) -> None:
        """Move the pending events into the writer's queue, encoded. Under ``_enc_lock``."""
        p = self._pending
        n = len(p)
        if not n:
            return
        batch = p[:n]
        del p[:n]  # not a swap: the training thread may append meanwhile (the writer calls this too)
        side = None
        if not _SIDE_FILE_TYPES.isdisjoint(map(_event_type_of, batch)):  # the common case, a C loop
            side = [e for e in batch if e.event_type in _SIDE_FILE_TYPES]
        blocks = self._encode(batch)
        self._q.append((blocks, n, self._refused, side))
        self._encoded += n

    def _handle_after_close(self, event: TelemetryEvent) -> None:
        self._dropped["after_close"] += 1

    def _room(self) -> bool:
        """Backpressure: wait (bounded) for the writer to make room. False: drop."""
        if not self.block_timeout_s or self._saturated or self._stop:
            return False
        deadline = time.monotonic() + self.block_timeout_s
        self._room_wanted = True
        self._wake.set()
        try:
            while self._handled - self._refused - self._taken >= self._max_queue:
                if time.monotonic() >= deadline or not self._thread.is_alive():
                    self._saturated = True  # until the writer drains: no training step waits twice
                    return False
                time.sleep(0.0005)  # hands the GIL to the writer
        finally:
            self._room_wanted = False
        return True

    def dropped(self) -> dict[str, int]:
        return {k: v for k, v in self._dropped.items() if v}

    def queue_depth(self) -> int:
        """Events waiting for the writer thread (encoded or not yet)."""
        return max(0, self._handled - self._refused - self._taken)

    def stalled(self) -> float:
        """Seconds the writer has been inside one disk call (0.0 when it is not)."""
        since = self._io_since
        return time.monotonic() - since if since else 0.0

    def flush(self, timeout: float | None = 10.0) -> None:
        """Block until everything handled so far is written and fsynced, or ``timeout``, or
        the disk has not answered for ``stall_timeout_s`` (then reported once; training goes on)."""
        target = self._handled - self._refused  # events put in the queue so far
        with self._cv:
            self._sync_target = max(self._sync_target, target)
        if self._pending and not self._closed:
            self._hand_over()  # the partial batch, encoded here (the writer is free for the disk)
        self._wake.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._synced < target and self._thread.is_alive():
                if self._stalled_check():
                    break
                left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if left <= 0:
                    break
                self._cv.wait(left)
        self._wake.set()

    def _stalled_check(self) -> bool:
        stalled = self.stalled()
        if stalled < self.stall_timeout_s:
            return False
        if not self._stalled_reported:
            self._stalled_reported = True
            log.warning(
                "Karn run log: the disk has not answered for %.1f s (%s; a frozen or hung filesystem?); "
                "training goes on, events queue up to %d and are then dropped and counted",
                stalled,
                self.run_dir,
                self._max_queue,
            )
        return True

    def close(self, final: Mapping[str, int] | None = None, timeout: float | None = None) -> dict[str, int]:
        """Write what is queued, then the final accounting (``final``: every sink's drops,
        by ``sink:reason``, to which this sink adds its own), within ``timeout`` (default
        ``shutdown_timeout_s``). Returns what could not be written (reason -> events)."""
        if self._closing:
            return {}
        self._closing = True
        bound = self.shutdown_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + bound
        self.flush(timeout=max(0.0, deadline - time.monotonic()))
        self._closed = True
        self.handle = self._handle_after_close  # type: ignore[method-assign]  # refused and counted from now on
        with self._cv:
            self._final = dict(final or {})
        self._stop = True
        self._wake.set()
        self._final_done.wait(max(0.0, deadline - time.monotonic()))
        self._thread.join(max(0.0, deadline - time.monotonic()))
        unwritten: dict[str, int] = {}
        if self._thread.is_alive():
            # Given up: the writer writes nothing more once its blocked call returns (what it
            # is writing now may still land; the live counter keeps the account exact).
            self._abandoned = True
            left = self._handled - self._refused - self._written
            if left > 0:
                self._dropped["unwritten_at_shutdown"] += left
                unwritten["unwritten_at_shutdown"] = left
            log.warning(
                "Karn run log: shutdown bound of %.1f s reached with the disk not answering (%s): "
                "%d event(s) and the final accounting were not written (karn inspect counts what is on disk)",
                bound,
                self.run_dir,
                max(left, 0),
            )
            return unwritten  # the writer still holds the file: leave it to the daemon thread
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        return unwritten

    # -- writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        # Wake every _WAKE_PERIOD of an interval while events are pending: what was queued is
        # on disk within one interval, the last quarter left for the write itself and a wait
        # for the GIL. Each wake costs the writer 0.25-0.4 ms of CPU on this VM whatever it
        # writes (a per-epoch loop pays it per interval, not per event): 3/4 rather than 1/2
        # cut the writer's CPU per logged epoch from 174 to 135-145 us (bench_api --paired).
        # With nothing pending or queued for a whole period, sleep until handle() (or flush,
        # close) wakes us: an idle writer costs the training thread no wake-ups. A loop
        # logging more often than that keeps the timer (dozing after every write would add a
        # wake-up per event).
        quiet = False  # the last timed wake found nothing to write
        while True:
            timeout: float | None = self.flush_interval_s * _WAKE_PERIOD
            if quiet and not self._pending and not self._q and not self._stop:
                self._idle = True  # published before the re-check: handle() sees it or we see its event
                if self._pending or self._q or self._stop:
                    self._idle = False
                else:
                    timeout = None
            self._timed_out = not self._wake.wait(timeout=timeout)
            self._idle = False
            self._wake.clear()
            quiet = self._timed_out and not self._pending and not self._q
            try:
                self._check_file()
                self._drain()
            except Exception as exc:  # noqa: BLE001 (the writer must outlive any one bad batch)
                log.warning("Karn run log writer error: %r", exc)
            if (self._stop and not self._q and not self._pending) or self._abandoned:
                break
        if self._abandoned:
            return
        try:
            self._write_final()
        finally:
            self._final_done.set()
            with self._cv:
                self._cv.notify_all()

    def _check_file(self) -> None:
        """A deleted run dir (or events.jsonl) leaves our fd writing into a nameless file.
        Looked at once a second, and at every flush and the close (an fstat on each timed
        wake cost ~40 us of writer CPU on this VM: 13 us per wake now, on average)."""
        if self._fd < 0 or self._deleted:
            return
        now = time.monotonic()
        if now < self._next_file_check and self._sync_target <= self._synced and not self._stop:
            return
        self._next_file_check = now + 1.0
        try:
            gone = os.fstat(self._fd).st_nlink == 0
        except OSError:
            gone = True
        if gone:
            self._deleted = True
            lost = self._records
            if lost:
                self._dropped["run_dir_deleted"] += lost
                self._writer_dropped += lost
            log.warning(
                "Karn run log: %s was deleted while the run was writing it; the %d event(s) written so far "
                "are gone, and later events are dropped and counted",
                self.run_dir / EVENTS_FILE,
                lost,
            )

    def _drain(self) -> None:
        q = self._q
        popleft = q.popleft
        while not self._abandoned:
            if not q and self._pending and self._pending_due():
                with self._enc_lock:  # a partial batch nobody else will hand over soon
                    self._take_pending()
            if not q:
                break
            # Frame and checksum the queued blocks for up to _BUDGET_S (just under the
            # interpreter's switch interval, so a training thread waiting for the GIL gets it at
            # the usual time), then write them all with one writev, which hands the GIL back.
            parts: list[Any] = []
            n = n_lines = nbytes = 0
            bounds: list[tuple[int, int]] = []  # (bytes, lines) at the end of each block
            deadline = time.perf_counter() + _BUDGET_S
            while q and n < _MAX_PER_WRITE and len(parts) < _IOV_MAX:
                blocks, events, refused, side = popleft()
                self._taken += events
                if refused != self._refused_seen:  # queue-full drops: a gap in the numbering
                    self._seq += refused - self._refused_seen
                    self._refused_seen = refused
                if side:
                    self._side_files_of(side)
                for buf, k, consumed in blocks:
                    if k:  # the block: its lines, the last one's "}\n" replaced by the frame
                        body, tail = memoryview(buf)[:-2], frame(self._seq, k, crc32(buf))
                        parts.append(body)
                        parts.append(tail)
                        n_lines += k
                        nbytes += len(body) + len(tail)
                        bounds.append((nbytes, n_lines))
                    self._seq += consumed
                n += events
                if time.perf_counter() >= deadline:
                    break
            if self._saturated and self._handled - self._refused - self._taken < self._max_queue // 2:
                self._saturated = False
            if n_lines:
                self._write(parts, n_lines, bounds)
            with self._cv:
                self._written += n
            self._maybe_sync()
        self._maybe_sync()

    def _pending_due(self) -> bool:
        """Whether the writer takes (and encodes) a partial batch now: on its timer (the loss
        bound), for a flush or the close, or when a handle waits for room."""
        return (
            self._timed_out
            or self._stop
            or self._sync_target > self._encoded
            or self._room_wanted
            or self._saturated
            or self._encoded - self._taken + len(self._pending) >= self._max_queue
        )

    def _side_files_of(self, events: list[TelemetryEvent]) -> None:
        for event in events:
            et = event.event_type
            if et is TelemetryEventType.EPISODE_STARTED and not self._deleted and self._fd >= 0:
                try:
                    self._io_since = time.monotonic()
                    self._side_files(event)
                except Exception as exc:  # noqa: BLE001 (must not kill the writer)
                    log.warning("Karn run log could not write the side file of %s: %r", et.value, exc)
                finally:
                    self._io_since = 0.0

    def _encode(self, batch: list[TelemetryEvent]) -> list[tuple[bytes, int, int]]:
        """The batch as blocks: (JSON lines, how many lines, how many events they account for)."""
        try:
            buf = encode_lines(batch)  # one C call for the batch in the common case
            if len(buf) <= _MAX_BLOCK_BYTES or len(batch) == 1:
                return [self._sized(buf, len(batch))]
            half = len(batch) // 2
            return self._encode(batch[:half]) + self._encode(batch[half:])
        except Exception as exc:  # noqa: BLE001 (retried one by one below, to drop only the culprit)
            log.debug("Karn run log batch encode failed (%r); encoding one by one", exc)
        parts = []
        for event in batch:  # an unencodable event must not kill the writer nor its batch
            try:
                line = encode_event(event) + b"\n"
            except Exception as exc:  # noqa: BLE001
                self._count_writer_drop("encode_error", 1)
                log.warning("Karn run log could not encode %s: %r", event.event_type.value, exc)
                continue
            if len(line) > self.max_record_bytes:
                self._count_writer_drop("too_large", 1)
                continue
            parts.append(line)
        return [(b"".join(parts), len(parts), len(batch))]

    def _sized(self, buf: bytes, n: int) -> tuple[bytes, int, int]:
        if n == 1 and len(buf) > self.max_record_bytes:
            self._count_writer_drop("too_large", 1)
            log.warning("Karn run log: an event of %d bytes exceeds max_record_bytes; dropped and counted", len(buf))
            return b"", 0, 1
        return buf, n, n

    def _count_writer_drop(self, reason: str, n: int) -> None:
        with self._drop_lock:  # encoding (either thread) and writing (the writer) both count
            self._dropped[reason] += n
            self._writer_dropped += n
            self._ctr[C_WRITER_DROPPED] = self._writer_dropped

    def _write(self, parts: list[Any], n_lines: int, bounds: list[tuple[int, int]] | None = None) -> None:
        """Write the framed blocks with one writev(2) (a short write is finished by more).

        On failure (full disk, read-only remount, lost mount) the whole blocks that made it
        stay; the file is cut back to the end of the last of them, so what follows starts
        clean; the other events are counted."""
        if self._fd < 0:
            self._count_writer_drop("write_error", n_lines)
            return
        if self._deleted:
            self._count_writer_drop("run_dir_deleted", n_lines)
            return
        lead = 0
        if self._cut_failed:
            parts = [b"\n", *parts]  # end the partial line a failed write left behind
            lead = 1
        total = sum(map(len, parts))
        done = 0
        self._io_since = time.monotonic()
        try:
            done = os.writev(self._fd, parts)
            if done < total:
                view = memoryview(b"".join(parts))[done:]
                while view:
                    k = os.write(self._fd, view)
                    if not k:
                        raise OSError("short write")
                    done += k
                    view = view[k:]
            self._good_size += total
            self._cut_failed = False
            self._records += n_lines
            self._ctr[C_WRITTEN] = self._records
        except OSError as exc:
            kept_bytes = kept_lines = 0
            for end, lines in bounds or ():
                if lead + end > done:
                    break
                kept_bytes, kept_lines = lead + end, lines
            first = not self._dropped["write_error"]
            self._count_writer_drop("write_error", n_lines - kept_lines)
            self._records += kept_lines
            self._ctr[C_WRITTEN] = self._records
            try:
                os.ftruncate(self._fd, self._good_size + kept_bytes)
                self._good_size += kept_bytes
                self._cut_failed = False
            except OSError:
                self._cut_failed = True
            if first:
                log.warning(
                    "Karn run log write failed (%s: %s); events are being dropped and counted",
                    self.run_dir / EVENTS_FILE,
                    exc.strerror or exc,
                )
        finally:
            self._io_since = 0.0

    def _maybe_sync(self) -> None:
        """fsync when a flush waits for what is now written. The fsync runs outside ``_cv``:
        on a frozen disk it blocks, and a training thread's flush must still get the lock."""
        with self._cv:
            if not (self._sync_target > self._synced and self._written >= self._sync_target):
                return
            upto = self._written
        if self._fd >= 0 and not self._deleted:
            self._io_since = time.monotonic()
            try:
                os.fsync(self._fd)
            except (OSError, ValueError):
                pass  # counted at write time; a flush must not hang on it
            finally:
                self._io_since = 0.0
        with self._cv:
            self._synced = max(self._synced, upto)
            self._cv.notify_all()

    def _write_final(self) -> None:
        """The final accounting into run.json (atomically), once everything else is written."""
        final = self._final
        if final is None or self._fd < 0 or self._deleted:
            return
        mine = {f"{type(self).__name__}:{k}": v for k, v in self.dropped().items()}
        dropped = {k: v for k, v in final.items() if not k.startswith(f"{type(self).__name__}:")}
        dropped.update(mine)
        closed = {
            "at": datetime.now(timezone.utc).isoformat(),
            # every event handed to the run log has a sequence number, refused ones included
            "emitted": self._seq + (self._refused - self._refused_seen),
            "written": self._records,
            "dropped": dict(sorted(dropped.items())),
        }
        self._io_since = time.monotonic()
        try:
            os.fsync(self._fd)
            _write_json_atomic(self.run_dir / RUN_FILE, {**self._meta, "closed": closed}, self.file_mode)
            self._ctr[C_CLOSED] = 1
            self.counter.remove()
        except OSError as exc:
            log.warning(
                "Karn run log: could not write the final accounting to %s (%s); "
                "karn inspect will report the run as not closed cleanly",
                self.run_dir / RUN_FILE,
                exc.strerror or exc,
            )
        finally:
            self._io_since = 0.0

    def _side_files(self, event: TelemetryEvent) -> None:
        p = event.payload
        if isinstance(p, EpisodeContext):
            if id_problem(p.episode_id) is not None:  # a direct user bypassing the collector's door
                return
            episodes = self.run_dir / "episodes"
            episodes.mkdir(mode=self.dir_mode, exist_ok=True)  # each level with the run dir's mode
            ep_dir = episodes / p.episode_id
            ep_dir.mkdir(mode=self.dir_mode, exist_ok=True)
            _write_json_atomic(ep_dir / "context.json", None, self.file_mode, text=to_json(p) + "\n")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine: the live counter is in /dev/shm)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _int(v: Any) -> int:
    return v if type(v) is int and v >= 0 else 0


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _write_json_atomic(path: Path, data: Mapping[str, Any] | None, mode: int = 0o600, *, text: str = "") -> None:
    """Write ``data`` (or ``text``) to ``path`` via a temporary file, fsync and rename."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with open(fd, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n" if data is not None else text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------- reading


class RunDirError(Exception):
    """A run directory is missing or unreadable. The message is one line for the user."""


@dataclass
class Accounting:
    """Emitted vs on disk, from the log's own sequence numbers and counts.

    ``emitted`` comes from the final accounting (``source="closed"``, a clean close), else
    from the live counter (``"live counter"``: the writing process died or is still running,
    on this machine), else it is unknown (None).
    """

    on_disk: int
    emitted: int | None
    source: str | None
    dropped: dict[str, int]  # counted drops by sink:reason (final accounting or live counter)
    unreadable: int  # lines on disk that failed their checks
    gaps: int  # sequence numbers missing between good blocks
    flush_interval_s: float | None
    writer_pid: int | None = None  # the live counter's writer, when it is still running

    @property
    def missing(self) -> int | None:
        return None if self.emitted is None else max(0, self.emitted - self.on_disk)

    @property
    def never_written(self) -> int | None:
        """Events handed to the run log that neither reached the disk nor were counted as
        dropped: what a killed process still held in memory."""
        if self.missing is None:
            return None
        counted = sum(v for k, v in self.dropped.items() if k.startswith("RunLogSink:"))
        return max(0, self.missing - counted - self.unreadable)

    def lines(self) -> list[str]:
        """What ``karn inspect`` prints about the log's completeness (one line each)."""
        out = []
        if self.source == "closed":
            head = "closed cleanly"
        elif self.source == "live counter" and self.writer_pid is not None:
            head = f"NOT closed: the writing process (pid {self.writer_pid}) is still running"
        elif self.source == "live counter":
            head = "NOT closed: the writing process died without closing it (killed?)"
        else:
            head = "NOT closed, and the emitted count is unknown (no final accounting, no live counter on this machine)"
        if self.emitted is None:
            interval = f"{self.flush_interval_s:g} s" if self.flush_interval_s else "one flush interval"
            out.append(
                f"run log: {head}; {self.on_disk:,} events on disk; events of at most the last {interval} "
                f"before the process died may be missing"
                + (f"; {self.gaps:,} missing between blocks" if self.gaps else "")
            )
        else:
            parts = []
            lost = self.never_written or 0
            counted = {k: v for k, v in self.dropped.items() if k.startswith("RunLogSink:") and v}
            if counted:
                parts.append("dropped " + ", ".join(f"{k.split(':', 1)[1]} {v:,}" for k, v in sorted(counted.items())))
            if self.unreadable:
                parts.append(f"{self.unreadable:,} unreadable on disk")
            if lost and self.writer_pid is not None:
                parts.append(f"{lost:,} not written yet: in the writer's queue")
            elif lost:
                interval = f" (at most the last {self.flush_interval_s:g} s)" if self.flush_interval_s else ""
                parts.append(f"{lost:,} never written: in memory when the process died{interval}")
            why = f" ({'; '.join(parts)})" if parts and self.missing else ""
            out.append(
                f"run log: {head}; {self.emitted:,} events emitted, {self.on_disk:,} on disk, "
                f"{self.missing:,} missing{why}"
            )
        others = {k: v for k, v in self.dropped.items() if not k.startswith("RunLogSink:") and v}
        if others:
            out.append("  other sinks dropped: " + ", ".join(f"{k} {v:,}" for k, v in sorted(others.items())))
        return out


@dataclass
class RunRecord:
    run_dir: Path
    run_id: str
    events: list[TelemetryEvent]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)
    episodes: dict[str, EpisodeContext] = field(default_factory=dict)
    integrity: Integrity = field(default_factory=Integrity)
    accounting: Accounting | None = None


def iter_events(
    path: Path | str,
    *,
    framed: bool = True,
    framed_from: int = 0,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    integrity: Integrity | None = None,
    skipped: list[tuple[int, str]] | None = None,
) -> Iterator[TelemetryEvent]:
    """Stream the events of an events.jsonl (bounded memory: one block, one line of at most
    ``max_record_bytes``). Lines that fail their checks or do not decode are reported in
    ``integrity`` / ``skipped`` (line number, why), never fatal."""
    info = integrity if integrity is not None else Integrity()
    skip = skipped if skipped is not None else []
    reported = 0
    for no, line in scan(
        path, framed=framed, framed_from=framed_from, max_record_bytes=max_record_bytes, integrity=info
    ):
        reported = _report_bad(info, skip, reported)
        try:
            event = event_from_json(line)
        except ContractDecodeError as exc:
            skip.append((no, str(exc)))
            continue
        info.last_timestamp = event.timestamp
        yield event
    _report_bad(info, skip, reported)
    skip.sort(key=lambda x: x[0])


def _report_bad(info: Integrity, skip: list[tuple[int, str]], reported: int) -> int:
    for span in info.bad[reported:]:
        for no in range(span.first_line, span.last_line + 1):
            skip.append((no, span.why))
    return len(info.bad)


def read_events(path: Path, *, framed: bool | None = None) -> tuple[list[TelemetryEvent], list[tuple[int, str]]]:
    """Decode an events.jsonl. Bad lines are skipped and reported, never fatal. ``framed``
    defaults to what the run.json beside it says."""
    if framed is None:
        framed = _read_meta(Path(path).parent / RUN_FILE).get("framing") == FRAMING
    skipped: list[tuple[int, str]] = []
    events = list(iter_events(path, framed=framed, skipped=skipped))
    return events, skipped


def read_run(run_dir: Path | str, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> RunRecord:
    """Load a run directory; raises RunDirError with a one-line message when it can't."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunDirError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a directory")
    events_path = run_dir / EVENTS_FILE
    if not events_path.is_file():
        raise RunDirError(f"{run_dir}: not a Karn run directory (no {EVENTS_FILE})")
    run_id = run_dir.name
    meta_path = run_dir / RUN_FILE
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict):
                raise AttributeError("not a JSON object")
            run_id = meta.get("run_id", run_id)
            if meta.get("schema_version") != SCHEMA_VERSION:
                raise RunDirError(
                    f"{run_dir}: schema_version {meta.get('schema_version')} (this Karn reads {SCHEMA_VERSION})"
                )
        except (json.JSONDecodeError, AttributeError) as exc:
            raise RunDirError(f"{run_dir}/{RUN_FILE}: corrupt ({exc})") from None
    framed = meta.get("framing") == FRAMING
    info = Integrity()
    skipped: list[tuple[int, str]] = []
    try:
        events = list(
            iter_events(
                events_path,
                framed=framed,
                framed_from=_int(meta.get("framed_from")),
                max_record_bytes=max_record_bytes,
                integrity=info,
                skipped=skipped,
            )
        )
    except OSError as exc:
        raise RunDirError(f"{events_path}: {exc.strerror or exc}") from None
    if not events:
        why = f"; {len(skipped)} undecodable line(s), first at line {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise RunDirError(f"{events_path}: no readable events{why}")
    episodes: dict[str, EpisodeContext] = {}
    for ev in events:
        if isinstance(ev.payload, EpisodeContext):
            episodes[ev.payload.episode_id] = ev.payload
    for ctx_path in sorted((run_dir / "episodes").glob("*/context.json")):
        try:
            ctx = from_json(EpisodeContext, ctx_path.read_text())
            episodes.setdefault(ctx.episode_id, ctx)
        except (ContractDecodeError, json.JSONDecodeError, OSError):
            skipped.append((0, f"{ctx_path}: corrupt episode context"))
    return RunRecord(
        run_dir=run_dir,
        run_id=run_id,
        events=events,
        skipped=skipped,
        episodes=episodes,
        integrity=info,
        accounting=accounting(meta, info, len(events)) if framed else None,
    )


_SAFE_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,80}")  # sink:reason keys of an untrusted run.json


def accounting(meta: Mapping[str, Any], info: Integrity, on_disk: int) -> Accounting:
    """Emitted vs on disk for a framed log, from run.json (untrusted) and the scan."""
    closed = meta.get("closed")
    interval = meta.get("flush_interval_s")
    flush_interval = float(interval) if isinstance(interval, (int, float)) and 0 < interval < 1e6 else None
    gaps = sum(n for _, n in info.gaps)
    if isinstance(closed, dict) and type(closed.get("emitted")) is int:
        raw = closed.get("dropped")
        dropped = (
            {k: v for k, v in raw.items() if _SAFE_KEY.fullmatch(k) and type(v) is int and v > 0}
            if isinstance(raw, dict)
            else {}
        )
        return Accounting(on_disk, max(closed["emitted"], 0), "closed", dropped, info.unreadable, gaps, flush_interval)
    live: CounterReading | None = read_counter(meta.get("live_counter"))
    if live is not None:
        dropped = {}
        if live.refused:
            dropped["RunLogSink:queue_full"] = live.refused
        if live.writer_dropped:
            dropped["RunLogSink:writer_errors"] = live.writer_dropped
        alive = live.pid if live.pid and not live.closed and _alive(live.pid) else None
        return Accounting(on_disk, live.handled, "live counter", dropped, info.unreadable, gaps, flush_interval, alive)
    return Accounting(on_disk, None, None, {}, info.unreadable, gaps, flush_interval)
