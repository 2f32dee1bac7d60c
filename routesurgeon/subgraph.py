"""Copies of a traced graph that compute only some outputs (what every route is cut from).

Like torchvision's feature extraction: copy the traced graph, keep the wanted outputs, and leave
out the dead code (see ``outputs_graph``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from routesurgeon.errors import ExportError

if TYPE_CHECKING:
    from routesurgeon.channels import ChannelGroups
    from routesurgeon.routes import RouteMask
    from routesurgeon.surgeon import Surgeon

__all__ = ["outputs_graph", "task_graph"]


def _attr(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _build(graph: fx.Graph, source: nn.Module, overrides: Mapping[str, Any], name: str
           ) -> fx.GraphModule:
    """A GraphModule over ``graph`` whose modules/attributes come from ``source`` or overrides."""
    root: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr"):
            t = str(n.target)
            root[t] = overrides[t] if t in overrides else _attr(source, t)
    gm = fx.GraphModule(root, graph, name)
    return gm


def task_graph(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A copy of ``gm``'s graph that returns only ``node``, dead code removed."""
    return outputs_graph(gm, node)


def outputs_graph(gm: fx.GraphModule, result: fx.Node | Mapping[str, fx.Node]
                  ) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A copy of ``gm``'s graph returning ``result`` (a node or a dict of nodes), dead code gone.

    Only what the result needs is copied (what dead code elimination would keep, without copying
    the rest first): the result's ancestors, the placeholders, and side-effecting nodes with the
    nodes they read, except assertions on tensors the result does not use (an assertion has no
    users, so it would keep alive the layers whose shapes it checks: timm asserts feature sizes
    in later stages, and a route of an early output would still run them).
    """
    roots = [result] if isinstance(result, fx.Node) else list(result.values())
    needed = _ancestors(roots, set())
    keep = set(needed)
    for n in gm.graph.nodes:
        if n in needed or n.op == "output":
            continue
        if n.op == "placeholder":
            keep.add(n)
        elif n.is_impure():
            extra = _ancestors([n], needed)
            if n.target in _ASSERTS and any(
                    e.op == "call_module" or "rs_dtype" in e.meta for e in extra if e is not n):
                continue  # an assertion on what the result does not use
            keep |= extra
    graph = fx.Graph(owning_module=gm)
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n in keep:
            env[n] = graph.node_copy(n, lambda a: env[a])
    if isinstance(result, fx.Node):
        graph.output(env[result])
    else:
        graph.output({name: env[n] for name, n in result.items()})
    return graph, env


_ASSERTS = tuple(f for f in (torch._assert, getattr(torch, "_assert_async", None),
                             getattr(torch, "_check", None)) if f is not None)


def _ancestors(nodes: Sequence[fx.Node], stop: set[fx.Node]) -> set[fx.Node]:
    """``nodes`` and every node they read, not walking into ``stop``."""
    seen: set[fx.Node] = set()
    stack = [n for n in nodes if n not in stop]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(a for a in n.all_input_nodes if a not in stop)
    return seen


def _route_outputs(surgeon: Surgeon, mask: RouteMask) -> fx.Node | dict[str, fx.Node]:
    """The output node of a single-task mask, or ``{task: node}`` of a union mask."""
    if mask.tasks is None:
        return surgeon.outputs.node_of(mask.task)
    return {t: surgeon.outputs.node_of(t) for t in mask.tasks}


def _keep(groups: ChannelGroups, pruned: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return ~pruned[groups.labels[ids]]


def _rank(arg: Any) -> int:
    shape = arg.meta.get("rs_shape") if isinstance(arg, fx.Node) else None
    if not isinstance(shape, tuple):
        raise ExportError(f"no recorded shape for {arg}")
    return len(shape)
