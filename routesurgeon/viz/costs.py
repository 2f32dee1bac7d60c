"""What each exported route costs: parameters, FLOPs and latency against the unpruned task graph.

The numbers feed the route table of the HTML report. FLOPs come from
:class:`torch.utils.flop_counter.FlopCounterMode` (per sample: divided by the batch size),
latency is the median wall time of a few eval-mode forwards on the example inputs (CPU by
default; a rough guide, not a benchmark).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from routesurgeon.errors import ExportError
from routesurgeon.export import task_graph
from routesurgeon.report import count_flops, count_params, measure_latency
from routesurgeon.routes import RouteMask

if TYPE_CHECKING:
    from routesurgeon.surgeon import Surgeon

__all__ = ["graph_cost", "route_costs", "route_mask_of"]


def route_mask_of(route: fx.GraphModule) -> RouteMask:
    """The :class:`RouteMask` an exported route was pruned with."""
    info = getattr(route, "meta", {}).get("routesurgeon") if hasattr(route, "meta") else None
    mask = getattr(info, "mask", None) or getattr(route, "meta_route", None)
    if not isinstance(mask, RouteMask):
        raise ExportError(
            f"{type(route).__name__} carries no route mask; pass the routes returned by "
            "surgeon.export_routes(...)"
        )
    return mask


def _batch(inputs: Sequence[Any]) -> int:
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return int(x.shape[0])
    return 1


@torch.inference_mode()
def graph_cost(
    gm: torch.nn.Module, inputs: Sequence[Any], repeats: int = 3
) -> tuple[int, int, float | None]:
    """(parameters, FLOPs per sample, median latency in ms or None if ``repeats`` is 0)."""
    was = gm.training
    gm.eval()
    try:
        flops = count_flops(gm, inputs) // max(1, _batch(inputs))
        latency = measure_latency({"g": gm}, inputs, repeats, warmup=1)["g"] if repeats else None
    finally:
        gm.train(was)
    return count_params(gm), flops, latency


def route_costs(
    surgeon: Surgeon,
    routes: Mapping[str, fx.GraphModule],
    inputs: Sequence[Any] | None = None,
    repeats: int = 3,
) -> dict[str, dict[str, Any]]:
    """Per task: the route's cost against the unpruned graph of that task, and its channels.

    Returns ``{task: {params, flops, latency_ms, full_params, full_flops, full_latency_ms,
    kept: {layer: kept channels}, channels: {layer: channels}, kept_fraction}}``, the
    ``routes`` argument of :func:`routesurgeon.viz.write_report`. ``inputs`` default to the
    surgeon's example inputs; ``repeats=0`` skips the latency measurement.
    """
    args = list(inputs) if inputs is not None else surgeon.example_inputs()
    gm = surgeon.traced.eval_graph
    out: dict[str, dict[str, Any]] = {}
    for task, route in routes.items():
        if task not in surgeon.tasks:
            raise ExportError(
                f"route {task!r} is not a task of this model; tasks are "
                f"{surgeon.tasks} (union routes are not shown in the report)"
            )
        mask = route_mask_of(route)
        graph, _ = task_graph(gm, surgeon.outputs.node_of(task))
        full = fx.GraphModule(gm, graph)
        fp, ff, fl = graph_cost(full, args, repeats)
        p, f, lat = graph_cost(route, args, repeats)
        # channel counts of the layers this task reaches (the others are all dropped)
        reached = {la.name for la in surgeon.topology.layers() if task in la.tasks}
        names = [n for n in mask.channels if n in reached] or list(mask.channels)
        kept = {n: len(mask.kept.get(n, ())) for n in names}
        channels = {n: int(mask.channels[n]) for n in names}
        out[task] = {
            "params": p,
            "flops": f,
            "latency_ms": lat,
            "full_params": fp,
            "full_flops": ff,
            "full_latency_ms": fl,
            "kept": kept,
            "channels": channels,
            "kept_fraction": sum(kept.values()) / max(1, sum(channels.values())),
        }
    return out
