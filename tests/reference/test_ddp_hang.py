"""DDP that ends: a hung rank (SIGSTOP) is named alone, and the job ends within a bound.
A Prometheus port in use is a one-line error before any run dir exists."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from karn_otel.contracts import HealthAlert
from karn_otel.distributed.launch import end_after
from karn_otel.sinks.runlog import read_run

HEARTBEAT_TIMEOUT = 4.0


def _heartbeat(run_dir: Path, rank: int) -> dict | None:
    try:
        return json.loads((run_dir / "heartbeats" / f"rank{rank}.json").read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_a_stopped_rank_is_named_alone_and_the_job_ends(tmp_path):
    cmd = [sys.executable, "-m", "karn_otel.cli", "run", "--nproc", "2", "--epochs", "200", "--no-live",
           "--out", str(tmp_path), "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        run_dir = hb = None
        while time.monotonic() < deadline:
            dirs = [d for d in tmp_path.iterdir() if d.is_dir()]
            if dirs:
                run_dir = dirs[0]
                hb = _heartbeat(run_dir, 1)
                if hb is not None and hb["epoch"] >= 2:
                    break
            time.sleep(0.2)
        assert hb is not None and hb["epoch"] >= 2, "rank 1 never reached epoch 2"
        os.kill(hb["pid"], signal.SIGSTOP)
        stopped = time.monotonic()
        out, err = proc.communicate(timeout=HEARTBEAT_TIMEOUT + 60)
        ended_after = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"hung rank: the job ended {ended_after:.1f} s after SIGSTOP (timeout {HEARTBEAT_TIMEOUT:g} s)")
    assert proc.returncode == 1, out + err
    assert "rank 1 stopped responding" in err and "rank 0 stopped" not in err, err
    # bound: end_after(timeout), plus one supervisor poll and the ranks' termination
    assert ended_after < end_after(HEARTBEAT_TIMEOUT) + 15, ended_after
    alerts = [e.payload for e in read_run(run_dir).events if isinstance(e.payload, HealthAlert)]
    missing = [a for a in alerts if a.check == "rank_missing"]
    assert missing, [a.check for a in alerts]
    assert all("rank 1 " in a.message and "rank 0" not in a.message for a in missing), [a.message for a in missing]


def test_a_busy_prometheus_port_is_one_line_and_leaves_no_run_dir(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run(
            [sys.executable, "-m", "karn_otel.cli", "run", "--epochs", "1", "--out", str(tmp_path / "runs"),
             "--prometheus-port", str(port), "--no-live"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and f"127.0.0.1:{port} is in use" in p.stderr, p.stderr
    assert not (tmp_path / "runs").exists()


def _listening(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state that belong to ``pids``."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A = LISTEN
                out.append(f[1])
    return out


def _descendants(pid: int) -> set[int]:
    out, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for c in map(int, children):
            if c not in out:
                out.add(c)
                frontier.append(c)
    return out


@pytest.mark.slow
def test_ddp_ranks_listen_on_loopback_only(tmp_path):
    cmd = [sys.executable, "-m", "karn_otel.cli", "run", "--nproc", "2", "--epochs", "200", "--no-live",
           "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            dirs = [d for d in tmp_path.iterdir() if d.is_dir()]
            if dirs and (hb := _heartbeat(dirs[0], 1)) is not None and hb["epoch"] >= 1:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the ranks never reached epoch 1")
        addrs = _listening(_descendants(proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    loopback = ("0100007F:", "00000000000000000000000001000000:")  # 127.0.0.1, ::1 (as /proc/net writes them)
    assert all(a.startswith(loopback) for a in addrs), addrs
