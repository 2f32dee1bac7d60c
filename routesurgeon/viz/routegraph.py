"""A task's route as data: a networkx graph of the ops it runs, with kept channels per layer.

:func:`route_graph` takes the traced sharing topology, keeps the ops that reach the task's
output and annotates every layer with the channels the route keeps; :func:`save_route_graph`
writes it as JSON (networkx node-link data) or GraphML, and :func:`load_route_graph` reads
either back into an equal graph.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np
import torch.fx as fx

from routesurgeon.errors import InputError, TaskError
from routesurgeon.routes import RouteMask
from routesurgeon.viz.costs import route_mask_of
from routesurgeon.viz.layout import layer_name

if TYPE_CHECKING:
    from routesurgeon.surgeon import Surgeon

__all__ = ["load_route_graph", "route_graph", "save_route_graph"]

_FORMAT = "routesurgeon.route/1"
#: node attributes that are lists (GraphML stores them as JSON text)
_LIST_KEYS = ("tasks", "shape", "kept")


def route_graph(
    surgeon: Surgeon, task: str, mask: RouteMask | fx.GraphModule | None = None
) -> nx.DiGraph:
    """The ops of ``task``'s route with, per layer, the output channels the route keeps.

    ``mask`` is a :class:`~routesurgeon.routes.RouteMask` (``surgeon.route_masks(task)``) or a
    route from ``surgeon.export_routes``; without it every channel counts as kept (the task's
    unpruned subgraph). Node attributes are the topology's (``op``, ``kind``, ``type``,
    ``module``, ``params``, ``flops``, ``shape``, ``out_channels``, ``tasks``...) plus, on layer
    nodes, ``layer``, ``channels``, ``kept_channels`` and ``kept`` (indices).
    """
    if task not in surgeon.tasks:
        raise TaskError(f"unknown task {task!r}; tasks are {surgeon.tasks}")
    if isinstance(mask, fx.GraphModule):
        mask = route_mask_of(mask)
    if mask is not None and mask.task != task:
        raise InputError(f"the mask is task {mask.task!r}'s route, not {task!r}'s")
    topo = surgeon.topology.graph
    keep_nodes = [
        n
        for n, d in topo.nodes(data=True)
        if task in (d.get("tasks") or []) or d.get("kind") in ("input", "output")
    ]
    g = nx.DiGraph(format=_FORMAT, task=task, tasks=list(surgeon.tasks))
    total = kept_total = 0
    for n in keep_nodes:
        d = dict(topo.nodes[n])
        ln = layer_name(d)
        if ln is not None:
            d["layer"] = ln
            if mask is not None and ln in mask.channels:
                idx = np.asarray(mask.kept.get(ln, []), dtype=int).tolist()
                d["channels"] = int(mask.channels[ln])
                d["kept"] = idx
                d["kept_channels"] = len(idx)
                total += d["channels"]
                kept_total += len(idx)
        g.add_node(n, **d)
    g.add_edges_from((u, v) for u, v in topo.edges if u in g and v in g)
    g.graph["kept_fraction"] = kept_total / total if total else 1.0
    return g


def save_route_graph(graph: nx.DiGraph, path: str | Path) -> Path:
    """Write a route graph as ``.json`` (node-link data) or ``.graphml``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix == ".json":
        data = nx.node_link_data(graph, edges="edges")
        out.write_text(json.dumps(data, indent=1), encoding="utf-8")
    elif suffix == ".graphml":
        g = nx.DiGraph()
        for k, v in graph.graph.items():
            g.graph[k] = json.dumps(v) if isinstance(v, (list, tuple)) else v
        for n, d in graph.nodes(data=True):
            g.add_node(n, **{k: _graphml_value(k, v) for k, v in d.items() if v is not None})
        g.add_edges_from(graph.edges)
        nx.write_graphml(g, out)
    else:
        raise InputError(f"unsupported route graph format {out.suffix!r}; use .json or .graphml")
    return out


def load_route_graph(path: str | Path) -> nx.DiGraph:
    """Read a route graph written by :func:`save_route_graph` (JSON or GraphML)."""
    src = Path(path)
    suffix = src.suffix.lower()
    if suffix == ".json":
        g = nx.node_link_graph(json.loads(src.read_text(encoding="utf-8")), edges="edges")
    elif suffix == ".graphml":
        raw = nx.read_graphml(src)
        g = nx.DiGraph()
        for k, v in raw.graph.items():
            g.graph[k] = json.loads(v) if k == "tasks" else v
        for n, d in raw.nodes(data=True):
            g.add_node(n, **{k: json.loads(v) if k in _LIST_KEYS else v for k, v in d.items()})
        g.add_edges_from(raw.edges)
    else:
        raise InputError(f"unsupported route graph format {src.suffix!r}; use .json or .graphml")
    if g.graph.get("format") != _FORMAT:
        raise InputError(
            f"{src} is not a routesurgeon route graph (format tag {_FORMAT!r} "
            "missing); write it with save_route_graph"
        )
    return g


def _graphml_value(key: str, v: Any) -> Any:
    if key in _LIST_KEYS:
        return json.dumps(list(v))
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v
