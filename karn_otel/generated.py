"""Files generated from code (docs/metrics.md, the Prometheus alert rules): write or check."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(text: str, path: Path, *, write: bool, check: bool, regenerate: str) -> int:
    """``write``: write ``text`` to ``path``; ``check``: exit status 1 when ``path`` differs
    (naming the ``regenerate`` command); neither: print ``text``. Returns the exit status."""
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
        return 0
    if check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            print(f"{path} is stale: run {regenerate}", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0
