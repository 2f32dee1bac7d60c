"""The recipes' data and evaluation: seeded mini-batches, named outputs, metrics over a test set
(see ``harness``)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from harness_dist import Sharded
from torch import Tensor, nn

from routesurgeon import distributed as rsdist

if TYPE_CHECKING:
    from harness import Recipe, RunConfig


def train_batches(recipe: Recipe, cfg: RunConfig, seed: int) -> Iterable[Any]:
    """The training batches of one run: the global batches, or this rank's shares of them."""
    batches = Batches(recipe.train, cfg.batch_size, True, seed, cfg.max_batches)
    return Sharded(batches) if rsdist.is_distributed() else batches



class Batches:
    """Seeded, re-iterable mini-batches of a dataset with a ``batch(indices)`` method."""

    def __init__(self, dataset: Any, batch_size: int, shuffle: bool, seed: int = 0,
                 max_batches: int | None = None) -> None:
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.gen = torch.Generator().manual_seed(seed)
        self.max_batches = max_batches

    def __len__(self) -> int:
        n = math.ceil(len(self.dataset) / self.batch_size)
        return min(n, self.max_batches) if self.max_batches else n

    def __iter__(self) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.gen) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            yield self.dataset.batch(order[b * self.batch_size:(b + 1) * self.batch_size])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def outputs_by_task(out: Any, tasks: Sequence[str]) -> dict[str, Tensor]:
    """Name a model's outputs: dicts by key, tuples by ``tasks`` order; a lone tensor (an
    exported route) is the output of ``tasks[0]``."""
    if isinstance(out, Mapping):
        return dict(out)
    if isinstance(out, (tuple, list)) and len(out) > 1:
        return dict(zip(tasks, out))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return {tasks[0]: out}


@torch.no_grad()
def evaluate(model: Callable[..., Any], loader: Batches, recipe: Recipe,
             tasks: Sequence[str] | None = None) -> dict[str, float]:
    """``{task/metric: value}`` of ``model`` (eval mode) over ``loader``.

    Under torchrun each rank evaluates its part of every batch and the metric sums are
    all-reduced: every rank returns the numbers of the whole test set."""
    names = list(recipe.task_names or recipe.tasks)
    chosen = list(tasks or recipe.tasks)
    if isinstance(model, nn.Module):
        was = model.training
        model.eval()
    sums: dict[str, np.ndarray] = {}
    world, rank = rsdist.world_size(), rsdist.rank()
    for x, ys in loader:
        counted = True
        if len(x) >= world:  # this rank's part of the batch (the parts may differ by one)
            x, ys = x.tensor_split(world)[rank], {t: y.tensor_split(world)[rank]
                                                   for t, y in ys.items()}
        else:  # too small to split: every rank runs it, rank 0 counts it
            counted = rank == 0
        outs = model(x)
        several = isinstance(outs, (tuple, list)) and len(outs) > 1
        outs = outputs_by_task(outs, names if several else chosen)
        for t in chosen:
            for m in recipe.tasks[t].metrics:
                key = f"{t}/{m.name}"
                s = m.stats(outs[t], ys[t])
                s = s if counted else np.zeros_like(s)
                sums[key] = sums[key] + s if key in sums else s
    if isinstance(model, nn.Module):
        model.train(was)
    if world > 1:  # the metric sums of the whole test set, the same on every rank
        keys = sorted(sums)
        flat = torch.from_numpy(np.concatenate([np.asarray(sums[k], np.float64).ravel()
                                                for k in keys]))
        dist.all_reduce(flat)
        parts = np.split(flat.numpy(), np.cumsum([sums[k].size for k in keys])[:-1])
        sums = {k: v.reshape(np.shape(sums[k])) for k, v in zip(keys, parts, strict=True)}
    return {k: next(m for m in recipe.tasks[k.split("/")[0]].metrics
                    if m.name == k.split("/", 1)[1]).finish(v) for k, v in sums.items()}


def higher_better(recipe: Recipe) -> dict[str, bool]:
    return {f"{t}/{m.name}": m.higher_is_better for t, s in recipe.tasks.items() for m in s.metrics}
