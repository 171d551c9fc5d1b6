"""docs/fields.md is generated from the contracts and current; the records a plain loop
writes are documented field by field."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from karn_otel import contracts

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gen_fields", REPO / "scripts" / "gen_fields.py")
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)


def test_the_field_reference_is_current():
    assert (REPO / "docs" / "fields.md").read_text() == gen.render(), "run: python scripts/gen_fields.py --write"


def test_every_field_is_listed_and_the_plain_loop_records_are_explained():
    text = gen.render()
    for cls in contracts.PAYLOAD_TYPES.values():
        assert f"### `{cls.__name__}`" in text
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text, (cls.__name__, f.name)
    for cls in (contracts.EpisodeContext, contracts.HostSnapshot, contracts.EpisodeSummary, contracts.Scalars):
        table = text.split(f"### `{cls.__name__}`")[1].split("###")[0]
        for f in dataclasses.fields(cls):
            row = next(line for line in table.splitlines() if line.startswith(f"| `{f.name}` |"))
            assert not row.endswith("|  |"), f"{cls.__name__}.{f.name} has no meaning in docs/fields.md"


def test_a_stale_doc_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(gen, "DOC", tmp_path / "fields.md")
    (tmp_path / "fields.md").write_text("old\n")
    assert gen.main(["--check"]) == 1
    assert gen.main(["--write"]) == 0 and gen.main(["--check"]) == 0
