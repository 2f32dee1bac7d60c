"""Pieces the benchmark scripts share: the multi-head timm model they time, and a device sync.

The scripts run as ``python benchmarks/<name>.py``, which puts this folder on ``sys.path``, so they
import it as ``from _common import ...``.
"""

from __future__ import annotations

import torch
from torch import nn


class Heads(nn.Module):
    """A timm trunk (``pretrained=False``, no classifier) with ``tasks`` linear heads of 10 outputs,
    named ``t0``, ``t1``, ..."""

    def __init__(self, arch: str, tasks: int) -> None:
        super().__init__()
        import timm

        self.trunk = timm.create_model(arch, pretrained=False, num_classes=0)
        width = self.trunk.num_features
        self.heads = nn.ModuleDict({f"t{i}": nn.Linear(width, 10) for i in range(tasks)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {k: h(z) for k, h in self.heads.items()}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so that a clock around it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
