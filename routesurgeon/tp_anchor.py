"""The torch-pruning anchor: what a user gets without routesurgeon's per-task routes.

A per-task model the usual way: copy the model, drop the other heads (here: the task's
unpruned sub-graph, ``export_routes(keep=1.0, tasks=[task])``, deep-copied so nothing is shared
with the full model), and prune it with torch-pruning (VainF/Torch-Pruning, the installed
``torch_pruning`` package) to a FLOPs target: ``MetaPruner`` with ``GroupMagnitudeImportance`` or
``GroupTaylorImportance`` (gradients of the task loss on one batch before each step), the output
layers in ``ignored_layers``, uniform per-layer ratios (torch-pruning's default), pruned in small
iterative steps until the FLOPs per sample are at most the target.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from routesurgeon.errors import InputError
from routesurgeon.report import count_flops
from routesurgeon.routes import RouteMask, layer_name

if TYPE_CHECKING:
    from routesurgeon.surgeon import Surgeon

__all__ = ["TP_IMPORTANCES", "mask_of_copy", "task_copy", "torch_pruning_route",
           "torch_pruning_routes"]

TP_IMPORTANCES = ("magnitude", "taylor")


def task_copy(surgeon: Surgeon, task: str) -> fx.GraphModule:
    """``task``'s sub-network with the other heads dropped, as an independent copy."""
    from routesurgeon.export import export_routes

    routes = export_routes(surgeon, keep=1.0, tasks=[task])
    assert isinstance(routes, dict)
    return copy.deepcopy(routes[task])


def _output_layers(surgeon: Surgeon, route: nn.Module) -> list[nn.Module]:
    """Modules of ``route`` whose output channels are fixed (they reach a model output)."""
    groups = surgeon.channel_groups
    gm = surgeon.traced.eval_graph
    found = []
    names = dict(route.named_modules())
    for node, info in groups.layers.items():
        if info["kind"] == "norm" or node.op != "call_module":
            continue
        if groups.fixed[groups.labels[info["out"]]].all():
            name = layer_name(gm, node, info)
            if name in names:
                found.append(names[name])
    return found


TP_STEPS = 50  # the iterative steps the route-quality study measured (docs/results.md)


def torch_pruning_route(
    surgeon: Surgeon,
    task: str,
    budget_flops: float,
    importance: str = "magnitude",
    loader: Iterable[Any] | None = None,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    steps: int = TP_STEPS,
    max_ratio: float = 0.95,
) -> nn.Module:
    """A torch-pruning copy of ``task``'s sub-network with at most ``budget_flops`` of its FLOPs.

    ``importance="taylor"`` needs ``loader`` (``(inputs, {task: target})`` batches) and
    ``loss(output, target)``. Returns the pruned module in eval mode; its FLOPs fraction is
    ``route.rs_flops_fraction``.
    """
    return torch_pruning_routes(surgeon, task, [budget_flops], importance, loader, loss, steps,
                                max_ratio)[float(budget_flops)]


def torch_pruning_routes(
    surgeon: Surgeon,
    task: str,
    budgets: Sequence[float],
    importance: str = "magnitude",
    loader: Iterable[Any] | None = None,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    steps: int = TP_STEPS,
    max_ratio: float = 0.95,
) -> dict[float, nn.Module]:
    """``torch_pruning_route`` for several budgets in one pruning run: a copy is taken at the
    first step whose FLOPs are at most each budget."""
    import torch_pruning as tp

    if importance not in TP_IMPORTANCES:
        raise InputError(f"unknown torch-pruning importance {importance!r}; use one of "
                         f"{list(TP_IMPORTANCES)}")
    targets = sorted({float(b) for b in budgets}, reverse=True)
    if not targets or not all(0.0 < b <= 1.0 for b in targets):
        raise InputError(f"budget_flops must be fractions in (0, 1], got {list(budgets)!r}")
    if importance == "taylor" and (loader is None or loss is None):
        raise InputError("importance='taylor' needs loader= and loss= (the task's gradients)")
    model = task_copy(surgeon, task).eval()
    example = [x[:1] if isinstance(x, torch.Tensor) else x for x in surgeon.example_inputs()]
    full = count_flops(model, example)
    imp = (tp.importance.GroupMagnitudeImportance(p=2) if importance == "magnitude"
           else tp.importance.GroupTaylorImportance())
    pruner = tp.pruner.MetaPruner(
        model, tuple(example) if len(example) > 1 else example[0], importance=imp,
        pruning_ratio=max_ratio, iterative_steps=steps,
        ignored_layers=_output_layers(surgeon, model))
    batches = (itertools.cycle(list(itertools.islice(loader, steps)))
               if loader is not None and importance == "taylor" else None)
    flops = full
    out: dict[float, nn.Module] = {}
    for step in range(steps + 1):
        while targets and flops <= targets[0] * full:
            pruned = copy.deepcopy(model).eval()
            pruned.meta.pop("routesurgeon", None)  # the unpruned copy's record: no longer true
            pruned.zero_grad(set_to_none=True)
            pruned.rs_flops_fraction = flops / full  # type: ignore[assignment]
            out[targets.pop(0)] = pruned
        if not targets or step == steps:
            break
        if batches is not None and loss is not None:
            model.zero_grad(set_to_none=True)
            x, ys = next(batches)
            y = model(*(x if isinstance(x, (tuple, list)) else [x]))
            loss(y, ys[task] if isinstance(ys, Mapping) else ys).backward()
        pruner.step()
        flops = count_flops(model, example)
    if targets:
        raise InputError(f"torch-pruning reached {flops / full:.3f} of task {task!r}'s FLOPs "
                         f"after {steps} steps to ratio {max_ratio}; budget_flops={targets} "
                         "is below what it prunes")
    return out


def mask_of_copy(surgeon: Surgeon, task: str, pruned: nn.Module) -> RouteMask:
    """The route mask of ``task`` that keeps exactly the channels a pruned copy kept.

    The kept output channels of each conv / linear are read off the copy's weights (an exact
    ordered slice of the full model's, ``reconstruct._slice_of``) and mapped onto the surgeon's
    coupled channel groups; a group kept in one layer and dropped in another, or a layer the copy
    prunes that the surgeon has no groups for, is refused (``InputError``): the copy was not
    pruned along the couplings the surgeon knows. ``export_routes(scores="tp-taylor", ...)``
    exports such a mask through the verified path.
    """
    from routesurgeon.reconstruct import kept_channels
    from routesurgeon.routes import _mask

    groups = surgeon.channel_groups
    base = surgeon.route_masks(task, keep=1.0).pruned  # what the task never reaches
    kept = np.zeros(groups.n_groups, bool)
    dropped = np.zeros(groups.n_groups, bool)
    by_path = {str(n.target): info for n, info in groups.layers.items()
               if n.op == "call_module" and info["kind"] != "norm"}
    for path, _, keep_out in kept_channels(pruned, surgeon):
        if path not in by_path:
            raise InputError(f"layer {path!r} was pruned in the copy but routesurgeon has no "
                             "channel groups for it: it cannot be a route")
        labels = groups.labels[by_path[path]["out"]]
        here = np.zeros(len(labels), bool)
        here[keep_out] = True
        kept[labels[here]] = True
        dropped[labels[~here]] = True
    clash = np.flatnonzero(kept & dropped)
    if len(clash):
        raise InputError(f"the pruned copy keeps channel group {int(clash[0])} in one layer and "
                         "drops it in another: it was not pruned along the couplings "
                         "routesurgeon traced")
    cand = ~groups.fixed & ~base
    if (dropped & ~cand).any():
        raise InputError("the pruned copy drops channels routesurgeon treats as unprunable for "
                         f"task {task!r} (fixed or output channels)")
    return _mask(surgeon, task, base | dropped)
