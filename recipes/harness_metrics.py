"""The recipes' test metrics (accumulated over batches) and Maninis et al.'s delta_m."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from routesurgeon.metrics import MetricSpec
from routesurgeon.metrics import delta_m as package_delta_m


@dataclass(frozen=True)
class Metric:
    """A test metric accumulated over batches: ``stats(out, target)`` returns an array summed
    over batches, ``finish(sum)`` turns the sum into the value."""

    name: str
    stats: Callable[[Tensor, Tensor], np.ndarray]
    finish: Callable[[np.ndarray], float]
    higher_is_better: bool


def accuracy(name: str = "acc") -> Metric:
    def stats(out: Tensor, y: Tensor) -> np.ndarray:
        return np.array([float((out.argmax(1) == y).sum()), float(y.numel())])

    return Metric(name, stats, lambda s: float(s[0] / max(s[1], 1)), True)


def miou(num_classes: int) -> Metric:
    def stats(out: Tensor, y: Tensor) -> np.ndarray:
        pred = out.argmax(1).flatten()
        idx = y.flatten() * num_classes + pred
        return torch.bincount(idx, minlength=num_classes**2).double().numpy()

    def finish(s: np.ndarray) -> float:
        cm = s.reshape(num_classes, num_classes)
        inter = np.diag(cm)
        union = cm.sum(0) + cm.sum(1) - inter
        return float(np.mean(inter[union > 0] / union[union > 0]))

    return Metric("mIoU", stats, finish, True)


def pixel_acc() -> Metric:
    def stats(out: Tensor, y: Tensor) -> np.ndarray:
        return np.array([float((out.argmax(1) == y).sum()), float(y.numel())])

    return Metric("pix_acc", stats, lambda s: float(s[0] / max(s[1], 1)), True)


def abs_err(name: str = "abs_err") -> Metric:
    def stats(out: Tensor, y: Tensor) -> np.ndarray:
        return np.array([float((out - y).abs().sum()), float(y.numel())])

    return Metric(name, stats, lambda s: float(s[0] / max(s[1], 1)), False)


def mse(name: str = "mse") -> Metric:
    def stats(out: Tensor, y: Tensor) -> np.ndarray:
        return np.array([float(((out - y) ** 2).sum()), float(y.numel())])

    return Metric(name, stats, lambda s: float(s[0] / max(s[1], 1)), False)


def angle_err() -> Metric:
    """Mean angle (degrees) between predicted and true unit normals."""

    def stats(out: Tensor, y: Tensor) -> np.ndarray:
        cos = (nn.functional.normalize(out, dim=1) * y).sum(1).clamp(-1, 1)
        ang = torch.rad2deg(torch.acos(cos))
        return np.array([float(ang.sum()), float(ang.numel())])

    return Metric("angle_deg", stats, lambda s: float(s[0] / max(s[1], 1)), False)


def delta_m(metrics: Mapping[str, float], reference: Mapping[str, float],
            higher_is_better: Mapping[str, bool]) -> float | None:
    """Maninis et al.'s delta_m in percent (``routesurgeon.metrics.delta_m``: mean over metrics of
    the signed relative difference to the single-task reference; lower is better). ``None``
    when a reference value is 0 (undefined)."""
    specs = {k: MetricSpec(k.split("/")[0], hib) for k, hib in higher_is_better.items()}
    if any(reference[k] == 0 for k in specs):
        return None
    return package_delta_m({k: metrics[k] for k in specs}, {k: reference[k] for k in specs},
                           specs)
