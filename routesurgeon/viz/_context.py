"""What a report is rendered from: the topology, its block hierarchy and the data."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from routesurgeon.topology import Layer, Topology
from routesurgeon.viz._html import (
    _floats,
    task_colours,
)
from routesurgeon.viz.layout import (
    Hierarchy,
    layer_name,
)


# -- context ----------------------------------------------------------------------------------
@dataclass
class _Ctx:
    topology: Topology
    tasks: tuple[str, ...]
    colour: dict[str, str]
    hier: Hierarchy
    depth: int
    layers: list[Layer]
    layer_by_name: dict[str, Layer]
    layer_group: dict[str, str]
    total_params: int
    total_flops: int
    importance: dict[str, dict[str, list[float]]] | None
    history: list[dict[str, Any]] | None
    routes: dict[str, dict[str, Any]] | None
    subview_ids: dict[str, int] = field(default_factory=dict)
    kept_cache: dict[tuple[str, str], tuple[int, int] | None] = field(default_factory=dict)

    def tidx(self, t: str) -> int:
        return self.tasks.index(t)

    def kept(self, task: str, layers: Iterable[str]) -> tuple[int, int] | None:
        """(kept channels, channels) of ``layers`` in ``task``'s route, or None if unknown."""
        if not self.routes or task not in self.routes:
            return None
        r = self.routes[task] or {}
        kept = r.get("kept") or {}
        chans = r.get("channels") or {}
        k = c = 0
        found = False
        for la in layers:
            if la in chans:
                found = True
                c += int(chans[la])
                k += int(kept.get(la, 0))
        return (k, c) if found and c > 0 else None


def _build_ctx(
    topology: Topology,
    importance: Mapping[str, Mapping[str, Any]] | None,
    history: Sequence[Mapping[str, Any]] | None,
    routes: Mapping[str, Mapping[str, Any]] | None,
) -> _Ctx:
    tasks = tuple(topology.tasks)
    hier = Hierarchy(topology)
    depth = hier.auto_depth()
    layers = topology.layers()
    view = hier.view(depth)
    layer_group: dict[str, str] = {}
    for n, d in topology.graph.nodes(data=True):
        ln = layer_name(d)
        if ln is not None and ln not in layer_group and n in view.node_block:
            layer_group[ln] = view.blocks[view.node_block[n]].label
    imp: dict[str, dict[str, list[float]]] | None = None
    if importance:
        imp = {}
        for la, per_task in importance.items():
            if not per_task:
                continue
            imp[str(la)] = {str(t): _floats(v) for t, v in per_task.items()}
        imp = imp or None
    hist = [dict(h) for h in history] if history else None
    rts = {str(t): dict(r or {}) for t, r in routes.items()} if routes else None
    return _Ctx(
        topology=topology,
        tasks=tasks,
        colour=task_colours(tasks),
        hier=hier,
        depth=depth,
        layers=layers,
        layer_by_name={la.name: la for la in layers},
        layer_group=layer_group,
        total_params=max(1, topology.total_params()),
        total_flops=max(1, topology.total_flops()),
        importance=imp,
        history=hist or None,
        routes=rts or None,
    )


def _layer_order(ctx: _Ctx, names: Iterable[str]) -> list[str]:
    pos = {la.name: i for i, la in enumerate(ctx.layers)}
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda n: (pos.get(n, len(pos)), names.index(n)))
