"""Channel rules for ops that join or cut tensors: concat, split, chunk, getitem."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from routesurgeon.channels.elementwise_rules import elementwise
from routesurgeon.channels.registry import (
    _arg,
    _describe,
    _fix_out,
    _ignore,
    _norm_axis,
    _rank,
    opaque,
    register_channel_rule,
)
from routesurgeon.channels.state import AnalysisState, Space
from routesurgeon.shapes import shape_of


# ---------------------------------------------------------------------------------------------
# Concat, split, chunk, getitem
# ---------------------------------------------------------------------------------------------
def _cat(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
    out = shape_of(node)
    if not isinstance(tensors, (list, tuple)) or out is None or not isinstance(dim, int):
        return opaque(st, node)
    dim = _norm_axis(dim, len(out))
    spaces = [st.space(t) for t in tensors]
    tracked_axes = {s.axis for s in spaces if s is not None}
    if not tracked_axes:
        st.spaces[node] = None
        return
    if tracked_axes == {dim}:
        parts = []
        for t, s in zip(tensors, spaces):
            if s is None:
                shp = shape_of(t) if isinstance(t, fx.Node) else None
                if shp is None:
                    return opaque(st, node)
                fresh = st.new_ids(shp[dim])
                st.fix(fresh, f"untracked input of {_describe(node)}")
                parts.append(fresh)
            else:
                parts.append(s.ids)
        st.spaces[node] = Space(dim, np.concatenate(parts))
        return
    elementwise(st, node)  # concat along another dim: the channel positions coincide


register_channel_rule(torch.cat, torch.concat, torch.concatenate)(_cat)


def _split(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    src = node.args[0]
    s = st.space(src)
    rank = _rank(src)
    outs = node.meta.get("rs_shape")
    is_chunk = (node.target in ("chunk",) or node.target is torch.chunk)
    dim = _arg(node, 2, "dim", 0)
    if s is None or rank is None or not isinstance(outs, list) or not isinstance(dim, int):
        if s is not None:
            return _fix_out(st, node, s, "split")
        st.spaces[node] = None
        return
    dim = _norm_axis(dim, rank)
    if dim != s.axis:
        st.spaces[node] = [Space(s.axis, s.ids) for _ in outs]
        return
    parts, start = [], 0
    for shp in outs:
        n = shp[dim]
        parts.append(Space(dim, s.ids[start:start + n]))
        start += n
    st.spaces[node] = parts
    st.rewrites[node] = ("chunk" if is_chunk else "split", [len(p) for p in parts])


register_channel_rule(torch.split, torch.chunk, "split", "chunk")(_split)


def _getitem(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    src, idx = node.args[0], node.args[1]
    if not isinstance(src, fx.Node):
        return _ignore(st, node)
    container = st.spaces.get(src)
    if isinstance(container, list):
        st.spaces[node] = container[idx] if isinstance(idx, int) else None
        return
    s = st.space(src)
    if s is None:
        st.spaces[node] = None
        return
    ins = shape_of(src)
    assert ins is not None
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(i, fx.Node) or (i is Ellipsis and items.count(Ellipsis) > 1) for i in items):
        return _fix_out(st, node, s, "indexing with traced values")
    if Ellipsis in items:
        k = items.index(Ellipsis)
        n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:k] + [slice(None)] * (len(ins) - n_real) + items[k + 1:]
    in_dim = out_dim = 0
    new_axis = None
    for it in items:
        if it is None:
            out_dim += 1
            continue
        if in_dim == s.axis:
            if isinstance(it, slice) and it.step in (None, 1):
                start, stop, _step = it.indices(len(s))
                if (start, stop) != (0, len(s)):
                    st.rewrites[node] = ("slice", (in_dim, start, stop))
                new_axis = (out_dim, s.ids[start:stop])
            else:
                return _fix_out(st, node, s, "indexing on the channel axis")
        if isinstance(it, int):
            in_dim += 1
            continue
        if not isinstance(it, slice):
            return _fix_out(st, node, s, "advanced indexing")
        in_dim += 1
        out_dim += 1
    if new_axis is None:  # channel dim beyond the index: untouched
        new_axis = (out_dim + (s.axis - in_dim), s.ids)
    st.spaces[node] = Space(new_axis[0], new_axis[1])


register_channel_rule(operator.getitem)(_getitem)
