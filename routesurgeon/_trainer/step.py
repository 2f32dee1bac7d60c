"""The step-level core of ``Trainer``: losses checked, the method's backward, the gradient
guard, skipped steps, one training step."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from routesurgeon import distributed as rsdist
from routesurgeon._trainer.nonfinite import (
    LossFn,
    _check_loss_fns,
    all_finite,
    check_losses,
    diagnose_nonfinite,
)
from routesurgeon._trainer.plumbing import TrainerPlumbing
from routesurgeon.errors import LossError

__all__ = ["TrainerStep"]


class TrainerStep(TrainerPlumbing):
    """``check_step_losses``, ``guard_step``, ``backward`` and ``train_step``."""

    def check_step_losses(self, losses: Mapping[str, Tensor], where: str = "") -> bool:
        """Validate ``losses``; on a non-finite loss (on any rank) skip the step, return False.

        Under torch.distributed the T loss values are averaged over ranks (so every rank takes
        the same decision) and kept as the step's global losses.
        """
        tasks = self.surgeon.tasks
        check_losses(tasks, losses)
        if rsdist.is_distributed():
            vec = torch.stack([losses[t].detach().float().cpu() for t in tasks])
            rsdist.all_reduce_mean([vec], self.comm, kind="losses")
            values = vec.tolist()
        else:  # one read of each loss serves both the check and the logged value
            values = [float(losses[t].detach()) for t in tasks]
        self._global_losses = dict(zip(tasks, values))
        bad = [t for t, v in zip(tasks, values) if not math.isfinite(v)]
        if bad:
            self._skip(f"non-finite loss for tasks {bad}{where}", tasks=bad)
            return False
        return True

    def guard_step(self, params: Sequence[Tensor] | None = None, where: str = "",
                   values: Sequence[Tensor] = (),
                   optimizers: Sequence[torch.optim.Optimizer] | None = None) -> bool:
        """All-reduce (when distributed) and check the gradients of ``params`` (default: all the
        optimizers hold) and the tensors ``values``; on a non-finite one zero the gradients, skip
        the step (raising after ``max_nonfinite`` in a row) and return False.

        A method that synchronises its per-task gradients itself (``data_parallel="jacobian"``)
        leaves identical gradients on every rank: they are only checked, not reduced again.

        Under fp16 the GradScaler first unscales the gradients of ``optimizers`` (default: the
        trainer's); a non-finite one is an overflow of the scaled backward: the step is left to
        the scaler (scale lowered, ``overflow_skipped`` counted), not to the guard."""
        params = list(self.optimizer_params() if params is None else params)
        grads = [p.grad for p in params if p.grad is not None]
        if self._sync_grads:
            rsdist.all_reduce_mean([*grads, *values], self.comm)
        if self.scaler is not None:
            for opt in self._optimizers(optimizers):
                self.scaler.unscale_(opt)
            self._unscaled = True
            if not all_finite(grads):
                for p in params:
                    p.grad = None
                self.overflow_skipped += 1
                self.scaler.update()  # the inf it found lowers the scale
                self._unscaled = False
                return False
        if all_finite([*grads, *values]):
            return True
        names = self._param_names()
        bad = [names.get(id(p), "?") for p in params
               if p.grad is not None and not torch.isfinite(p.grad).all()]
        bad += [names.get(id(v), "importance") for v in values if not torch.isfinite(v).all()]
        for p in params:
            p.grad = None
        self._skip(f"non-finite gradient{where} in {bad[:3]}", params=bad)
        return False

    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, float] | None:
        """The method's gradients into ``.grad``; ``None`` (and nothing written) on a bad step."""
        if not self.check_step_losses(losses):
            return None
        bank = self.surgeon.importance_bank
        state = [p.detach().clone() for p in bank.parameters()]
        self.method.grad_scale = self.loss_scale
        self.method.autocast_dtype = self.precision.dtype
        stats = self.method.backward(losses)
        # importance variables a method updates in its backward (drmgf-step's Taylor estimate)
        if rsdist.is_distributed():  # the same list on every rank
            synced = list(bank.importance_parameters()) if _updates_importance(self.method) else []
        else:
            synced = [p for p, s in zip(bank.parameters(), state) if not torch.equal(p, s)]
        ok = False
        try:
            ok = self.guard_step(values=[p.data for p in synced])
        finally:
            if not ok:  # skipped (or stopping): the importance variables stay as they were
                with torch.no_grad():
                    for p, s in zip(bank.parameters(), state):
                        p.copy_(s)
        if not ok:
            return None
        self._consecutive_bad = 0
        return stats

    def _skip(self, why: str, tasks: Sequence[str] = (), params: Sequence[str] = ()) -> None:
        if self.scaler is not None and self._unscaled:  # close the scaler's step
            self.scaler.update()
            self._unscaled = False
        self.skipped += 1
        self._consecutive_bad += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.importance_optimizer is not None:
            self.importance_optimizer.zero_grad(set_to_none=True)
        if self._consecutive_bad >= self.max_nonfinite:
            detail = self._diagnose(tasks, params)
            raise LossError(f"{self._consecutive_bad} consecutive steps skipped; last: {why}. "
                            f"{detail}Lower the learning rate or check the data and loss "
                            f"functions.")
        return None

    def _diagnose(self, tasks: Sequence[str], params: Sequence[str]) -> str:
        if self._batch is not None:
            args, targets, loss_fns = self._batch
            try:
                return diagnose_nonfinite(self.surgeon, args, targets, loss_fns) + " "
            except Exception as e:  # the diagnosis must never hide the original problem
                return f"(diagnosis failed: {e}) "
        tasks_of = self.surgeon.param_tasks()
        layers = sorted({p.rsplit(".", 1)[0] for p in params if p in tasks_of})
        reach = sorted({t for p in params for t in tasks_of.get(p, ())})
        if layers:
            return f"Layers {layers} (reached by tasks {reach}) got non-finite gradients. "
        return ""

    def train_step(self, inputs: Any, targets: Mapping[str, Any],
                   loss_fns: Mapping[str, LossFn]) -> dict[str, float] | None:
        self.surgeon.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.importance_optimizer is not None:
            self.importance_optimizer.zero_grad(set_to_none=True)
        _check_loss_fns(self.surgeon.tasks, loss_fns)
        args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        self.observer.before_step(args, targets, loss_fns)
        with self.autocast():
            outs = self.task_outputs(self.forward(*args))
            losses = {t: loss_fns[t](outs[t], targets[t]) for t in self.surgeon.tasks}
        self._batch = (tuple(args), targets, loss_fns)
        try:
            stats = self.backward(losses)
        finally:
            self._batch = None
        if stats is None:
            return None
        self.optimizer_step()

        def recompute() -> dict[str, Tensor]:
            with self.autocast():
                outs = self.task_outputs(self.forward(*args))
                return {t: loss_fns[t](outs[t], targets[t]) for t in self.surgeon.tasks}

        self.method.after_step({k: v.detach() for k, v in losses.items()}, recompute=recompute)
        self.step_count += 1
        glob = self._global_losses or {t: float(v.detach()) for t, v in losses.items()}
        out = {**stats, **{f"loss/{t}": v for t, v in glob.items()}}
        self.observer.after_step(out)
        return out


def _updates_importance(method: Any) -> bool:
    """Whether the method's backward writes the importance variables (Taylor estimate)."""
    return getattr(method, "importance_mode", None) == "taylor"
