"""Small HTML/SVG helpers of the report: task colours, viridis, escaping, numbers."""

from __future__ import annotations

import base64
import colorsys
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

TASK_COLOURS = [
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#8C564B",
    "#B8A000",
    "#17BECF",
    "#7F7F7F",
]

#: viridis anchors (matplotlib), used server-side and in the page's script.
_VIRIDIS = [
    "#440154",
    "#482475",
    "#414487",
    "#355f8d",
    "#2a788e",
    "#21918c",
    "#22a884",
    "#44bf70",
    "#7ad151",
    "#bddf26",
    "#fde725",
]


def task_colours(tasks: Sequence[str]) -> dict[str, str]:
    """One colour per task (stable: by position)."""
    out: dict[str, str] = {}
    for i, t in enumerate(tasks):
        if i < len(TASK_COLOURS):
            out[t] = TASK_COLOURS[i]
        else:
            h = (i * 0.618033988749895) % 1.0
            out[t] = _hsl_hex(h, 0.55, 0.45)
    return out


def _hsl_hex(h: float, s: float, lum: float) -> str:

    r, g, b = colorsys.hls_to_rgb(h, lum, s)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def _rgb(c: str) -> tuple[int, int, int]:
    c = c.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def _tint(c: str, amount: float = 0.8) -> str:
    r, g, b = _rgb(c)
    mix = [round(v + (255 - v) * amount) for v in (r, g, b)]
    return "#{:02x}{:02x}{:02x}".format(*mix)


def _viridis(v: float) -> str:
    v = min(1.0, max(0.0, v if math.isfinite(v) else 0.0))
    pos = v * (len(_VIRIDIS) - 1)
    i = min(int(pos), len(_VIRIDIS) - 2)
    f = pos - i
    a, b = _rgb(_VIRIDIS[i]), _rgb(_VIRIDIS[i + 1])
    return "#{:02x}{:02x}{:02x}".format(*(round(x + (y - x) * f) for x, y in zip(a, b)))


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _pct(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def _shorten(label: str, n: int) -> str:
    """Keep the end of a dotted name (the most specific part) within ``n`` characters."""
    return label if len(label) <= n else "…" + label[-(n - 1) :]


def _text(
    txt: str, x: float, y: float, cls: str, avail: float, char_w: float, anchor: str = "start"
) -> str:
    """An SVG text that fits ``avail`` px: long names are squeezed a little, then cut."""
    if len(txt) * char_w > avail * 1.25:
        txt = _shorten(txt, max(4, int(avail * 1.25 / char_w)))
    fit = ""
    if len(txt) * char_w > avail:
        fit = f' textLength="{avail:.0f}" lengthAdjust="spacingAndGlyphs"'
    anc = f' text-anchor="{anchor}"' if anchor != "start" else ""
    return f'<text class="{cls}" x="{x:.1f}" y="{y:.1f}"{anc}{fit}>{_e(txt)}</text>'


def _floats(v: Any) -> list[float]:
    if hasattr(v, "detach"):
        v = v.detach().cpu()
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, (int, float)):
        return [float(v)]
    out: list[float] = []
    for x in v:
        try:
            f = float(x)
        except (TypeError, ValueError):
            f = 0.0
        out.append(f if math.isfinite(f) else 0.0)
    return out


def _bar(frac: float | None, colour: str) -> str:
    if frac is None:
        return ""
    f = min(1.0, max(0.0, frac))
    return (
        f'<span class="mbar"><span style="width:{100 * f:.1f}%;background:{colour}"></span></span>'
    )


def _range(values: Iterable[float]) -> tuple[float, float]:
    """(min, max) of ``values``; (0, 1) when empty."""
    vals = list(values)
    return (min(vals), max(vals)) if vals else (0.0, 1.0)


def _unit(v: float, rng: tuple[float, float]) -> float:
    """``v`` mapped from ``rng`` to [0, 1] (0.5 when the range is a single value)."""
    lo, hi = rng
    return 0.5 if hi <= lo else min(1.0, max(0.0, (v - lo) / (hi - lo)))


def _b64_u8(values: Sequence[float], rng: tuple[float, float]) -> str:
    raw = bytes(round(255 * _unit(v, rng)) for v in values)
    return base64.b64encode(raw).decode("ascii")


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _epoch(h: Mapping[str, Any], i: int) -> float:
    e = _num(h.get("epoch"))
    return float(i) if e is None else e
