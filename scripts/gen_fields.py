"""docs/fields.md: the field reference of every Karn record, generated from karn_otel/contracts.py.

python scripts/gen_fields.py --write   # rewrite docs/fields.md
python scripts/gen_fields.py --check   # exit 1 when it is stale (tests/test_api_fields.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from karn_otel import contracts  # noqa: E402
from karn_otel.api import HOST_NAMES  # noqa: E402
from karn_otel.generated import write_or_check  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "fields.md"
NESTED = (
    contracts.FactoredAction,
    contracts.RewardComponentsTelemetry,
    contracts.AdvantageStats,
    contracts.RatioStats,
    contracts.LSTMHealth,
    contracts.CounterfactualResult,
    contracts.ShapleyEstimate,
)

# Meanings of the fields whose line in contracts.py carries no comment (a comment there wins).
MEANINGS: dict[str, dict[str, str]] = {
    "EpisodeContext": {
        "episode_id": "id of the episode (init: `ep-` + 8 hex digits)",
        "timestamp": "when the episode started (UTC)",
        "git_commit": 'commit of the code (`"unknown"` outside a git repository)',
        "base_seed": "the run's seed (-1: unknown)",
        "torch_seed": "`torch.initial_seed()` at init (-1: torch not imported)",
        "numpy_seed": "numpy's seed, only when given (it cannot be read back; -1: unknown)",
        "host_architecture": "the model's class name, or a name you give",
        "host_params": "parameters of the host model (count)",
        "max_epochs": "planned epochs (-1: unknown)",
        "task_type": '`"classification"`, `"regression"`, `"rl"`, ... (selects the health checks)',
        "experiment_arm": '`"morph"` or `"control"` inside an experiment',
    },
    "HostSnapshot": {
        "epoch": "epoch index (>= 0, never decreasing)",
        "train_loss": "training loss (the loop's units)",
        "train_accuracy": "training accuracy, fraction in [0, 1] (NaN: not computed)",
        "val_loss": "validation loss",
        "val_accuracy": "validation accuracy, fraction in [0, 1] (NaN: not computed)",
        "host_params": "host parameters (count)",
        "total_seed_params": "parameters of all seeds (count)",
        "total_params": "host + seeds (count)",
        "fossilized_params": "parameters of fossilized seeds (count)",
        "host_grad_norm": "L2 norm of the host's gradient (NaN: not computed)",
        "seed_grad_norms": "slot id -> L2 norm of the seed's gradient",
        "grad_isolation_leakage": "gradient leaking from seeds into the host (None: not measured)",
    },
    "EpisodeSummary": {
        "epochs_completed": "epochs the run went through",
        "final_val_loss": "last validation loss (NaN: never logged)",
        "final_val_accuracy": "last validation accuracy, fraction (NaN: never logged, e.g. RL)",
        "host_only_accuracy": "accuracy with every seed removed (None: not measured)",
        "host_params": "host parameters (count)",
        "total_params": "host + seeds at the end (count)",
        "fossilized_params": "fossilized seed parameters (count)",
        "wall_time_s": "seconds from init to finish",
        "task_type": "the run's task (None: written by an older emitter)",
    },
    "Scalars": {
        "step": "the step given to `run.log` (else the epoch, else the call's index)",
        "values": "name -> value (floats; NaN and inf kept)",
    },
}


def _type(tp: object) -> str:
    text = str(tp) if not isinstance(tp, type) else tp.__name__
    text = re.sub(r"\b(typing|karn_otel\.contracts|pathlib|datetime)\.", "", text)
    text = text.replace("NoneType", "None").replace("Union[", "union[")
    return text.replace("|", "\\|")


def _comments(cls: type) -> dict[str, str]:
    """The ``# ...`` comment on each field's line, and the comment lines just above it."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        s = line.strip()
        if s.startswith("#"):
            above.append(s.lstrip("# "))
            continue
        m = re.match(r"(\w+)\s*:\s*[^#]*?(?:#\s*(.*))?$", s)
        if m and not s.startswith(("def ", "@", "return", '"')):
            text = " ".join([*above, m.group(2) or ""]).strip()
            if text:
                out[m.group(1)] = text
        above = []
    return out


def _default(f: dataclasses.Field) -> str:  # type: ignore[type-arg]
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{f.default_factory()!r}`"
    return "**required**"


def _table(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    notes = {**MEANINGS.get(cls.__name__, {}), **_comments(cls)}
    doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
    lines = [f"### `{cls.__name__}`", ""]
    if doc and not doc.startswith(cls.__name__ + "("):
        lines += [doc, ""]
    lines += ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        note = notes.get(f.name, "").replace("|", "\\|")
        lines.append(f"| `{f.name}` | `{_type(hints[f.name])}` | {_default(f)} | {note} |")
    return [*lines, ""]


def render() -> str:
    lines = [
        "# Field reference",
        "",
        "<!-- generated by `python scripts/gen_fields.py --write` from karn_otel/contracts.py: do not edit -->",
        "",
        "Every record Karn writes, field by field. `karn_otel.init` / `run.log` fill these for you",
        "(see [tutorial.md](tutorial.md)); the typed contracts are the full-power API underneath",
        "(`run.emit(...)`, `karn_otel.emit(...)`), with the same validation.",
        "",
        "## What `run.log` fills",
        "",
        "With `epoch=`, these names fill the epoch's `HostSnapshot` (written once it has both",
        "`train_loss` and `val_loss`; a field never logged is NaN, not invented). Every other name,",
        "and every name logged with only `step=`, is kept in a `Scalars` record.",
        "",
        "| logged name | HostSnapshot field |",
        "|---|---|",
        *[f"| `{k}` | `{v}` |" for k, v in HOST_NAMES.items()],
        "",
        "`init` fills `EpisodeContext`; what it cannot know is named in `unknown_fields` and",
        'recorded as -1 (a seed, `max_epochs`), 0 (a parameter count) or `"unknown"`.',
        "`finish` writes `EpisodeSummary`, with `final_metrics` (the last value of every logged",
        "name; for RL the mean return and episode length over the last 100 episodes).",
        "",
        "## Records (one per event type)",
        "",
        "| event type | record |",
        "|---|---|",
        *[
            f"| `{et.value}` | [`{cls.__name__}`](#{cls.__name__.lower()}) |"
            for et, cls in contracts.PAYLOAD_TYPES.items()
        ],
        "",
    ]
    for cls in contracts.PAYLOAD_TYPES.values():
        lines += _table(cls)
    lines += ["## Nested records", ""]
    for cls in NESTED:
        lines += _table(cls)
    lines += ["## The envelope", "", *_table(contracts.TelemetryEvent)[2:]]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    return write_or_check(
        render(), DOC, write=args.write, check=args.check, regenerate="python scripts/gen_fields.py --write"
    )


if __name__ == "__main__":
    raise SystemExit(main())
