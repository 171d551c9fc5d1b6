"""Run log: what goes in comes out; torn lines; drops are counted, never fatal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from karn_otel import collector as kc
from karn_otel.config import KarnConfig
from karn_otel.contracts import EpisodeSummary, HostBaseline, TelemetryEventType
from karn_otel.sinks.runlog import RunDirError, RunLogSink, read_events, read_run
from tests.conftest import canon, make_context
from tests.test_collector import host


def _collector(tmp_path: Path, **kw) -> kc.KarnCollector:
    c = kc.KarnCollector(KarnConfig(out_dir=tmp_path, console="off", strict=True, **kw))
    c.add_sink(
        RunLogSink(tmp_path, c.run_id, **({"max_queue": kw["runlog_queue_size"]} if "runlog_queue_size" in kw else {}))
    )
    return c


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


def test_torn_last_line_is_skipped_and_reported(tmp_path):
    c = _collector(tmp_path)
    c.emit(make_context())
    c.emit(host(epoch=1))
    c.close()
    path = tmp_path / c.run_id / "events.jsonl"
    full = path.read_text()
    path.write_text(full + full.splitlines()[-1][:25])  # a process killed mid-line
    events, skipped = read_events(path)
    assert len(events) == 2
    assert len(skipped) == 1 and skipped[0][0] == 3 and "torn last line" in skipped[0][1]


def test_corrupt_middle_line_is_skipped_with_reason(tmp_path):
    c = _collector(tmp_path)
    c.emit(make_context())
    c.emit(host(epoch=1))
    c.close()
    path = tmp_path / c.run_id / "events.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", lines[1]]) + "\n")
    events, skipped = read_events(path)
    assert len(events) == 2 and skipped[0][0] == 2 and "not JSON" in skipped[0][1]


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


def test_queue_full_drops_are_counted_not_blocking(tmp_path):
    sink = RunLogSink(tmp_path, "r", max_queue=5, wake_batch=10**9)
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off"), sinks=[sink])
    # Stop the writer from draining so the queue fills deterministically.
    sink._stop = True
    sink._wake.set()
    sink._thread.join(timeout=5)
    c.emit(make_context())
    for e in range(1, 10):
        c.emit(host(epoch=e))
    assert sink.dropped()["queue_full"] == 10 - 5
    assert c.dropped()["RunLogSink:queue_full"] == 5


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_costs_no_training_step(tmp_path):
    sink = RunLogSink(tmp_path, "r")
    sink._file.close()
    sink._file = open("/dev/full", "wb", buffering=0)  # every write fails with ENOSPC
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off"), sinks=[sink])
    assert c.emit(make_context())
    for e in range(1, 5):
        assert c.emit(host(epoch=e))
    c.flush(timeout=5)
    assert sink.dropped()["write_error"] == 5
    c.close()


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
