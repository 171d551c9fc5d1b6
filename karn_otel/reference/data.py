"""scikit-learn's bundled digits (1,797 8x8 images, 10 classes): real data, no download."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DigitsData:
    x_train: torch.Tensor  # (N, 1, 8, 8) float32 in [0, 1]
    y_train: torch.Tensor  # (N,) int64
    x_val: torch.Tensor
    y_val: torch.Tensor

    def to(self, device: torch.device | str) -> DigitsData:
        return DigitsData(*(t.to(device) for t in (self.x_train, self.y_train, self.x_val, self.y_val)))


def load_digits_data(seed: int, val_fraction: float = 0.2) -> DigitsData:
    """Deterministic train/validation split of the digits set for a given seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_val = int(round(len(y) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return DigitsData(
        x_train=torch.from_numpy(x[train]),
        y_train=torch.from_numpy(y[train]),
        x_val=torch.from_numpy(x[val]),
        y_val=torch.from_numpy(y[val]),
    )
