"""The sharing topology: which task outputs every traced op and layer reaches.

``Topology.graph`` is a ``networkx.DiGraph`` with one node per traced op. Node attributes:
``op`` (fx op: call_module, call_function, ...), ``kind`` (conv, linear, norm, input, output,
param, other), ``type`` (module class or function/method name), ``module`` (qualified module name
of a call_module node, else the innermost module the op was traced in), ``params`` (parameter count
owned by the node), ``flops`` (2 x MACs per sample of conv/linear/matmul), ``shape`` (output shape),
``out_channels``, ``tasks`` (sorted task names the node reaches, comma-joined in GraphML),
``shared_filters`` (for conv/linear: output channels two or more tasks reach).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from routesurgeon.channels import ChannelGroups
from routesurgeon.errors import TaskError
from routesurgeon.outputs import OutputSpec
from routesurgeon.shapes import shape_of

__all__ = ["Layer", "Topology", "node_reach"]

_KINDS: list[tuple[tuple[type, ...], str]] = [
    ((nn.modules.conv._ConvNd,), "conv"),
    ((nn.Linear,), "linear"),
    ((nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm), "norm"),
]


def node_reach(graph: fx.Graph, outputs: OutputSpec) -> dict[fx.Node, int]:
    """Task bit set per node: bit i is set when the node influences task i's output."""
    reach: dict[fx.Node, int] = {n: 0 for n in graph.nodes}
    for i, t in enumerate(outputs.tasks):
        reach[outputs.node_of(t)] |= 1 << i
    for n in reversed(list(graph.nodes)):
        bits = reach[n]
        if bits:
            for a in n.all_input_nodes:
                reach[a] |= bits
    return reach


def _kind(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, str]:
    if node.op == "placeholder":
        return "input", "input"
    if node.op == "output":
        return "output", "output"
    if node.op == "get_attr":
        return "param", "get_attr"
    if node.op == "call_module":
        m = modules[str(node.target)]
        for types, kind in _KINDS:
            if isinstance(m, types):
                return kind, type(m).__name__
        return "module", type(m).__name__
    name = getattr(node.target, "__name__", str(node.target))
    if name in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                "conv_transpose3d"):
        return "conv", name
    if name == "linear":
        return "linear", name
    if name in ("batch_norm", "layer_norm", "group_norm", "instance_norm"):
        return "norm", name
    return "other", name


def _flops(
    node: fx.Node, modules: dict[str, nn.Module], params: dict[str, Any], kind: str
) -> int:
    out = shape_of(node)
    if out is None or not out:
        return 0
    per_sample = math.prod(out[1:])
    if kind in ("conv", "linear"):
        w = None
        if node.op == "call_module":
            w = getattr(modules[str(node.target)], "weight", None)
        elif len(node.args) > 1 and isinstance(node.args[1], fx.Node):
            wn = node.args[1]
            if wn.op == "get_attr":
                w = params.get(str(wn.target))
        if w is None:
            return 0
        if kind == "conv" and _transposed(node, modules):
            # weight (in, out/groups, ...): every input element meets one row of it
            src = shape_of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            return 2 * math.prod(src[1:]) * math.prod(w.shape[1:]) if src else 0
        fan_in = math.prod(w.shape[1:]) if kind == "conv" else w.shape[1]
        return 2 * per_sample * fan_in
    if node.op in ("call_function", "call_method") and getattr(
        node.target, "__name__", str(node.target)
    ) in ("matmul", "bmm", "__matmul__", "baddbmm"):
        a = shape_of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        return 2 * per_sample * (a[-1] if a else 0)
    return 0


def _transposed(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], nn.modules.conv._ConvTransposeNd)
    return node.target in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


@dataclass(frozen=True)
class Layer:
    """A parametrised layer: one module (or functional op on parameters) of the traced graph."""

    name: str
    kind: str
    type: str
    params: int
    flops: int
    out_channels: int | None
    tasks: frozenset[str]
    shared_filters: int | None

    @property
    def shared(self) -> bool:
        return len(self.tasks) >= 2


class Topology:
    """Sharing topology of a traced multi-output model."""

    def __init__(self, graph: nx.DiGraph, tasks: Iterable[str]) -> None:
        self.graph = graph
        self.tasks = tuple(tasks)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_graph(
        cls,
        gm: fx.GraphModule,
        outputs: OutputSpec,
        reach: dict[fx.Node, int],
        groups: ChannelGroups | None = None,
    ) -> Topology:
        tasks = outputs.tasks
        names = [sorted(t for i, t in enumerate(tasks) if bits >> i & 1)
                 for bits in range(1 << len(tasks))] if len(tasks) <= 10 else None
        modules = dict(gm.named_modules())
        named_params = dict(gm.named_parameters(remove_duplicate=False))
        g = nx.DiGraph(tasks=list(tasks))
        seen_modules: set[str] = set()
        nodes: list[tuple[str, dict[str, Any]]] = []
        edges: list[tuple[str, str]] = []
        for n in gm.graph.nodes:
            kind, typ = _kind(n, modules)
            params = 0
            if n.op == "call_module" and str(n.target) not in seen_modules:
                seen_modules.add(str(n.target))
                params = sum(p.numel() for p in modules[str(n.target)].parameters())
            elif n.op == "get_attr":
                p = named_params.get(str(n.target))
                params = p.numel() if p is not None else 0
            stack = n.meta.get("nn_module_stack") or {}
            scope = next(reversed(stack.values()))[0] if stack else ""
            module = str(n.target) if n.op == "call_module" else scope
            shape = shape_of(n)
            space: Any = groups.spaces.get(n) if groups is not None else None
            out_channels = (
                len(space.ids) if hasattr(space, "ids")
                else (shape[1] if shape and len(shape) > 1 else None)
            )
            shared_filters = None
            if groups is not None and n in groups.layers and groups.layers[n]["kind"] != "norm":
                bits_per_filter = groups.reach[groups.labels[groups.layers[n]["out"]]]
                # two or more task bits set <=> clearing the lowest one leaves some
                shared_filters = int(np.count_nonzero(bits_per_filter & (bits_per_filter - 1)))
            bits = reach.get(n, 0)
            nodes.append((n.name, {
                "op": n.op,
                "kind": kind,
                "type": typ,
                "module": module,
                "params": int(params),
                "flops": int(_flops(n, modules, named_params, kind)),
                "shape": list(shape) if shape else [],
                "out_channels": out_channels,
                "shared_filters": shared_filters,
                "tasks": list(names[bits]) if names is not None
                else sorted(t for i, t in enumerate(tasks) if bits >> i & 1),
            }))
            edges.extend((a.name, n.name) for a in n.all_input_nodes)
        g.add_nodes_from(nodes)
        g.add_edges_from(edges)
        return cls(g, tasks)

    # -- queries -----------------------------------------------------------------------------
    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise TaskError(f"unknown task {task!r}; tasks are {list(self.tasks)}")

    def layers(self) -> list[Layer]:
        """Parametrised layers (conv, linear, norm and other modules with parameters)."""
        by_name: dict[str, dict[str, Any]] = {}
        for _, d in self.graph.nodes(data=True):
            if d["kind"] in ("input", "output") or not (d["params"] or d["kind"] in
                                                          ("conv", "linear", "norm")):
                continue
            if d["kind"] == "param":
                continue
            name = d["module"] or d["type"]
            entry = by_name.setdefault(name, {"kind": d["kind"], "type": d["type"], "params": 0,
                                              "flops": 0, "out": d["out_channels"],
                                              "tasks": set(), "shared": d["shared_filters"]})
            entry["params"] += d["params"]
            entry["flops"] += d["flops"]
            entry["tasks"].update(d["tasks"])
        return [
            Layer(name, e["kind"], e["type"], e["params"], e["flops"], e["out"],
                  frozenset(e["tasks"]), e["shared"])
            for name, e in by_name.items()
        ]

    def shared_layers(self) -> list[Layer]:
        """Layers two or more tasks reach."""
        return [layer for layer in self.layers() if layer.shared]

    def exclusive_layers(self, task: str) -> list[Layer]:
        """Layers only ``task`` reaches."""
        self._check_task(task)
        return [layer for layer in self.layers() if layer.tasks == frozenset([task])]

    def task_params(self, task: str) -> int:
        self._check_task(task)
        return sum(layer.params for layer in self.layers() if task in layer.tasks)

    def task_flops(self, task: str) -> int:
        self._check_task(task)
        return sum(layer.flops for layer in self.layers() if task in layer.tasks)

    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers())

    def total_flops(self) -> int:
        return sum(layer.flops for layer in self.layers())

    def summary(self) -> dict[str, dict[str, float]]:
        """Per task: layers, shared layers, params and FLOPs it reaches, and their shares."""
        layers = self.layers()
        tp, tf = max(1, self.total_params()), max(1, self.total_flops())
        out: dict[str, dict[str, float]] = {}
        for t in self.tasks:
            mine = [la for la in layers if t in la.tasks]
            filters = [la for la in mine if la.shared_filters is not None and la.out_channels]
            n_filters = sum(la.out_channels or 0 for la in filters)
            out[t] = {
                "layers": len(mine),
                "shared_layers": sum(la.shared for la in mine),
                "exclusive_layers": sum(not la.shared for la in mine),
                "params": sum(la.params for la in mine),
                "param_share": sum(la.params for la in mine) / tp,
                "flops": sum(la.flops for la in mine),
                "flop_share": sum(la.flops for la in mine) / tf,
                "shared_filter_fraction": (
                    sum(la.shared_filters or 0 for la in filters) / n_filters if n_filters else 0.0
                ),
            }
        return out

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = nx.node_link_data(self.graph, edges="edges")
        return {"format": "routesurgeon.topology/1", "tasks": list(self.tasks), "graph": data}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> Topology:
        text = Path(source).read_text() if not str(source).lstrip().startswith("{") else source
        data = json.loads(str(text))
        if data.get("format") != "routesurgeon.topology/1":
            raise ValueError("not a routesurgeon topology JSON (missing format tag)")
        graph = nx.node_link_graph(data["graph"], edges="edges")
        return cls(graph, data["tasks"])

    def to_graphml(self, path: str | Path) -> None:
        g = nx.DiGraph()
        g.graph["tasks"] = ",".join(self.tasks)
        for n, d in self.graph.nodes(data=True):
            g.add_node(n, **{k: _to_graphml_value(k, v) for k, v in d.items()})
        g.add_edges_from(self.graph.edges)
        nx.write_graphml(g, path)

    @classmethod
    def from_graphml(cls, path: str | Path) -> Topology:
        g = nx.read_graphml(path)
        tasks = [t for t in g.graph.get("tasks", "").split(",") if t]
        out = nx.DiGraph(tasks=tasks)
        for n, d in g.nodes(data=True):
            out.add_node(n, **{k: _from_graphml_value(k, v) for k, v in d.items()})
        out.add_edges_from(g.edges)
        return cls(out, tasks)

    def __repr__(self) -> str:
        return (f"Topology(tasks={list(self.tasks)}, nodes={self.graph.number_of_nodes()}, "
                f"layers={len(self.layers())}, shared={len(self.shared_layers())})")


_LIST_KEYS = {"tasks", "shape"}
_OPTIONAL_INT_KEYS = {"out_channels", "shared_filters"}


def _to_graphml_value(key: str, v: Any) -> Any:
    if key in _LIST_KEYS:
        return json.dumps(v)
    if key in _OPTIONAL_INT_KEYS:
        return -1 if v is None else int(v)
    return v


def _from_graphml_value(key: str, v: Any) -> Any:
    if key in _LIST_KEYS:
        return json.loads(v)
    if key in _OPTIONAL_INT_KEYS:
        return None if int(v) < 0 else int(v)
    if key in ("params", "flops"):
        return int(v)
    return v
