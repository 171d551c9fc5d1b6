"""Exact replay: re-run an episode from its recorded EpisodeContext and compare every value.

Only fields that cannot repeat are ignored: identities (run and episode ids), wall-clock
times, the checkpoint's file name and Karn's own accounting. Everything else — every loss,
accuracy, gradient norm, gate reason and counterfactual — must be bit-identical, and the
first difference is named.

Checkpoints are compared tensor by tensor through :mod:`karn_otel.torch.checkpoints`,
imported when a replay runs: this module itself imports no torch.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from karn_otel.codec import to_jsonable
from karn_otel.contracts import OperatingMode, TelemetryEvent, TelemetryEventType
from karn_otel.sinks.runlog import RunRecord

ET = TelemetryEventType

# (event type, payload field) pairs that legitimately differ between two runs.
VOLATILE: dict[ET, frozenset[str]] = {
    ET.EPISODE_STARTED: frozenset({"episode_id", "timestamp", "git_commit", "software"}),
    ET.HOST_BASELINE: frozenset({"initial_checkpoint"}),
    ET.COUNTERFACTUAL: frozenset({"elapsed_s"}),
    ET.EPISODE_ENDED: frozenset({"wall_time_s"}),
}
SKIPPED_TYPES = frozenset({ET.TELEMETRY_STATS})


@dataclass
class ReplayReport:
    compared: int
    first_difference: str | None
    notes: list[str]

    @property
    def identical(self) -> bool:
        return self.first_difference is None


def comparable(event: TelemetryEvent) -> dict[str, Any]:
    payload = to_jsonable(event.payload)
    for name in VOLATILE.get(event.event_type, ()):
        payload.pop(name, None)
    return {"event_type": event.event_type.value, "epoch": event.epoch, "payload": payload}


def first_difference(recorded: Any, replayed: Any, path: str = "") -> str | None:
    """Path and values of the first difference between two JSON-able values, or None."""
    if isinstance(recorded, dict) and isinstance(replayed, dict):
        for key in list(recorded) + [k for k in replayed if k not in recorded]:
            if key not in replayed:
                return f"{path}.{key}: recorded {recorded[key]!r}, missing in replay"
            if key not in recorded:
                return f"{path}.{key}: not recorded, replay has {replayed[key]!r}"
            d = first_difference(recorded[key], replayed[key], f"{path}.{key}")
            if d:
                return d
        return None
    if isinstance(recorded, list) and isinstance(replayed, list):
        if len(recorded) != len(replayed):
            return f"{path}: recorded {len(recorded)} items, replayed {len(replayed)}"
        for i, (a, b) in enumerate(zip(recorded, replayed)):
            d = first_difference(a, b, f"{path}[{i}]")
            if d:
                return d
        return None
    if type(recorded) is not type(replayed) or recorded != replayed:
        return f"{path}: recorded {recorded!r}, replayed {replayed!r}"
    return None


def compare_events(recorded: list[TelemetryEvent], replayed: list[TelemetryEvent]) -> ReplayReport:
    rec = [e for e in recorded if e.event_type not in SKIPPED_TYPES]
    rep = [e for e in replayed if e.event_type not in SKIPPED_TYPES]
    for i, (a, b) in enumerate(zip(rec, rep)):
        d = first_difference(comparable(a), comparable(b))
        if d:
            where = f"event #{i + 1} ({a.event_type.value}, epoch {a.epoch})"
            return ReplayReport(i, f"{where}: {d.lstrip('.')}", [])
    if len(rec) != len(rep):
        n = min(len(rec), len(rep))
        extra = rec[n] if len(rec) > n else rep[n]
        who = "recorded" if len(rec) > n else "replayed"
        return ReplayReport(
            n,
            f"event #{n + 1}: only the {who} run has it ({extra.event_type.value}, epoch {extra.epoch});"
            f" recorded {len(rec)} events, replayed {len(rep)}",
            [],
        )
    return ReplayReport(len(rec), None, [])


def replay_run(record: RunRecord) -> ReplayReport:
    """Re-run a reference-system run (every episode, in order: a PPO controller carries
    state from one to the next) and compare it with the record."""
    from karn_otel import collector as kc
    from karn_otel.config import KarnConfig
    from karn_otel.reference.trainer import RunConfig, policy_head_sizes, run_reference, software_versions
    from karn_otel.sinks import MemorySink
    from karn_otel.sinks.factory import build_pipeline

    notes: list[str] = []
    first = next(iter(record.episodes.values()))
    cfg = RunConfig.from_hyperparameters(first.hyperparameters)
    sink = MemorySink()
    # The same pipeline as `karn run`: health alerts and dense windows are part of the record.
    kcfg = KarnConfig(
        out_dir=None,
        console="off",
        mode=OperatingMode.RESEARCH if cfg.research else OperatingMode.STANDARD,
        policy_head_sizes=policy_head_sizes(cfg),
    )
    if cfg.nproc > 1:
        replayed, ckpt_note = _replay_ranks(cfg, kcfg, record)
    else:
        collector = kc.KarnCollector(kcfg)
        build_pipeline(kcfg, collector, sinks=[sink])
        previous = kc.install(collector)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                run_reference(cfg, checkpoint_dir=Path(tmp))
                ckpt_note = _compare_checkpoints(record.events, Path(tmp))
        finally:
            kc.install(previous)
        replayed = sink.events
    if first.software and first.software != software_versions():
        notes.append(f"software differs: recorded {first.software}, now {software_versions()}")
    if ckpt_note.endswith("DIFFERS"):
        return ReplayReport(0, ckpt_note, notes)
    if ckpt_note:
        notes.append(ckpt_note)
    report = compare_events(record.events, replayed)
    return ReplayReport(report.compared, report.first_difference, notes)


def _replay_ranks(cfg: Any, kcfg: Any, record: RunRecord) -> tuple[list[TelemetryEvent], str]:
    """Re-run a multi-rank run on as many ranks; returns rank 0's events and the checkpoint note."""
    import dataclasses

    from karn_otel.reference.launch import run_ranks
    from karn_otel.sinks.runlog import read_run

    with tempfile.TemporaryDirectory() as tmp:
        run_id = record.run_id
        result = run_ranks(cfg, dataclasses.replace(kcfg, out_dir=Path(tmp), run_id=run_id))
        if not result.ok:
            raise ValueError(f"the replayed ranks failed: {result.describe()}")
        rec = read_run(Path(tmp) / run_id)
        note = _compare_checkpoints(record.events, Path(tmp) / run_id / "checkpoints")
    return rec.events, note


def _compare_checkpoints(recorded: list[TelemetryEvent], tmp: Path) -> str:
    """Compare every retained initial checkpoint with the replay's, episode by episode."""
    from karn_otel.torch.checkpoints import compare_state_dicts

    paths = [
        Path(e.payload.initial_checkpoint)
        for e in recorded
        if e.event_type is ET.HOST_BASELINE and e.payload.final_host_only_accuracy is None
    ]
    replayed = sorted(tmp.glob("ep*-initial.pt"))  # named ep<index>-<episode id>-initial.pt
    compared = 0
    for path, other in zip(paths, replayed):
        if not path.is_file():
            continue
        if not compare_state_dicts(path, other):
            return f"initial checkpoint of {path.name} DIFFERS"
        compared += 1
    if compared == 0:
        return "initial checkpoint not retained; weights compared through the recorded values only"
    return f"initial checkpoint{'s' if compared > 1 else ''} identical ({compared} retained)"
