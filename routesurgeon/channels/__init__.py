"""Coupled-channel analysis on traced graphs (see ``state`` for the model)."""

from routesurgeon.channels import library_rules as _library_rules  # noqa: F401
from routesurgeon.channels.analysis import ChannelGroups, analyse_channels
from routesurgeon.channels.rules import identity, opaque, register_channel_rule
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
