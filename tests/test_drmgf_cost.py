"""The cheaper kernels behind ``drmgf``'s cost (issue 4) against plain autograd references:
the gated reparametrisation, the fusion contraction in S and the batched finiteness guard."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from torch import nn

import routesurgeon as rs
import routesurgeon.methods.drmgf as drmgf_module
from routesurgeon import importance
from routesurgeon.importance import RouteConfig, gate, gated_weight
from routesurgeon.methods.drmgf import DRMGF, _Mix
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


@pytest.mark.parametrize("block", [None, 40])  # 40 elements: the S gradient in several row blocks
@pytest.mark.parametrize("shape,d_shape", [((6, 4, 3, 3), (6,)), ((6, 4, 3, 3), (6, 4)),
                                           ((5, 7), (5, 7)), ((8,), (8,))])
def test_fusion_contraction_matches_explicit_sum(shape: tuple[int, ...], d_shape: tuple[int, ...],
                                                 block: int | None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if block is not None:
        monkeypatch.setattr(drmgf_module, "_BLOCK", block)
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(*shape, generator=gen, dtype=torch.double)
    parts = [torch.randn(*shape, generator=gen, dtype=torch.double) for _ in range(3)]
    d = torch.rand(3, *d_shape, generator=gen, dtype=torch.double).requires_grad_()
    got = _Mix.apply(p0, d, None, *parts)
    want = p0 + sum(d[j].reshape(*d_shape, *[1] * (len(shape) - len(d_shape))) * parts[j]
                    for j in range(3))
    torch.testing.assert_close(got, want)
    go = torch.randn(*shape, generator=gen, dtype=torch.double)
    torch.testing.assert_close(torch.autograd.grad((got * go).sum(), d)[0],
                               torch.autograd.grad((want * go).sum(), d)[0])
    assert torch.autograd.gradcheck(lambda d_: _Mix.apply(p0, d_, None, *parts), (d,))
    assert torch.equal(p0, p0.clone())  # W0 itself is not written
    # written into a given tensor (the S pass: the live parameter's storage), same values
    live = torch.zeros_like(p0)
    into = _Mix.apply(p0, d, live.detach(), *parts)
    assert into.data_ptr() == live.data_ptr()
    want = p0 + sum(d[j].reshape(*d_shape, *[1] * (len(shape) - len(d_shape))) * parts[j]
                    for j in range(3))
    torch.testing.assert_close(live, want.detach())
    torch.testing.assert_close(torch.autograd.grad((into * go).sum(), d)[0],
                               torch.autograd.grad((want * go).sum(), d)[0])


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


# -- the activation-gated forward (filter granularity) against the weight-gated one -------------
LAYERS = {
    "conv": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "conv-no-bias": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
    "conv1d-dilated": lambda: nn.Conv1d(4, 6, 3, padding=2, dilation=2),
    "conv3d": lambda: nn.Conv3d(2, 4, 3, padding=1),
    "grouped": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),
    "linear": lambda: nn.Linear(5, 7),
    "linear-no-bias": lambda: nn.Linear(5, 7, bias=False),
}
INPUTS = {"conv1d-dilated": (3, 4, 9), "conv3d": (2, 2, 4, 5, 5), "linear": (3, 2, 5),
          "linear-no-bias": (4, 5)}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_activation_gated_layer_matches_weight_gated(kind: str) -> None:
    """s * conv(x, W) + b (``_ActivationGated``) against conv(x, G * W / ||W||) + b: outputs and
    the gradients w.r.t. the input, W, the bias and every A, to 1e-6, with a dead filter."""
    torch.manual_seed(0)
    m = LAYERS[kind]().double()
    with torch.no_grad():
        m.weight[1] = 0.0  # the clamp of a zero norm passes no gradient to W
    cfg = RouteConfig()
    x = torch.randn(*INPUTS.get(kind, (3, 4, 7, 7)), dtype=torch.double, requires_grad=True)
    a = [(torch.rand(m.weight.shape[0], dtype=torch.double) + 0.1).requires_grad_()
         for _ in range(3)]
    leaves = [x, m.weight, *([m.bias] if m.bias is not None else []), *a]
    g = gate(a, 1, cfg)
    got = importance._gated_layer(m, g, x, float("inf"))  # the activation path, whatever sizes
    assert got.grad_fn is not None and "ActivationGated" in type(got.grad_fn).__name__
    w_eff = gated_weight(m.weight, a, 1, cfg)
    want = torch.func.functional_call(m, {"weight": w_eff}, (x,))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    go = torch.randn_like(want)
    for u, v in zip(torch.autograd.grad((got * go).sum(), leaves),
                    torch.autograd.grad((want * go).sum(), leaves), strict=True):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)
    w2 = torch.randn_like(m.weight).requires_grad_()  # no dead filter: differentiable there
    assert torch.autograd.gradcheck(
        lambda x_, w_, *a_: _act_only(m, w_, gate(a_, 0, cfg), x_),
        (x.detach().requires_grad_(), w2, *[v.detach().requires_grad_() for v in a]),
        fast_mode=True)


def _act_only(m: nn.Module, w: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    conv = None if isinstance(m, nn.Linear) else (
        list(m.stride), list(m.padding), list(m.dilation), m.groups)
    return importance._ActivationGated.apply(x, w, m.bias, g, conv)


@pytest.mark.parametrize("granularity", ["filter", "connection"])
def test_gated_call_and_bake_match_the_weight_gated_forward(granularity: str) -> None:
    """The bank's gated call of a whole model (activation path on the layers it picks) against
    ``functional_call`` with ``gated_weights``, per task; and ``bake_`` writes those weights."""
    from test_methods_algebra import SHARED, _group_surgeon, _losses, _randomise_importance

    s = _group_surgeon(granularity)
    _randomise_importance(s)
    bank = s.importance_bank
    plan = bank._activation_plan(s.graph_module)
    assert (plan is None) == (granularity == "connection")
    if plan is not None:
        assert set(plan[1]) == set(SHARED)  # every shared conv/linear of GroupNet is plain
    x = torch.randn(3, 3, 8, 8)
    params = dict(s.model.named_parameters())
    leaves = [*params.values(), *s.importance_parameters()]
    cfg = bank.cfg
    # the default choice per layer, then every layer on its activations
    for ratio in (cfg.activation_gate_ratio, float("inf")):
        bank.cfg = dataclasses.replace(cfg, activation_gate_ratio=ratio)
        bank.__dict__.pop("_plans", None)
        try:
            for t in s.tasks:
                got = bank.gated_call(s.graph_module, params, t, (x,))
                want = torch.func.functional_call(s.graph_module, bank.gated_weights(params, t),
                                                  (x,), strict=False)
                for k in want:
                    torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
                gg = torch.autograd.grad(sum(_losses(got).values()), leaves, allow_unused=True)
                gw = torch.autograd.grad(sum(_losses(want).values()), leaves, allow_unused=True)
                for u, v in zip(gg, gw, strict=True):
                    assert (u is None) == (v is None)
                    if u is not None:
                        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
        finally:
            bank.cfg = cfg
            bank.__dict__.pop("_plans", None)
    want = {n: w.detach().clone() for n, w in bank.gated_weights(params, "b").items()}
    bank.bake_(params, "b")
    for n, w in want.items():
        assert torch.equal(params[n].detach(), w), n


def test_gated_call_keeps_hooked_modules_on_the_weight_path() -> None:
    from test_methods_algebra import _group_surgeon, _randomise_importance

    s = _group_surgeon()
    _randomise_importance(s)
    seen = []
    s.model.pw.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    params = dict(s.model.named_parameters())
    x = torch.randn(2, 3, 8, 8)
    got = s.importance_bank.gated_call(s.graph_module, params, "a", (x,))
    want = torch.func.functional_call(s.graph_module, s.importance_bank.gated_weights(params, "a"),
                                      (x,), strict=False)
    assert len(seen) == 2  # the user's hook ran in both forwards
    torch.testing.assert_close(got["a"], want["a"])


def test_fusion_pass_in_place_matches_the_reference_fused_forward() -> None:
    """The S pass writes the fused weights into the live parameters and batches the dominance:
    its S gradient and the committed parameters equal the slow path's (``fused()`` + a
    functional call), for one S step."""
    from test_methods_algebra import _group_surgeon, _losses, _randomise_importance

    s = _group_surgeon()
    _randomise_importance(s)
    m = DRMGF(s, s_batches=1)
    params = dict(s.model.named_parameters())
    tasks_of = s.param_tasks()
    g = torch.Generator().manual_seed(4)
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    deltas = {t: {n: 0.01 * torch.randn(p.shape, generator=g) for n, p in params.items()
                  if t in tasks_of[n]} for t in s.tasks}
    x = torch.randn(3, 3, 8, 8, generator=g)
    scales = s.scale_parameters()
    # reference: the differentiable fused() dict through a functional call
    ref_out = torch.func.functional_call(s.graph_module, m.fused(theta0, deltas), (x,),
                                         strict=False)
    ref = torch.autograd.grad(sum(_losses(ref_out).values()), scales, allow_unused=True)
    m._s_opt = torch.optim.SGD(scales, lr=0.0)  # lr 0: the commit uses the same S

    class _Tr:
        def _bar(self, b: object, _: str) -> object:
            return b

        def task_outputs(self, out: object) -> object:
            return out

        def check_step_losses(self, *_: object) -> bool:
            return True

        def guard_step(self, *_: object, **__: object) -> bool:
            return True

        loss_scale = 1.0

        def autocast(self) -> contextlib.AbstractContextManager[None]:
            return contextlib.nullcontext()

        def optimizer_step(self, opts: list[torch.optim.Optimizer]) -> None:
            for o in opts:
                o.step()

    def loss_of(k: int) -> object:
        return lambda o, _t: (o.float() ** 2).mean() * (k + 1)

    loss_fns = {t: loss_of(i) for i, t in enumerate(s.tasks)}
    m._fuse(_Tr(), [(x, dict.fromkeys(s.tasks))], loss_fns, theta0, deltas, {})
    for p, r in zip(scales, ref, strict=True):
        if r is None:
            assert p.grad is None or not p.grad.any()
        else:
            torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        want = m.fused(theta0, deltas)
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), want[n], rtol=1e-6, atol=1e-6, msg=n)
