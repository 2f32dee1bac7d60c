"""The training section: per-task loss and metric curves."""

from __future__ import annotations

from routesurgeon.viz._charts import _line_chart, _Series
from routesurgeon.viz._context import _Ctx
from routesurgeon.viz._html import (
    _e,
    _epoch,
    _num,
)


def _training_section(ctx: _Ctx) -> str:
    hist = ctx.history or []
    if not hist:
        return ""
    methods = list(dict.fromkeys(str(h.get("method") or "") for h in hist))
    dashes = ["", "6 4", "2 3", "8 3 2 3", "1 2"]
    tasks = list(ctx.tasks) + sorted(
        {str(t) for h in hist for t in (h.get("losses") or {})} - set(ctx.tasks)
    )
    colour = dict(ctx.colour)
    for t in tasks:
        colour.setdefault(t, "#64748b")
    cards = []
    for t in tasks:
        charts = []
        quantities: list[tuple[str, str | None]] = [("loss", None)]
        metric_names = list(
            dict.fromkeys(m for h in hist for m in ((h.get("metrics") or {}).get(t) or {}))
        )
        quantities += [(m, m) for m in metric_names]
        for qname, metric in quantities:
            series = []
            for mi, meth in enumerate(methods):
                rows = [(i, h) for i, h in enumerate(hist) if str(h.get("method") or "") == meth]
                xs = [_epoch(h, i) for i, h in rows]
                if metric is None:
                    ys = [_num((h.get("losses") or {}).get(t)) for _, h in rows]
                else:
                    ys = [
                        _num(((h.get("metrics") or {}).get(t) or {}).get(metric)) for _, h in rows
                    ]
                if any(y is not None for y in ys):
                    lab = f"{t} {qname}" + (f" ({meth})" if meth else "")
                    series.append(_Series(lab, colour[t], dashes[mi % len(dashes)], xs, ys))
            if series:
                charts.append(_line_chart(series, qname, width=300, height=190))
        if charts:
            cards.append(
                f'<div class="tcard"><h3><span class="dot" style="background:'
                f'{colour[t]}"></span>{_e(t)}</h3><div class="charts">'
                f"{''.join(charts)}</div></div>"
            )
    legend = ""
    if len(methods) > 1 or (methods and methods[0]):
        legend = (
            '<p class="muted small">'
            + " · ".join(
                f'<svg width="34" height="8"><line x1="0" y1="4" x2="34" y2="4" stroke="#334155" '
                f'stroke-width="2" stroke-dasharray="{dashes[i % len(dashes)]}"/></svg> {_e(m)}'
                for i, m in enumerate(methods)
            )
            + "</p>"
        )
    times = [_num(h.get("time")) for h in hist]
    tsum = sum(t for t in times if t is not None)
    time_txt = (
        f"{len(hist)} epochs logged, {tsum:.1f} s in total"
        if any(t is not None for t in times)
        else f"{len(hist)} epochs logged"
    )
    return f"""
<section id="training" class="card">
 <h2>Training</h2>
 <p class="muted">{time_txt}.</p>{legend}
 <div class="tgrid">{"".join(cards)}</div>
</section>"""
