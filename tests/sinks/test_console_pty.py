"""The live dashboard and the script's own prints on a real terminal.

A subprocess runs a plain loop (``karn_otel.init(console="live")``) under a pseudo-terminal
and prints between epochs, on stdout and stderr; everything it writes to the terminal is fed
to a terminal emulator (pyte), and the assertions are on the final screen, what a user sees:
each script line once and intact above one dashboard box, the box closed and free of script
text, the lines printed after ``finish()`` below it, and sys.stdout / sys.stderr restored.
"""

from __future__ import annotations

import io
import os
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from karn_otel.sinks.console import ConsoleSink
from tests.conftest import make_context
from tests.test_collector import host

COLS, ROWS = 100, 50
REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys, time
import karn_otel

run = karn_otel.init(
    config={"lr": 0.1, "epochs": 4}, model=1000, task="classification",
    out_dir=sys.argv[1], console="live",
)
for epoch in range(4):
    time.sleep(0.3)  # the refresh thread draws the dashboard for this epoch...
    run.log({"train_loss": 1.0 / (epoch + 1), "val_loss": 1.2 / (epoch + 1),
             "val_accuracy": 0.5 + 0.05 * epoch}, epoch=epoch)
    time.sleep(0.3)
    print(f"SCRIPT LINE {epoch}")  # ...and the script prints under it
sys.stdout.write("SCRIPT PART ")
sys.stdout.write("JOINED\n")
print("SCRIPT ERR LINE", file=sys.stderr)
time.sleep(0.3)
sys.stdout.write("SCRIPT TAIL")  # no newline: still shown when the run finishes
run.finish()
run.collector.close()  # a second close: must not unbalance the restore
print("SCRIPT AFTER FINISH", sys.stdout is sys.__stdout__, sys.stderr is sys.__stderr__)
"""

DURING = [
    "SCRIPT LINE 0",
    "SCRIPT LINE 1",
    "SCRIPT LINE 2",
    "SCRIPT LINE 3",
    "SCRIPT PART JOINED",
    "SCRIPT ERR LINE",
    "SCRIPT TAIL",
]
AFTER = "SCRIPT AFTER FINISH True True"


def _run_under_pty(tmp_path: Path, deadline_s: float = 60.0) -> bytes:
    fcntl = pytest.importorskip("fcntl")  # a POSIX terminal
    termios = pytest.importorskip("termios")
    script = tmp_path / "loop.py"
    script.write_text(SCRIPT)
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARN_")}
    for k in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(k, None)
    env["TERM"] = "xterm-256color"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "runs")],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        close_fds=True,
    )
    os.close(slave)
    out = bytearray()
    end = time.monotonic() + deadline_s
    try:
        while True:
            left = end - time.monotonic()
            if left <= 0:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(
                    f"the script did not finish in {deadline_s:g} s; output so far:\n{out.decode(errors='replace')}"
                )
            ready, _, _ = select.select([master], [], [], min(left, 0.5))
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        proc.wait(timeout=max(1.0, end - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
    assert proc.returncode == 0, out.decode(errors="replace")
    return bytes(out)


def _screen(data: bytes) -> list[str]:
    pyte = pytest.importorskip("pyte")  # the terminal emulator (the test extra)
    screen = pyte.Screen(COLS, ROWS)
    pyte.ByteStream(screen).feed(data)
    return [row.rstrip() for row in screen.display]


def test_script_prints_land_above_the_live_dashboard(tmp_path):
    pytest.importorskip("pyte")
    data = _run_under_pty(tmp_path)
    rows = _screen(data)
    shown = "\n".join(rows)
    tops = [i for i, r in enumerate(rows) if r.startswith("┌")]
    bottoms = [i for i, r in enumerate(rows) if r.startswith("└")]
    assert len(tops) == 1 and len(bottoms) == 1, f"one dashboard box on the screen:\n{shown}"
    top, bottom = tops[0], bottoms[0]
    assert top < bottom
    assert "Epoch 3/4" in rows[top + 1], f"the final dashboard:\n{shown}"
    for r in rows[top : bottom + 1]:
        assert r[0] in "┌│├└" and r[-1] in "┐│┤┘" and len(r) == len(rows[top]), f"a closed box:\n{shown}"
        assert "SCRIPT" not in r, f"script text inside the box:\n{shown}"
    for line in DURING:
        at = [i for i, r in enumerate(rows) if r == line]
        assert len(at) == 1, f"{line!r} once and intact on its own line:\n{shown}"
        assert at[0] < top, f"{line!r} above the dashboard:\n{shown}"
    order = [rows.index(line) for line in DURING[:5]]  # stdout lines in the order printed
    assert order == sorted(order), shown
    after = [i for i, r in enumerate(rows) if r == AFTER]
    assert len(after) == 1 and after[0] > bottom, f"stdout/stderr restored, printed below the box:\n{shown}"
    assert data.rfind(b"\x1b[?25h") > data.rfind(b"\x1b[?25l"), "the cursor is shown again at the end"


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_explicit_stream_redraws_only_on_change_and_leaves_sys_streams_alone(memory_collector):
    before = (sys.stdout, sys.stderr)
    stream = _Tty()
    sink = ConsoleSink(memory_collector.view, live=True, stream=stream, refresh_hz=50)
    memory_collector.add_sink(sink)
    assert (sys.stdout, sys.stderr) == before, "an explicit stream= never redirects sys.stdout/sys.stderr"
    memory_collector.emit(make_context())
    memory_collector.emit(host(epoch=1))
    assert _wait_for(lambda: "Epoch 1/10" in stream.getvalue()), "the refresh thread drew the change"
    time.sleep(0.3)  # 15 refresh periods with nothing new
    idle = len(stream.getvalue())
    time.sleep(0.3)
    assert len(stream.getvalue()) == idle, "an unchanged dashboard is not redrawn"
    memory_collector.emit(host(epoch=2))
    assert _wait_for(lambda: "Epoch 2/10" in stream.getvalue()), "a change is drawn"
    sink.close()
    sink.close()  # idempotent
    assert (sys.stdout, sys.stderr) == before


def test_closed_stream_never_raises(memory_collector):
    stream = _Tty()
    sink = ConsoleSink(memory_collector.view, live=True, stream=stream, refresh_hz=50)
    memory_collector.add_sink(sink)
    memory_collector.emit(make_context())
    stream.close()
    memory_collector.emit(host(epoch=1))  # the training thread is never hit by the closed terminal
    sink.flush()
    time.sleep(0.1)
    assert sink._thread is not None and sink._thread.is_alive(), "the refresh thread survived the closed stream"
    sink.close()
    sink.close()
    assert not sink._thread.is_alive()
