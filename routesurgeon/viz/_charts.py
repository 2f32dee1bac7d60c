"""Server-side SVG line charts (ticks, series, tooltips)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from routesurgeon.viz._html import (
    _e,
)


# -- line charts --------------------------------------------------------------------------------
@dataclass
class _Series:
    label: str
    colour: str
    dash: str
    xs: list[float]
    ys: list[float | None]


def _nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About ``n`` round tick values covering [lo, hi] (whole numbers if ``integer``)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    mults = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = next(m * mag for m in mults if m * mag >= raw)
    if integer:
        step = max(1, round(step))
    start = math.floor(lo / step) * step
    ticks: list[float] = []
    v = start
    while v <= hi + step * 0.5 and len(ticks) < 20:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _tick_txt(v: float, step: float | None = None) -> str:
    """A tick label; with ``step``, enough decimals to tell neighbouring ticks apart."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000 or (a < 0.01 and (step is None or step < 1e-4)):
        return f"{v:.1e}".replace("e+0", "e").replace("e-0", "e-")
    if step is not None and step > 0:
        decimals = max(0, math.ceil(-math.log10(step) - 1e-9))
        return f"{v:.{min(decimals, 8)}f}"
    return f"{v:.3g}"


def _line_chart(
    series: Sequence[_Series],
    title: str,
    width: int = 360,
    height: int = 210,
    xlabel: str = "epoch",
) -> str:
    pts = [(x, y) for s in series for x, y in zip(s.xs, s.ys) if y is not None]
    if not pts:
        return ""
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    xt = _nice_ticks(min(xs), max(xs), 6, integer=all(float(x).is_integer() for x in xs))
    yt = _nice_ticks(min(ys), max(ys), 5)
    ystep = yt[1] - yt[0] if len(yt) > 1 else None
    ylabels = [_tick_txt(t, ystep) for t in yt]
    left, right, top, bottom = max(40, 10 + 6 * max(len(t) for t in ylabels)), 10, 24, 30
    pw, ph = width - left - right, height - top - bottom
    x0, x1 = min(xt[0], min(xs)), max(xt[-1], max(xs))
    y0, y1 = min(yt[0], min(ys)), max(yt[-1], max(ys))
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    p = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}"><text class="ctitle" x="{left}" y="14">{_e(title)}</text>'
    ]
    for t, lab in zip(yt, ylabels):
        gy = sy(t)
        p.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{gy:.1f}" y2="{gy:.1f}" '
            f'class="grid"/><text class="axl" x="{left - 5}" y="{gy + 3.5:.1f}" '
            f'text-anchor="end">{lab}</text>'
        )
    for t in xt:
        gx = sx(t)
        p.append(
            f'<line x1="{gx:.1f}" x2="{gx:.1f}" y1="{top + ph}" y2="{top + ph + 4}" '
            f'stroke="#94a3b8"/><text class="axl" x="{gx:.1f}" y="{top + ph + 15}" '
            f'text-anchor="middle">{_tick_txt(t)}</text>'
        )
    p.append(
        f'<text class="axl muted" x="{left + pw}" y="{height - 3}" text-anchor="end">'
        f"{_e(xlabel)}</text>"
    )
    p.append(
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#cbd5e1"/>'
    )
    for s in series:
        segs: list[list[tuple[float, float]]] = [[]]
        for x, y in zip(s.xs, s.ys):
            if y is None:
                segs.append([])
            else:
                segs[-1].append((sx(x), sy(y)))
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        for seg in segs:
            if len(seg) >= 2:
                d = "M" + " L".join(f"{px:.1f},{py:.1f}" for px, py in seg)
                p.append(
                    f'<path d="{d}" fill="none" stroke="{s.colour}" stroke-width="2"'
                    f'{dash} stroke-linejoin="round"/>'
                )
        n = sum(1 for y in s.ys if y is not None)
        for x, y in zip(s.xs, s.ys):
            if y is None:
                continue
            r = 2.6 if n <= 40 else 0
            tip = f"{s.label}\n{xlabel} {_tick_txt(x)}: {y:.4g}"
            p.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{r or 4}" '
                f'fill="{s.colour if r else "transparent"}" data-tip="{_e(tip)}"/>'
            )
    p.append("</svg>")
    return "".join(p)
