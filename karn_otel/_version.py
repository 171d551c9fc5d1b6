"""The one version source (pyproject reads it; karn_otel.__version__ re-exports it)."""

__version__ = "0.2.0.dev0"
