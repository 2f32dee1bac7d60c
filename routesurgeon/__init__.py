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
from routesurgeon.importance import RouteConfig
from routesurgeon.methods.drmgf import DRMGFConfig
from routesurgeon.methods.registry import available_methods, register_method
from routesurgeon.surgeon import Surgeon, instrument
from routesurgeon.topology import Layer, Topology
from routesurgeon.trainer import Trainer
from routesurgeon.zoo import MultiExit, MultiHead, build_model, multi_exit

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DRMGFConfig",
    "ExportError",
    "InputError",
    "Layer",
    "LossError",
    "ModelChangedError",
    "MultiExit",
    "MultiHead",
    "RouteConfig",
    "RouteSurgeonError",
    "Surgeon",
    "TaskError",
    "Topology",
    "TracingError",
    "Trainer",
    "UnsupportedOpError",
    "__version__",
    "available_methods",
    "build_model",
    "instrument",
    "multi_exit",
    "register_channel_rule",
    "register_method",
]
