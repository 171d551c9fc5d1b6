"""The single-node launcher: :func:`spawn` runs a function on N local ranks (``karn run --nproc N``).

Each child gets the launcher environment (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``,
``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT`` for code that reads them), joins a process
group through a file store in the launcher's private temporary directory (no rendezvous
socket on any interface; gloo's own connections are pinned to loopback) and runs the
function; the parent supervises: the first failure is named, the ranks left waiting for it
get a grace period and are then terminated. No torch at import: the process group and the
spawn context come from :mod:`karn_otel.torch.collectives`, imported when a job starts.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from karn_otel.ranks import ENV_LOCAL_RANK, ENV_RANK, ENV_WORLD_SIZE, RankInfo

__all__ = [
    "ENV_MASTER_ADDR",
    "ENV_MASTER_PORT",
    "SpawnResult",
    "spawn",
]

ENV_MASTER_ADDR = "MASTER_ADDR"
"""Address of rank 0's rendezvous store; :func:`spawn` always uses 127.0.0.1."""
ENV_MASTER_PORT = "MASTER_PORT"
"""TCP port of rank 0's rendezvous store; :func:`spawn` picks a free one."""
_ENV_GLOO_IFNAME = "GLOO_SOCKET_IFNAME"  # gloo's interface; pinned to loopback by spawn()
STARTUP_ALLOWANCE_S = 120.0  # a watched rank's first heartbeat may take this long (or 10x the timeout)


@dataclass(frozen=True)
class SpawnResult:
    """What :func:`spawn` observed.

    ``exit_codes[k]`` is rank k's exit code (0 = success, negative = killed by that signal,
    e.g. -15 when :func:`spawn` terminated a rank left waiting for a failed peer).
    ``first_failure`` is the rank that failed first (None if none failed, and when the job
    as a whole ran past its timeout: then ``timed_out`` is True and the ranks still running
    were terminated). ``errors`` maps a rank to the traceback of the exception its
    function raised.
    """

    exit_codes: tuple[int, ...]
    first_failure: int | None
    errors: dict[int, str]
    timed_out: bool = False
    hung: tuple[int, ...] = ()  # ranks whose heartbeat stopped (not responding); the job was ended

    @property
    def ok(self) -> bool:
        return self.first_failure is None and all(c == 0 for c in self.exit_codes)

    def describe(self) -> str:
        """One line per failed rank, the first failure first (empty when :attr:`ok`)."""
        if self.ok:
            return ""
        order = [self.first_failure] if self.first_failure is not None else []
        order += [r for r, c in enumerate(self.exit_codes) if c != 0 and r not in order]
        lines = []
        if self.hung:
            names = ", ".join(str(r) for r in self.hung)
            lines.append(
                f"rank{'s' if len(self.hung) > 1 else ''} {names} stopped responding (no heartbeat); "
                "the job was ended (the other ranks were waiting for it)"
            )
        for r in order:
            err = self.errors.get(r, "").strip().splitlines()
            why = f": {err[-1]}" if err else ""
            tag = " (first failure)" if r == self.first_failure else ""
            lines.append(f"rank {r} exited with code {self.exit_codes[r]}{tag}{why}")
        if self.timed_out and not self.hung:
            lines.append("the job exceeded its timeout and was terminated")
        return "\n".join(lines)


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it; a tiny race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def _child_main(
    fn: Callable[..., object],
    rank: int,
    nproc: int,
    port: int,
    backend: str,
    args: tuple[Any, ...],
    num_threads: int | None,
    collective_timeout_s: float | None,
    error_dir: str,
) -> None:
    """Entry point of one spawned rank: environment, process group, ``fn(RankInfo, *args)``."""
    os.environ.update(
        {
            ENV_RANK: str(rank),
            ENV_WORLD_SIZE: str(nproc),
            ENV_LOCAL_RANK: str(rank),
            ENV_MASTER_ADDR: "127.0.0.1",
            ENV_MASTER_PORT: str(port),
        }
    )
    loopback = _loopback_interface()
    if loopback and backend == "gloo":
        # Without this gloo binds to the interface of the host name, which may not be loopback.
        os.environ.setdefault(_ENV_GLOO_IFNAME, loopback)
    from karn_otel.torch import collectives  # imports torch: after the environment is set

    class _Terminated(BaseException):
        """The launcher ended this rank (SIGTERM): unwind, so ``fn``'s cleanup (Karn's flush) runs."""

    def _terminated(signum: int, frame: Any) -> None:
        raise _Terminated

    signal.signal(signal.SIGTERM, _terminated)  # runs once the main thread is back in Python

    code = 0
    terminated = False
    try:
        # num_threads: N ranks x all cores each would oversubscribe.
        collectives.init_process_group(
            backend,
            rank,
            nproc,
            timeout_s=collective_timeout_s,
            num_threads=num_threads,
            store_path=str(Path(error_dir, "rendezvous")),  # a FileStore: no TCP listener on any interface
        )
        fn(RankInfo(rank, nproc, rank), *args)
    except SystemExit as exc:  # fn chose its exit code
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except _Terminated:
        terminated = True
    except BaseException:
        Path(error_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        sys.stderr.write(f"[karn rank {rank}] " + traceback.format_exc())
        code = 1
    finally:
        collectives.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    if terminated:  # die of the signal after the cleanup, so the launcher sees exit code -15
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    if code:
        os._exit(code)  # skip interpreter teardown: nothing left to flush, and it can block on dead peers


def spawn(
    fn: Callable[..., object],
    nproc: int,
    args: tuple[Any, ...] = (),
    *,
    backend: str = "gloo",
    num_threads: int | None = None,
    timeout_s: float | None = None,
    grace_s: float = 30.0,
    collective_timeout_s: float | None = None,
    watch: tuple[str | os.PathLike[str], float] | None = None,
) -> SpawnResult:
    """Run ``fn(RankInfo, *args)`` in ``nproc`` processes on this machine, one per rank.

    For ``karn run --nproc N``. Each child is started with torch.multiprocessing's *spawn*
    method, gets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` and ``MASTER_ADDR=127.0.0.1`` with
    a free ``MASTER_PORT``, and joins a ``backend`` process group (gloo: CPU; use "nccl" with
    one GPU per local rank) before ``fn`` runs; the group is destroyed after. ``fn`` must be
    importable by name (a module-level function) and ``args`` picklable.

    ``num_threads``: torch threads per rank (default: torch's, i.e. every core, per rank).
    When a rank fails, the others get ``grace_s`` seconds to finish (they may be stuck in a
    collective waiting for it) and are then terminated. ``timeout_s`` bounds the whole job
    (seconds; None = no limit). ``collective_timeout_s`` is the process group's timeout.
    ``watch=(heartbeat_dir, timeout_s)``: the supervisor reads the ranks' heartbeat files
    (:mod:`karn_otel.distributed.liveness`) and, when a rank's pulse is older than
    :func:`end_after` ``(timeout_s)`` = ``timeout_s + max(2, timeout_s / 2)`` (a stopped or
    hung process: a rank waiting in a collective keeps pulsing; rank 0's watcher has raised
    its alert at ``timeout_s``),
    ends the job and names that rank alone in :attr:`SpawnResult.hung`. A rank that has not
    written its first heartbeat yet gets :data:`STARTUP_ALLOWANCE_S` (or 10 x ``timeout_s``).
    Never raises for a failing rank: the :class:`SpawnResult` names it.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    if grace_s < 0 or (timeout_s is not None and not timeout_s > 0):
        raise ValueError("grace_s must be >= 0 and timeout_s > 0 or None")
    import multiprocessing.connection as mpc

    from karn_otel.torch import collectives

    ctx = collectives.spawn_context()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="karn-spawn-") as error_dir:
        procs = [
            ctx.Process(
                target=_child_main,
                args=(fn, r, nproc, port, backend, tuple(args), num_threads, collective_timeout_s, error_dir),
                name=f"karn-rank{r}",
            )
            for r in range(nproc)
        ]
        try:
            for p in procs:
                p.start()
            first_failure, timed_out, hung = _supervise(procs, mpc, grace_s, timeout_s, watch)
        except BaseException:  # Ctrl-C or a start failure: leave no orphaned ranks behind
            for p in procs:
                if p.pid is not None and p.is_alive():
                    _terminate(p)
            raise
        errors = {}
        for r in range(nproc):
            f = Path(error_dir, f"rank{r}.err")
            if f.exists():
                errors[r] = f.read_text()
    codes = tuple(int(p.exitcode) if p.exitcode is not None else -9 for p in procs)
    if first_failure is None and any(codes) and not timed_out:  # e.g. killed while the last to finish
        first_failure = next(r for r, c in enumerate(codes) if c)
    if hung:
        first_failure = None  # the hung rank is the cause; the others were terminated for it
    return SpawnResult(codes, first_failure, errors, timed_out or bool(hung), tuple(hung))


def end_after(timeout_s: float) -> float:
    """Seconds without a pulse after which the supervisor ends a watched job."""
    return timeout_s + max(2.0, 0.5 * timeout_s)


def _hung_ranks(watch: tuple[str | os.PathLike[str], float], n: int, started_wall: float) -> list[int]:
    from karn_otel.distributed.liveness import missing_ranks, read_heartbeats

    directory, timeout = watch
    # Rank 0's watcher raises the rank_missing alert at ``timeout``; the job ends a little
    # later, so that alert is on disk (the run log flushes every 100 ms) before rank 0 goes.
    missing = missing_ranks(directory, n, end_after(timeout))
    if not missing:
        return []
    reported = read_heartbeats(directory, n)
    # A rank that has not reported yet is still starting (imports, process group, model):
    # judged only after a generous start-up allowance; one that cannot start fails on its own.
    starting = time.time() - started_wall <= max(STARTUP_ALLOWANCE_S, 10 * timeout)
    return [r for r in missing if r in reported or not starting]


def _supervise(
    procs: list[Any],
    mpc: Any,
    grace_s: float,
    timeout_s: float | None,
    watch: tuple[str | os.PathLike[str], float] | None = None,
) -> tuple[int | None, bool, list[int]]:
    """Wait for the ranks; after the first failure give the rest ``grace_s``, then terminate
    them. With ``watch``, end the job when a rank's heartbeat stops (returned third)."""
    start = time.monotonic()
    started_wall = time.time()
    deadline = start + timeout_s if timeout_s is not None else math.inf
    first_failure: int | None = None
    timed_out = False
    hung: list[int] = []
    poll = None if watch is None else min(1.0, max(watch[1] / 4, 0.1))
    running = set(range(len(procs)))
    while running:
        wait_s = max(0.0, deadline - time.monotonic())
        if poll is not None:
            wait_s = min(wait_s, poll)
        ready = mpc.wait([procs[r].sentinel for r in running], timeout=None if math.isinf(wait_s) else wait_s)
        if watch is not None and first_failure is None and not ready:
            hung = [r for r in _hung_ranks(watch, len(procs), started_wall) if r in running]
            if hung:
                _terminate_all([procs[r] for r in sorted(running)])
                running.clear()
                break
        for r in sorted(running):
            if procs[r].sentinel in ready:
                procs[r].join()
                running.discard(r)
                if procs[r].exitcode != 0 and first_failure is None:
                    first_failure = r
                    deadline = min(deadline, time.monotonic() + grace_s)
        if running and time.monotonic() >= deadline:
            timed_out = first_failure is None
            for r in sorted(running):
                _terminate(procs[r])
            running.clear()
    return first_failure, timed_out, hung


def _terminate_all(procs: list[Any], grace_s: float = 3.0) -> None:
    """SIGTERM every process at once, give them ``grace_s`` together, then SIGKILL the rest."""
    for p in procs:
        p.terminate()
        if p.pid is not None:
            try:  # a stopped (SIGSTOP) process handles SIGTERM only once continued
                os.kill(p.pid, signal.SIGCONT)
            except OSError:
                pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def _terminate(proc: Any) -> None:
    proc.terminate()
    if proc.pid is not None:
        try:  # a stopped (SIGSTOP) process handles SIGTERM only once continued
            os.kill(proc.pid, signal.SIGCONT)
        except OSError:
            pass
    proc.join(5.0)
    if proc.is_alive():
        proc.kill()
        proc.join()
