"""How ``drmgf-step`` learns its importance: a first-order (Taylor) estimate or the gated forward.

* ``importance="taylor"``: :func:`taylor_score` per shared filter and task, free given the
  per-task activation gradients of the fused backward; :func:`ema_update` folds it into A.
* ``importance="gated"``: :func:`gated_importance_step`, one Adam step on every A per task from
  that task's gated forward of the batch (``L_t + alpha * sum_{j != t} L_j``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from routesurgeon.importance import _key
from routesurgeon.precision import scaled

__all__ = ["ema_update", "gated_importance_step", "taylor_score"]


def taylor_score(y: Tensor, g: Tensor, axis: int) -> Tensor:
    """First-order effect of each filter on a task loss: |sum over positions of y * delta|,
    summed over the batch (in float32 under autocast: reduced 16-bit products lose digits)."""
    if y.dtype in (torch.float16, torch.bfloat16):
        y, g = y.float(), g.float()
    if y.dim() == 4 and axis == 1:  # (B, C, H, W): no full-size temporary
        return torch.einsum("bchw,bchw->bc", y, g).abs().sum(0)
    dims = [d for d in range(y.dim()) if d not in (0, axis)]
    contrib = y * g
    return (contrib.sum(dim=dims) if dims else contrib).abs().sum(0)


def ema_update(bank: Any, scores: Iterable[tuple[str, str, Tensor]], ema: float,
               grad_scale: float) -> None:
    """A_t <- ema * A_t + (1 - ema) * score for each ``(layer, task, score)`` (scores unscaled
    by ``grad_scale``); A of connection granularity (not 1-D) is left alone."""
    with torch.no_grad():
        for name, t, score in scores:
            a = bank.A[_key(name, t)]
            if a.dim() == 1:
                a.mul_(ema).add_(score.to(a.dtype), alpha=(1 - ema) / grad_scale)


def gated_importance_step(bank: Any, a_params: list[Tensor], opt: torch.optim.Optimizer,
                          surgeon: Any, tasks: Sequence[str],
                          recompute: Callable[[], Mapping[str, Tensor]], alpha: float,
                          grad_scale: float, reduce_mean: Callable[[Sequence[Tensor]], None]
                          ) -> None:
    """One step of ``opt`` on ``a_params`` per task, from that task's gated forward."""
    s = surgeon
    for t in tasks:
        with s.route(t):
            task_losses = recompute()
        total = task_losses[t] + alpha * sum(v for k, v in task_losses.items() if k != t)
        scale = grad_scale  # float16: A's gradient through the scaled loss, unscaled
        grads: list[Tensor | None] = list(
            torch.autograd.grad(scaled(total, scale), a_params, allow_unused=True))
        if scale != 1.0:
            if not all(torch.isfinite(g).all() for g in grads if g is not None):
                continue  # overflow: this task's A step is dropped, as the scaler would
            grads = [g / scale if g is not None else None for g in grads]
        # under a process group, one all-reduce: the global batch's gradient of A is the
        # mean of the ranks' (the losses are means over equal shares; every rank leaves the
        # same A unused), and the loss rides along so all ranks take the same skip decision
        loss = total.detach().reshape(1).clone()
        reduce_mean([loss, *(g for g in grads if g is not None)])
        if not torch.isfinite(loss).all():
            continue
        for p, g in zip(a_params, grads):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
    bank.trained = True
