"""The gradient-conflict section: layer x task-pair heat map over training.

Input: conflict samples as ``Conflicts.as_record()`` dicts (``{step, epoch, layers, pairs,
cosine, norm_ratio}``), from a trainer's history (``record["conflicts"]``) or given directly.
Columns are the shared layers in graph order (as in the importance map above it), rows the
samples of each task pair over training (first at the top): red cells are layers where the two
tasks' gradients point apart, blue where they agree. A chart and a table give, per pair, the share
of conflicting layers at the first and last sample: whether the method made the tasks stop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from routesurgeon.errors import InputError
from routesurgeon.viz._charts import _line_chart, _Series
from routesurgeon.viz._context import _Ctx, _layer_order
from routesurgeon.viz._html import _e, _num, _shorten

_PAIR_COLOURS = ["#7c3aed", "#0891b2", "#ca8a04", "#db2777", "#16a34a", "#475569"]
MAX_ROWS = 24  # samples shown per pair (evenly spaced over training when there are more)
_NEG, _MID, _POS, _NAN = (215, 48, 39), (247, 247, 247), (33, 102, 172), "#d4d4d8"


def conflict_samples(history: Sequence[Mapping[str, Any]] | None,
                     conflicts: Any = None) -> list[dict[str, Any]]:
    """The samples to show: ``conflicts`` (records, ``Conflicts`` objects or one of them) when
    given, else every ``record["conflicts"]`` of the history, in order."""
    if conflicts is None:
        items: Iterable[Any] = [c for h in history or [] for c in (h.get("conflicts") or [])]
    elif isinstance(conflicts, (list, tuple)):
        items = conflicts
    else:
        items = [conflicts]
    out = []
    for c in items:
        rec = c.as_record() if hasattr(c, "as_record") else c
        if not isinstance(rec, Mapping) or not {"layers", "pairs", "cosine"} <= set(rec):
            raise InputError("conflict data must be Conflicts objects or their as_record() dicts "
                            "({layers, pairs, cosine, ...})")
        out.append(dict(rec))
    return out


def _colour(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return _NAN
    end = _POS if v >= 0 else _NEG
    f = min(1.0, abs(v))
    return "#{:02x}{:02x}{:02x}".format(*(round(m + (e - m) * f) for m, e in zip(_MID, end)))


def _label(rec: Mapping[str, Any], i: int) -> str:
    step, epoch = rec.get("step"), rec.get("epoch")
    if step is not None:
        return f"step {step}" + (f" (epoch {epoch})" if epoch is not None else "")
    return f"sample {i}"


def _pick(n: int) -> list[int]:
    if n <= MAX_ROWS:
        return list(range(n))
    return sorted({round(i * (n - 1) / (MAX_ROWS - 1)) for i in range(MAX_ROWS)})


def _cell_values(samples: Sequence[Mapping[str, Any]], key: str
                 ) -> list[dict[tuple[str, str], float | None]]:
    out = []
    for rec in samples:
        table: dict[tuple[str, str], float | None] = {}
        rows = rec.get(key) or []
        reach = rec.get("layer_tasks") or [None] * len(rec["layers"])
        for layer, row, tasks in zip(rec["layers"], rows, reach):
            for pair, v in zip(rec["pairs"], row):
                a, _, b = str(pair).partition("|")
                if tasks is None or (a in tasks and b in tasks):  # the pair shares the layer
                    table[(str(layer), str(pair))] = _num(v)
        out.append(table)
    return out


def _heat_svg(ctx: _Ctx, samples: Sequence[Mapping[str, Any]], layers: list[str],
              pairs: list[str]) -> str:
    cos = _cell_values(samples, "cosine")
    ratio = _cell_values(samples, "norm_ratio")
    picked = _pick(len(samples))
    left, top, avail = 150.0, 18.0, 1180.0
    cw = max(3.0, min(26.0, avail / max(1, len(layers))))
    rh = 12.0 if len(picked) > 6 else 16.0
    band = rh * len(picked) + 10
    labels = cw >= 11
    width = max(560.0, left + cw * len(layers) + 12)
    height = top + band * len(pairs) + (70 if labels else 30)
    p = [f'<svg id="conflict-heat" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" '
         f'height="{height:.0f}">']
    for b, pair in enumerate(pairs):
        y0 = top + b * band
        a, _, c = pair.partition("|")
        p.append(
            f'<rect x="6" y="{y0 + 2}" width="7" height="7" rx="2" '
            f'fill="{ctx.colour.get(a, "#64748b")}"/><rect x="15" y="{y0 + 2}" width="7" '
            f'height="7" rx="2" fill="{ctx.colour.get(c, "#64748b")}"/>'
            f'<text class="axl" x="26" y="{y0 + 9}">{_e(_shorten(f"{a} vs {c}", 18))}</text>')
        if len(picked) >= 3:  # the first and the last row's sample, under the pair's name
            p.append(f'<text class="axl muted" x="26" y="{y0 + 20}">'
                     f"{_e(_label(samples[picked[0]], picked[0]))}</text>"
                     f'<text class="axl muted" x="26" y="{y0 + rh * len(picked) - 2:.1f}">'
                     f"→ {_e(_label(samples[picked[-1]], picked[-1]))}</text>")
        for r, si in enumerate(picked):
            y = y0 + r * rh
            for i, layer in enumerate(layers):
                v = cos[si].get((layer, pair))
                if (layer, pair) not in cos[si]:
                    continue
                nr = ratio[si].get((layer, pair))
                tip = (f"{layer}\n{a} vs {c} at {_label(samples[si], si)}\n"
                       + ("cosine undefined (a task's gradient is zero here)" if v is None
                          else f"cosine {v:+.3f}") +
                       ("" if nr is None else f"\nnorm ratio ||g_{a}|| / ||g_{c}|| = {nr:.3g}"))
                p.append(f'<rect class="cc" x="{left + i * cw:.1f}" y="{y:.1f}" '
                         f'width="{cw - 0.6:.1f}" height="{rh - 1:.1f}" fill="{_colour(v)}" '
                         f'data-v="{"nan" if v is None else f"{v:.4f}"}" '
                         f'data-tip="{_e(tip)}"/>')
    if labels:
        y = top + band * len(pairs)
        for i, layer in enumerate(layers):
            x = left + i * cw + cw / 2
            p.append(f'<text class="axl" transform="translate({x:.1f},{y + 4:.1f}) rotate(35)">'
                     f"{_e(_shorten(layer.split('.')[-1] if len(layer) > 9 else layer, 9))}"
                     "</text>")
    p.append(f'<text class="axl muted" x="{left}" y="{height - 8:.0f}">{len(layers)} shared '
             f"layers in graph order (hover a cell: layer, pair, cosine, norm ratio)</text>")
    p.append("</svg>")
    return "".join(p)


def _trend(samples: Sequence[Mapping[str, Any]], pair: str) -> list[float | None]:
    out: list[float | None] = []
    for rec in samples:
        if pair not in rec["pairs"]:
            out.append(None)
            continue
        j = list(rec["pairs"]).index(pair)
        known = [v for v in (_num(row[j]) for row in rec.get("cosine") or []) if v is not None]
        out.append(sum(v < 0 for v in known) / len(known) if known else None)
    return out


def _conflict_section(ctx: _Ctx, samples: Sequence[Mapping[str, Any]]) -> str:
    if not samples:
        return ""
    layers = _layer_order(ctx, [str(n) for rec in samples for n in rec["layers"]])
    pairs = list(dict.fromkeys(str(p) for rec in samples for p in rec["pairs"]))
    xs = [float(rec["step"]) if rec.get("step") is not None else float(i)
          for i, rec in enumerate(samples)]
    series: list[_Series] = []
    rows: list[str] = []
    for pair in pairs:
        a, _, c = pair.partition("|")
        ys = _trend(samples, pair)
        colour = _PAIR_COLOURS[len(series) % len(_PAIR_COLOURS)]
        series.append(_Series(f"{a} vs {c}", colour, "", xs, ys))
        known = [(i, y) for i, y in enumerate(ys) if y is not None]
        if known:
            (i0, y0), (i1, y1) = known[0], known[-1]
            rows.append(f"<tr><td>{_e(a)} vs {_e(c)}</td><td>{_e(_label(samples[i0], i0))}"
                        f"</td><td>{100 * y0:.0f}%</td><td>{_e(_label(samples[i1], i1))}</td>"
                        f"<td>{100 * y1:.0f}%</td></tr>")
    legend = " · ".join(
        f'<svg width="24" height="8"><line x1="0" y1="4" x2="24" y2="4" stroke="{se.colour}" '
        f'stroke-width="2"/></svg> {_e(se.label)}' for se in series)
    chart = _line_chart(series, "share of shared layers in conflict (cosine < 0)", width=420,
                        height=220, xlabel="step")
    table = ("<table class='tbl' id='conflict-table'><tr><th>pair</th><th>first sample</th>"
             "<th>conflicting</th><th>last sample</th><th>conflicting</th></tr>"
             f"{''.join(rows)}</table>")
    return f"""
<section id="conflicts" class="card">
 <h2>Gradient conflicts</h2>
 <p class="muted">Cosine similarity of the two tasks' gradients on each shared layer's
 parameters, per task pair, at {len(samples)} samples over training (rows, first at the top):
 <span style="color:#d7301f">red</span>: the tasks pull the layer apart,
 <span style="color:#2166ac">blue</span>: they agree, grey: undefined (a zero gradient).
 Columns follow the graph order of the importance map.</p>
 <div class="scroll">{_heat_svg(ctx, samples, layers, pairs)}</div>
 <p class="muted small">{legend}</p>
 <div class="row">{chart}<div class="grow">{table}</div></div>
</section>"""
