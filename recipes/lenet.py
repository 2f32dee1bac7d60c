"""The LeNet-size multi-task nets of the MultiMNIST / MultiFashion literature.

``MultiLeNet``: the shared LeNet trunk with two task heads of Sener & Koltun (2018, "Multi-Task
Learning as Multi-Objective Optimization") and Lin et al. (2019, "Pareto Multi-Task Learning"):
conv 5x5 (10) - max-pool - ReLU - conv 5x5 (20) - max-pool - ReLU - linear 50 - ReLU shared, and
per task linear 50 - ReLU - linear 10. Those papers resize the 36x36 canvas to 28x28; here the
canvas is used at its own size by default (``size=36``: the trunk's flattened width is 720
instead of 320), ``size=28`` reproduces their input.

``LeNetExits``: the same trunk on 28x28 Fashion-MNIST with a fine-label exit after each stage (conv
1, conv 2, the shared linear layer) and a coarse-label head on the last, the LeNet-size form of
recipe 2 (``recipes/multiexit.py``).

Both are plain ``nn.Module`` s with dict outputs: they trace with ``torch.fx`` and instrument like
any model (``rs.instrument(model, example)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LeNetExits", "MultiLeNet", "lenet_trunk"]


def lenet_trunk(size: int) -> tuple[nn.Sequential, int]:
    """The two conv stages for a ``size`` x ``size`` one-channel input, and their flat width."""
    trunk = nn.Sequential(
        nn.Conv2d(1, 10, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(10, 20, 5), nn.MaxPool2d(2), nn.ReLU(),
    )
    side = ((size - 4) // 2 - 4) // 2
    if side < 1:
        raise ValueError(f"LeNet needs inputs of at least 16 px, got {size}")
    return trunk, 20 * side * side


class MultiLeNet(nn.Module):
    """Shared LeNet trunk + one ``50 - ReLU - classes`` head per task: ``{task: logits}``."""

    def __init__(self, tasks: tuple[str, ...] = ("left", "right"), classes: int = 10,
                 size: int = 36) -> None:
        super().__init__()
        self.trunk, width = lenet_trunk(size)
        self.shared = nn.Sequential(nn.Flatten(1), nn.Linear(width, 50), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Sequential(nn.Linear(50, 50), nn.ReLU(),
                                                     nn.Linear(50, classes)) for t in tasks})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.shared(self.trunk(x))
        return {t: head(z) for t, head in self.heads.items()}


class LeNetExits(nn.Module):
    """LeNet on 28x28 with exits ``exit0`` (after conv 1), ``exit1`` (after conv 2), ``exit2``
    (after the shared linear layer) on the fine labels and ``coarse`` on the last stage."""

    def __init__(self, classes: int = 10, coarse_classes: int = 4, size: int = 28) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(1, 10, 5), nn.MaxPool2d(2), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(10, 20, 5), nn.MaxPool2d(2), nn.ReLU())
        side1 = (size - 4) // 2
        side2 = (side1 - 4) // 2
        self.stage3 = nn.Sequential(nn.Flatten(1), nn.Linear(20 * side2 * side2, 50), nn.ReLU())
        self.exit0 = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(1), nn.Linear(160, classes))
        self.exit1 = nn.Sequential(nn.Flatten(1), nn.Linear(20 * side2 * side2, classes))
        self.exit2 = nn.Linear(50, classes)
        self.coarse = nn.Linear(50, coarse_classes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f1 = self.stage1(x)
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        return {"exit0": self.exit0(f1), "exit1": self.exit1(f2), "exit2": self.exit2(f3),
                "coarse": self.coarse(f3)}


def example(size: int, batch: int = 2) -> Tensor:
    return torch.zeros(batch, 1, size, size)
