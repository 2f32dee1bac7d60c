"""Per-op channel rules: one small handler per op kind, looked up by the op.

A rule reads its inputs' channel spaces from the state and writes its output's space. Ops without
a rule are *opaque*: every channel they touch is fixed (never pruned) and their output is not
tracked. Users extend the registry with ``register_channel_rule``::

    @register_channel_rule(MyGatedAct)          # module type (exact type match)
    def _(st: AnalysisState, node: fx.Node, module: nn.Module) -> None:
        identity(st, node)

Functions are keyed by the callable, ``Tensor`` methods by their name.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from routesurgeon.channels.state import AnalysisState, Space
from routesurgeon.shapes import shape_of

__all__ = ["identity", "opaque", "register_channel_rule", "rule_for"]

Rule = Callable[..., None]
_MODULE_RULES: dict[type, Rule] = {}
_FUNCTION_RULES: dict[Any, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}


def register_channel_rule(*keys: Any) -> Callable[[Rule], Rule]:
    """Register a rule for module types (exact type), functions, or method names (strings).

    Module rules are called as ``rule(state, node, module)``; the others as ``rule(state, node)``.
    """

    def deco(fn: Rule) -> Rule:
        for key in keys:
            if isinstance(key, str):
                _METHOD_RULES[key] = fn
            elif isinstance(key, type) and issubclass(key, nn.Module):
                _MODULE_RULES[key] = fn
            else:
                _FUNCTION_RULES[key] = fn
        return fn

    return deco


def rule_for(node: fx.Node, gm: fx.GraphModule) -> tuple[Rule | None, tuple[Any, ...]]:
    """The rule for ``node`` and the extra arguments it takes (the module, for modules)."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return _MODULE_RULES.get(type(module)), (module,)
    if node.op == "call_function":
        return _FUNCTION_RULES.get(node.target), ()
    if node.op == "call_method":
        return _METHOD_RULES.get(str(node.target)), ()
    return None, ()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _rank(arg: Any) -> int | None:
    s = shape_of(arg) if isinstance(arg, fx.Node) else None
    return None if s is None else len(s)


def _describe(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return f"{node.op} {name} at node {node.name!r}"


def opaque(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    """Unknown channel semantics: fix every channel the op touches; output untracked."""
    reason = f"unknown channel semantics: {_describe(node)}"
    for arg in node.all_input_nodes:
        st.fix_node(arg, reason, consumer=node)
    st.spaces[node] = None


def identity(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    """Channel-wise op on the first argument (activations, dropout, casts, BN without params)."""
    src = node.args[0] if node.args else None
    s = st.space(src)
    out = shape_of(node)
    if s is None or out is None or len(out) != _rank(src) or out[s.axis] != len(s):
        if s is not None:
            st.fix(s.ids, f"shape changed by {_describe(node)}")
            st.consume(node, s.ids)
        st.spaces[node] = None
        return
    st.spaces[node] = s


def _ignore(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    """Ops that only read metadata (size, dim, shape): no channel effect."""
    st.spaces[node] = None


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


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


# ---------------------------------------------------------------------------------------------
# Spatial ops on NC... tensors: channels pass through when the channel axis is 1
# ---------------------------------------------------------------------------------------------
def spatial(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    s = st.space(node.args[0] if node.args else node.kwargs.get("input"))
    if s is not None and s.axis != 1:
        st.fix(s.ids, f"spatial op over the channel axis: {_describe(node)}")
        st.consume(node, s.ids)
        st.spaces[node] = None
        return
    identity(st, node)


register_channel_rule(
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingBilinear2d,
    nn.UpsamplingNearest2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
    nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
    nn.LPPool2d,
)(spatial)
register_channel_rule(
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample,
    torch.nn.functional.upsample_bilinear, torch.nn.functional.upsample_nearest,
)(spatial)


def _pad(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    pad = _arg(node, 1, "pad")
    s = st.space(node.args[0])
    rank = _rank(node.args[0])
    if s is not None and rank is not None and isinstance(pad, (list, tuple)):
        touched = range(rank - len(pad) // 2, rank)
        if s.axis in touched:
            st.fix(s.ids, f"padding along the channel axis: {_describe(node)}")
            st.consume(node, s.ids)
            st.spaces[node] = None
            return
        identity(st, node)
        return
    opaque(st, node)


register_channel_rule(F.pad, "pad")(_pad)


# ---------------------------------------------------------------------------------------------
# Reductions and softmax
# ---------------------------------------------------------------------------------------------
def reduction(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    src = node.args[0]
    s = st.space(src)
    rank = _rank(src)
    dim = _arg(node, 1, "dim")
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if s is None or rank is None:
        st.spaces[node] = None
        return
    if dim is None:
        dims = list(range(rank))
    else:
        dims = [_norm_axis(d, rank) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
    if not all(isinstance(d, int) for d in dims) or s.axis in dims:
        st.fix(s.ids, f"reduction over the channel axis: {_describe(node)}")
        st.consume(node, s.ids)
        st.spaces[node] = None
        return
    axis = s.axis if keepdim else s.axis - sum(d < s.axis for d in dims)
    out = shape_of(node)
    if out is None or out[axis] != len(s):
        opaque(st, node)
        return
    st.spaces[node] = Space(axis, s.ids)


register_channel_rule(
    torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.norm,
    "mean", "sum", "amax", "amin", "std", "var",
)(reduction)


def _softmax(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    s = st.space(node.args[0])
    rank = _rank(node.args[0])
    dim = _arg(node, 1, "dim")
    if s is not None and rank is not None and isinstance(dim, int):
        if _norm_axis(dim, rank) == s.axis:
            st.fix(s.ids, f"softmax over channels: {_describe(node)}")
            st.consume(node, s.ids)
            st.spaces[node] = None
            return
        identity(st, node)
        return
    opaque(st, node)


register_channel_rule(F.softmax, F.log_softmax, torch.softmax, "softmax", "log_softmax")(_softmax)


# ---------------------------------------------------------------------------------------------
# Layout: view / reshape / flatten / permute / transpose / unsqueeze / squeeze
# ---------------------------------------------------------------------------------------------
def _merge_groups(
    ins: tuple[int, ...], outs: tuple[int, ...]
) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of consecutive input dims with runs of output dims of equal product."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ins) and j < len(outs):
        gi, gj, pi, pj = [i], [j], ins[i], outs[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                if i >= len(ins):
                    return None
                pi, i = pi * ins[i], i + 1
                gi.append(i - 1)
            else:
                if j >= len(outs):
                    return None
                pj, j = pj * outs[j], j + 1
                gj.append(j - 1)
        groups.append((gi, gj))
    if not groups:
        return None
    if any(ins[k] != 1 for k in range(i, len(ins))) or any(
        outs[k] != 1 for k in range(j, len(outs))
    ):
        return None
    groups[-1][0].extend(range(i, len(ins)))
    groups[-1][1].extend(range(j, len(outs)))
    return groups


def reshape(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    src = node.args[0]
    s = st.space(src)
    ins, outs = shape_of(src), shape_of(node)
    if node in st.pending:  # the end of a channel shuffle recognised at its first view
        st.spaces[node] = st.pending.pop(node)
        return
    if s is None or ins is None or outs is None:
        st.spaces[node] = None
        return
    if _channel_shuffle(st, node, s, ins, outs):
        return
    groups = _merge_groups(ins, outs)
    where = None if groups is None else next((g for g in groups if s.axis in g[0]), None)
    if where is None:
        return _fix_out(st, node, s, "reshape that does not keep channels together")
    gi, gj = where
    nontrivial_in = [d for d in gi if ins[d] != 1]
    if len(gj) != 1:
        # channels split across several output dims (e.g. attention heads)
        only = [d for d in gj if outs[d] != 1]
        if nontrivial_in == [s.axis] and len(only) == 1 and outs[only[0]] == ins[s.axis]:
            out_axis = only[0]
        else:
            return _fix_out(st, node, s, "reshape that splits the channel axis")
        st.spaces[node] = Space(out_axis, s.ids)
        return
    out_axis = gj[0]
    if _literal_dim(node, out_axis):
        return _fix_out(st, node, s, "reshape with a literal size on the channel dim")
    block = [ins[d] for d in gi]
    pos = gi.index(s.axis)
    shape = [1] * len(gi)
    shape[pos] = len(s)
    ids = np.broadcast_to(s.ids.reshape(shape), block).reshape(-1)
    st.spaces[node] = Space(out_axis, np.ascontiguousarray(ids))


def _is_flatten(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten")


def _sizes(node: fx.Node) -> list[Any]:
    """The target sizes of a view/reshape node, as written in the graph."""
    sizes = list(node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    if "shape" in node.kwargs:
        sizes = list(node.kwargs["shape"])
    return sizes


def _literal_dim(node: fx.Node, out_axis: int) -> bool:
    if _is_flatten(node):
        return False
    sizes = _sizes(node)
    if out_axis >= len(sizes):
        return False
    v = sizes[out_axis]
    return isinstance(v, int) and v != -1


def _recomputed(v: Any) -> bool:
    """A size export need not rewrite: ``-1`` or a value the graph computes (from a shape)."""
    return isinstance(v, fx.Node) or v == -1


def _channel_shuffle(
    st: AnalysisState, node: fx.Node, s: Space, ins: tuple[int, ...], outs: tuple[int, ...]
) -> bool:
    """``view(n, g, C/g, ...)`` -> ``transpose(1, 2)`` -> ``reshape(n, C, ...)``, exactly.

    A permutation of the channels: output position ``i*g + j`` holds input channel ``j*C/g + i``.
    It stays one after pruning if channel ``i`` is removed from every group ``j`` at once (so the
    ``g`` groups keep equal sizes): those ``g`` channels are coupled. The group count must be a
    literal (it must not change), the per-group size and the final channel count recomputed.
    Returns False (the caller refuses as before) unless the whole pattern matches.
    """
    a = s.axis
    if (node.op == "call_function" and node.target is not torch.reshape) or _is_flatten(node):
        return False
    if len(outs) != len(ins) + 1 or outs[:a] != ins[:a] or outs[a + 2:] != ins[a + 1:]:
        return False
    g, m = outs[a], outs[a + 1]
    sizes = _sizes(node)
    if g < 2 or g * m != ins[a] or len(sizes) != len(outs) or type(sizes[a]) is not int:
        return False
    if sizes[a] != g or not _recomputed(sizes[a + 1]) or len(node.users) != 1:
        return False
    t = next(iter(node.users))
    if not _swaps(t, a, len(outs)) or len(t.users) != 1:
        return False
    r = next(iter(t.users))
    if shape_of(r) != ins or rule_for(r, st.gm)[0] is not reshape or r.args[0] is not t:
        return False
    if _is_flatten(r):
        dims = [_arg(r, 1, "start_dim", 0), _arg(r, 2, "end_dim", -1)]
        if [_norm_axis(d, len(outs)) if isinstance(d, int) else None for d in dims] != [a, a + 1]:
            return False
    elif len(_sizes(r)) != len(ins) or not _recomputed(_sizes(r)[a]):
        return False
    grid = s.ids.reshape(g, m)  # grid[j, i]: channel i of group j
    for j in range(1, g):
        st.couple(grid[0], grid[j])
    st.pending[r] = Space(a, np.ascontiguousarray(grid.T.reshape(-1)))
    st.spaces[node] = None  # the view and the transpose feed only the final reshape
    return True


def _swaps(t: fx.Node, a: int, rank: int) -> bool:
    """True if ``t`` is a transpose/permute exchanging exactly dims ``a`` and ``a + 1``."""
    if (t.op == "call_method" and t.target in ("transpose", "swapaxes")) or t.target in (
            torch.transpose, torch.swapaxes):
        d = [_arg(t, 1, "dim0"), _arg(t, 2, "dim1")]
        return all(isinstance(x, int) for x in d) and sorted(
            _norm_axis(x, rank) for x in d) == [a, a + 1]
    if (t.op == "call_method" and t.target == "permute") or t.target is torch.permute:
        dims = _sizes(t) if "dims" not in t.kwargs else list(t.kwargs["dims"])
        want = list(range(rank))
        want[a], want[a + 1] = a + 1, a
        return [_norm_axis(x, rank) if isinstance(x, int) else None for x in dims] == want
    return False


def _fix_out(st: AnalysisState, node: fx.Node, s: Space, why: str) -> None:
    st.fix(s.ids, f"{why}: {_describe(node)}")
    st.consume(node, s.ids)
    st.spaces[node] = None


register_channel_rule(
    "view", "reshape", "flatten", torch.reshape, torch.flatten, nn.Flatten,
)(reshape)


def _permute(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    src = node.args[0]
    s = st.space(src)
    rank = _rank(src)
    if s is None or rank is None:
        st.spaces[node] = None
        return
    dims = list(node.args[1:])
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    if "dims" in node.kwargs:
        dims = list(node.kwargs["dims"])
    if not all(isinstance(d, int) for d in dims):
        return _fix_out(st, node, s, "permute with traced dims")
    dims = [_norm_axis(d, rank) for d in dims]
    st.spaces[node] = Space(dims.index(s.axis), s.ids)


def _transpose(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    src = node.args[0]
    s = st.space(src)
    rank = _rank(src)
    if s is None or rank is None:
        st.spaces[node] = None
        return
    d0, d1 = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
    if not (isinstance(d0, int) and isinstance(d1, int)):
        return _fix_out(st, node, s, "transpose with traced dims")
    d0, d1 = _norm_axis(d0, rank), _norm_axis(d1, rank)
    axis = d1 if s.axis == d0 else d0 if s.axis == d1 else s.axis
    st.spaces[node] = Space(axis, s.ids)


def _unsqueeze(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    src = node.args[0]
    s = st.space(src)
    out = shape_of(node)
    d = _arg(node, 1, "dim")
    if s is None or out is None or not isinstance(d, int):
        return opaque(st, node) if s is not None else _ignore(st, node)
    d = _norm_axis(d, len(out))
    st.spaces[node] = Space(s.axis + (1 if d <= s.axis else 0), s.ids)


def _squeeze(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    src = node.args[0]
    s = st.space(src)
    ins, out = shape_of(src), shape_of(node)
    if s is None or ins is None or out is None:
        st.spaces[node] = None
        return
    if ins[s.axis] == 1:
        return _fix_out(st, node, s, "squeeze of a one-channel axis")
    removed = [i for i in range(len(ins)) if ins[i] == 1]
    d = _arg(node, 1, "dim")
    if isinstance(d, int):
        removed = [_norm_axis(d, len(ins))] if ins[_norm_axis(d, len(ins))] == 1 else []
    elif isinstance(d, (list, tuple)):
        removed = [_norm_axis(x, len(ins)) for x in d if ins[_norm_axis(x, len(ins))] == 1]
    axis = s.axis - sum(r < s.axis for r in removed)
    if axis >= len(out) or out[axis] != len(s):
        return _fix_out(st, node, s, "squeeze")
    st.spaces[node] = Space(axis, s.ids)


register_channel_rule(torch.permute, "permute")(_permute)
register_channel_rule(torch.transpose, "transpose", "swapaxes", torch.swapaxes)(_transpose)
register_channel_rule(torch.unsqueeze, "unsqueeze")(_unsqueeze)
register_channel_rule(torch.squeeze, "squeeze")(_squeeze)


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
                start, stop, _ = it.indices(len(s))
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


# ---------------------------------------------------------------------------------------------
# Layers with parameters
# ---------------------------------------------------------------------------------------------
def _input_ids(st: AnalysisState, arg: Any, axis: int, n: int, node: fx.Node) -> np.ndarray:
    """Channel ids of a layer input along ``axis``; fresh fixed ids when untracked."""
    s = st.space(arg)
    rank = _rank(arg)
    if s is not None and rank is not None and s.axis == _norm_axis(axis, rank) and len(s) == n:
        return s.ids
    if s is not None:
        st.fix(s.ids, f"layer input on another axis: {_describe(node)}")
        st.consume(node, s.ids)
    fresh = st.new_ids(n)
    st.fix(fresh, f"untracked input of {_describe(node)}")
    return fresh


def _conv_like(
    st: AnalysisState, node: fx.Node, weight: str, bias: str | None, groups: int,
    transposed: bool,
) -> None:
    x = node.args[0]
    out = shape_of(node)
    w_shape = _param_shape(st, weight)
    if out is None or w_shape is None:
        return opaque(st, node)
    c_out = out[1]
    c_in = w_shape[0] if transposed else w_shape[1] * groups
    in_ids = _input_ids(st, x, 1, c_in, node)
    out_ids = st.new_ids(c_out)
    st.consume(node, in_ids)
    w_in_axis, w_out_axis = (0, 1) if transposed else (1, 0)
    if groups == 1:
        st.slice_param(weight, w_out_axis, out_ids)
        st.slice_param(weight, w_in_axis, in_ids)
        st.mask_input(node, 0, Space(1, in_ids))
    elif not transposed and groups == c_in and c_out % c_in == 0:
        mult = c_out // c_in
        st.couple(np.repeat(in_ids, mult), out_ids)  # depthwise: channel c feeds outputs c*m..
        st.slice_param(weight, 0, out_ids)
    elif not transposed and c_in % groups == 0 and c_out % groups == 0:
        _couple_whole_groups(st, in_ids, out_ids, groups)
        st.slice_param(weight, 0, out_ids)  # the weight's in-axis holds one group: never cut
        st.mask_input(node, 0, Space(1, in_ids))
    else:
        why = f"grouped convolution (groups={groups}) {_describe(node)}"
        st.fix(in_ids, why)
        st.fix(out_ids, why)
    if bias is not None:
        st.slice_param(bias, 0, out_ids)
    st.layers[node] = {"kind": "conv", "weight": weight, "in": in_ids, "out": out_ids,
                       "groups": groups, "group_in": c_in // groups}
    st.spaces[node] = Space(1, out_ids)


def _couple_whole_groups(
    st: AnalysisState, in_ids: np.ndarray, out_ids: np.ndarray, groups: int
) -> None:
    """Grouped conv (1 < groups < channels): a group's in- and out-channels go or stay together.

    Removing whole groups keeps every remaining group's weights and inputs intact; export lowers
    ``groups`` to the number of groups kept.
    """
    a, b = len(in_ids) // groups, len(out_ids) // groups
    for j in range(groups):
        members = np.concatenate([in_ids[j * a:(j + 1) * a], out_ids[j * b:(j + 1) * b]])
        st.couple(members[:-1], members[1:])


def _param_shape(st: AnalysisState, path: str) -> tuple[int, ...] | None:
    try:
        t = st.gm.get_parameter(path)
    except AttributeError:
        try:
            t = st.gm.get_buffer(path)
        except AttributeError:
            return None
    return tuple(t.shape)


@register_channel_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_module(st: AnalysisState, node: fx.Node, m: nn.Module) -> None:
    assert isinstance(m, nn.modules.conv._ConvNd)
    p = str(node.target)
    if isinstance(m.padding, str) and m.padding != "valid" and m.padding_mode != "zeros":
        return opaque(st, node)
    _conv_like(st, node, f"{p}.weight", f"{p}.bias" if m.bias is not None else None,
               m.groups, transposed=False)


@register_channel_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _convt_module(st: AnalysisState, node: fx.Node, m: nn.Module) -> None:
    assert isinstance(m, nn.modules.conv._ConvTransposeNd)
    p = str(node.target)
    if m.groups != 1 or len(node.args) > 1 or node.kwargs:
        return opaque(st, node)
    _conv_like(st, node, f"{p}.weight", f"{p}.bias" if m.bias is not None else None,
               1, transposed=True)


@register_channel_rule(F.conv1d, F.conv2d, F.conv3d)
def _conv_function(st: AnalysisState, node: fx.Node) -> None:
    w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    groups = _arg(node, 6, "groups", 1)
    if not (isinstance(w, fx.Node) and w.op == "get_attr") or not isinstance(groups, int):
        return opaque(st, node)
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return opaque(st, node)
    _conv_like(st, node, str(w.target), str(b.target) if b is not None else None, groups,
               transposed=False)


def _linear_like(st: AnalysisState, node: fx.Node, weight: str, bias: str | None) -> None:
    x = node.args[0]
    out = shape_of(node)
    w_shape = _param_shape(st, weight)
    if out is None or w_shape is None:
        return opaque(st, node)
    in_ids = _input_ids(st, x, -1, w_shape[1], node)
    out_ids = st.new_ids(w_shape[0])
    st.consume(node, in_ids)
    st.slice_param(weight, 0, out_ids)
    st.slice_param(weight, 1, in_ids)
    if bias is not None:
        st.slice_param(bias, 0, out_ids)
    rank = len(out)
    st.mask_input(node, 0, Space(rank - 1, in_ids))
    st.layers[node] = {"kind": "linear", "weight": weight, "in": in_ids, "out": out_ids,
                       "groups": 1}
    st.spaces[node] = Space(rank - 1, out_ids)


@register_channel_rule(nn.Linear)
def _linear_module(st: AnalysisState, node: fx.Node, m: nn.Module) -> None:
    p = str(node.target)
    _linear_like(st, node, f"{p}.weight", f"{p}.bias" if m.bias is not None else None)


@register_channel_rule(F.linear)
def _linear_function(st: AnalysisState, node: fx.Node) -> None:
    w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return opaque(st, node)
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return opaque(st, node)
    _linear_like(st, node, str(w.target), str(b.target) if b is not None else None)


def _per_channel_params(st: AnalysisState, node: fx.Node, paths: list[str | None]) -> None:
    s = st.space(node.args[0])
    identity(st, node)
    out = st.space(node)
    if s is None or out is None:
        if s is None and any(p is not None for p in paths):
            st.spaces[node] = None
        return
    if out.axis != 1:
        return _fix_out(st, node, s, "per-channel norm on a non-channel axis")
    for p in paths:
        if p is not None:
            st.slice_param(p, 0, out.ids)
    st.layers[node] = {"kind": "norm", "in": out.ids, "out": out.ids, "groups": 1}


@register_channel_rule(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d,
)
def _batchnorm_module(st: AnalysisState, node: fx.Node, m: nn.Module) -> None:
    p = str(node.target)
    names = ["weight", "bias", "running_mean", "running_var"]
    paths = [f"{p}.{n}" if getattr(m, n, None) is not None else None for n in names]
    _per_channel_params(st, node, paths)


@register_channel_rule(F.batch_norm, F.instance_norm)
def _batchnorm_function(st: AnalysisState, node: fx.Node) -> None:
    args = [_arg(node, i, n) for i, n in
            [(1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")]]
    if any(a is not None and not (isinstance(a, fx.Node) and a.op == "get_attr") for a in args):
        return opaque(st, node)
    _per_channel_params(st, node, [str(a.target) if a is not None else None for a in args])


def _normalizes_channels(st: AnalysisState, node: fx.Node, dims: list[int]) -> None:
    """Norms with statistics over ``dims``: channels there are fixed (removal changes them)."""
    s = st.space(node.args[0])
    rank = _rank(node.args[0])
    if s is None or rank is None:
        st.spaces[node] = None
        return
    if s.axis in [_norm_axis(d, rank) for d in dims]:
        st.fix(s.ids, f"normalisation over channels: {_describe(node)}")
        st.consume(node, s.ids)
    identity(st, node)


@register_channel_rule(nn.LayerNorm, nn.RMSNorm)
def _layernorm_module(st: AnalysisState, node: fx.Node, m: nn.Module) -> None:
    k = len(m.normalized_shape)  # type: ignore[arg-type]
    _normalizes_channels(st, node, list(range(-k, 0)))


@register_channel_rule(F.layer_norm, F.rms_norm)
def _layernorm_function(st: AnalysisState, node: fx.Node) -> None:
    shape = _arg(node, 1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    _normalizes_channels(st, node, list(range(-k, 0)))


@register_channel_rule(nn.GroupNorm)
def _groupnorm_module(st: AnalysisState, node: fx.Node, m: nn.Module) -> None:
    _normalizes_channels(st, node, [1])


@register_channel_rule(F.group_norm)
def _groupnorm_function(st: AnalysisState, node: fx.Node) -> None:
    _normalizes_channels(st, node, [1])



@register_channel_rule(nn.PReLU)
def _prelu_module(st: AnalysisState, node: fx.Node, m: nn.Module) -> None:
    """PReLU: elementwise; with one slope per channel, the slopes are sliced with the channels."""
    if m.num_parameters == 1:  # type: ignore[attr-defined]
        return identity(st, node)
    _per_channel_params(st, node, [f"{node.target}.weight"])
