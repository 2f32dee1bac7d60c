"""Channel rules for elementwise ops: arithmetic with broadcasting, activations, casts.

Inputs whose channel axes line up are coupled; a per-channel parameter (directly or through a chain
of singleton-dim views such as ``gamma.view(1, -1, 1, 1)``) is sliced with the channels.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from routesurgeon.channels.registry import (
    _describe,
    _ignore,
    _param_shape,
    identity,
    register_channel_rule,
    rule_for,
)
from routesurgeon.channels.state import AnalysisState, Space
from routesurgeon.shapes import shape_of


# ---------------------------------------------------------------------------------------------
# Elementwise with broadcasting
# ---------------------------------------------------------------------------------------------
def elementwise(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    out = shape_of(node)
    if out is None:
        _ignore(st, node)
        return
    r = len(out)
    tensors = [a for a in _flat_args(node) if isinstance(a, fx.Node) and shape_of(a) is not None]
    axes = set()
    for a in tensors:
        s = st.space(a)
        if s is not None:
            axes.add(s.axis + r - len(shape_of(a)))  # type: ignore[arg-type]
    if len(axes) != 1:
        if len(axes) > 1:
            for a in tensors:
                st.fix_node(a, f"channel axes disagree in {_describe(node)}", consumer=node)
        st.spaces[node] = None
        return _pin_whole_uses(st, node, tensors, set())
    ax = axes.pop()
    out_ids: np.ndarray | None = None
    others: list[tuple[fx.Node, int]] = []
    for a in tensors:
        shp = shape_of(a)
        assert shp is not None
        ia = ax - (r - len(shp))
        s = st.space(a)
        if ia < 0 or (shp[ia] == 1 and out[ax] != 1):
            # broadcast along the channel axis: not coupled, and its one channel feeds them all
            if s is not None:
                st.fix_node(a, f"one channel broadcast over many in {_describe(node)}",
                            consumer=node)
            continue
        if s is not None and s.axis == ia:
            if out_ids is None:
                out_ids = s.ids
            else:
                st.couple(out_ids, s.ids)
        else:
            others.append((a, ia))
    if out_ids is None:  # every tracked input is broadcast: the output's channels are new
        st.spaces[node] = None
        return _pin_whole_uses(st, node, tensors, set())
    sliced: set[fx.Node] = set()
    for a, ia in others:
        if a.op == "get_attr":  # a parameter or buffer per channel: slice it with the channels
            st.slice_param(str(a.target), ia, out_ids)
            sliced.add(a)
            continue
        found = _param_chain(st, a, ia, len(out_ids))
        if found is None:
            st.fix(out_ids, f"combined with an untracked tensor in {_describe(node)}")
        else:  # e.g. ``gamma.view(1, -1, 1, 1)``: the chain only adds singleton dims
            st.slice_param(found[0], found[1], out_ids)
            sliced.add(a)
    st.spaces[node] = Space(ax, out_ids)
    _pin_whole_uses(st, node, tensors, sliced)


def _pin_whole_uses(
    st: AnalysisState, node: fx.Node, tensors: list[fx.Node], sliced: set[fx.Node]
) -> None:
    """Parameters ``node`` uses whole (not sliced with channels) must never be sliced elsewhere."""
    for a in tensors:
        if a in sliced or st.space(a) is not None:
            continue
        root = a
        while root.op != "get_attr" and root.args and isinstance(root.args[0], fx.Node) and (
                (root.op == "call_method" and root.target in _CHAIN_METHODS)
                or (root.op == "call_function" and root.target in _CHAIN_FUNCS)):
            root = root.args[0]
        if root.op == "get_attr":
            st.pin(str(root.target), f"parameter {root.target!r} is also used whole by "
                   f"{_describe(node)}")


_CHAIN_METHODS = ("view", "reshape", "unsqueeze", "squeeze")
_CHAIN_FUNCS = (torch.reshape, torch.unsqueeze, torch.squeeze, operator.getitem)


def _chain_step_ok(node: fx.Node) -> bool:
    """True for a view/reshape/unsqueeze/squeeze/getitem whose arguments name no channel count.

    Sizes may only be ``-1`` or ``1`` (they stay right when the channel dim shrinks); indices only
    ``None``, ``...`` or ``:``; dims only literal ints.
    """
    target = node.target
    if (node.op == "call_method" and target in ("view", "reshape")) or target is torch.reshape:
        sizes = list(node.args[1:]) + list(node.kwargs.values())
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = list(sizes[0])
        return bool(sizes) and all(isinstance(v, int) and v in (-1, 1) for v in sizes)
    if (node.op == "call_method" and target in ("unsqueeze", "squeeze")) or target in (
            torch.unsqueeze, torch.squeeze):
        dims = list(node.args[1:]) + list(node.kwargs.values())
        if len(dims) != 1 or not isinstance(dims[0], int):
            return False
        if target in ("squeeze", torch.squeeze):  # a size-1 dim, never the channels (they
            # could shrink to one channel after pruning and be squeezed away)
            shp = shape_of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            return shp is not None and -len(shp) <= dims[0] < len(shp) and shp[dims[0]] == 1
        return True
    if target is operator.getitem and len(node.args) == 2:
        idx = node.args[1]
        items = list(idx) if isinstance(idx, tuple) else [idx]
        return all(i is None or i is Ellipsis or i == slice(None) for i in items)
    return False


def _param_chain(
    st: AnalysisState, node: fx.Node, axis: int, n: int
) -> tuple[str, int] | None:
    """``(path, axis)`` when ``node`` is a per-channel parameter reshaped only by singleton dims.

    ``node`` must be reached from a ``get_attr`` through view/reshape/unsqueeze/squeeze/getitem
    steps (each used once, none naming a channel count); every tensor on the way must have one
    dim of size ``n`` (the channels) and size 1 elsewhere, so the steps only move the channel dim
    and slicing the parameter along it gives exactly the sliced view. ``None`` otherwise.
    """
    shape = shape_of(node)
    if shape is None or not _one_channel_dim(shape, n) or shape[axis] != n:
        return None
    cur = node
    while cur.op != "get_attr":
        if not _is_chain_step(cur) or len(cur.users) != 1 or not isinstance(cur.args[0], fx.Node):
            return None
        cur = cur.args[0]
        shp = shape_of(cur) if cur.op != "get_attr" else _param_shape(st, str(cur.target))
        if shp is None or not _one_channel_dim(shp, n):
            return None
    # every other use of the parameter must be one whose channels are tracked too
    if not all(_is_chain_step(u) or rule_for(u, st.gm)[0] is elementwise for u in cur.users):
        return None
    p_shape = _param_shape(st, str(cur.target))
    assert p_shape is not None
    return str(cur.target), p_shape.index(n)


def _one_channel_dim(shape: tuple[int, ...], n: int) -> bool:
    return n > 1 and shape.count(n) == 1 and all(d in (1, n) for d in shape)


def _is_chain_step(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _CHAIN_METHODS and _chain_step_ok(node)
    return node.op == "call_function" and node.target in _CHAIN_FUNCS and _chain_step_ok(node)


def _flat_args(node: fx.Node) -> list[Any]:
    out: list[Any] = []
    for a in [*node.args, *node.kwargs.values()]:
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out


_ELEMENTWISE_FUNCS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    operator.isub, operator.itruediv, operator.neg, operator.floordiv,
    torch.add, torch.sub, torch.mul, torch.div, torch.where, torch.maximum, torch.minimum,
    torch.clamp, torch.clip, torch.lerp, torch.addcmul,
]
register_channel_rule(*_ELEMENTWISE_FUNCS)(elementwise)
register_channel_rule(
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "addcmul", "lerp", "where",
    "maximum", "minimum", "clamp", "clamp_", "clip", "__add__", "__mul__", "__radd__", "__rmul__",
)(elementwise)

_UNARY_FUNCS = [
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.hardtanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, F.logsigmoid, F.softsign, F.threshold,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.sqrt, torch.rsqrt,
    torch.neg, torch.square, torch.erf, torch.log, torch.sign, torch.nan_to_num,
    torch.nn.functional.relu_, operator.pos, torch.pow, operator.pow,
]
register_channel_rule(*_UNARY_FUNCS)(elementwise)
register_channel_rule(
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "sqrt", "rsqrt",
    "neg", "square", "erf", "log", "sign", "pow", "gelu", "silu", "hardswish", "float", "half",
    "double", "to", "type", "type_as", "contiguous", "clone", "detach", "requires_grad_",
    "nan_to_num", "__pow__",
)(elementwise)
register_channel_rule(
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.LogSigmoid,
    nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.Hardshrink, nn.Softshrink,
)(identity)
register_channel_rule(
    "size", "dim", "numel", "ndimension", "get_device", getattr, torch.numel, len,
)(_ignore)
