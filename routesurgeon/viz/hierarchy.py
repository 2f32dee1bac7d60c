"""Group the op nodes of a topology by module prefix into views of blocks (:class:`Hierarchy`).

See :mod:`routesurgeon.viz.layout` for what a view is and how it is laid out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import networkx as nx

from routesurgeon.topology import Topology
from routesurgeon.viz.blocks import (
    _GLUE_TYPES,
    _META_TYPES,
    Block,
    BlockGraph,
    _parts,
    layer_name,
)

__all__ = ["Hierarchy"]


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
