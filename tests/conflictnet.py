"""A small three-task net with a layer only two tasks share (the conflict and TensorBoard tests)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import routesurgeon as rs

TASKS = ["a", "b", "c"]


class Net(nn.Module):
    """A shared conv trunk (with BatchNorm) for all three tasks; a linear layer shared by a and b
    only, so the pairs with c do not share it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.ab = nn.Linear(8, 8)
        self.ha, self.hb, self.hc = nn.Linear(8, 4), nn.Linear(8, 1), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = F.relu(self.c2(F.relu(self.bn(self.c1(x))))).mean((2, 3))
        u = torch.tanh(self.ab(z))
        return {"a": self.ha(u), "b": self.hb(u), "c": self.hc(z)}


LOSSES = {"a": F.cross_entropy, "b": lambda o, y: F.mse_loss(o.squeeze(1), y),
          "c": F.cross_entropy}


def batches(n: int = 3, size: int = 6, seed: int = 0) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, 3, 8, 8, generator=g)
        out.append((x, {"a": torch.randint(0, 4, (size,), generator=g),
                        "b": torch.randn(size, generator=g),
                        "c": torch.randint(0, 3, (size,), generator=g)}))
    return out


def surgeon(seed: int = 0) -> rs.Surgeon:
    torch.manual_seed(seed)
    return rs.instrument(Net().train(), torch.randn(2, 3, 8, 8))
