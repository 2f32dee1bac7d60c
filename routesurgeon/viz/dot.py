"""The collapsed sharing graph as Graphviz DOT, rendered when ``dot`` is installed."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from routesurgeon.viz._html import _tint, task_colours
from routesurgeon.viz._image import _FORMATS
from routesurgeon.viz._source import _resolve_depth, _topology
from routesurgeon.viz.layout import Block, Hierarchy, fmt_count

__all__ = ["save_dot", "to_dot"]


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
