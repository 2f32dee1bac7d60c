"""Importance heat maps with matplotlib: layer x task means, or one layer's channels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from routesurgeon.errors import InputError
from routesurgeon.viz._html import _floats, task_colours
from routesurgeon.viz._image import _check_suffix, _figure
from routesurgeon.viz._source import _topology

__all__ = ["save_heatmap"]


def _ordered_tasks(
    importance: Mapping[str, Mapping[str, Any]], tasks: Sequence[str] | None
) -> list[str]:
    if tasks is not None:
        return list(tasks)
    seen: dict[str, None] = {}
    for per in importance.values():
        for t in per:
            seen.setdefault(str(t), None)
    return list(seen)


def save_heatmap(
    source: Any,
    path: str | Path,
    importance: Mapping[str, Mapping[str, Any]] | None = None,
    tasks: Sequence[str] | None = None,
    layer: str | None = None,
    normalize: bool = False,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Save an importance heat map as PNG, SVG or PDF (chosen by the suffix of ``path``).

    Args:
        source: a Surgeon (its importance is the default) or a Topology; orders the layers as
            in the graph and supplies the task order.
        path: output file.
        importance: ``{layer: {task: per-channel importance}}`` (default:
            ``surgeon.importance()``, the DR-MGF dominance of every shared filter).
        tasks: task order (default: the topology's, else order of appearance).
        layer: draw this layer's per-channel importance (tasks x channels) instead of the
            layer x task means.
        normalize: scale each task's column (row for ``layer``) to its own maximum.
        title: figure title.
        dpi: raster resolution.
    """
    out = Path(path)
    _check_suffix(out)
    topology = _topology(source)
    if importance is None:
        if not hasattr(source, "importance"):
            raise InputError("pass importance= when drawing from a Topology")
        importance = source.importance()
    if not importance:
        raise InputError("importance is empty: the model has no layer shared by two tasks")
    if tasks is None:
        tasks = list(topology.tasks)
    order = _ordered_tasks(importance, tasks)
    colours = task_colours(order)
    import numpy as np

    if layer is not None:
        if layer not in importance:
            raise InputError(f"layer {layer!r} has no importance; layers: {list(importance)[:8]}")
        per = {t: _floats(v) for t, v in importance[layer].items()}
        c = max((len(v) for v in per.values()), default=0)
        mat = np.full((len(order), c), np.nan)
        for i, t in enumerate(order):
            row = per.get(t, [])
            mat[i, : len(row)] = row
        if normalize:
            mat = mat / np.nanmax(np.where(np.isnan(mat), 0, mat), axis=1, keepdims=True).clip(
                min=1e-12
            )
        fig = _figure(min(16.0, 3.0 + 0.02 * c + 4.0), 1.3 + 0.42 * len(order))
        ax = fig.add_axes((0.12, 0.28 if len(order) < 3 else 0.2, 0.76, 0.62))
        im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(order)), order)
        for lab, t in zip(ax.get_yticklabels(), order):
            lab.set_color(colours[t])
        ax.set_xlabel("output channel")
        ax.set_title(title or f"{layer}: per-channel importance", fontsize=10)
    else:
        names = list(importance)
        pos = {la.name: i for i, la in enumerate(topology.layers())}
        names.sort(key=lambda n: pos.get(n, len(pos)))
        mat = np.full((len(names), len(order)), np.nan)
        for r, n in enumerate(names):
            for ci, t in enumerate(order):
                v = importance[n].get(t)
                if v is not None:
                    vals = _floats(v)
                    mat[r, ci] = sum(vals) / len(vals) if vals else np.nan
        if normalize:
            mx = np.nanmax(np.where(np.isnan(mat), 0, mat), axis=0, keepdims=True)
            mat = mat / mx.clip(min=1e-12)
        label_w = max((len(n) for n in names), default=4) * 0.065
        h = min(60.0, max(3.0, 0.17 * len(names) + 1.6))
        w = max(4.5, 1.4 + label_w + 0.85 * len(order))
        fig = _figure(w, h)
        left = (label_w + 0.25) / w
        ax = fig.add_axes((left, 0.9 / h, 1 - left - 1.1 / w, 1 - 1.6 / h))
        im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest")
        fs = 7 if len(names) > 60 else 8
        ax.set_yticks(range(len(names)), names, fontsize=fs)
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
        for lab, t in zip(ax.get_xticklabels(), order):
            lab.set_color(colours[t])
        ax.set_title(title or "mean filter importance per layer and task", fontsize=10)
    cax = fig.add_axes(
        (ax.get_position().x1 + 0.01, ax.get_position().y0, 0.015, ax.get_position().height)
    )
    cb = fig.colorbar(im, cax=cax)
    from matplotlib.ticker import ScalarFormatter

    fmt = ScalarFormatter(useOffset=False)  # no "1e-5+3.333e-1" offset over the title
    cb.ax.yaxis.set_major_formatter(fmt)
    cb.ax.tick_params(labelsize=7)
    cb.set_label("importance" + (" (normalised)" if normalize else ""), fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out
