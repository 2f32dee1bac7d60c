"""``tuned-equal``: equal weighting with its learning rate chosen on a validation split.

Tuned linear scalarisation is known to match many gradient-surgery methods (Kurin et al., "In
Defense of the Unitary Scalarization for Deep Multi-Task Learning", NeurIPS 2022; Xin et al., "Do
Current Multi-Task Optimization Methods in Deep Learning Even Help?", NeurIPS 2022), so a
comparison of de-conflict methods needs it as a control. For each seed:

1. a fraction ``RunConfig.val_fraction`` of the training set is held out (a seeded permutation,
   the same for every learning rate; the test set is never looked at);
2. ``equal`` is trained on the rest at every learning rate ``RunConfig.lr * factor`` for
   ``factor`` in ``RunConfig.tuned_lr_factors`` (same epochs and batch size as every method);
3. the learning rate whose validation metrics are best is chosen: lowest delta_m (the package's
   signed mean relative difference, over the recipe's ``delta_keys``) against the mean of the
   sweep's validation metrics, ties to the earlier grid entry; when a sweep mean is 0 (delta_m
   undefined) the mean rank over those metrics decides;
4. ``equal`` is trained again on the whole training set at that learning rate and evaluated on the
   test set like every other method.

The run's record is ``equal``'s record under the name ``tuned-equal`` with a ``tuned`` entry: the
chosen learning rate, the grid, each learning rate's validation metrics and the sweep's wall time
(``wall_s`` is the final run's, as for the other methods; ``tune_wall_s`` the sweep's on top).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import harness as h
import torch
from scipy import stats
from torch import Tensor

import routesurgeon as rs


class Subset:
    """The samples ``indices`` of a dataset with a ``batch(indices)`` method, batched alike."""

    def __init__(self, dataset: Any, indices: Tensor) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.dataset.batch(self.indices[torch.as_tensor(indices, dtype=torch.long)])


def validation_split(dataset: Any, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """``(train, validation)``: a seeded random ``fraction`` of ``dataset`` held out (at least one
    sample each side)."""
    n = len(dataset)
    if not 0.0 < fraction < 1.0 or n < 2:
        raise ValueError(f"validation split: fraction must be in (0, 1) (got {fraction}) and the "
                         f"training set needs at least 2 samples (got {n})")
    k = min(max(1, round(n * fraction)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 + seed))
    return Subset(dataset, order[k:]), Subset(dataset, order[:k])


def pick_lr(val: Mapping[float, Mapping[str, float]], hib: Mapping[str, bool]) -> float:
    """The learning rate whose validation metrics (over the metrics ``hib`` names: metric ->
    higher is better) are best; see the module docstring."""
    lrs = list(val)
    keys = list(hib)
    ref = {k: statistics.mean(val[lr][k] for lr in lrs) for k in keys}
    if all(ref[k] != 0 for k in keys):
        scores = {lr: h.delta_m(val[lr], ref, hib) for lr in lrs}
        return min(lrs, key=lambda lr: (scores[lr], lrs.index(lr)))
    # per metric, how many learning rates beat each one (ties share the better rank), summed
    signed = [[val[lr][k] * (-1 if hib[k] else 1) for lr in lrs] for k in keys]
    ranks = (stats.rankdata(signed, method="min", axis=1) - 1).sum(0)
    return lrs[int(ranks.argmin())]  # the first of the best: the earlier grid entry


def train_tuned_equal(recipe: h.Recipe, job: str, seed: int, cfg: h.RunConfig
                      ) -> tuple[rs.Surgeon, rs.Trainer, dict[str, Any]]:
    """The ``tuned-equal`` entry of the harness (``job`` is its name): sweep, choose, retrain."""
    if not cfg.tuned_lr_factors:
        raise ValueError("tuned-equal needs at least one learning-rate factor "
                         "(RunConfig.tuned_lr_factors)")
    grid = [cfg.lr * f for f in cfg.tuned_lr_factors]
    train, val = validation_split(recipe.train, cfg.val_fraction, seed)
    sweep_recipe = replace(recipe, train=train, test=val)
    hib_all = h.higher_better(recipe)
    hib = {k: hib_all[k] for k in (recipe.delta_keys or hib_all)}
    t0 = time.perf_counter()
    val_metrics: dict[float, dict[str, float]] = {}
    for lr in grid:
        _, _, rec = h.train_method(sweep_recipe, "equal", seed, replace(cfg, lr=lr))
        val_metrics[lr] = rec["metrics"]
    tune_wall = time.perf_counter() - t0
    chosen = pick_lr(val_metrics, hib)
    surgeon, trainer, record = h.train_method(recipe, "equal", seed, replace(cfg, lr=chosen))
    record.update(method=job, tuned={
        "lr": chosen, "grid": grid, "val_fraction": cfg.val_fraction,
        "n_val": len(val), "n_train": len(train),
        "val_metrics": {repr(lr): m for lr, m in val_metrics.items()},
        "tune_wall_s": tune_wall})
    return surgeon, trainer, record
