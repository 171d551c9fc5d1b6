"""Rank liveness without collectives: heartbeat files, missing ranks, rank 0's watcher.

*A dead rank hangs everyone*: a collective would hang on exactly the failure it should
detect, so each rank rewrites a small heartbeat file (:class:`RankHeartbeat`) and rank 0
reads them (:func:`missing_ranks`, :class:`MissingRankMonitor`), from its own thread
(:class:`RankWatch`) since its main thread may be stuck in a collective waiting for the dead
rank. Imports neither torch nor numpy: cheap enough for a metrics callback.

*Waiting is not hanging.* When one rank stops (SIGSTOP, a deadlock in native code, a dead
host), every other rank soon waits for it in a collective and stops making progress too, so
"no epoch for a while" names every rank. A heartbeat therefore also *pulses*: a thread of the
rank (:meth:`RankHeartbeat.start_pulse`) rewrites the file every ``interval`` seconds with the
same epoch. A rank waiting in a collective keeps pulsing; a stopped or dead process does not.
``missing`` means "no pulse" — the hung rank alone. The launcher's supervisor reads the same
files and ends the job when a rank stays missing (:func:`karn_otel.distributed.launch.spawn`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from karn_otel.contracts import HealthAlert, Severity
from karn_otel.ranks import RankInfo

__all__ = [
    "RANK_MISSING_CHECK",
    "Heartbeat",
    "MissingRankMonitor",
    "RankHeartbeat",
    "RankWatch",
    "missing_rank_count",
    "missing_ranks",
    "rank_missing_alert",
    "read_heartbeats",
]

RANK_MISSING_CHECK = "rank_missing"
"""``HealthAlert.check`` of a rank that stopped reporting (critical)."""


@dataclass(frozen=True)
class Heartbeat:
    """The last thing a rank reported: its epoch, when (unix seconds, wall clock), and whether
    it finished cleanly (a finished rank is never missing)."""

    rank: int
    epoch: int
    time: float
    pid: int = 0
    host: str = ""
    finished: bool = False


def _heartbeat_path(directory: Path, rank: int) -> Path:
    return directory / f"rank{rank}.json"


class RankHeartbeat:
    """One rank's heartbeat file ``<directory>/rank<k>.json``, rewritten by :meth:`beat`.

    No collectives: a collective would hang on exactly the failure it should detect. Each
    write goes to a temporary file renamed over the old one (atomic on POSIX), so a reader
    never sees half a file. The directory must be visible to rank 0 (the run directory on
    one node; a shared filesystem across nodes, whose clocks must then be synchronised, as
    ages compare wall-clock times written by different hosts). A beat costs a small file
    write (~0.1 ms), so beating every epoch, or every few hundred batches, is cheap.
    Constructing one records an initial beat at ``epoch`` 0, so a rank that started is
    distinguishable from one that never came up.
    """

    def __init__(self, directory: str | os.PathLike[str], rank: int, *, clock: Callable[[], float] = time.time) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be an int >= 0, got {rank!r}")
        self.directory = Path(directory)
        self.rank = rank
        self._clock = clock
        self._lock = threading.Lock()
        self._epoch = 0
        self._finished = False
        self._pulse_stop: threading.Event | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.beat(0)

    def start_pulse(self, interval_s: float) -> RankHeartbeat:
        """Rewrite the heartbeat every ``interval_s`` seconds from a daemon thread (same epoch),
        so a rank blocked in a collective still shows it is alive. Stopped by :meth:`finish`
        and :meth:`stop_pulse`."""
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.stop_pulse()
        stop = self._pulse_stop = threading.Event()

        def pulse() -> None:
            while not stop.wait(interval_s):
                try:
                    with self._lock:
                        if not self._finished:
                            self._write(self._epoch, False)
                except OSError:
                    pass  # a full or vanished disk: the silence will be reported as missing

        threading.Thread(target=pulse, name=f"karn-heartbeat-rank{self.rank}", daemon=True).start()
        return self

    def stop_pulse(self) -> None:
        if self._pulse_stop is not None:
            self._pulse_stop.set()
            self._pulse_stop = None

    @property
    def path(self) -> Path:
        return _heartbeat_path(self.directory, self.rank)

    def beat(self, epoch: int, *, finished: bool = False) -> Heartbeat:
        """Record that this rank is alive at ``epoch`` now."""
        with self._lock:
            self._epoch, self._finished = int(epoch), finished
            return self._write(int(epoch), finished)

    def _write(self, epoch: int, finished: bool) -> Heartbeat:
        hb = Heartbeat(self.rank, epoch, float(self._clock()), os.getpid(), socket.gethostname(), finished)
        fd, tmp = tempfile.mkstemp(prefix=f".rank{self.rank}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(dataclasses.asdict(hb), f)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; monitoring tools may read it too
            # No fsync: readers are other processes (same page cache or NFS close-to-open),
            # and surviving a machine crash is not what a liveness file is for.
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return hb

    def finish(self, epoch: int) -> Heartbeat:
        """Mark a clean exit, so that the silence that follows is not reported as missing."""
        self.stop_pulse()
        return self.beat(epoch, finished=True)


def read_heartbeats(directory: str | os.PathLike[str], world_size: int) -> dict[int, Heartbeat]:
    """The readable heartbeats of ranks ``0 .. world_size - 1``; absent or unreadable ones are left out."""
    out: dict[int, Heartbeat] = {}
    for rank in range(world_size):
        try:
            data = json.loads(_heartbeat_path(Path(directory), rank).read_text())
            hb = Heartbeat(**data)
        except (OSError, ValueError, TypeError):
            continue  # not written yet, or not ours: the rank counts as silent
        numbers_ok = isinstance(hb.epoch, int) and isinstance(hb.time, (int, float)) and not isinstance(hb.time, bool)
        if hb.rank == rank and numbers_ok:
            out[rank] = hb
    return out


def missing_ranks(
    directory: str | os.PathLike[str], world_size: int, timeout_s: float, *, now: float | None = None
) -> list[int]:
    """Ranks with no heartbeat newer than ``timeout_s`` seconds (sorted), finished ranks excluded.

    A rank with no (readable) heartbeat file is missing. ``now`` is unix seconds (default:
    the wall clock). Choose ``timeout_s`` above the longest gap between beats (an epoch
    with its counterfactual pass), e.g. three times the typical epoch time.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    now = time.time() if now is None else now
    beats = read_heartbeats(directory, world_size)
    return [
        r for r in range(world_size) if r not in beats or (not beats[r].finished and now - beats[r].time > timeout_s)
    ]


def missing_rank_count(
    directory: str | os.PathLike[str], world_size: int, timeout_s: float, *, now: float | None = None
) -> int:
    """Number of missing ranks: the value of the ``karn.ranks.missing`` gauge (callback-friendly)."""
    return len(missing_ranks(directory, world_size, timeout_s, now=now))


def rank_missing_alert(
    missing: Sequence[int],
    world_size: int,
    timeout_s: float,
    heartbeats: Mapping[int, Heartbeat] | None = None,
    *,
    now: float | None = None,
) -> HealthAlert | None:
    """The critical ``rank_missing`` HealthAlert naming the missing ranks (None if there are none).

    ``value`` is the number of missing ranks, ``threshold`` 0 (any missing rank fails the
    check). With ``heartbeats`` the message says each rank's last epoch and its age.
    """
    if not missing:
        return None
    now = time.time() if now is None else now
    heartbeats = heartbeats or {}
    parts = []
    for r in missing:
        hb = heartbeats.get(r)
        if hb is None:
            parts.append(f"rank {r} never reported")
        else:
            parts.append(f"rank {r} last reported epoch {hb.epoch} {now - hb.time:.1f} s ago")
    names = ", ".join(str(r) for r in missing)
    message = (
        f"rank{'s' if len(missing) > 1 else ''} {names} of {world_size} stopped reporting "
        f"(no heartbeat for over {timeout_s:g} s): " + "; ".join(parts)
    )
    return HealthAlert(RANK_MISSING_CHECK, Severity.CRITICAL, message, float(len(missing)), 0.0)


class MissingRankMonitor:
    """Rank 0's view of the heartbeats: the gauge value and edge-triggered alerts.

    :meth:`count` feeds the ``karn.ranks.missing`` gauge; :meth:`check` returns a
    ``rank_missing`` HealthAlert when a rank newly goes missing (none while the same ranks
    stay missing, a new one if a recovered rank goes missing again), like the HealthMonitor.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        world_size: int,
        timeout_s: float,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        RankInfo(0, world_size)  # validates world_size
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.directory = Path(directory)
        self.world_size = world_size
        self.timeout_s = float(timeout_s)
        self._clock = clock
        self._alerted: set[int] = set()

    def missing(self) -> list[int]:
        return missing_ranks(self.directory, self.world_size, self.timeout_s, now=self._clock())

    def count(self) -> int:
        return len(self.missing())

    def check(self) -> HealthAlert | None:
        now = self._clock()
        missing = missing_ranks(self.directory, self.world_size, self.timeout_s, now=now)
        new = [r for r in missing if r not in self._alerted]
        self._alerted = set(missing)  # recovered ranks leave the set: a relapse alerts again
        if not new:
            return None
        beats = read_heartbeats(self.directory, self.world_size)
        return rank_missing_alert(missing, self.world_size, self.timeout_s, beats, now=now)


class RankWatch:
    """Rank 0's watcher: checks the heartbeats from its own thread (the main thread may be
    stuck in a collective waiting for the dead rank) and emits rank_missing alerts.

    ``emit`` receives each alert; the default is :func:`karn_otel.emit` (the process's
    collector). Checks every ``timeout_s / 4`` seconds (at least every 0.5 s).
    """

    def __init__(
        self,
        heartbeat_dir: str | os.PathLike[str],
        world_size: int,
        timeout_s: float,
        *,
        emit: Callable[[HealthAlert], object] | None = None,
    ) -> None:
        self.monitor = MissingRankMonitor(heartbeat_dir, world_size, timeout_s)
        self._emit = emit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="karn-rank-watch", daemon=True)
        self._interval = max(timeout_s / 4, 0.5)

    def start(self) -> RankWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        emit = self._emit
        if emit is None:
            import karn_otel

            emit = karn_otel.emit
        while not self._stop.wait(self._interval):
            alert = self.monitor.check()
            if alert is not None:
                emit(alert)
