"""Property tests of the DR-MGF algebra against slow, explicit reference code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import routesurgeon as rs
from routesurgeon.importance import RouteConfig, dominance, gate, gated_weight, lrn
from routesurgeon.methods.drmgf import DRMGF
from routesurgeon.methods.drmgf_step import DRMGFStep


def _losses(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {t: (v.float() ** 2).mean() * (i + 1) for i, (t, v) in enumerate(out.items())}


def _explicit_task_grads(s: rs.Surgeon, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    params = dict(s.model.named_parameters())
    out: dict[str, dict[str, torch.Tensor]] = {}
    for t, loss in _losses(s(x)).items():
        names = [n for n, p in params.items()]
        gs = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True,
                                 retain_graph=True)
        out[t] = {n: (g if g is not None else torch.zeros_like(params[n]))
                  for n, g in zip(names, gs)}
    return out


def test_gated_forward_at_initial_importance_matches_spec() -> None:
    w = torch.randn(6, 4, 3, 3)
    cfg = RouteConfig()
    norms = w.flatten(1).norm(dim=1)
    a = [norms.clone(), norms.clone()]
    p = norms / (1 + cfg.beta * norms) ** cfg.gamma  # filter granularity: own magnitude
    expected = p[:, None, None, None] * w / norms[:, None, None, None]
    torch.testing.assert_close(gated_weight(w, a, 0, cfg), expected)
    # connection granularity: LRN over each filter's inputs
    cfg_c = RouteConfig(granularity="connection")
    cn = w.flatten(2).norm(dim=2)
    pc = cn / (1 + cfg_c.beta * cn.sum(1, keepdim=True)) ** cfg_c.gamma
    torch.testing.assert_close(lrn(cn, cfg_c.beta, cfg_c.gamma), pc)
    torch.testing.assert_close(
        gated_weight(w, [cn, cn], 1, cfg_c), pc[..., None, None] * w / cn[..., None, None]
    )


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 4), st.integers(0, 3), st.floats(1.0, 20.0))
def test_gate_mixes_own_importance_rho_times(n: int, t: int, rho: float) -> None:
    t = t % n
    a = [torch.rand(5) + 0.1 for _ in range(n)]
    cfg = RouteConfig(rho=rho)
    ps = [lrn(x, cfg.beta, cfg.gamma) for x in a]
    want = (rho * ps[t] + sum(ps[j] for j in range(n) if j != t)) / (rho + n - 1)
    torch.testing.assert_close(gate(a, t, cfg), want)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 4), st.randoms(use_true_random=False))
def test_dominance_is_a_distribution_and_permutes_with_tasks(n: int, rnd) -> None:
    g = torch.Generator().manual_seed(rnd.randint(0, 10**6))
    a = [torch.rand(7, generator=g) + 0.01 for _ in range(n)]
    s = [torch.rand(7, generator=g) + 0.01 for _ in range(n)]
    d = dominance(a, s)
    torch.testing.assert_close(d.sum(0), torch.ones(7, dtype=d.dtype))
    perm = list(reversed(range(n)))
    dp = dominance([a[i] for i in perm], [s[i] for i in perm])
    torch.testing.assert_close(dp, d[perm])


def _step_grads(s: rs.Surgeon, x: torch.Tensor) -> dict[str, torch.Tensor]:
    s.zero_grad(set_to_none=True)
    m = DRMGFStep(s)
    out = m.forward(x)
    m.backward(_losses(out))
    return {n: p.grad.clone() for n, p in s.model.named_parameters() if p.grad is not None}


def test_equal_importance_gives_equal_weight_gradient(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net.train(), x)
    with torch.no_grad():  # equal A and S everywhere: D_t = 1/T
        for p in s.importance_parameters():
            p.fill_(1.0)
    explicit = _explicit_task_grads(s, x)
    got = _step_grads(s, x)
    tasks_of = s.param_tasks()
    for n, g in got.items():
        want = sum(explicit[t][n] for t in tasks_of[n])
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6, msg=n)


def test_fused_gradient_matches_explicit_dominance_weighting(net: nn.Module,
                                                             x: torch.Tensor) -> None:
    s = rs.instrument(net.train(), x)
    with torch.no_grad():
        for p in s.importance_parameters():
            p.uniform_(0.1, 2.0)
    explicit = _explicit_task_grads(s, x)
    bank = s.importance_bank
    before = {name: bank.dominance(name).detach().clone() for name in bank.names}
    got = _step_grads(s, x)  # (the step also updates A: the dominance used is the one before)
    for name in bank.names:
        tasks = bank.tasks_of[name]
        d = before[name]
        want = sum(len(tasks) * d[j].reshape(-1, *[1] * (explicit[t][name].dim() - 1))
                   * explicit[t][name] for j, t in enumerate(tasks))
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=name)
    # exclusive parameters: exactly their own task's gradient
    torch.testing.assert_close(got["ha.weight"], explicit["a"]["ha.weight"])
    torch.testing.assert_close(got["dense.weight"], explicit["d"]["dense.weight"])


def test_fusion_matches_explicit_displacement_formula(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net.train(), x)
    method = DRMGF(s)
    params = dict(s.model.named_parameters())
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    tasks_of = s.param_tasks()
    deltas = {t: {n: torch.randn_like(p) for n, p in params.items() if t in tasks_of[n]}
              for t in s.tasks}
    with torch.no_grad():
        for p in s.importance_parameters() + s.scale_parameters():
            p.uniform_(0.1, 1.0)
    fused = method.fused(theta0, deltas)
    bank = s.importance_bank
    w = "c2.weight"
    a = [x_.detach() for x_ in bank.a(w)]
    sc = [x_.detach() for x_ in bank.s(w)]
    pis = [(ai.abs() / ai.abs().sum()) * si.abs() for ai, si in zip(a, sc)]
    total = sum(pis)
    want = theta0[w] + sum((pi / total)[:, None, None, None] * deltas[t][w]
                           for pi, t in zip(pis, bank.tasks_of[w]))
    torch.testing.assert_close(fused[w], want, rtol=1e-6, atol=1e-6)
    # exclusive: own displacement; shared bias (no importance): mean displacement
    torch.testing.assert_close(fused["ha.weight"], theta0["ha.weight"] + deltas["a"]["ha.weight"])
    b = "c2.bias"
    ts = sorted(tasks_of[b])
    torch.testing.assert_close(fused[b], theta0[b] + sum(deltas[t][b] for t in ts) / len(ts))


def test_gated_forward_is_plain_in_eval_and_outside_route(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    s.train()
    plain = s(x)["a"]
    with s.route("a"):
        gated = s(x)["a"]
    assert not torch.allclose(plain, gated)
    s.eval()
    with s.route("a"):
        torch.testing.assert_close(s(x)["a"], net.eval()(x)["a"])


def test_linear_trunk_is_fused_like_conv() -> None:
    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = nn.Linear(6, 8)
            self.h1, self.h2 = nn.Linear(8, 2), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            z = F.relu(self.l1(x))
            return {"p": self.h1(z), "q": self.h2(z)}

    s = rs.instrument(Mlp(), torch.randn(4, 6))
    assert s.importance_bank.names == ["l1.weight"]
    explicit = _explicit_task_grads(s, torch.randn(4, 6))
    assert set(explicit) == {"p", "q"}
