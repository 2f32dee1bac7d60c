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
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from routesurgeon.topology import Topology

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


class Hierarchy:
    """Module-prefix hierarchy of a topology, with cached views per depth."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.tasks: tuple[str, ...] = tuple(topology.tasks)
        g = topology.graph
        self.graph = g
        self.order: dict[str, int] = {n: i for i, n in enumerate(g.nodes)}
        self.meta: set[str] = set()
        self.dead: set[str] = set()
        self.output_nodes: list[str] = []
        for n, d in g.nodes(data=True):
            if d.get("kind") == "output":
                self.output_nodes.append(n)
                continue
            shape = d.get("shape") or []
            preds = list(g.predecessors(n))
            bookkeeping = d.get("type") in _META_TYPES or (
                preds and all(p in self.meta for p in preds)
            )
            if d.get("kind") == "other" and not shape and not d.get("params") and bookkeeping:
                self.meta.add(n)
                continue
            if not d.get("tasks") and not d.get("params") and d.get("kind") != "input":
                self.dead.add(n)
        self.skip = self.meta | self.dead | set(self.output_nodes)
        self.output_sources = self._output_sources()
        depths = [len(_parts(str(d.get("module") or ""))) for _, d in g.nodes(data=True)]
        self.max_depth = max([1, *depths])
        self._views: dict[int, BlockGraph] = {}
        self._subs: dict[str, BlockGraph | None] = {}

    # -- structure -------------------------------------------------------------------------
    def _output_sources(self) -> dict[str, list[str]]:
        """Per task, the graph nodes whose value is returned as that task's output."""
        g = self.graph
        out: dict[str, list[str]] = {t: [] for t in self.tasks}
        preds: list[str] = []
        for o in self.output_nodes:
            preds.extend(p for p in g.predecessors(o) if p not in self.meta)
        for t in self.tasks:
            cands = [p for p in preds if t in (g.nodes[p].get("tasks") or [])]
            keep = [c for c in cands if not any(o != c and nx.has_path(g, c, o) for o in cands)]
            out[t] = sorted(set(keep), key=self.order.__getitem__)
        return out

    def _assign(self, nodes: Sequence[str], depth: int) -> tuple[dict[str, str], dict[str, str]]:
        """Block key per node (and each key's kind) for ``nodes`` grouped at ``depth``."""
        g = self.graph
        member = set(nodes)
        key: dict[str, str] = {}
        kinds: dict[str, str] = {}
        glue: list[str] = []
        for n in nodes:
            if n in self.skip:
                continue
            d = g.nodes[n]
            parts = _parts(str(d.get("module") or ""))
            if d.get("kind") == "input":
                k, kind = f"input:{n}", "input"
            elif len(parts) >= depth:
                k, kind = ".".join(parts[:depth]), "module"
            elif d.get("op") == "call_module":
                k, kind = ".".join(parts), "module"
            elif d.get("kind") == "param" or (d.get("type") in _GLUE_TYPES and not d.get("params")):
                glue.append(n)
                continue
            else:
                k, kind = f"op:{n}", "op"
            key[n] = k
            kinds.setdefault(k, kind)
        # glue joins the block of its latest assigned input, else of its first consumer
        for n in glue:
            ps = [p for p in g.predecessors(n) if p in key and p in member]
            if ps:
                key[n] = key[max(ps, key=self.order.__getitem__)]
        for n in reversed(glue):
            if n in key:
                continue
            ss = [s for s in g.successors(n) if s in key and s in member]
            if ss:
                key[n] = key[min(ss, key=self.order.__getitem__)]
            else:
                key[n] = f"op:{n}"
                kinds[key[n]] = "op"
        return key, kinds

    def _build(
        self,
        nodes: Sequence[str],
        depth: int,
        prefix: str,
        parent: BlockGraph | None = None,
    ) -> BlockGraph:
        g = self.graph
        key, kinds = self._assign(nodes, depth)
        # merge blocks that would form a cycle
        kg = nx.DiGraph()
        kg.add_nodes_from(set(key.values()))
        for n, k in key.items():
            for s in g.successors(n):
                ks = key.get(s)
                if ks is not None and ks != k:
                    kg.add_edge(k, ks)
        if not nx.is_directed_acyclic_graph(kg):
            for comp in nx.strongly_connected_components(kg):
                if len(comp) < 2:
                    continue
                names = sorted(comp, key=lambda c: min(self.order[n] for n in key if key[n] == c))
                merged = "merged:" + _common_prefix([_strip_kind(c) for c in names])
                for n in list(key):
                    if key[n] in comp:
                        key[n] = merged
                kinds[merged] = "merged"
        # blocks in order of first member
        groups: dict[str, list[str]] = {}
        for n in sorted(key, key=self.order.__getitem__):
            groups.setdefault(key[n], []).append(n)
        blocks: dict[str, Block] = {}
        node_block: dict[str, str] = {}
        ids: dict[str, str] = {}
        for i, (k, mem) in enumerate(groups.items()):
            bid = f"b{i}"
            ids[k] = bid
            for n in mem:
                node_block[n] = bid
            blocks[bid] = self._block(bid, k, kinds.get(k, "module"), mem, prefix, depth)
        edges: dict[tuple[str, str], int] = {}
        for n, bid in node_block.items():
            ch = g.nodes[n].get("out_channels") or 0
            for s in g.successors(n):
                sb = node_block.get(s)
                if sb is not None and sb != bid:
                    edges[(bid, sb)] = max(edges.get((bid, sb), 0), int(ch))
        member = set(nodes)
        n_id = len(blocks)
        port_ids: dict[tuple[str, str], str] = {}

        def port(kind: str, ref: str, label: str, tasks: Iterable[str], first: int) -> str:
            nonlocal n_id
            pk = (kind, ref)
            if pk not in port_ids:
                pid = f"b{n_id}"
                n_id += 1
                port_ids[pk] = pid
                blocks[pid] = Block(
                    pid, ref, label, kind, tasks=self._sorted_tasks(tasks), first=first
                )
            return port_ids[pk]

        # task outputs
        for t, srcs in self.output_sources.items():
            for s in srcs:
                if s not in node_block:
                    continue
                if parent is None:
                    pid = port("output", f"out:{t}", t, [t], 10**9)
                else:
                    pid = port("port_out", f"out:{t}", f"→ {t}", [t], 10**9)
                ch = g.nodes[s].get("out_channels") or 0
                edges[(node_block[s], pid)] = max(edges.get((node_block[s], pid), 0), int(ch))
        # ports to the rest of the model (drill-down views only)
        if parent is not None:
            for n in sorted(node_block, key=self.order.__getitem__):
                for p in g.predecessors(n):
                    if p in member or p in self.skip or p not in parent.node_block:
                        continue
                    pb = parent.blocks[parent.node_block[p]]
                    pid = port("port_in", pb.name, f"← {pb.label}", pb.tasks, -1)
                    ch = int(g.nodes[p].get("out_channels") or 0)
                    e = (pid, node_block[n])
                    edges[e] = max(edges.get(e, 0), ch)
                for s in g.successors(n):
                    if s in member or s in self.skip or s not in parent.node_block:
                        continue
                    nxt = parent.blocks[parent.node_block[s]]
                    pid = port("port_out", nxt.name, f"→ {nxt.label}", nxt.tasks, 10**9)
                    ch = int(g.nodes[n].get("out_channels") or 0)
                    e = (node_block[n], pid)
                    edges[e] = max(edges.get(e, 0), ch)
        bg = BlockGraph(self.tasks, depth, prefix, blocks, edges, node_block)
        self._finish_labels(bg)
        return bg

    def _sorted_tasks(self, tasks: Iterable[str]) -> tuple[str, ...]:
        ts = set(tasks)
        return tuple(t for t in self.tasks if t in ts)

    def _block(self, bid: str, k: str, kind: str, mem: list[str], prefix: str, depth: int) -> Block:
        g = self.graph
        tasks: set[str] = set()
        params = flops = filters = shared = nf = 0
        layers: list[str] = []
        types: Counter[str] = Counter()
        mix: Counter[str] = Counter()
        memset = set(mem)
        out_ch: int | None = None
        exit_ch: int | None = None
        for n in mem:
            d = g.nodes[n]
            tasks.update(d.get("tasks") or [])
            params += int(d.get("params") or 0)
            flops += int(d.get("flops") or 0)
            if d.get("kind") not in ("param",):
                types[str(d.get("type"))] += 1
            ln = layer_name(d)
            if ln is not None and ln not in layers:
                layers.append(ln)
                mix[",".join(self._sorted_tasks(d.get("tasks") or []))] += 1
            if d.get("shared_filters") is not None and d.get("out_channels"):
                nf += 1
                filters += int(d["out_channels"])
                shared += int(d["shared_filters"])
            oc = d.get("out_channels")
            if oc:
                out_ch = int(oc)
                if any(s not in memset for s in g.successors(n)):
                    exit_ch = int(oc)
        name = _strip_kind(k)
        if kind == "input" or kind == "op":
            name = k.split(":", 1)[1]
        label = name
        if kind == "op":
            label = str(g.nodes[mem[0]].get("type"))
        elif kind == "input":
            label = f"input {name}"
        if kind == "module" and len(mem) == 1:
            subtitle = str(g.nodes[mem[0]].get("type"))
        elif kind in ("module", "merged"):
            subtitle = f"{len(layers)} layers" if len(layers) != 1 else "1 layer"
        else:
            subtitle = ""
        return Block(
            id=bid,
            name=name,
            label=label,
            kind=kind,
            tasks=self._sorted_tasks(tasks),
            members=tuple(mem),
            params=params,
            flops=flops,
            out_channels=exit_ch if exit_ch is not None else out_ch,
            layers=tuple(layers),
            n_filters_layers=nf,
            filters=filters,
            shared_filters=shared,
            types=tuple(types.most_common()),
            first=self.order[mem[0]],
            subtitle=subtitle,
            task_mix=tuple(sorted(mix.items(), key=lambda kv: -kv[1])),
        )

    def _finish_labels(self, bg: BlockGraph) -> None:
        """Labels relative to the view prefix; mark the expandable blocks.

        In a whole-model view whose blocks mostly sit under one root module (a wrapped
        ``backbone``), that root is left out of the labels (``BlockGraph.label_strip``).
        """
        strip = bg.prefix + "." if bg.prefix else ""
        if not strip:
            mods = [b.name for b in bg.blocks.values() if b.kind in ("module", "merged")]
            roots = Counter(n.split(".")[0] for n in mods if "." in n)
            if roots and len(mods) >= 4:
                root, cnt = roots.most_common(1)[0]
                if cnt >= 0.75 * len(mods):
                    strip = root + "."
                    bg.label_strip = strip
        for b in bg.blocks.values():
            if b.kind in ("module", "merged"):
                lab = b.name[len(strip) :] if strip and b.name.startswith(strip) else b.name
                b.label = (lab or b.name or "(root)") + ("*" if b.kind == "merged" else "")
                b.expandable = b.kind == "module" and self._can_expand(b)

    def _can_expand(self, b: Block) -> bool:
        depth = len(_parts(b.name))
        if len(b.members) < 2:
            return False
        g = self.graph
        if any(len(_parts(str(g.nodes[n].get("module") or ""))) > depth for n in b.members):
            return True
        key, _ = self._assign(list(b.members), depth + 1)
        return len(set(key.values())) > 1

    # -- public API --------------------------------------------------------------------------
    def view(self, depth: int) -> BlockGraph:
        """The whole model collapsed at ``depth`` components of the module path."""
        depth = max(1, int(depth))
        if depth not in self._views:
            nodes = list(self.graph.nodes)
            self._views[depth] = self._build(nodes, depth, "")
        return self._views[depth]

    def expand(self, name: str) -> BlockGraph | None:
        """Inside of module block ``name`` one level deeper, with ports; None if a leaf."""
        if name not in self._subs:
            depth = len(_parts(name))
            parent = self.view(depth)
            blk = next(
                (b for b in parent.blocks.values() if b.name == name and b.kind == "module"), None
            )
            if blk is None or not blk.expandable:
                self._subs[name] = None
            else:
                self._subs[name] = self._build(list(blk.members), depth + 1, name, parent)
        return self._subs[name]

    def expandable_names(self, max_views: int = 400) -> list[str]:
        """Every module prefix that has an inside view, shallow first (at most ``max_views``)."""
        out: list[str] = []
        for depth in range(1, self.max_depth + 1):
            for b in self.view(depth).blocks.values():
                if b.expandable and len(_parts(b.name)) == depth and b.name not in out:
                    out.append(b.name)
                    if len(out) >= max_views:
                        return out
        return out

    def auto_depth(self, lo: int = 20, hi: int = 60) -> int:
        """Shallowest depth whose view has at least ``lo`` module blocks (at most ``hi``)."""
        best = 1
        for depth in range(1, self.max_depth + 1):
            n = len(self.view(depth).module_blocks())
            if n > hi and depth > 1:
                return best
            best = depth
            if n >= lo:
                return depth
        return best


def _strip_kind(k: str) -> str:
    for pre in ("merged:", "op:", "input:"):
        if k.startswith(pre):
            return k[len(pre) :]
    return k


def _common_prefix(names: Sequence[str]) -> str:
    split = [n.split(".") for n in names]
    out: list[str] = []
    for parts in zip(*split):
        if all(p == parts[0] for p in parts):
            out.append(parts[0])
        else:
            break
    return ".".join(out) or names[0]


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
