"""The collapsed, layered sharing graph drawn with matplotlib (the HTML report's layout)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from routesurgeon.viz._html import _tint, task_colours
from routesurgeon.viz._image import _check_suffix, _figure
from routesurgeon.viz._source import _resolve_depth, _topology
from routesurgeon.viz.layout import Block, Hierarchy, layered_layout

__all__ = ["save_topology"]


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
