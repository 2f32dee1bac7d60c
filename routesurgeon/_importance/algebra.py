"""``RouteConfig`` and the dynamic-route algebra of DR-MGF (``../shared/method/drmgf.md``
sections 1-3): normalised kernels, LRN, the task gate, the gated weight and the dominance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from routesurgeon._importance.kernels import _GatedKernel

__all__ = ["RouteConfig", "dominance", "gate", "gated_weight", "importance_share", "lrn",
           "slice_norms", "unit_kernel"]


@dataclass(frozen=True)
class RouteConfig:
    """Hyperparameters of the dynamic routes (the authors' defaults)."""

    granularity: str = "filter"  # "filter" (A_t: [O]) or "connection" (A_t: [O, I])
    rho: float = 10.0
    beta: float = 1e-4
    gamma: float = 0.75
    s0: float = 1e-3
    # Filter granularity: a shared plain conv/linear is gated on its activations when its
    # output has at most this many times its weight's elements, else on its weight (cheaper
    # for early layers: large outputs, small kernels). Both are exact; this only sets the cost.
    activation_gate_ratio: float = 1.0

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


def importance_share(a: Tensor) -> Tensor:
    """``|A| / sum_inputs |A|``: the A factor of pi in the dominance (over the layer's filters at
    filter granularity, where A has no input axis)."""
    mag = a.abs()
    denom = mag.sum(dim=-1, keepdim=True) if a.dim() >= 1 else mag
    return mag / denom.clamp_min(1e-12)


def dominance(importances: Sequence[Tensor], scales: Sequence[Tensor]) -> Tensor:
    """D_t = pi_t / sum_j pi_j with pi_t = (|A_t| / sum_inputs |A_t|) * |S_t|; shape [T, ...].

    With no input axis (filter granularity) the normalisation runs over the layer's filters.
    """
    pi = torch.stack([importance_share(a) * s.abs() for a, s in zip(importances, scales)])
    return pi / pi.sum(dim=0, keepdim=True).clamp_min(1e-30)
