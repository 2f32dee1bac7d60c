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

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from routesurgeon import checkpoint as ckpt
from routesurgeon import compile as rscompile
from routesurgeon import distributed as rsdist
from routesurgeon import precision as rsprec
from routesurgeon.errors import CheckpointError, LossError
from routesurgeon.guards import check_call_inputs
from routesurgeon.methods.registry import get_method_class
from routesurgeon.outputs import leaf_values
from routesurgeon.surgeon import Surgeon

__all__ = ["Trainer", "all_finite", "check_losses", "diagnose_nonfinite"]

LossFn = Callable[[Tensor, Any], Tensor]


def check_losses(tasks: list[str], losses: Mapping[str, Tensor]) -> list[str]:
    """Validate a losses dict; return the tasks whose loss is not finite."""
    missing = [t for t in tasks if t not in losses]
    unknown = [k for k in losses if k not in tasks]
    if unknown:
        raise LossError(f"losses for unknown tasks {unknown}; tasks are {tasks}")
    if missing:
        raise LossError(f"losses missing for tasks {missing}; every task needs a loss: {tasks}")
    bad = []
    for t in tasks:
        v = losses[t]
        if not isinstance(v, Tensor) or v.dim() != 0:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise LossError(f"loss of task {t!r} must be a scalar tensor, got {shape}; "
                            f"reduce it (e.g. .mean()) first")
        if not torch.isfinite(v.detach()).item():
            bad.append(t)
    return bad


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one synchronisation when it is.

    The L2 norms of the floating-point tensors (``torch._foreach_norm``, one fused kernel) are
    checked together: a NaN or infinite element makes its norm non-finite. A norm can also
    overflow on large finite values, so a non-finite norm is confirmed element by element
    (``torch.isfinite``) on that tensor before it counts. Other tensors are checked alone.
    """
    tensors = [t for t in tensors if t.numel()]  # empty: finite
    fused = [t.is_floating_point() and t.layout == torch.strided for t in tensors]
    floats = [t.detach() for t, f in zip(tensors, fused, strict=True) if f]
    others = [t for t, f in zip(tensors, fused, strict=True) if not f]
    if floats:
        norms = torch._foreach_norm(floats, 2)
        by_device: dict[torch.device, list[int]] = {}
        for i, n in enumerate(norms):
            by_device.setdefault(n.device, []).append(i)
        for idx in by_device.values():
            ok = torch.isfinite(torch.stack([norms[i].float() for i in idx]))
            if not bool(ok.all()):
                suspects = [i for i, good in zip(idx, ok.tolist(), strict=True) if not good]
                if not all(bool(torch.isfinite(floats[i]).all()) for i in suspects):
                    return False
    return all(bool(torch.isfinite(t).all()) for t in others)


def _check_loss_fns(tasks: list[str], loss_fns: Mapping[str, Any]) -> None:
    unknown = [k for k in loss_fns if k not in tasks]
    missing = [t for t in tasks if t not in loss_fns]
    if unknown or missing:
        raise LossError(f"loss_fns must name every task exactly: missing {missing}, "
                        f"unknown {unknown}; tasks are {tasks}")


class Trainer:
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

    # -- what is trained -------------------------------------------------------------------------
    def optimizer_params(self) -> list[nn.Parameter]:
        """Every parameter the model optimizer (and the importance optimizer) steps."""
        opts = [self.optimizer] + ([self.importance_optimizer] if self.importance_optimizer
                                   else [])
        seen: set[int] = set()
        out = []
        for opt in opts:
            for g in opt.param_groups:
                for p in g["params"]:
                    if id(p) not in seen:
                        seen.add(id(p))
                        out.append(p)
        return out

    def _param_names(self) -> dict[int, str]:
        names = {id(p): n for n, p in self.surgeon.model.named_parameters()}
        for n, p in self.surgeon.importance_bank.named_parameters():
            names.setdefault(id(p), f"importance_bank.{n}")
        for i, p in enumerate(self.method.parameters()):
            names.setdefault(id(p), f"{self.method_name}.param{i}")
        return names

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

    def check_step_losses(self, losses: Mapping[str, Tensor], where: str = "") -> bool:
        """Validate ``losses``; on a non-finite loss (on any rank) skip the step, return False.

        Under torch.distributed the T loss values are averaged over ranks (so every rank takes
        the same decision) and kept as the step's global losses.
        """
        bad = check_losses(self.surgeon.tasks, losses)
        tasks = self.surgeon.tasks
        if rsdist.is_distributed():
            vec = torch.stack([losses[t].detach().float().cpu() for t in tasks])
            rsdist.all_reduce_mean([vec], self.comm, kind="losses")
            bad = [t for t, v in zip(tasks, vec.tolist()) if not torch.isfinite(torch.tensor(v))]
            self._global_losses = dict(zip(tasks, vec.tolist()))
        else:
            self._global_losses = {t: float(losses[t].detach()) for t in tasks}
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

    # -- epoch-level API -----------------------------------------------------------------------
    def fit_epoch(self, loader: Iterable[Any], loss_fns: Mapping[str, LossFn],
                  checkpoint: str | None = None, checkpoint_every: int | None = None,
                  on_step: Callable[[int, dict[str, float]], None] | None = None
                  ) -> dict[str, Any]:
        """One epoch of the method (a per-epoch method runs all its passes); returns its record.

        With ``checkpoint``, the run is saved there at the end of the epoch and, for per-step
        methods, every ``checkpoint_every`` steps; a trainer resumed from a mid-epoch checkpoint
        continues the epoch where it stopped. Exact continuation needs a loader whose batch
        order depends only on the RNG state when it is iterated (a list, or a ``DataLoader`` with
        its default generator): the RNG state at the start of the epoch is saved, restored to
        re-create the iterator, the finished batches are drawn again and dropped.
        """
        _check_loss_fns(self.surgeon.tasks, loss_fns)
        t0 = time.perf_counter()
        skipped0 = self._progress["skipped0"] if self._progress else self.skipped
        fit = getattr(self.method, "fit_epoch", None)
        if fit is not None:
            if self._progress is not None:
                raise CheckpointError(f"a mid-epoch checkpoint cannot resume the per-epoch "
                                      f"method {self.method_name!r}")
            record = fit(self, self.observer.epoch_loader(loader, loss_fns), loss_fns)
        else:
            record = self._fit_steps(loader, loss_fns, checkpoint, checkpoint_every, on_step,
                                     skipped0)
        record.update(epoch=self.epoch, method=self.method_name, time=time.perf_counter() - t0,
                      skipped=self.skipped, skipped_epoch=self.skipped - skipped0)
        if self.surgeon.importance_bank.trained:
            record["importance"] = {
                layer: {t: float(v.mean()) for t, v in per.items()}
                for layer, per in self.surgeon.importance().items()
            }
        self.sync_buffers()
        end_epoch = getattr(self.method, "end_epoch", None)
        if end_epoch is not None:  # the method's per-epoch statistics (DWA, STCH), every rank
            end_epoch()
        self.observer.end_epoch(record)
        self.history.append(record)
        self.epoch += 1
        if checkpoint is not None:
            self.save_checkpoint(checkpoint)
        return record

    def _fit_steps(self, loader: Iterable[Any], loss_fns: Mapping[str, LossFn],
                   checkpoint: str | None, every: int | None,
                   on_step: Callable[[int, dict[str, float]], None] | None,
                   skipped0: int) -> dict[str, Any]:
        prog = self._progress
        self._progress = None
        if prog is None:
            epoch_rng = ckpt.rng_state()
            start, n, sums = 0, 0, {}
            it = iter(loader)
        else:
            now = ckpt.rng_state()
            epoch_rng, start, n, sums = prog["epoch_rng"], prog["batch"], prog["n"], prog["sums"]
            ckpt.set_rng_state(epoch_rng)
            it = iter(loader)
            for _ in range(start):
                next(it)
            ckpt.set_rng_state(now)
        for b, (inputs, targets) in enumerate(self._bar(it, self.method_name), start):
            stats = self.train_step(inputs, targets, loss_fns)
            if stats is not None:
                n += 1
                for t in self.surgeon.tasks:
                    sums[t] = sums.get(t, 0.0) + stats[f"loss/{t}"]
                if on_step is not None:
                    on_step(self.step_count, stats)
            if checkpoint is not None and every and (b + 1) % every == 0:
                self._progress = {"epoch_rng": epoch_rng, "batch": b + 1, "n": n,
                                  "sums": dict(sums), "skipped0": skipped0}
                self.save_checkpoint(checkpoint)
                self._progress = None
        return {"losses": {t: v / max(n, 1) for t, v in sums.items()}, "passes": 1, "steps": n}

    def sync_buffers(self) -> None:
        """Average the model's floating-point buffers (BatchNorm running statistics) over ranks.

        In train mode each rank's BatchNorm normalises and updates its running statistics with
        its own share of the batch; averaging them at the end of every epoch (``fit_epoch`` does)
        keeps the ranks' models identical for evaluation and checkpoints. A no-op in one process.
        Users with their own loop call it before evaluating.
        """
        floats = [b for b in self.surgeon.model.buffers() if b.is_floating_point()]
        rsdist.all_reduce_mean(floats, self.comm, kind="buffers")

    def _bar(self, loader: Iterable[Any], desc: str) -> Iterable[Any]:
        if not self.progress or rsdist.rank() != 0:
            return loader
        from tqdm.auto import tqdm

        return tqdm(loader, desc=f"epoch {self.epoch} {desc}", leave=False)

    @torch.no_grad()
    def evaluate(self, loader: Iterable[Any],
                 metric_fns: Mapping[str, Callable[[Tensor, Any], float]]) -> dict[str, float]:
        """Mean of each task's metric over ``loader`` in eval mode (batch-size weighted)."""
        was = self.surgeon.training
        self.surgeon.eval()
        totals: dict[str, float] = {}
        count = 0
        try:
            for inputs, targets in loader:
                args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
                with self.autocast():
                    outs = self.task_outputs(self.surgeon.task_forward(*args))
                b = len(next(iter(targets.values())))
                for t, fn in metric_fns.items():
                    totals[t] = totals.get(t, 0.0) + float(fn(outs[t], targets[t])) * b
                count += b
        finally:
            self.surgeon.train(was)
        result = {t: v / max(count, 1) for t, v in totals.items()}
        self.observer.after_evaluate(result)
        if self.history:
            self.history[-1].setdefault("metrics", {}).update(
                {t: {"metric": v} for t, v in result.items()})
        return result

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (see ``save_checkpoint``)."""
        bank = self.surgeon.importance_bank
        return {
            "model": self.surgeon.model.state_dict(),
            "bank": bank.state_dict(), "bank_trained": bank.trained,
            "optimizer": self.optimizer.state_dict(),
            "importance_optimizer": (self.importance_optimizer.state_dict()
                                     if self.importance_optimizer is not None else None),
            "method": self.method.state_dict(),
            "trainer": {"epoch": self.epoch, "step": self.step_count, "skipped": self.skipped,
                        "consecutive_bad": self._consecutive_bad, "history": self.history},
            "progress": self._progress,
            "rng": ckpt.rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        bank = self.surgeon.importance_bank
        self.surgeon.model.load_state_dict(state["model"])
        bank.load_state_dict(state["bank"])
        bank.trained = bool(state["bank_trained"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.importance_optimizer is not None and state["importance_optimizer"] is not None:
            self.importance_optimizer.load_state_dict(state["importance_optimizer"])
        self.method.load_state_dict(state["method"])
        tr = state["trainer"]
        self.epoch, self.step_count, self.skipped = tr["epoch"], tr["step"], tr["skipped"]
        self._consecutive_bad = tr["consecutive_bad"]
        self.history = list(tr["history"])
        self._progress = state["progress"]
        ckpt.set_rng_state(state["rng"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def _fingerprint(self) -> list[Any]:
        return ckpt.fingerprint(self.surgeon.model, self.surgeon.importance_bank)

    def save_checkpoint(self, path: str) -> ckpt.Header | None:
        """Write the run to ``path`` atomically (rank 0 only under torch.distributed).

        Saved: model weights and buffers, importance variables and meta scales, the method's
        state, the optimizers' state, epoch/step, skipped-step counts, history, the torch/numpy/
        Python RNG states and, inside ``fit_epoch``, the position in the epoch.
        """
        header = None
        if rsdist.rank() == 0:
            header = ckpt.write(path, self.state_dict(), fingerprint=self._fingerprint(),
                                tasks=self.surgeon.tasks, method=self.method_name,
                                epoch=self.epoch, step=self.step_count,
                                world_size=rsdist.world_size())
        rsdist.barrier()
        return header

    def load_checkpoint(self, path: str) -> ckpt.Header:
        """Restore the run saved at ``path`` (refused unless of this model, tasks and method).

        Checkpoints are world-size independent: every rank reads the same file.
        """
        header, payload = ckpt.read_payload(path, fingerprint=self._fingerprint(),
                                            tasks=self.surgeon.tasks, method=self.method_name)
        self.load_state_dict(payload)
        return header

    @classmethod
    def resume(cls, path: str, surgeon: Surgeon, optimizer: torch.optim.Optimizer,
               method: str | None = None, **kwargs: Any) -> Trainer:
        """A ``Trainer`` continuing the run saved at ``path`` (method taken from the header)."""
        header = ckpt.read_header(path)
        trainer = cls(surgeon, optimizer, method=method or header.method, **kwargs)
        trainer.load_checkpoint(path)
        return trainer


def _updates_importance(method: Any) -> bool:
    """Whether the method's backward writes the importance variables (Taylor estimate)."""
    return getattr(method, "importance_mode", None) == "taylor"


# -- diagnosis -------------------------------------------------------------------------------------
def diagnose_nonfinite(surgeon: Surgeon, args: Sequence[Any], targets: Mapping[str, Any],
                       loss_fns: Mapping[str, LossFn]) -> str:
    """Name the task and layer where non-finite values first appear on this batch.

    Runs the forward with an fx interpreter (first node whose output is non-finite), then each
    task's loss, then each task's gradient on the parameters (the layer nearest the output whose
    gradient is non-finite). BN statistics and the RNG are restored: nothing is changed.
    """
    import torch.fx as fx

    gm = surgeon.graph_module
    first: list[str] = []

    class Probe(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if (not first and isinstance(out, Tensor) and out.is_floating_point()
                    and not torch.isfinite(out).all()):
                first.append(f"input {n.target!r}" if n.op == "placeholder" else
                             f"layer {n.target!r}" if n.op == "call_module" else
                             f"op {n.name!r} ({n.target})")
            return out

    buffers = {k: v.clone() for k, v in surgeon.model.state_dict().items()}
    rng = torch.random.get_rng_state()
    try:
        with torch.enable_grad():
            out = Probe(gm).run(*args)
            outs = {t: leaf_values(out, surgeon.outputs.task_outputs)[o]
                    for t, o in zip(surgeon.tasks, surgeon.outputs.task_outputs)}
            if first:
                bad = [t for t, v in outs.items() if not torch.isfinite(v).all()]
                return (f"Non-finite values first appear in the forward at {first[0]} "
                        f"(outputs of tasks {bad} non-finite).")
            losses = {t: loss_fns[t](outs[t], targets[t]) for t in surgeon.tasks}
            bad = [t for t, v in losses.items() if not torch.isfinite(v).all()]
            if bad:
                return (f"The model's outputs are finite; the loss function of task {bad[0]!r} "
                        f"returns a non-finite value.")
            named = [(n, p) for n, p in surgeon.model.named_parameters() if p.requires_grad]
            order = {str(n.target): i for i, n in enumerate(gm.graph.nodes)
                     if n.op in ("call_module", "get_attr")}
            for t in surgeon.tasks:
                grads = torch.autograd.grad(losses[t], [p for _, p in named], retain_graph=True,
                                            allow_unused=True)
                layers = {n.rsplit(".", 1)[0] if "." in n else n for (n, _), g in zip(named, grads)
                          if g is not None and not torch.isfinite(g).all()}
                if layers:
                    near = max(layers, key=lambda m: order.get(m, -1))
                    return (f"Task {t!r} back-propagates a non-finite gradient; it first reaches "
                            f"layer {near!r} (layers hit: {sorted(layers)[:5]}).")
        return "The batch is finite on a fresh forward/backward (the fault is not reproducible)."
    finally:
        with torch.no_grad():
            surgeon.model.load_state_dict(buffers)
        torch.random.set_rng_state(rng)
