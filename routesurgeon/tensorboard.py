"""TensorBoard logging of a routesurgeon run (``Trainer(..., log_dir="runs/x")``).

Written with ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package:
``pip install 'routesurgeon[tensorboard]'``), rank 0 only under torch.distributed. Tags:

- per step: ``train/loss/<task>`` (the global losses), ``train/<stat>`` (the method's scalars,
  e.g. ``train/loss/total``);
- per epoch: ``epoch/loss/<task>``, ``epoch/time``, ``epoch/skipped``; ``metric/<task>``
  (or ``metric/<task>/<name>``) from ``trainer.evaluate``;
- once importance is learned (``drmgf``, ``drmgf-step``), per epoch: ``importance/<layer>/<task>``
  (histogram of the per-filter dominance) and ``route/<task>/kept_fraction``,
  ``route/<task>/kept_channels`` (the task's route with the filters whose dominance reaches
  ``route_threshold``, default ``1 / number of tasks``: the share of a filter shared evenly);
- per conflict sample (``routesurgeon.conflicts``): ``conflict/<a|b>/mean_cosine``,
  ``conflict/<a|b>/negative_fraction``, ``conflict/<a|b>/min_cosine``, the histogram
  ``conflict/<a|b>/cosine`` over the shared layers, and the image ``conflict/cosine_map``
  (task pairs x layers in graph order; red: opposing gradients, blue: aligned, grey: undefined).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from routesurgeon.conflicts import Conflicts
from routesurgeon.errors import InputError

if TYPE_CHECKING:
    from routesurgeon.surgeon import Surgeon

__all__ = ["TensorBoardLogger", "cosine_image"]

_RED, _WHITE, _BLUE, _GREY = (215, 48, 39), (247, 247, 247), (33, 102, 172), (190, 190, 190)


def cosine_image(cosine: torch.Tensor, cell: int = 6) -> np.ndarray:
    """A (3, pairs * cell, layers * cell) uint8 picture of a (layers x pairs) cosine table."""
    values = cosine.detach().double().T.numpy()  # pairs x layers
    rgb = np.empty((*values.shape, 3), dtype=np.float64)
    for idx, v in np.ndenumerate(values):
        if not math.isfinite(v):
            rgb[idx] = _GREY
            continue
        end = _BLUE if v >= 0 else _RED
        f = min(1.0, abs(v))
        rgb[idx] = [w + (e - w) * f for w, e in zip(_WHITE, end)]
    img = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    return img.round().astype(np.uint8).transpose(2, 0, 1)


class TensorBoardLogger:
    """Writes a run's figures to ``log_dir`` (see the module docstring for the tags)."""

    def __init__(self, log_dir: str | Path, surgeon: Surgeon,
                 route_threshold: float | None = None, flush_secs: int = 30) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise InputError(
                f"log_dir={str(log_dir)!r} needs the tensorboard package: "
                f"pip install 'routesurgeon[tensorboard]'") from e
        self.surgeon = surgeon
        self.log_dir = Path(log_dir)
        self.route_threshold = (1.0 / max(1, len(surgeon.tasks)) if route_threshold is None
                                else route_threshold)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)

    # -- what the Trainer calls ---------------------------------------------------------------
    def log_step(self, step: int, stats: Mapping[str, Any]) -> None:
        for key, v in stats.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                self.writer.add_scalar(f"train/{key}", float(v), step)

    def log_epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        w = self.writer
        for t, v in (record.get("losses") or {}).items():
            w.add_scalar(f"epoch/loss/{t}", float(v), epoch)
        for key in ("time", "skipped"):
            if isinstance(record.get(key), (int, float)):
                w.add_scalar(f"epoch/{key}", float(record[key]), epoch)
        if self.surgeon.importance_bank.trained:
            self._importance(epoch)
            self._routes(epoch)
        w.flush()

    def log_metrics(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        for t, v in metrics.items():
            if isinstance(v, Mapping):
                for name, x in v.items():
                    self.writer.add_scalar(f"metric/{t}/{name}", float(x), epoch)
            else:
                self.writer.add_scalar(f"metric/{t}", float(v), epoch)
        self.writer.flush()

    def log_conflicts(self, c: Conflicts, step: int) -> None:
        w = self.writer
        for pair, s in c.summary().items():
            for key in ("mean_cosine", "negative_fraction", "min_cosine"):
                if s[key] is not None:
                    w.add_scalar(f"conflict/{pair}/{key}", float(s[key]), step)  # type: ignore[arg-type]
        for j, (a, b) in enumerate(c.pairs):
            col = c.cosine[:, j]
            col = col[torch.isfinite(col)]
            if col.numel():
                w.add_histogram(f"conflict/{a}|{b}/cosine", col.numpy(), step)
        if c.layers and c.pairs:
            w.add_image("conflict/cosine_map", cosine_image(c.cosine), step, dataformats="CHW")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

    # -- importance and routes -------------------------------------------------------------------
    def _importance(self, epoch: int) -> None:
        for layer, per in self.surgeon.importance().items():
            for t, v in per.items():
                vals = v.detach().double().cpu().numpy().reshape(-1)
                if vals.size and np.isfinite(vals).all():
                    self.writer.add_histogram(f"importance/{layer}/{t}", vals, epoch)

    def _routes(self, epoch: int) -> None:
        for t in self.surgeon.tasks:
            mask = self.surgeon.route_masks(t, keep=None, threshold=self.route_threshold,
                                            scores="importance")
            self.writer.add_scalar(f"route/{t}/kept_fraction", mask.kept_fraction, epoch)
            kept = sum(len(v) for v in mask.kept.values())
            self.writer.add_scalar(f"route/{t}/kept_channels", float(kept), epoch)
