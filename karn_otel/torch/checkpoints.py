"""Checkpoint comparison for exact replay (:mod:`karn_otel.replay` imports this lazily)."""

from __future__ import annotations

import os

import torch

__all__ = ["compare_state_dicts"]


def compare_state_dicts(path_a: str | os.PathLike[str], path_b: str | os.PathLike[str]) -> bool:
    """True when two saved state dicts hold the same keys and bit-identical tensors.

    Both are loaded with ``weights_only=True`` (no code runs from a checkpoint file).
    """
    a = torch.load(path_a, weights_only=True)
    b = torch.load(path_b, weights_only=True)
    return bool(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))
