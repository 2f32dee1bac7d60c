"""A compact text tree of the module hierarchy with task markers, for terminals and logs."""

from __future__ import annotations

from typing import Any

from routesurgeon.viz._source import _resolve_depth, _topology
from routesurgeon.viz.layout import Hierarchy, fmt_count

__all__ = ["text_tree"]


class _TNode:
    __slots__ = ("children", "first", "flops", "layers", "n_ops", "params", "tasks", "type")

    def __init__(self, first: int) -> None:
        self.children: dict[str, _TNode] = {}
        self.params = 0
        self.flops = 0
        self.tasks: set[str] = set()
        self.n_ops = 0
        self.layers = 0
        self.type = ""
        self.first = first


def _layers_txt(node: _TNode) -> str:
    if node.layers:
        return f"{node.layers} layer" + ("s" if node.layers > 1 else "")
    return f"{node.n_ops} op" + ("s" if node.n_ops > 1 else "")


def text_tree(
    source: Any,
    depth: int | None = None,
    ascii: bool = False,
    max_children: int = 50,
) -> str:
    """A compact text tree of the module hierarchy with task markers.

    Each line shows the module (indented by the tree), which tasks reach it (``[12·]``: tasks
    1 and 2 of 3; with more than 9 tasks ``[k/T]``), its parameters, FLOPs and type or layer
    count. ``depth`` limits the levels shown (default: the report's block depth).
    ``source`` is a Surgeon or a Topology.
    """
    topology = _topology(source)
    hier = Hierarchy(topology)
    depth = _resolve_depth(hier, depth)
    tasks = list(topology.tasks)
    g = topology.graph
    root = _TNode(0)
    for i, (n, d) in enumerate(g.nodes(data=True)):
        if n in hier.skip or d.get("kind") in ("input", "output"):
            continue
        module = str(d.get("module") or "")
        parts = module.split(".") if module else []
        chain = [root]
        node = root
        for p in parts[:depth]:
            node = node.children.setdefault(p, _TNode(i))
            chain.append(node)
        is_layer = d.get("kind") in ("conv", "linear", "norm") or bool(d.get("params"))
        for c in chain:
            c.params += int(d.get("params") or 0)
            c.flops += int(d.get("flops") or 0)
            c.tasks.update(d.get("tasks") or [])
            c.n_ops += 1
            c.layers += int(is_layer and d.get("kind") != "param")
        if len(parts) <= depth and d.get("op") == "call_module":
            node.type = str(d.get("type"))

    def marker(ts: set[str]) -> str:
        if len(tasks) > 9:
            return f"[{len(ts)}/{len(tasks)}]"
        dot = "." if ascii else "·"
        return "[" + "".join(str(i + 1) if t in ts else dot for i, t in enumerate(tasks)) + "]"

    tee, last, bar, blank = (
        ("|-- ", "`-- ", "|   ", "    ") if ascii else ("├── ", "└── ", "│   ", "    ")
    )
    rows: list[tuple[str, _TNode]] = []

    def walk(node: _TNode, prefix: str) -> None:
        kids = sorted(node.children.items(), key=lambda kv: kv[1].first)
        shown = kids[:max_children]
        for j, (name, child) in enumerate(shown):
            end = j == len(shown) - 1 and len(kids) <= max_children
            rows.append((prefix + (last if end else tee) + name, child))
            walk(child, prefix + (blank if end else bar))
        if len(kids) > max_children:
            rows.append((prefix + last + f"… {len(kids) - max_children} more", _TNode(0)))

    walk(root, "")
    name_w = min(56, max([len("model"), *(len(r[0]) for r in rows)]))
    legend = "  ".join(f"{i + 1}={t}" for i, t in enumerate(tasks))
    out = [f"tasks: {legend}" if len(tasks) <= 9 else f"tasks ({len(tasks)}): {', '.join(tasks)}"]
    mw = len(marker(root.tasks))
    out.append(f"{'module':<{name_w}}  {'tasks':<{mw}}  {'params':>7}  {'FLOPs':>7}  what")
    out.append(
        f"{'model':<{name_w}}  {marker(root.tasks)}  {fmt_count(root.params):>7}  "
        f"{fmt_count(root.flops):>7}  {_layers_txt(root)}"
    )
    for text, node in rows:
        if len(text) > name_w:
            text = text[: name_w - 1] + ("~" if ascii else "…")
        if node.n_ops == 0:
            out.append(text)
            continue
        info = node.type if node.type and not node.children else _layers_txt(node)
        if len(node.tasks) >= 2:
            info += f" · shared by {len(node.tasks)}"
        out.append(
            f"{text:<{name_w}}  {marker(node.tasks)}  {fmt_count(node.params):>7}  "
            f"{fmt_count(node.flops):>7}  {info}"
        )
    return "\n".join(out) + "\n"
