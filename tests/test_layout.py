"""The layout's promises: the public names, and the torch-free core's import boundary."""

from __future__ import annotations

import subprocess
import sys

import karn_otel

# The torch-free core (docs/architecture.md): none of these may import torch or OpenTelemetry.
CORE = (
    "karn_otel.contracts",
    "karn_otel.codec",
    "karn_otel.config",
    "karn_otel.collector",
    "karn_otel.pipeline",
    "karn_otel.store",
    "karn_otel.counterfactual",
    "karn_otel.analytics",
    "karn_otel.health",
    "karn_otel.triggers",
    "karn_otel.ranks",
)


def test_public_names_are_pinned():
    assert sorted(karn_otel.__all__) == [
        "CounterfactualConfig",
        "DenseTraceTrigger",
        "KarnCollector",
        "KarnConfig",
        "Run",
        "TelemetryValidationError",
        "__version__",
        "configure",
        "emit",
        "get_collector",
        "init",
        "shutdown",
    ]
    for name in karn_otel.__all__:
        assert hasattr(karn_otel, name), name


def _heavy_modules_after_import(modules: tuple[str, ...], extra: str = "") -> set[str]:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + extra
        + "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'opentelemetry'})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(out.stdout.split())


def test_the_core_imports_neither_torch_nor_opentelemetry():
    assert _heavy_modules_after_import(CORE) == set()


def test_a_configured_collector_without_otel_stays_light():
    """Building a collector (rank discovery, processors, analytics) pulls in neither."""
    extra = (
        "import karn_otel\n"
        "c = karn_otel.configure(karn_otel.KarnConfig(out_dir=None, console='off'))\n"
        "karn_otel.shutdown()\n"
    )
    assert _heavy_modules_after_import(("karn_otel",), extra) == set()
