"""Channel rules for layers with parameters: convolutions, linear layers, norms, PReLU.

Their weights are sliced with the channels they read and write; ``st.layers`` records them for
importance scoring and export.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from routesurgeon.channels.registry import (
    _arg,
    _describe,
    _fix_out,
    _norm_axis,
    _param_shape,
    _rank,
    identity,
    opaque,
    register_channel_rule,
)
from routesurgeon.channels.state import AnalysisState, Space
from routesurgeon.shapes import shape_of


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
    elif c_in % groups == 0 and c_out % groups == 0:
        # grouped (and transposed depthwise): whole groups go. A conv's weight is
        # (out, in/groups, ...), a transposed conv's (in, out/groups, ...): the axis that holds
        # one group is never cut
        _couple_whole_groups(st, in_ids, out_ids, groups)
        st.slice_param(weight, 0, in_ids if transposed else out_ids)
        st.mask_input(node, 0, Space(1, in_ids))
    else:
        why = f"grouped convolution (groups={groups}) {_describe(node)}"
        st.fix(in_ids, why)
        st.fix(out_ids, why)
    if bias is not None:
        st.slice_param(bias, 0, out_ids)
    # the weight's layout: (out, in/groups, ...) or, transposed, (in, out/groups, ...)
    st.layers[node] = {"kind": "conv", "weight": weight, "in": in_ids, "out": out_ids,
                       "groups": groups, "group_in": c_in // groups, "transposed": transposed}
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
    if len(node.args) > 1 or node.kwargs:  # output_size given: leave it as it is
        return opaque(st, node)
    _conv_like(st, node, f"{p}.weight", f"{p}.bias" if m.bias is not None else None,
               m.groups, transposed=True)


@register_channel_rule(F.conv1d, F.conv2d, F.conv3d)
def _conv_function(st: AnalysisState, node: fx.Node) -> None:
    _functional_conv(st, node, transposed=False)


@register_channel_rule(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
def _conv_transpose_function(st: AnalysisState, node: fx.Node) -> None:
    _functional_conv(st, node, transposed=True)


def _functional_conv(st: AnalysisState, node: fx.Node, transposed: bool) -> None:
    """``F.conv*d`` / ``F.conv_transpose*d`` on get_attr weights; ``groups`` is argument 6 of
    both."""
    w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    groups = _arg(node, 6, "groups", 1)
    if not (isinstance(w, fx.Node) and w.op == "get_attr") or not isinstance(groups, int):
        return opaque(st, node)
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return opaque(st, node)
    _conv_like(st, node, str(w.target), str(b.target) if b is not None else None, groups,
               transposed=transposed)


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
