"""routesurgeon's exception classes.

Every error names what it is about (module path, op, task) and what to do next.
"""

from __future__ import annotations


class RouteSurgeonError(Exception):
    """Base class of every error routesurgeon raises on purpose."""


class TracingError(RouteSurgeonError):
    """The model could not be traced into a graph routesurgeon can analyse."""


class TaskError(RouteSurgeonError, KeyError):
    """A task name is unknown, duplicated or missing."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputError(RouteSurgeonError, ValueError):
    """Example inputs or call inputs do not fit what the model was traced with."""


class UnsupportedOpError(RouteSurgeonError):
    """An op whose channel semantics routesurgeon does not know was asked to be pruned."""


class ExportError(RouteSurgeonError):
    """An exported route does not compute what its masked reference computes."""


class LossError(RouteSurgeonError, ValueError):
    """Task losses are missing, unknown, non-scalar or non-finite."""


class CheckpointError(RouteSurgeonError):
    """A checkpoint is corrupt, from another model or from an incompatible version."""


class ModelChangedError(RouteSurgeonError):
    """The user's model changed (parameters added, removed or reshaped) after instrumenting."""


class PrecisionError(RouteSurgeonError, ValueError):
    """A precision (autocast dtype, loss scaling) the device or the method cannot train under."""


class CompileError(RouteSurgeonError, ValueError):
    """A ``torch.compile`` mode the method cannot train under."""
