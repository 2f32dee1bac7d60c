"""What a route costs, from its mask alone, and choosing groups to fit a cost budget.

A route's cost is counted on the task's sub-graph (the layers that reach the task), with each
layer's kept input and output channels read off the mask:

* FLOPs per sample, as ``torch.utils.flop_counter`` counts them (``routesurgeon.report``):
  ``2 * out * in_per_group * kernel * positions`` for every conv and linear layer (transposed
  convs count their input positions), nothing for elementwise ops or norms.
* parameters: every parameter the task's layers use, each sliced along the channel axes the
  analysis recorded for it (``channel_groups.state.params``).

``fit_budget`` finds the largest keep level whose route costs at most a fraction of the task's
unpruned route, by bisection over a selection ``level -> pruned`` (a per-layer keep fraction or a
global count); the level at which nothing prunable is kept is the *floor*, and a budget below
it is an error naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx as fx

from routesurgeon.errors import InputError

if TYPE_CHECKING:
    from routesurgeon.surgeon import Surgeon

__all__ = ["BUDGET_KINDS", "CostModel", "cost_model", "fit_budget"]

BUDGET_KINDS = ("flops", "params")


@dataclass(frozen=True)
class _Layer:
    out_labels: np.ndarray  # channel group of each output channel
    in_labels: np.ndarray  # channel group of each input channel
    per_in: int  # input channels per group of a grouped conv (0: dense, uses kept inputs)
    scale: float  # 2 * kernel * positions per sample
    reach: int  # task bits


@dataclass(frozen=True)
class _Param:
    numel: int
    axes: tuple[np.ndarray, ...]  # channel groups along each sliced axis
    reach: int


@dataclass(frozen=True)
class CostModel:
    """FLOPs and parameters of any route of a surgeon's model, from the route's mask."""

    layers: tuple[_Layer, ...]
    params: tuple[_Param, ...]
    tasks: tuple[str, ...]

    def cost(self, kind: str, pruned: np.ndarray, tasks: tuple[str, ...]) -> float:
        """FLOPs per sample (``kind="flops"``) or parameters of the route serving ``tasks``."""
        bits = 0
        for t in tasks:
            bits |= 1 << self.tasks.index(t)
        kept = ~pruned
        total = 0.0
        if kind == "flops":
            for layer in self.layers:
                if not layer.reach & bits:
                    continue
                out = int(kept[layer.out_labels].sum())
                inp = layer.per_in or int(kept[layer.in_labels].sum())
                total += layer.scale * out * inp
        elif kind == "params":
            for p in self.params:
                if not p.reach & bits:
                    continue
                n = float(p.numel)
                for labels in p.axes:
                    n *= float(kept[labels].sum()) / max(len(labels), 1)
                total += n
        else:
            raise InputError(f"unknown budget kind {kind!r}; use one of {list(BUDGET_KINDS)}")
        return total


def _positions(shape: tuple[int, ...] | None, channel_axis: int, batch: int) -> int:
    if not shape:
        return 1
    n = math.prod(shape) // max(shape[channel_axis], 1)
    return max(n // max(batch, 1), 1)


def cost_model(surgeon: Surgeon) -> CostModel:
    """The cost model of ``surgeon``'s traced model (cached on the surgeon)."""
    cached = surgeon.__dict__.get("_rs_cost_model")
    if isinstance(cached, CostModel):
        return cached
    groups = surgeon.channel_groups
    gm = surgeon.traced.eval_graph
    example = surgeon.example_inputs()
    batch = next((int(x.shape[0]) for x in example if isinstance(x, torch.Tensor) and x.dim()), 1)
    layers = []
    for node, info in groups.layers.items():
        if info["kind"] == "norm":
            continue
        w = gm.get_parameter(info["weight"])
        shape = node.meta.get("rs_shape")
        shape = shape if isinstance(shape, tuple) else None
        transposed = bool(info.get("transposed"))
        if info["kind"] == "linear":
            kernel, pos = 1, _positions(shape, len(shape) - 1 if shape else 0, batch)
        else:
            kernel = math.prod(w.shape[2:])
            arg = node.args[0]
            src = (arg.meta.get("rs_shape") if transposed and isinstance(arg, fx.Node)
                   else shape)
            pos = _positions(src if isinstance(src, tuple) else None, 1, batch)
        g = int(info.get("groups", 1))
        per_in = int(w.shape[1]) if g > 1 and not transposed else 0  # whole groups go
        layers.append(_Layer(groups.labels[info["out"]], groups.labels[info["in"]], per_in,
                             2.0 * kernel * pos, surgeon._reach.get(node, 0)))
    params = []
    module_reach: dict[str, int] = {}
    for node in gm.graph.nodes:
        bits = surgeon._reach.get(node, 0)
        if node.op in ("call_module", "get_attr") and bits:
            module_reach[str(node.target)] = module_reach.get(str(node.target), 0) | bits
    sliced: dict[str, list[np.ndarray]] = {}
    for (path, _axis), ids in groups.state.params.items():
        sliced.setdefault(path, []).append(groups.labels[ids])
    seen: set[int] = set()
    for name, p in gm.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        bits = module_reach.get(name, 0) | module_reach.get(name.rsplit(".", 1)[0], 0)
        params.append(_Param(p.numel(), tuple(sliced.get(name, ())), bits))
    model = CostModel(tuple(layers), tuple(params), tuple(surgeon.tasks))
    surgeon.__dict__["_rs_cost_model"] = model
    return model


def fit_budget(
    select: Callable[[float], np.ndarray],
    cost: Callable[[np.ndarray], float],
    full: float,
    budget: float,
    what: str,
    subject: str = "the route",
    steps: int = 24,
) -> np.ndarray:
    """The ``pruned`` mask of the largest level in [0, 1] whose cost is at most ``budget * full``.

    ``select(level)`` gives the pruned mask at a level (0: the fewest groups kept the selection
    allows, 1: every candidate kept); cost should grow with the level (bisection assumes it).
    """
    if not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise InputError(f"{what} must be a fraction in (0, 1], got {budget!r}")
    target = float(budget) * full
    lowest = select(0.0)
    floor = cost(lowest)
    if floor > target * (1 + 1e-9):
        raise InputError(
            f"{what}={budget:g} asks for {target:.4g} but {subject} cannot cost less than "
            f"{floor:.4g} ({floor / full:.3f} of its unpruned {full:.4g}): the fixed and "
            f"task-only channels plus the one channel group each layer keeps; use "
            f"{what} >= {math.ceil(floor / full * 1000) / 1000:g}")
    top = select(1.0)
    if cost(top) <= target:
        return top
    lo, hi, best = 0.0, 1.0, lowest
    for _ in range(steps):
        mid = (lo + hi) / 2
        pruned = select(mid)
        if cost(pruned) <= target:
            lo, best = mid, pruned
        else:
            hi = mid
    return best
