"""Channel rules for layout ops: view / reshape / flatten (with channel shuffle), permute,
transpose, unsqueeze, squeeze.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from routesurgeon.channels.registry import (
    _arg,
    _fix_out,
    _ignore,
    _norm_axis,
    _rank,
    opaque,
    register_channel_rule,
    rule_for,
)
from routesurgeon.channels.state import AnalysisState, Space
from routesurgeon.shapes import shape_of

if TYPE_CHECKING:
    from collections.abc import Sequence


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
    ins, outs = shape_of(cast(fx.Node, src)), shape_of(node)
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
    sizes: list[Any] = list(node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    if "shape" in node.kwargs:
        sizes = list(cast("Sequence[Any]", node.kwargs["shape"]))
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
        dims = _sizes(t) if "dims" not in t.kwargs else list(
            cast("Sequence[Any]", t.kwargs["dims"]))
        want = list(range(rank))
        want[a], want[a + 1] = a + 1, a
        return [_norm_axis(x, rank) if isinstance(x, int) else None for x in dims] == want
    return False


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
    dims: list[Any] = list(node.args[1:])
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    if "dims" in node.kwargs:
        dims = list(cast("Sequence[Any]", node.kwargs["dims"]))
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
    ins, out = shape_of(cast(fx.Node, src)), shape_of(node)
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
