"""Run log: what goes in comes out, framed in checksummed blocks; torn and corrupt records are
told from good ones and repaired; reads stream in bounded memory; drops and every sink's
losses are counted, never fatal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from karn_otel import collector as kc
from karn_otel.config import KarnConfig
from karn_otel.contracts import EpisodeSummary, HostBaseline, Scalars, TelemetryEventType
from karn_otel.sinks.runlog import RunDirError, RunLogSink, read_events, read_run
from karn_otel.sinks.runlog_format import reseal
from tests.conftest import canon, make_context, own_live_counters_removed
from tests.test_collector import host

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_live_counters_left():
    with own_live_counters_removed():
        yield


def _collector(tmp_path: Path, **kw) -> kc.KarnCollector:
    c = kc.KarnCollector(KarnConfig(out_dir=tmp_path, console="off", strict=True))
    c.add_sink(RunLogSink(tmp_path, c.run_id, **kw))
    return c


def _run(tmp_path: Path, steps: int, **kw) -> Path:
    """A closed run with a context and ``steps`` Scalars events; its run dir."""
    c = _collector(tmp_path, **kw)
    c.emit(make_context())
    for s in range(steps):
        c.emit(Scalars(s, {"a": float(s)}))
    c.close()
    return tmp_path / c.run_id


def _blocks(path: Path) -> list[dict]:
    return [json.loads(x)["$block"] for x in path.read_bytes().splitlines() if b'"$block"' in x]


def test_everything_is_on_disk_at_episode_end(tmp_path):
    c = _collector(tmp_path)
    c.emit(make_context())
    for e in range(1, 4):
        c.emit(host(epoch=e, val_loss=float("nan") if e == 2 else 1.0 / e))
    c.emit(EpisodeSummary(3, 0.3, 0.9, 0.8, 100, 110, 0, 1.0))
    # No close(): EPISODE_ENDED itself must have flushed to disk.
    rec = read_run(tmp_path / c.run_id)
    assert [e.event_type for e in rec.events][-2:] == [
        TelemetryEventType.TELEMETRY_STATS,
        TelemetryEventType.EPISODE_ENDED,
    ]
    hosts = [e.payload for e in rec.events if e.event_type is TelemetryEventType.HOST_SNAPSHOT]
    assert [h.epoch for h in hosts] == [1, 2, 3]
    assert canon(hosts[1].val_loss) == canon(float("nan")), "a diverged loss is recorded as NaN, not null"
    assert "ep-1" in rec.episodes
    assert (tmp_path / c.run_id / "episodes" / "ep-1" / "context.json").is_file()
    c.close()


def test_every_line_is_an_envelope_and_blocks_number_every_event(tmp_path):
    run_dir = _run(tmp_path, 300)
    path = run_dir / "events.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]  # plain JSON lines (jq, DuckDB)
    assert len(lines) == 301 and all("event_type" in x for x in lines)
    blocks = _blocks(path)
    assert len(blocks) >= 5, "300 events are several blocks of at most 64 lines"
    assert blocks[0]["seq"] == 0
    for a, b in zip(blocks, blocks[1:]):
        assert b["seq"] == a["seq"] + a["n"], "consecutive blocks, no gap"
    assert sum(b["n"] for b in blocks) == 301
    rec = read_run(run_dir)
    assert len(rec.events) == 301 and not rec.skipped
    assert [e.payload.step for e in rec.events[1:]] == list(range(300))
    assert rec.accounting.lines() == ["run log: closed cleanly; 301 events emitted, 301 on disk, 0 missing"]


def test_torn_last_line_is_reported_then_repaired_on_open(tmp_path, caplog):
    run_dir = _run(tmp_path, 100)
    path = run_dir / "events.jsonl"
    full = path.read_bytes()
    torn = full.splitlines(keepends=True)[-1][:40]
    path.write_bytes(full + torn)  # a process killed mid-line
    events, skipped = read_events(path)
    assert len(events) == 101
    assert skipped == [(102, "torn last line (process killed mid-write?)")]
    # Reopening the run repairs it: the torn bytes are cut (and kept aside), numbering goes on.
    sink = RunLogSink(tmp_path, run_dir.name)
    assert sink.repaired is not None
    assert (sink.repaired.truncated_at, sink.repaired.dropped_bytes, sink.repaired.dropped_lines) == (len(full), 40, 1)
    assert "truncated at byte" in caplog.text and "dropping 40 bytes (1 line(s))" in caplog.text
    assert (run_dir / f"events.jsonl.damaged-{len(full)}").read_bytes() == torn
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", run_id=run_dir.name), sinks=[sink])
    c.emit(make_context())
    c.close()
    rec = read_run(run_dir)
    assert len(rec.events) == 102 and not rec.skipped
    assert _blocks(path)[-1]["seq"] == 101, "the reopened log numbers on from where the first left off"
    assert rec.accounting.missing == 0


def test_a_corrupt_block_is_skipped_with_its_reason_and_the_rest_is_read(tmp_path):
    run_dir = _run(tmp_path, 300)
    path = run_dir / "events.jsonl"
    data = bytearray(path.read_bytes())
    i = data.index(b'"step":100,')
    data[i + 7] = ord("7")  # one flipped digit: valid JSON, wrong checksum
    path.write_bytes(bytes(data))
    rec = read_run(run_dir)
    (bad,) = rec.integrity.bad
    assert bad.why.startswith("checksum mismatch in the block of seq")
    assert 1 <= bad.records <= 64
    assert len(rec.events) == 301 - bad.records
    assert all(e.payload.step != 700 for e in rec.events[1:]), "the corrupt value is never read"
    assert len(rec.skipped) == bad.records and "checksum mismatch" in rec.skipped[0][1]
    assert rec.accounting.missing == bad.records
    assert f"{bad.records} unreadable on disk" in rec.accounting.lines()[0]
    # A deliberate edit can be resealed (tests that tamper with values use this).
    reseal(path)
    rec = read_run(run_dir)
    assert len(rec.events) == 301 and any(e.payload.step == 700 for e in rec.events[1:])


def test_repair_on_open_truncates_at_the_first_bad_record(tmp_path):
    run_dir = _run(tmp_path, 300)
    path = run_dir / "events.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[150] = b"garbage\n"
    path.write_bytes(b"".join(lines))
    first_bad = read_run(run_dir).integrity.first_bad_offset
    assert first_bad is not None and first_bad < path.stat().st_size
    size = path.stat().st_size
    sink = RunLogSink(tmp_path, run_dir.name)
    sink.close()
    assert sink.repaired.truncated_at == first_bad and sink.repaired.dropped_bytes == size - first_bad
    rec = read_run(run_dir)
    assert not rec.skipped and rec.integrity.records == len(rec.events) < 301


def test_schema_version_is_still_checked_on_read(tmp_path):
    run_dir = _run(tmp_path, 5)
    path = run_dir / "events.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"schema_version":1', b'"schema_version":99'))
    reseal(path)  # well framed, but from a newer Karn
    with pytest.raises(RunDirError, match="no readable events.*schema_version 99"):
        read_run(run_dir)


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda p: None, "no such run directory"),
        (lambda p: p.mkdir(), "no events.jsonl"),
        (lambda p: (p.mkdir(), (p / "events.jsonl").write_text("{{{\n")), "no readable events"),
        (lambda p: p.write_text("x"), "not a directory"),
    ],
)
def test_bad_run_dirs_get_one_line_errors(tmp_path, setup, fragment):
    target = tmp_path / "run"
    setup(target)
    with pytest.raises(RunDirError, match=fragment) as info:
        read_run(target)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux) to read the peak RSS")
def test_a_200_mb_line_is_streamed_past_in_bounded_memory(tmp_path):
    """The old reader held the whole file (402 MB for one 200 MB line); this one holds at most
    one line of max_record_bytes, and skips a longer one without holding it."""
    run_dir = _run(tmp_path, 100)
    path = run_dir / "events.jsonl"
    with open(path, "ab") as f:
        chunk = b"x" * (1 << 20)
        for _ in range(200):
            f.write(chunk)
        f.write(b"\n")
    with open(path, "ab") as f:
        f.write(_run(tmp_path / "more", 3).joinpath("events.jsonl").read_bytes())
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from karn_otel.sinks.runlog import read_run
        rec = read_run({str(run_dir)!r})
        print(len(rec.events), len(rec.skipped), rec.skipped[0][1])
        # VmHWM: this process's own peak (ru_maxrss would include the forking parent's)
        hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        print(int(hwm.split()[1]) // 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=True)
    counts, rss_mb = out.stdout.splitlines()
    n, skipped, why = counts.split(" ", 2)
    assert int(n) == 101 + 4, "the blocks before and after the huge line are read"
    assert int(skipped) == 1 and "exceeds the reader's limit" in why
    assert int(rss_mb) < 150, f"peak RSS {rss_mb} MB reading past a 200 MB line"


def test_queue_full_drops_are_counted_not_blocking(tmp_path):
    sink = RunLogSink(tmp_path, "r", max_queue=5, wake_batch=10**9)
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off"), sinks=[sink])
    # Stop the writer from draining so the queue fills deterministically.
    sink._stop = True
    sink._wake.set()
    sink._thread.join(timeout=5)
    c.emit(make_context())
    t0 = time.perf_counter()
    for e in range(1, 10):
        c.emit(host(epoch=e))
    assert time.perf_counter() - t0 < 0.5
    assert sink.dropped()["queue_full"] == 10 - 5
    assert c.dropped()["RunLogSink:queue_full"] == 5


def test_backpressure_blocks_up_to_its_bound_then_drops_and_counts(tmp_path):
    sink = RunLogSink(tmp_path, "r", max_queue=3, wake_batch=10**9, backpressure="block", block_timeout_s=0.2)
    gate = threading.Event()
    real_drain = sink._drain
    sink._drain = lambda: (gate.wait(), real_drain())  # the writer is held until the gate opens
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off"), sinks=[sink])
    c.emit(make_context())
    for e in range(1, 3):
        c.emit(host(epoch=e))  # the queue is now full
    t0 = time.perf_counter()
    c.emit(host(epoch=3))
    waited = time.perf_counter() - t0
    assert 0.19 <= waited < 1.0, f"blocked {waited:.3f} s (bound 0.2 s)"
    t0 = time.perf_counter()
    c.emit(host(epoch=4))
    assert time.perf_counter() - t0 < 0.05, "after one timeout it drops at once until the writer catches up"
    assert sink.dropped() == {"queue_full": 2}
    # The writer catches up: blocking resumes, and a blocked event gets in once there is room.
    gate.set()
    c.flush(timeout=5)
    threading.Timer(0.05, gate.set).start()
    for e in range(5, 9):
        c.emit(host(epoch=e))
    c.close()
    rec = read_run(tmp_path / "r")
    assert rec.accounting.emitted == 9 and rec.accounting.on_disk == 9 - rec.accounting.dropped["RunLogSink:queue_full"]


def _seconds_until_on_disk(c: kc.KarnCollector, path: Path, lines: int) -> float:
    """Emit one host snapshot and poll ``path`` until it holds ``lines`` lines (at most 2 s)."""
    t0 = time.perf_counter()
    c.emit(host(epoch=1))
    while path.read_bytes().count(b"\n") < lines:
        assert time.perf_counter() - t0 < 2.0
        time.sleep(0.002)
    return time.perf_counter() - t0


def test_the_writer_writes_within_one_flush_interval_without_a_flush(tmp_path):
    sink = RunLogSink(tmp_path, "r", flush_interval_s=0.05)
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off"), sinks=[sink])
    c.emit(make_context())
    time.sleep(0.1)
    took = _seconds_until_on_disk(c, tmp_path / "r" / "events.jsonl", lines=2)
    c.close()
    assert took < 0.05 + 0.1, f"written {took:.3f} s after emit (interval 0.05 s)"


def test_an_idle_writer_sleeps_untimed_and_the_next_event_still_lands_within_one_interval(tmp_path):
    """With nothing to write the writer takes no timed wake-ups (each costs the training
    thread a GIL hand-off); the next event restarts its timer, so the loss bound holds."""
    sink = RunLogSink(tmp_path, "r", flush_interval_s=0.05)
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off"), sinks=[sink])
    c.emit(make_context())
    c.flush(timeout=5)
    clock = time.pthread_getcpuclockid(sink._thread.ident)
    time.sleep(0.2)  # a quiet wake period (3/4 of the interval), then the writer dozes
    cpu0 = time.clock_gettime(clock)
    time.sleep(1.0)  # 40 timed wake-ups at this interval if it kept its timer
    idle_cpu = time.clock_gettime(clock) - cpu0
    assert idle_cpu < 0.002, f"the idle writer used {idle_cpu * 1e3:.2f} ms of CPU in 1 s"
    took = _seconds_until_on_disk(c, tmp_path / "r" / "events.jsonl", lines=2)
    c.close()
    assert took < 0.05 + 0.1, f"written {took:.3f} s after emit (interval 0.05 s)"
    acc = read_run(tmp_path / "r").accounting
    assert (acc.on_disk, acc.emitted, acc.dropped) == (2, 2, {})


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_costs_no_training_step(tmp_path):
    sink = RunLogSink(tmp_path, "r")
    os.close(sink._fd)
    sink._fd = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off"), sinks=[sink])
    t0 = time.perf_counter()
    assert c.emit(make_context())
    for e in range(1, 5):
        assert c.emit(host(epoch=e))
    c.flush(timeout=5)
    assert time.perf_counter() - t0 < 1.0
    assert sink.dropped()["write_error"] == 5
    c.close()


def test_a_run_dir_that_cannot_be_created_costs_nothing_and_is_counted(tmp_path, caplog):
    (tmp_path / "file").write_text("not a directory")
    sink = RunLogSink(tmp_path / "file", "r")
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off"), sinks=[sink])
    assert c.emit(make_context()) and c.emit(host(epoch=1))
    c.close()
    assert "cannot write" in caplog.text
    assert c.stats().dropped == {"RunLogSink:write_error": 2}


class _LossySink:
    """A sink that loses events while it closes (as an OTLP exporter does at shutdown)."""

    def __init__(self, close_s: float = 0.0) -> None:
        self.lost = 0
        self.close_s = close_s

    def handle(self, event) -> None:
        pass

    def flush(self, timeout=None) -> None:
        pass

    def close(self) -> None:
        time.sleep(self.close_s)
        self.lost += 4

    def dropped(self) -> dict[str, int]:
        return {"spans_unsent_at_shutdown": self.lost} if self.lost else {}


def test_every_sinks_losses_reach_the_final_accounting(tmp_path):
    lossy = _LossySink()
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off"))
    c.add_sink(RunLogSink(tmp_path, c.run_id))  # added first, closed last
    c.add_sink(lossy)
    c.emit(make_context())
    c.close()
    closed = json.loads((tmp_path / c.run_id / "run.json").read_text())["closed"]
    assert closed["dropped"] == {"_LossySink:spans_unsent_at_shutdown": 4}, "counted during its close"
    rec = read_run(tmp_path / c.run_id)
    assert rec.accounting.lines()[1] == "  other sinks dropped: _LossySink:spans_unsent_at_shutdown 4"


def test_shutdown_returns_within_its_bound_with_a_hung_sink(tmp_path):
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off"))
    c.add_sink(RunLogSink(tmp_path, c.run_id))
    c.add_sink(_LossySink(close_s=30))
    c.emit(make_context())
    kc.install(c)
    t0 = time.perf_counter()
    assert kc.shutdown(timeout=1.0) == {}
    assert time.perf_counter() - t0 < 1.5
    assert "closed" in json.loads((tmp_path / c.run_id / "run.json").read_text()), "the run log still closed"


def test_an_event_after_close_is_counted(tmp_path):
    sink = RunLogSink(tmp_path, "r")
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off"), sinks=[sink])
    c.emit(make_context())
    c.close()
    c.emit(host(epoch=1))
    assert sink.dropped() == {"after_close": 1}


# Checkpoint retention is the trainer's (it wrote the checkpoints): the same policies and
# expected outcomes are tested on a real run in tests/reference/test_reference.py
# (test_the_trainer_applies_its_checkpoint_retention); the run log deletes nothing.


def test_the_run_log_never_deletes_checkpoints(tmp_path):
    c = _collector(tmp_path)
    ck = tmp_path / "ck.pt"
    ck.write_bytes(b"weights")
    c.emit(make_context())
    c.emit(HostBaseline(1.0, 0.1, ck, "delete_after_run"))
    c.close()
    assert ck.exists(), "retention is applied by the trainer that wrote the checkpoint, not by a sink"


def test_otel_losses_at_shutdown_reach_the_run_logs_final_accounting(tmp_path):
    """The issue's case: OTel's drop counts were written before OTel shut down, so they never
    reached `karn inspect`. The run log now closes last, with every other sink's final counts."""
    import socket

    import karn_otel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens there once closed
    c = karn_otel.configure(
        KarnConfig(
            out_dir=tmp_path, console="off", otlp_endpoint=f"http://127.0.0.1:{dead}", otel_shutdown_timeout_s=1.0
        ),
        processors=False,
    )
    otel = next(s for s in c.sinks if type(s).__name__ == "OTelSink")
    c.emit(make_context())
    for e in range(1, 4):
        c.emit(host(epoch=e))
    before = sum(otel.dropped().values())
    karn_otel.shutdown(timeout=3.0)
    lost = {f"OTelSink:{k}": v for k, v in otel.dropped().items()}
    assert lost, "spans to a dead endpoint are lost, and counted"
    closed = json.loads((tmp_path / c.run_id / "run.json").read_text())["closed"]
    recorded = {k: v for k, v in closed["dropped"].items() if k.startswith("OTelSink:")}
    # What OTel counted while it shut down is in the run log (an export thread OTel left
    # behind at its own bound could still count more afterwards, never less).
    assert recorded and sum(recorded.values()) >= max(before, 1)
    assert all(0 < v <= lost[k] for k, v in recorded.items())
    line = read_run(tmp_path / c.run_id).accounting.lines()[1]
    assert line.startswith("  other sinks dropped: OTelSink:")


def test_a_log_from_before_framing_is_read_and_appended_to(tmp_path):
    """Old run dirs (no framing in run.json) read line by line, unverified, as before; reopening
    one appends framed blocks after the old part (``framed_from``)."""
    import re

    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", run_id="old"))
    c.add_sink(RunLogSink(tmp_path, "old"))
    c.emit(make_context())
    for e in (1, 2):
        c.emit(host(epoch=e))
    c.close()
    run_dir = tmp_path / "old"
    path = run_dir / "events.jsonl"
    path.write_bytes(re.sub(rb',"\$block":\{[^}]*\}', b"", path.read_bytes()))  # the old format
    (run_dir / "run.json").write_text(json.dumps({"run_id": "old", "schema_version": 1}))
    rec = read_run(run_dir)
    assert len(rec.events) == 3 and not rec.skipped and rec.accounting is None
    sink = RunLogSink(tmp_path, "old")
    c2 = kc.KarnCollector(KarnConfig(out_dir=None, console="off", run_id="old"), sinks=[sink])
    c2.emit(make_context(episode_id="ep-2"))
    c2.emit(host(epoch=1))
    c2.close()
    rec = read_run(run_dir)
    assert [e.event_type.value for e in rec.events] == ["episode_started", "host_snapshot", "host_snapshot"] * 1 + [
        "episode_started",
        "host_snapshot",
    ]
    assert not rec.skipped and rec.integrity.blocks == 1
