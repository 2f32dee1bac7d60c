"""What the static views draw from: the topology of a Surgeon or a Topology, at a block depth."""

from __future__ import annotations

from typing import Any

from routesurgeon.errors import InputError
from routesurgeon.topology import Topology
from routesurgeon.viz.layout import Hierarchy


def _topology(source: Any) -> Topology:
    """The topology of a Surgeon (``.topology``) or the Topology itself."""
    topo = getattr(source, "topology", source)
    if not isinstance(topo, Topology):
        raise InputError(f"expected a Surgeon or a Topology, got {type(source).__name__}")
    return topo


def _resolve_depth(hier: Hierarchy, depth: int | None) -> int:
    return hier.auto_depth() if depth is None else max(1, int(depth))
