"""Exporting routes: per task, a smaller ``GraphModule`` of standard modules, verified.

Like torchvision's feature extraction: copy the traced graph, keep the task's output, eliminate
dead code; then slice every parameter along the channels the route drops, rewrite the few graph
arguments that name channel counts (split sizes, channel slices), and check the result against the
*masked reference*: the full graph with the dropped channels zeroed where every consumer mixes
them densely (conv/linear inputs), where zeroing is exactly equivalent to removal.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from routesurgeon.channels import ChannelGroups, Space
from routesurgeon.criteria import DEFAULT_CRITERION, GroupScores
from routesurgeon.errors import ExportError, InputError, TaskError
from routesurgeon.routes import RouteInfo, RouteMask, route_mask, union_mask

if TYPE_CHECKING:
    from routesurgeon.surgeon import Surgeon

__all__ = [
    "export_routes",
    "masked_graph",
    "outputs_graph",
    "prune_graph",
    "task_graph",
    "verify_route",
]


def _attr(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _build(graph: fx.Graph, source: nn.Module, overrides: Mapping[str, Any], name: str
           ) -> fx.GraphModule:
    """A GraphModule over ``graph`` whose modules/attributes come from ``source`` or overrides."""
    root: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr"):
            t = str(n.target)
            root[t] = overrides[t] if t in overrides else _attr(source, t)
    gm = fx.GraphModule(root, graph, name)
    return gm


def task_graph(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A copy of ``gm``'s graph that returns only ``node``, dead code removed."""
    return outputs_graph(gm, node)


def outputs_graph(gm: fx.GraphModule, result: fx.Node | Mapping[str, fx.Node]
                  ) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A copy of ``gm``'s graph returning ``result`` (a node or a dict of nodes), dead code gone.

    Only what the result needs is copied (what dead code elimination would keep, without copying
    the rest first): the result's ancestors, the placeholders, and side-effecting nodes with the
    nodes they read, except assertions on tensors the result does not use (an assertion has no
    users, so it would keep alive the layers whose shapes it checks: timm asserts feature sizes
    in later stages, and a route of an early output would still run them).
    """
    roots = [result] if isinstance(result, fx.Node) else list(result.values())
    needed = _ancestors(roots, set())
    keep = set(needed)
    for n in gm.graph.nodes:
        if n in needed or n.op == "output":
            continue
        if n.op == "placeholder":
            keep.add(n)
        elif n.is_impure():
            extra = _ancestors([n], needed)
            if n.target in _ASSERTS and any(
                    e.op == "call_module" or "rs_dtype" in e.meta for e in extra if e is not n):
                continue  # an assertion on what the result does not use
            keep |= extra
    graph = fx.Graph(owning_module=gm)
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n in keep:
            env[n] = graph.node_copy(n, lambda a: env[a])
    if isinstance(result, fx.Node):
        graph.output(env[result])
    else:
        graph.output({name: env[n] for name, n in result.items()})
    return graph, env


_ASSERTS = tuple(f for f in (torch._assert, getattr(torch, "_assert_async", None),
                             getattr(torch, "_check", None)) if f is not None)


def _ancestors(nodes: Sequence[fx.Node], stop: set[fx.Node]) -> set[fx.Node]:
    """``nodes`` and every node they read, not walking into ``stop``."""
    seen: set[fx.Node] = set()
    stack = [n for n in nodes if n not in stop]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(a for a in n.all_input_nodes if a not in stop)
    return seen


def _route_outputs(surgeon: Surgeon, mask: RouteMask) -> fx.Node | dict[str, fx.Node]:
    """The output node of a single-task mask, or ``{task: node}`` of a union mask."""
    if mask.tasks is None:
        return surgeon.outputs.node_of(mask.task)
    return {t: surgeon.outputs.node_of(t) for t in mask.tasks}


def _keep(groups: ChannelGroups, pruned: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return ~pruned[groups.labels[ids]]


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


def _rank(arg: Any) -> int:
    shape = arg.meta.get("rs_shape") if isinstance(arg, fx.Node) else None
    if not isinstance(shape, tuple):
        raise ExportError(f"no recorded shape for {arg}")
    return len(shape)


def _slice_tensor(t: torch.Tensor, axis: int, keep: np.ndarray) -> torch.Tensor:
    idx = torch.as_tensor(np.flatnonzero(keep), dtype=torch.long, device=t.device)
    return t.detach().index_select(axis, idx).clone()


def _fix_module_attributes(m: nn.Module) -> None:
    """Make a sliced module's size attributes agree with its new tensors."""
    if isinstance(m, nn.modules.conv._ConvNd):
        w = m.weight
        if m.transposed:
            m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
        else:
            m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        ref = m.weight if m.weight is not None else m.running_mean
        if ref is not None:
            m.num_features = ref.shape[0]


def route_cuts(surgeon: Surgeon, mask: RouteMask) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Per parameter/buffer path of the full model, the (axis, kept bool per index) it loses."""
    groups = surgeon.channel_groups
    cuts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (path, axis), ids in groups.state.params.items():
        keep = _keep(groups, mask.pruned, ids)
        if not keep.all():
            cuts.setdefault(path, []).append((axis, keep))
    return cuts


def prune_graph(surgeon: Surgeon, mask: RouteMask) -> fx.GraphModule:
    """The route of ``mask`` as a standalone GraphModule with sliced standard modules.

    A union mask (``mask.tasks`` set) gives one graph returning ``{task: output}``.
    """
    gm = surgeon.traced.eval_graph
    groups = surgeon.channel_groups
    st = groups.state
    graph, env = outputs_graph(gm, _route_outputs(surgeon, mask))
    used_modules = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    used_attrs = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    # 1. new tensors for every sliced parameter/buffer
    cuts = route_cuts(surgeon, mask)
    overrides: dict[str, Any] = {}
    for mod_path in used_modules:
        src = gm.get_submodule(mod_path)
        mine = {p: c for p, c in cuts.items() if p.rsplit(".", 1)[0] == mod_path}
        if not mine:
            continue
        # grouped/depthwise: channels per group from the original module (whole groups go)
        grouped = isinstance(src, nn.modules.conv._ConvNd) and src.groups > 1
        new = copy.deepcopy(src)
        for path, axes in mine.items():
            leaf = path.rsplit(".", 1)[1]
            t = getattr(src, leaf)
            for axis, keep in axes:
                t = _slice_tensor(t, axis, keep)
            if isinstance(getattr(src, leaf), nn.Parameter):
                setattr(new, leaf, nn.Parameter(t, requires_grad=getattr(src, leaf).requires_grad))
            else:
                new._buffers[leaf] = t
        if grouped:
            conv = cast(nn.modules.conv._ConvNd, src)
            new_conv = cast(nn.modules.conv._ConvNd, new)
            if conv.transposed:  # weight (in, out/groups, ...): whole groups of rows go
                new_conv.in_channels = new_conv.weight.shape[0]
                new_conv.groups = new_conv.in_channels // (conv.in_channels // conv.groups)
                new_conv.out_channels = new_conv.groups * (conv.out_channels // conv.groups)
            else:
                new_conv.out_channels = new_conv.weight.shape[0]
                new_conv.groups = new_conv.weight.shape[0] // (conv.out_channels // conv.groups)
                new_conv.in_channels = new_conv.groups * (conv.in_channels // conv.groups)
        else:
            _fix_module_attributes(new)
        overrides[mod_path] = new
    for path in used_attrs:
        if path in cuts:
            t = _attr(gm, path)
            for axis, keep in cuts[path]:
                t = _slice_tensor(t, axis, keep)
            orig = _attr(gm, path)
            overrides[path] = nn.Parameter(t, orig.requires_grad) if isinstance(
                orig, nn.Parameter) else t
    # 2. graph arguments that name channel counts
    for old, (kind, info) in st.rewrites.items():
        if old not in env:
            continue
        new_node = env[old]
        src_space = st.spaces.get(cast(fx.Node, old.args[0]))
        if not isinstance(src_space, Space):
            continue
        keep = _keep(groups, mask.pruned, src_space.ids)
        if keep.all():
            continue
        if kind in ("split", "chunk"):
            sizes, start = [], 0
            for n in info:
                sizes.append(int(keep[start:start + n].sum()))
                start += n
            dim = src_space.axis
            if new_node.op == "call_method":
                new_node.target = "split"
            else:
                new_node.target = torch.split
            new_node.args = (new_node.args[0], sizes, dim)
            new_node.kwargs = {}
        elif kind == "slice":
            dim, start, stop = info
            new_start = int(keep[:start].sum())
            new_stop = new_start + int(keep[start:stop].sum())
            idx = new_node.args[1]
            items = list(idx) if isinstance(idx, tuple) else [idx]
            pos = _slice_position(items, dim)
            items[pos] = slice(new_start, new_stop, None)
            new_node.args = (new_node.args[0], tuple(items) if isinstance(idx, tuple)
                             else items[0])
    # 3. functional grouped (and depthwise) convs name their group count in the graph
    for old, info in st.layers.items():
        if old not in env or old.op != "call_function" or info.get("groups", 1) == 1:
            continue
        keep = _keep(groups, mask.pruned, info["in"])
        if keep.all():
            continue
        _set_arg(env[old], 6, "groups", int(keep.sum()) // info.get("group_in", 1))
    route = _build(graph, gm, overrides, f"Route_{_ident(mask.task)}")
    return route.eval()


def _set_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    if name in node.kwargs or len(node.args) <= index:
        node.kwargs = {**node.kwargs, name: value}
    else:
        node.args = tuple(value if i == index else a for i, a in enumerate(node.args))


def _slice_position(items: list[Any], dim: int) -> int:
    """Index in a getitem tuple of the entry that indexes input dim ``dim``."""
    in_dim = 0
    for i, it in enumerate(items):
        if it is None:
            continue
        if it is Ellipsis:
            raise ExportError("channel slicing after an Ellipsis cannot be rewritten")
        if in_dim == dim:
            return i
        in_dim += 1
    raise ExportError(f"no index entry for dim {dim}")


def _ident(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


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
    """
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


def _calibrated(route: fx.GraphModule, loader: Iterable[Any] | None, batches: int,
                fit: Surgeon | None = None) -> fx.GraphModule:
    if loader is None:
        return route
    if fit is not None:
        from routesurgeon.reconstruct import reconstruct

        return cast(fx.GraphModule, reconstruct(route, fit, loader, batches))
    from routesurgeon.recalibrate import recalibrate

    return cast(fx.GraphModule, recalibrate(route, loader, batches))
