"""Shared fixtures: small deterministic multi-output nets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class TwoHeadNet(nn.Module):
    """A conv trunk shared by two classification heads and a dense head (dict outputs)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 3, padding=1)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, 2 * c, 3, padding=1, stride=2)
        self.b2 = nn.BatchNorm2d(2 * c)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.ha = nn.Linear(2 * c, 5)
        self.hb = nn.Linear(2 * c, 3)
        self.dense = nn.Conv2d(2 * c, 1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(x)))
        y = y + self.dw(y)
        z = y.mean((2, 3))
        return {"a": self.ha(z), "b": self.hb(z), "d": self.dense(y)}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def net() -> TwoHeadNet:
    return TwoHeadNet().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16)
