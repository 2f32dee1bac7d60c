"""Toy supervised batches for the ``TwoHeadNet`` of conftest (tasks a, b, d)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

LOSSES = {"a": F.cross_entropy, "b": lambda o, y: F.cross_entropy(o[:, :2], y),
          "d": F.mse_loss}


def batches(n: int = 64, batch: int = 16) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """``n`` images in batches: a/b classify the sign of a channel's mean, d regresses a map."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 16, 16, generator=g)
    ya = (x[:, 0].mean((1, 2)) > 0).long()
    yb = (x[:, 1].mean((1, 2)) > 0).long()
    yd = x[:, 2:3, ::2, ::2]
    return [(x[i:i + batch], {"a": ya[i:i + batch], "b": yb[i:i + batch], "d": yd[i:i + batch]})
            for i in range(0, n, batch)]
