"""Coupled-channel analysis on traced graphs (see ``state`` for the model)."""

# Rule modules register their rules at import time; keep this order (the library leaves last).
# isort: off
from routesurgeon.channels import elementwise_rules as _elementwise_rules  # noqa: F401
from routesurgeon.channels import axis_rules as _axis_rules  # noqa: F401
from routesurgeon.channels import shape_rules as _shape_rules  # noqa: F401
from routesurgeon.channels import slicing_rules as _slicing_rules  # noqa: F401
from routesurgeon.channels import layer_rules as _layer_rules  # noqa: F401
from routesurgeon.channels import library_rules as _library_rules  # noqa: F401
# isort: on
from routesurgeon.channels.analysis import ChannelGroups, analyse_channels
from routesurgeon.channels.registry import identity, opaque, register_channel_rule
from routesurgeon.channels.state import AnalysisState, Space

__all__ = [
    "AnalysisState",
    "ChannelGroups",
    "Space",
    "analyse_channels",
    "identity",
    "opaque",
    "register_channel_rule",
]
