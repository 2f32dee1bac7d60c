"""Choosing each task's route: which coupled channel groups it keeps.

A task's route keeps every fixed group, every group only that task reaches, and, of the prunable
groups it shares with other tasks, the best-scoring ``keep`` fraction per layer (or over the whole
route, ``select="global"``; or those whose score passes ``threshold``; or as many as a FLOPs or
parameter budget allows). Scores come from a criterion (``routesurgeon.criteria``). Groups the
task does not reach at all are dropped: removing them cannot change its output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
import torch.fx as fx

from routesurgeon.budgets import cost_model, fit_budget
from routesurgeon.criteria import (
    CRITERIA,
    DEFAULT_CRITERION,
    GroupScores,
    canonical,
    mean_by_group,
    named_scores,
    table_scores,
)
from routesurgeon.errors import InputError, TaskError
from routesurgeon.selection import SELECTIONS, Selector

if TYPE_CHECKING:
    from routesurgeon.surgeon import Surgeon

__all__ = [
    "RouteInfo",
    "RouteMask",
    "Scores",
    "layer_name",
    "magnitude_scores",
    "route_mask",
    "table_group_scores",
    "union_mask",
]

Scores = Union[str, Mapping[str, Mapping[str, Any]], GroupScores, None]  # noqa: UP007


def layer_name(gm: fx.GraphModule, node: fx.Node, info: Mapping[str, Any]) -> str:
    """Name of a layer: its module path, or its weight's path for functional ops."""
    if node.op == "call_module":
        return str(node.target)
    weight = info.get("weight")
    return str(weight).rsplit(".", 1)[0] if weight else node.name


@dataclass(frozen=True)
class RouteMask:
    """The channel groups one task keeps (or, for a union mask, any of ``tasks`` keeps)."""

    task: str
    pruned: np.ndarray  # bool per channel group
    kept: dict[str, np.ndarray]  # layer name -> kept output channel indices
    channels: dict[str, int]  # layer name -> original output channels
    tasks: tuple[str, ...] | None = None  # set on union masks: the tasks it serves

    @property
    def kept_fraction(self) -> float:
        total = sum(self.channels.values())
        return sum(len(v) for v in self.kept.values()) / total if total else 1.0


def magnitude_scores(surgeon: Surgeon) -> dict[str, dict[str, np.ndarray]]:
    """L2 norm of each filter's weights, the same for every task (a score before training)."""
    gm = surgeon.traced.eval_graph
    out: dict[str, dict[str, np.ndarray]] = {}
    for node, info in surgeon.channel_groups.layers.items():
        if info["kind"] == "norm":
            continue
        w = gm.get_parameter(info["weight"]).detach()
        norms = filter_norms(w, info).double().cpu().numpy()
        out[layer_name(gm, node, info)] = {t: norms for t in surgeon.tasks}
    return out


def filter_norms(w: torch.Tensor, info: Mapping[str, Any]) -> torch.Tensor:
    """L2 norm of each output channel's weights, whatever the layer's weight layout.

    Convs and linear layers hold ``(out, in/groups, ...)``; transposed convs
    ``(in, out/groups, ...)``, where output ``j * out/groups + k`` is column ``k`` of group
    ``j``'s rows.
    """
    if not info.get("transposed"):
        return w.flatten(1).norm(dim=1)
    g = int(info.get("groups", 1))
    per = w.shape[1]
    v = w.reshape(g, w.shape[0] // g, per, -1).transpose(1, 2)  # (groups, out/g, in/g, kernel)
    return v.reshape(g * per, -1).norm(dim=1)


def _layer_scores(per_task: Mapping[str, Any], task: str, name: str, n: int,
                  reaching: Sequence[str]) -> np.ndarray:
    """``per_task[task]`` as an array of ``n`` scores; a wrong shape is reported for a task that
    reaches the layer when one has it (checked first), else for ``task``."""
    for t in [*reaching, task]:
        if t not in per_task:
            continue
        s = np.asarray(torch.as_tensor(per_task[t]).detach().double().cpu().numpy())
        if s.shape != (n,):
            where = "" if t in reaching else (
                f" (a task that does not reach it; {list(reaching)} do)")
            raise InputError(
                f"scores for layer {name!r}, task {t!r}{where} have shape {s.shape}; the layer "
                f"has {n} output channels: pass one score per output channel"
            )
        if t == task:
            return s
    raise TaskError(f"scores for layer {name!r} have no task {task!r}")


_NO_SCORES = ("no importance scores exist yet: train with method='drmgf' or 'drmgf-step' first, "
              "or pass scores='magnitude' (weight norms), another criterion of "
              "routesurgeon.criteria.CRITERIA, or a dict {layer: {task: scores}}")


def _resolve_scores(surgeon: Surgeon) -> Mapping[str, Mapping[str, Any]]:
    """The learned dominance table (``scores='learned'``); raises when nothing was learned yet."""
    learned = surgeon.route_scores() if hasattr(surgeon, "route_scores") else None
    if not learned:
        raise InputError(_NO_SCORES)
    return learned


def table_group_scores(surgeon: Surgeon, table: Mapping[str, Mapping[str, Any]], task: str
                       ) -> np.ndarray:
    """Per channel group, the mean of ``task``'s per-filter scores in ``table`` over the group's
    filters (``nan``: no filter of the group is scored)."""
    groups = surgeon.channel_groups
    gm = surgeon.traced.eval_graph
    bit = 1 << surgeon.tasks.index(task)
    id_score = np.full(len(groups.labels), np.nan)
    for node, info in groups.layers.items():
        if info["kind"] == "norm":
            continue
        name = layer_name(gm, node, info)
        if name not in table:
            continue
        per_task = table[name]
        if task not in per_task:
            if not surgeon._reach.get(node, 0) & bit:
                # the layer does not reach the task (learned scores omit it); its channels may
                # still be coupled with ones the task uses: the group is scored by those
                continue
            raise TaskError(f"scores for layer {name!r} have no task {task!r}")
        bits = surgeon._reach.get(node, 0)
        reaching = [t for i, t in enumerate(surgeon.tasks) if bits >> i & 1]
        id_score[info["out"]] = _layer_scores(per_task, task, name, len(info["out"]), reaching)
    sums = np.bincount(groups.labels, weights=np.nan_to_num(id_score), minlength=groups.n_groups)
    counts = np.bincount(groups.labels, weights=~np.isnan(id_score), minlength=groups.n_groups)
    return mean_by_group(sums, counts)


def _group_scores(surgeon: Surgeon, scores: Scores) -> GroupScores:
    if isinstance(scores, GroupScores):
        return scores
    if scores is None:  # the default criterion (docs/results.md, route quality)
        if not surgeon.importance_bank.trained:  # checked without building the learned table
            raise InputError(_NO_SCORES)
        return named_scores(surgeon, DEFAULT_CRITERION)
    if isinstance(scores, str):
        name = canonical(scores)
        if name == "learned":
            return table_scores(surgeon, name, _resolve_scores(surgeon))
        return named_scores(surgeon, name)
    if not isinstance(scores, Mapping):
        raise InputError(f"scores must be a criterion name ({list(CRITERIA)}), a dict "
                         f"{{layer: {{task: scores}}}} or GroupScores, got {type(scores).__name__}")
    return table_scores(surgeon, "custom", scores)


def _candidates(surgeon: Surgeon, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(candidate, base): the shared prunable groups ``task`` reaches, and those it never does."""
    groups = surgeon.channel_groups
    bit = 1 << surgeon.tasks.index(task)
    reach = groups.reach
    n_tasks = np.array([bin(int(b)).count("1") for b in reach])
    reached = (reach & bit).astype(bool)
    return ~groups.fixed & reached & (n_tasks >= 2), ~groups.fixed & ~reached


def _selector(surgeon: Surgeon, task: str, table: GroupScores, select: str) -> Selector:
    groups = surgeon.channel_groups
    candidate, base = _candidates(surgeon, task)
    score = np.nan_to_num(table.of(task, groups.n_groups), nan=np.inf)  # unscored: keep
    return Selector(groups, candidate, base, score, select)


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0.0 < float(value) <= 1.0):
        raise InputError(f"{name} must be a fraction in (0, 1], got {value!r}")
    return float(value)


def route_mask(
    surgeon: Surgeon,
    task: str,
    keep: float | None = 0.5,
    threshold: float | None = None,
    scores: Scores = None,
    select: str = "layer",
    budget_flops: float | None = None,
    budget_params: float | None = None,
) -> RouteMask:
    """The channel groups ``task`` keeps (see the module docstring).

    ``scores``: a criterion name of ``routesurgeon.criteria.CRITERIA`` (default ``None``:
    ``DEFAULT_CRITERION``, the learned importance ``|A_t|``, which held routes' accuracy better
    than the dominance in docs/results.md), a ``{layer: {task: per-filter scores}}`` dict, or
    ``criterion_scores(...)``.
    ``select``: ``"layer"`` (keep a fraction of each layer's groups) or ``"global"`` (one
    ranking over the route, scores normalised per layer). ``budget_flops`` / ``budget_params``:
    instead of ``keep``, the largest route whose FLOPs per sample / parameters are at most that
    fraction of the task's unpruned route (an error names the floor when it cannot fit).
    """
    if task not in surgeon.tasks:
        raise TaskError(f"unknown task {task!r}; tasks are {surgeon.tasks}")
    budgets = {k: v for k, v in (("budget_flops", budget_flops),
                                 ("budget_params", budget_params)) if v is not None}
    if len(budgets) > 1:
        raise InputError("pass one of budget_flops and budget_params, not both")
    if budgets and threshold is not None:
        raise InputError("a budget and a threshold both choose how much a route keeps: pass one")
    if select not in SELECTIONS:
        raise InputError(f"unknown select {select!r}; use one of {list(SELECTIONS)}")
    if threshold is None and not budgets:
        keep = _check_fraction("keep", keep)
    elif threshold is not None and not math.isfinite(float(threshold)):
        raise InputError(f"threshold must be a finite number, got {threshold!r}")
    for k, v in budgets.items():
        _check_fraction(k, v)
    surgeon.check_unchanged()
    groups = surgeon.channel_groups
    # keep=1.0 keeps every group the task reaches: scores cannot change the route, none needed
    keep_all = threshold is None and not budgets and float(keep) >= 1.0  # type: ignore[arg-type]
    if keep_all and scores in (None, "importance", "learned", "raw-importance"):
        table = GroupScores("learned", {task: np.full(groups.n_groups, np.inf)})
    else:
        table = _group_scores(surgeon, scores)
    sel = _selector(surgeon, task, table, select)
    others = ([_selector(surgeon, t, table, select) for t in surgeon.tasks if t != task]
              if table.arbitration == "union" else [])

    def pruned_at(level: float) -> np.ndarray:
        kept = sel.kept(level, threshold)
        for o in others:  # DiSparse: a shared group stays if any task sharing it keeps it
            kept |= o.kept(level, threshold)
        return sel.pruned(kept)

    if budgets:
        (what, frac), = budgets.items()
        kind = what.split("_", 1)[1]
        costs = cost_model(surgeon)
        full = costs.cost(kind, sel.base, (task,))
        pruned = fit_budget(pruned_at, lambda p: costs.cost(kind, p, (task,)), full, frac,
                            what, f"task {task!r}'s route")
    else:
        pruned = pruned_at(float(keep) if keep is not None else 1.0)
    return _mask(surgeon, task, pruned)


def _mask(surgeon: Surgeon, task: str, pruned: np.ndarray) -> RouteMask:
    groups, gm = surgeon.channel_groups, surgeon.traced.eval_graph
    kept: dict[str, np.ndarray] = {}
    channels: dict[str, int] = {}
    for node, info in groups.layers.items():
        if info["kind"] == "norm":
            continue
        name = layer_name(gm, node, info)
        labels = groups.labels[info["out"]]
        kept[name] = np.flatnonzero(~pruned[labels])
        channels[name] = len(labels)
    return RouteMask(task, pruned, kept, channels)


def union_mask(surgeon: Surgeon, masks: Sequence[RouteMask]) -> RouteMask:
    """The union of single-task routes: a channel group is kept if any of ``masks`` keeps it."""
    if not masks:
        raise InputError("a union of routes needs at least one task")
    tasks = tuple(m.task for m in masks)
    if len(set(tasks)) != len(tasks):
        raise TaskError(f"duplicate task in a union of routes: {list(tasks)}")
    pruned = np.logical_and.reduce([m.pruned for m in masks])
    groups, gm = surgeon.channel_groups, surgeon.traced.eval_graph
    layer_ids = {layer_name(gm, node, info): groups.labels[info["out"]]
                 for node, info in groups.layers.items() if info["kind"] != "norm"}
    kept = {name: np.flatnonzero(~pruned[labels]) for name, labels in layer_ids.items()}
    channels = {name: len(labels) for name, labels in layer_ids.items()}
    return RouteMask("+".join(tasks), pruned, kept, channels, tasks=tasks)


@dataclass(frozen=True)
class RouteInfo:
    """What an exported route is: stored on it as ``route.meta["routesurgeon"]``."""

    mask: RouteMask
    tasks: tuple[str, ...]  # the outputs it computes (one, or several for a union)
    keep: float | None
    threshold: float | None
    scores: str  # the criterion ("importance" = learned, "magnitude", ...) or "custom"
    tol: float  # relative tolerance it was verified to
    error: float  # measured relative error against the masked reference
    example_inputs: tuple[Any, ...]  # the inputs it was verified on (placeholder order)
    select: str = "layer"  # "layer" or "global" ranking
    budget: tuple[str, float] | None = None  # ("flops" | "params", fraction) when set
    recalibrated: int = 0  # batches its norm statistics were re-estimated on after verification
    reconstructed: int = 0  # batches its layers were re-fitted on (routesurgeon.reconstruct)
