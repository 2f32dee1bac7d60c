"""An in-memory multi-task dataset: image tensor + ``{task: targets}``, batched by indexing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["TaskTensors"]


class TaskTensors(Dataset[tuple[Tensor, dict[str, Tensor]]]):
    """``images`` (uint8 ``[N,H,W]`` or float ``[N,C,H,W]``) with per-task targets.

    uint8 images become float in [0, 1] with one channel, resized to ``size`` and repeated to
    ``channels`` when asked. ``batch(indices)`` returns a whole batch at once (what the recipes'
    loaders use); ``__getitem__`` returns one sample as torch Datasets do.
    """

    def __init__(self, images: Tensor, targets: dict[str, Tensor], channels: int = 1,
                 size: int | None = None) -> None:
        n = len(images)
        bad = {t: len(v) for t, v in targets.items() if len(v) != n}
        if bad:
            raise ValueError(f"targets {bad} do not have one entry per image ({n})")
        self.images, self.targets = images, targets
        self.channels, self.size = channels, size

    def __len__(self) -> int:
        return len(self.images)

    def _prepare(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div(255)
            if x.dim() == 3:
                x = x.unsqueeze(1)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = torch.nn.functional.interpolate(x, size=self.size, mode="bilinear",
                                                align_corners=False)
        if self.channels != x.shape[1]:
            x = x.expand(-1, self.channels, -1, -1)
        return x

    def batch(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self._prepare(self.images[idx]), {t: v[idx] for t, v in self.targets.items()}

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        x, ys = self.batch([i])
        return x[0], {t: v[0] for t, v in ys.items()}
