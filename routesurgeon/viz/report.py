"""One self-contained HTML report of a multi-output model: sharing graph, importance, routes.

:func:`write_report` renders everything server-side to inline SVG (the sharing graph at every
depth of the module tree, the drill-down inside every block, heat maps, line charts) and adds a
little inline vanilla JavaScript for switching views, tooltips and the per-channel canvases.
The file loads nothing from the network, so it opens offline and can be mailed around.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from routesurgeon.topology import Topology
from routesurgeon.viz._conflict_section import _conflict_section, conflict_samples
from routesurgeon.viz._context import _build_ctx, _Ctx
from routesurgeon.viz._graph_section import _graph_section
from routesurgeon.viz._html import (
    _VIRIDIS,
    TASK_COLOURS,
    _e,
    task_colours,
)
from routesurgeon.viz._importance_section import _channel_data, _evolution_data, _importance_section
from routesurgeon.viz._tables import _routes_section, _summary_section
from routesurgeon.viz._training_section import _training_section
from routesurgeon.viz.layout import (
    fmt_count,
)

__all__ = ["TASK_COLOURS", "render_report", "synthetic_data", "task_colours", "write_report"]


# -- page ---------------------------------------------------------------------------------------
def _asset(name: str) -> str:
    """Text of a file in ``routesurgeon/viz/assets`` (shipped as package data)."""
    return (resources.files("routesurgeon.viz") / "assets" / name).read_text(encoding="utf-8")


def _header(ctx: _Ctx, title: str) -> str:
    g = ctx.topology.graph
    shared = sum(1 for la in ctx.layers if la.shared)
    chips = "".join(
        f'<span class="chip"><span class="dot" style="background:{ctx.colour[t]}">'
        f"</span>{_e(t)}</span>"
        for t in ctx.tasks
    )
    meta = (
        f"{len(ctx.tasks)} tasks · {fmt_count(ctx.topology.total_params())} params · "
        f"{fmt_count(ctx.topology.total_flops())} FLOPs per sample · "
        f"{g.number_of_nodes()} traced ops · {len(ctx.layers)} layers, {shared} shared"
    )
    return (
        f"<header><h1>{_e(title)}</h1><div class=meta>{meta}</div>"
        f'<div class="chips">{chips}</div></header>'
    )


def _json_script(data: Any) -> str:
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    text = text.replace("</", "<\\/").replace("<!--", "<\\!--")
    return f'<script type="application/json" id="rs-data">{text}</script>'


def render_report(
    topology: Topology,
    importance: Mapping[str, Mapping[str, Any]] | None = None,
    history: Sequence[Mapping[str, Any]] | None = None,
    routes: Mapping[str, Mapping[str, Any]] | None = None,
    title: str | None = None,
    conflicts: Any = None,
    route_quality: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The report as an HTML string (see :func:`write_report`)."""
    ctx = _build_ctx(topology, importance, history, routes)
    title = title or "routesurgeon report"
    sections = [_summary_section(ctx), _graph_section(ctx)]
    nav = [("summary", "Tasks"), ("graph-sec", "Sharing graph")]
    if ctx.routes or route_quality:
        sections.append(_routes_section(ctx, route_quality))
        nav.append(("routes", "Routes"))
    imp_html = _importance_section(ctx)
    if imp_html:
        sections.append(imp_html)
        nav.append(("importance", "Importance"))
    conf_html = _conflict_section(ctx, conflict_samples(ctx.history, conflicts))
    if conf_html:
        sections.append(conf_html)
        nav.append(("conflicts", "Conflicts"))
    tr = _training_section(ctx)
    if tr:
        sections.append(tr)
        nav.append(("training", "Training"))
    data = {
        "tasks": list(ctx.tasks),
        "colours": ctx.colour,
        "viridis": _VIRIDIS,
        "subs": ctx.subview_ids,
        "ch": _channel_data(ctx, ctx.importance) if ctx.importance else {},
        "evo": _evolution_data(ctx),
    }
    route_css = "".join(
        f"#graph[data-route='{i}'] .rt{i}{{display:inline}}"
        f"#graph[data-route='{i}'] .blk:not(.in-t{i}),"
        f"#graph[data-route='{i}'] .edge:not(.in-t{i}){{opacity:.13}}"
        f"#graph[data-route='{i}'] .blk.in-t{i} .fb,"
        f"#graph[data-route='{i}'] .blk.in-t{i} .pb,"
        f"#graph[data-route='{i}'] .blk.in-t{i} .plus{{display:none}}"
        for i in range(len(ctx.tasks))
        if ctx.routes
    )
    route_css += "".join(
        f"#graph[data-route='{i}'] .blk:not(.in-t{i}),"
        f"#graph[data-route='{i}'] .edge:not(.in-t{i}){{opacity:.13}}"
        for i in range(len(ctx.tasks))
        if not ctx.routes
    )
    nav_html = "".join(f'<a href="#{a}">{_e(b)}</a>' for a, b in nav)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title>"
        "<script>window.__rsErr=[];window.addEventListener('error',function(e){"
        "window.__rsErr.push(String(e.message||e));});(function(){var ce=console.error;"
        "console.error=function(){window.__rsErr.push(Array.prototype.join.call(arguments,' '));"
        "return ce.apply(console,arguments);};})();</script>"
        f"<style>{_asset('report.css')}{route_css}</style></head><body>"
        f"{_header(ctx, title)}<nav>{nav_html}</nav><main>{''.join(sections)}</main>"
        f"<footer>routesurgeon report · self-contained, works offline</footer>"
        f'<div id="tip" hidden></div>{_json_script(data)}<script>{_asset("report.js")}</script>'
        "<script>window.addEventListener('load',function(){var h=document.documentElement;"
        "h.setAttribute('data-render-ms',performance.now().toFixed(1));"
        "h.setAttribute('data-errors',String(window.__rsErr.length));"
        "h.setAttribute('data-error-text',window.__rsErr.join(' | ').slice(0,500));});"
        "</script></body></html>\n"
    )


def write_report(
    path: str | Path,
    topology: Topology,
    importance: Mapping[str, Mapping[str, Any]] | None = None,
    history: Sequence[Mapping[str, Any]] | None = None,
    routes: Mapping[str, Mapping[str, Any]] | None = None,
    title: str | None = None,
    conflicts: Any = None,
    route_quality: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write one self-contained HTML report and return its path.

    Args:
        path: output file (parent folders are created).
        topology: the traced sharing topology (``instrument(model, x).topology``).
        importance: optional ``{layer: {task: per-channel importance}}``.
        history: optional per-epoch dicts (``epoch``, ``method``, ``losses``, ``metrics``,
            ``importance`` as ``{layer: {task: mean}}``, ``time``).
        routes: optional ``{task: {params, flops, latency_ms, full_params, full_flops,
            full_latency_ms, kept: {layer: n}, channels: {layer: n}}}``.
        title: page title (default "routesurgeon report").
        conflicts: optional gradient-conflict samples (``routesurgeon.conflicts.Conflicts``
            or their ``as_record()`` dicts); default: those in the history records
            (``record["conflicts"]``). Shown as a layer x task-pair heat map over training.
        route_quality: optional records of ``benchmarks/route_quality.py`` (its jsonl rows):
            the Routes section then shows route/full metric against kept FLOPs per criterion.

    The page needs no network: graphs and charts are inline SVG, the per-channel views are
    drawn by a small inline script onto canvases.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(topology, importance, history, routes, title, conflicts,
                                 route_quality), encoding="utf-8")
    return out


def synthetic_data(
    topology: Topology,
    epochs: int = 8,
    seed: int = 0,
    methods: Sequence[str] = ("dr-mgf",),
) -> tuple[dict[str, dict[str, list[float]]], list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Made-up ``importance``, ``history`` and ``routes`` shaped like real ones.

    For previewing a report (``write_report(path, topo, *synthetic_data(topo))``) and for
    tests; the numbers mean nothing. Deterministic for a given ``seed``.
    """
    import random

    rnd = random.Random(seed)
    tasks = list(topology.tasks)
    layers = [la for la in topology.layers() if la.kind in ("conv", "linear") and la.out_channels]
    importance: dict[str, dict[str, list[float]]] = {}
    for j, la in enumerate(layers):
        per: dict[str, list[float]] = {}
        for ti, t in enumerate(tasks):
            if t in la.tasks:
                base = 0.3 + 0.6 * math.sin(j / 6 + 1.3 * ti) ** 2
                per[t] = [base * rnd.random() ** (1 + ti % 3) for _ in range(la.out_channels or 0)]
        importance[la.name] = per
    history: list[dict[str, Any]] = []
    for e in range(epochs):
        for mi, m in enumerate(methods):
            ramp = 0.5 + 0.5 * math.tanh((e - epochs / 4) / max(1.0, epochs / 6))
            history.append(
                {
                    "epoch": e,
                    "method": m,
                    "time": round(8 + 2 * rnd.random(), 3),
                    "losses": {
                        t: 2.0 * math.exp(-e / (3 + i)) + 0.15 * mi + 0.05 * rnd.random()
                        for i, t in enumerate(tasks)
                    },
                    "metrics": {
                        t: {"score": 1 - 0.8 * math.exp(-e / (3 + i)) - 0.04 * mi}
                        for i, t in enumerate(tasks)
                    },
                    "importance": {
                        n: {t: ramp * sum(v) / max(1, len(v)) for t, v in per.items()}
                        for n, per in importance.items()
                    },
                }
            )
    routes: dict[str, dict[str, Any]] = {}
    for t in tasks:
        chans = {la.name: int(la.out_channels or 0) for la in layers if t in la.tasks}
        kept = {n: max(1, round(c * (0.25 + 0.6 * rnd.random()))) for n, c in chans.items()}
        frac = sum(kept.values()) / max(1, sum(chans.values()))
        full_p, full_f = topology.task_params(t), topology.task_flops(t)
        routes[t] = {
            "params": int(full_p * frac**2),
            "flops": int(full_f * frac**2),
            "latency_ms": round(10.0 * frac, 3),
            "full_params": full_p,
            "full_flops": full_f,
            "full_latency_ms": 10.0,
            "kept": kept,
            "channels": chans,
        }
    return importance, history, routes
