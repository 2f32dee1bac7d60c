"""Channel rules for ops along chosen axes: pooling, resizing, padding, reductions, softmax.

Channels pass through unchanged unless the op acts along the channel axis; then they are fixed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from routesurgeon.channels.registry import (
    _arg,
    _fix_out,
    _norm_axis,
    _rank,
    identity,
    opaque,
    register_channel_rule,
)
from routesurgeon.channels.state import AnalysisState, Space
from routesurgeon.shapes import shape_of


# ---------------------------------------------------------------------------------------------
# Spatial ops on NC... tensors: channels pass through when the channel axis is 1
# ---------------------------------------------------------------------------------------------
def spatial(st: AnalysisState, node: fx.Node, *_: Any) -> None:
    s = st.space(node.args[0] if node.args else node.kwargs.get("input"))
    if s is not None and s.axis != 1:
        return _fix_out(st, node, s, "spatial op over the channel axis")
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
            return _fix_out(st, node, s, "padding along the channel axis")
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
        return _fix_out(st, node, s, "reduction over the channel axis")
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
            return _fix_out(st, node, s, "softmax over channels")
        identity(st, node)
        return
    opaque(st, node)


register_channel_rule(F.softmax, F.log_softmax, torch.softmax, "softmax", "log_softmax")(_softmax)
