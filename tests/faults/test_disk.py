"""Disk faults cost no training step and are reported: a full filesystem, one remounted
read-only mid-run, a frozen one (shutdown still returns within its bound), a deleted run
directory, a disk that stops answering; and the trainer's checkpoint writes, guarded the same
way. The real faults need root (tmpfs, loop-mounted ext4, fsfreeze) and skip otherwise; the
hung disk and the deleted run dir need nothing."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from karn_otel import collector as kc
from karn_otel.config import KarnConfig
from karn_otel.contracts import Scalars
from karn_otel.sinks.runlog import RunLogSink, read_run
from karn_otel.torch.checkpoints import save_checkpoint
from tests.conftest import make_context

# No single emit may take longer than this, whatever the disk does: a step that waited on the
# disk would wait seconds (the stall bound) or forever (frozen); 0.25 s leaves room for a
# loaded CI machine descheduling the process.
STEP_BUDGET_S = 0.25


def _collector(out: Path, **sink_kw) -> tuple[kc.KarnCollector, RunLogSink]:
    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off"))
    sink = RunLogSink(out, c.run_id, **sink_kw)
    c.add_sink(sink)
    return c, sink


def _emit_steps(c: kc.KarnCollector, first: int, n: int) -> float:
    """Emit n Scalars steps (~700 bytes each on disk); the slowest emit, in seconds."""
    worst = 0.0
    for s in range(first, first + n):
        t0 = time.perf_counter()
        assert c.emit(Scalars(s, {f"m{i:02d}": s + i / 7 for i in range(20)}))
        worst = max(worst, time.perf_counter() - t0)
    return worst


def _unlink_counter(sink: RunLogSink) -> None:
    if sink.counter.name:
        Path("/dev/shm", sink.counter.name).unlink(missing_ok=True)


def test_full_filesystem(small_tmpfs, caplog):
    c, sink = _collector(small_tmpfs)
    c.emit(make_context())
    worst = _emit_steps(c, 0, 3000)  # ~2 MB into 256 KiB
    t0 = time.perf_counter()
    c.flush(timeout=10)
    assert time.perf_counter() - t0 < 1.0 and worst < STEP_BUDGET_S
    lost = sink.dropped()["write_error"]
    assert lost > 2000
    assert "Karn run log write failed" in caplog.text and "No space left on device" in caplog.text
    unwritten = c.pipeline.close(timeout=5)
    assert unwritten == {}
    assert c.stats().dropped["RunLogSink:write_error"] == lost, "the summary counts it"
    rec = read_run(small_tmpfs / c.run_id)
    # What is on disk is whole blocks (a failed write is cut back), and the count is exact.
    assert not rec.skipped and not rec.integrity.bad
    acc = rec.accounting
    assert acc.emitted == 3001 and acc.on_disk + lost == 3001
    assert acc.on_disk > 0, "the whole blocks of a write cut short by the full disk are kept"
    _unlink_counter(sink)


def test_checkpoint_on_a_full_filesystem_is_reported_not_raised(small_tmpfs, caplog):
    (small_tmpfs / "filler").write_bytes(b"\0" * (250 << 10))
    state = {"w": torch.zeros(64, 64)}
    t0 = time.perf_counter()
    assert save_checkpoint(state, small_tmpfs / "ck" / "initial.pt") is False
    assert time.perf_counter() - t0 < 1.0
    assert "could not write checkpoint" in caplog.text and "No space left on device" in caplog.text
    assert not list((small_tmpfs / "ck").glob("*")), "no partial file left behind"


def test_filesystem_turned_read_only_mid_run(ext4_fs, caplog):
    c, sink = _collector(ext4_fs.mnt)
    c.emit(make_context())
    _emit_steps(c, 0, 50)
    c.flush(timeout=5)
    ext4_fs.make_read_only()
    worst = _emit_steps(c, 50, 200)
    c.flush(timeout=5)
    assert worst < STEP_BUDGET_S
    assert sink.dropped()["write_error"] == 200
    assert "Read-only file system" in caplog.text
    c.pipeline.close(timeout=5)
    assert "could not write the final accounting" in caplog.text
    rec = read_run(ext4_fs.mnt / c.run_id)
    acc = rec.accounting
    assert len(rec.events) == 51 and not rec.skipped
    assert acc.source == "live counter" and acc.emitted == 251 and acc.missing == 200
    assert "dropped writer_errors 200" in acc.lines()[0]
    _unlink_counter(sink)


def test_frozen_filesystem_shutdown_returns_within_its_bound(ext4_fs, caplog):
    c, sink = _collector(ext4_fs.mnt)
    c.emit(make_context())
    _emit_steps(c, 0, 100)
    c.flush(timeout=5)
    ext4_fs.freeze()
    try:
        worst = _emit_steps(c, 100, 2000)  # the writer blocks in write(2) on the frozen fs
        t0 = time.perf_counter()
        c.flush(timeout=10)  # the episode-end flush gives up on a disk that does not answer
        flush_s = time.perf_counter() - t0
        assert worst < STEP_BUDGET_S and flush_s < 1.0, (worst, flush_s)
        assert "the disk has not answered" in caplog.text
        kc.install(c)
        t0 = time.perf_counter()
        unwritten = kc.shutdown()  # the default bound: 5 s
        took = time.perf_counter() - t0
        assert took < 5.5, f"shutdown took {took:.2f} s"
        assert unwritten == {"RunLogSink:unwritten_at_shutdown": 2000}, "exactly what was emitted after the freeze"
        assert c.stats().dropped["RunLogSink:unwritten_at_shutdown"] == 2000
        assert "shutdown bound of 5.0 s reached" in caplog.text
    finally:
        ext4_fs.thaw()
    time.sleep(0.3)  # the write that was blocked may land now; nothing after it does
    rec = read_run(ext4_fs.mnt / c.run_id)
    acc = rec.accounting
    assert acc.source == "live counter", "no final accounting was written after the bound"
    assert 101 <= acc.on_disk <= 2101 and acc.missing == 2101 - acc.on_disk
    assert not rec.skipped
    _unlink_counter(sink)


def test_deleted_run_dir_is_reported_and_counted(tmp_path, caplog):
    c, sink = _collector(tmp_path)
    c.emit(make_context())
    _emit_steps(c, 0, 100)
    c.flush(timeout=5)
    shutil.rmtree(tmp_path / c.run_id)
    worst = _emit_steps(c, 100, 100)
    time.sleep(sink.flush_interval_s * 3)  # the writer notices on its next wake
    c.flush(timeout=5)
    assert worst < STEP_BUDGET_S
    assert "was deleted while the run was writing it" in caplog.text
    assert sink.dropped() == {"run_dir_deleted": 201}, "every event: nothing of the run is left on disk"
    c.close()
    assert c.stats().dropped == {"RunLogSink:run_dir_deleted": 201}
    assert not (tmp_path / c.run_id).exists()
    _unlink_counter(sink)


def test_a_disk_that_stops_answering_costs_no_step_and_shutdown_is_bounded(tmp_path, caplog):
    """Without root: events.jsonl is a FIFO nobody reads, so write(2) blocks once the pipe is
    full, exactly as on a hung disk."""
    run_id = "hung"
    (tmp_path / run_id).mkdir()
    fifo = tmp_path / run_id / "events.jsonl"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opened, never read
    try:
        sink = RunLogSink(tmp_path, run_id)
        c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", run_id=run_id), sinks=[sink])
        c.emit(make_context())
        worst = _emit_steps(c, 0, 3000)
        t0 = time.perf_counter()
        c.flush(timeout=10)
        assert worst < STEP_BUDGET_S and time.perf_counter() - t0 < 1.0
        t0 = time.perf_counter()
        unwritten = c.pipeline.close(timeout=1.0)
        assert time.perf_counter() - t0 < 1.5
        n = unwritten["RunLogSink:unwritten_at_shutdown"]
        assert 0 < n <= 3001 and sink.stalled() > 0
        with caplog.at_level(logging.WARNING):
            assert "shutdown bound of 1.0 s reached" in caplog.text
    finally:
        os.close(reader)  # the writer's write fails (EPIPE) and its thread ends
    _unlink_counter(sink)


def test_checkpoint_write_to_a_disk_that_does_not_answer_is_bounded(tmp_path, caplog):
    target = tmp_path / "initial.pt"
    os.mkfifo(tmp_path / "initial.pt.tmp")  # opening it for writing blocks: no reader
    t0 = time.perf_counter()
    assert save_checkpoint({"w": torch.ones(3)}, target, timeout_s=0.5) is False
    assert 0.5 <= time.perf_counter() - t0 < 1.0
    assert "not written within 0.5 s" in caplog.text
    os.close(os.open(tmp_path / "initial.pt.tmp", os.O_RDONLY | os.O_NONBLOCK))  # release the writer


def test_checkpoint_written_whole_and_loadable(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    assert save_checkpoint(state, tmp_path / "a" / "b.pt") is True
    assert torch.equal(torch.load(tmp_path / "a" / "b.pt", weights_only=True)["w"], state["w"])
    assert not (tmp_path / "a" / "b.pt.tmp").exists()
    (tmp_path / "file").write_text("x")
    assert save_checkpoint(state, tmp_path / "file" / "c.pt") is False  # parent is a file


@pytest.mark.slow
def test_the_reference_trainer_survives_a_full_disk_for_its_checkpoint(small_tmpfs, memory_collector, caplog):
    """The issue's crash: the trainer's unguarded torch.save of the initial checkpoint ended a
    run on a full filesystem. Now the episode runs to its end without it, and says so."""
    from karn_otel.contracts import TelemetryEventType as ET
    from karn_otel.reference.trainer import ReferenceTrainer, RunConfig

    (small_tmpfs / "filler").write_bytes(b"\0" * (250 << 10))
    trainer = ReferenceTrainer(RunConfig(epochs=1, seed=0), small_tmpfs / "checkpoints")
    trainer.run()
    assert trainer.initial_checkpoint is None
    assert "could not write checkpoint" in caplog.text and "No space left on device" in caplog.text
    sink = memory_collector.sinks[0]
    assert [e.event_type for e in sink.events][-1] is ET.EPISODE_ENDED, "the episode ran to its end"
