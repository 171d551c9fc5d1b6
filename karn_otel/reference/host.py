"""The host: a deliberately small 3-block CNN with seed slots early / mid / late."""

from __future__ import annotations

import torch
from torch import nn

from karn_otel.reference.slots import LifecycleConfig, SeedSlot

SLOT_IDS = ("early", "mid", "late")


class HostCNN(nn.Module):
    """conv-relu [early] conv-relu-pool [mid] conv-relu-pool [late] avgpool-linear."""

    def __init__(
        self, widths: tuple[int, int, int] = (4, 8, 16), lifecycle: LifecycleConfig | None = None, n_classes: int = 10
    ) -> None:
        super().__init__()
        lc = lifecycle or LifecycleConfig()
        w1, w2, w3 = widths
        self.widths = widths
        self.block1 = nn.Sequential(nn.Conv2d(1, w1, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(w1, w2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(nn.Conv2d(w2, w3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(w3, n_classes)
        self.slots = nn.ModuleDict({sid: SeedSlot(sid, w, lc) for sid, w in zip(SLOT_IDS, widths)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.slots["early"](self.block1(x))
        x = self.slots["mid"](self.block2(x))
        x = self.slots["late"](self.block3(x))
        return self.head(x.mean(dim=(2, 3)))

    def segments(self) -> list:
        """The host split at its slots, for shared-prefix counterfactual evaluation:
        forward(x) == seg[3](late(seg[2](mid(seg[1](early(seg[0](x)))))))."""
        return [self.block1, self.block2, self.block3, lambda x: self.head(x.mean(dim=(2, 3)))]

    def activation_modules(self) -> dict[str, nn.Module]:
        """Modules whose outputs dense traces summarise (the blocks' ReLUs)."""
        return {"block1": self.block1[1], "block2": self.block2[1], "block3": self.block3[1]}

    def host_parameters(self) -> list[nn.Parameter]:
        """Parameters of the host only (no seed)."""
        return [p for name, p in self.named_parameters() if not name.startswith("slots.")]

    @property
    def host_params(self) -> int:
        return sum(p.numel() for p in self.host_parameters())

    @property
    def slot_config(self) -> dict[str, int]:
        return {sid: slot.channels for sid, slot in self.slots.items()}
