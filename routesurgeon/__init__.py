"""routesurgeon: model surgery for multi-output PyTorch models.

Trace a multi-output model, analyse which filters its tasks share, train it with DR-MGF or a
de-conflict baseline, and export one pruned inference route per task.
"""

from routesurgeon._version import __version__
from routesurgeon.channels import register_channel_rule
from routesurgeon.conflicts import ConflictConfig, Conflicts, measure_conflicts
from routesurgeon.criteria import CRITERIA, GroupScores, criterion_scores
from routesurgeon.detection import DetectionHeads, detection_heads
from routesurgeon.errors import (
    CheckpointError,
    CompileError,
    ExportError,
    InputError,
    LossError,
    ModelChangedError,
    PrecisionError,
    RouteSurgeonError,
    TaskError,
    TracingError,
    UnsupportedOpError,
)
from routesurgeon.importance import RouteConfig
from routesurgeon.methods.drmgf import DRMGFConfig
from routesurgeon.methods.drmgf_step import DRMGFStepConfig
from routesurgeon.methods.registry import available_methods, register_method
from routesurgeon.metrics import MetricSpec, delta_m, delta_m_tasks
from routesurgeon.recalibrate import recalibrate
from routesurgeon.reconstruct import reconstruct
from routesurgeon.report import route_report
from routesurgeon.routes import RouteInfo
from routesurgeon.saving import load_route, read_manifest, save_routes
from routesurgeon.surgeon import Surgeon, instrument
from routesurgeon.topology import Layer, Topology
from routesurgeon.trainer import Trainer
from routesurgeon.zoo import MultiExit, MultiHead, build_model, multi_exit

__all__ = [
    "CRITERIA",
    "CheckpointError",
    "CompileError",
    "ConflictConfig",
    "Conflicts",
    "DRMGFConfig",
    "DRMGFStepConfig",
    "DetectionHeads",
    "ExportError",
    "GroupScores",
    "InputError",
    "Layer",
    "LossError",
    "MetricSpec",
    "ModelChangedError",
    "MultiExit",
    "MultiHead",
    "PrecisionError",
    "RouteConfig",
    "RouteInfo",
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
    "criterion_scores",
    "delta_m",
    "delta_m_tasks",
    "detection_heads",
    "instrument",
    "load_route",
    "measure_conflicts",
    "multi_exit",
    "read_manifest",
    "recalibrate",
    "reconstruct",
    "register_channel_rule",
    "register_method",
    "route_report",
    "save_routes",
]
