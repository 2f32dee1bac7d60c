"""Multi-task image sets built from the raw sources: two-item canvases and fine + coarse labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from routesurgeon.datasets.base import TaskTensors
from routesurgeon.datasets.sources import fashion_mnist, mnist_digits

__all__ = ["COARSE_GROUPS", "FineCoarseFashion", "TwoItemCanvas", "multi_fashion",
           "multi_fashion_mnist"]

# Fashion-MNIST classes grouped: tops, full-body / legwear, footwear, bags
COARSE_GROUPS = {"tops": (0, 2, 4, 6), "bottoms+dresses": (1, 3), "footwear": (5, 7, 9),
                 "bags": (8,)}
_COARSE = np.zeros(10, np.int64)
for _i, _members in enumerate(COARSE_GROUPS.values()):
    _COARSE[list(_members)] = _i

CANVAS = 36


class TwoItemCanvas(TaskTensors):
    """Two 28x28 items on a 36x36 canvas (MultiMNIST layout); tasks ``left`` and ``right``.

    The left item sits in the top-left, the right item in the bottom-right, each shifted by up to
    ``jitter`` pixels, overlapping in the middle (pixel-wise max). Items of sample ``i`` are drawn
    from the given pools with a seeded generator, so a dataset is a pure function of its inputs.
    """

    def __init__(self, left: tuple[np.ndarray, np.ndarray], right: tuple[np.ndarray, np.ndarray],
                 n: int, seed: int = 0, channels: int = 1, size: int | None = None,
                 jitter: int = 4) -> None:
        rng = np.random.default_rng(seed)
        li = rng.integers(0, len(left[1]), n)
        ri = rng.integers(0, len(right[1]), n)
        canvas = np.zeros((n, CANVAS, CANVAS), np.uint8)
        span = CANVAS - 28
        for k in range(n):
            r0, c0 = rng.integers(0, jitter + 1, 2)
            r1, c1 = span - rng.integers(0, jitter + 1, 2)
            canvas[k, r0:r0 + 28, c0:c0 + 28] = left[0][li[k]]
            view = canvas[k, r1:r1 + 28, c1:c1 + 28]
            np.maximum(view, right[0][ri[k]], out=view)
        super().__init__(torch.from_numpy(canvas), {"left": torch.from_numpy(left[1][li]),
                                                    "right": torch.from_numpy(right[1][ri])},
                         channels, size)


def _split(images: np.ndarray, labels: np.ndarray, n_train: int
           ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    return (images[:n_train], labels[:n_train]), (images[n_train:], labels[n_train:])


def multi_fashion(train: bool = True, n: int = 10000, seed: int = 0, channels: int = 1,
                  size: int | None = None, root: str | Path | None = None) -> TwoItemCanvas:
    """MultiFashion: two Fashion-MNIST items; train canvases use only the 60k train images and
    test canvases only the 10k test images (disjoint pools). Left and right items of a canvas come
    from the two halves of the pool, so they are never the same image."""
    images, labels = fashion_mnist(train, root)
    half = len(labels) // 2
    left, right = _split(images, labels, half)
    return TwoItemCanvas(left, right, n, seed + (0 if train else 10_000), channels, size)


def multi_fashion_mnist(train: bool = True, n: int = 10000, seed: int = 0, channels: int = 1,
                        size: int | None = None, root: str | Path | None = None,
                        mnist_root: str | Path | None = None,
                        mnist_train: int = 8000) -> TwoItemCanvas:
    """Multi-(Fashion+MNIST): a Fashion-MNIST item left, a real MNIST digit right. Fashion items
    come from its train/test split; the 10k npm digits are split into the first ``mnist_train``
    (train pool) and the rest (test pool)."""
    fashion = fashion_mnist(train, root)
    digits = _split(*mnist_digits(mnist_root), mnist_train)[0 if train else 1]
    return TwoItemCanvas(fashion, digits, n, seed + (0 if train else 10_000), channels, size)


class FineCoarseFashion(TaskTensors):
    """Fashion-MNIST with its 10 fine labels under each name in ``fine_tasks`` (e.g. one per exit
    of a multi-exit net) and the 4 coarse groups of ``COARSE_GROUPS`` under ``coarse_task``."""

    def __init__(self, train: bool = True, fine_tasks: Sequence[str] = ("fine",),
                 coarse_task: str | None = "coarse", n: int | None = None, channels: int = 1,
                 size: int | None = None, root: str | Path | None = None, seed: int = 0) -> None:
        images, labels = fashion_mnist(train, root)
        if n is not None and n < len(labels):
            idx = np.sort(np.random.default_rng(seed).choice(len(labels), n, replace=False))
            images, labels = images[idx], labels[idx]
        fine = torch.from_numpy(labels)
        targets = {t: fine for t in fine_tasks}
        if coarse_task is not None:
            targets[coarse_task] = torch.from_numpy(_COARSE[labels])
        super().__init__(torch.from_numpy(np.ascontiguousarray(images)), targets, channels, size)
