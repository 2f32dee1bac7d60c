"""The report of a :class:`~routesurgeon.surgeon.Surgeon`: gathers what exists and writes it.

Before training the report shows the topology; after DR-MGF training (``drmgf`` or
``drmgf-step``) the learned per-channel importance; with a trainer's ``history`` the curves and
the importance per epoch; with exported routes their kept channels and costs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.fx as fx

from routesurgeon.errors import InputError
from routesurgeon.viz.costs import route_costs
from routesurgeon.viz.report import write_report

if TYPE_CHECKING:
    from routesurgeon.surgeon import Surgeon

__all__ = ["surgeon_report"]


def _history(history: Any) -> list[Mapping[str, Any]] | None:
    if history is None:
        return None
    records = getattr(history, "history", history)  # a Trainer or its list of records
    if not isinstance(records, Sequence) or not all(isinstance(r, Mapping) for r in records):
        raise InputError(
            "history must be a Trainer or its list of per-epoch dict records (trainer.history)"
        )
    return list(records)


def _routes(surgeon: Surgeon, routes: Any, repeats: int) -> dict[str, dict[str, Any]] | None:
    if not routes:
        return None
    if not isinstance(routes, Mapping):
        raise InputError(
            "routes must be the dict returned by surgeon.export_routes(...) or "
            "{task: {params, flops, kept, channels, ...}}"
        )
    values = list(routes.values())
    if all(isinstance(r, fx.GraphModule) for r in values):
        single = {t: r for t, r in routes.items() if t in surgeon.tasks}
        return route_costs(surgeon, single, repeats=repeats) or None
    if all(isinstance(r, Mapping) for r in values):
        return {str(t): dict(r) for t, r in routes.items()}
    raise InputError(
        "routes must map each task to an exported route (GraphModule) or to a "
        "dict of route statistics, not a mix"
    )


def surgeon_report(
    surgeon: Surgeon,
    path: str | Path,
    history: Any = None,
    routes: Mapping[str, Any] | None = None,
    importance: Mapping[str, Mapping[str, Any]] | None = None,
    title: str | None = None,
    latency_repeats: int = 3,
    conflicts: Any = None,
    route_quality: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``surgeon``'s self-contained HTML report to ``path`` and return the path.

    Args:
        surgeon: from :func:`routesurgeon.instrument`.
        path: the ``.html`` file to write.
        history: a :class:`~routesurgeon.trainer.Trainer` or its ``history`` records.
        routes: ``surgeon.export_routes(...)`` (costs are measured here) or ready statistics.
        importance: ``{layer: {task: per-channel scores}}``; default: the learned importance
            once the surgeon has been trained with DR-MGF, else none.
        title: page title.
        latency_repeats: forwards timed per route (0: no latency column).
        conflicts: gradient-conflict samples (``surgeon.conflicts(...)``, a list of them or
            their records); default: those the trainer's history holds (``Trainer(conflicts=)``).
        route_quality: records of ``benchmarks/route_quality.py``: the Routes section shows
            the route-quality curve (route/full metric against kept FLOPs per criterion).
    """
    if importance is None:
        importance = surgeon.route_scores()
    return write_report(
        path,
        surgeon.topology,
        importance=importance,
        history=_history(history),
        routes=_routes(surgeon, routes, latency_repeats),
        title=title or f"routesurgeon report · {type(surgeon.model).__name__}",
        conflicts=conflicts,
        route_quality=route_quality,
    )
