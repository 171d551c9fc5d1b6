"""`karn run --nproc 2`: every rank reports, rank 0 adds the reduced view, and it replays."""

from __future__ import annotations

import json

from karn_otel.reference.data import load_digits_data
from karn_otel.sinks.runlog import read_run
from tests.test_cli import karn

N_TRAIN = load_digits_data(0).x_train.shape[0]


def test_two_rank_run_reports_every_rank_and_replays(tmp_path):
    r = karn("run", "--nproc", "2", "--epochs", "3", "--no-live", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rank0 = read_run(run_dir)
    rank1 = read_run(run_dir / "ranks" / "rank1")
    assert rank0.run_id == rank1.run_id == run_dir.name
    hosts0 = [e for e in rank0.events if e.event_type.value == "host_snapshot"]
    local0 = [e for e in hosts0 if not e.is_reduced]
    reduced = [e for e in hosts0 if e.is_reduced]
    local1 = [e for e in rank1.events if e.event_type.value == "host_snapshot"]
    assert len(local0) == len(reduced) == len(local1) == 3
    assert {e.rank for e in local0} == {0} and {e.rank for e in local1} == {1}
    assert all(e.world_size == 2 for e in hosts0 + local1)
    for a, b, red in zip(local0, local1, reduced):
        # The reduced train loss is the two ranks' sample-weighted mean.
        n = N_TRAIN
        n0, n1 = (n + 1) // 2, n // 2  # the training set, strided over 2 ranks
        expect = (a.payload.train_loss * n0 + b.payload.train_loss * n1) / (n0 + n1)
        assert abs(red.payload.train_loss - expect) < 1e-9
        assert red.payload.host_grad_norm == max(a.payload.host_grad_norm, b.payload.host_grad_norm)
        assert a.payload.val_accuracy == b.payload.val_accuracy == red.payload.val_accuracy, "validation is gathered"
    beats = {p.name: json.loads(p.read_text()) for p in (run_dir / "heartbeats").iterdir()}
    assert set(beats) == {"rank0.json", "rank1.json"}
    rp = karn("replay", str(run_dir))
    assert rp.returncode == 0 and "identical" in rp.stdout, rp.stdout + rp.stderr
