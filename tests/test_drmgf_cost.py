"""The cheaper kernels behind ``drmgf``'s cost (issue 4) against plain autograd references:
the gated reparametrisation, the fusion contraction in S and the batched finiteness guard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import routesurgeon as rs
from routesurgeon.importance import RouteConfig, gate, gated_weight
from routesurgeon.methods.drmgf import _Mix
from routesurgeon.trainer import Trainer, all_finite


def _reference_gated(w: torch.Tensor, a: list[torch.Tensor], t: int, cfg: RouteConfig
                     ) -> torch.Tensor:
    """G_t * W / ||W|| through autograd's own chain (division, clamp, norm)."""
    g = gate(a, t, cfg)
    g = g.reshape(*g.shape, *([1] * (w.dim() - g.dim())))
    dims = tuple(range(1 if cfg.granularity == "filter" else 2, w.dim()))
    n = w.abs() if not dims else torch.linalg.vector_norm(w, dim=dims, keepdim=True)
    return g * w / n.clamp_min(1e-12)


@pytest.mark.parametrize("granularity", ["filter", "connection"])
@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (5, 7), (4, 1, 3, 3)])
def test_gated_kernel_matches_autograd_reference(granularity: str, shape: tuple[int, ...]
                                                 ) -> None:
    cfg = RouteConfig(granularity=granularity)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=gen, dtype=torch.double)
    w[1] = 0.0  # a dead filter: the clamp passes no gradient through its norm
    a_shape = shape[:1] if granularity == "filter" else shape[:2]
    a = [(torch.rand(*a_shape, generator=gen, dtype=torch.double) + 0.1).requires_grad_()
         for _ in range(3)]
    w.requires_grad_()
    go = torch.randn(*shape, generator=gen, dtype=torch.double)
    got = gated_weight(w, a, 1, cfg)
    want = _reference_gated(w, a, 1, cfg)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad((got * go).sum(), [w, *a])
    g_want = torch.autograd.grad((want * go).sum(), [w, *a])
    for x, y in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(x, y)
    w2 = torch.randn(*shape, generator=gen, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w_, *a_: gated_weight(w_, a_, 0, cfg), (w2, *a))


@pytest.mark.parametrize("shape,d_shape", [((6, 4, 3, 3), (6,)), ((6, 4, 3, 3), (6, 4)),
                                           ((5, 7), (5, 7)), ((8,), (8,))])
def test_fusion_contraction_matches_explicit_sum(shape: tuple[int, ...], d_shape: tuple[int, ...]
                                                 ) -> None:
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(*shape, generator=gen, dtype=torch.double)
    parts = [torch.randn(*shape, generator=gen, dtype=torch.double) for _ in range(3)]
    d = torch.rand(3, *d_shape, generator=gen, dtype=torch.double).requires_grad_()
    got = _Mix.apply(p0, d, *parts)
    want = p0 + sum(d[j].reshape(*d_shape, *[1] * (len(shape) - len(d_shape))) * parts[j]
                    for j in range(3))
    torch.testing.assert_close(got, want)
    go = torch.randn(*shape, generator=gen, dtype=torch.double)
    torch.testing.assert_close(torch.autograd.grad((got * go).sum(), d)[0],
                               torch.autograd.grad((want * go).sum(), d)[0])
    assert torch.autograd.gradcheck(lambda d_: _Mix.apply(p0, d_, *parts), (d,))
    assert torch.equal(p0, p0.clone())  # W0 itself is not written


def test_all_finite_is_exact() -> None:
    base = [torch.randn(3, 3), torch.zeros(0), torch.tensor(1.0, dtype=torch.bfloat16),
            torch.tensor([1, 2])]
    assert all_finite(base)
    assert all_finite([torch.full((4,), 3e38)])  # the L2 norm overflows; the values are finite
    assert all_finite([])
    for bad in [float("nan"), float("inf"), float("-inf")]:
        x = torch.randn(10)
        x[7] = bad
        assert not all_finite([*base, x])
        assert not all_finite([torch.full((4,), 3e38), x.double()])


def test_guard_names_the_layer_after_the_batched_check(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net.train(), x)
    tr = Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.1), method="equal",
                 max_nonfinite=1, progress=False)
    params = dict(s.model.named_parameters())
    for p in params.values():
        p.grad = torch.zeros_like(p)
    assert tr.guard_step(where=" here")
    params["c2.weight"].grad[0, 0, 0, 0] = float("nan")
    with pytest.raises(rs.LossError, match=r"non-finite gradient here in \['c2\.weight'\]"):
        tr.guard_step(where=" here")
    assert all(p.grad is None for p in params.values())
