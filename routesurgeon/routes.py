"""Choosing each task's route: which coupled channel groups it keeps.

A task's route keeps every fixed group, every group only that task reaches, and, of the prunable
groups it shares with other tasks, the best-scoring ``keep`` fraction per layer (or those whose
score passes ``threshold``). Groups the task does not reach at all are dropped: removing them
cannot change its output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
import torch.fx as fx

from routesurgeon.errors import InputError, TaskError

if TYPE_CHECKING:
    from routesurgeon.surgeon import Surgeon

__all__ = [
    "RouteInfo",
    "RouteMask",
    "Scores",
    "layer_name",
    "magnitude_scores",
    "route_mask",
    "union_mask",
]

Scores = Union[str, Mapping[str, Mapping[str, Any]], None]  # noqa: UP007 (runtime alias)


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
        norms = filter_norms(w, info).double().numpy()
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


def _resolve_scores(surgeon: Surgeon, scores: Scores) -> Mapping[str, Mapping[str, Any]]:
    if isinstance(scores, str):
        if scores == "magnitude":
            return magnitude_scores(surgeon)
        if scores == "importance":
            scores = None
        else:
            raise InputError(f"unknown scores {scores!r}; use 'importance', 'magnitude' or a dict")
    if scores is None:
        learned = surgeon.route_scores() if hasattr(surgeon, "route_scores") else None
        if not learned:
            raise InputError(
                "no importance scores exist yet: train with method='drmgf' or 'drmgf-step' first, "
                "or pass scores='magnitude' (weight norms) or a dict {layer: {task: scores}}"
            )
        return learned
    return scores


def route_mask(
    surgeon: Surgeon,
    task: str,
    keep: float | None = 0.5,
    threshold: float | None = None,
    scores: Scores = None,
) -> RouteMask:
    """The channel groups ``task`` keeps (see the module docstring)."""
    if task not in surgeon.tasks:
        raise TaskError(f"unknown task {task!r}; tasks are {surgeon.tasks}")
    if threshold is None:
        if keep is None or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
            raise InputError(f"keep must be a fraction in (0, 1], got {keep!r}")
    elif not math.isfinite(float(threshold)):
        raise InputError(f"threshold must be a finite number, got {threshold!r}")
    surgeon.check_unchanged()
    # keep=1.0 keeps every group the task reaches: scores cannot change the route, none needed
    keep_all = threshold is None and float(keep) >= 1.0  # type: ignore[arg-type]
    table = {} if keep_all and scores in (None, "importance") else _resolve_scores(surgeon, scores)
    groups = surgeon.channel_groups
    gm = surgeon.traced.eval_graph
    bit = 1 << surgeon.tasks.index(task)
    reach = groups.reach
    n_tasks = np.array([bin(int(b)).count("1") for b in reach])
    candidate = ~groups.fixed & (reach & bit).astype(bool) & (n_tasks >= 2)
    pruned = ~groups.fixed & ~(reach & bit).astype(bool)  # groups the task never reaches
    # per-id score for this task, then the mean over each group's filters
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
    group_score = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)  # unscored: keep
    keep_group = np.zeros(groups.n_groups, dtype=bool)
    kept: dict[str, np.ndarray] = {}
    channels: dict[str, int] = {}
    for info in groups.layers.values():
        if info["kind"] == "norm":
            continue
        labels = groups.labels[info["out"]]
        cand = np.unique(labels[candidate[labels]])
        if len(cand):
            sc = group_score[cand]
            if threshold is not None:
                chosen = cand[sc >= threshold]
                if len(chosen) == 0:
                    chosen = cand[[int(np.argmax(sc))]]
            else:
                k = max(1, math.ceil(float(keep) * len(cand)))  # type: ignore[arg-type]
                chosen = cand[np.argsort(-sc, kind="stable")[:k]]
            keep_group[chosen] = True
    pruned |= candidate & ~keep_group
    _keep_an_input(groups, pruned, candidate, group_score)
    for node, info in groups.layers.items():
        if info["kind"] == "norm":
            continue
        name = layer_name(gm, node, info)
        labels = groups.labels[info["out"]]
        kept[name] = np.flatnonzero(~pruned[labels])
        channels[name] = len(labels)
    return RouteMask(task, pruned, kept, channels)


def _keep_an_input(groups: Any, pruned: np.ndarray, candidate: np.ndarray,
                   group_score: np.ndarray) -> None:
    """A layer the route keeps must keep an input channel: un-prune its best candidate input group.

    Per-layer ``keep`` counts only a layer's *output* groups; an input group (e.g. the one channel
    a split hands to a branch) can still be dropped whole, leaving a conv with no inputs. Repeat
    until no kept layer has every input pruned (only un-prunes, so it terminates).
    """
    changed = True
    while changed:
        changed = False
        for info in groups.layers.values():
            if info["kind"] == "norm" or len(info["in"]) == 0:
                continue
            if pruned[groups.labels[info["out"]]].all():
                continue  # the layer is not on the route
            ins = np.unique(groups.labels[info["in"]])
            if not pruned[ins].all():
                continue
            cand = ins[candidate[ins]]
            if len(cand):
                pruned[cand[int(np.argmax(group_score[cand]))]] = False
                changed = True


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
    scores: str  # "magnitude", "importance" or "custom"
    tol: float  # relative tolerance it was verified to
    error: float  # measured relative error against the masked reference
    example_inputs: tuple[Any, ...]  # the inputs it was verified on (placeholder order)
