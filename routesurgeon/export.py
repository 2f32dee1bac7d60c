"""Exporting routes: per task, a smaller ``GraphModule`` of standard modules, verified.

Like torchvision's feature extraction: copy the traced graph, keep the task's output, eliminate
dead code (``routesurgeon.subgraph``); then slice every parameter along the channels the route
drops and rewrite the few graph arguments that name channel counts (``routesurgeon.slicing``),
and check the result against the *masked reference*: the full graph with the dropped channels
zeroed where every consumer mixes them densely (conv/linear inputs), where zeroing is exactly
equivalent to removal.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.fx as fx

from routesurgeon.criteria import (
    DATA_CRITERIA,
    DEFAULT_CRITERION,
    TP_CRITERIA,
    GroupScores,
    canonical,
    criterion_scores,
)
from routesurgeon.errors import ExportError, InputError, TaskError
from routesurgeon.routes import RouteInfo, RouteMask, route_mask, union_mask
from routesurgeon.slicing import prune_graph, route_cuts
from routesurgeon.subgraph import _build, _keep, _rank, _route_outputs, outputs_graph, task_graph
from routesurgeon.tp_anchor import TP_STEPS

if TYPE_CHECKING:
    from routesurgeon.surgeon import Surgeon

__all__ = [
    "export_routes",
    "masked_graph",
    "outputs_graph",
    "prune_graph",
    "route_cuts",
    "task_graph",
    "verify_route",
]


def masked_graph(surgeon: Surgeon, mask: RouteMask) -> fx.GraphModule:
    """The full graph for ``mask``'s task(s) with the dropped channels zeroed (the reference).

    A union mask (``mask.tasks`` set) gives a graph returning ``{task: output}``.
    """
    gm = surgeon.traced.eval_graph
    groups = surgeon.channel_groups
    graph, env = outputs_graph(gm, _route_outputs(surgeon, mask))
    first = next(iter(surgeon.model.parameters()), None)
    dev = first.device if first is not None else None  # the masks go where the model is
    extra: dict[str, Any] = {}
    for old, entries in groups.state.masks_at.items():
        if old not in env:
            continue
        new = env[old]
        for arg_index, space in entries:
            keep = _keep(groups, mask.pruned, space.ids)
            if keep.all():
                continue
            arg = new.args[arg_index]
            shape = [1] * _rank(old.args[arg_index])
            shape[space.axis] = len(keep)
            name = f"_rs_mask_{len(extra)}"
            extra[name] = torch.as_tensor(keep, dtype=torch.float32, device=dev).reshape(shape)
            with graph.inserting_before(new), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the mask attribute is added by _build below
                m = graph.get_attr(name)
                zeroed = graph.call_function(torch.mul, (arg, m))
            new.args = tuple(zeroed if i == arg_index else a for i, a in enumerate(new.args))
    out = _build(graph, gm, extra, "MaskedRoute")
    return out.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    denom = max(b64.abs().max().item(), 1e-12)
    return (a64 - b64).abs().max().item() / denom


def verify_route(route: fx.GraphModule, reference: fx.GraphModule, inputs: list[Any],
                 task: str, tol: float = 1e-5) -> float:
    """Raise ``ExportError`` unless ``route`` matches ``reference`` within ``tol`` (relative).

    Union routes return ``{task: output}``: every output is checked. Returns the largest error.
    """
    with torch.no_grad():
        try:
            got = route(*inputs)
        except Exception as e:
            raise ExportError(f"route {task!r} fails to run after pruning: {e}") from e
        want = reference(*inputs)
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            raise ExportError(f"union route {task!r} returns {type(got).__name__} "
                              f"{sorted(got) if isinstance(got, dict) else ''}, the masked "
                              f"reference a dict of {sorted(want)}")
        return max(_check_one(got[t], want[t], f"{task!r} output {t!r}", tol) for t in want)
    return _check_one(got, want, repr(task), tol)


def _check_one(got: Any, want: torch.Tensor, what: str, tol: float) -> float:
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        raise ExportError(f"route {what} returns shape {getattr(got, 'shape', None)}, "
                          f"the masked reference {tuple(want.shape)}")
    err = relative_error(got, want)
    if not err <= tol:
        raise ExportError(f"route {what} differs from its masked reference by {err:.3g} "
                          f"(relative; tolerance {tol:g}): refusing to return a wrong model")
    return err


def _scores_kind(scores: Any) -> str:
    if scores is None:
        return DEFAULT_CRITERION
    if scores == "importance":
        return "importance"
    if isinstance(scores, GroupScores):
        return scores.criterion
    return scores if isinstance(scores, str) else "custom"


def _finish(route: fx.GraphModule, mask: RouteMask, tasks: tuple[str, ...], err: float,
            inputs: list[Any], keep: float | None, threshold: float | None, scores: Any,
            tol: float, select: str = "layer", budget: tuple[str, float] | None = None
            ) -> fx.GraphModule:
    route.meta_route = mask  # type: ignore[assignment]
    route.meta["routesurgeon"] = RouteInfo(
        mask=mask, tasks=tasks, keep=keep, threshold=threshold, scores=_scores_kind(scores),
        tol=tol, error=err, example_inputs=tuple(inputs), select=select, budget=budget)
    return route


def export_routes(
    surgeon: Surgeon,
    keep: float | None = 0.5,
    threshold: float | None = None,
    scores: Any = None,
    tasks: Sequence[str] | None = None,
    verify_inputs: Sequence[Any] | None = None,
    tol: float = 1e-5,
    union: bool = False,
    select: str = "layer",
    budget_flops: float | None = None,
    budget_params: float | None = None,
    calibration: Iterable[Any] | None = None,
    calibration_batches: int = 16,
    reconstruct: bool | None = None,
    losses: Mapping[str, Callable[[Any, Any], torch.Tensor]] | None = None,
    score_batches: int = 4,
    tp_steps: int = TP_STEPS,
) -> dict[str, fx.GraphModule] | fx.GraphModule:
    """Per task a pruned, verified route; with ``union=True`` one graph serving all ``tasks``.

    The union keeps a channel if any chosen task's route keeps it, computes what the tasks share
    once and returns ``{task: output}``; each output is verified against its masked reference.
    Every route carries a ``RouteInfo`` as ``route.meta["routesurgeon"]``. ``scores``,
    ``select``, ``budget_flops`` and ``budget_params``: see ``routesurgeon.routes.route_mask``.
    ``calibration``: batches on which each verified route's norm statistics are then
    re-estimated (``routesurgeon.recalibrate``, ``calibration_batches`` of them); with
    ``reconstruct`` (the default when ``calibration`` is given; ``False`` for BN statistics
    alone) the layers whose inputs were cut are first re-fitted to the full model's outputs on
    those batches (``routesurgeon.reconstruct``): in docs/results.md's route-quality study it
    took 50 %-FLOPs routes from 0.45 to 0.93 (pretrained MobileNetV2) and from 0.91 to 1.00
    (multi-exit) of the full model's metric, where BN recalibration alone stopped.
    ``losses`` (``{task: loss(output, target)}``) with labelled ``calibration`` batches
    (``(inputs, {task: target})``) lets ``scores`` name a criterion that needs data
    (``"taylor"``, ``"snip"``, ``"disparse"``): it is computed on ``score_batches`` of them
    (``routesurgeon.criterion_scores``). ``scores="tp-taylor"`` / ``"tp-magnitude"`` with
    ``budget_flops``: torch-pruning prunes each task's copy to the budget in ``tp_steps``
    iterative steps (Taylor: gradients of ``losses[task]`` on ``calibration`` batches) and the
    route keeps exactly the channels it kept (``routesurgeon.tp_anchor``), verified like any.
    """
    scores = _data_scores(surgeon, scores, calibration, losses, score_batches)
    if reconstruct is None:
        reconstruct = calibration is not None
    if reconstruct and calibration is None:
        raise InputError("reconstruct=True re-fits layers on calibration batches: pass "
                         "calibration=<loader of training batches>")
    fit = surgeon if reconstruct else None
    budget = (("flops", float(budget_flops)) if budget_flops is not None else
              ("params", float(budget_params)) if budget_params is not None else None)
    sel: dict[str, Any] = {"select": select, "budget_flops": budget_flops,
                           "budget_params": budget_params}
    chosen = list(surgeon.tasks) if tasks is None else list(tasks)
    for t in chosen:
        surgeon.topology._check_task(t)
    if len(set(chosen)) != len(chosen):
        raise TaskError(f"duplicate task in {chosen}")
    if not chosen:
        raise InputError("export_routes(tasks=[]) asks for no task; pass at least one task name")
    inputs = list(verify_inputs) if verify_inputs is not None else surgeon.example_inputs()
    if isinstance(scores, str) and scores in TP_CRITERIA:
        masks = _tp_masks(surgeon, chosen, scores, budget_flops, calibration, losses, tp_steps,
                          threshold, budget_params)
    else:
        masks = {t: route_mask(surgeon, t, keep, threshold, scores, **sel) for t in chosen}
    if union:
        mask = union_mask(surgeon, [masks[t] for t in chosen])
        route = prune_graph(surgeon, mask)
        err = verify_route(route, masked_graph(surgeon, mask), inputs, mask.task, tol)
        route = _finish(route, mask, tuple(chosen), err, inputs, keep, threshold, scores, tol,
                        select, budget)
        return _calibrated(route, calibration, calibration_batches, fit)
    routes: dict[str, fx.GraphModule] = {}
    for t, mask in masks.items():
        route = prune_graph(surgeon, mask)
        err = verify_route(route, masked_graph(surgeon, mask), inputs, t, tol)
        routes[t] = _calibrated(_finish(route, mask, (t,), err, inputs, keep, threshold, scores,
                                        tol, select, budget), calibration, calibration_batches,
                                fit)
    return routes


def _data_scores(surgeon: Surgeon, scores: Any, calibration: Iterable[Any] | None,
                 losses: Mapping[str, Any] | None, batches: int) -> Any:
    """``scores`` naming a data criterion, computed on ``calibration`` with ``losses``."""
    if isinstance(scores, str) and scores in TP_CRITERIA:
        return scores  # torch-pruning selects (``_tp_masks``)
    name = canonical(scores) if isinstance(scores, str) else None
    if name not in DATA_CRITERIA:
        if losses is not None:  # it would be ignored
            raise InputError("losses= is used to compute a criterion named by scores= "
                             f"({[*DATA_CRITERIA, *TP_CRITERIA]}); scores here are already given "
                             "or need no data")
        return scores
    if calibration is None or losses is None:
        raise InputError(f"scores={scores!r} is computed from data: pass calibration=<loader of "
                         "(inputs, {task: target}) batches> and losses={task: loss(output, "
                         "target)}, or scores=routesurgeon.criterion_scores(...)")
    return criterion_scores(surgeon, name, calibration, losses, batches=batches)


def _tp_masks(surgeon: Surgeon, tasks: Sequence[str], scores: str, budget_flops: float | None,
              calibration: Iterable[Any] | None, losses: Mapping[str, Any] | None, steps: int,
              threshold: float | None, budget_params: float | None
              ) -> dict[str, RouteMask]:
    """Per task, the mask of torch-pruning's copy pruned to ``budget_flops``."""
    from routesurgeon.tp_anchor import mask_of_copy, torch_pruning_route

    if budget_flops is None or threshold is not None or budget_params is not None:
        raise InputError(f"scores={scores!r} prunes to a FLOPs budget: pass budget_flops= (and "
                         "no threshold or budget_params)")
    importance = scores[3:]
    if importance == "taylor" and (calibration is None or losses is None):
        raise InputError(f"scores={scores!r} needs calibration=<loader of (inputs, {{task: "
                         "target}) batches> and losses={task: loss(output, target)}")
    missing = [t for t in tasks if losses is not None and t not in losses]
    if importance == "taylor" and missing:
        raise TaskError(f"losses has no loss for tasks {missing}")
    return {t: mask_of_copy(surgeon, t, torch_pruning_route(
        surgeon, t, budget_flops, importance, calibration,
        losses[t] if losses is not None and t in losses else None, steps=steps)) for t in tasks}


def _calibrated(route: fx.GraphModule, loader: Iterable[Any] | None, batches: int,
                fit: Surgeon | None = None) -> fx.GraphModule:
    if loader is None:
        return route
    if fit is not None:
        from routesurgeon.reconstruct import reconstruct

        return cast(fx.GraphModule, reconstruct(route, fit, loader, batches))
    from routesurgeon.recalibrate import recalibrate

    return cast(fx.GraphModule, recalibrate(route, loader, batches))
