"""``Trainer``: run any registered method on an instrumented model, in your loop or in one call.

Per-step methods (the baselines and ``drmgf-step``) expose ``trainer.forward`` /
``trainer.backward(losses)`` for users who keep their own loop; ``fit_epoch`` runs a whole epoch
with a progress bar for every method, including the per-epoch reference ``drmgf``.

Resumable runs: ``trainer.save_checkpoint(path)`` / ``Trainer.resume(path, ...)`` (see
``routesurgeon.checkpoint``); ``fit_epoch(..., checkpoint=path, checkpoint_every=k)`` checkpoints
every k steps (per-step methods, resumed mid-epoch) and at every epoch end (every method).
Numerical guards: a non-finite task loss, gradient or importance/scale value skips the step before
anything is written (counted in ``skipped`` and the history); ``max_nonfinite`` consecutive skips
stop the run with a ``LossError`` naming the task and the layer.
Data parallel: see ``routesurgeon.distributed`` (the trainer detects an initialised process group).
Compiled: ``compile=True`` (or a mode, or options) compiles the graph the method runs forward;
see ``routesurgeon.compile``.
Mixed precision: ``precision="bf16"`` or ``"fp16"`` (with a ``torch.amp.GradScaler``, made or
given as ``scaler=``); see ``routesurgeon.precision``. In your own loop compute the losses under
``with trainer.autocast():`` and step with ``trainer.optimizer_step()``.
"""


from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from routesurgeon import checkpoint as ckpt
from routesurgeon import compile as rscompile
from routesurgeon import distributed as rsdist
from routesurgeon import precision as rsprec
from routesurgeon._trainer.epoch import TrainerEpoch
from routesurgeon._trainer.nonfinite import LossFn as LossFn
from routesurgeon._trainer.nonfinite import _check_loss_fns as _check_loss_fns
from routesurgeon._trainer.nonfinite import all_finite, check_losses, diagnose_nonfinite
from routesurgeon._trainer.step import _updates_importance as _updates_importance
from routesurgeon.methods.registry import get_method_class
from routesurgeon.surgeon import Surgeon

__all__ = ["Trainer", "all_finite", "check_losses", "diagnose_nonfinite"]


class Trainer(TrainerEpoch):
    """Train ``surgeon`` with ``method`` (a registered name; see ``available_methods()``).

    ``conflicts``: sample the gradient conflicts between tasks during training (``True``:
    every ``routesurgeon.conflicts.default_every(T)`` steps, an int: every that many, a
    ``ConflictConfig``; default: on when ``log_dir`` is given); they are stored in each
    epoch's record (``history[i]["conflicts"]``) and shown by the report.
    ``log_dir``: write TensorBoard event files there (see ``routesurgeon.tensorboard``).
    """

    def __init__(
        self,
        surgeon: Surgeon,
        optimizer: torch.optim.Optimizer,
        method: str = "drmgf-step",
        config: Mapping[str, Any] | None = None,
        importance_optimizer: torch.optim.Optimizer | None = None,
        max_nonfinite: int = 5,
        progress: bool = True,
        precision: str | int = "32",
        scaler: torch.amp.GradScaler | None = None,
        compile: bool | str | Mapping[str, Any] | rscompile.CompileConfig | None = False,
        conflicts: Any = None,
        log_dir: str | None = None,
    ) -> None:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in surgeon.model.named_parameters()
                   if p.requires_grad and id(p) not in held]
        if missing:
            raise ValueError(
                f"the optimizer does not hold {len(missing)} of the model's parameters (e.g. "
                f"{missing[:3]}); build it with surgeon.model_parameters()"
            )
        self.surgeon = surgeon
        self.optimizer = optimizer
        cls = get_method_class(method)
        self.method = cls(surgeon, **dict(config or {}))
        self.method_name = cls.name  # type: ignore[attr-defined]
        extra = list(self.method.parameters())
        if extra:
            self.optimizer.add_param_group({"params": extra})
        self.importance_optimizer = importance_optimizer
        first = next(iter(surgeon.model.parameters()), None)
        self.precision = rsprec.resolve_precision(
            precision, first.device if first is not None else torch.device("cpu"))
        rsprec.check_method(self.method, self.method_name, self.precision)
        self.scaler = rsprec.check_scaler(self.precision, scaler)
        self.overflow_skipped = 0  # fp16 steps the GradScaler skipped (scaled gradient overflow)
        self._unscaled = False  # the scaler unscaled .grad since its last update()
        self.compile = rscompile.resolve_compile(  # see routesurgeon.compile
            compile, self.precision.device_type)
        if self.compile is not None:
            rscompile.check_method(self.method, self.method_name, self.compile)
            self.method.compiler = self.compile
        self._compiled: dict[int, Any] = {}
        self.max_nonfinite = max_nonfinite
        self.progress = progress
        self.history: list[dict[str, Any]] = []
        self.skipped = 0
        self._consecutive_bad = 0
        self.epoch = 0
        self.step_count = 0
        self.comm = rsdist.CommStats()
        self._progress: dict[str, Any] | None = None  # mid-epoch position (checkpoints)
        self._batch: tuple[tuple[Any, ...], Mapping[str, Any], Mapping[str, LossFn]] | None = None
        self._global_losses: dict[str, float] | None = None
        self._sync_grads = True  # average .grad over ranks in guard_step (under a process group)
        if rsdist.is_distributed():
            self._setup_distributed()
        from routesurgeon.observe import Observer

        self.observer = Observer(self, conflicts, log_dir)

    @classmethod
    def resume(cls, path: str, surgeon: Surgeon, optimizer: torch.optim.Optimizer,
               method: str | None = None, **kwargs: Any) -> Trainer:
        """A ``Trainer`` continuing the run saved at ``path`` (method taken from the header)."""
        header = ckpt.read_header(path)
        trainer = cls(surgeon, optimizer, method=method or header.method, **kwargs)
        trainer.load_checkpoint(path)
        return trainer
