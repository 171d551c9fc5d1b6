"""Exact replay: re-run an episode from its recorded EpisodeContext and compare every value.

Only fields that cannot repeat are ignored: identities (run and episode ids), wall-clock
times, the checkpoint's file name and Karn's own accounting. Everything else — every loss,
accuracy, gradient norm, gate reason and counterfactual — must be bit-identical, and the
first difference is named.

Checkpoints are compared tensor by tensor through :mod:`karn_otel.torch.checkpoints`,
imported when a replay runs: this module itself imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from karn_otel.codec import printable, safe_repr, to_jsonable, type_name
from karn_otel.contracts import HostBaseline, OperatingMode, TelemetryEvent, TelemetryEventType
from karn_otel.sinks.runlog import RunRecord

ET = TelemetryEventType

# (event type, payload field) pairs that legitimately differ between two runs.
VOLATILE: dict[ET, frozenset[str]] = {
    ET.EPISODE_STARTED: frozenset({"episode_id", "timestamp", "git_commit", "software"}),
    ET.HOST_BASELINE: frozenset({"initial_checkpoint"}),
    ET.COUNTERFACTUAL: frozenset({"elapsed_s", "wait_s"}),
    ET.RANK_SUMMARY: frozenset({"busy_s", "wait_s"}),  # timings; the rest (losses, health) repeats
    ET.PPO_UPDATE: frozenset({"elapsed_s"}),
    ET.EPISODE_ENDED: frozenset({"wall_time_s"}),
}
SKIPPED_TYPES = frozenset({ET.TELEMETRY_STATS})


class ReplayError(ValueError):
    """The run cannot be replayed; the message is one line for the user."""


# What `karn run` records (reference/trainer.py): a run whose context says otherwise was not
# produced by the reference system, and is refused before anything is imported or trained.
REFERENCE_ARCHITECTURE = "cnn_3block"
REFERENCE_TASK = "classification"
_REQUIRED: dict[str, type] = {"epochs": int, "seed": int, "widths": str, "controller": str, "batch_size": int}
# Bounds on what an untrusted run dir may ask a replay to do.
_LIMITS = {"epochs": 100_000, "episodes": 10_000, "nproc": 64, "num_threads": 256, "batch_size": 1 << 20}
_LOWER = {"inject_fault_rank": -1}  # -1: every rank; other ints are >= 0
_MAX_WIDTH = 4096
_COMPILE_BACKENDS = ("", "eager", "aot_eager", "inductor")
_CHECKPOINT_NAME = re.compile(r"ep\d{3}-[0-9a-f]{32}-initial\.pt")


def check_replayable(record: RunRecord) -> None:
    """Refuse, at once and without importing torch, a run the reference system did not produce.

    Raises ReplayError naming what gave it away (the host architecture, the task, missing
    hyperparameters)."""
    if not record.episodes:
        raise ReplayError("no episode context recorded")
    for ctx in record.episodes.values():
        if ctx.host_architecture != REFERENCE_ARCHITECTURE or ctx.task_type != REFERENCE_TASK:
            raise ReplayError(
                f"run {printable(record.run_id)} was not produced by Karn's reference system (host "
                f"{printable(ctx.host_architecture)!s}, task {printable(ctx.task_type)}); `karn replay` re-runs "
                "runs of `karn run` only"
            )
        hp = ctx.hyperparameters
        missing = [k for k in _REQUIRED if k not in hp]
        if missing:
            raise ReplayError(
                f"run {printable(record.run_id)} was not produced by Karn's reference system "
                f"(its hyperparameters lack {', '.join(missing)})"
            )
        for k, want in _REQUIRED.items():
            if type(hp[k]) is not want:
                raise ReplayError(f"hyperparameter {k} = {safe_repr(hp[k])} is not a {want.__name__}")


def run_config_of(hp: dict[str, Any]) -> Any:
    """The reference RunConfig recorded in ``hp``, every value checked against the field's type
    and bounds (an untrusted run dir must not make a replay spawn 10**6 ranks)."""
    from karn_otel.reference.trainer import RunConfig

    defaults = RunConfig()
    clean: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name not in hp:
            continue
        v, want = hp[f.name], type(getattr(defaults, f.name))
        if want is tuple:
            ok = isinstance(v, str) and len(v) <= 10_000
        elif want is float:
            ok = type(v) in (int, float) and math.isfinite(v)
        else:
            ok = type(v) is want
        if not ok:
            raise ReplayError(f"hyperparameter {f.name} = {safe_repr(v)} is not a {want.__name__}")
        if want is int and not _LOWER.get(f.name, 0) <= v <= _LIMITS.get(f.name, 2**31):
            raise ReplayError(f"hyperparameter {f.name} = {safe_repr(v)} is out of range")
        if want is str and (len(v) > 200 or not v.isprintable()):
            raise ReplayError(f"hyperparameter {f.name} = {safe_repr(v)} is not a plain short string")
        clean[f.name] = v
    try:
        cfg = RunConfig.from_hyperparameters(clean)
    except (ValueError, TypeError) as exc:
        raise ReplayError(f"hyperparameters: {printable(str(exc), 200)}") from None
    if not all(1 <= w <= _MAX_WIDTH for w in cfg.widths) or len(cfg.widths) != 3:
        raise ReplayError(f"hyperparameter widths = {safe_repr(hp.get('widths'))} is out of range")
    if cfg.compile not in _COMPILE_BACKENDS:
        raise ReplayError(f"hyperparameter compile = {safe_repr(cfg.compile)} is not one of {_COMPILE_BACKENDS}")
    if not re.fullmatch(r"cpu|cuda(:\d{1,2})?|mps", cfg.device):
        raise ReplayError(f"hyperparameter device = {safe_repr(cfg.device)} is not a torch device Karn uses")
    return cfg


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


def _show(v: Any, limit: int = 200) -> str:
    """repr of a recorded (untrusted) value, bounded; never raises."""
    try:
        text = repr(v)
    except Exception:
        return safe_repr(v)
    return text if len(text) <= limit else text[:limit] + f"...(+{len(text) - limit} chars)"


def first_difference(
    recorded: Any, replayed: Any, path: str = "", names: tuple[str, str] = ("recorded", "replayed")
) -> str | None:
    """Path and values of the first difference between two JSON-able values, or None.

    ``names`` say what the two sides are in the message (``karn diff`` passes ``("A", "B")``).
    """
    a_name, b_name = names
    if isinstance(recorded, dict) and isinstance(replayed, dict):
        for key in list(recorded) + [k for k in replayed if k not in recorded]:
            if key not in replayed:
                return f"{path}.{key}: {a_name} {_show(recorded[key])}, missing in {b_name}"
            if key not in recorded:
                return f"{path}.{key}: missing in {a_name}, {b_name} {_show(replayed[key])}"
            d = first_difference(recorded[key], replayed[key], f"{path}.{key}", names)
            if d:
                return d
        return None
    if isinstance(recorded, list) and isinstance(replayed, list):
        if len(recorded) != len(replayed):
            return f"{path}: {a_name} has {len(recorded)} items, {b_name} {len(replayed)}"
        for i, (a, b) in enumerate(zip(recorded, replayed)):
            d = first_difference(a, b, f"{path}[{i}]", names)
            if d:
                return d
        return None
    if type(recorded) is not type(replayed) or recorded != replayed:
        return f"{path}: {a_name} {_show(recorded)}, {b_name} {_show(replayed)}"
    return None


def compare_events(recorded: list[TelemetryEvent], replayed: list[TelemetryEvent]) -> ReplayReport:
    rec = [e for e in recorded if e.event_type not in SKIPPED_TYPES]
    rep = [e for e in replayed if e.event_type not in SKIPPED_TYPES]
    for i, (a, b) in enumerate(zip(rec, rep)):
        ca, cb = comparable(a), comparable(b)
        if a.event_type is ET.CONTROLLER_DECISION and ca["payload"].get("applied") is None:
            cb["payload"].pop("applied", None)  # a log from before decisions said whether they took effect
            ca["payload"].pop("applied", None)
        d = first_difference(ca, cb)
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
    from karn_otel.reference.trainer import policy_head_sizes, run_reference, software_versions
    from karn_otel.sinks import MemorySink
    from karn_otel.sinks.factory import build_pipeline

    notes: list[str] = []
    check_replayable(record)
    first = next(iter(record.episodes.values()))
    cfg = run_config_of(first.hyperparameters)
    sink = MemorySink()
    # The same pipeline as `karn run`: health alerts and dense windows are part of the record.
    kcfg = KarnConfig(
        out_dir=None,
        console="off",
        mode=OperatingMode.RESEARCH if cfg.research else OperatingMode.STANDARD,
        policy_head_sizes=policy_head_sizes(cfg),
    )
    other_ranks: list[tuple[int, list[TelemetryEvent], list[TelemetryEvent]]] = []
    if cfg.nproc > 1:
        replayed, ckpt_note, other_ranks = _replay_ranks(cfg, kcfg, record)
    else:
        collector = kc.KarnCollector(kcfg)
        build_pipeline(kcfg, collector, sinks=[sink])
        previous = kc.install(collector)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                run_reference(cfg, checkpoint_dir=Path(tmp))
                ckpt_note = _compare_checkpoints(record, Path(tmp))
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
    compared, first = report.compared, report.first_difference
    for k, recorded, again in other_ranks:  # every rank's own log, not only rank 0's
        if not recorded:
            notes.append(f"rank {k}: no log in the record (ranks/rank{k}/); not compared")
            continue
        r = compare_events(recorded, again)
        compared += r.compared
        if first is None and r.first_difference is not None:
            first = f"rank {k}: {r.first_difference}"
    return ReplayReport(compared, first, notes)


def _replay_ranks(
    cfg: Any, kcfg: Any, record: RunRecord
) -> tuple[list[TelemetryEvent], str, list[tuple[int, list[TelemetryEvent], list[TelemetryEvent]]]]:
    """Re-run a multi-rank run on as many ranks; returns rank 0's events, the checkpoint note
    and, for each rank k > 0, (k, its recorded events, its replayed events) from
    ``ranks/rank<k>/`` (an empty recorded list where the record has no log for it)."""
    import dataclasses

    from karn_otel.reference.launch import run_ranks
    from karn_otel.sinks.runlog import read_run

    others: list[tuple[int, list[TelemetryEvent], list[TelemetryEvent]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        run_id = record.run_id
        result = run_ranks(cfg, dataclasses.replace(kcfg, out_dir=Path(tmp), run_id=run_id))
        if not result.ok:
            raise ValueError(f"the replayed ranks failed: {result.describe()}")
        rec = read_run(Path(tmp) / run_id)
        note = _compare_checkpoints(record, Path(tmp) / run_id / "checkpoints")
        for k in range(1, cfg.nproc):
            sub = Path("ranks") / f"rank{k}"
            replayed = read_run(Path(tmp) / run_id / sub).events
            recorded_dir = Path(record.run_dir) / sub
            recorded = read_run(recorded_dir).events if (recorded_dir / "events.jsonl").is_file() else []
            others.append((k, recorded, replayed))
    return rec.events, note, others


def recorded_checkpoints(record: RunRecord) -> list[Path | None]:
    """Each episode's initial checkpoint as a path inside ``record.run_dir/checkpoints`` (None
    where it is absent or the record names something else).

    The recorded path is untrusted: only its file name is used, and only when it is a name the
    trainer writes (``ep<k>-<episode id>-initial.pt``) and the file, symlinks resolved, lies
    inside the run directory. Nothing outside the run dir is ever opened."""
    root = Path(os.path.realpath(record.run_dir))
    out: list[Path | None] = []
    for e in record.events:
        p = e.payload
        if (
            e.event_type is not ET.HOST_BASELINE
            or not isinstance(p, HostBaseline)
            or p.final_host_only_accuracy is not None
        ):
            continue
        name = PurePath(str(p.initial_checkpoint)).name
        path = root / "checkpoints" / name
        real = Path(os.path.realpath(path))
        ok = _CHECKPOINT_NAME.fullmatch(name) and real.is_relative_to(root) and real.is_file()
        out.append(real if ok else None)
    return out


def _compare_checkpoints(record: RunRecord, tmp: Path) -> str:
    """Compare every retained initial checkpoint with the replay's, episode by episode."""
    from karn_otel.torch.checkpoints import compare_state_dicts

    # Named ep<index>-<episode id>-initial.pt; the episode ids differ between the run and its
    # replay, so the two are paired by episode index. Retention may have removed some on
    # either side (keep_last keeps only the last episode's): those are skipped, not misaligned.
    replayed = {p.name.split("-", 1)[0]: p for p in tmp.glob("ep*-initial.pt")}
    compared = 0
    for path in recorded_checkpoints(record):
        other = replayed.get(path.name.split("-", 1)[0]) if path is not None else None
        if path is None or other is None:
            continue
        try:
            same = compare_state_dicts(path, other)
        except Exception as exc:  # an untrusted file: unreadable is a note, not a crash
            return f"initial checkpoint {printable(path.name)} unreadable ({type_name(exc)}); not compared"
        if not same:
            return f"initial checkpoint of {path.name} DIFFERS"
        compared += 1
    if compared == 0:
        return "initial checkpoint not retained; weights compared through the recorded values only"
    return f"initial checkpoint{'s' if compared > 1 else ''} identical ({compared} retained)"
