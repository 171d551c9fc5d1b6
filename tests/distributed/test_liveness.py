"""karn_otel.distributed.liveness: heartbeat files, missing ranks, the monitor and rank 0's
watcher, on a fake clock; then a real 2-rank job in which one rank dies."""

from __future__ import annotations

import json
import time

import pytest

from karn_otel.codec import from_jsonable, to_jsonable
from karn_otel.contracts import HealthAlert, Severity
from karn_otel.distributed.launch import spawn
from karn_otel.distributed.liveness import (
    RANK_MISSING_CHECK,
    MissingRankMonitor,
    RankHeartbeat,
    RankWatch,
    missing_rank_count,
    missing_ranks,
    rank_missing_alert,
    read_heartbeats,
)
from tests.distributed import _dist_worker as w


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_rank_that_stops_beating_goes_missing(tmp_path):
    clock = FakeClock()
    beats = [RankHeartbeat(tmp_path, r, clock=clock) for r in range(3)]
    assert missing_ranks(tmp_path, 3, timeout_s=10, now=clock.t) == []
    clock.t += 8
    beats[0].beat(1)
    beats[2].beat(1)
    clock.t += 5  # rank 1 last beat 13 s ago
    assert missing_ranks(tmp_path, 3, timeout_s=10, now=clock.t) == [1]
    assert missing_rank_count(tmp_path, 3, 10, now=clock.t) == 1
    assert missing_ranks(tmp_path, 4, timeout_s=10, now=clock.t) == [1, 3]  # rank 3 never reported
    beats[1].finish(1)
    clock.t += 100
    assert missing_ranks(tmp_path, 3, timeout_s=10, now=clock.t) == [0, 2]  # finished ranks are never missing


def test_heartbeat_files_are_whole_and_foreign_files_ignored(tmp_path):
    hb = RankHeartbeat(tmp_path, 0).beat(7)
    assert read_heartbeats(tmp_path, 1)[0] == hb
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json"]  # no temporary file left
    (tmp_path / "rank1.json").write_text("{not json")
    (tmp_path / "rank2.json").write_text('{"rank": 2, "epoch": 1, "time": "yesterday"}')
    (tmp_path / "rank3.json").write_text(json.dumps({**to_jsonable(hb), "rank": 0}))  # someone else's
    assert list(read_heartbeats(tmp_path, 4)) == [0]
    assert missing_ranks(tmp_path, 4, timeout_s=60) == [1, 2, 3]


def test_missing_rank_alert_names_the_rank(tmp_path):
    clock = FakeClock()
    RankHeartbeat(tmp_path, 0, clock=clock)
    one = RankHeartbeat(tmp_path, 1, clock=clock)
    one.beat(4)
    clock.t += 30
    RankHeartbeat(tmp_path, 0, clock=clock).beat(5)
    alert = rank_missing_alert([1], 2, 10.0, read_heartbeats(tmp_path, 2), now=clock.t)
    assert isinstance(alert, HealthAlert)
    assert (alert.check, alert.severity) == (RANK_MISSING_CHECK, Severity.CRITICAL)
    assert (alert.value, alert.threshold) == (1.0, 0.0)  # one rank missing; any is too many
    assert "rank 1 of 2 stopped reporting" in alert.message and "epoch 4 30.0 s ago" in alert.message
    assert rank_missing_alert([], 2, 10.0) is None
    assert "rank 3 never reported" in rank_missing_alert([3], 4, 10.0).message


def test_monitor_alerts_once_per_loss_and_again_on_relapse(tmp_path):
    clock = FakeClock()
    beats = [RankHeartbeat(tmp_path, r, clock=clock) for r in range(2)]
    mon = MissingRankMonitor(tmp_path, 2, timeout_s=5, clock=clock)
    assert mon.check() is None and mon.count() == 0
    clock.t += 6
    beats[0].beat(1)
    assert "rank 1" in mon.check().message
    assert mon.check() is None and mon.count() == 1  # still missing: no second alert
    beats[1].beat(1)
    assert mon.check() is None and mon.count() == 0
    clock.t += 6
    beats[0].beat(2)
    assert mon.check() is not None  # relapse


def test_the_watcher_emits_one_alert_from_its_own_thread(tmp_path):
    RankHeartbeat(tmp_path, 0).finish(1)  # done: never missing
    RankHeartbeat(tmp_path, 1, clock=lambda: time.time() - 100)  # silent for 100 s
    alerts: list[HealthAlert] = []
    watch = RankWatch(tmp_path, 2, timeout_s=1.0, emit=alerts.append).start()
    try:
        deadline = time.monotonic() + 10
        while not alerts and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.6)  # one more check: rank 1 is still missing, which is not a new alert
    finally:
        watch.stop()
    assert len(alerts) == 1 and alerts[0].check == RANK_MISSING_CHECK
    assert alerts[0].message.startswith("rank 1 of 2 stopped reporting")


def test_the_watcher_validates_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="timeout_s"):
        RankWatch(tmp_path, 2, timeout_s=0)


# =========================================================================== real 2-rank jobs (gloo, 127.0.0.1)


def test_finished_ranks_are_not_missing(two_ranks):
    _, _, out = two_ranks
    assert missing_ranks(out / "heartbeats", 2, timeout_s=0.001) == []


def test_a_dead_rank_is_detected_reported_and_its_peer_terminated(tmp_path):
    # grace_s leaves rank 0 ample time (its monitor needs ~0.5 s) to report before it is terminated.
    result = spawn(w.dies_after_heartbeat, 2, (str(tmp_path),), num_threads=1, timeout_s=120, grace_s=5)
    assert result.first_failure == 1 and result.exit_codes[1] == 1 and not result.timed_out
    assert result.exit_codes[0] < 0  # rank 0 hung and was terminated after the grace period
    assert "RuntimeError: rank 1 fails on purpose" in result.errors[1]
    assert result.describe().startswith("rank 1 exited with code 1 (first failure)")
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["missing"] == [1] and report["count"] == 1
    alert = from_jsonable(HealthAlert, report["alert"])
    assert alert.check == RANK_MISSING_CHECK and alert.severity is Severity.CRITICAL
    assert alert.message.startswith("rank 1 of 2 stopped reporting")
