"""How ``drmgf-step`` turns dominance into per-filter fusion weights, and the options tried to
make it earn its place (``DRMGFStepConfig``: ``uniform_mix``, ``warmup_steps``, ``learn_s``).

The fused gradient of a shared filter is ``sum_t c_t * g_t`` with ``c_t = T * D_t``. Options:

- ``uniform_mix = m``: ``D <- (1 - m) * D + m / T`` (shrink the dominance towards equal weights;
  ``m = 1`` is equal weighting, ``m = 0`` the plain dominance).
- ``warmup_steps = n``: equal weights for the first ``n`` steps while the importance is learned.
- ``learn_s = "hypergradient"``: learn the meta scales S (``surgeon.scale_parameters()``, which the
  dominance multiplies) by a one-step hypergradient: with the previous step's per-task filter
  gradients ``g_t'`` and this step's total gradient ``G = sum_t g_t``, the first-order change of
  this step's loss in S through the previous update ``-lr * sum_t c_t(S) g_t'`` is
  ``-lr * sum_t <dc_t/dS, h_t>`` with ``h_t[o] = <G[o], g_t'[o]>`` per filter ``o``. One Adam step
  on S (lr ``s_lr``) descends it (Baydin et al. 2018, "Online Learning Rate Adaptation with
  Hypergradient Descent", applied to the fusion weights; the learning rate only scales it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from routesurgeon.importance import dominance

__all__ = ["HypergradientS", "fusion_dominance"]


def fusion_dominance(d: Tensor, uniform_mix: float, equal: bool) -> Tensor:
    """The dominance used for fusion: ``d`` ([T_W, ...]) shrunk by ``uniform_mix`` towards
    ``1 / T_W``, or exactly uniform when ``equal`` (warm-up)."""
    n = d.shape[0]
    if equal:
        return torch.full_like(d, 1.0 / n)
    if uniform_mix:
        return (1.0 - uniform_mix) * d + uniform_mix / n
    return d


def _per_filter_dot(a: Tensor, b: Tensor) -> Tensor:
    """``<a[o], b[o]>`` for every output filter ``o`` of two weight-shaped tensors."""
    return (a * b).reshape(a.shape[0], -1).sum(1)


class HypergradientS:
    """One-step hypergradient learning of the meta scales S of every shared conv/linear weight."""

    def __init__(self, bank: Any, lr: float, uniform_mix: float) -> None:
        self.bank = bank
        self.uniform_mix = uniform_mix
        params = [bank.S[k] for k in bank.S]
        self.opt = torch.optim.Adam(params, lr=lr)
        self.previous: dict[str, list[Tensor]] = {}  # weight name -> per-task gradient (last step)

    def step(self, per_task: Mapping[str, Sequence[Tensor]]) -> None:
        """``per_task``: weight name -> this step's per-task weight gradients (in the layer's
        task order). Updates S from the previous step's gradients, then remembers these."""
        terms: list[Tensor] = []
        for name, grads in per_task.items():
            prev = self.previous.get(name)
            if prev is None or len(prev) != len(grads):
                continue
            with torch.no_grad():
                total = torch.stack(list(grads)).sum(0)
                h = torch.stack([_per_filter_dot(total, g) for g in prev])  # [T_W, O]
            a = [x.detach() for x in self.bank.a(name)]
            d = dominance(a, self.bank.s(name))
            if d.dim() == 3:
                d = d.mean(-1)
            c = len(grads) * fusion_dominance(d, self.uniform_mix, False)
            # the loss change is -lr * sum(c * h): descend it, i.e. minimise -sum(c * h)
            terms.append(-(c * h / h.abs().sum().clamp_min(1e-30)).sum())
        if terms:
            self.opt.zero_grad(set_to_none=True)
            torch.stack(terms).sum().backward()
            self.opt.step()
            with torch.no_grad():  # S stays positive (the dominance uses |S|)
                for p in self.opt.param_groups[0]["params"]:
                    p.abs_().clamp_(min=1e-8)
        self.previous = {n: [g.detach() for g in gs] for n, gs in per_task.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict(), "previous": self.previous}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])
        self.previous = dict(state["previous"])
