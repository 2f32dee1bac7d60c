"""The importance section: layer x task heat map, per-channel data, evolution."""

from __future__ import annotations

from typing import Any

from routesurgeon.viz._charts import _line_chart, _Series
from routesurgeon.viz._context import _Ctx, _layer_order
from routesurgeon.viz._html import (
    _b64_u8,
    _e,
    _epoch,
    _num,
    _pct,
    _range,
    _shorten,
    _unit,
    _viridis,
)


def _importance_heat_svg(ctx: _Ctx, imp: dict[str, dict[str, list[float]]]) -> str:
    names = _layer_order(ctx, imp)
    tasks = [t for t in ctx.tasks if any(t in imp[n] for n in names)]
    tasks += sorted({t for n in names for t in imp[n]} - set(tasks))
    mean = {n: {t: (sum(v) / len(v) if v else 0.0) for t, v in imp[n].items()} for n in names}
    # colours span the observed range (importances such as dominance cluster near 1/T)
    grange = _range(v for m in mean.values() for v in m.values())
    trange = {t: _range(mean[n][t] for n in names if t in mean[n]) for t in tasks}
    n = len(names)
    left, top, avail = 96.0, 34.0, 1180.0
    cw = max(3.0, min(26.0, avail / max(1, n)))
    rh = 24.0
    width = left + cw * n + 12
    rows = len(tasks) + 1
    height = top + rh * rows + 30
    p = [
        f'<svg id="imp-heat" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" '
        f'height="{height:.0f}">'
    ]
    # groups: runs of layers in the same block of the default view
    groups: list[tuple[str, int, int]] = []
    for i, nm in enumerate(names):
        g = ctx.layer_group.get(nm, "(other)")
        if groups and groups[-1][0] == g:
            groups[-1] = (g, groups[-1][1], i + 1)
        else:
            groups.append((g, i, i + 1))
    for gi, (g, a, b) in enumerate(groups):
        x, wd = left + a * cw, (b - a) * cw
        if gi % 2 == 0:
            p.append(
                f'<rect x="{x:.1f}" y="{top - 18}" width="{wd:.1f}" '
                f'height="{rh * rows + 18}" fill="#f1f5f9"/>'
            )
        if wd >= 34:
            p.append(
                f'<text class="axl" x="{x + 3:.1f}" y="{top - 6}" data-tip="{_e(g)}">'
                f"{_e(_shorten(g, max(3, int(wd / 6.2))))}</text>"
            )
    for r, t in enumerate(tasks):
        y = top + r * rh
        col = ctx.colour.get(t, "#64748b")
        p.append(
            f'<rect x="6" y="{y + 7}" width="9" height="9" rx="2" fill="{col}"/>'
            f'<text class="axl" x="20" y="{y + 15}">{_e(_shorten(t, 12))}</text>'
        )
        for i, nm in enumerate(names):
            v = mean[nm].get(t)
            if v is None:
                continue
            x = left + i * cw
            tip = (
                f"{nm}\n{t}: mean importance {v:.4g} over {len(imp[nm][t])} channels\n"
                f"block {ctx.layer_group.get(nm, '—')}"
            )
            p.append(
                f'<rect class="hc" x="{x:.1f}" y="{y:.1f}" width="{cw - 0.6:.1f}" '
                f'height="{rh - 2}" fill="{_viridis(_unit(v, grange))}" '
                f'data-g="{_unit(v, grange):.4f}" data-n="{_unit(v, trange[t]):.4f}" '
                f'data-tip="{_e(tip)}"/>'
            )
    # dominant task per layer
    y = top + len(tasks) * rh + 4
    p.append(f'<text class="axl" x="20" y="{y + 12}">top task</text>')
    for i, nm in enumerate(names):
        m = mean[nm]
        if not m:
            continue
        best = max(m, key=m.__getitem__)
        tot = sum(m.values()) or 1.0
        share = m[best] / tot
        if len(m) > 1 and max(m.values()) - min(m.values()) <= 1e-4 * abs(max(m.values())):
            tip, fill = f"{nm}: no task dominates (equal within 0.01%)", "#cbd5e1"
        else:
            tip = f"{nm}: most important for {best} ({_pct(share, 1)} of the layer's importance)"
            fill = ctx.colour.get(best, "#64748b")
        p.append(
            f'<rect x="{left + i * cw:.1f}" y="{y:.1f}" width="{cw - 0.6:.1f}" '
            f'height="14" fill="{fill}" opacity="{0.35 + 0.65 * share:.2f}" '
            f'data-tip="{_e(tip)}"/>'
        )
    # x labels when there is room
    if cw >= 11:
        for i, nm in enumerate(names):
            x = left + i * cw + cw / 2
            p.append(
                f'<text class="axl" transform="translate({x:.1f},{y + 24}) rotate(35)">'
                f"{_e(_shorten(_short_layer(nm), 9))}</text>"
            )
    else:
        p.append(
            f'<text class="axl muted" x="{left}" y="{y + 28}">{n} layers in graph order '
            f"(hover a cell for its name)</text>"
        )
    p.append("</svg>")
    return "".join(p)


def _short_layer(name: str) -> str:
    """Last component of a layer name, with its parent's when it is just an index."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1].isdigit():
        return ".".join(parts[-2:])
    return parts[-1]


def _channel_data(ctx: _Ctx, imp: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Per layer: quantised (uint8, base64) task x channel importances and summary stats."""
    out: dict[str, Any] = {}
    for nm in _layer_order(ctx, imp):
        per = imp[nm]
        c = max((len(v) for v in per.values()), default=0)
        if c == 0:
            continue
        rng = _range(x for v in per.values() for x in v)
        flat: list[float] = []
        has: list[int] = []
        means: list[float | None] = []
        for t in ctx.tasks:
            v = per.get(t)
            has.append(1 if v is not None else 0)
            means.append(sum(v) / len(v) if v else None)
            v = list(v or [])
            flat.extend(v + [rng[0]] * (c - len(v)))
        out[nm] = {
            "n": c,
            "min": rng[0],
            "max": rng[1],
            "d": _b64_u8(flat, rng),
            "has": has,
            "mean": means,
        }
    return out


def _importance_section(ctx: _Ctx) -> str:
    imp = ctx.importance
    evo = _evolution(ctx)
    if not imp and not evo:
        return ""
    parts = ['<section id="importance" class="card"><h2>Filter importance</h2>']
    if imp:
        lo, hi = _range(sum(v) / len(v) for per in imp.values() for v in per.values() if v)
        parts.append(
            '<p class="muted">Mean importance (DR-MGF dominance: each task\'s share of a '
            "filter) of each layer's output channels per task; colours span the observed range. "
            '<label><input type="checkbox" id="heat-norm"> normalise per task</label>'
            f'<span class="nowrap"><span class="cbar-lab" id="cbar-lo">{lo:.5g}</span>'
            f'<span class="cbar" id="cbar"></span><span class="cbar-lab" id="cbar-hi">'
            f"{hi:.5g}</span></span></p>"
        )
        parts.append(f'<div class="scroll">{_importance_heat_svg(ctx, imp)}</div>')
    layer_names = _layer_order(
        ctx, list(imp or {}) + [n for h in (ctx.history or []) for n in (h.get("importance") or {})]
    )
    if layer_names:
        opts = []
        for nm in layer_names:
            c = max((len(v) for v in (imp or {}).get(nm, {}).values()), default=0)
            extra = f" ({c} ch)" if c else ""
            opts.append(f'<option value="{_e(nm)}">{_e(nm)}{extra}</option>')
        sort_opts = (
            '<option value="">channel index</option><option value="*">by mean</option>'
            + "".join(f'<option value="{i}">by {_e(t)}</option>' for i, t in enumerate(ctx.tasks))
        )
        parts.append(
            '<h3>Per layer</h3><div class="toolbar"><label>layer <select id="layer-sel">'
            f"{''.join(opts)}</select></label>"
            + (f'<label>order <select id="ch-sort">{sort_opts}</select></label>' if imp else "")
            + '<span id="ch-stats" class="muted small"></span></div>'
        )
        if imp:
            labs = "".join(
                f'<div><span class="dot" style="background:{ctx.colour[t]}"></span>'
                f"{_e(_shorten(t, 12))}</div>"
                for t in ctx.tasks
            )
            parts.append(
                f'<div class="chwrap"><div class="chlab">{labs}<div>top task</div>'
                '</div><canvas id="ch-canvas" height="10"></canvas></div>'
            )
        if evo:
            parts.append('<div id="layer-evo"></div>')
    if evo:
        parts.append(evo)
    parts.append("</section>")
    return "".join(parts)


def _evolution(ctx: _Ctx) -> str:
    hist = [h for h in (ctx.history or []) if h.get("importance")]
    if not hist:
        return ""
    epochs = [_epoch(h, i) for i, h in enumerate(hist)]
    # mean over layers per task per epoch
    series: list[_Series] = []
    for t in ctx.tasks:
        ys: list[float | None] = []
        for h in hist:
            vals = [float(v[t]) for v in h["importance"].values() if t in v]
            ys.append(sum(vals) / len(vals) if vals else None)
        if any(y is not None for y in ys):
            series.append(_Series(t, ctx.colour[t], "", epochs, ys))
    chart = _line_chart(series, "mean importance over layers", width=420, height=220)
    return (
        f'<h3>Evolution over epochs</h3><div class="row">{chart}'
        f'<div class="grow"><div id="evo-heats"></div></div></div>'
    )


def _evolution_data(ctx: _Ctx) -> dict[str, Any] | None:
    hist = [h for h in (ctx.history or []) if h.get("importance")]
    if not hist:
        return None
    layers = _layer_order(ctx, [n for h in hist for n in h["importance"]])
    epochs = [_epoch(h, i) for i, h in enumerate(hist)]
    per_task: dict[str, Any] = {}
    raw: dict[str, list[list[float | None]]] = {}
    every = [_num(v) for h in hist for per in h["importance"].values() for v in per.values()]
    rng = _range(v for v in every if v is not None)
    for t in ctx.tasks:
        vals = [[_num(h["importance"].get(n, {}).get(t)) for n in layers] for h in hist]
        flat = [v for row in vals for v in row if v is not None]
        if not flat:
            continue
        per_task[t] = {
            "min": rng[0],
            "max": rng[1],
            "d": _b64_u8([rng[0] if v is None else v for row in vals for v in row], rng),
        }
        raw[t] = vals
    by_layer = {
        n: {t: [raw[t][e][j] for e in range(len(hist))] for t in raw} for j, n in enumerate(layers)
    }
    return {"epochs": epochs, "layers": layers, "tasks": per_task, "by_layer": by_layer}
