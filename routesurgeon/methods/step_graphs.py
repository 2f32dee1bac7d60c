"""The graphs ``drmgf-step`` runs: a capture graph and a branch-scaled graph, and its build plan.

* :func:`capture_graph` (``exact`` / ``depth`` modes): the traced graph also returning the shared
  layers' outputs and, in ``depth`` mode, identity copies of the values crossing the cut.
* :func:`branch_graph` (``branch`` mode): an :class:`EdgeScale` on every edge leaving a branch point
  towards a strict subset of its tasks; :func:`branch_edge_weights` sets their per-channel factors
  from the current dominance.
* :func:`build_plan`: the graph of one mode (compiled when the trainer compiles) and what the
  backward needs to know about it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from routesurgeon.branches import on_branch_edges
from routesurgeon.compile import ProbedGraph, eager_nodes
from routesurgeon.topology import node_reach

if TYPE_CHECKING:
    from routesurgeon.methods.drmgf_step import DRMGFStepConfig

__all__ = ["EdgeScale", "branch_edge_weights", "branch_graph", "build_plan", "capture_graph"]

def _cut_identity(value: Any) -> Any:
    """A new autograd node for each tensor of ``value``: gradients reaching it come only from the
    uses of this copy (the nodes above a cut), not from the other uses of the original."""
    if isinstance(value, Tensor):
        return value.view_as(value) if value.requires_grad else value
    if isinstance(value, tuple | list):
        return type(value)(_cut_identity(v) for v in value)
    return value


_cut_identity_eager = torch.compiler.disable(_cut_identity)


def capture_graph(gm: fx.GraphModule, module_paths: set[str], cut: set[str] | None = None,
                  upper_from: int = 0) -> tuple[fx.GraphModule, list[str], list[str]]:
    """A copy of ``gm`` that also returns the outputs of the given modules' calls and, for the
    nodes named in ``cut``, the identity copies that the nodes from index ``upper_from`` on use
    instead of them; returns it with the module path of each capture and the cut node names."""
    cut = cut or set()
    graph = fx.Graph(owning_module=gm)
    env: dict[fx.Node, fx.Node] = {}
    upper_env: dict[fx.Node, fx.Node] = {}
    captured: list[fx.Node] = []
    names: list[str] = []
    cut_nodes: list[fx.Node] = []
    cut_names: list[str] = []
    out_node = None
    for i, n in enumerate(gm.graph.nodes):
        if n.op == "output":
            out_node = n
            continue
        if i >= upper_from:
            env[n] = graph.node_copy(n, lambda a: upper_env.get(a, env[a]))
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
        if n.op == "call_module" and str(n.target) in module_paths:
            captured.append(env[n])
            names.append(str(n.target))
        if n.name in cut:
            upper_env[n] = graph.call_function(_cut_identity, (env[n],))
            cut_nodes.append(upper_env[n])
            cut_names.append(n.name)
    assert out_node is not None
    original = fx.map_arg(out_node.args[0], lambda a: upper_env.get(a, env[a]))
    graph.output((original, tuple(captured), tuple(cut_nodes)))
    return fx.GraphModule(gm, graph, "Capture"), names, cut_names


class _ScaleChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(w)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (w,) = ctx.saved_tensors
        axis = 1 if grad.dim() > 2 else grad.dim() - 1
        if w.dim() == 0 or grad.dim() == 0 or w.numel() != grad.shape[axis]:
            return grad * w.mean(), None
        shape = [1] * grad.dim()
        shape[axis] = -1
        return grad * w.reshape(shape).to(grad.dtype), None


class EdgeScale(nn.Module):
    """Identity forward; scales the gradient of one graph edge by ``self.weight`` (per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight: Tensor | None = None

    def forward(self, x: Any) -> Any:
        if self.weight is None or not isinstance(x, Tensor) or not x.requires_grad:
            return x
        return _ScaleChannels.apply(x, self.weight)


@dataclass(frozen=True)
class _Edge:
    module: str  # the EdgeScale's path in the branch graph
    layer: str | None  # shared weight whose dominance applies (None: the mean over layers)
    point_tasks: tuple[str, ...]  # tasks the branch point reaches
    branch_tasks: tuple[str, ...]  # tasks the branch reaches


def _producer_layer(node: fx.Node, layer_of: Mapping[str, str]) -> str | None:
    """The shared weight producing ``node``'s channels: walk back along first tensor inputs."""
    seen = 0
    cur: fx.Node | None = node
    while cur is not None and seen < 64:
        if cur.op == "call_module" and str(cur.target) in layer_of:
            return layer_of[str(cur.target)]
        inputs = [a for a in cur.all_input_nodes if a.op != "get_attr"]
        cur = inputs[0] if inputs else None
        seen += 1
    return None


def branch_graph(gm: fx.GraphModule, reach: Mapping[fx.Node, int], tasks: list[str],
                 layer_of: Mapping[str, str]) -> tuple[fx.GraphModule, list[_Edge]]:
    """A copy of ``gm`` with an ``EdgeScale`` on every edge leaving a branch point towards a
    strict subset of its tasks."""
    edges: list[_Edge] = []
    scalers: dict[str, nn.Module] = {}

    def names(bits: int) -> tuple[str, ...]:
        return tuple(t for i, t in enumerate(tasks) if bits >> i & 1)

    def edge_scale(graph: fx.Graph, x: fx.Node, src: fx.Node, point: int, branch: int
                   ) -> fx.Node:
        path = f"routesurgeon_branch.e{len(edges)}"
        scalers[path] = EdgeScale()
        edges.append(_Edge(path, _producer_layer(src, layer_of), names(point), names(branch)))
        return graph.call_module(path, (x,))

    # the graph has no owning module: the EdgeScales join the module tree below
    graph = on_branch_edges(gm, reach, edge_scale)
    root: dict[str, Any] = dict(scalers)
    for n in graph.nodes:
        target = str(n.target)
        if n.op == "call_module" and target not in root:
            root[target] = gm.get_submodule(target)
        elif n.op == "get_attr" and target not in root:
            root[target] = functools.reduce(getattr, target.split("."), gm)
    return fx.GraphModule(root, graph, "BranchScale"), edges



def _cut_index(cfg: DRMGFStepConfig, nodes: list[fx.Node], layers: list[fx.Node],
               index: Mapping[fx.Node, int]) -> int:
    f = cfg.per_task_from
    if isinstance(f, str):
        for n in nodes:
            if n.op in ("call_module", "get_attr") and (
                    str(n.target) == f or str(n.target).startswith(f + ".")):
                return index[n]
        raise ValueError(f"per_task_from={f!r} names no module of the traced graph; "
                         f"e.g. {[str(n.target) for n in layers[:3]]}")
    if not layers:
        return 0
    k = min(math.floor(float(f) * len(layers)), len(layers))
    return index[layers[k]] if k < len(layers) else len(nodes) - 1


def _params_used(nodes: list[fx.Node], gm: fx.GraphModule, params: Mapping[str, Any]) -> set[str]:
    used: set[str] = set()
    for n in nodes:
        if n.op == "call_module":
            prefix = str(n.target)
            for pn, _ in gm.get_submodule(prefix).named_parameters():
                used.add(f"{prefix}.{pn}")
        elif n.op == "get_attr" and str(n.target) in params:
            used.add(str(n.target))
    return used


def build_plan(gm: fx.GraphModule, cfg: DRMGFStepConfig, outputs: Any, tasks: list[str],
               layer_of: Mapping[str, str], params: Mapping[str, Any],
               compiler: Callable[[Any], Callable[..., Any]] | None) -> dict[str, Any]:
    """The graph ``drmgf-step`` runs forward in ``cfg.mode`` (``outputs``: the surgeon's task
    outputs; ``layer_of``: module path -> shared weight name), with what its backward needs."""
    if cfg.mode == "branch":
        reach = node_reach(gm.graph, outputs)
        g, edges = branch_graph(gm, reach, tasks, layer_of)
        return {"gm": g, "edges": edges}
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    layers = [n for n in nodes if n.op == "call_module" and str(n.target) in layer_of]
    cut_at = 0
    if cfg.mode == "depth":
        cut_at = _cut_index(cfg, nodes, layers, index)
    upper_layers = {str(n.target) for n in layers if index[n] >= cut_at}
    cut: set[str] = set()
    if cut_at > 0:
        for n in nodes[:cut_at]:
            if n.op in ("placeholder", "output"):
                continue
            if any(index[u] >= cut_at for u in n.users):
                cut.add(n.name)
    g, names, cut_names = capture_graph(gm, upper_layers, cut, cut_at)
    upper_params = _params_used(nodes[cut_at:], gm, params)
    lower_params = _params_used(nodes[:cut_at], gm, params)
    both = upper_params & lower_params
    if both:
        raise NotImplementedError(
            f"drmgf-step mode='depth': parameters {sorted(both)[:3]} are used on both sides "
            f"of the cut at per_task_from={cfg.per_task_from!r}; choose another cut")
    run: Any = g
    if compiler is not None and not cut_names and ProbedGraph.eligible(g, names):
        run = ProbedGraph(g, names, compiler)  # whole, shared weights detached
    elif compiler is not None:  # in segments between the eager shared layers
        run = compiler(eager_nodes(g, set(names), {_cut_identity: _cut_identity_eager}))
    return {"gm": g, "run": run, "names": names, "cut_names": cut_names,
            "upper_params": upper_params, "cut_at": cut_at}


def branch_edge_weights(plan: Mapping[str, Any], bank: Any) -> None:
    """Set each branch edge's scale to ``|R| * mean_{t in branch} D_t`` from ``bank``'s dominance
    (restricted to the tasks R of the branch point; the mean over layers where no single shared
    layer produces the point's channels)."""
    with torch.no_grad():
        for e in plan["edges"]:
            mod = plan["gm"].get_submodule(e.module)
            layers = [e.layer] if e.layer is not None else [
                n for n in bank.names if set(e.point_tasks) <= set(bank.tasks_of[n])]
            weights = []
            for layer in layers:
                if not set(e.point_tasks) <= set(bank.tasks_of[layer]):
                    continue
                d = bank.dominance(layer).detach()
                if d.dim() == 3:
                    d = d.mean(-1)
                order = bank.tasks_of[layer]
                d = d[[order.index(t) for t in e.point_tasks]]
                d = d / d.sum(0, keepdim=True).clamp_min(1e-30)
                rows = [e.point_tasks.index(t) for t in e.branch_tasks]
                w = len(e.point_tasks) * d[rows].mean(0)
                weights.append(w if e.layer is not None else w.mean())
            mod.weight = (weights[0] if e.layer is not None else
                          torch.stack(weights).mean()) if weights else None
