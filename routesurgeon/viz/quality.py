"""Route-quality curves: a route's metric over the full model's against its kept FLOPs.

The rows are the records of ``benchmarks/route_quality.py`` (one per recipe, seed, selection
variant, FLOPs budget and task, with the task metric as exported, recalibrated and fine-tuned).
``quality_points`` averages them over tasks, then seeds; ``quality_svg`` draws them as inline SVG
for the HTML report's Routes section and ``save_quality_curve`` as a PNG (matplotlib).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from routesurgeon.errors import InputError
from routesurgeon.viz._charts import _line_chart, _Series

__all__ = ["STAGES", "quality_points", "quality_svg", "save_quality_curve"]

STAGES = ("exported", "recalibrated", "finetuned")
_LOWER = ("mse", "abs_err", "angle_deg")
_PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#db2777",
            "#65a30d", "#4f46e5", "#b45309", "#475569", "#0f766e", "#be123c")


def _relative(r: Mapping[str, Any], stage: str) -> float:
    m = r["metric"]
    full, got = float(r["full"][m]), float(r[stage][m])
    return full / got if m.split("/", 1)[1] in _LOWER else got / full


def quality_points(rows: Sequence[Mapping[str, Any]], stage: str = "recalibrated"
                   ) -> dict[str, dict[str, list[tuple[float, float, float]]]]:
    """``{recipe: {variant: [(kept FLOPs, mean, std), ...]}}`` sorted by kept FLOPs: the
    route/full metric averaged over tasks per seed, then mean and std over the seeds that have
    every task."""
    if stage not in STAGES:
        raise InputError(f"unknown stage {stage!r}; use one of {list(STAGES)}")
    cells: dict[tuple[str, str, float], dict[int, list[Mapping[str, Any]]]] = {}
    tasks: dict[str, set[str]] = {}
    for r in rows:
        tasks.setdefault(r["recipe"], set()).add(r["task"])
        if stage in r:
            key = (r["recipe"], r["variant"], float(r["budget"]))
            cells.setdefault(key, {}).setdefault(int(r["seed"]), []).append(r)
    out: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for (recipe, variant, _b), by_seed in cells.items():
        per_seed = [statistics.mean(_relative(r, stage) for r in rs)
                    for rs in by_seed.values() if len(rs) == len(tasks[recipe])]
        if not per_seed:
            continue
        flops = statistics.mean(float(r["flops_fraction"]) for rs in by_seed.values()
                                for r in rs)
        std = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        out.setdefault(recipe, {}).setdefault(variant, []).append(
            (flops, statistics.mean(per_seed), std))
    for per in out.values():
        for pts in per.values():
            pts.sort()
    return out


def _colours(points: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """One colour per variant, the same in every panel."""
    names = sorted({v for per in points.values() for v in per})
    return {v: _PALETTE[i % len(_PALETTE)] for i, v in enumerate(names)}


def quality_svg(rows: Sequence[Mapping[str, Any]], stage: str = "recalibrated") -> str:
    """Inline SVG charts, one per recipe (empty string without rows)."""
    charts = []
    points = quality_points(rows, stage)
    colour = _colours(points)
    for recipe, per in points.items():
        series = [_Series(v, colour[v], "4 3" if v.startswith("tp-") else "",
                          [p[0] for p in pts], [p[1] for p in pts])
                  for v, pts in sorted(per.items())]
        charts.append(_line_chart(series, f"{recipe}: route / full metric ({stage})",
                                  width=420, height=240, xlabel="kept FLOPs"))
    return "".join(charts)


def save_quality_curve(rows: Sequence[Mapping[str, Any]], path: str | Path,
                       stage: str = "recalibrated") -> Path:
    """A PNG with one panel per recipe: route/full metric against kept FLOPs, one line per
    variant (torch-pruning dashed), error bars the std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = quality_points(rows, stage)
    if not points:
        raise InputError(f"no route-quality rows with stage {stage!r} to draw")
    colour = _colours(points)
    fig, axes = plt.subplots(1, len(points), figsize=(5.2 * len(points) + 1.8, 4.2),
                             squeeze=False)
    for ax, (recipe, per) in zip(axes[0], points.items()):
        for v, pts in sorted(per.items()):
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                        label=v, color=colour[v], capsize=2, marker="o",
                        markersize=3, linestyle="--" if v.startswith("tp-") else "-")
        ax.axhline(0.9, color="#94a3b8", linewidth=0.8, linestyle=":")
        ax.set_title(f"{recipe} ({stage})", fontsize=10)
        ax.set_xlabel("kept FLOPs (fraction of the task's network)")
        ax.set_ylabel("route metric / full model metric")
        ax.grid(alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend([handles[k] for k in sorted(handles)], sorted(handles), fontsize=7,
               loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / (5.2 * len(points) + 1.8), 1))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
