"""The blocks of a collapsed view (:class:`Block`, :class:`BlockGraph`) and their labels.

Shared by :mod:`routesurgeon.viz.hierarchy` (which builds the views) and
:mod:`routesurgeon.viz.layout` (which places them); see :mod:`routesurgeon.viz.layout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

__all__ = ["Block", "BlockGraph", "fmt_count", "layer_name"]

#: fx op names that only read shapes: never data flow.
_META_TYPES = frozenset({"getattr", "size", "dim", "numel", "shape", "len"})
#: parameter-free ops that are plumbing rather than computation: they join a neighbour block.
_GLUE_TYPES = frozenset(
    {
        "getitem",
        "getattr",
        "contiguous",
        "view",
        "reshape",
        "flatten",
        "permute",
        "transpose",
        "to",
        "type",
        "float",
        "half",
        "clone",
        "detach",
        "squeeze",
        "unsqueeze",
        "expand",
        "expand_as",
        "type_as",
        "unflatten",
        "chunk",
        "split",
        "unbind",
        "identity",
    }
)


def fmt_count(n: float | None, unit: str = "") -> str:
    """Compact human number: 1234567 -> '1.23M' (``unit`` appended)."""
    if n is None:
        return "—"
    n = float(n)
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            v = n / div
            txt = f"{v:.3g}" if v < 100 else f"{v:.0f}"
            return f"{txt}{suf}{unit}"
    return f"{n:.0f}{unit}" if n == int(n) else f"{n:.3g}{unit}"


def layer_name(data: dict[str, Any]) -> str | None:
    """The :class:`~routesurgeon.topology.Layer` name of a graph node, or None if no layer."""
    kind = data.get("kind")
    if kind in ("input", "output", "param"):
        return None
    if not (data.get("params") or kind in ("conv", "linear", "norm")):
        return None
    return str(data.get("module") or data.get("type"))


def _parts(module: str) -> list[str]:
    return module.split(".") if module else []


@dataclass
class Block:
    """One box of a collapsed view: a module prefix, a single op, an input, output or port."""

    id: str
    name: str
    label: str
    kind: str  # module | op | merged | input | output | port_in | port_out
    tasks: tuple[str, ...] = ()
    members: tuple[str, ...] = ()
    params: int = 0
    flops: int = 0
    out_channels: int | None = None
    layers: tuple[str, ...] = ()
    n_filters_layers: int = 0
    filters: int = 0
    shared_filters: int = 0
    types: tuple[tuple[str, int], ...] = ()
    first: int = 0
    expandable: bool = False
    subtitle: str = ""
    #: layer counts per task set ("a,b" -> 3): shows partial sharing inside a block.
    task_mix: tuple[tuple[str, int], ...] = ()

    @property
    def is_port(self) -> bool:
        return self.kind in ("port_in", "port_out")

    @property
    def is_io(self) -> bool:
        return self.kind in ("input", "output", "port_in", "port_out")


@dataclass
class BlockGraph:
    """A collapsed view: blocks, edges (with the largest channel count crossing them)."""

    tasks: tuple[str, ...]
    depth: int
    prefix: str
    blocks: dict[str, Block]
    edges: dict[tuple[str, str], int]
    node_block: dict[str, str] = field(default_factory=dict)
    #: module prefix left out of the block labels ("" if none)
    label_strip: str = ""

    def to_nx(self) -> nx.DiGraph:
        g = nx.DiGraph()
        for bid in self.blocks:
            g.add_node(bid)
        for (u, v), ch in self.edges.items():
            g.add_edge(u, v, channels=ch)
        return g

    def module_blocks(self) -> list[Block]:
        return [b for b in self.blocks.values() if not b.is_io]
