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
    # every rank's log is compared, not only rank 0's: a changed value in rank 1's log is found
    compared = int(rp.stdout.split("identical: ")[1].split()[0])
    assert compared > len(rank0.events), rp.stdout
    import dataclasses
    import shutil

    from karn_otel.sinks.runlog import RunLogSink

    events = rank1.events
    i = next(k for k, e in enumerate(events) if e.event_type.value == "host_snapshot")
    bad = dataclasses.replace(events[i], payload=dataclasses.replace(events[i].payload, train_loss=123.0))
    shutil.rmtree(run_dir / "ranks" / "rank1")
    sink = RunLogSink(run_dir / "ranks", "rank1", run_dir=run_dir / "ranks" / "rank1")
    for e in events[:i] + [bad] + events[i + 1 :]:
        sink.handle(e)
    sink.close()
    rp = karn("replay", str(run_dir))
    assert rp.returncode != 0 and "rank 1:" in rp.stdout and "recorded 123.0" in rp.stdout, rp.stdout + rp.stderr


def test_two_rank_run_over_otlp_per_rank_means_per_rank(tmp_path):
    """Decoded OTLP from `karn run --nproc 2`: rank k's series and spans are rank k's own; the job-wide
    values have their own identity (scope="job", no rank); one trace per episode for both ranks."""
    from tests.otlp_receiver import OTLPReceiver

    with OTLPReceiver("http/protobuf") as rx:
        r = karn(
            "run", "--nproc", "2", "--epochs", "3", "--no-live", "--out", str(tmp_path),
            "--otlp-endpoint", rx.endpoint, "--otlp-protocol", "http/protobuf",
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
        rank0, rank1 = read_run(run_dir), read_run(run_dir / "ranks" / "rank1")
        local0 = [e.payload for e in rank0.events if e.event_type.value == "host_snapshot" and not e.is_reduced]
        reduced = [e.payload for e in rank0.events if e.event_type.value == "host_snapshot" and e.is_reduced]
        local1 = [e.payload for e in rank1.events if e.event_type.value == "host_snapshot"]
        assert local0[0].train_loss != reduced[0].train_loss, "the ranks' losses differ: the test can tell"

        def losses(**attrs) -> list[float]:
            return [
                p.value
                for p in rx.metric_points()
                if p.name == "karn.host.train_loss" and all(p.attributes.get(k) == v for k, v in attrs.items())
            ]

        per_rank0 = [v for v in losses(rank=0) if v is not None]
        assert per_rank0 == [h.train_loss for h in local0], "one point per epoch, rank 0's own values"
        assert losses(rank=1) == [h.train_loss for h in local1]
        job = [p for p in rx.metric_points() if p.name == "karn.host.train_loss" and p.attributes.get("scope") == "job"]
        assert [p.value for p in job] == [h.train_loss for h in reduced]
        assert all("rank" not in p.attributes for p in job), "job-wide values belong to no rank"
        assert not [p for p in rx.metric_points() if p.attributes.get("rank") == 0 and p.attributes.get("scope")]

        spans = rx.spans()
        episode_id = rank0.events[0].episode_id
        assert rank1.events[0].episode_id == episode_id, "rank 0 chose the episode id for both"
        assert {s.trace_id for s in spans} == {episode_id}, "one trace for the episode, both ranks in it"
        epochs: dict[int, list[int]] = {0: [], 1: []}
        for s in spans:
            if s.name == "karn.epoch":
                epochs[s.resource["karn.rank"]].append(s.attributes["karn.epoch"])
        assert {k: sorted(v) for k, v in epochs.items()} == {0: [1, 2, 3], 1: [1, 2, 3]}, "one epoch span per rank"
        reductions = [s for s in spans if s.name == "karn.reduction"]
        assert [s.attributes["karn.train_loss"] for s in reductions] == [h.train_loss for h in reduced]
        assert {s.resource["karn.rank"] for s in reductions} == {0}
        roots = [s for s in spans if s.name == "karn.episode"]
        assert sorted(s.resource["karn.rank"] for s in roots) == [0, 1]
        assert all(s.status == "UNSET" for s in roots), "both episodes completed"
