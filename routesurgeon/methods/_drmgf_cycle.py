"""One ``drmgf`` epoch as disentangle/fuse cycles: the per-task disentanglement passes from
theta0, then the fusion (``DRMGF._fuse``) and, after ``route_epochs``, the EMA."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from routesurgeon.guards import check_call_inputs, shape_error
from routesurgeon.precision import scaled

if TYPE_CHECKING:
    from routesurgeon.methods.drmgf import DRMGFConfig


class _Cycles:
    """The epoch and cycle loop of :class:`~routesurgeon.methods.drmgf.DRMGF` (a mixin: the
    attributes and the methods below are ``DRMGF``'s)."""

    cfg: DRMGFConfig
    surgeon: Any
    tasks: list[str]
    order: list[str]
    bank: Any
    params: dict[str, Any]
    tasks_of: Any
    _named: dict[str, Any]
    _imp_opt: torch.optim.Optimizer | None
    _s_opt: torch.optim.Optimizer | None
    _work: dict[str, dict[str, Tensor]]

    if TYPE_CHECKING:
        def _load_pending(self) -> None: ...

        def _buffers(self, key: str, names: Sequence[str], dtype: torch.dtype | None,
                     device: str | None) -> dict[str, Tensor]: ...

        def _fuse(self, trainer: Any, batches: Iterable[Any], loss_fns: Mapping[str, Any],
                  theta0: Mapping[str, Tensor], deltas: Mapping[str, Mapping[str, Tensor]],
                  bn_snaps: Mapping[str, Mapping[str, Tensor]]) -> None: ...

    # -- one epoch ---------------------------------------------------------------------------------
    def _route_phase(self, epoch: int) -> bool:
        r = self.cfg.route_epochs
        if r is None:
            r = self.cfg.epochs // 2 if self.cfg.epochs else None
        return r is None or epoch < r

    def fit_epoch(self, trainer: Any, loader: Iterable[Any], loss_fns: Mapping[str, Any]
                  ) -> dict[str, Any]:
        if self._imp_opt is None:
            lr = self.cfg.importance_lr or trainer.optimizer.param_groups[0]["lr"]
            # foreach: one fused update over the many small A / S tensors (not the default on CPU)
            self._imp_opt = torch.optim.Adam(self.surgeon.importance_parameters(), lr=lr,
                                             foreach=True)
            self._s_opt = torch.optim.Adam(self.surgeon.scale_parameters(), lr=self.cfg.s_lr,
                                           foreach=True)
            self._load_pending()
        routed = self._route_phase(trainer.epoch)
        losses: dict[str, list[float]] = {t: [] for t in self.tasks}
        if self.cfg.cycle_steps is None:
            self._cycle(trainer, loader, loss_fns, routed, losses)
        else:
            it = iter(loader)
            while chunk := list(itertools.islice(it, self.cfg.cycle_steps)):
                self._cycle(trainer, chunk, loss_fns, routed, losses)
        self.bank.trained = True
        return {"losses": {t: sum(v) / max(len(v), 1) for t, v in losses.items()},
                "passes": len(self.tasks) + 1, "routed": routed}

    def _cycle(self, trainer: Any, batches: Iterable[Any], loss_fns: Mapping[str, Any],
               routed: bool, losses: dict[str, list[float]]) -> None:
        s = self.surgeon
        names = list(self.params)
        plist = [self.params[n] for n in names]
        theta0 = self._buffers("theta0", names, None, None)
        start = list(theta0.values())
        with torch.no_grad():
            torch._foreach_copy_(start, [p.detach() for p in plist])
        bank_params = [*self.bank.A.values(), *self.bank.S.values()]
        bank0 = [p.detach().clone() for p in bank_params]
        dtype = getattr(torch, self.cfg.delta_dtype)
        deltas: dict[str, dict[str, Tensor]] = {}
        bn_snaps: dict[str, dict[str, Tensor]] = {}
        weights = self.cfg.loss_weights or {}
        for i, t in enumerate(self.order):
            if i:  # the first pass starts at theta0 already
                with torch.no_grad():
                    torch._foreach_copy_(plist, start)
            s.train()
            for inputs, targets in trainer._bar(batches, f"disentangle {t}"):
                trainer.optimizer.zero_grad(set_to_none=True)
                if routed:
                    self._imp_opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
                args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
                with trainer.autocast():
                    if routed:
                        outs = trainer.task_outputs(self._routed_forward(t, tuple(args)))
                    else:
                        outs = trainer.task_outputs(s(*args))
                    task_losses = {k: loss_fns[k](outs[k], targets[k]) for k in self.tasks}
                trainer._batch = (tuple(args), targets, loss_fns)  # for the guard's diagnosis
                if not trainer.check_step_losses(task_losses, f" in the {t} pass"):
                    continue
                total = sum(
                    weights.get(k, 1.0) * (1.0 if k == t else self.cfg.alpha) * v
                    for k, v in task_losses.items()
                )
                scaled(total, trainer.loss_scale).backward()  # type: ignore[arg-type]
                imp = list(self._imp_opt.param_groups[0]["params"]) if routed else []  # type: ignore[union-attr]
                opts = [trainer.optimizer, *([self._imp_opt] if routed else [])]
                if not trainer.guard_step(trainer.optimizer_params() + imp, f" in the {t} pass",
                                          optimizers=opts):
                    continue
                trainer._consecutive_bad = 0
                trainer.optimizer_step(opts)
                trainer.step_count += 1
                losses[t].append(float(task_losses[t].detach()))
            with torch.no_grad():
                if routed:
                    self.bank.bake_(self.params, t)
                route = [n for n in names if t in self.tasks_of.get(n, ())]
                deltas[t] = self._buffers(f"delta:{t}", route, dtype, self.cfg.delta_device)
                for n, buf in deltas[t].items():
                    p = self.params[n].detach()
                    if buf.dtype == p.dtype and buf.device == p.device:
                        torch.sub(p, theta0[n], out=buf)
                    else:
                        buf.copy_(p - theta0[n])
                bn_snaps[t] = {n: b.detach().clone() for n, b in s.model.named_buffers()
                               if n.endswith(("running_mean", "running_var"))}
        self._fuse(trainer, batches, loss_fns, theta0, deltas, bn_snaps)
        if not self.cfg.keep_workspace:
            self._work.clear()
        if not routed:  # phase 2: EMA towards the cycle's start
            e = self.cfg.ema
            with torch.no_grad():
                if self.cfg.ema_target == "importance":
                    for p, p0 in zip(bank_params, bank0, strict=True):
                        p.copy_((1 - e) * p + e * p0)
                else:
                    for n, p in self.params.items():
                        p.copy_((1 - e) * p + e * theta0[n])

    def _routed_forward(self, task: str, args: tuple[Any, ...]) -> Any:
        """What ``with surgeon.route(task): surgeon(*args)`` computes, through the importance
        bank's gated call (filter gates applied to the activations where that is exact)."""
        s = self.surgeon
        check_call_inputs(s.model, s._example_meta, args, {})
        if s.traced.specialized:
            s._check_shapes(args, {})
        try:
            return self.bank.gated_call(s.graph_module, self._named, task, args)
        except RuntimeError as e:
            err = shape_error(s._example_meta, args, {}, e)
            if err is None:
                raise
            raise err from e
