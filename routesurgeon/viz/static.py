"""Static pictures and text views of a topology: matplotlib PNG/SVG, Graphviz DOT, a text tree.

* :func:`save_heatmap`: layer x task mean importance (or one layer's per-channel importance).
* :func:`save_topology`: the collapsed, layered sharing graph (same layout as the HTML report).
* :func:`to_dot` / :func:`save_dot`: the same graph as Graphviz DOT (rendered when ``dot`` is
  installed).
* :func:`text_tree`: the module hierarchy with task markers, for terminals and logs.

matplotlib is imported lazily with the Agg backend (no display needed); the figures are
created with :class:`matplotlib.figure.Figure` directly, so pyplot's global state is untouched.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from routesurgeon.errors import InputError
from routesurgeon.topology import Topology
from routesurgeon.viz._html import _floats, _tint, task_colours
from routesurgeon.viz.layout import (
    Block,
    Hierarchy,
    fmt_count,
    layered_layout,
)

__all__ = ["save_dot", "save_heatmap", "save_topology", "text_tree", "to_dot"]

_FORMATS = (".png", ".svg", ".pdf")


def _figure(width_in: float, height_in: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in))


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in _FORMATS:
        raise InputError(f"unsupported image format {path.suffix!r}; use one of {_FORMATS}")


def _topology(source: Any) -> Topology:
    """The topology of a Surgeon (``.topology``) or the Topology itself."""
    topo = getattr(source, "topology", source)
    if not isinstance(topo, Topology):
        raise InputError(f"expected a Surgeon or a Topology, got {type(source).__name__}")
    return topo


def _ordered_tasks(
    importance: Mapping[str, Mapping[str, Any]], tasks: Sequence[str] | None
) -> list[str]:
    if tasks is not None:
        return list(tasks)
    seen: dict[str, None] = {}
    for per in importance.values():
        for t in per:
            seen.setdefault(str(t), None)
    return list(seen)


def save_heatmap(
    source: Any,
    path: str | Path,
    importance: Mapping[str, Mapping[str, Any]] | None = None,
    tasks: Sequence[str] | None = None,
    layer: str | None = None,
    normalize: bool = False,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Save an importance heat map as PNG, SVG or PDF (chosen by the suffix of ``path``).

    Args:
        source: a Surgeon (its importance is the default) or a Topology; orders the layers as
            in the graph and supplies the task order.
        path: output file.
        importance: ``{layer: {task: per-channel importance}}`` (default:
            ``surgeon.importance()``, the DR-MGF dominance of every shared filter).
        tasks: task order (default: the topology's, else order of appearance).
        layer: draw this layer's per-channel importance (tasks x channels) instead of the
            layer x task means.
        normalize: scale each task's column (row for ``layer``) to its own maximum.
        title: figure title.
        dpi: raster resolution.
    """
    out = Path(path)
    _check_suffix(out)
    topology = _topology(source)
    if importance is None:
        if not hasattr(source, "importance"):
            raise InputError("pass importance= when drawing from a Topology")
        importance = source.importance()
    if not importance:
        raise InputError("importance is empty: the model has no layer shared by two tasks")
    if tasks is None:
        tasks = list(topology.tasks)
    order = _ordered_tasks(importance, tasks)
    colours = task_colours(order)
    import numpy as np

    if layer is not None:
        if layer not in importance:
            raise InputError(f"layer {layer!r} has no importance; layers: {list(importance)[:8]}")
        per = {t: _floats(v) for t, v in importance[layer].items()}
        c = max((len(v) for v in per.values()), default=0)
        mat = np.full((len(order), c), np.nan)
        for i, t in enumerate(order):
            row = per.get(t, [])
            mat[i, : len(row)] = row
        if normalize:
            mat = mat / np.nanmax(np.where(np.isnan(mat), 0, mat), axis=1, keepdims=True).clip(
                min=1e-12
            )
        fig = _figure(min(16.0, 3.0 + 0.02 * c + 4.0), 1.3 + 0.42 * len(order))
        ax = fig.add_axes((0.12, 0.28 if len(order) < 3 else 0.2, 0.76, 0.62))
        im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(order)), order)
        for lab, t in zip(ax.get_yticklabels(), order):
            lab.set_color(colours[t])
        ax.set_xlabel("output channel")
        ax.set_title(title or f"{layer}: per-channel importance", fontsize=10)
    else:
        names = list(importance)
        pos = {la.name: i for i, la in enumerate(topology.layers())}
        names.sort(key=lambda n: pos.get(n, len(pos)))
        mat = np.full((len(names), len(order)), np.nan)
        for r, n in enumerate(names):
            for ci, t in enumerate(order):
                v = importance[n].get(t)
                if v is not None:
                    vals = _floats(v)
                    mat[r, ci] = sum(vals) / len(vals) if vals else np.nan
        if normalize:
            mx = np.nanmax(np.where(np.isnan(mat), 0, mat), axis=0, keepdims=True)
            mat = mat / mx.clip(min=1e-12)
        label_w = max((len(n) for n in names), default=4) * 0.065
        h = min(60.0, max(3.0, 0.17 * len(names) + 1.6))
        w = max(4.5, 1.4 + label_w + 0.85 * len(order))
        fig = _figure(w, h)
        left = (label_w + 0.25) / w
        ax = fig.add_axes((left, 0.9 / h, 1 - left - 1.1 / w, 1 - 1.6 / h))
        im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest")
        fs = 7 if len(names) > 60 else 8
        ax.set_yticks(range(len(names)), names, fontsize=fs)
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
        for lab, t in zip(ax.get_xticklabels(), order):
            lab.set_color(colours[t])
        ax.set_title(title or "mean filter importance per layer and task", fontsize=10)
    cax = fig.add_axes(
        (ax.get_position().x1 + 0.01, ax.get_position().y0, 0.015, ax.get_position().height)
    )
    cb = fig.colorbar(im, cax=cax)
    from matplotlib.ticker import ScalarFormatter

    fmt = ScalarFormatter(useOffset=False)  # no "1e-5+3.333e-1" offset over the title
    cb.ax.yaxis.set_major_formatter(fmt)
    cb.ax.tick_params(labelsize=7)
    cb.set_label("importance" + (" (normalised)" if normalize else ""), fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def _resolve_depth(hier: Hierarchy, depth: int | None) -> int:
    return hier.auto_depth() if depth is None else max(1, int(depth))


def save_topology(
    source: Any,
    path: str | Path,
    depth: int | None = None,
    max_width: float = 1600.0,
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """Draw the collapsed, layered sharing graph with matplotlib (PNG, SVG or PDF).

    ``depth`` is the module-path depth of the blocks (default: chosen so that there are about
    20-60 blocks). The layout is the one of the HTML report: topological generations as
    columns, wrapped into rows of at most ``max_width`` pixels.
    """
    out = Path(path)
    _check_suffix(out)
    topology = _topology(source)
    from matplotlib.patches import Circle, FancyBboxPatch, PathPatch, Rectangle
    from matplotlib.path import Path as MPath

    hier = Hierarchy(topology)
    bg = hier.view(_resolve_depth(hier, depth))
    lay = layered_layout(bg, max_width=max_width)
    colours = task_colours(topology.tasks)
    head = 64.0
    W, H = lay.width, lay.height + head
    fig = _figure(W / 100, H / 100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.axis("off")
    pt = 72 / 100  # px -> points at 100 px per inch
    ax.text(
        16,
        22,
        title or f"sharing topology · depth {bg.depth} · {len(bg.module_blocks())} blocks",
        fontsize=14 * pt,
        fontweight="bold",
        va="center",
        color="#0f172a",
    )
    x = 16.0
    for t in topology.tasks:
        ax.add_patch(
            Rectangle(
                (x, 38), 22, 14, facecolor=_tint(colours[t], 0.82), edgecolor=colours[t], lw=1.2
            )
        )
        ax.text(x + 28, 45, f"{t} only", fontsize=11 * pt, va="center", color="#334155")
        x += 36 + 7 * len(t) + 40
    ax.add_patch(Rectangle((x, 38), 22, 14, facecolor="#eef2f6", edgecolor="#64748b", lw=1))
    ax.text(
        x + 28,
        45,
        "shared (badge = number of tasks)",
        fontsize=11 * pt,
        va="center",
        color="#334155",
    )
    codes = {"M": MPath.MOVETO, "L": MPath.LINETO}
    for eg in lay.edges:
        verts: list[tuple[float, float]] = []
        cs: list[Any] = []
        for c in eg.cmds:
            if c[0] == "C":
                verts += [(c[1], c[2] + head), (c[3], c[4] + head), (c[5], c[6] + head)]
                cs += [MPath.CURVE4] * 3
            else:
                verts.append((c[1], c[2] + head))
                cs.append(codes[c[0]])
        a, z = bg.blocks[eg.src], bg.blocks[eg.dst]
        common = [t for t in a.tasks if t in z.tasks]
        col = colours[common[0]] if len(common) == 1 else "#94a3b8"
        ax.add_patch(
            PathPatch(
                MPath(verts, cs),
                facecolor="none",
                edgecolor=col,
                lw=0.8 + 1.6 * min(1.0, (eg.channels or 1).bit_length() / 12),
                alpha=0.8,
            )
        )
    for bid, b in bg.blocks.items():
        bx = lay.boxes[bid]
        _draw_block(
            ax, b, bx.x, bx.y + head, bx.w, bx.h, colours, pt, FancyBboxPatch, Circle, Rectangle
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, facecolor="white")
    return out


def _draw_block(
    ax: Any,
    b: Block,
    x: float,
    y: float,
    w: float,
    h: float,
    colours: Mapping[str, str],
    pt: float,
    FancyBboxPatch: Any,
    Circle: Any,
    Rectangle: Any,
) -> None:
    k = len(b.tasks)
    if b.is_io:
        col = colours[b.tasks[0]] if k == 1 and b.kind != "input" else "#475569"
        fill = _tint(col, 0.86) if b.kind == "output" else "white"
        ax.add_patch(
            FancyBboxPatch(
                (x, y),
                w,
                h,
                boxstyle=f"round,pad=0,rounding_size={h / 2}",
                facecolor=fill,
                edgecolor=col,
                lw=1.2,
                ls="--" if b.is_port else "-",
            )
        )
        lab = ("→ " + b.label) if b.kind == "output" else b.label
        ax.text(
            x + w / 2,
            y + h / 2,
            lab[:22],
            fontsize=11 * pt,
            ha="center",
            va="center",
            color="#334155",
        )
        return
    if k == 1:
        col = colours[b.tasks[0]]
        fill, edge = _tint(col, 0.82), col
    elif k == 0:
        fill, edge = "#f8fafc", "#cbd5e1"
    else:
        fill, edge = "#eef2f6", "#64748b"
    ax.add_patch(
        FancyBboxPatch(
            (x, y),
            w,
            h,
            boxstyle="round,pad=0,rounding_size=6",
            facecolor=fill,
            edgecolor=edge,
            lw=1.3,
            ls="--" if k == 0 else "-",
        )
    )
    if k >= 2:
        seg = (w - 12) / k
        for i, t in enumerate(b.tasks):
            ax.add_patch(Rectangle((x + 6 + i * seg, y), seg, 5, facecolor=colours[t], lw=0))
        ax.add_patch(
            Circle((x + w - 2, y + 2), 9, facecolor="#334155", edgecolor="white", lw=1.2, zorder=3)
        )
        ax.text(
            x + w - 2,
            y + 2.5,
            str(k),
            fontsize=10 * pt,
            ha="center",
            va="center",
            color="white",
            fontweight="bold",
            zorder=4,
        )
    label = b.label if len(b.label) <= 20 else "…" + b.label[-19:]
    ax.text(
        x + 8, y + 18, label, fontsize=11.5 * pt, fontweight="bold", va="center", color="#0f172a"
    )
    sub = b.subtitle + (f" · {b.out_channels} ch" if b.out_channels else "")
    ax.text(x + 8, y + 32, sub.strip(" ·")[:26], fontsize=10 * pt, va="center", color="#475569")


def _dot_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(source: Any, depth: int | None = None, rankdir: str = "LR") -> str:
    """The collapsed sharing graph as Graphviz DOT.

    Blocks reached by one task are filled with that task's tint; shared blocks are striped
    with the colours of the tasks they serve. Blocks with a common parent module are drawn
    in a dashed cluster. ``source`` is a Surgeon or a Topology.
    """
    topology = _topology(source)
    hier = Hierarchy(topology)
    bg = hier.view(_resolve_depth(hier, depth))
    colours = task_colours(topology.tasks)
    lines = [
        "digraph routesurgeon {",
        f"  graph [rankdir={rankdir}, fontname=Helvetica, fontsize=11, nodesep=0.22, "
        "ranksep=0.32, bgcolor=white, label="
        + _dot_str(f"sharing topology · depth {bg.depth} · tasks: {', '.join(topology.tasks)}")
        + ", labelloc=t];",
        '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=10, '
        'penwidth=1.2, margin="0.12,0.05"];',
        '  edge [color="#94a3b8", arrowsize=0.6];',
    ]
    node_lines: dict[str, str] = {}
    for bid, b in bg.blocks.items():
        node_lines[bid] = "  " + _dot_str(bid) + " [" + ", ".join(_dot_attrs(b, colours)) + "];"
    clusters: dict[str, list[str]] = {}
    for bid, b in bg.blocks.items():
        if b.kind == "module" and "." in b.name:
            clusters.setdefault(b.name.rsplit(".", 1)[0], []).append(bid)
    placed: set[str] = set()
    for ci, (parent, members) in enumerate(clusters.items()):
        if len(members) < 2:
            continue
        lines.append(f"  subgraph cluster_{ci} {{")
        lines.append(
            f'    label={_dot_str(parent)}; style="rounded,dashed"; '
            'color="#cbd5e1"; fontcolor="#64748b"; fontsize=9;'
        )
        for bid in members:
            lines.append("  " + node_lines[bid])
            placed.add(bid)
        lines.append("  }")
    lines += [node_lines[bid] for bid in bg.blocks if bid not in placed]
    for (u, v), ch in bg.edges.items():
        a, z = bg.blocks[u], bg.blocks[v]
        common = [t for t in a.tasks if t in z.tasks]
        attrs = [f"penwidth={0.8 + 1.6 * min(1.0, (ch or 1).bit_length() / 12):.2f}"]
        if len(common) == 1:
            attrs.append(f"color={_dot_str(colours[common[0]])}")
        if ch:
            attrs.append(f"tooltip={_dot_str(f'{ch} channels')}")
        lines.append(f"  {_dot_str(u)} -> {_dot_str(v)} [{', '.join(attrs)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_attrs(b: Block, colours: Mapping[str, str]) -> list[str]:
    k = len(b.tasks)
    tip = (
        f"{b.name}\ntasks: {', '.join(b.tasks) or 'none'}\nparams {fmt_count(b.params)}"
        f" · FLOPs {fmt_count(b.flops)}"
    )
    if b.kind in ("input", "output"):
        col = colours[b.tasks[0]] if b.kind == "output" and k == 1 else "#475569"
        label = ("→ " + b.label) if b.kind == "output" else b.label
        fill = _tint(col, 0.86) if b.kind == "output" else "#f8fafc"
        return [
            f"label={_dot_str(label)}",
            "shape=oval",
            'style="filled"',
            f"fillcolor={_dot_str(fill)}",
            f"color={_dot_str(col)}",
            f"tooltip={_dot_str(tip)}",
        ]
    sub = b.subtitle + (f" · {b.out_channels} ch" if b.out_channels else "")
    label = b.label + ("\n" + sub.strip(" ·") if sub.strip(" ·") else "")
    if k >= 2:
        label += f"\nshared ×{k}"
    attrs = [f"label={_dot_str(label)}", f"tooltip={_dot_str(tip)}"]
    if k == 1:
        col = colours[b.tasks[0]]
        attrs += [f"fillcolor={_dot_str(_tint(col, 0.82))}", f"color={_dot_str(col)}"]
    elif k == 0:
        attrs += ['style="rounded,dashed"', 'color="#cbd5e1"']
    else:
        stripes = ":".join(_tint(colours[t], 0.55) for t in b.tasks)
        attrs += ['style="striped"', f"fillcolor={_dot_str(stripes)}", 'color="#475569"']
    return attrs


def save_dot(
    source: Any,
    path: str | Path,
    depth: int | None = None,
    formats: Sequence[str] = ("svg",),
    timeout: float = 120.0,
) -> list[Path]:
    """Write the DOT graph and, when Graphviz ``dot`` is installed, render it.

    If ``path`` ends in ``.svg``, ``.png`` or ``.pdf`` the DOT text goes next to it (``.dot``)
    and that format is rendered; otherwise ``path`` receives the DOT text and each of
    ``formats`` is rendered beside it. Returns the files written (the DOT file first).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() in _FORMATS:
        dot_path, targets = p.with_suffix(".dot"), [p]
    else:
        dot_path = p
        targets = [p.with_suffix("." + f.lstrip(".")) for f in formats]
    dot_path.write_text(to_dot(source, depth), encoding="utf-8")
    written = [dot_path]
    exe = shutil.which("dot")
    if exe is None:
        return written
    for tgt in targets:
        fmt = tgt.suffix.lstrip(".").lower()
        try:
            subprocess.run(
                [exe, f"-T{fmt}", str(dot_path), "-o", str(tgt)],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
            written.append(tgt)
        except (subprocess.SubprocessError, OSError) as err:
            warnings.warn(f"graphviz could not render {tgt.name}: {err}", stacklevel=2)
    return written


# -- text tree ----------------------------------------------------------------------------------
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
