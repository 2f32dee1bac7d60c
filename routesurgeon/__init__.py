"""routesurgeon: model surgery for multi-output PyTorch models.

Trace a multi-output model, analyse which filters its tasks share, train it with DR-MGF or a
de-conflict baseline, and export one pruned inference route per task.
"""

from routesurgeon.channels import register_channel_rule
from routesurgeon.errors import (
    CheckpointError,
    ExportError,
    InputError,
    LossError,
    ModelChangedError,
    RouteSurgeonError,
    TaskError,
    TracingError,
    UnsupportedOpError,
)
from routesurgeon.surgeon import Surgeon, instrument
from routesurgeon.topology import Layer, Topology

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ExportError",
    "InputError",
    "Layer",
    "LossError",
    "ModelChangedError",
    "RouteSurgeonError",
    "Surgeon",
    "TaskError",
    "Topology",
    "TracingError",
    "UnsupportedOpError",
    "__version__",
    "instrument",
    "register_channel_rule",
]
