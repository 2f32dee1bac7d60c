"""Re-estimating a route's norm statistics on a few training batches (BN recalibration).

Removing channels changes what every later layer sees, so the running means and variances the
full model learned no longer match a pruned route; re-estimating them (Li et al., "EagleEye",
2020: adaptive BN) recovers most of the accuracy a route loses before any fine-tuning.

``recalibrate(route, loader, batches=16)`` replaces each of the route's norm layers that track
running statistics by a copy (exported routes share unsliced modules with the full model and with
each other: those are never changed), resets the copies' statistics, and runs ``batches`` batches
through the route with only the norm layers in train mode (a cumulative average:
``momentum=None``), without gradients. Everything else about the route (its weights, other
modules' modes) is left as it was.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from routesurgeon.errors import InputError
from routesurgeon.routes import RouteInfo

__all__ = ["recalibrate"]

_NORMS = nn.modules.batchnorm._BatchNorm


def _inputs_of(batch: Any) -> list[Any]:
    """The route inputs of a loader batch: ``x``, ``(x, targets)``, or a tuple of inputs."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        if len(batch) == 2 and isinstance(batch[1], (dict, torch.Tensor)):
            return list(first) if isinstance(first, (tuple, list)) else [first]
        return list(batch)
    raise InputError(f"a recalibration batch must be a tensor, (inputs, targets) or a tuple of "
                     f"inputs, got {type(batch).__name__}")


def _check_fits(route: nn.Module, inputs: Sequence[Any]) -> None:
    meta = getattr(route, "meta", None)
    info = meta.get("routesurgeon") if isinstance(meta, dict) else None
    if not isinstance(info, RouteInfo):
        return
    want = [tuple(x.shape) for x in info.example_inputs if isinstance(x, torch.Tensor)]
    got = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
    if len(got) != len(want) or any(
            not isinstance(g, tuple) or g[1:] != w[1:] for g, w in zip(got, want)):
        raise InputError(
            f"recalibration batch inputs have shapes {got}; the route {list(info.tasks)} takes "
            f"{[('N', *w[1:]) for w in want]} (its example inputs {want}): pass batches of the "
            f"route's inputs")


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@torch.no_grad()
def recalibrate(route: nn.Module, loader: Iterable[Any], batches: int = 16) -> nn.Module:
    """Re-estimate ``route``'s norm statistics on ``batches`` batches of ``loader``; returns it.

    A batch is the route's input, ``(inputs, targets)`` (targets are ignored) or a tuple of
    inputs. Norm layers are replaced by copies first, so the full model and other routes that
    share a module with ``route`` are never changed. Routes without such norm layers are
    returned unchanged. Raises ``InputError`` when a batch does not fit the route.
    """
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise InputError(f"batches must be a positive int, got {batches!r}")
    norms = [(name, m) for name, m in route.named_modules()
             if isinstance(m, _NORMS) and m.track_running_stats]
    if not norms:
        return route
    fresh = []
    for name, m in norms:
        c = copy.deepcopy(m)
        c.reset_running_stats()
        c.momentum = None  # cumulative moving average over the batches
        _set_module(route, name, c)
        fresh.append((c, m.momentum))
    modes = {m: m.training for m in route.modules()}
    route.eval()
    for c, _ in fresh:
        c.train()
    seen = 0
    ok = False
    try:
        for batch in loader:
            if seen == batches:
                break
            inputs = _inputs_of(batch)
            _check_fits(route, inputs)
            try:
                route(*inputs)
            except RuntimeError as e:
                shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                          for x in inputs]
                raise InputError(f"recalibration batch inputs of shapes {shapes} do not run "
                                 f"through the route: {e}") from e
            seen += 1
        if seen == 0:
            raise InputError("the recalibration loader yielded no batch")
        ok = True
    finally:
        for mod, training in modes.items():
            mod.training = training
        for (c, momentum), (name, orig) in zip(fresh, norms):
            c.momentum = momentum
            if not ok:  # a bad batch leaves the route as it was
                _set_module(route, name, orig)
    meta = getattr(route, "meta", None)
    if isinstance(meta, dict) and isinstance(meta.get("routesurgeon"), RouteInfo):
        meta["routesurgeon"] = dataclasses.replace(meta["routesurgeon"], recalibrated=seen)
    return route
