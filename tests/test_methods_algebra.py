"""Property tests of the DR-MGF algebra against slow, explicit reference code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import routesurgeon as rs
from routesurgeon.importance import RouteConfig, dominance, gate, gated_weight, lrn
from routesurgeon.methods.drmgf import DRMGF
from routesurgeon.methods.drmgf_step import DRMGFStep


class Mlp(nn.Module):
    """A linear trunk shared by two linear heads (tasks p and q)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 8)
        self.h1, self.h2 = nn.Linear(8, 2), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = F.relu(self.l1(x))
        return {"p": self.h1(z), "q": self.h2(z)}


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


def _random_displacements(s: rs.Surgeon) -> tuple[dict[str, torch.Tensor],
                                                   dict[str, dict[str, torch.Tensor]],
                                                   dict[str, set[str]]]:
    """theta0 (the model's parameters), a random displacement per task of every parameter the
    task reaches, and which tasks reach each parameter."""
    params = dict(s.model.named_parameters())
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    tasks_of = s.param_tasks()
    deltas = {t: {n: torch.randn_like(p) for n, p in params.items() if t in tasks_of[n]}
              for t in s.tasks}
    return theta0, deltas, tasks_of


def test_fusion_matches_explicit_displacement_formula(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net.train(), x)
    method = DRMGF(s)
    theta0, deltas, tasks_of = _random_displacements(s)
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
    s = rs.instrument(Mlp(), torch.randn(4, 6))
    assert s.importance_bank.names == ["l1.weight"]
    explicit = _explicit_task_grads(s, torch.randn(4, 6))
    assert set(explicit) == {"p", "q"}


# -- a net with every coupling kind: conv, BN, depthwise, residual add, concat, shared linear -----
class GroupNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.side = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(12, 16)
        self.ha, self.hb = nn.Linear(16, 3), nn.Linear(16, 2)
        self.hc = nn.Conv2d(12, 1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = F.relu(self.bn(self.stem(x)))
        r = y + self.pw(F.relu(self.dw(y)))  # depthwise + residual
        c = torch.cat([r, F.relu(self.side(r))], 1)  # concat
        z = F.relu(self.fc(c.mean((2, 3))))  # shared linear (tasks a, b)
        return {"a": self.ha(z), "b": self.hb(z), "c": self.hc(c)}


SHARED = ["stem.weight", "dw.weight", "pw.weight", "side.weight", "fc.weight"]


def _group_surgeon(granularity: str = "filter", tasks: object = None) -> rs.Surgeon:
    torch.manual_seed(0)
    s = rs.instrument(GroupNet().train(), torch.randn(2, 3, 8, 8), tasks=tasks,
                      granularity=granularity)
    assert sorted(s.importance_bank.names) == sorted(SHARED)
    return s


def _randomise_importance(s: rs.Surgeon, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in s.importance_parameters() + s.scale_parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 1.9 + 0.1)


def _method_grads(s: rs.Surgeon, x: torch.Tensor, task_of: dict[str, str] | None = None,
                  **cfg: object) -> dict[str, torch.Tensor]:
    s.zero_grad(set_to_none=True)
    m = DRMGFStep(s, **{"importance": "gated", **cfg})
    losses = _losses(m.forward(x))
    if task_of is not None:  # renamed tasks: {task: output}
        losses = {t: losses[o] for t, o in task_of.items()}
    m.backward(losses)
    return {n: p.grad.clone() for n, p in s.model.named_parameters() if p.grad is not None}


def _reference_step(s: rs.Surgeon, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Slow reference: per-task autograd.grad of every parameter, then explicit weighting."""
    explicit = _explicit_task_grads(s, x)
    bank, tasks_of = s.importance_bank, s.param_tasks()
    want: dict[str, torch.Tensor] = {}
    for n, ts in tasks_of.items():
        if n in bank.names or (n.endswith(".bias") and n[:-4] + "weight" in bank.names):
            layer = n if n in bank.names else n[:-4] + "weight"
            d = bank.dominance(layer).detach()
            if d.dim() == 3:
                d = d.mean(-1)
            order = bank.tasks_of[layer]
            want[n] = sum(len(order) * d[j].reshape(-1, *[1] * (explicit[t][n].dim() - 1))
                          * explicit[t][n] for j, t in enumerate(order))
        else:  # exclusive (one task) or other shared (norms): plain sum
            want[n] = sum(explicit[t][n] for t in ts)
    return want


@pytest.mark.parametrize("granularity", ["filter", "connection"])
def test_fused_gradients_match_reference_for_every_group_kind(granularity: str) -> None:
    s = _group_surgeon(granularity)
    _randomise_importance(s)
    x = torch.randn(3, 3, 8, 8)
    want = _reference_step(s, x)
    got = _method_grads(s, x)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
    # the dominance-weighted gradient differs from the plain sum where importance is unequal
    explicit = _explicit_task_grads(s, x)
    plain = sum(explicit[t]["stem.weight"] for t in s.tasks)
    assert (got["stem.weight"] - plain).abs().max() > 1e-4


@pytest.mark.parametrize("cfg", [{}, {"mode": "depth", "per_task_from": 0.5},
                                 {"mode": "depth", "per_task_from": "side"},
                                 {"mode": "branch"}])
def test_equal_importance_gives_equal_weight_gradient_in_every_mode(cfg: dict) -> None:
    s = _group_surgeon()
    with torch.no_grad():
        for p in s.importance_parameters() + s.scale_parameters():
            p.fill_(0.7)
    x = torch.randn(3, 3, 8, 8)
    explicit = _explicit_task_grads(s, x)
    got = _method_grads(s, x, **cfg)
    for n, ts in s.param_tasks().items():
        want = sum(explicit[t][n] for t in ts)
        torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-6, msg=f"{cfg} {n}")


def test_depth_mode_is_exact_above_the_cut_and_plain_below() -> None:
    s = _group_surgeon()
    _randomise_importance(s)
    x = torch.randn(3, 3, 8, 8)
    exact = _reference_step(s, x)
    explicit = _explicit_task_grads(s, x)
    got = _method_grads(s, x, mode="depth", per_task_from="side")
    tasks_of = s.param_tasks()
    for n in ["side.weight", "side.bias", "fc.weight", "fc.bias", "ha.weight", "hc.weight"]:
        torch.testing.assert_close(got[n], exact[n], rtol=1e-5, atol=1e-6, msg=n)
    for n in ["stem.weight", "bn.weight", "dw.weight", "pw.weight"]:  # below: summed loss
        want = sum(explicit[t][n] for t in tasks_of[n])
        torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-6, msg=n)
    # fraction 0 is the exact mode; fraction 1 leaves nothing above the cut
    full = _method_grads(s, x, mode="depth", per_task_from=0.0)
    for n in exact:
        torch.testing.assert_close(full[n], exact[n], rtol=1e-5, atol=1e-6, msg=n)
    none = _method_grads(s, x, mode="depth", per_task_from=1.0)
    for n, ts in tasks_of.items():
        torch.testing.assert_close(none[n], sum(explicit[t][n] for t in ts), rtol=1e-5,
                                   atol=1e-6, msg=n)


def test_depth_mode_rejects_an_unknown_module_prefix() -> None:
    s = _group_surgeon()
    m = DRMGFStep(s, mode="depth", per_task_from="layer9")
    with pytest.raises(ValueError, match=r"per_task_from='layer9' names no module"):
        m.forward(torch.randn(2, 3, 8, 8))


def test_branch_mode_scales_each_head_branch_by_its_dominance() -> None:
    net = Mlp()
    x = torch.randn(5, 6)
    s = rs.instrument(net, x)
    _randomise_importance(s)
    got = _method_grads(s, x, mode="branch")
    # reference: per-task gradients at the branch point z, weighted 2 * D_t per channel
    z = F.relu(net.l1(x))
    outs = {"p": net.h1(z), "q": net.h2(z)}
    losses = _losses(outs)
    d = s.importance_bank.dominance("l1.weight").detach()
    order = s.importance_bank.tasks_of["l1.weight"]
    g_z = sum(2 * d[j] * torch.autograd.grad(losses[t], z, retain_graph=True)[0]
              for j, t in enumerate(order))
    want_w, want_b = torch.autograd.grad(z, [net.l1.weight, net.l1.bias], grad_outputs=g_z)
    torch.testing.assert_close(got["l1.weight"], want_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["l1.bias"], want_b, rtol=1e-5, atol=1e-6)
    # heads keep their own task's gradient
    torch.testing.assert_close(got["h1.weight"],
                               torch.autograd.grad(losses["p"], net.h1.weight)[0])


def test_permuting_tasks_permutes_results() -> None:
    x = torch.randn(3, 3, 8, 8)
    names = {"a": "a", "b": "b", "c": "c"}
    renamed = {"z": "a", "y": "b", "x": "c"}  # reverses the bank's (sorted) task order
    grads, scores = [], []
    for tasks in (names, renamed):
        s = _group_surgeon(tasks=tasks)
        inv = {t: o for t, o in tasks.items()}
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():  # the same values per (weight, output), whatever the task names
            for layer in s.importance_bank.names:
                for t in sorted(s.importance_bank.tasks_of[layer], key=inv.__getitem__):
                    a = s.importance_bank.A[f"{layer}::{t}".replace(".", "__")]
                    a.copy_(torch.rand(a.shape, generator=g) + 0.1)
        grads.append(_method_grads(s, x, task_of=tasks))
        scores.append({layer: {inv[t]: v for t, v in per.items()}
                       for layer, per in s.importance().items()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)
    for layer in scores[0]:
        for o in scores[0][layer]:
            torch.testing.assert_close(scores[0][layer][o], scores[1][layer][o])


@pytest.mark.parametrize("granularity", ["filter", "connection"])
def test_gated_forward_at_initial_importance_on_a_model(granularity: str) -> None:
    """At A = ||W|| every task's gate is the same LRN, so each filter (connection) is scaled by
    (1 + beta * sum_inputs ||W||) ** -gamma: check the routed forward against that."""
    s = _group_surgeon(granularity)
    x = torch.randn(2, 3, 8, 8)
    cfg = RouteConfig()
    eff = {}
    for n, p in s.model.named_parameters():
        if n in SHARED:
            w = p.detach()
            if granularity == "filter":
                norm = w.flatten(1).norm(dim=1)
                eff[n] = w / (1 + cfg.beta * norm).pow(cfg.gamma).reshape(-1, *[1] * (w.dim() - 1))
            else:
                norm = w.flatten(2).norm(dim=2) if w.dim() > 2 else w.abs()
                scale = (1 + cfg.beta * norm.sum(1)).pow(cfg.gamma)
                eff[n] = w / scale.reshape(-1, *[1] * (w.dim() - 1))
    want = torch.func.functional_call(s.model, eff, (x,))
    for t in s.tasks:
        with s.route(t):
            got = s(x)
        torch.testing.assert_close(got[t], want[t], rtol=1e-5, atol=1e-6)


def test_fusion_matches_explicit_displacements_for_every_group_kind() -> None:
    s = _group_surgeon("connection")
    _randomise_importance(s)
    method = DRMGF(s)
    theta0, deltas, tasks_of = _random_displacements(s)
    fused = method.fused(theta0, deltas)
    bank = s.importance_bank
    for w in SHARED:  # pi_t = |A_t| / sum_inputs |A_t| * |S_t| per connection
        pis = [a.detach().abs() / a.detach().abs().sum(-1, keepdim=True) * sc.detach().abs()
               for a, sc in zip(bank.a(w), bank.s(w))]
        want = theta0[w] + sum(
            (pi / sum(pis)).reshape(*pi.shape, *[1] * (theta0[w].dim() - 2)) * deltas[t][w]
            for pi, t in zip(pis, bank.tasks_of[w]))
        torch.testing.assert_close(fused[w], want, rtol=1e-6, atol=1e-6, msg=w)
    for n in ["bn.weight", "bn.bias"]:  # shared norm: pi_t = |S_t| (A = 1)
        sc = [v.detach().abs() for v in bank.s(n)]
        want = theta0[n] + sum(si / sum(sc) * deltas[t][n] for si, t in zip(sc, bank.norm_tasks[n]))
        torch.testing.assert_close(fused[n], want, rtol=1e-6, atol=1e-6, msg=n)
    for n in ["stem.bias", "fc.bias"]:  # shared conv/linear bias: mean displacement
        ts = sorted(tasks_of[n])
        torch.testing.assert_close(fused[n], theta0[n] + sum(deltas[t][n] for t in ts) / len(ts))
    torch.testing.assert_close(fused["hc.weight"], theta0["hc.weight"] + deltas["c"]["hc.weight"])
