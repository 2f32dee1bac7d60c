"""PyTorch Lightning integration: any routesurgeon method in a ``LightningModule``, one change.

Derive from :class:`RouteSurgeonModule` instead of ``lightning.LightningModule`` and let
``training_step`` return the per-task losses instead of their sum::

    class MultiTask(RouteSurgeonModule):          # was: lightning.LightningModule
        routesurgeon_method = "pcgrad"            # any per-step method (default "drmgf-step")

        def __init__(self):
            super().__init__()
            self.net = MyMultiHeadNet()
            self.example_input_array = torch.randn(2, 3, 64, 64)  # what routesurgeon traces

        def forward(self, x):
            return self.net(x)                    # {"cls": ..., "seg": ...}

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self(x)
            return {t: F.cross_entropy(out[t], y[t]) for t in out}   # {task: loss}

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

Underneath, the module uses Lightning's manual optimisation: at the start of training it traces
itself on ``example_input_array`` (``routesurgeon.instrument``) and builds a
``routesurgeon.Trainer`` around the configured optimizer; every ``training_step`` then runs
your code with ``self(...)`` going through the method's forward, hands the task losses to the
method's backward (with routesurgeon's non-finite guards), steps the optimizer through
Lightning, runs the method's after-step (FAMO's and gated drmgf-step's recompute call your
``training_step`` again, its ``self.log`` calls muted) and logs ``train/loss/<task>``.
Validation and prediction use your ``forward`` unchanged.

Data parallel: with ``strategy="ddp"`` (gloo on CPU, nccl on GPU) the routesurgeon Trainer keeps
the ranks exact itself (``routesurgeon.distributed``); the ``DistributedDataParallel`` wrapper's
own gradient synchronisation is switched off so that nothing is reduced twice. Each rank must
get an equal share of every global batch (Lightning's ``DistributedSampler`` does).
Checkpoints made by Lightning carry routesurgeon's importance variables and method state.

The per-epoch reference method ``drmgf`` runs whole passes over the data and does not fit
Lightning's step loop: use ``drmgf-step`` or a baseline here, or ``rs.Trainer.fit_epoch``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import lightning.pytorch as pl
import torch
from torch import Tensor

from routesurgeon.errors import InputError, LossError
from routesurgeon.methods.registry import get_method_class

__all__ = ["RouteSurgeonModule"]


def _wrap_training_step(step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(step)
    def training_step(self: RouteSurgeonModule, *args: Any, **kwargs: Any) -> Any:
        return self._routesurgeon_step(step, args, kwargs)

    training_step._routesurgeon_wrapped = True  # type: ignore[attr-defined]
    return training_step


class RouteSurgeonModule(pl.LightningModule):
    """A ``LightningModule`` trained by a routesurgeon method (see the module docstring).

    Class attributes (or instance attributes set in ``__init__``): ``routesurgeon_method``
    (a name from ``rs.available_methods()``), ``routesurgeon_config`` (its options),
    ``routesurgeon_tasks`` (task names for ``instrument``; default: the outputs' names),
    ``routesurgeon_trainer_options`` (more ``rs.Trainer`` keywords, e.g. ``max_nonfinite``).
    After ``fit`` starts, ``self.surgeon`` and ``self.routesurgeon_trainer`` are available
    (e.g. ``self.surgeon.export_routes(keep=0.5)`` after training).
    """

    routesurgeon_method: str = "drmgf-step"
    routesurgeon_config: Mapping[str, Any] = {}
    routesurgeon_tasks: Sequence[str] | Mapping[str, str] | None = None
    routesurgeon_trainer_options: Mapping[str, Any] = {}
    # set with object.__setattr__ (plain attributes, never submodules)
    _rs_trainer: Any
    _rs_active: bool
    _rs_forwarded: bool
    _rs_muted: bool
    _rs_pending: Mapping[str, Any] | None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_routesurgeon_wrapped", False):
            cls.training_step = _wrap_training_step(step)  # type: ignore[method-assign]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        # not registered as submodules: the Surgeon holds this module (no cycle in state_dict)
        object.__setattr__(self, "_rs_trainer", None)
        object.__setattr__(self, "_rs_active", False)
        object.__setattr__(self, "_rs_forwarded", False)
        object.__setattr__(self, "_rs_muted", False)
        object.__setattr__(self, "_rs_pending", None)

    # -- what the user gets --------------------------------------------------------------------
    @property
    def routesurgeon_trainer(self) -> Any:
        """The ``routesurgeon.Trainer`` (built when training starts)."""
        if self._rs_trainer is None:
            raise InputError(f"{type(self).__name__}: the routesurgeon Trainer is built when "
                             f"training starts (lightning.Trainer.fit); none exists yet")
        return self._rs_trainer

    @property
    def surgeon(self) -> Any:
        """The ``routesurgeon.Surgeon`` of this module (after training started)."""
        return self.routesurgeon_trainer.surgeon

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._rs_active:  # inside a training step: through the method's forward
            object.__setattr__(self, "_rs_forwarded", True)
            return self._rs_trainer.forward(*args, **kwargs)  # type: ignore[union-attr]
        return super().__call__(*args, **kwargs)

    def log(self, *args: Any, **kwargs: Any) -> None:
        if not self._rs_muted:
            super().log(*args, **kwargs)

    def log_dict(self, *args: Any, **kwargs: Any) -> None:
        if not self._rs_muted:
            super().log_dict(*args, **kwargs)

    # -- setting up ------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        super().on_train_start()
        if self._rs_trainer is None:
            object.__setattr__(self, "_rs_trainer", self._build_trainer())
        self._quiet_ddp()

    def _build_trainer(self) -> Any:
        import routesurgeon as rs

        name = type(self).__name__
        cls = get_method_class(self.routesurgeon_method)
        if getattr(cls, "fit_epoch", None) is not None:
            raise NotImplementedError(
                f"{name}: method {self.routesurgeon_method!r} is a per-epoch algorithm (whole "
                f"passes over the data per epoch), which Lightning's step loop cannot drive; use "
                f"'drmgf-step' or a baseline (rs.available_methods()), or rs.Trainer.fit_epoch")
        if self.automatic_optimization:
            raise InputError(f"{name} sets automatic_optimization = True; routesurgeon steps "
                             f"the optimizer itself (manual optimisation): leave it False")
        example = self.example_input_array
        if example is None:
            raise InputError(
                f"{name} has no example_input_array: set self.example_input_array in __init__ "
                f"to an example input (a tensor, a tuple of positional inputs or a dict of "
                f"keyword inputs); routesurgeon traces the module on it")
        opts = self.optimizers(use_pl_optimizer=False)
        if isinstance(opts, list):
            if len(opts) != 1:
                raise InputError(f"{name}.configure_optimizers returned {len(opts)} optimizers; "
                                 f"routesurgeon trains with exactly one (holding "
                                 f"self.parameters())")
            opts = opts[0]
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise NotImplementedError(
                f"{name}: Lightning precision {self.trainer.precision!r} scales the loss in "
                f"manual_backward, which routesurgeon's method backward replaces, so its "
                f"GradScaler would unscale unscaled gradients; use precision='bf16-mixed' or "
                f"'32-true'")
        example = _to_device(example, self.device)
        surgeon = rs.instrument(self, example, tasks=self.routesurgeon_tasks)
        trainer = rs.Trainer(surgeon, opts, method=self.routesurgeon_method,
                             config=dict(self.routesurgeon_config), progress=False,
                             **dict(self.routesurgeon_trainer_options))
        if self._rs_pending is not None:
            _load_state(trainer, self._rs_pending)
            object.__setattr__(self, "_rs_pending", None)
        return trainer

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        tr = self._rs_trainer
        if tr is not None:  # the epoch's conflict samples and TensorBoard figures
            record: dict[str, Any] = {"epoch": self.current_epoch}
            tr.observer.end_epoch(record)
            if "conflicts" in record:
                tr.history.append(record)
            tr.epoch = self.current_epoch + 1

    def on_train_end(self) -> None:
        super().on_train_end()
        if self._rs_trainer is not None:
            self._rs_trainer.observer.close()

    def _quiet_ddp(self) -> None:
        """Switch off the DDP wrapper's gradient and buffer synchronisation: the routesurgeon
        Trainer synchronises exactly what its method needs."""
        from torch.nn.parallel import DistributedDataParallel

        wrapped = getattr(self.trainer.strategy, "model", None)
        if isinstance(wrapped, DistributedDataParallel):
            wrapped.require_backward_grad_sync = False
            wrapped.require_forward_param_sync = False

    # -- the step ---------------------------------------------------------------------------------
    def _run_user_step(self, step: Callable[..., Any], args: tuple[Any, ...],
                       kwargs: Mapping[str, Any]) -> dict[str, Tensor]:
        object.__setattr__(self, "_rs_active", True)
        object.__setattr__(self, "_rs_forwarded", False)
        try:
            out = step(self, *args, **kwargs)
        finally:
            object.__setattr__(self, "_rs_active", False)
        losses = self._task_losses(out)
        tr = self._rs_trainer
        if not self._rs_forwarded and getattr(tr.method, "forward", None) is not None:
            raise InputError(
                f"{type(self).__name__}.training_step computed its losses without calling "
                f"self(...): method {tr.method_name!r} needs its own forward, so compute the "
                f"outputs with self(x), not with a submodule directly")
        return losses

    def _plain_losses(self, step: Callable[..., Any], args: tuple[Any, ...],
                      kwargs: Mapping[str, Any]) -> dict[str, Tensor]:
        """The user's losses through the plain forward (a conflict sample), logging muted."""
        object.__setattr__(self, "_rs_muted", True)
        try:
            return self._task_losses(step(self, *args, **kwargs))
        finally:
            object.__setattr__(self, "_rs_muted", False)

    def _task_losses(self, out: Any) -> dict[str, Tensor]:
        tasks = self._rs_trainer.surgeon.tasks  # type: ignore[union-attr]
        name = type(self).__name__
        losses = out.get("losses", out) if isinstance(out, Mapping) else out
        if not isinstance(losses, Mapping):
            got = ("None" if losses is None else
                   f"a {type(losses).__name__}" + (" (one loss)" if isinstance(losses, Tensor)
                                                   else ""))
            raise LossError(
                f"{name}.training_step returned {got}; routesurgeon needs each task's loss: "
                f"return {{task: loss}} (or {{'losses': {{task: loss}}}}) for the tasks {tasks}")
        missing = [t for t in tasks if t not in losses]
        unknown = [k for k in losses if k not in tasks]
        if missing:
            raise LossError(
                f"{name}.training_step returned no loss for tasks {missing} (it returned "
                f"{sorted(map(str, losses))}); return {{task: loss}} for every task of {tasks}")
        if unknown:
            raise LossError(f"{name}.training_step returned losses for unknown tasks {unknown}; "
                            f"the model's tasks are {tasks}")
        return {t: losses[t] for t in tasks}

    def _routesurgeon_step(self, step: Callable[..., Any], args: tuple[Any, ...],
                           kwargs: Mapping[str, Any]) -> Tensor | None:
        if self._rs_trainer is None:  # training_step called outside fit (e.g. by a test)
            object.__setattr__(self, "_rs_trainer", self._build_trainer())
        tr = self._rs_trainer
        opt = cast(Any, self.optimizers())
        tr.surgeon.train()
        tr.observer.before_step_fn(lambda: self._plain_losses(step, args, kwargs))
        opt.zero_grad(set_to_none=True)
        losses = self._run_user_step(step, args, kwargs)
        stats = tr.backward(losses)
        if stats is None:  # skipped (non-finite): counted in tr.skipped, nothing written
            return None
        opt.step()

        def recompute() -> dict[str, Tensor]:
            object.__setattr__(self, "_rs_muted", True)
            try:
                return self._run_user_step(step, args, kwargs)
            finally:
                object.__setattr__(self, "_rs_muted", False)

        tr.method.after_step({k: v.detach() for k, v in losses.items()}, recompute=recompute)
        tr.step_count += 1
        glob = tr._global_losses or {t: float(v.detach()) for t, v in losses.items()}
        tr.observer.after_step({f"loss/{t}": v for t, v in glob.items()})
        self.log_dict({f"train/loss/{t}": float(v) for t, v in glob.items()}, on_step=True,
                      batch_size=_batch_size(args[0] if args else None))
        return torch.stack([v.detach() for v in losses.values()]).sum()

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        tr = self._rs_trainer
        if tr is not None:
            bank = tr.surgeon.importance_bank
            checkpoint["routesurgeon"] = {
                "method": tr.method_name, "bank": bank.state_dict(), "trained": bank.trained,
                "method_state": tr.method.state_dict(), "step": tr.step_count,
                "skipped": tr.skipped}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("routesurgeon")
        if state is None:
            return
        if self._rs_trainer is not None:
            _load_state(self._rs_trainer, state)
        else:
            object.__setattr__(self, "_rs_pending", state)


def _load_state(trainer: Any, state: Mapping[str, Any]) -> None:
    if state["method"] != trainer.method_name:
        raise InputError(f"the checkpoint was trained with method {state['method']!r}, this "
                         f"module uses {trainer.method_name!r}")
    bank = trainer.surgeon.importance_bank
    bank.load_state_dict(state["bank"])
    bank.trained = bool(state["trained"])
    trainer.method.load_state_dict(state["method_state"])
    trainer.step_count, trainer.skipped = int(state["step"]), int(state["skipped"])


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, Mapping) and batch:
        return _batch_size(next(iter(batch.values())))
    return None
