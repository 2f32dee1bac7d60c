"""The task summary and the per-task route tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from routesurgeon.viz._context import _Ctx
from routesurgeon.viz._html import (
    _bar,
    _e,
    _pct,
    _tint,
)
from routesurgeon.viz.layout import (
    fmt_count,
)


def _summary_section(ctx: _Ctx) -> str:
    summ = ctx.topology.summary()
    rows = [
        "<tr><th>task</th><th class=num>layers</th><th class=num>shared</th>"
        "<th class=num>exclusive</th><th>params reached</th><th>FLOPs reached</th>"
        "<th>shared filters</th></tr>"
    ]
    for t in ctx.tasks:
        s = summ.get(t, {})
        c = ctx.colour[t]
        rows.append(
            f'<tr><td><span class="dot" style="background:{c}"></span><b>{_e(t)}</b></td>'
            f"<td class=num>{int(s.get('layers', 0))}</td>"
            f"<td class=num>{int(s.get('shared_layers', 0))}</td>"
            f"<td class=num>{int(s.get('exclusive_layers', 0))}</td>"
            f"<td>{_bar(s.get('param_share'), c)} {fmt_count(s.get('params'))} "
            f"<span class=muted>({_pct(s.get('param_share'), 1)})</span></td>"
            f"<td>{_bar(s.get('flop_share'), c)} {fmt_count(s.get('flops'))} "
            f"<span class=muted>({_pct(s.get('flop_share'), 1)})</span></td>"
            f"<td>{_bar(s.get('shared_filter_fraction'), '#475569')} "
            f"{_pct(s.get('shared_filter_fraction'), 1)}</td></tr>"
        )
    overlap = ""
    if len(ctx.tasks) >= 2:
        reach = {t: {la.name for la in ctx.layers if t in la.tasks} for t in ctx.tasks}
        pp = {la.name: la.params for la in ctx.layers}
        head = (
            "<tr><th></th>"
            + "".join(
                f'<th class=num><span class="dot" style="background:{ctx.colour[t]}"></span>'
                f"{_e(t)}</th>"
                for t in ctx.tasks
            )
            + "</tr>"
        )
        body = []
        for a in ctx.tasks:
            cells = []
            for b in ctx.tasks:
                both = sum(pp[n] for n in reach[a] & reach[b])
                either = sum(pp[n] for n in reach[a] | reach[b])
                j = both / either if either else 0.0
                bg = _tint("#334155", 1 - 0.75 * j)
                fg = "#fff" if j > 0.6 else "#0f172a"
                cells.append(
                    f'<td class=num style="background:{bg};color:{fg}" '
                    f'data-tip="{_e(f"{a} & {b}: {fmt_count(both)} shared params")}">'
                    f"{_pct(j)}</td>"
                )
            body.append(
                f'<tr><th><span class="dot" style="background:{ctx.colour[a]}"></span>'
                f"{_e(a)}</th>{''.join(cells)}</tr>"
            )
        overlap = (
            f'<div><h3>Parameter overlap</h3><p class="muted small">params both tasks '
            f'reach / params either reaches</p><table class="tbl ovl">{head}'
            f"{''.join(body)}</table></div>"
        )
    return f"""
<section id="summary" class="card">
 <h2>Tasks</h2>
 <div class="row"><div class="grow"><table class="tbl">{"".join(rows)}</table></div>
 {overlap}</div>
</section>"""


def _routes_section(ctx: _Ctx, quality: Sequence[Mapping[str, Any]] | None = None) -> str:
    rows = [
        "<tr><th>route</th><th>params (route / full)</th><th>FLOPs (route / full)</th>"
        "<th>latency ms (route / full)</th><th class=num>speed-up</th>"
        "<th>channels kept</th><th class=num>pruned layers</th></tr>"
    ]
    for t, r in (ctx.routes or {}).items():
        c = ctx.colour.get(t, "#64748b")

        def pair(key: str, r: Mapping[str, Any] = r, c: str = c) -> str:
            v, full = r.get(key), r.get(f"full_{key}")
            frac = (float(v) / float(full)) if v is not None and full else None
            return (
                f"{_bar(frac, c)} {fmt_count(v)} / {fmt_count(full)} "
                f"<span class=muted>({_pct(frac)})</span>"
            )

        lat, flat = r.get("latency_ms"), r.get("full_latency_ms")
        lat_txt = (
            f"{_bar(lat / flat if lat is not None and flat else None, c)} "
            f"{'—' if lat is None else f'{lat:.2f}'} / "
            f"{'—' if flat is None else f'{flat:.2f}'}"
        )
        speed = f"{flat / lat:.2f}×" if lat and flat else "—"
        chans = r.get("channels") or {}
        kept = r.get("kept") or {}
        tot = sum(int(v) for v in chans.values())
        kk = sum(int(kept.get(k, 0)) for k in chans)
        pruned = sum(1 for k, v in chans.items() if int(kept.get(k, 0)) < int(v))
        rows.append(
            f'<tr><td><span class="dot" style="background:{c}"></span><b>{_e(t)}</b></td>'
            f"<td>{pair('params')}</td><td>{pair('flops')}</td><td>{lat_txt}</td>"
            f"<td class=num>{speed}</td>"
            f"<td>{_bar(kk / tot if tot else None, c)} {kk}/{tot}</td>"
            f"<td class=num>{pruned}/{len(chans)}</td></tr>"
        )
    return f"""
<section id="routes" class="card">
 <h2>Per-task routes</h2>
 <p class="muted">Each task's exported route against the full model. Pick a task under
 <i>focus task</i> in the graph to see the kept channel fraction of every block.</p>
 {f'<table class="tbl">{"".join(rows)}</table>' if ctx.routes else ""}{_quality_html(quality)}
</section>"""


def _quality_html(quality: Sequence[Mapping[str, Any]] | None) -> str:
    """The route-quality curves of ``benchmarks/route_quality.py`` records (none: empty)."""
    if not quality:
        return ""
    from routesurgeon.viz.quality import quality_svg

    stages = [st for st in ("recalibrated", "finetuned") if any(st in r for r in quality)]
    charts = "".join(quality_svg(quality, st) for st in stages)
    return ("<h3>Route quality</h3><p class=muted>Route metric over the full model's against "
            "kept FLOPs, per selection criterion (torch-pruning dashed), mean over tasks and "
            "seeds (benchmarks/route_quality.py).</p>" + charts)
