"""Pieces the benchmark scripts share: the multi-head timm model they time, a device sync, and
the coverage sweeps' time limit and exact comparison of nested outputs.

The scripts run as ``python benchmarks/<name>.py``, which puts this folder on ``sys.path``, so they
import it as ``from _common import ...``.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree


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


class Timeout(Exception):
    """What :func:`time_limit` raises when its block runs past the limit."""


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise :class:`Timeout` in the block after ``seconds`` (SIGALRM: main thread, POSIX only)."""
    def handler(signum: int, frame: Any) -> None:
        raise Timeout(f"timed out after {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def same(a: Any, b: Any) -> bool:
    """Whether two (nested) outputs have the same leaves, tensors bit for bit."""
    la, lb = pytree.tree_flatten(a)[0], pytree.tree_flatten(b)[0]
    return len(la) == len(lb) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb))
