"""The run log: the run directory on disk, the source of truth for everything after a run.

Layout of ``<out>/<run_id>/``::

    run.json                          run id, schema version, creation time
    events.jsonl                      one TelemetryEvent envelope per line, append-only
    episodes/<episode_id>/context.json  each episode's EpisodeContext (a run may hold several)
    checkpoints/                      initial host checkpoints (written, and pruned by its
                                      checkpoint_retention, by the trainer)

``RunLogSink.handle`` only appends to a bounded in-memory queue (O(1)); a writer thread
encodes in batches with the C encoder of :mod:`karn_otel.codec` and writes each batch with
one write call, so the training thread never waits on JSON encoding or the disk. A batch is
small (``_BATCH`` events) and the encoding per write bounded in time (``_BUDGET_S``, under
the interpreter's switch interval), so the writer never holds the GIL for long: a training
thread waiting for it gets it as it would from any thread, and the write hands it back.
A full queue or a failing disk (ENOSPC) drops events and counts them; training goes on. At
EPISODE_ENDED the collector flushes, and ``flush`` fsyncs, so a finished episode is on disk.

``read_run`` tolerates a torn last line (a killed process) and reports what it skipped.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import repeat
from pathlib import Path

from karn_otel.codec import (
    ContractDecodeError,
    encode_event,
    encode_lines,
    event_from_json,
    from_json,
    to_json,
)
from karn_otel.contracts import (
    SCHEMA_VERSION,
    EpisodeContext,
    TelemetryEvent,
    TelemetryEventType,
)

log = logging.getLogger("karn")
EVENTS_FILE = "events.jsonl"
_BATCH = 512  # events per C encode call (GIL held throughout; ~0.5-2 ms)
_BUDGET_S = 0.004  # encode batches for up to this long per write call
_MAX_PER_WRITE = 16_384  # events per write call at most (bounds the writer's memory)
RUN_FILE = "run.json"
_SIDE_FILE_TYPES = frozenset({TelemetryEventType.EPISODE_STARTED})
_event_type_of = operator.attrgetter("event_type")


class RunLogSink:
    """Writes events to ``<out_dir>/<run_id>/events.jsonl`` from a background thread."""

    def __init__(
        self,
        out_dir: Path,
        run_id: str,
        max_queue: int = 100_000,
        wake_batch: int = 512,
        run_dir: Path | None = None,
    ) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else Path(out_dir) / run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        meta = {
            "run_id": run_id,
            "schema_version": SCHEMA_VERSION,
            "created": datetime.now(timezone.utc).isoformat(),
        }
        (self.run_dir / RUN_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        # Unbuffered: each batch is one write(2); nothing is left in a Python buffer on ENOSPC.
        self._file = open(self.run_dir / EVENTS_FILE, "ab", buffering=0)  # noqa: SIM115 (closed in close())
        self._q: deque[TelemetryEvent] = deque()
        self._max_queue = max_queue
        self._wake_batch = wake_batch
        self._wake = threading.Event()
        self._cv = threading.Condition()
        self._enqueued = 0
        self._written = 0  # written or dropped by the writer
        self._sync_target = 0  # fsync requested once _written reaches this (flush)
        self._synced = 0  # the flush watermark: written (or dropped) and fsynced
        self._dropped: Counter[str] = Counter()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="karn-runlog", daemon=True)
        self._thread.start()

    # -- training thread -------------------------------------------------------------

    def handle(self, event: TelemetryEvent) -> None:
        q = self._q
        if len(q) >= self._max_queue:
            self._dropped["queue_full"] += 1
            return
        q.append(event)
        self._enqueued += 1
        if (
            len(q) >= self._wake_batch or event.event_type is TelemetryEventType.EPISODE_ENDED
        ) and not self._wake.is_set():
            self._wake.set()

    def dropped(self) -> dict[str, int]:
        return dict(self._dropped)

    def queue_depth(self) -> int:
        """Events waiting for the writer thread."""
        return len(self._q)

    def flush(self, timeout: float | None = 10.0) -> None:
        """Block until everything handled so far is written and fsynced (or timeout)."""
        target = self._enqueued
        with self._cv:
            self._sync_target = max(self._sync_target, target)
        self._wake.set()
        with self._cv:
            self._cv.wait_for(lambda: self._synced >= target or not self._thread.is_alive(), timeout)
        self._wake.set()

    def close(self) -> None:
        self.flush(timeout=10.0)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10.0)
        try:
            self._file.close()
        except OSError:
            pass

    # -- writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=0.25)
            self._wake.clear()
            self._drain()
            if self._stop and not self._q:
                return

    def _drain(self) -> None:
        q = self._q
        popleft = q.popleft
        while q:
            # Encode C-sized batches for up to _BUDGET_S (under the interpreter's 5 ms switch
            # interval, so a training thread waiting for the GIL gets it at the usual time),
            # then write them all with one write call, which also hands the GIL back.
            parts: list[bytes] = []
            n = n_lines = 0
            deadline = time.perf_counter() + _BUDGET_S
            while q and n < _MAX_PER_WRITE:
                batch = list(map(operator.call, repeat(popleft, min(len(q), _BATCH))))  # C loop
                data, k = self._encode(batch)
                parts.append(data)
                n += len(batch)
                n_lines += k
                self._side_files_of(batch)
                if time.perf_counter() >= deadline:
                    break
            if n_lines:
                self._write(parts, n_lines)
            with self._cv:
                self._written += n
                self._maybe_sync()
        with self._cv:
            self._maybe_sync()

    def _side_files_of(self, batch: list[TelemetryEvent]) -> None:
        if _SIDE_FILE_TYPES.isdisjoint(map(_event_type_of, batch)):  # the common case, a C loop
            return
        for event in batch:
            et = event.event_type
            if et is TelemetryEventType.EPISODE_STARTED:
                try:
                    self._side_files(event)
                except Exception as exc:  # noqa: BLE001 (must not kill the writer)
                    log.warning(
                        "Karn run log could not write the side file of %s: %r",
                        et.value,
                        exc,
                    )

    def _encode(self, batch: list[TelemetryEvent]) -> tuple[bytes, int]:
        """The batch as JSON lines, and how many lines that is."""
        try:
            return encode_lines(batch), len(batch)  # one C call for the batch in the common case
        except Exception as exc:  # noqa: BLE001 (retried one by one below, to drop only the culprit)
            log.debug("Karn run log batch encode failed (%r); encoding one by one", exc)
        parts = []
        for event in batch:  # an unencodable event must not kill the writer nor its batch
            try:
                parts.append(encode_event(event) + b"\n")
            except Exception as exc:  # noqa: BLE001
                self._dropped["encode_error"] += 1
                log.warning("Karn run log could not encode %s: %r", event.event_type.value, exc)
        return b"".join(parts), len(parts)

    def _write(self, parts: list[bytes], n_lines: int) -> None:
        """Write the encoded batches with one writev(2) (a short write is finished by more)."""
        try:
            fd = self._file.fileno()
            k = os.writev(fd, parts)
            total = sum(map(len, parts))
            if k < total:
                view = memoryview(b"".join(parts))[k:]
                while view:
                    k = os.write(fd, view)
                    if not k:
                        raise OSError("short write")
                    view = view[k:]
        except OSError as exc:  # full disk, lost mount: count and keep training
            first = not self._dropped["write_error"]
            self._dropped["write_error"] += n_lines
            if first:
                log.warning(
                    "Karn run log write failed (%s); events are being dropped and counted",
                    exc,
                )

    def _maybe_sync(self) -> None:
        """fsync when a flush waits for what is now written (caller holds ``_cv``)."""
        if self._sync_target > self._synced and self._written >= self._sync_target:
            try:
                os.fsync(self._file.fileno())
            except (OSError, ValueError):
                pass  # counted at write time; a flush must not hang on it
            self._synced = self._written
            self._cv.notify_all()

    def _side_files(self, event: TelemetryEvent) -> None:
        p = event.payload
        if isinstance(p, EpisodeContext):
            ep_dir = self.run_dir / "episodes" / p.episode_id
            ep_dir.mkdir(parents=True, exist_ok=True)
            (ep_dir / "context.json").write_text(to_json(p) + "\n")


# ---------------------------------------------------------------------- reading


class RunDirError(Exception):
    """A run directory is missing or unreadable. The message is one line for the user."""


@dataclass
class RunRecord:
    run_dir: Path
    run_id: str
    events: list[TelemetryEvent]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)
    episodes: dict[str, EpisodeContext] = field(default_factory=dict)


def read_events(path: Path) -> tuple[list[TelemetryEvent], list[tuple[int, str]]]:
    """Decode an events.jsonl. Undecodable lines are skipped and reported, never fatal."""
    events: list[TelemetryEvent] = []
    skipped: list[tuple[int, str]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    # A file written completely ends with "\n", leaving one empty last element.
    torn_tail = lines[-1] != ""
    if not torn_tail:
        lines.pop()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            events.append(event_from_json(line))
        except ContractDecodeError as exc:
            why = "torn last line (process killed mid-write?)" if (torn_tail and i == len(lines)) else str(exc)
            skipped.append((i, why))
    return events, skipped


def read_run(run_dir: Path | str) -> RunRecord:
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
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            run_id = meta.get("run_id", run_id)
            if meta.get("schema_version") != SCHEMA_VERSION:
                raise RunDirError(
                    f"{run_dir}: schema_version {meta.get('schema_version')} (this Karn reads {SCHEMA_VERSION})"
                )
        except (json.JSONDecodeError, AttributeError) as exc:
            raise RunDirError(f"{run_dir}/{RUN_FILE}: corrupt ({exc})") from None
    try:
        events, skipped = read_events(events_path)
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
    )
