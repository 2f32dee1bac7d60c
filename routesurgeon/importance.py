"""Task-specific importance variables and the dynamic-route algebra of DR-MGF.

For every shared conv/linear weight W (two or more tasks reach it) and every task t sharing it:
``A_t`` (learnable importance, init: the L2 norm of each filter or connection) and ``S_t`` (meta
scale, init ``s0``). Shared norm layers get ``S_t`` only (their ``A`` is 1). See
``../shared/method/drmgf.md`` sections 1-3; the equations are implemented here once and used by
both the reference algorithm and the per-step variant.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ImportanceBank", "RouteConfig", "dominance", "gate", "lrn"]


@dataclass(frozen=True)
class RouteConfig:
    """Hyperparameters of the dynamic routes (the authors' defaults)."""

    granularity: str = "filter"  # "filter" (A_t: [O]) or "connection" (A_t: [O, I])
    rho: float = 10.0
    beta: float = 1e-4
    gamma: float = 0.75
    s0: float = 1e-3

    def __post_init__(self) -> None:
        if self.granularity not in ("filter", "connection"):
            raise ValueError(
                f"granularity must be 'filter' or 'connection', got {self.granularity!r}"
            )


def _norm_dims(weight: Tensor, granularity: str) -> tuple[int, ...]:
    """Dims reduced by the per-filter (or per-connection) norm of a conv/linear weight."""
    start = 1 if granularity == "filter" else 2
    return tuple(range(start, weight.dim()))


def unit_kernel(weight: Tensor, granularity: str, eps: float = 1e-12) -> Tensor:
    """W / ||W||, the norm per filter or per connection."""
    dims = _norm_dims(weight, granularity)
    if not dims:  # a linear weight at connection granularity: each entry is a connection
        return weight / weight.abs().clamp_min(eps)
    return weight / torch.linalg.vector_norm(weight, dim=dims, keepdim=True).clamp_min(eps)


def slice_norms(weight: Tensor, granularity: str) -> Tensor:
    """The L2 norm of each filter ([O]) or each connection ([O, I])."""
    dims = _norm_dims(weight, granularity)
    w = weight.detach()
    return w.abs() if not dims else torch.linalg.vector_norm(w, dim=dims)


def lrn(a: Tensor, beta: float, gamma: float) -> Tensor:
    """P = |A| / (1 + beta * sum_inputs |A|) ** gamma.

    At connection granularity the sum runs over a filter's inputs; at filter granularity A has no
    input axis, so each filter is normalised by its own magnitude.
    """
    mag = a.abs()
    total = mag.sum(dim=-1, keepdim=True) if a.dim() == 2 else mag
    return mag / (1.0 + beta * total) ** gamma


def gate(importances: Sequence[Tensor], t: int, cfg: RouteConfig) -> Tensor:
    """G_t = (rho * P_t + sum_{j != t} P_j) / (rho + n - 1)."""
    ps = [lrn(a, cfg.beta, cfg.gamma) for a in importances]
    n = len(ps)
    others = sum(p for j, p in enumerate(ps) if j != t)
    return (cfg.rho * ps[t] + others) / (cfg.rho + n - 1)


def gated_weight(weight: Tensor, importances: Sequence[Tensor], t: int, cfg: RouteConfig
                 ) -> Tensor:
    """W_eff_t = G_t * W / ||W|| (G broadcast over the kernel).

    Computed by ``_GatedKernel``: one norm and one product forward, and a closed-form backward of
    two full-size products, instead of autograd's chain through the division and the norm (the
    per-weight elementwise work dominates this reparametrisation on small inputs).
    """
    g = gate(importances, t, cfg)
    g = g.reshape(*g.shape, *([1] * (weight.dim() - g.dim())))
    return _GatedKernel.apply(weight, g, _norm_dims(weight, cfg.granularity))


class _GatedKernel(torch.autograd.Function):
    """``g * W / max(||W||, eps)``, the norm over ``dims`` (elementwise ``|W|`` when empty).

    Backward, with ``n = ||W||``, ``c = max(n, eps)`` and ``dot = sum_dims(grad * W)``:
    ``dL/dg = dot / c`` and ``dL/dW = grad * g / c - W * g * dot / n**3`` (the second term only
    where ``n > eps``, where the clamp passes the gradient).
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, g: Tensor, dims: tuple[int, ...]) -> Tensor:
        n = weight.abs() if not dims else torch.linalg.vector_norm(weight, dim=dims, keepdim=True)
        c = n.clamp_min(_EPS)
        ctx.dims = dims
        ctx.save_for_backward(weight, g, n, c)
        return weight * (g / c)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        weight, g, n, c = ctx.saved_tensors
        need_w, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # one full-size buffer: grad * W (summed per slice), then reused for dL/dW
        buf = torch.mul(grad, weight)
        dot = buf.sum(dim=ctx.dims, keepdim=True) if ctx.dims else buf.clone()
        grad_g = _unbroadcast(dot / c, g) if need_g else None
        grad_w = None
        if need_w:
            b = torch.where(n > _EPS, -g * dot / (c * c * c), 0.0)
            grad_w = torch.mul(grad, g / c, out=buf).addcmul_(weight, b)
        return grad_w, grad_g, None


_EPS = 1e-12


def _unbroadcast(x: Tensor, like: Tensor) -> Tensor:
    """Sum ``x`` over the dims where ``like`` was broadcast (size 1 in ``like``)."""
    if x.shape == like.shape:
        return x
    pairs = enumerate(zip(x.shape, like.shape, strict=True))
    dims = [i for i, (a, b) in pairs if b == 1 and a != 1]
    return x.sum(dim=dims, keepdim=True)


def dominance(importances: Sequence[Tensor], scales: Sequence[Tensor]) -> Tensor:
    """D_t = pi_t / sum_j pi_j with pi_t = (|A_t| / sum_inputs |A_t|) * |S_t|; shape [T, ...].

    With no input axis (filter granularity) the normalisation runs over the layer's filters.
    """
    pis = []
    for a, s in zip(importances, scales):
        mag = a.abs()
        denom = mag.sum(dim=-1, keepdim=True) if a.dim() >= 1 else mag
        pis.append(mag / denom.clamp_min(1e-12) * s.abs())
    pi = torch.stack(pis)
    return pi / pi.sum(dim=0, keepdim=True).clamp_min(1e-30)


class ImportanceBank(nn.Module):
    """``A_t`` and ``S_t`` for every shared weight, keyed by the weight's parameter name."""

    def __init__(
        self,
        weights: Mapping[str, Tensor],
        norms: Mapping[str, Tensor],
        tasks_of: Mapping[str, Sequence[str]],
        cfg: RouteConfig,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.trained = False  # set by the training methods once importance has been learned
        self.names = sorted(weights)
        self.tasks_of = {n: list(tasks_of[n]) for n in self.names}
        self.norm_names = sorted(norms)
        self.norm_tasks = {n: list(tasks_of[n]) for n in self.norm_names}
        # The bias (beta) of a shared norm has its own meta scales, as in the authors' fusion
        # (model_segnet_mt_DRMGF / DRMGF_multi_task_0202_fusionextra.py: S per 1-D parameter).
        for n in self.norm_names:
            self.norm_tasks[_bias_of(n)] = self.norm_tasks[n]
        self.A = nn.ParameterDict()
        self.S = nn.ParameterDict()
        for name in self.names:
            init = slice_norms(weights[name], cfg.granularity).float()
            for t in self.tasks_of[name]:
                self.A[_key(name, t)] = nn.Parameter(init.clone())
                self.S[_key(name, t)] = nn.Parameter(torch.full_like(init, cfg.s0))
        for name in self.norm_names:
            n = norms[name].shape[0]
            for t in self.norm_tasks[name]:
                self.S[_key(name, t)] = nn.Parameter(torch.full((n,), cfg.s0))
                self.S[_key(_bias_of(name), t)] = nn.Parameter(torch.full((n,), cfg.s0))

    # -- accessors -----------------------------------------------------------------------------
    def a(self, name: str) -> list[Tensor]:
        return [self.A[_key(name, t)] for t in self.tasks_of[name]]

    def s(self, name: str) -> list[Tensor]:
        tasks = self.tasks_of.get(name) or self.norm_tasks[name]
        return [self.S[_key(name, t)] for t in tasks]

    def importance_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.A.values()

    def scale_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.S.values()

    def gated_weights(self, params: Mapping[str, Tensor], task: str) -> dict[str, Tensor]:
        """Effective weights of ``task``'s gated forward for every shared weight it reaches."""
        out = {}
        for name in self.names:
            tasks = self.tasks_of[name]
            if task in tasks:
                out[name] = gated_weight(params[name], self.a(name), tasks.index(task), self.cfg)
        return out

    def dominance(self, name: str) -> Tensor:
        """D for the shared weight, norm weight or norm bias ``name``: [T_W, ...] in task order.

        Norm parameters have no learned A (the authors' A is 1), so pi_t = |S_t|.
        """
        if name in self.tasks_of:
            return dominance(self.a(name), self.s(name))
        scales = self.s(name)
        return dominance([torch.ones_like(s) for s in scales], scales)

    def filter_scores(self) -> dict[str, dict[str, Tensor]]:
        """Per shared weight and task, the per-filter dominance (a route score in [0, 1])."""
        out: dict[str, dict[str, Tensor]] = {}
        with torch.no_grad():
            for name in self.names:
                d = self.dominance(name)
                if d.dim() == 3:  # connection granularity: aggregate over inputs
                    d = d.mean(dim=-1)
                out[name] = {t: d[i].detach().clone() for i, t in enumerate(self.tasks_of[name])}
        return out


def _bias_of(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "bias"


def _key(name: str, task: str) -> str:
    return f"{name}::{task}".replace(".", "__")
