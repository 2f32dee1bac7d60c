"""Multi-task performance relative to single-task baselines: the Maninis et al. delta_m.

``delta_m`` (Maninis, Radosavovic, Kokkinos, CVPR 2019, "Attentive single-tasking of multiple
tasks"; the form used by MTAN, CAGrad, Nash-MTL and FAMO on NYUv2): the mean, over *all metrics*,
of the relative difference to the single-task baseline, with the sign flipped for metrics where
higher is better, in percent. Lower is better; negative means better than single-task training.

``delta_m_tasks``: the task-averaged variant: the same signed relative differences are first
averaged within each task, then over tasks, so a task with many metrics does not dominate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from routesurgeon.errors import InputError

__all__ = ["NYUV2_METRICS", "NYUV2_STL", "MetricSpec", "delta_m", "delta_m_tasks",
           "relative_differences"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric: the task it measures and whether a higher value is better."""

    task: str
    higher_is_better: bool


#: The nine NYUv2 metrics of the MTAN / CAGrad / Nash-MTL protocol (13-class segmentation, depth,
#: surface normals), with their direction.
NYUV2_METRICS: dict[str, MetricSpec] = {
    "miou": MetricSpec("segmentation", True),
    "pix_acc": MetricSpec("segmentation", True),
    "abs_err": MetricSpec("depth", False),
    "rel_err": MetricSpec("depth", False),
    "angle_mean": MetricSpec("normal", False),
    "angle_median": MetricSpec("normal", False),
    "within_11.25": MetricSpec("normal", True),
    "within_22.5": MetricSpec("normal", True),
    "within_30": MetricSpec("normal", True),
}

#: The standard single-task reference (STL, SegNet) on NYUv2, as used for delta_m by CAGrad,
#: Nash-MTL (github.com/AvivNavon/nash-mtl, experiments/nyuv2/utils.py, ``BASE``, "base results from
#: CAGrad") and the DR-MGF authors (github.com/SYVAE/DR-MGF, E1_Multi_task/S1_show_delta_m.py:19).
NYUV2_STL: dict[str, float] = {
    "miou": 0.3830, "pix_acc": 0.6376, "abs_err": 0.6754, "rel_err": 0.2780,
    "angle_mean": 25.01, "angle_median": 19.21,
    "within_11.25": 0.3014, "within_22.5": 0.5720, "within_30": 0.6915,
}


def relative_differences(results: Mapping[str, float], baseline: Mapping[str, float],
                         specs: Mapping[str, MetricSpec]) -> dict[str, float]:
    """Per metric, ``-(+1 if higher is better else -1) * (M - M_b) / M_b`` in percent.

    Negative values are improvements over the baseline.
    """
    if not specs:
        raise InputError("delta_m: no metrics given (specs is empty)")
    missing = [m for m in specs if m not in results or m not in baseline]
    if missing:
        raise InputError(
            f"delta_m: metrics {missing} are missing from the results or the baseline; give "
            f"both a value for every metric in specs ({sorted(specs)})")
    unknown = [m for m in results if m not in specs]
    if unknown:
        raise InputError(f"delta_m: results name metrics {unknown} with no MetricSpec (its task "
                         f"and direction); add them to specs or drop them")
    out = {}
    for m, spec in specs.items():
        base = float(baseline[m])
        if base == 0.0:
            raise InputError(f"delta_m: the baseline of metric {m!r} is 0; the relative "
                             f"difference is undefined")
        sign = -1.0 if spec.higher_is_better else 1.0
        out[m] = sign * (float(results[m]) - base) / abs(base) * 100.0
    return out


def delta_m(results: Mapping[str, float], baseline: Mapping[str, float],
            specs: Mapping[str, MetricSpec]) -> float:
    """Metric-averaged delta_m in percent (lower is better)."""
    diffs = relative_differences(results, baseline, specs)
    return sum(diffs.values()) / len(diffs)


def delta_m_tasks(results: Mapping[str, float], baseline: Mapping[str, float],
                  specs: Mapping[str, MetricSpec]) -> float:
    """Task-averaged delta_m in percent: metrics averaged within each task, then over tasks."""
    diffs = relative_differences(results, baseline, specs)
    per_task: dict[str, list[float]] = {}
    for m, d in diffs.items():
        per_task.setdefault(specs[m].task, []).append(d)
    return sum(sum(v) / len(v) for v in per_task.values()) / len(per_task)
