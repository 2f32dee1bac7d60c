"""Precision (autocast, GradScaler), compile and torch.distributed plumbing of ``Trainer``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from routesurgeon import compile as rscompile
from routesurgeon import distributed as rsdist
from routesurgeon._trainer.base import TrainerBase
from routesurgeon.guards import check_call_inputs
from routesurgeon.outputs import leaf_values

__all__ = ["TrainerPlumbing"]


class TrainerPlumbing(TrainerBase):
    """Autocast, the GradScaler'd optimizer step, the compiled forward, data parallel."""

    def _setup_distributed(self) -> None:
        """Refuse what cannot be kept exact, choose how gradients are synchronised, install the
        method's reducer and broadcast rank 0's state."""
        mode = rsdist.sync_mode(self.method)
        if mode is None:
            raise NotImplementedError(
                f"method {self.method_name!r} under torch.distributed: it does not declare how "
                f"its gradient is synchronised (set data_parallel = 'gradients' if it is linear "
                f"in the per-task gradients, or 'jacobian' and average them with reduce_mean), "
                f"so averaging over ranks might not equal one process; the built-in methods "
                f"(see rs.available_methods()) are all supported")
        # "jacobian": the method reduces its per-task gradients itself; .grad is then global
        self._sync_grads = mode == "gradients"
        if hasattr(self.method, "reducer"):
            comm = self.comm

            def reducer(tensors: Sequence[Tensor]) -> None:
                rsdist.all_reduce_mean(tensors, comm, kind=mode if mode == "jacobian"
                                       else "method")

            self.method.reducer = reducer
        self._broadcast_state()

    def _broadcast_state(self) -> None:
        bank = self.surgeon.importance_bank
        tensors = [*self.surgeon.model.state_dict().values(), *bank.parameters(),
                   *self.method.parameters()]
        rsdist.broadcast_tensors([t for t in tensors if t.is_floating_point()], stats=self.comm)

    # -- step-level API ------------------------------------------------------------------------
    def autocast(self) -> Any:
        """A context running the forward and the losses in the trainer's precision."""
        return self.precision.autocast()

    @property
    def loss_scale(self) -> float:
        """The GradScaler's current scale under fp16 (1 otherwise)."""
        if self.scaler is None:
            return 1.0
        if self.scaler._scale is None:  # created lazily by scale(): on the model's device
            first = next(iter(self.surgeon.model.parameters()), None)
            self.scaler.scale(torch.ones((), device=first.device if first is not None else None))
        return float(self.scaler.get_scale())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's outputs (through the method's forward when it needs one), autocast in
        the trainer's precision."""
        fwd = getattr(self.method, "forward", None)
        with self.autocast():
            if fwd is None:
                if self.compile is not None and self.surgeon._active_task is None:
                    return rscompile.compiled_forward(self.surgeon, self._compiled, self.compile,
                                                      args, kwargs)
                return self.surgeon(*args, **kwargs)
            check_call_inputs(self.surgeon.model, self.surgeon._example_meta, args, kwargs)
            return fwd(*args, **kwargs)

    def _optimizers(self, optimizers: Sequence[torch.optim.Optimizer] | None
                    ) -> list[torch.optim.Optimizer]:
        if optimizers is not None:
            return [o for o in optimizers if o is not None]
        return [self.optimizer] + ([self.importance_optimizer] if self.importance_optimizer
                                   else [])

    def optimizer_step(self, optimizers: Sequence[torch.optim.Optimizer] | None = None) -> None:
        """Step ``optimizers`` (default: the model's and the importance optimizer), through the
        GradScaler under fp16 (which then updates its scale)."""
        opts = self._optimizers(optimizers)
        if self.scaler is None:
            for opt in opts:
                opt.step()
            return
        for opt in opts:
            self.scaler.step(opt)
        self.scaler.update()
        self._unscaled = False

    def task_outputs(self, outputs: Any) -> dict[str, Tensor]:
        spec = self.surgeon.outputs
        values = leaf_values(outputs, spec.task_outputs)
        return {t: values[o] for t, o in zip(spec.tasks, spec.task_outputs)}

    def sync_buffers(self) -> None:
        """Average the model's floating-point buffers (BatchNorm running statistics) over ranks.

        In train mode each rank's BatchNorm normalises and updates its running statistics with
        its own share of the batch; averaging them at the end of every epoch (``fit_epoch`` does)
        keeps the ranks' models identical for evaluation and checkpoints. A no-op in one process.
        Users with their own loop call it before evaluating.
        """
        floats = [b for b in self.surgeon.model.buffers() if b.is_floating_point()]
        rsdist.all_reduce_mean(floats, self.comm, kind="buffers")
