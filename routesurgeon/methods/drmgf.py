"""``drmgf``: the reference DR-MGF algorithm (Sun et al., arXiv 2305.19844), per cycle.

One cycle (default: one epoch) = a *disentanglement* pass per task from the same start point
theta0, through that task's gated forward, with the auxiliary loss weights; then the *fusion*:
shared weights become ``W0 + sum_t D_t(S) * Delta_t`` with the dominance of the learned importance
and meta scales S, S learned over a pass of training batches through a functional forward of the
fused weights; BN statistics moment-matched across the task snapshots, then re-estimated by that
pass. After ``route_epochs`` the forward is plain, A is frozen and parameters are smoothed by EMA.
See ``../shared/method/drmgf.md`` section 3 for the equations and our decisions.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from routesurgeon.errors import LossError
from routesurgeon.importance import dominance
from routesurgeon.methods.registry import register_method

__all__ = ["DRMGF", "DRMGFConfig"]


@dataclass(frozen=True)
class DRMGFConfig:
    """Hyperparameters of the reference algorithm (the authors' defaults)."""

    alpha: float = 0.5  # weight of the other tasks' losses in a disentanglement pass
    loss_weights: Mapping[str, float] | None = None  # lambda_t, default 1
    epochs: int | None = None  # total epochs planned; route_epochs defaults to half of it
    route_epochs: int | None = None  # epochs with the gated forward (None: epochs // 2, or all)
    ema: float = 0.9  # after route_epochs: p = (1 - ema) * p_new + ema * p_start
    # What the EMA smooths. "importance": A and S (the authors' code: model_segnet_mt_DRMGF.py
    # lines 514-518 smooth the weighting model's parameters, not the network's); "model": every
    # model parameter towards its value at the start of the cycle.
    ema_target: str = "importance"
    s_lr: float = 0.1  # Adam lr of the meta scales S
    importance_lr: float | None = None  # Adam lr of A (default: the model optimizer's lr)
    task_order: Sequence[str] | None = None
    cycle_steps: int | None = None  # disentangle/fuse cycle length in batches (None: an epoch)
    s_batches: int | None = None  # batches of the S pass (None: the whole cycle)
    delta_dtype: str = "float32"  # "bfloat16" halves the displacement memory
    delta_device: str | None = None  # e.g. "cpu" to offload displacements


@register_method("drmgf")
class DRMGF:
    """Per-cycle disentanglement and meta-weighted fusion (a per-epoch method)."""

    name = "drmgf"

    def __init__(self, context: Any, **config: Any) -> None:
        self.cfg = DRMGFConfig(**config)
        if self.cfg.ema_target not in ("importance", "model"):
            raise ValueError(
                f"ema_target must be 'importance' or 'model', got {self.cfg.ema_target!r}"
            )
        self.surgeon = context
        self.tasks = list(context.tasks)
        order = list(self.cfg.task_order or self.tasks)
        if sorted(order) != sorted(self.tasks):
            raise ValueError(f"task_order {order} must be a permutation of {self.tasks}")
        self.order = order
        self.bank = context.importance_bank
        self.params = {n: p for n, p in context.model.named_parameters() if p.requires_grad}
        self.tasks_of = context.param_tasks()
        self._imp_opt: torch.optim.Optimizer | None = None
        self._s_opt: torch.optim.Optimizer | None = None

    # -- the GradientMethod surface the trainer also uses ---------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return []

    def after_step(self, losses: Mapping[str, Tensor], recompute: Any = None) -> None:
        pass

    def backward(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        raise NotImplementedError(
            "drmgf is a per-epoch algorithm (disentanglement passes + fusion): use "
            "trainer.fit_epoch(loader, loss_fns); for a per-step API use method='drmgf-step'"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"imp_opt": self._imp_opt.state_dict() if self._imp_opt else None,
                "s_opt": self._s_opt.state_dict() if self._s_opt else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # the optimizers are built lazily by fit_epoch: keep the state until then
        self._pending_state: Mapping[str, Any] | None = state
        if self._imp_opt is not None:
            self._load_pending()

    def _load_pending(self) -> None:
        state = getattr(self, "_pending_state", None)
        self._pending_state = None
        if state and state.get("imp_opt") and self._imp_opt is not None:
            self._imp_opt.load_state_dict(state["imp_opt"])
        if state and state.get("s_opt") and self._s_opt is not None:
            self._s_opt.load_state_dict(state["s_opt"])

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
        with torch.no_grad():
            start = torch._foreach_mul([p.detach() for p in plist], 1.0)  # one fused copy
        theta0 = dict(zip(names, start, strict=True))
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
                if routed:
                    with s.route(t):
                        outs = trainer.task_outputs(s(*args))
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
                total.backward()
                imp = list(self._imp_opt.param_groups[0]["params"]) if routed else []  # type: ignore[union-attr]
                if not trainer.guard_step(trainer.optimizer_params() + imp, f" in the {t} pass"):
                    continue
                trainer._consecutive_bad = 0
                trainer.optimizer.step()
                if routed:
                    self._imp_opt.step()  # type: ignore[union-attr]
                trainer.step_count += 1
                losses[t].append(float(task_losses[t].detach()))
            with torch.no_grad():
                if routed:
                    for name, w in s.importance_bank.gated_weights(self.params, t).items():
                        self.params[name].copy_(w)
                route = [n for n in names if t in self.tasks_of.get(n, ())]
                diffs = torch._foreach_sub([self.params[n].detach() for n in route],
                                           [theta0[n] for n in route])
                deltas[t] = {n: d.to(dtype=dtype, device=self.cfg.delta_device)
                             for n, d in zip(route, diffs, strict=True)}
                bn_snaps[t] = {n: b.detach().clone() for n, b in s.model.named_buffers()
                               if n.endswith(("running_mean", "running_var"))}
        self._fuse(trainer, batches, loss_fns, theta0, deltas, bn_snaps)
        if not routed:  # phase 2: EMA towards the cycle's start
            e = self.cfg.ema
            with torch.no_grad():
                if self.cfg.ema_target == "importance":
                    for p, p0 in zip(bank_params, bank0, strict=True):
                        p.copy_((1 - e) * p + e * p0)
                else:
                    for n, p in self.params.items():
                        p.copy_((1 - e) * p + e * theta0[n])

    # -- fusion ----------------------------------------------------------------------------------
    def fused(self, theta0: Mapping[str, Tensor], deltas: Mapping[str, Mapping[str, Tensor]],
              only: set[str] | None = None, skip: set[str] | None = None) -> dict[str, Tensor]:
        """Fused parameters as a differentiable function of S (A detached); ``only`` / ``skip``
        restrict which parameters are computed."""
        out: dict[str, Tensor] = {}
        bank = self.bank
        for n, p0 in theta0.items():
            if (only is not None and n not in only) or (skip is not None and n in skip):
                continue
            tasks = [t for t in self.tasks if n in deltas.get(t, {})]
            if not tasks:
                out[n] = p0
                continue
            if len(tasks) == 1:
                out[n] = p0 + deltas[tasks[0]][n].to(p0)
            elif n in bank.tasks_of or n in bank.norm_tasks:
                order = bank.tasks_of.get(n) or bank.norm_tasks[n]
                if n in bank.tasks_of:
                    d = dominance([a.detach() for a in bank.a(n)], bank.s(n))
                else:
                    d = bank.dominance(n)
                out[n] = _Mix.apply(p0, d, *[deltas[t][n].to(p0) for t in order])
            else:
                out[n] = p0 + sum(deltas[t][n].to(p0) for t in tasks) / len(tasks)
        return out

    def _fuse(self, trainer: Any, batches: Iterable[Any], loss_fns: Mapping[str, Any],
              theta0: Mapping[str, Tensor], deltas: Mapping[str, Mapping[str, Tensor]],
              bn_snaps: Mapping[str, Mapping[str, Tensor]]) -> None:
        s = self.surgeon
        self._merge_bn(bn_snaps)
        s.train()
        n_batches = 0
        in_graph = {n for n, _ in s.graph_module.named_parameters()}
        bank = self.bank
        # only shared weights and norms depend on S: fuse the rest once
        dynamic = {n for n in in_graph if (n in bank.tasks_of or n in bank.norm_tasks)
                   and sum(n in deltas.get(t, {}) for t in self.tasks) > 1}
        with torch.no_grad():
            static = {n: v for n, v in self.fused(theta0, deltas, skip=dynamic).items()
                      if n in in_graph}
        for inputs, targets in trainer._bar(batches, "fuse"):
            if self.cfg.s_batches is not None and n_batches >= self.cfg.s_batches:
                break
            args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
            self._s_opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            params = {**static, **self.fused(theta0, deltas, only=dynamic)}
            out = torch.func.functional_call(s.graph_module, params, args, strict=False)
            outs = trainer.task_outputs(out)
            task_losses = {k: loss_fns[k](outs[k], targets[k]) for k in self.tasks}
            trainer._batch = None
            if not trainer.check_step_losses(task_losses, " in the fusion pass"):
                continue
            sum(task_losses.values()).backward()
            scales = list(self.surgeon.scale_parameters())
            if not trainer.guard_step(scales, " of the meta scales S in the fusion pass"):
                continue
            trainer._consecutive_bad = 0
            self._s_opt.step()  # type: ignore[union-attr]
            n_batches += 1
        with torch.no_grad():
            final = {**self.fused(theta0, deltas, skip=set(static) | dynamic), **static,
                     **self.fused(theta0, deltas, only=dynamic)}
            names = list(final)
            torch._foreach_copy_([self.params[n] for n in names], [final[n] for n in names])

    def _merge_bn(self, snaps: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Moment-matched mean of the running statistics of the snapshots of the tasks whose
        route holds the norm (all tasks for a norm without affine weight), as the authors'
        ``fusing_bn_new`` does (DRMGF_multi_task_0202_fusionextra.py lines 405-445)."""
        if not snaps:
            return
        buffers = dict(self.surgeon.model.named_buffers())
        first = next(iter(snaps.values()))
        with torch.no_grad():
            for n in first:
                if not n.endswith("running_mean"):
                    continue
                prefix = n[: -len("running_mean")]
                v = prefix + "running_var"
                reach = self.tasks_of.get(prefix + "weight", frozenset())
                tasks = [t for t in snaps if t in reach] or list(snaps)
                means = torch.stack([snaps[t][n] for t in tasks])
                mean = means.mean(0)
                buffers[n].copy_(mean)
                if v in first:
                    second = torch.stack([snaps[t][v] + snaps[t][n] ** 2 for t in tasks]).mean(0)
                    buffers[v].copy_((second - mean**2).clamp_min(0))


class _Mix(torch.autograd.Function):
    """``W0 + sum_t D_t * Delta_t`` (D per filter or connection), differentiable in D only.

    Forward: T in-place ``addcmul_`` into one copy of W0; backward: one dot product per task and
    slice. Each displacement is read once per direction and no [T, ...] temporary is
    built: the S pass is bound by reading the displacements.
    """

    @staticmethod
    def forward(ctx: Any, p0: Tensor, d: Tensor, *parts: Tensor) -> Tensor:
        g = d[0].numel()
        out = p0.detach().reshape(g, -1).clone()
        for j, part in enumerate(parts):
            out.addcmul_(d[j].detach().reshape(g, 1), part.reshape(g, -1))
        ctx.save_for_backward(d, *parts)
        return out.reshape(p0.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        d, *parts = ctx.saved_tensors
        g = d[0].numel()
        grad_d = None
        if ctx.needs_input_grad[1]:
            flat = grad.reshape(g, -1)
            buf = torch.empty_like(flat)  # one full-size buffer for the T products
            grad_d = torch.stack([torch.mul(flat, part.reshape(g, -1), out=buf).sum(-1)
                                  for part in parts]).reshape(d.shape)
        grad_p0 = grad if ctx.needs_input_grad[0] else None
        return (grad_p0, grad_d, *([None] * len(parts)))


def _nonfinite(losses: Mapping[str, Tensor]) -> list[str]:
    bad = []
    for t, v in losses.items():
        if not isinstance(v, Tensor) or v.dim() != 0:
            raise LossError(f"loss of task {t!r} must be a scalar tensor")
        if not torch.isfinite(v.detach()).item():
            bad.append(t)
    return bad
