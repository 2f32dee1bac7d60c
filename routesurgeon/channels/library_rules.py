"""Channel rules for leaf modules of timm and segmentation-models-pytorch.

These libraries mark some modules as fx leaves; the ones whose channel semantics are plain are
described here, every other leaf stays opaque (its channels are never pruned).
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from routesurgeon.channels.axis_rules import spatial
from routesurgeon.channels.layer_rules import _batchnorm_module, _conv_module
from routesurgeon.channels.registry import _MODULE_RULES, identity, opaque, register_channel_rule
from routesurgeon.channels.state import AnalysisState


def _is_channelwise(m: nn.Module) -> bool:
    """True for modules registered with the identity rule (activations, dropout, identity)."""
    return _MODULE_RULES.get(type(m)) is identity


def _register_timm() -> None:
    try:
        from timm.layers import norm_act
        from timm.layers.conv2d_same import Conv2dSame
        from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
    except ImportError:
        return

    def bn_act(st: AnalysisState, node: fx.Node, m: nn.Module) -> None:
        parts = [getattr(m, "act", nn.Identity()), getattr(m, "drop", nn.Identity())]
        if all(_is_channelwise(p) for p in parts):
            _batchnorm_module(st, node, m)
        else:
            opaque(st, node)

    types = [getattr(norm_act, n) for n in ("BatchNormAct2d", "SyncBatchNormAct",
                                           "FrozenBatchNormAct2d") if hasattr(norm_act, n)]
    register_channel_rule(*types)(bn_act)
    register_channel_rule(Conv2dSame)(_conv_module)
    register_channel_rule(AvgPool2dSame, MaxPool2dSame)(spatial)


_register_timm()
