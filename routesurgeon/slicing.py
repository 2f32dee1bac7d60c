"""Slicing a route out of the traced model: every parameter cut along the channels the route
drops, and the few graph arguments that name channel counts (split sizes, channel slices, group
counts) rewritten (see ``prune_graph``; ``routesurgeon.export`` verifies the result).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from routesurgeon.channels import Space
from routesurgeon.errors import ExportError
from routesurgeon.subgraph import _attr, _build, _keep, _route_outputs, outputs_graph

if TYPE_CHECKING:
    from routesurgeon.routes import RouteMask
    from routesurgeon.surgeon import Surgeon

__all__ = ["prune_graph", "route_cuts"]


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
