"""drmgf-step's fusion options (routesurgeon.methods.step_fusion) against slow explicit
references: shrinking towards equal weights, warm-up, and S learned by a one-step hypergradient."""

from __future__ import annotations

import pytest
import torch
from test_methods_algebra import (
    _explicit_task_grads,
    _group_surgeon,
    _losses,
    _method_grads,
    _randomise_importance,
)

from routesurgeon.importance import dominance
from routesurgeon.methods.drmgf_step import DRMGFStep, DRMGFStepConfig


def _weighted_reference(s, x, mix: float) -> dict[str, torch.Tensor]:
    """Per-task gradients weighted by T * ((1 - mix) * D + mix / T) on shared conv/linear
    weights and their biases, the plain sum elsewhere."""
    explicit = _explicit_task_grads(s, x)
    bank = s.importance_bank
    want = {}
    for n, ts in s.param_tasks().items():
        layer = n if n in bank.names else n[:-4] + "weight"
        if layer in bank.names:
            d = bank.dominance(layer).detach()
            d = d.mean(-1) if d.dim() == 3 else d
            order = bank.tasks_of[layer]
            d = (1 - mix) * d + mix / len(order)
            want[n] = sum(len(order) * d[j].reshape(-1, *[1] * (explicit[t][n].dim() - 1))
                          * explicit[t][n] for j, t in enumerate(order))
        else:
            want[n] = sum(explicit[t][n] for t in ts)
    return want


@pytest.mark.parametrize("mix", [0.0, 0.3, 1.0])
def test_uniform_mix_shrinks_the_dominance_towards_equal(mix: float) -> None:
    s = _group_surgeon()
    _randomise_importance(s)
    x = torch.randn(3, 3, 8, 8)
    want = _weighted_reference(s, x, mix)
    got = _method_grads(s, x, uniform_mix=mix)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
    if mix == 1.0:  # exactly equal weighting
        explicit = _explicit_task_grads(s, x)
        for n, ts in s.param_tasks().items():
            torch.testing.assert_close(got[n], sum(explicit[t][n] for t in ts), rtol=1e-5,
                                       atol=1e-6)


def test_warmup_gives_equal_weights_for_its_steps_then_the_dominance() -> None:
    s = _group_surgeon()
    _randomise_importance(s)
    x = torch.randn(3, 3, 8, 8)
    m = DRMGFStep(s, importance="gated", warmup_steps=2)  # gated: A changes only in after_step
    grads = []
    for _ in range(3):
        s.zero_grad(set_to_none=True)
        m.backward(_losses(m.forward(x)))
        grads.append({n: p.grad.clone() for n, p in s.model.named_parameters()
                      if p.grad is not None})
    equal, fused = _weighted_reference(s, x, 1.0), _weighted_reference(s, x, 0.0)
    for n in equal:
        for step in (0, 1):
            torch.testing.assert_close(grads[step][n], equal[n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[2][n], fused[n], rtol=1e-5, atol=1e-6)
    assert m.state_dict()["fused_steps"] == 3


def test_hypergradient_moves_s_along_the_explicit_one_step_hypergradient() -> None:
    s = _group_surgeon()
    _randomise_importance(s)
    x = torch.randn(3, 3, 8, 8)
    bank = s.importance_bank
    lr = 1e-3
    m = DRMGFStep(s, importance="gated", learn_s="hypergradient", s_lr=lr)
    s0 = {k: v.detach().clone() for k, v in bank.S.items()}
    first = _method_grads_with(m, s, x)
    # the first step has no previous gradients: S unchanged, the gradient is plain drmgf-step
    assert all(torch.equal(s0[k], bank.S[k]) for k in s0)
    want = _weighted_reference(s, x, 0.0)
    for n in want:
        torch.testing.assert_close(first[n], want[n], rtol=1e-5, atol=1e-6)
    # second step (same batch and weights: previous gradients = current ones): Adam's first step
    # moves every S element by -lr * sign of the surrogate's gradient, computed here by hand
    explicit = _explicit_task_grads(s, x)
    surrogate = 0.0
    scales = {k: v.detach().clone().requires_grad_(True) for k, v in bank.S.items()}
    for name in bank.names:
        order = bank.tasks_of[name]
        g = [explicit[t][name] for t in order]
        total = sum(g)
        h = torch.stack([(total * gt).reshape(gt.shape[0], -1).sum(1) for gt in g])
        d = dominance([a.detach() for a in bank.a(name)],
                      [scales[k] for k in [f"{name}::{t}".replace(".", "__") for t in order]])
        d = d.mean(-1) if d.dim() == 3 else d
        surrogate = surrogate - (len(order) * d * h / h.abs().sum()).sum()
    surrogate.backward()
    _method_grads_with(m, s, x)
    moved = 0
    for k, p in scales.items():
        if p.grad is None or not p.grad.abs().max() > 1e-12:
            continue
        expect = (s0[k] - lr * torch.sign(p.grad)).abs().clamp_min(1e-8)
        torch.testing.assert_close(bank.S[k].detach(), expect, rtol=1e-4, atol=1e-6, msg=k)
        moved += 1
    assert moved >= len(bank.names)


def _method_grads_with(m: DRMGFStep, s, x: torch.Tensor) -> dict[str, torch.Tensor]:
    s.zero_grad(set_to_none=True)
    m.backward(_losses(m.forward(x)))
    return {n: p.grad.clone() for n, p in s.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bad, match", [
    ({"uniform_mix": 1.5}, "uniform_mix"), ({"warmup_steps": -1}, "warmup_steps"),
    ({"learn_s": "meta"}, "learn_s"), ({"learn_s": "hypergradient", "mode": "branch"},
                                       "per-task gradients")])
def test_bad_fusion_options_are_refused(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DRMGFStepConfig(**bad)
