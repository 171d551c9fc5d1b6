"""The reference trainer with the PPO controller: updates, complete PolicySnapshots, collapse alerts."""

from __future__ import annotations

import dataclasses
import math

import karn_otel
from karn_otel.config import KarnConfig
from karn_otel.contracts import TelemetryEventType as ET
from karn_otel.reference.trainer import RunConfig, policy_head_sizes, run_reference
from karn_otel.sinks import MemorySink

CFG = RunConfig(epochs=6, episodes=3, controller="ppo", warmup_epochs=1)


def _run(cfg: RunConfig) -> list:
    sink = MemorySink()
    karn_otel.configure(
        KarnConfig(out_dir=None, console="off", strict=True, policy_head_sizes=policy_head_sizes(cfg)), sinks=[sink]
    )
    run_reference(cfg)
    karn_otel.shutdown()
    return sink.events


def _finite(x) -> bool:
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_finite(v) for v in x)
    if dataclasses.is_dataclass(x):
        return all(_finite(getattr(x, f.name)) for f in dataclasses.fields(x))
    return True


def test_ppo_run_records_complete_policy_snapshots():
    events = _run(CFG)
    updates = [e.payload for e in events if e.event_type is ET.PPO_UPDATE]
    assert len(updates) >= 3, "one update per episode at least"
    snaps = [e.payload for e in events if e.event_type is ET.POLICY_SNAPSHOT]
    decisions = [e.payload for e in events if e.event_type is ET.CONTROLLER_DECISION]
    assert len(snaps) == len(decisions) == CFG.epochs * CFG.episodes
    for s in snaps:
        for f in dataclasses.fields(s):
            assert getattr(s, f.name) is not None, f"PolicySnapshot.{f.name} is None"
        assert _finite(s), s
        assert s.action_log_probs and "op" in s.action_log_probs and s.entropy
        assert abs(s.reward_total - s.reward_components.total) < 1e-9
    assert all(d.shadow_action is not None for d in decisions), "the heuristic decides beside the policy"
    assert {e.episode_id for e in events if e.event_type is ET.EPISODE_STARTED}.__len__() == 3


def test_forced_entropy_collapse_raises_the_alert():
    events = _run(dataclasses.replace(CFG, inject_entropy_collapse=True, episodes=1))
    alerts = [e.payload.check for e in events if e.event_type is ET.HEALTH_ALERT]
    assert "entropy_collapse" in alerts
    modes = [e.payload.reason for e in events if e.event_type is ET.MODE_CHANGE]
    assert any("entropy_collapse" in r for r in modes), "a dense window opens on entropy collapse"
    healthy = _run(dataclasses.replace(CFG, episodes=1))
    assert "entropy_collapse" not in [e.payload.check for e in healthy if e.event_type is ET.HEALTH_ALERT]
