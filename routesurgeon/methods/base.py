"""The interface every per-step training method implements.

A per-step method turns the task losses of one batch into ``.grad`` on the model's parameters
(and on its own extra parameters, if it has any). It plugs into the user's loop: call
``method.backward(losses)`` instead of ``sum(losses).backward()``, then ``optimizer.step()``,
then ``method.after_step(...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn


class MethodContext(Protocol):
    """What a method needs to know about the instrumented model (a ``Surgeon`` provides it)."""

    @property
    def tasks(self) -> list[str]: ...

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters that two or more tasks reach (the ones whose gradients conflict)."""
        ...

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters only ``task`` reaches."""
        ...


class GradientMethod:
    """Base class of per-step methods. Subclasses register with ``@register_method(name)``."""

    name: ClassVar[str] = ""
    #: How data-parallel ranks stay exact (``routesurgeon.distributed.sync_mode``): "gradients"
    #: (the gradient is linear in the per-task gradients: the trainer averages ``.grad``),
    #: "jacobian" (the method averages its per-task gradients with ``reduce_mean`` before
    #: combining them), None (unknown: refused under a process group).
    data_parallel: ClassVar[str | None] = None
    #: Whether ``backward`` multiplies what it back-propagates by ``grad_scale`` (the fp16
    #: GradScaler's loss scale, 1 otherwise) where that scales its gradient exactly, and unscales
    #: whatever else it derives from gradients; methods that do not are refused under fp16.
    supports_loss_scale: ClassVar[bool] = False
    #: Set by the ``Trainer`` before each backward under fp16 (``routesurgeon.precision``).
    grad_scale: float = 1.0
    #: Set by the ``Trainer``: the autocast dtype of the forward (None in full precision).
    autocast_dtype: torch.dtype | None = None
    #: Set by the ``Trainer`` under ``compile=``: compiles a graph the method runs forward
    #: (``routesurgeon.compile.CompileConfig``); None: eager.
    compiler: Callable[[Any], Callable[..., Any]] | None = None
    #: Installed by the ``Trainer`` under torch.distributed: averages tensors over ranks in place.
    reducer: Callable[[Sequence[Tensor]], None] | None = None

    def __init__(self, context: MethodContext, **config: Any) -> None:
        if config:
            raise TypeError(f"{type(self).__name__} got unknown options: {sorted(config)}")
        self.context = context
        self.tasks = list(context.tasks)

    def compile_unsupported(self, cfg: Any) -> str | None:
        """Why this method cannot train under the compile config ``cfg`` (None: it can). A
        method without a forward of its own trains through the trainer's compiled graph."""
        if hasattr(self, "forward"):
            return ("it runs its own forward and does not declare how it is compiled (override "
                    "compile_unsupported and compile its graph with self.compiler)")
        return None

    # -- the step -------------------------------------------------------------------------
    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        """Accumulate this method's gradient into ``.grad``; return scalars for the history."""
        raise NotImplementedError

    def after_step(self, losses: Mapping[str, Tensor],
                   recompute: Callable[[], Mapping[str, Tensor]] | None = None) -> None:
        """Called after ``optimizer.step()`` with the step's (detached) losses; ``recompute``
        gives the same batch's losses under the updated weights (FAMO needs them)."""

    def end_epoch(self) -> None:
        """Called by ``Trainer.fit_epoch`` at the end of every epoch, on every rank (methods
        with per-epoch statistics, e.g. ``dwa``, ``stch``); users with their own loop call it."""

    def reduce_mean(self, tensors: Sequence[Tensor]) -> None:
        """Average ``tensors`` in place over the data-parallel ranks (one flat all-reduce); a
        no-op in one process. Every rank must pass the same list of shapes."""
        if self.reducer is not None:
            self.reducer(tensors)

    @property
    def distributed(self) -> bool:
        """Whether a reducer is installed (the trainer runs under a process group)."""
        return self.reducer is not None

    # -- extra state ------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """Learnable parameters the method owns (e.g. uncertainty log-variances)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"params": [p.detach().clone() for p in self.parameters()]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for p, v in zip(self.parameters(), state.get("params", []), strict=True):
                p.copy_(v)


def stack_losses(tasks: Sequence[str], losses: Mapping[str, Tensor]) -> Tensor:
    """Losses in task order as one 1-D tensor."""
    return torch.stack([losses[t] for t in tasks])
