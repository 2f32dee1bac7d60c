"""Collapse a traced topology into module blocks and lay the blocks out in layers.

Everything here is pure Python (networkx only) and shared by the HTML report
(:mod:`routesurgeon.viz.report`) and the static renderers (:mod:`routesurgeon.viz.static`).

* :class:`Hierarchy` groups the op nodes of a :class:`~routesurgeon.topology.Topology` by module
  prefix: :meth:`Hierarchy.view` gives the whole model at one depth of the module tree and
  :meth:`Hierarchy.expand` the inside of one block one level deeper (with ports to its
  neighbours). Shape bookkeeping ops (``x.shape``, ``size()``) and dead ops are left out,
  parameter-free glue ops (``getitem``, ``view``...) join a neighbouring block, and blocks that
  would form a cycle are merged, so every view is a DAG.
* :func:`layered_layout` places the blocks of a view: columns are networkx topological
  generations, the order within a column comes from barycenter sweeps, and long chains wrap into
  several bands (rows) so that a ResNet or a U-Net fits a screen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx

# the block model and the hierarchy live in their own modules; re-exported here
from routesurgeon.viz.blocks import Block, BlockGraph, fmt_count, layer_name
from routesurgeon.viz.hierarchy import Hierarchy

__all__ = [
    "Block",
    "BlockGraph",
    "Box",
    "EdgeGeom",
    "Hierarchy",
    "Layout",
    "fmt_count",
    "layer_name",
    "layered_layout",
]


# -- layout -------------------------------------------------------------------------------------
@dataclass
class Box:
    """A placed block: top-left corner, size, column and band."""

    x: float
    y: float
    w: float
    h: float
    col: int
    band: int


@dataclass
class EdgeGeom:
    """A routed edge as path commands: ('M', x, y), ('L', x, y), ('C', x1, y1, x2, y2, x, y)."""

    src: str
    dst: str
    channels: int
    cmds: list[tuple[Any, ...]]

    def svg_path(self) -> str:
        return " ".join(c[0] + " " + " ".join(f"{v:.1f}" for v in c[1:]) for c in self.cmds)


@dataclass
class Layout:
    """Positions of every block and the route of every edge of a view."""

    boxes: dict[str, Box]
    edges: list[EdgeGeom]
    width: float
    height: float
    n_cols: int
    n_bands: int


def block_height(b: Block) -> float:
    """Box height: I/O boxes are slim; module boxes grow with log2(channels)."""
    if b.is_io:
        return 28.0
    ch = b.out_channels or 1
    return round(44.0 + 22.0 * min(1.0, math.log2(max(1, ch)) / 11.0), 1)


def _layers(g: nx.DiGraph, blocks: dict[str, Block]) -> dict[str, int]:
    layer: dict[str, int] = {}
    for i, gen in enumerate(nx.topological_generations(g)):
        for n in gen:
            layer[n] = i
    # sources (other than inputs) sit just before their first consumer
    for n in sorted(layer, key=lambda n: -layer[n]):
        if g.in_degree(n) == 0 and blocks[n].kind not in ("input", "port_in") and g.out_degree(n):
            layer[n] = max(layer[n], min(layer[s] for s in g.successors(n)) - 1)
    # in-ports in column 0; out-ports in the last column
    if any(b.kind == "port_in" for b in blocks.values()):
        for n in layer:
            if blocks[n].kind != "port_in":
                layer[n] += 1
            else:
                layer[n] = 0
    last = max(layer.values(), default=0)
    for n in layer:
        if blocks[n].kind == "port_out":
            layer[n] = max([last, *(layer[p] + 1 for p in g.predecessors(n))])
    # compact: drop empty columns
    used = sorted(set(layer.values()))
    remap = {c: i for i, c in enumerate(used)}
    return {n: remap[c] for n, c in layer.items()}


def _order(
    g: nx.DiGraph, layer: dict[str, int], blocks: dict[str, Block], sweeps: int = 6
) -> list[list[str]]:
    n_cols = max(layer.values(), default=-1) + 1
    cols: list[list[str]] = [[] for _ in range(n_cols)]
    for n in sorted(layer, key=lambda n: (blocks[n].first, n)):
        cols[layer[n]].append(n)

    def pos() -> dict[str, float]:
        out: dict[str, float] = {}
        for col in cols:
            for i, n in enumerate(col):
                out[n] = (i + 0.5) / len(col)
        return out

    for it in range(sweeps):
        p = pos()
        rng = range(1, n_cols) if it % 2 == 0 else range(n_cols - 2, -1, -1)
        for c in rng:

            def bary(n: str, p: dict[str, float] = p, fwd: bool = it % 2 == 0) -> float:
                nb = list(g.predecessors(n)) if fwd else list(g.successors(n))
                return sum(p[m] for m in nb) / len(nb) if nb else p[n]

            cols[c].sort(key=bary)
    return cols


def _rounded(points: Sequence[tuple[float, float]], r: float = 10.0) -> list[tuple[Any, ...]]:
    """Polyline with rounded corners as path commands (corners as cubic curves)."""
    cmds: list[tuple[Any, ...]] = [("M", *points[0])]
    for i in range(1, len(points) - 1):
        (x0, y0), (x1, y1), (x2, y2) = points[i - 1], points[i], points[i + 1]
        d1 = math.hypot(x1 - x0, y1 - y0)
        d2 = math.hypot(x2 - x1, y2 - y1)
        rr = min(r, d1 / 2, d2 / 2)
        if rr <= 0.5:
            cmds.append(("L", x1, y1))
            continue
        ax, ay = x1 - (x1 - x0) / d1 * rr, y1 - (y1 - y0) / d1 * rr
        bx, by = x1 + (x2 - x1) / d2 * rr, y1 + (y2 - y1) / d2 * rr
        cmds.append(("L", ax, ay))
        cmds.append(("C", (ax + x1) / 2, (ay + y1) / 2, (x1 + bx) / 2, (y1 + by) / 2, bx, by))
    cmds.append(("L", *points[-1]))
    return cmds


def layered_layout(
    bg: BlockGraph,
    box_width: float = 136.0,
    col_gap: float = 42.0,
    row_gap: float = 14.0,
    max_width: float | None = 1320.0,
    margin: float = 16.0,
) -> Layout:
    """Place the blocks of ``bg`` in left-to-right layers, wrapping into bands.

    Columns are the topological generations of the block DAG; the vertical order inside a
    column minimises crossings with barycenter sweeps. When the columns do not fit in
    ``max_width`` they wrap into bands of (nearly) equal length, read like lines of text.
    """
    g = bg.to_nx()
    blocks = bg.blocks
    if not blocks:
        return Layout({}, [], 2 * margin, 2 * margin, 0, 0)
    layer = _layers(g, blocks)
    cols = _order(g, layer, blocks)
    n_cols = len(cols)
    col_w = box_width + col_gap
    per_band = n_cols
    if max_width is not None:
        fit = max(1, int((max_width - 2 * margin + col_gap) // col_w))
        n_bands = math.ceil(n_cols / fit)
        per_band = math.ceil(n_cols / n_bands)
    n_bands = math.ceil(n_cols / per_band)
    heights = {n: block_height(blocks[n]) for n in blocks}
    col_h = [sum(heights[n] for n in col) + row_gap * (len(col) - 1) for col in cols]
    band_of = [c // per_band for c in range(n_cols)]
    # edges spanning columns inside a band arc above it: reserve room
    arc_room = [0] * n_bands
    cross = [0] * n_bands
    for u, v in g.edges:
        bu, bv = band_of[layer[u]], band_of[layer[v]]
        if bu == bv and layer[v] - layer[u] > 1:
            arc_room[bu] += 1
        elif bv > bu:
            cross[bu] += 1
    band_top: list[float] = []
    band_h: list[float] = []
    y = margin
    for b in range(n_bands):
        top_pad = 12.0 + min(40.0, 6.0 * arc_room[b]) if arc_room[b] else 6.0
        band_top.append(y + top_pad)
        h = max(col_h[c] for c in range(n_cols) if band_of[c] == b)
        band_h.append(h)
        gap = 26.0 + min(30.0, 3.0 * cross[b])
        y += top_pad + h + gap
    height = y - 10.0 + margin
    boxes: dict[str, Box] = {}
    for c, col in enumerate(cols):
        b = band_of[c]
        x = margin + (c % per_band) * col_w
        yy = band_top[b] + (band_h[b] - col_h[c]) / 2
        for n in col:
            boxes[n] = Box(x, yy, box_width, heights[n], c, b)
            yy += heights[n] + row_gap
    width = margin * 2 + min(per_band, n_cols) * col_w - col_gap
    # edges
    geoms: list[EdgeGeom] = []
    arc_k = [0] * n_bands
    cross_k = [0] * n_bands
    for (u, v), ch in sorted(bg.edges.items(), key=lambda e: (layer[e[0][0]], layer[e[0][1]])):
        a, z = boxes[u], boxes[v]
        x1, y1 = a.x + a.w, a.y + a.h / 2
        x2, y2 = z.x, z.y + z.h / 2
        if a.band == z.band:
            span = z.col - a.col
            if span <= 1:
                dx = (x2 - x1) / 2
                cmds: list[tuple[Any, ...]] = [
                    ("M", x1, y1),
                    ("C", x1 + dx, y1, x2 - dx, y2, x2, y2),
                ]
            else:
                k = arc_k[a.band]
                arc_k[a.band] += 1
                peak = band_top[a.band] - 6.0 - min(34.0, 5.0 * k)
                cmds = _rounded(
                    [
                        (x1, y1),
                        (x1 + 12, y1),
                        (x1 + 12, peak),
                        (x2 - 12, peak),
                        (x2 - 12, y2),
                        (x2, y2),
                    ],
                    r=9.0,
                )
        else:
            # down the free column gap right of the source (columns line up across bands),
            # along the gap above the target band, then into the target from the left
            k = cross_k[a.band]
            cross_k[a.band] += 1
            lane = x1 + 10 + (k % 6) * 4.0
            gap_y = band_top[z.band] - 10.0 - min(18.0, 3.0 * (k % 7))
            pts = [(x1, y1), (lane, y1), (lane, gap_y), (x2 - 14, gap_y), (x2 - 14, y2), (x2, y2)]
            cmds = _rounded(pts, r=10.0)
        geoms.append(EdgeGeom(u, v, ch, cmds))
    return Layout(boxes, geoms, width, height, n_cols, n_bands)
