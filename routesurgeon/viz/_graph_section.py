"""The sharing-graph section: inline SVG views per depth and the drill-down views."""

from __future__ import annotations

import math
from typing import Any

from routesurgeon.viz._context import _Ctx
from routesurgeon.viz._html import (
    _e,
    _pct,
    _text,
    _tint,
)
from routesurgeon.viz.layout import (
    Block,
    BlockGraph,
    Layout,
    fmt_count,
    layered_layout,
)

#: depth views with more blocks than this are left out (deeper than the default)
_MAX_GLOBAL_VIEW_BLOCKS = 260
#: at most this many drill-down views
_MAX_SUBVIEWS = 400


# -- the sharing graph ---------------------------------------------------------------------------
def _block_tip(ctx: _Ctx, b: Block) -> str:
    if b.kind == "output":
        return f"output of task {b.name.removeprefix('out:')}"
    if b.kind in ("port_in", "port_out"):
        where = "from" if b.kind == "port_in" else "to"
        more = "\nclick to open" if b.name in ctx.subview_ids else ""
        return f"{where} {b.name.removeprefix('out:')} (outside this block){more}"
    lines = [f"{b.name}  ({b.kind}, {len(b.members)} ops)"]
    k = len(b.tasks)
    if k == 0:
        lines.append("reaches no task output")
    elif k == 1:
        lines.append(f"task: {b.tasks[0]} (exclusive)")
    else:
        lines.append(f"tasks: {', '.join(b.tasks)} — shared by {k}")
    if len(b.task_mix) > 1:
        lines.append(
            "layers by task set: " + "; ".join(f"{m or 'none'}: {c}" for m, c in b.task_mix)
        )
    lines.append(
        f"params {fmt_count(b.params)} ({_pct(b.params / ctx.total_params, 1)})"
        f" · FLOPs {fmt_count(b.flops)} ({_pct(b.flops / ctx.total_flops, 1)})"
    )
    if b.out_channels:
        lines.append(f"out channels {b.out_channels}")
    if b.filters:
        lines.append(
            f"shared filters {_pct(b.shared_filters / b.filters)} ({b.shared_filters}/{b.filters})"
        )
    if b.types:
        tys = ", ".join(f"{t}×{c}" if c > 1 else t for t, c in b.types[:6])
        lines.append(tys + (", …" if len(b.types) > 6 else ""))
    if ctx.routes:
        parts = []
        for t in ctx.tasks:
            if t not in ctx.routes:
                continue
            kc = ctx.kept(t, b.layers)
            if t not in b.tasks:
                parts.append(f"{t} –")
            elif kc is not None:
                parts.append(f"{t} {_pct(kc[0] / kc[1])}")
        if parts:
            lines.append("route keeps: " + " · ".join(parts))
    if b.expandable:
        lines.append("click to open")
    return "\n".join(lines)


def _block_svg(ctx: _Ctx, b: Block, box: Any, max_flops: int, max_params: int) -> str:
    w, h = box.w, box.h
    k = len(b.tasks)
    cls = ["blk"] + [f"in-t{ctx.tidx(t)}" for t in b.tasks]
    clickable = b.expandable or (b.is_port and b.name in ctx.subview_ids)
    if clickable:
        cls.append("x")
    attrs = f'class="{" ".join(cls)}" transform="translate({box.x:.1f},{box.y:.1f})"'
    attrs += f' data-b="{_e(b.name)}" data-tip="{_e(_block_tip(ctx, b))}"'
    out = [f"<g {attrs}>"]
    if b.kind in ("output", "port_in", "port_out"):
        col = ctx.colour[b.tasks[0]] if k == 1 else "#64748b"
        fill = _tint(col, 0.86) if b.kind == "output" else "#ffffff"
        dash = ' stroke-dasharray="4 3"' if b.is_port else ""
        out.append(
            f'<rect class="bg" width="{w}" height="{h}" rx="{h / 2}" fill="{fill}" '
            f'stroke="{col}" stroke-width="1.5"{dash}/>'
        )
        lab = b.label if b.kind != "output" else f"⟶ {b.label}"
        out.append(_text(lab, w / 2, h / 2 + 4, "lab io", w - 20, 6.4, "middle") + "</g>")
        return "".join(out)
    if b.kind == "input":
        out.append(
            f'<rect class="bg" width="{w}" height="{h}" rx="{h / 2}" fill="#f8fafc" '
            f'stroke="#475569" stroke-width="1.5"/>'
        )
        ch = f" · {b.out_channels} ch" if b.out_channels else ""
        out.append(_text(b.label + ch, w / 2, h / 2 + 4, "lab io", w - 20, 6.4, "middle") + "</g>")
        return "".join(out)
    if k == 1:
        col = ctx.colour[b.tasks[0]]
        fill, stroke, sw = _tint(col, 0.82), col, 1.6
    elif k == 0:
        fill, stroke, sw = "#f8fafc", "#cbd5e1", 1.0
    else:
        fill, stroke, sw = "#eef2f6", "#64748b", 1.2
    dash = ' stroke-dasharray="3 3"' if k == 0 else ""
    out.append(
        f'<rect class="bg" width="{w}" height="{h}" rx="6" fill="{fill}" '
        f'stroke="{stroke}" stroke-width="{sw}"{dash}/>'
    )
    if k >= 2:  # one stripe segment per task along the top edge
        seg = (w - 12) / k
        for i, t in enumerate(b.tasks):
            out.append(
                f'<rect x="{6 + i * seg:.1f}" y="0" width="{seg:.1f}" height="5" '
                f'fill="{ctx.colour[t]}"/>'
            )
        out.append(
            f'<circle cx="{w - 2}" cy="2" r="9" fill="#334155" stroke="#fff" '
            f'stroke-width="1.5"/><text class="badge" x="{w - 2}" y="5.5" '
            f'text-anchor="middle">{k}</text>'
        )
    ty = 18 if k < 2 else 20
    out.append(_text(b.label, 8, ty, "lab", w - 16, 6.7))
    sub = b.subtitle
    if b.out_channels:
        full = f"{sub} · {b.out_channels} ch" if sub else f"{b.out_channels} ch"
        sub = full if len(full) * 5.8 <= (w - 16) * 1.1 or not sub else sub
    out.append(_text(sub, 8, ty + 13, "sub", w - 16, 5.8))
    bw = w - 16 - (12 if b.expandable else 0)
    fw = bw * (b.flops / max_flops) if max_flops else 0
    pw = bw * (b.params / max_params) if max_params else 0
    out.append(f'<rect class="fb" x="8" y="{h - 7}" width="{max(fw, 0):.1f}" height="3" rx="1.5"/>')
    out.append(f'<rect class="pb" x="8" y="{h - 7}" width="{max(pw, 0):.1f}" height="3" rx="1.5"/>')
    if b.expandable:
        out.append(f'<text class="plus" x="{w - 7}" y="{h - 5}" text-anchor="end">+</text>')
    if ctx.routes:
        for t in ctx.tasks:
            if t not in ctx.routes or t not in b.tasks:
                continue
            kc = ctx.kept(t, b.layers)
            if kc is None:
                continue
            f = kc[0] / kc[1]
            i = ctx.tidx(t)
            rw = w - 16 - 30
            out.append(
                f'<g class="rt rt{i}"><rect x="8" y="{h - 9}" width="{rw}" height="5" rx="2" '
                f'fill="#dbe1e8"/><rect x="8" y="{h - 9}" width="{rw * f:.1f}" height="5" '
                f'rx="2" fill="{ctx.colour[t]}"/><text class="rtx" x="{w - 7}" y="{h - 3.5}" '
                f'text-anchor="end">{100 * f:.0f}%</text></g>'
            )
    out.append("</g>")
    return "".join(out)


def _view_svg(ctx: _Ctx, bg: BlockGraph, lay: Layout, vid: str) -> str:
    blocks = bg.blocks
    mods = [b for b in blocks.values() if not b.is_io]
    max_flops = max((b.flops for b in mods), default=0)
    max_params = max((b.params for b in mods), default=0)
    parts = [
        f'<svg class="gsvg" viewBox="0 0 {lay.width:.0f} {lay.height:.0f}" '
        f'width="{lay.width:.0f}" height="{lay.height:.0f}" role="img" '
        f'aria-label="sharing graph">',
        f'<defs><marker id="ah-{vid}" viewBox="0 0 8 8" refX="7" refY="4" '
        f'markerUnits="userSpaceOnUse" markerWidth="7" markerHeight="7" orient="auto">'
        f'<path d="M0,0 L8,4 L0,8 z" fill="#94a3b8"/></marker></defs><g class="edges">',
    ]
    for eg in lay.edges:
        a, z = blocks[eg.src], blocks[eg.dst]
        common = [t for t in a.tasks if t in z.tasks]
        ecls = " ".join(f"in-t{ctx.tidx(t)}" for t in common)
        colour = ctx.colour[common[0]] if len(common) == 1 else "#94a3b8"
        width = 1.0 + 2.2 * min(1.0, math.log2(max(1, eg.channels)) / 11.0)
        tip = f"{a.label} → {z.label}" + (f"\n{eg.channels} channels" if eg.channels else "")
        parts.append(
            f'<path class="edge {ecls}" d="{eg.svg_path()}" stroke="{colour}" '
            f'stroke-width="{width:.1f}" marker-end="url(#ah-{vid})" '
            f'data-tip="{_e(tip)}"/>'
        )
    parts.append('</g><g class="nodes">')
    for bid, b in blocks.items():
        parts.append(_block_svg(ctx, b, lay.boxes[bid], max_flops, max_params))
    parts.append("</g></svg>")
    return "".join(parts)


def _layer_table(ctx: _Ctx, bg: BlockGraph, name: str) -> str:
    names: list[str] = []
    for b in bg.blocks.values():
        for lname in b.layers:
            if lname not in names:
                names.append(lname)
    if not names:
        return ""
    route_tasks = [t for t in ctx.tasks if ctx.routes and t in ctx.routes]
    head = (
        "<tr><th>layer</th><th>type</th><th class=num>out ch</th><th class=num>params</th>"
        "<th class=num>FLOPs</th><th>tasks</th><th class=num>shared filters</th>"
    )
    head += "".join(
        f'<th class=num><span class="dot" style="background:{ctx.colour[t]}"></span>'
        f"{_e(t)} kept</th>"
        for t in route_tasks
    )
    rows = [head + "</tr>"]
    strip = name + "."
    for ln in names[:400]:
        la = ctx.layer_by_name.get(ln)
        if la is None:
            continue
        chips = "".join(
            f'<span class="dot" title="{_e(t)}" style="background:{ctx.colour[t]}"></span>'
            for t in ctx.tasks
            if t in la.tasks
        )
        sf = (
            _pct(la.shared_filters / la.out_channels)
            if la.shared_filters is not None and la.out_channels
            else "—"
        )
        cells = [
            f"<td>{_e(ln.removeprefix(strip))}</td><td>{_e(la.type)}</td>"
            f"<td class=num>{la.out_channels or '—'}</td>"
            f"<td class=num>{fmt_count(la.params)}</td>"
            f"<td class=num>{fmt_count(la.flops)}</td><td>{chips}</td>"
            f"<td class=num>{sf}</td>"
        ]
        for t in route_tasks:
            kc = ctx.kept(t, [ln])
            cells.append(f"<td class=num>{'—' if kc is None else f'{kc[0]}/{kc[1]}'}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="tbl small">{"".join(rows)}</table>'


def _graph_section(ctx: _Ctx) -> str:
    hier = ctx.hier
    names = hier.expandable_names(_MAX_SUBVIEWS)
    ctx.subview_ids = {n: i for i, n in enumerate(names)}
    depths: list[tuple[int, int]] = []
    for d in range(1, hier.max_depth + 1):
        n = len(hier.view(d).blocks)
        if depths and n < 1.1 * depths[-1][1] and d != ctx.depth:
            continue  # (almost) nothing new at this depth
        if n > _MAX_GLOBAL_VIEW_BLOCKS and d > ctx.depth:
            break
        depths.append((d, n))
    if ctx.depth not in [d for d, _ in depths]:
        depths.append((ctx.depth, len(hier.view(ctx.depth).blocks)))
        depths.sort()
    templates: list[str] = []
    default_svg = ""
    for d, _ in depths:
        bg = hier.view(d)
        svg = _view_svg(ctx, bg, layered_layout(bg), f"g{d}")
        templates.append(f'<template id="gv-{d}">{svg}</template>')
        if d == ctx.depth:
            default_svg = svg
    for name, i in ctx.subview_ids.items():
        sub = hier.expand(name)
        if sub is None:
            continue
        svg = _view_svg(ctx, sub, layered_layout(sub), f"s{i}")
        templates.append(f'<template id="sv-{i}">{svg}{_layer_table(ctx, sub, name)}</template>')
    buttons = "".join(
        f'<button data-d="{d}" class="{"on" if d == ctx.depth else ""}" '
        f'data-tip="{n} blocks">{d}</button>'
        for d, n in depths
    )
    focus = ['<button data-t="" class="on">all</button>'] + [
        f'<button data-t="{i}"><span class="dot" style="background:{ctx.colour[t]}"></span>'
        f"{_e(t)}</button>"
        for i, t in enumerate(ctx.tasks)
    ]
    route_note = (
        "route: bar = kept channel fraction"
        if ctx.routes
        else "fades blocks the task does not reach"
    )
    legend = "".join(
        f'<span class="lg"><span class="sw" style="background:{_tint(ctx.colour[t], 0.82)};'
        f'border-color:{ctx.colour[t]}"></span>{_e(t)} only</span>'
        for t in ctx.tasks
    )
    stripes = "".join(f'<i style="background:{ctx.colour[t]}"></i>' for t in ctx.tasks[:4])
    legend += (
        f'<span class="lg"><span class="sw shared"><span class="st">{stripes}</span>'
        f"<b>k</b></span>shared by k tasks (stripes: which)</span>"
        '<span class="lg"><span class="sw dead"></span>reaches no output</span>'
        '<span class="lg muted">height ∝ log channels · bar: <select id="barsel">'
        "<option value=flops>FLOPs</option><option value=params>params</option>"
        "</select> (relative) · <b>+</b> click to open · edge width ∝ channels</span>"
    )
    n_blocks = len(hier.view(ctx.depth).module_blocks())
    return f"""
<section id="graph-sec" class="card">
 <h2>Sharing topology</h2>
 <p class="muted">{n_blocks} blocks at module depth {ctx.depth} (columns are topological
 generations of the block graph, wrapped into rows). Colour says which task outputs a block
 reaches.</p>
 <div id="graph" data-route="" data-bar="flops">
  <div class="toolbar">
   <span class="grp">depth <span id="depth-btns" class="seg">{buttons}</span></span>
   <span class="grp">focus task <span id="focus-btns" class="seg">{"".join(focus)}</span>
   <span class="muted small">{route_note}</span></span>
  </div>
  <div class="legend">{legend}</div>
  <div id="graph-canvas" class="scroll">{default_svg}</div>
  <div id="drill" hidden>
   <div class="drill-head"><span id="crumbs"></span><button id="drill-close" title="close">
   ×</button></div>
   <div id="drill-body" class="scroll"></div>
  </div>
 </div>
 {"".join(templates)}
</section>"""
