"""``drmgf``: the reference DR-MGF algorithm (Sun et al., arXiv 2305.19844), per cycle.

One cycle (default: one epoch) = a *disentanglement* pass per task from the same start point
theta0, through that task's gated forward, with the auxiliary loss weights; then the *fusion*:
shared weights become ``W0 + sum_t D_t(S) * Delta_t`` with the dominance of the learned importance
and meta scales S, S learned over a pass of training batches through a functional forward of the
fused weights; BN statistics moment-matched across the task snapshots, then re-estimated by that
pass. After ``route_epochs`` the forward is plain, A is frozen and parameters are smoothed by EMA.
See ``../shared/method/drmgf.md`` section 3 for the equations and our decisions.

The epoch and cycle loop (the disentanglement passes) lives in
``routesurgeon.methods._drmgf_cycle``; the fusion, its kernel ``_Mix`` and the workspace here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from routesurgeon.errors import LossError
from routesurgeon.importance import dominance, importance_share
from routesurgeon.methods._drmgf_cycle import _Cycles
from routesurgeon.methods.registry import register_method
from routesurgeon.precision import scaled

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
    # Keep the theta0 and displacement buffers between cycles (T + 1 copies of the route
    # parameters stay allocated; the per-epoch peak is the same): fresh memory for them every
    # cycle costs a page fault per page. False frees them after each cycle.
    keep_workspace: bool = True


@register_method("drmgf")
class DRMGF(_Cycles):
    """Per-cycle disentanglement and meta-weighted fusion (a per-epoch method)."""

    name = "drmgf"
    #: under a process group the trainer averages the model gradients of each disentanglement
    #: step and the S gradients of each fusion step: linear in the per-sample gradients
    data_parallel = "gradients"
    #: under fp16 every pass scales its loss by the trainer's GradScaler and steps through it
    supports_loss_scale = True
    grad_scale = 1.0

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
        self._named = dict(context.model.named_parameters())
        self.params = {n: p for n, p in self._named.items() if p.requires_grad}
        self.tasks_of = context.param_tasks()
        self._imp_opt: torch.optim.Optimizer | None = None
        self._work: dict[str, dict[str, Tensor]] = {}  # see _buffers
        self._s_opt: torch.optim.Optimizer | None = None

    # -- the GradientMethod surface the trainer also uses ---------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return []

    def compile_unsupported(self, cfg: Any) -> str | None:
        return ("its disentanglement passes run each task's gated forward through "
                "torch.func.functional_call with that task's gates, and its fusion pass a "
                "functional call over weights rewritten in place every batch: compiled, it "
                "would recompile per task and per batch. Train drmgf eagerly, or use "
                "method='drmgf-step', which compiles")

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

    # -- workspace -------------------------------------------------------------------------------
    def _buffers(self, key: str, names: Sequence[str], dtype: torch.dtype | None,
                 device: str | None) -> dict[str, Tensor]:
        """Uninitialised buffers shaped like the parameters ``names`` (theta0, a task's
        displacements), kept between cycles when ``keep_workspace``: new memory costs page
        faults on every first touch, the same buffers do not."""
        have = self._work.get(key)
        want = {n: (self.params[n].shape, dtype or self.params[n].dtype,
                    torch.device(device) if device else self.params[n].device) for n in names}
        if have is None or list(have) != list(want) or any(
                (b.shape, b.dtype, b.device) != want[n] for n, b in have.items()):
            have = {n: torch.empty(sh, dtype=dt, device=dev) for n, (sh, dt, dev) in want.items()}
            self._work[key] = have
        return have

    def held_bytes(self) -> int:
        """Bytes of theta0 and displacement buffers kept between cycles (``keep_workspace``)."""
        return sum(b.numel() * b.element_size() for bufs in self._work.values()
                   for b in bufs.values())

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
                out[n] = _Mix.apply(p0, d, None, *[deltas[t][n] for t in order])
            else:
                out[n] = p0 + sum(deltas[t][n].to(p0) for t in tasks) / len(tasks)
        return out

    def _fuse(self, trainer: Any, batches: Iterable[Any], loss_fns: Mapping[str, Any],
              theta0: Mapping[str, Tensor], deltas: Mapping[str, Mapping[str, Tensor]],
              bn_snaps: Mapping[str, Mapping[str, Tensor]]) -> None:
        """The fused parameters are written into the live ones: first, once, every one that does
        not depend on S; then, per batch of the S pass, the shared weights and norms as a
        differentiable function of S (``_Mix`` into the parameter's own storage); last, those
        again with the learned S."""
        s = self.surgeon
        self._merge_bn(bn_snaps)
        s.train()
        n_batches = 0
        in_graph = {n for n, _ in s.graph_module.named_parameters()}
        bank = self.bank
        # only shared weights and norms depend on S
        dynamic = [n for n in theta0 if n in in_graph
                   and (n in bank.tasks_of or n in bank.norm_tasks)
                   and sum(n in deltas.get(t, {}) for t in self.tasks) > 1]
        with torch.no_grad():
            static = self.fused(theta0, deltas, skip=set(dynamic))
            names = list(static)
            torch._foreach_copy_([self.params[n] for n in names], [static[n] for n in names])
            del static
        dominances = self._dominances(dynamic)
        for inputs, targets in trainer._bar(batches, "fuse"):
            if self.cfg.s_batches is not None and n_batches >= self.cfg.s_batches:
                break
            args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
            self._s_opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            ds = dominances()
            params = {n: self._mix(n, theta0, deltas, ds[n]) for n in dynamic}
            with trainer.autocast():
                out = torch.func.functional_call(s.graph_module, params, args, strict=False)
                outs = trainer.task_outputs(out)
                task_losses = {k: loss_fns[k](outs[k], targets[k]) for k in self.tasks}
            trainer._batch = None
            if not trainer.check_step_losses(task_losses, " in the fusion pass"):
                continue
            scaled(sum(task_losses.values()), trainer.loss_scale).backward()  # type: ignore[arg-type]
            del params, out, outs
            scales = list(self.surgeon.scale_parameters())
            if not trainer.guard_step(scales, " of the meta scales S in the fusion pass",
                                      optimizers=[self._s_opt]):
                continue
            trainer._consecutive_bad = 0
            trainer.optimizer_step([self._s_opt])
            n_batches += 1
        with torch.no_grad():
            ds = dominances()
            for n in dynamic:
                self._mix(n, theta0, deltas, ds[n])

    def _mix(self, n: str, theta0: Mapping[str, Tensor],
             deltas: Mapping[str, Mapping[str, Tensor]], d: Tensor) -> Tensor:
        """The fused value of the shared weight or norm ``n`` with dominance ``d``, written into
        the live parameter (through a fresh detached alias, so no batch's graph reaches
        another's)."""
        order = self.bank.tasks_of.get(n) or self.bank.norm_tasks[n]
        return _Mix.apply(theta0[n], d, self.params[n].detach(),
                          *[deltas[t][n] for t in order])

    def _dominances(self, names: Sequence[str]) -> Any:
        """A function giving the dominance D of every name in ``names`` from the current S, as
        ``ImportanceBank.dominance`` computes it with A detached, in a few batched ops: the
        A factor ``|A_t| / sum_inputs |A_t|`` (1 / size for norms) is fixed during the S pass,
        so per batch only ``pi = factor * |S|`` and its normalisation over tasks are computed,
        over all the names sharing one task set at once."""
        bank = self.bank
        groups: dict[tuple[str, ...], list[str]] = {}
        for n in names:
            groups.setdefault(tuple(bank.tasks_of.get(n) or bank.norm_tasks[n]), []).append(n)
        plans = []
        with torch.no_grad():
            for members in groups.values():
                factors = []
                for n in members:
                    amps = ([a.detach() for a in bank.a(n)] if n in bank.tasks_of
                            else [torch.ones_like(sc) for sc in bank.s(n)])
                    factors.append(torch.stack([importance_share(m).reshape(-1)
                                                for m in amps]))
                plans.append((members, torch.cat(factors, 1),
                              [f.shape[1] for f in factors]))

        def compute() -> dict[str, Tensor]:
            out: dict[str, Tensor] = {}
            for members, factor, sizes in plans:
                per_task = zip(*[bank.s(n) for n in members], strict=True)
                scales = torch.stack([torch.cat([x.reshape(-1) for x in xs]) for xs in per_task])
                pi = factor * scales.abs()
                d = pi / pi.sum(dim=0, keepdim=True).clamp_min(1e-30)
                for n, part in zip(members, d.split(sizes, dim=1), strict=True):
                    out[n] = part.reshape(-1, *bank.s(n)[0].shape)
            return out

        return compute

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

    ``_Mix.apply(p0, d, into, *parts)``: written into ``into`` when it is given (a detached
    alias of the live parameter, marked dirty) so the S pass allocates no weight-size tensor
    per batch; else into a new tensor. Forward: one ``addcmul`` and T - 1 in-place ones;
    backward: per task one dot product per slice, in row blocks through one small buffer that
    stays in cache. Each displacement is read once per direction and no [T, ...] temporary is
    built: the S pass is bound by reading the displacements.
    """

    @staticmethod
    def forward(ctx: Any, p0: Tensor, d: Tensor, into: Tensor | None, *parts: Tensor) -> Tensor:
        g = d[0].numel()
        if into is None:
            out = torch.empty_like(p0, memory_format=torch.contiguous_format)
        else:
            out = into
            ctx.mark_dirty(into)
        flat = out.view(g, -1)
        dd = d.detach()
        torch.addcmul(p0.detach().reshape(g, -1), dd[0].reshape(g, 1),
                      parts[0].reshape(g, -1).to(out), out=flat)
        for j in range(1, len(parts)):
            flat.addcmul_(dd[j].reshape(g, 1), parts[j].reshape(g, -1).to(out))
        ctx.save_for_backward(d, *parts)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        d, *parts = ctx.saved_tensors
        grad_d = None
        if ctx.needs_input_grad[1]:
            g = d[0].numel()
            flat = grad.reshape(g, -1)
            grad_d = torch.empty((len(parts), g), dtype=grad.dtype, device=grad.device)
            rows = max(1, _BLOCK // max(flat.shape[1], 1))
            buf = torch.empty((min(rows, g), flat.shape[1]), dtype=grad.dtype,
                              device=grad.device)
            flats = [part.reshape(g, -1) for part in parts]
            for r in range(0, g, rows):
                block = flat[r:r + rows]
                b = buf[: block.shape[0]]
                for j, part in enumerate(flats):
                    torch.mul(block, part[r:r + rows].to(grad), out=b)
                    torch.sum(b, -1, out=grad_d[j, r:r + rows])
            grad_d = grad_d.reshape(d.shape)
        grad_p0 = grad if ctx.needs_input_grad[0] else None
        return (grad_p0, grad_d, None, *([None] * len(parts)))


_BLOCK = 1 << 20  # elements per row block of the S-gradient products (4 MB in float32)


def _nonfinite(losses: Mapping[str, Tensor]) -> list[str]:
    bad = []
    for t, v in losses.items():
        if not isinstance(v, Tensor) or v.dim() != 0:
            raise LossError(f"loss of task {t!r} must be a scalar tensor")
        if not torch.isfinite(v.detach()).item():
            bad.append(t)
    return bad
